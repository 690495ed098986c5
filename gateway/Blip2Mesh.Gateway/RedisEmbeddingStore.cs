using System.Runtime.InteropServices;
using Blip2Mesh.ServiceDefaults;
using Microsoft.Extensions.Logging;
using StackExchange.Redis;

namespace Blip2Mesh.Gateway;

/// <summary>
/// The shared (L2) embedding cache in Redis, for all gateway replicas. Redis being slow or down never fails a
/// request: operations time out quickly, are counted and logged (at most every 10 s), and the gateway goes on
/// with its own cache and the stages.
/// </summary>
public sealed class RedisEmbeddingStore : IDisposable
{
    private readonly ConnectionMultiplexer _redis;
    private readonly ILogger _logger;
    private readonly TimeSpan _ttl;
    private long _lastLoggedTicks;

    public RedisEmbeddingStore(string endpoint, TimeSpan ttl, ILogger logger)
    {
        _logger = logger;
        _ttl = ttl;
        var config = ConfigurationOptions.Parse(endpoint);
        config.AbortOnConnectFail = false;
        config.ConnectTimeout = 1000;
        config.SyncTimeout = 500;
        config.AsyncTimeout = 500;
        _redis = ConnectionMultiplexer.Connect(config);
    }

    public async Task<float[]?> TryGetAsync(string key)
    {
        try
        {
            var value = await _redis.GetDatabase().StringGetAsync(key);
            return value.IsNull ? null : MemoryMarshal.Cast<byte, float>(((ReadOnlyMemory<byte>)value).Span).ToArray();
        }
        catch (Exception e) when (e is RedisException or TimeoutException or ObjectDisposedException)
        {
            Failed("read", e);
            return null;
        }
    }

    public async Task TrySetAsync(string key, float[] values)
    {
        try
        {
            await _redis.GetDatabase().StringSetAsync(key, MemoryMarshal.AsBytes(values.AsSpan()).ToArray(), _ttl);
        }
        catch (Exception e) when (e is RedisException or TimeoutException or ObjectDisposedException)
        {
            Failed("write", e);
        }
    }

    private void Failed(string operation, Exception e)
    {
        MeshTelemetry.CacheErrors.Add(1);
        var now = Environment.TickCount64;
        var last = Interlocked.Read(ref _lastLoggedTicks);
        if (now - last > 10_000 && Interlocked.CompareExchange(ref _lastLoggedTicks, now, last) == last)
            _logger.LogWarning("Redis embedding cache {Operation} failed; serving without it: {Message}", operation, e.Message);
    }

    public void Dispose() => _redis.Dispose();
}
