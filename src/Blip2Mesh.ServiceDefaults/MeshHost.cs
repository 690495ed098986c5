using System.Net;
using System.Security.Cryptography.X509Certificates;
using Grpc.Health.V1;
using Grpc.HealthCheck;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.Server.Kestrel.Core;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using OpenTelemetry.Exporter;

namespace Blip2Mesh.ServiceDefaults;

/// <summary>The composition every service host starts from.</summary>
public static class MeshHost
{
    /// <summary>
    /// A web application builder with the gRPC endpoint (HTTP/2 cleartext) and, when asked, an HTTP/1.1 endpoint;
    /// gRPC message limits, grpc.health.v1 (NOT_SERVING until <see cref="ServiceHealth.SetServing"/>) and reflection.
    /// </summary>
    public static WebApplicationBuilder CreateBuilder(string serviceName, ServiceOptions options)
    {
        // Model runs block their thread for milliseconds; enough ready threads keep the gRPC I/O of other requests
        // from queueing behind them (the pool otherwise grows by one thread a second).
        ThreadPool.GetMinThreads(out var workers, out var io);
        ThreadPool.SetMinThreads(Math.Max(workers, 4 * Environment.ProcessorCount + 8), io);
        var builder = WebApplication.CreateSlimBuilder();
        builder.Logging.ClearProviders();
        builder.Logging.AddSimpleConsole(o =>
        {
            o.SingleLine = true;
            o.TimestampFormat = "HH:mm:ss.fff ";
        });
        builder.Logging.SetMinimumLevel(LogLevel.Information);
        builder.Logging.AddFilter("Microsoft.AspNetCore", LogLevel.Warning);
        builder.Logging.AddFilter("Grpc", LogLevel.Warning);

        var address = IPAddress.Parse(options.Bind);
        var certificate = options.TlsCertificate is null ? null : LoadCertificate(options.TlsCertificate, options.TlsKey);
        builder.WebHost.ConfigureKestrel(kestrel =>
        {
            kestrel.Listen(address, options.Port, listen =>
            {
                listen.Protocols = HttpProtocols.Http2;
                if (certificate is not null) listen.UseHttps(certificate);
            });
            if (options.HttpPort is { } httpPort)
                kestrel.Listen(address, httpPort, listen =>
                {
                    listen.Protocols = HttpProtocols.Http1;
                    if (certificate is not null) listen.UseHttps(certificate);
                });
            kestrel.Limits.MaxRequestBodySize = options.MaxMessageBytes;
        });
        builder.Services.Configure<HostOptions>(o => o.ShutdownTimeout = options.ShutdownGrace);
        builder.AddMeshTelemetry(serviceName);

        builder.Services.AddGrpc(grpc =>
        {
            grpc.Interceptors.Add<ServingErrorInterceptor>();
            grpc.MaxReceiveMessageSize = options.MaxMessageBytes;
            grpc.MaxSendMessageSize = options.MaxMessageBytes;
        });
        builder.Services.AddGrpcReflection();
        var health = new ServiceHealth(serviceName);
        builder.Services.AddSingleton(health);
        builder.Services.AddSingleton(health.Impl);
        builder.Services.AddSingleton(options);
        return builder;
    }

    private static X509Certificate2 LoadCertificate(string certificate, string? key)
    {
        if (key is null) throw new ArgumentException("--tls-cert needs --tls-key");
        // Re-import so the private key is usable by SslStream on every platform.
        using var pem = X509Certificate2.CreateFromPemFile(certificate, key);
        return X509CertificateLoader.LoadPkcs12(pem.Export(X509ContentType.Pkcs12), null);
    }

    /// <summary>
    /// A service host: <paramref name="add"/> registers its stage on the builder (e.g. <c>AddVisionStage</c>), <paramref name="map"/>
    /// maps it on the built application (e.g. <c>MapVisionStage</c>); health, reflection and metrics are mapped for every host.
    /// </summary>
    public static WebApplication Build(string serviceName, ServiceOptions options, Action<WebApplicationBuilder> add, Action<WebApplication> map)
    {
        var builder = CreateBuilder(serviceName, options);
        add(builder);
        var app = builder.Build();
        map(app);
        app.MapMeshEndpoints();
        return app;
    }

    /// <summary>
    /// Maps health (grpc.health.v1, and over plain HTTP for probes and balancers that speak no gRPC: <c>/healthz</c> and
    /// <c>/v2/health/live</c> answer while the process runs, <c>/readyz</c> and <c>/v2/health/ready</c> while it is
    /// SERVING and every registered <see cref="IReadinessCheck"/> passes), reflection and the metrics endpoint.
    /// </summary>
    public static void MapMeshEndpoints(this WebApplication app)
    {
        app.MapGrpcService<HealthServiceImpl>();
        app.MapGrpcReflectionService();
        app.MapPrometheusScrapingEndpoint();
        foreach (var path in new[] { "/healthz", "/v2/health/live" })
            app.MapGet(path, () => Results.Json(new { status = "live" }));
        foreach (var path in new[] { "/readyz", "/v2/health/ready" })
            app.MapGet(path, async (ServiceHealth health, IEnumerable<IReadinessCheck> checks, HttpContext context) =>
            {
                var reason = health.IsServing ? null : "not serving (the model is loading, or the service is stopping)";
                foreach (var check in checks)
                    reason ??= await check.NotReadyBecauseAsync(context.RequestAborted);
                return reason is null
                    ? Results.Json(new { status = "ready" })
                    : Results.Json(new { status = "not ready", reason }, statusCode: StatusCodes.Status503ServiceUnavailable);
            });
    }
}

/// <summary>What else a service needs to be ready beyond its own model (the gateway: its stages).</summary>
public interface IReadinessCheck
{
    /// <summary>Why the service is not ready, as a sentence for an operator; null when it is.</summary>
    Task<string?> NotReadyBecauseAsync(CancellationToken cancellation);
}

/// <summary>grpc.health.v1 status of this process, for "" and for the service's own name.</summary>
public sealed class ServiceHealth
{
    private readonly string _serviceName;

    public ServiceHealth(string serviceName)
    {
        _serviceName = serviceName;
        Impl = new HealthServiceImpl();
        Set(HealthCheckResponse.Types.ServingStatus.NotServing);
    }

    public HealthServiceImpl Impl { get; }

    private readonly Lock _gate = new();
    private bool _stopping;
    private volatile bool _serving;

    /// <summary>Whether the service is SERVING now.</summary>
    public bool IsServing => _serving;

    /// <summary>SERVING, unless the host has begun to stop: a model that finishes loading during shutdown stays withdrawn.</summary>
    public void SetServing()
    {
        lock (_gate)
            if (!_stopping) Set(HealthCheckResponse.Types.ServingStatus.Serving);
    }

    /// <summary>NOT_SERVING for good, so balancers drain this process while it finishes what it has.</summary>
    public void SetStopping()
    {
        lock (_gate)
        {
            _stopping = true;
            Set(HealthCheckResponse.Types.ServingStatus.NotServing);
        }
    }

    private void Set(HealthCheckResponse.Types.ServingStatus status)
    {
        _serving = status == HealthCheckResponse.Types.ServingStatus.Serving;
        Impl.SetStatus("", status);
        Impl.SetStatus(_serviceName, status);
    }
}
