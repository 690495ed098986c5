using System.Runtime.InteropServices;
using Blip2Mesh.ServiceDefaults;
using Microsoft.Extensions.Logging;
using Polly;
using Polly.CircuitBreaker;
using Polly.Timeout;
using StackExchange.Redis;

namespace Blip2Mesh.Gateway;

/// <summary>
/// The shared (L2) embedding cache in Redis, for all gateway replicas. Redis being slow or down never fails a
/// request and costs it little: each operation has a short timeout, a circuit breaker stops asking a Redis that keeps
/// failing (for a few seconds at a time), writes never hold a request up, and failures are counted and logged (at
/// most every 10 s) while the gateway goes on with its own cache and the stages.
/// </summary>
public sealed class RedisEmbeddingStore : IDisposable
{
    private readonly ConnectionMultiplexer _redis;
    private readonly ILogger _logger;
    private readonly TimeSpan _ttl;
    private readonly ResiliencePipeline _pipeline;
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
        _pipeline = new ResiliencePipelineBuilder()
            .AddCircuitBreaker(new CircuitBreakerStrategyOptions
            {
                ShouldHandle = new PredicateBuilder().Handle<Exception>(),
                FailureRatio = 0.5,
                MinimumThroughput = 4,
                SamplingDuration = TimeSpan.FromSeconds(10),
                BreakDuration = TimeSpan.FromSeconds(5),
            })
            .AddTimeout(TimeSpan.FromMilliseconds(250))
            .Build();
    }

    public async Task<float[]?> TryGetAsync(string key)
    {
        try
        {
            var value = await _pipeline.ExecuteAsync(async ct => await _redis.GetDatabase().StringGetAsync(key).WaitAsync(ct));
            return value.IsNull ? null : MemoryMarshal.Cast<byte, float>(((ReadOnlyMemory<byte>)value).Span).ToArray();
        }
        catch (Exception e) when (e is RedisException or TimeoutException or TimeoutRejectedException or BrokenCircuitException or ObjectDisposedException)
        {
            Failed("read", e);
            return null;
        }
    }

    /// <summary>Stores in the background: a request never waits for Redis to take its embeddings.</summary>
    public void Set(string key, float[] values)
    {
        var bytes = MemoryMarshal.AsBytes(values.AsSpan()).ToArray();
        _ = Task.Run(async () =>
        {
            try
            {
                await _pipeline.ExecuteAsync(async ct => await _redis.GetDatabase().StringSetAsync(key, bytes, _ttl).WaitAsync(ct));
            }
            catch (Exception e) when (e is RedisException or TimeoutException or TimeoutRejectedException or BrokenCircuitException or ObjectDisposedException)
            {
                Failed("write", e);
            }
        });
    }

    private void Failed(string operation, Exception e)
    {
        MeshTelemetry.CacheErrors.Add(1);
        var now = Environment.TickCount64;
        var last = Interlocked.Read(ref _lastLoggedTicks);
        if (now - last > 10_000 && Interlocked.CompareExchange(ref _lastLoggedTicks, now, last) == last)
            _logger.LogWarning("Redis embedding cache {Operation} failed; serving without it: {Message}", operation,
                e is BrokenCircuitException ? "skipped while Redis keeps failing" : e.Message);
    }

    public void Dispose() => _redis.Dispose();
}
