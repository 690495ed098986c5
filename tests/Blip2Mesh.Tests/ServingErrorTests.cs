using System.Diagnostics;
using System.Net;
using System.Text;
using System.Text.RegularExpressions;
using Blip2Mesh.Cli;
using Blip2Mesh.Contracts.V1;
using Blip2Mesh.Gateway;
using Blip2Mesh.Model.Generation;
using Blip2Mesh.ServiceDefaults;
using Google.Protobuf;
using Google.Rpc;
using Grpc.Core;
using Microsoft.AspNetCore.Builder;
using Xunit.Abstractions;
using GenerationOptions = Blip2Mesh.Contracts.V1.GenerationOptions;

namespace Blip2Mesh.Tests;

/// <summary>
/// The error model at the level where it lives: every stage host in this process (vision, Q-Former, two decoders with
/// a 1 MiB KV budget, the gateway), called over loopback as a client would. One caller's bad or huge request gets a
/// clear status at once and never hurts the others.
/// </summary>
public sealed class ServingErrorTests(ServingErrorTests.InProcessMesh mesh, ITestOutputHelper output) : IClassFixture<ServingErrorTests.InProcessMesh>
{
    public sealed class InProcessMesh : IAsyncLifetime
    {
        private readonly List<WebApplication> _apps = [];
        public string Gateway { get; private set; } = "";
        public string GatewayHttp { get; private set; } = "";
        /// <summary>A gateway whose vision address has nothing listening.</summary>
        public string GatewayWithoutVision { get; private set; } = "";
        public string GatewayWithoutVisionHttp { get; private set; } = "";

        private static ServiceOptions Options(bool http = false) =>
            new() { Model = Fixtures.Demo, Port = MeshProcess.FreePort(), HttpPort = http ? MeshProcess.FreePort() : null, Threads = 1 };

        public async Task InitializeAsync()
        {
            var (vision, qformer, decoderA, decoderB, gateway, lonely) = (Options(), Options(), Options(), Options(), Options(http: true), Options(http: true));
            var tinyBudget = new ContinuousBatchingOptions { KvBudgetBytes = 1 << 20 };
            var stages = new GatewayOptions
            {
                Vision = [$"127.0.0.1:{vision.Port}"], QFormer = [$"127.0.0.1:{qformer.Port}"],
                Decoder = [$"127.0.0.1:{decoderA.Port}", $"127.0.0.1:{decoderB.Port}"],
            };
            _apps.AddRange([
                StageHosts.Vision(vision), StageHosts.QFormer(qformer),
                StageHosts.Decoder(decoderA, tinyBudget), StageHosts.Decoder(decoderB, tinyBudget),
                StageHosts.Gateway(gateway, stages),
                StageHosts.Gateway(lonely, stages with { Vision = [$"127.0.0.1:{MeshProcess.FreePort()}"] }),
            ]);
            foreach (var app in _apps) await app.StartAsync();
            Gateway = $"127.0.0.1:{gateway.Port}";
            GatewayHttp = $"http://127.0.0.1:{gateway.HttpPort}";
            GatewayWithoutVision = $"127.0.0.1:{lonely.Port}";
            GatewayWithoutVisionHttp = $"http://127.0.0.1:{lonely.HttpPort}";
            // Ready when an ordinary request is answered (the stage models load in the background).
            var client = MeshClients.Gateway(Gateway, out var channel);
            using var _ = channel;
            var deadline = DateTime.UtcNow.AddSeconds(60);
            while ((await MeshClients.AskAsync(client, MeshClients.Request(Sample))).Error is not null && DateTime.UtcNow < deadline) await Task.Delay(100);
        }

        public async Task DisposeAsync()
        {
            foreach (var app in _apps) await app.DisposeAsync();
        }
    }

    private static readonly byte[] Sample = File.ReadAllBytes(Path.Combine(Fixtures.Demo, "samples", "sample000.png"));

    /// <summary>What no caller-facing message may contain: .NET wording, exception names, addresses.</summary>
    private static void AssertMeantForCallers(string message)
    {
        Assert.DoesNotMatch(new Regex(@"\d+\.\d+\.\d+\.\d+:\d+|localhost:\d+|Exception|\(Parameter '|Int64|System\.|   at "), message);
    }

    private async Task<Answer> Ask(GenerateRequest request, string? gateway = null, TimeSpan? timeout = null)
    {
        var client = MeshClients.Gateway(gateway ?? mesh.Gateway, out var channel);
        using var _ = channel;
        return await MeshClients.AskAsync(client, request, timeout);
    }

    [Fact]
    public async Task RequestsThatCanNeverFitAreInvalidArgumentAtOnceAndEveryOrdinaryRequestIsStillAnswered()
    {
        var heavy = new GenerationOptions { NumBeams = 8, MaxNewTokens = 500, MinNewTokens = 500 };
        var clock = Stopwatch.StartNew();
        var refused = await Task.WhenAll(Enumerable.Range(0, 6).Select(_ => Ask(MeshClients.Request(Sample, "", heavy))));
        output.WriteLine($"6 never-fitting requests refused in {clock.ElapsedMilliseconds} ms: {refused[0].Error?.Status.Detail}");
        foreach (var answer in refused)
        {
            Assert.Equal(StatusCode.InvalidArgument, answer.Error?.StatusCode);
            Assert.Contains("KV cache", answer.Error!.Status.Detail);
            Assert.Contains("at most", answer.Error.Status.Detail);
            AssertMeantForCallers(answer.Error.Status.Detail);
        }
        // Straight afterwards, on both decoder replicas: nothing was retried or counted against a stage.
        var ordinary = await Task.WhenAll(Enumerable.Range(0, 40).Select(_ => Ask(MeshClients.Request(Sample))));
        Assert.All(ordinary, a => Assert.Null(a.Error));
        Assert.All(ordinary, a => Assert.Equal(ordinary[0].TokenIds, a.TokenIds));
    }

    public static TheoryData<string, string> CallerErrors() => new()
    {
        { "temperature", "temperature" },
        { "num_beams", "num_beams" },
        { "max_new_tokens", "max_new_tokens" },
        { "prompt", "prompt" },
        { "image_id", "image_id" },
    };

    [Theory]
    [MemberData(nameof(CallerErrors))]
    public async Task CallerErrorsNameTheirFieldInBadRequestDetailsWithNoDotNetWording(string fault, string field)
    {
        var request = fault switch
        {
            "temperature" => MeshClients.Request(Sample, "", new GenerationOptions { DoSample = true, Temperature = -1 }),
            "num_beams" => MeshClients.Request(Sample, "", new GenerationOptions { NumBeams = 64 }),
            "max_new_tokens" => MeshClients.Request(Sample, "", new GenerationOptions { MaxNewTokens = 100000 }),
            "prompt" => MeshClients.Request(Sample, string.Concat(Enumerable.Repeat("word ", 400))),
            "image_id" => new GenerateRequest { ImageId = "not-an-id" },
            _ => throw new ArgumentOutOfRangeException(nameof(fault)),
        };
        var answer = await Ask(request);
        Assert.Equal(StatusCode.InvalidArgument, answer.Error?.StatusCode);
        AssertMeantForCallers(answer.Error!.Status.Detail);
        var violation = Assert.Single(answer.Error.GetRpcStatus()!.GetDetail<BadRequest>()!.FieldViolations);
        Assert.Equal(field, violation.Field);
        output.WriteLine($"{fault}: {answer.Error.Status.Detail}");
    }

    [Fact]
    public async Task AHugePromptIsRefusedBeforeItIsTokenized()
    {
        var prompt = new string(' ', 30 << 20);
        var clock = Stopwatch.StartNew();
        var answer = await Ask(MeshClients.Request(Sample, prompt));
        output.WriteLine($"a 30 MB prompt refused in {clock.ElapsedMilliseconds} ms (sending it included)");
        Assert.Equal(StatusCode.InvalidArgument, answer.Error?.StatusCode);
        Assert.Contains("bytes exceed the limit of 16384", answer.Error!.Status.Detail);
    }

    [Fact]
    public async Task AStageThatIsDownIsUnavailableNamingItAndNothingOfItsAddress()
    {
        var answer = await Ask(MeshClients.Request([.. Sample, 1, 2, 3]), mesh.GatewayWithoutVision, TimeSpan.FromSeconds(30));
        Assert.Equal(StatusCode.Unavailable, answer.Error?.StatusCode);
        Assert.StartsWith("vision stage", answer.Error!.Status.Detail);
        AssertMeantForCallers(answer.Error.Status.Detail);
    }

    [Fact]
    public async Task AMessageThatIsNotProtobufIsInvalidArgument()
    {
        using var channel = Grpc.Net.Client.GrpcChannel.ForAddress($"http://{mesh.Gateway}");
        var raw = Marshallers.Create<byte[]>(b => b, b => b);
        var method = new Method<byte[], byte[]>(MethodType.Unary, "blip2.v1.Blip2", "PutImage", raw, raw);
        var e = await Assert.ThrowsAsync<RpcException>(async () =>
            await channel.CreateCallInvoker().AsyncUnaryCall(method, null, new CallOptions(), [0xFF, 0xFF, 0xFF, 0xFF, 0x0F, 0x01]));
        output.WriteLine($"{e.StatusCode}: {e.Status.Detail}");
        Assert.Equal(StatusCode.InvalidArgument, e.StatusCode);
        AssertMeantForCallers(e.Status.Detail);
    }

    [Fact]
    public async Task AGatewayIsReadyOverHttpOnlyWhileEveryStageIsServing()
    {
        using var http = new HttpClient();
        Assert.Equal(HttpStatusCode.OK, (await http.GetAsync($"{mesh.GatewayHttp}/readyz")).StatusCode);
        Assert.Equal(HttpStatusCode.OK, (await http.GetAsync($"{mesh.GatewayWithoutVisionHttp}/healthz")).StatusCode);
        var notReady = await http.GetAsync($"{mesh.GatewayWithoutVisionHttp}/readyz");
        Assert.Equal(HttpStatusCode.ServiceUnavailable, notReady.StatusCode);
        var body = await notReady.Content.ReadAsStringAsync();
        Assert.Contains("the vision stage is not serving", body);
        AssertMeantForCallers(body);
        Assert.Equal(HttpStatusCode.ServiceUnavailable, (await http.GetAsync($"{mesh.GatewayWithoutVisionHttp}/v2/health/ready")).StatusCode);
    }

    [Fact]
    public async Task SlowHugeImagesWithShortDeadlinesDoNotHoldUpARequestForACachedImage()
    {
        var client = MeshClients.Gateway(mesh.Gateway, out var channel);
        using var _ = channel;
        var cached = await client.PutImageAsync(new PutImageRequest { Image = ByteString.CopyFrom(Sample) });
        var huge = Enumerable.Range(0, 6).Select(i => TestImages.BlackPng(7000 + i, 7000)).ToList();
        var hogs = huge.Select(image => Ask(MeshClients.Request(image), timeout: TimeSpan.FromMilliseconds(500))).ToList();
        await Task.Delay(200);
        var clock = Stopwatch.StartNew();
        var answer = await Ask(new GenerateRequest { ImageId = cached.ImageId });
        var took = clock.Elapsed;
        await Task.WhenAll(hogs);
        output.WriteLine($"cached request answered in {took.TotalMilliseconds:F0} ms while 6 images of 49 Mpx decoded");
        Assert.Null(answer.Error);
        // Six 49 Mpx decodes take many seconds of CPU between them; the cached answer must not wait for any of it.
        Assert.True(took < TimeSpan.FromSeconds(5), $"the cached request took {took}");
        Assert.All(hogs, h => Assert.Equal(StatusCode.DeadlineExceeded, h.Result.Error?.StatusCode));
    }

    [Fact]
    public async Task AnImageTooTallForItsWidthIsRefusedFromItsHeader()
    {
        var answer = await Ask(MeshClients.Request(TestImages.BombPng(50, 1_000_000)));
        Assert.Equal(StatusCode.InvalidArgument, answer.Error?.StatusCode);
        Assert.Contains("too tall for its width", answer.Error!.Status.Detail);
    }

    [Fact]
    public async Task OverHttpAFieldErrorIsBadRequestWithItsSentenceAndDetails()
    {
        using var http = new HttpClient();
        var body = $$"""{"image": "{{Convert.ToBase64String("this is not an image"u8)}}"}""";
        var response = await http.PostAsync($"{mesh.GatewayHttp}/v1/generate", new StringContent(body, Encoding.UTF8, "application/json"));
        var text = await response.Content.ReadAsStringAsync();
        output.WriteLine(text);
        Assert.Equal(HttpStatusCode.BadRequest, response.StatusCode);
        Assert.Contains("image: bytes are not a supported image", text);
        Assert.Contains("google.rpc.BadRequest", text);
        AssertMeantForCallers(text);
    }

    [Theory]
    [InlineData("""{"prompt": "", "stop": ["x"]}""", "unknown field 'stop'")]
    [InlineData("""{"prompt": "", "options": {"numBeam": 2}}""", "unknown field 'numBeam'")]
    [InlineData("""{"prompt": "", "options": {"seed": 1e30}}""", "not a valid GenerateRequest")]
    public async Task UnknownOrUnreadableJsonFieldsAreBadRequestNamingThem(string body, string message)
    {
        using var http = new HttpClient();
        var response = await http.PostAsync($"{mesh.GatewayHttp}/v1/generate", new StringContent(body, Encoding.UTF8, "application/json"));
        var text = await response.Content.ReadAsStringAsync();
        output.WriteLine(text);
        Assert.Equal(HttpStatusCode.BadRequest, response.StatusCode);
        Assert.Contains(message, text);
        AssertMeantForCallers(text);
    }
}
