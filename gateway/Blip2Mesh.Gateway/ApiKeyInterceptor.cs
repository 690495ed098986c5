using System.Security.Cryptography;
using System.Text;
using Grpc.Core;
using Grpc.Core.Interceptors;

namespace Blip2Mesh.Gateway;

/// <summary>
/// Requires "authorization: Bearer KEY" with one of the configured keys on the public API (gRPC and JSON alike);
/// health and reflection stay open for probes and tools.
/// </summary>
public sealed class ApiKeyInterceptor(ApiKeys keys) : Interceptor
{
    public override Task<TResponse> UnaryServerHandler<TRequest, TResponse>(TRequest request, ServerCallContext context, UnaryServerMethod<TRequest, TResponse> continuation)
    {
        Check(context);
        return continuation(request, context);
    }

    public override Task ServerStreamingServerHandler<TRequest, TResponse>(TRequest request, IServerStreamWriter<TResponse> responseStream, ServerCallContext context, ServerStreamingServerMethod<TRequest, TResponse> continuation)
    {
        Check(context);
        return continuation(request, responseStream, context);
    }

    private void Check(ServerCallContext context)
    {
        if (!context.Method.StartsWith("/blip2.v1.", StringComparison.Ordinal)) return;
        if (keys.Refusal(context.RequestHeaders.GetValue("authorization")) is { } refusal)
            throw new RpcException(new Status(StatusCode.Unauthenticated, refusal));
    }
}

/// <summary>The accepted API keys (none: the API is open).</summary>
public sealed record ApiKeys(IReadOnlyList<byte[]> Keys)
{
    /// <summary>Why a request with this authorization header is refused, or null when it may pass.</summary>
    public string? Refusal(string? authorization)
    {
        if (Keys.Count == 0) return null;
        const string prefix = "Bearer ";
        if (authorization is null || !authorization.StartsWith(prefix, StringComparison.OrdinalIgnoreCase))
            return "an API key is required: send the header 'authorization: Bearer <key>'";
        var presented = Encoding.UTF8.GetBytes(authorization[prefix.Length..].Trim());
        return Keys.Any(k => CryptographicOperations.FixedTimeEquals(k, presented)) ? null : "the API key is not valid";
    }

    /// <summary>One key per line; blank lines and lines starting with # are ignored.</summary>
    public static ApiKeys Load(string? path) => path is null
        ? new ApiKeys([])
        : new ApiKeys(File.ReadAllLines(path).Select(l => l.Trim()).Where(l => l.Length > 0 && !l.StartsWith('#')).Select(Encoding.UTF8.GetBytes).ToList());
}
