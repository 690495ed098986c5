using System.Net;
using System.Threading.Channels;
using Blip2Mesh.Gateway;
using Grpc.Health.V1;
using Grpc.HealthCheck;
using Grpc.Net.Client;
using Grpc.Net.Client.Balancer;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Server.Kestrel.Core;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging.Abstractions;

namespace Blip2Mesh.Tests;

/// <summary>Which replicas a stage's balancer is offered: those answering SERVING, or all when none does.</summary>
public sealed class HealthCheckedResolverTests
{
    /// <summary>A replica that is nothing but grpc.health.v1, its status set by the test.</summary>
    private sealed class Replica : IAsyncDisposable
    {
        private readonly WebApplication _app;
        public HealthServiceImpl Health { get; } = new();
        public int Port { get; } = MeshProcess.FreePort();

        public Replica(HealthCheckResponse.Types.ServingStatus status)
        {
            Health.SetStatus("", status);
            var builder = WebApplication.CreateSlimBuilder();
            builder.WebHost.ConfigureKestrel(k => k.Listen(IPAddress.Loopback, Port, l => l.Protocols = HttpProtocols.Http2));
            builder.Services.AddGrpc();
            builder.Services.AddSingleton(Health);
            _app = builder.Build();
            _app.MapGrpcService<HealthServiceImpl>();
            _app.StartAsync().GetAwaiter().GetResult();
        }

        public ValueTask DisposeAsync() => _app.DisposeAsync();
    }

    [Fact]
    public async Task OffersTheReplicasThatAnswerServingAndAllWhenNoneDoes()
    {
        const HealthCheckResponse.Types.ServingStatus Serving = HealthCheckResponse.Types.ServingStatus.Serving;
        const HealthCheckResponse.Types.ServingStatus NotServing = HealthCheckResponse.Types.ServingStatus.NotServing;
        await using var up = new Replica(Serving);
        await using var loading = new Replica(NotServing);
        var nobody = MeshProcess.FreePort();
        var options = new ResilienceOptions { HealthCheckInterval = TimeSpan.FromMilliseconds(100), HealthCheckTimeout = TimeSpan.FromSeconds(1) };
        using var resolver = new HealthCheckedResolver("decoder", [("127.0.0.1", up.Port), ("127.0.0.1", loading.Port), ("127.0.0.1", nobody)],
            (address, port, _) => GrpcChannel.ForAddress($"http://{address}:{port}"), options, NullLogger.Instance);
        var published = Channel.CreateUnbounded<int[]>();
        resolver.Start(result => published.Writer.TryWrite([.. result.Addresses!.Select(a => a.EndPoint.Port).Order()]));

        // What is offered next, once changes made together have all been seen (a round may see some of them first).
        async Task Offers(params int[] ports)
        {
            using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(10));
            while (!(await published.Reader.ReadAsync(timeout.Token)).SequenceEqual(ports.Order())) { }
        }
        await Offers(up.Port);
        loading.Health.SetStatus("", Serving);
        await Offers(up.Port, loading.Port);
        up.Health.SetStatus("", NotServing);
        loading.Health.SetStatus("", NotServing);
        // None passes: all are offered, so calls fail with the stage's own answer rather than for want of an address.
        await Offers(up.Port, loading.Port, nobody);
        up.Health.SetStatus("", Serving);
        await Offers(up.Port);
    }
}
