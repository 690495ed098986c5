using System.Net;
using System.Net.Security;
using System.Security.Cryptography.X509Certificates;
using Grpc.Core;
using Grpc.Net.Client;
using Grpc.Net.Client.Balancer;
using Grpc.Net.Client.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;

namespace Blip2Mesh.Gateway;

/// <summary>
/// One gRPC channel per stage, balancing round-robin over the stage's replicas that pass their health checks
/// (<see cref="HealthCheckedResolver"/>): a list of "host:port", or a DNS name (e.g. a Kubernetes headless Service)
/// re-resolved periodically.
/// </summary>
public sealed class StageChannels : IDisposable
{
    public StageChannels(GatewayOptions options, int maxMessageBytes, ILogger logger)
    {
        var ca = options.StageTlsCa is null ? null : X509Certificate2.CreateFromPem(File.ReadAllText(options.StageTlsCa));
        Vision = Create("vision", options.Vision, maxMessageBytes, ca, options.Resilience, logger);
        QFormer = Create("qformer", options.QFormer, maxMessageBytes, ca, options.Resilience, logger);
        Decoder = Create("decoder", options.Decoder, maxMessageBytes, ca, options.Resilience, logger);
    }

    public GrpcChannel Vision { get; }
    public GrpcChannel QFormer { get; }
    public GrpcChannel Decoder { get; }

    private static GrpcChannel Create(string stage, IReadOnlyList<string> replicas, int maxMessageBytes, X509Certificate2? ca, ResilienceOptions resilience, ILogger logger)
    {
        if (replicas.Count == 0) throw new ArgumentException($"no {stage} address given");
        var endpoints = replicas.Select(r => Parse(stage, r)).ToList();
        GrpcChannel HealthChannel(string address, int port, string host)
        {
            var health = new SocketsHttpHandler { ConnectTimeout = resilience.HealthCheckTimeout };
            if (ca is not null)
            {
                health.SslOptions.TargetHost = host;
                health.SslOptions.RemoteCertificateValidationCallback = (_, certificate, _, errors) => TrustedBy(ca, certificate, errors);
            }
            var authority = IPAddress.TryParse(address, out var ip) && ip.AddressFamily == System.Net.Sockets.AddressFamily.InterNetworkV6 ? $"[{address}]" : address;
            return GrpcChannel.ForAddress($"{(ca is null ? "http" : "https")}://{authority}:{port}", new GrpcChannelOptions { HttpHandler = health });
        }
        var services = new ServiceCollection();
        services.AddSingleton<ResolverFactory>(new HealthCheckedResolverFactory(() => new HealthCheckedResolver(stage, endpoints, HealthChannel, resilience, logger)));
        var target = $"stage:///{stage}";
        var handler = new SocketsHttpHandler
        {
            EnableMultipleHttp2Connections = true,
            PooledConnectionIdleTimeout = Timeout.InfiniteTimeSpan,
            // A stage that stops answering (hung, paused, its host gone without a reset) fails its calls in bounded time.
            KeepAlivePingDelay = resilience.KeepAlivePingDelay,
            KeepAlivePingTimeout = resilience.KeepAlivePingTimeout,
            KeepAlivePingPolicy = HttpKeepAlivePingPolicy.WithActiveRequests,
        };
        if (ca is not null) handler.SslOptions.RemoteCertificateValidationCallback = (_, certificate, _, errors) => TrustedBy(ca, certificate, errors);
        return GrpcChannel.ForAddress(target, new GrpcChannelOptions
        {
            Credentials = ca is null ? ChannelCredentials.Insecure : ChannelCredentials.SecureSsl,
            HttpHandler = handler,
            ServiceConfig = new ServiceConfig { LoadBalancingConfigs = { new RoundRobinConfig() } },
            ServiceProvider = services.BuildServiceProvider(),
            MaxReceiveMessageSize = maxMessageBytes,
            MaxSendMessageSize = maxMessageBytes,
        });
    }

    /// <summary>The stage's certificate chains to our CA and names the host we dialled.</summary>
    private static bool TrustedBy(X509Certificate2 ca, X509Certificate? certificate, SslPolicyErrors errors)
    {
        if (certificate is null || (errors & ~SslPolicyErrors.RemoteCertificateChainErrors) != SslPolicyErrors.None) return false;
        using var chain = new X509Chain();
        chain.ChainPolicy.TrustMode = X509ChainTrustMode.CustomRootTrust;
        chain.ChainPolicy.CustomTrustStore.Add(ca);
        chain.ChainPolicy.RevocationMode = X509RevocationMode.NoCheck;
        return chain.Build(X509CertificateLoader.LoadCertificate(certificate.GetRawCertData()));
    }

    private static (string Host, int Port) Parse(string stage, string address)
    {
        var colon = address.LastIndexOf(':');
        if (colon <= 0 || !int.TryParse(address[(colon + 1)..], out var port) || port is <= 0 or > 65535)
            throw new ArgumentException($"{stage} address '{address}' is not HOST:PORT");
        return (address[..colon].Trim('[', ']'), port);
    }

    public void Dispose()
    {
        Vision.Dispose();
        QFormer.Dispose();
        Decoder.Dispose();
    }
}
