using System.Reflection;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.Routing;

namespace Blip2Mesh.Gateway;

/// <summary>
/// The browser playground: a static page (embedded in this assembly, no build step) that talks to the gateway's
/// own HTTP/JSON API. <c>GET /</c> serves the page, <c>GET /playground/{file}</c> its script, style sheet and icon.
/// Browsers reach it on the HTTP/1.1 port; the gRPC port speaks HTTP/2 cleartext only.
/// </summary>
public static class Playground
{
    private static readonly (string Path, string Resource, string ContentType)[] Assets =
    [
        ("/", "Playground/index.html", "text/html; charset=utf-8"),
        ("/playground/app.js", "Playground/app.js", "text/javascript; charset=utf-8"),
        ("/playground/style.css", "Playground/style.css", "text/css; charset=utf-8"),
        ("/playground/favicon.svg", "Playground/favicon.svg", "image/svg+xml"),
    ];

    // The page loads nothing from elsewhere; previews are blob: URLs and the API is same-origin.
    private const string ContentSecurityPolicy =
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; " +
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

    public static IEndpointRouteBuilder MapPlayground(this IEndpointRouteBuilder app)
    {
        var assembly = typeof(Playground).Assembly;
        foreach (var (path, resource, contentType) in Assets)
        {
            var bytes = Read(assembly, resource);
            app.MapGet(path, (HttpContext context) =>
            {
                var headers = context.Response.Headers;
                headers.CacheControl = "no-cache";
                headers.XContentTypeOptions = "nosniff";
                headers.ContentSecurityPolicy = ContentSecurityPolicy;
                return Results.Bytes(bytes, contentType);
            }).ExcludeFromDescription();
        }
        return app;
    }

    private static byte[] Read(Assembly assembly, string resource)
    {
        using var stream = assembly.GetManifestResourceStream(resource)
            ?? throw new InvalidOperationException($"the playground asset {resource} is not embedded in {assembly.GetName().Name}");
        using var copy = new MemoryStream();
        stream.CopyTo(copy);
        return copy.ToArray();
    }
}
