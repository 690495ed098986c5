using System.Net;
using Grpc.Core;
using Grpc.Net.Client;
using Grpc.Net.Client.Balancer;
using Grpc.Net.Client.Configuration;
using Microsoft.Extensions.DependencyInjection;

namespace Blip2Mesh.Gateway;

/// <summary>
/// One gRPC channel per stage, balancing round-robin over the stage's replicas: a static list of "host:port",
/// or a single DNS name (e.g. a Kubernetes headless Service) re-resolved periodically.
/// </summary>
public sealed class StageChannels : IDisposable
{
    public StageChannels(GatewayOptions options, int maxMessageBytes)
    {
        Vision = Create("vision", options.Vision, maxMessageBytes);
        QFormer = Create("qformer", options.QFormer, maxMessageBytes);
        Decoder = Create("decoder", options.Decoder, maxMessageBytes);
    }

    public GrpcChannel Vision { get; }
    public GrpcChannel QFormer { get; }
    public GrpcChannel Decoder { get; }

    private static GrpcChannel Create(string stage, IReadOnlyList<string> replicas, int maxMessageBytes)
    {
        if (replicas.Count == 0) throw new ArgumentException($"no {stage} address given");
        var endpoints = replicas.Select(r => Parse(stage, r)).ToList();
        var services = new ServiceCollection();
        string target;
        if (endpoints.Count == 1 && !IPAddress.TryParse(endpoints[0].Host, out _) && endpoints[0].Host != "localhost")
        {
            services.AddSingleton<ResolverFactory>(new DnsResolverFactory(refreshInterval: TimeSpan.FromSeconds(15)));
            target = $"dns:///{endpoints[0].Host}:{endpoints[0].Port}";
        }
        else
        {
            services.AddSingleton<ResolverFactory>(new StaticResolverFactory(_ => endpoints.Select(e => new BalancerAddress(e.Host, e.Port))));
            target = $"static:///{stage}";
        }
        return GrpcChannel.ForAddress(target, new GrpcChannelOptions
        {
            Credentials = ChannelCredentials.Insecure,
            ServiceConfig = new ServiceConfig { LoadBalancingConfigs = { new RoundRobinConfig() } },
            ServiceProvider = services.BuildServiceProvider(),
            MaxReceiveMessageSize = maxMessageBytes,
            MaxSendMessageSize = maxMessageBytes,
        });
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
