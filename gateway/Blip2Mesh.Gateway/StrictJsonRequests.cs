using System.Text.Json;
using Google.Protobuf;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Grpc.JsonTranscoding;
using Microsoft.AspNetCore.Http;

namespace Blip2Mesh.Gateway;

/// <summary>
/// JSON transcoding silently drops fields its message does not have; a misspelt option would then do nothing. This
/// reads every transcoded request body against its message first (protobuf's JSON parser, which knows both the proto
/// and the JSON names) and answers HTTP 400 naming the field, in the body shape transcoding uses for its own errors.
/// </summary>
public static class StrictJsonRequests
{
    public static WebApplication UseStrictJsonRequests(this WebApplication app)
    {
        app.Use(async (context, next) =>
        {
            var method = context.GetEndpoint()?.Metadata.GetMetadata<GrpcJsonTranscodingMetadata>()?.MethodDescriptor;
            if (method is null || context.Request.ContentLength == 0 || HttpMethods.IsGet(context.Request.Method))
            {
                await next();
                return;
            }
            context.Request.EnableBuffering();
            string? problem;
            using (var reader = new StreamReader(context.Request.Body, leaveOpen: true))
                problem = Check(await reader.ReadToEndAsync(context.RequestAborted), method.InputType);
            if (problem is not null)
            {
                context.Response.StatusCode = StatusCodes.Status400BadRequest;
                await context.Response.WriteAsJsonAsync(new { code = 3, message = problem, details = Array.Empty<object>() });
                return;
            }
            context.Request.Body.Position = 0;
            await next();
        });
        return app;
    }

    /// <summary>Why <paramref name="json"/> is not a <paramref name="message"/>, or null when it is one.</summary>
    public static string? Check(string json, Google.Protobuf.Reflection.MessageDescriptor message)
    {
        try
        {
            JsonParser.Default.Parse(json, message);
            return null;
        }
        catch (InvalidProtocolBufferException e) when (e.Message.StartsWith("Unknown field: ", StringComparison.Ordinal))
        {
            return $"unknown field '{e.Message["Unknown field: ".Length..]}': {message.Name} has no such field";
        }
        catch (Exception e) when (e is InvalidProtocolBufferException or InvalidJsonException or JsonException or FormatException)
        {
            return $"the request body is not a valid {message.Name} in JSON: {e.Message}";
        }
    }
}
