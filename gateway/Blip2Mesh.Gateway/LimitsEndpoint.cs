using System.Text.Json;
using Blip2Mesh.ServiceDefaults;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.Routing;

namespace Blip2Mesh.Gateway;

/// <summary>
/// <c>GET /v1/limits</c>: what one request may ask of this gateway, for clients (the playground) that would rather
/// not learn it from a refusal. Guarded by the API keys like the rest of the API; a refusal has the same JSON shape
/// as the transcoded API's (<c>{"code": 16, "message": …}</c>).
/// </summary>
public static class LimitsEndpoint
{
    public sealed record Limits(int MaxNewTokens, int MaxBeams, int MaxPromptTokens, int MaxImageBytes, long MaxImagePixels);

    private sealed record Refusal(int Code, string Message, object[] Details);

    private static readonly JsonSerializerOptions Json = new(JsonSerializerDefaults.Web);

    public static IEndpointRouteBuilder MapLimits(this IEndpointRouteBuilder app)
    {
        app.MapGet("/v1/limits", (HttpContext context, ApiKeys keys, GenerationLimits generation, GatewayOptions gateway) =>
        {
            if (keys.Refusal(context.Request.Headers.Authorization) is { } refusal)
                return Results.Json(new Refusal((int)Grpc.Core.StatusCode.Unauthenticated, refusal, []), Json, statusCode: StatusCodes.Status401Unauthorized);
            context.Response.Headers.CacheControl = "no-cache";
            return Results.Json(new Limits(generation.MaxNewTokens, generation.MaxBeams, generation.MaxPromptTokens,
                gateway.MaxImageBytes, gateway.MaxImagePixels), Json);
        }).ExcludeFromDescription();
        return app;
    }
}
