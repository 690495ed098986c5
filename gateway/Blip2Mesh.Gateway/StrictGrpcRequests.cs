using System.Buffers.Binary;
using Blip2Mesh.Contracts.V1;
using Blip2Mesh.ServiceDefaults;
using Google.Protobuf;
using Grpc.Core;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Http;

namespace Blip2Mesh.Gateway;

/// <summary>
/// A public API request whose bytes are not its protobuf message fails in grpc-dotnet's deserializer, before any
/// interceptor, and reaches the caller as UNKNOWN. The public methods take one request message each, so this reads it
/// first and answers INVALID_ARGUMENT in words when it does not parse; what parses goes on untouched.
/// </summary>
public static class StrictGrpcRequests
{
    private const string Prefix = "/blip2.v1.Blip2/";

    public static WebApplication UseStrictGrpcRequests(this WebApplication app)
    {
        app.Use(async (context, next) =>
        {
            var path = context.Request.Path.Value ?? "";
            var method = path.StartsWith(Prefix, StringComparison.Ordinal) && context.Request.ContentType?.StartsWith("application/grpc", StringComparison.Ordinal) == true
                ? Blip2.Descriptor.FindMethodByName(path[Prefix.Length..])
                : null;
            if (method is null || method.IsClientStreaming)
            {
                await next();
                return;
            }
            // Read into memory (the request is bounded by the message size limit) and handed on from there.
            var body = new MemoryStream();
            await context.Request.Body.CopyToAsync(body, context.RequestAborted);
            body.Position = 0;
            context.Request.Body = body;
            if (Problem(body.GetBuffer().AsSpan(0, (int)body.Length), method.InputType) is { } problem)
            {
                context.Response.ContentType = "application/grpc";
                context.Response.Headers["grpc-status"] = ((int)StatusCode.InvalidArgument).ToString();
                context.Response.Headers["grpc-message"] = Uri.EscapeDataString(problem);
                context.Response.Headers[ServingErrors.MarkerTrailer] = "1";
                return;
            }
            await next();
        });
        return app;
    }

    /// <summary>Why a request body (gRPC length-prefixed frames) is not one <paramref name="message"/>; null when it is, or when it is compressed.</summary>
    private static string? Problem(ReadOnlySpan<byte> body, Google.Protobuf.Reflection.MessageDescriptor message)
    {
        if (body.Length < 5) return null; // no message at all: grpc-dotnet answers that itself
        if (body[0] != 0) return null; // compressed: grpc-dotnet decompresses and checks it
        var length = BinaryPrimitives.ReadUInt32BigEndian(body[1..]);
        if (length != body.Length - 5) return null;
        try
        {
            message.Parser.ParseFrom(body[5..]);
            return null;
        }
        catch (InvalidProtocolBufferException)
        {
            return $"the request is not a valid {message.Name} message";
        }
    }
}
