using Polly;
using Polly.CircuitBreaker;
using Polly.Retry;
using Polly.Timeout;

namespace Blip2Mesh.Gateway;

/// <summary>How the gateway rides through failing stage replicas; every number in one place.</summary>
public sealed record ResilienceOptions
{
    /// <summary>Longest a vision or Q-Former call may take before it is retried elsewhere.</summary>
    public TimeSpan AttemptTimeout { get; init; } = TimeSpan.FromSeconds(30);
    /// <summary>Deadline of a decoder stream whose caller set none.</summary>
    public TimeSpan DefaultDecodeTimeout { get; init; } = TimeSpan.FromMinutes(5);
    /// <summary>HTTP/2 pings on stage connections with calls in flight: a stage that stops answering them is given up on.</summary>
    public TimeSpan KeepAlivePingDelay { get; init; } = TimeSpan.FromSeconds(10);
    public TimeSpan KeepAlivePingTimeout { get; init; } = TimeSpan.FromSeconds(5);
    /// <summary>How often each stage replica's health is asked; one that does not answer SERVING in time gets no calls.</summary>
    public TimeSpan HealthCheckInterval { get; init; } = TimeSpan.FromSeconds(1);
    public TimeSpan HealthCheckTimeout { get; init; } = TimeSpan.FromSeconds(2);
    public int MaxRetries { get; init; } = 3;
    public TimeSpan RetryDelay { get; init; } = TimeSpan.FromMilliseconds(100);
    /// <summary>The circuit opens when this share of a stage's calls failed within the sampling window…</summary>
    public double BreakerFailureRatio { get; init; } = 0.5;
    public TimeSpan BreakerSamplingDuration { get; init; } = TimeSpan.FromSeconds(10);
    /// <summary>…and at least this many calls were made; it stays open this long.</summary>
    public int BreakerMinimumThroughput { get; init; } = 20;
    public TimeSpan BreakerDuration { get; init; } = TimeSpan.FromSeconds(2);
}

/// <summary>
/// The Polly pipelines of the stage calls. Vision and Q-Former calls are idempotent: timeout per attempt, retry with
/// jittered exponential backoff on transient status codes, circuit breaker. A decoder stream is retried (on the next
/// replica, round-robin) only while it has not yet forwarded anything to the caller.
/// </summary>
public sealed class StagePipelines
{
    /// <summary>Set on the call's resilience context once the decoder stream forwarded its first message.</summary>
    public static readonly ResiliencePropertyKey<bool> StreamStarted = new("blip2mesh.stream-started");

    public StagePipelines(ResilienceOptions options)
    {
        DefaultDecodeTimeout = options.DefaultDecodeTimeout;
        Vision = Build(options, timeout: true);
        QFormer = Build(options, timeout: true);
        Decoder = Build(options, timeout: false);
    }

    public ResiliencePipeline Vision { get; }
    public ResiliencePipeline QFormer { get; }
    public ResiliencePipeline Decoder { get; }
    public TimeSpan DefaultDecodeTimeout { get; }

    /// <summary>What the retry and breaker count: a transient failure of a call that has not yet streamed anything.</summary>
    private static ValueTask<bool> Handles(Outcome<object> outcome, ResilienceContext context) => ValueTask.FromResult(
        !context.Properties.GetValue(StreamStarted, false) && outcome.Exception is { } e && StageErrors.IsTransient(e));

    private static ResiliencePipeline Build(ResilienceOptions options, bool timeout)
    {
        var builder = new ResiliencePipelineBuilder()
            .AddRetry(new RetryStrategyOptions
            {
                ShouldHandle = args => Handles(args.Outcome, args.Context),
                MaxRetryAttempts = options.MaxRetries,
                Delay = options.RetryDelay,
                BackoffType = DelayBackoffType.Exponential,
                UseJitter = true,
            })
            .AddCircuitBreaker(new CircuitBreakerStrategyOptions
            {
                ShouldHandle = args => Handles(args.Outcome, args.Context),
                FailureRatio = options.BreakerFailureRatio,
                SamplingDuration = options.BreakerSamplingDuration,
                MinimumThroughput = options.BreakerMinimumThroughput,
                BreakDuration = options.BreakerDuration,
            });
        if (timeout) builder.AddTimeout(options.AttemptTimeout);
        return builder.Build();
    }
}
