using System.Net;
using Grpc.Core;
using Grpc.Health.V1;
using Grpc.Net.Client;
using Grpc.Net.Client.Balancer;
using Microsoft.Extensions.Logging;

namespace Blip2Mesh.Gateway;

/// <summary>
/// The replicas of one stage as its channel's round-robin sees them: those whose last health check answered SERVING
/// within <see cref="ResilienceOptions.HealthCheckTimeout"/>, asked every <see cref="ResilienceOptions.HealthCheckInterval"/>.
/// A replica that stops answering without closing its connections (a frozen node, a long pause) still accepts TCP
/// connections, so the balancer alone keeps sending it calls that only the keep-alive pings end; one that is loading
/// or draining says NOT_SERVING. When no replica passes, all are offered, so calls fail with the stage's own error.
/// A name (a Kubernetes headless Service) is looked up again every <see cref="NameRefresh"/>.
/// </summary>
internal sealed class HealthCheckedResolver(string stage, IReadOnlyList<(string Host, int Port)> endpoints,
    Func<string, int, string, GrpcChannel> healthChannel, ResilienceOptions options, ILogger logger) : Resolver
{
    private static readonly TimeSpan NameRefresh = TimeSpan.FromSeconds(15);
    private readonly CancellationTokenSource _stop = new();
    /// <summary>At most one early check pending, however many connections failed meanwhile.</summary>
    private readonly SemaphoreSlim _wake = new(0, 1);
    /// <summary>One channel per replica for its health checks, so a check never rides the balancer it informs.</summary>
    private readonly Dictionary<DnsEndPoint, GrpcChannel> _channels = [];
    /// <summary>Grpc.Net.Client's own attribute (its DNS resolver sets it): the Host header, and so the name TLS checks.</summary>
    private static readonly BalancerAttributesKey<string> HostOverride = new("HostOverride");

    public override void Start(Action<ResolverResult> listener) => _ = Task.Run(() => RunAsync(listener, _stop.Token));

    /// <summary>The balancer lost a connection: check now rather than at the next interval.</summary>
    public override void Refresh()
    {
        try
        {
            _wake.Release();
        }
        catch (SemaphoreFullException)
        {
            // One is pending already.
        }
    }

    private async Task RunAsync(Action<ResolverResult> listener, CancellationToken stop)
    {
        List<(BalancerAddress Address, string Host)> replicas = [];
        var resolvedAt = DateTime.MinValue;
        HashSet<DnsEndPoint>? offered = null;
        var unhealthy = new HashSet<DnsEndPoint>();
        while (!stop.IsCancellationRequested)
        {
            try
            {
                if (DateTime.UtcNow - resolvedAt > NameRefresh)
                {
                    replicas = await ResolveAsync(stop);
                    resolvedAt = DateTime.UtcNow;
                }
                var checks = await Task.WhenAll(replicas.Select(async r => (r.Address, Failure: await FailureAsync(r.Address, r.Host, stop))));
                foreach (var (address, failure) in checks)
                {
                    if (failure is not null && unhealthy.Add(address.EndPoint))
                        logger.LogWarning("{Stage} replica {Address} failed its health check ({Failure}): no calls go to it until it passes", stage, address.EndPoint, failure);
                    else if (failure is null && unhealthy.Remove(address.EndPoint))
                        logger.LogInformation("{Stage} replica {Address} passes its health check again", stage, address.EndPoint);
                }
                var healthy = checks.Where(c => c.Failure is null).Select(c => c.Address).ToList();
                if (healthy.Count == 0) healthy = replicas.Select(r => r.Address).ToList();
                var endPoints = healthy.Select(a => a.EndPoint).ToHashSet();
                if (offered is null || !offered.SetEquals(endPoints))
                {
                    offered = endPoints;
                    listener(ResolverResult.ForResult(healthy));
                }
            }
            catch (Exception) when (stop.IsCancellationRequested)
            {
                return;
            }
            catch (Exception e)
            {
                // The name does not resolve (yet): the balancer reports the stage unavailable until it does.
                logger.LogWarning("the {Stage} stage's replicas cannot be found: {Message}", stage, e.Message);
                listener(ResolverResult.ForFailure(new Status(StatusCode.Unavailable, $"the {stage} stage's address does not resolve", e)));
                resolvedAt = DateTime.MinValue;
            }
            try
            {
                await _wake.WaitAsync(options.HealthCheckInterval, stop);
            }
            catch (OperationCanceledException)
            {
                return;
            }
        }
    }

    /// <summary>Each replica's address, with the name it was given (what TLS checks the certificate against).</summary>
    private async Task<List<(BalancerAddress, string)>> ResolveAsync(CancellationToken stop)
    {
        var replicas = new List<(BalancerAddress, string)>();
        foreach (var (host, port) in endpoints)
        {
            if (IPAddress.TryParse(host, out _)) replicas.Add((new BalancerAddress(host, port), host));
            else
                foreach (var ip in await Dns.GetHostAddressesAsync(host, stop))
                {
                    var address = new BalancerAddress(ip.ToString(), port);
                    address.Attributes.Set(HostOverride, $"{host}:{port}");
                    replicas.Add((address, host));
                }
        }
        return replicas;
    }

    /// <summary>Why the replica is not fit for calls, or null when it answered SERVING in time.</summary>
    private async Task<string?> FailureAsync(BalancerAddress address, string host, CancellationToken stop)
    {
        if (!_channels.TryGetValue(address.EndPoint, out var channel))
            _channels[address.EndPoint] = channel = healthChannel(address.EndPoint.Host, address.EndPoint.Port, host);
        try
        {
            var reply = await new Health.HealthClient(channel).CheckAsync(new HealthCheckRequest(),
                deadline: DateTime.UtcNow + options.HealthCheckTimeout, cancellationToken: stop);
            return reply.Status == HealthCheckResponse.Types.ServingStatus.Serving ? null : $"it reports {reply.Status}";
        }
        catch (RpcException e) when (!stop.IsCancellationRequested)
        {
            return e.StatusCode == StatusCode.DeadlineExceeded ? $"no answer within {options.HealthCheckTimeout.TotalSeconds:0.#} s" : $"{e.StatusCode}";
        }
    }

    protected override void Dispose(bool disposing)
    {
        _stop.Cancel();
        foreach (var channel in _channels.Values) channel.Dispose();
        base.Dispose(disposing);
    }
}

/// <summary>Creates the <see cref="HealthCheckedResolver"/> of one stage's channel (target "stage:///NAME").</summary>
internal sealed class HealthCheckedResolverFactory(Func<HealthCheckedResolver> create) : ResolverFactory
{
    public override string Name => "stage";

    public override Resolver Create(ResolverOptions options) => create();
}
