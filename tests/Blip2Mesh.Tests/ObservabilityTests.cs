using System.Diagnostics;
using System.Globalization;
using Blip2Mesh.Cli;
using Blip2Mesh.Gateway;
using Blip2Mesh.ServiceDefaults;
using Grpc.Health.V1;
using Grpc.Net.Client;
using Microsoft.AspNetCore.Builder;
using OpenTelemetry;
using OpenTelemetry.Trace;

namespace Blip2Mesh.Tests;

/// <summary>Metrics on every service's /metrics and one trace per request across the mesh.</summary>
public sealed class ObservabilityTests
{
    private static readonly string[] Images = Directory.GetFiles(Path.Combine(Fixtures.Demo, "samples")).Where(f => !f.EndsWith(".json")).Order().Take(3).ToArray();

    private static Dictionary<string, double> Scrape(string url)
    {
        using var http = new HttpClient();
        var values = new Dictionary<string, double>();
        foreach (var line in http.GetStringAsync(url).GetAwaiter().GetResult().Split('\n'))
        {
            if (line.Length == 0 || line[0] == '#') continue;
            var space = line.LastIndexOf(' ');
            // Series without the scope label, so tests read "name{labels}" as Prometheus shows them.
            var series = line[..space].Replace("otel_scope_name=\"Blip2Mesh\",", "").Replace("{otel_scope_name=\"Blip2Mesh\"}", "");
            values[series] = double.Parse(line[(space + 1)..], CultureInfo.InvariantCulture);
        }
        return values;
    }

    [Fact]
    public async Task MetricsAfterAFewRequestsHaveSensibleValues()
    {
        using var mesh = new MeshProcess(Fixtures.Demo);
        var client = MeshClients.Gateway(mesh.GatewayAddress, out var channel);
        using var _ = channel;
        var generated = 0;
        const int requests = 9;
        for (var i = 0; i < requests; i++)
        {
            var answer = await MeshClients.AskAsync(client, MeshClients.Request(File.ReadAllBytes(Images[i % Images.Length]), i < 3 ? "" : "Question: how many shapes are there? Answer:"));
            Assert.Null(answer.Error);
            generated += answer.TokenIds.Length;
        }

        var gateway = Scrape(mesh.Metrics["gateway"]);
        const string generateOk = "{method=\"Generate\",status=\"OK\"}";
        Assert.Equal(requests, gateway[$"blip2mesh_gateway_request_duration_milliseconds_count{generateOk}"]);
        Assert.Equal(requests, gateway[$"blip2mesh_gateway_requests_total{generateOk}"]);
        Assert.InRange(gateway[$"blip2mesh_gateway_request_duration_milliseconds_sum{generateOk}"], 1, 60_000 * requests);
        Assert.Equal(requests, gateway["blip2mesh_gateway_time_to_first_token_milliseconds_count"]);
        Assert.True(gateway["blip2mesh_gateway_time_to_first_token_milliseconds_sum"] < gateway[$"blip2mesh_gateway_request_duration_milliseconds_sum{generateOk}"]);
        // A rejected request is counted under its status: the error rate is visible.
        var refused = await MeshClients.AskAsync(client, MeshClients.Request(File.ReadAllBytes(Images[0]), "", new Contracts.V1.GenerationOptions { NumBeams = 99 }));
        Assert.Equal(Grpc.Core.StatusCode.InvalidArgument, refused.Error?.StatusCode);
        Assert.Equal(1, Scrape(mesh.Metrics["gateway"])["blip2mesh_gateway_requests_total{method=\"Generate\",status=\"INVALID_ARGUMENT\"}"]);
        Assert.True(gateway["blip2mesh_gateway_tokens_per_second_count"] > 0);
        Assert.Equal(Images.Length, gateway["blip2mesh_cache_misses_total"]);
        Assert.Equal(requests - Images.Length, gateway["blip2mesh_cache_hits_total{level=\"l1\"}"]);

        var vision = Scrape(mesh.Metrics["vision"]);
        Assert.Equal(Images.Length, vision["blip2mesh_stage_requests_total{stage=\"vision\"}"]);
        Assert.Equal(Images.Length, vision["blip2mesh_stage_duration_milliseconds_count{stage=\"vision\"}"]);
        Assert.Equal(Images.Length, vision["blip2mesh_batch_size_count{stage=\"vision\"}"]);
        var qformer = Scrape(mesh.Metrics["qformer"]);
        Assert.Equal(Images.Length, qformer["blip2mesh_stage_requests_total{stage=\"qformer\"}"]);

        var decoder = Scrape(mesh.Metrics["decoder-0"]);
        Assert.Equal(requests, decoder["blip2mesh_stage_requests_total{stage=\"decoder\"}"]);
        Assert.Equal(generated, decoder["blip2mesh_decoder_generated_tokens_total"]);
        Assert.True(decoder["blip2mesh_batch_size_count{stage=\"decoder\"}"] >= generated / (double)requests);
        Assert.Equal(0, decoder["blip2mesh_decoder_active_sequences"]);
        Assert.Equal(0, decoder["blip2mesh_decoder_queue_depth"]);
    }

    [Fact]
    public async Task OneTraceSpansGatewayVisionQFormerAndDecoder()
    {
        var spans = new List<Activity>();
        // Other tests host services in this process too, and their spans reach this exporter while it listens: this
        // test's request is the one under its own root span, and the list is read only once the exporter is gone.
        using var testSource = new ActivitySource("Blip2Mesh.Tests");
        var tracing = Sdk.CreateTracerProviderBuilder()
            .AddSource(MeshTelemetry.Name, testSource.Name).AddAspNetCoreInstrumentation().AddGrpcClientInstrumentation()
            .AddInMemoryExporter(spans).Build();

        ServiceOptions Options() => new() { Model = Fixtures.Demo, Port = MeshProcess.FreePort() };
        var visionOptions = Options();
        var qformerOptions = Options();
        var decoderOptions = Options();
        var gatewayOptions = Options();
        Activity? root = null;
        WebApplication[] apps =
        [
            StageHosts.Vision(visionOptions), StageHosts.QFormer(qformerOptions), StageHosts.Decoder(decoderOptions),
            StageHosts.Gateway(gatewayOptions, new GatewayOptions
            {
                Vision = [$"127.0.0.1:{visionOptions.Port}"], QFormer = [$"127.0.0.1:{qformerOptions.Port}"], Decoder = [$"127.0.0.1:{decoderOptions.Port}"],
            }),
        ];
        try
        {
            foreach (var app in apps) await app.StartAsync();
            foreach (var port in new[] { visionOptions.Port, qformerOptions.Port, decoderOptions.Port })
            {
                using var healthChannel = GrpcChannel.ForAddress($"http://127.0.0.1:{port}");
                var health = new Health.HealthClient(healthChannel);
                while ((await health.CheckAsync(new HealthCheckRequest())).Status != HealthCheckResponse.Types.ServingStatus.Serving) await Task.Delay(50);
            }
            var client = MeshClients.Gateway($"127.0.0.1:{gatewayOptions.Port}", out var channel);
            using (channel)
            using (root = testSource.StartActivity("test request"))
            {
                var answer = await MeshClients.AskAsync(client, MeshClients.Request(File.ReadAllBytes(Images[0])));
                Assert.Null(answer.Error);
            }
        }
        finally
        {
            foreach (var app in apps)
            {
                await app.StopAsync();
                await app.DisposeAsync();
            }
            // Stopped, the stages have ended every span of the request (a stream's server span may end after the
            // gateway has answered); disposing flushes them and stops the exporter.
            tracing.Dispose();
        }

        Assert.NotNull(root);
        var servers = spans.Where(s => s.Kind == ActivityKind.Server && s.TraceId == root.TraceId).ToList();
        var request = Assert.Single(servers, s => s.DisplayName.Contains("/blip2.v1.Blip2/Generate"));
        var trace = spans.Where(s => s.TraceId == request.TraceId).ToDictionary(s => s.SpanId);
        foreach (var stage in new[] { "/blip2mesh.vision.v1.Vision/Embed", "/blip2mesh.qformer.v1.QFormer/Project", "/blip2mesh.decoder.v1.Decoder/Generate" })
        {
            // Each stage's server span descends from the gateway's server span of this request.
            var span = Assert.Single(trace.Values, s => s.Kind == ActivityKind.Server && s.DisplayName.Contains(stage));
            var ancestors = new List<ActivitySpanId>();
            for (var parent = span.ParentSpanId; trace.TryGetValue(parent, out var p); parent = p.ParentSpanId) ancestors.Add(parent);
            Assert.Contains(request.SpanId, ancestors);
        }
    }

    [Fact]
    public async Task UnderUpJsonLogsParseLineByLineWithTraceIdsAndEveryServiceAnswersHttpHealth()
    {
        var mesh = new MeshProcess(Fixtures.Demo, environment: new Dictionary<string, string> { ["BLIP2MESH_LOG_FORMAT"] = "json" });
        try
        {
            var client = MeshClients.Gateway(mesh.GatewayAddress, out var channel);
            using var _ = channel;
            Assert.Null((await MeshClients.AskAsync(client, MeshClients.Request(File.ReadAllBytes(Images[0])))).Error);
            var refused = await MeshClients.AskAsync(client, MeshClients.Request(File.ReadAllBytes(Images[0]), "", new Contracts.V1.GenerationOptions { NumBeams = 99 }),
                headers: new Grpc.Core.Metadata { { "x-request-id", "req-42" } });
            Assert.Equal(Grpc.Core.StatusCode.InvalidArgument, refused.Error?.StatusCode);

            using var http = new HttpClient();
            foreach (var (service, metrics) in mesh.Metrics)
                foreach (var path in new[] { "/healthz", "/readyz", "/v2/health/live", "/v2/health/ready" })
                {
                    var response = await http.GetAsync(metrics.Replace("/metrics", path));
                    Assert.True(response.IsSuccessStatusCode, $"{service} {path}: {(int)response.StatusCode}");
                }
        }
        finally
        {
            mesh.Dispose();
        }

        // Every line a service wrote is one JSON object with its fields at the top level (`up` adds no prefix to them).
        var logs = mesh.Log.Split('\n', StringSplitOptions.RemoveEmptyEntries).Where(l => l.StartsWith('{')).Select(l => System.Text.Json.JsonDocument.Parse(l).RootElement).ToList();
        Assert.NotEmpty(logs);
        Assert.DoesNotContain(mesh.Log.Split('\n'), l => l.StartsWith("[gateway] {", StringComparison.Ordinal));
        foreach (var log in logs)
        {
            Assert.True(DateTimeOffset.TryParse(log.GetProperty("timestamp").GetString(), out _));
            Assert.False(string.IsNullOrEmpty(log.GetProperty("level").GetString()));
            Assert.False(string.IsNullOrEmpty(log.GetProperty("service").GetString()));
        }
        var rejection = Assert.Single(logs, l => l.GetProperty("message").GetString()!.Contains("req-42"));
        Assert.Equal("Warning", rejection.GetProperty("level").GetString());
        Assert.Contains("InvalidArgument", rejection.GetProperty("message").GetString());
        Assert.Matches("^[0-9a-f]{32}$", rejection.GetProperty("trace_id").GetString());
        // A clean run leaves no error in any stage's log (stage calls are completed, never reset).
        Assert.DoesNotContain(logs, l => l.GetProperty("level").GetString() is "Error" or "Critical");
    }
}
