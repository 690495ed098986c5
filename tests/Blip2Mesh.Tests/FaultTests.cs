using System.Collections.Concurrent;
using System.Diagnostics;
using Blip2Mesh.Model.Generation;
using Blip2Mesh.ServiceDefaults;
using Grpc.Core;
using Xunit.Abstractions;

namespace Blip2Mesh.Tests;

/// <summary>Pods die and come back: the gateway rides through with correct answers or a clear UNAVAILABLE.</summary>
public sealed class FaultTests(ITestOutputHelper output) : IDisposable
{
    private readonly ServiceProcess _vision = new("vision", Fixtures.Demo);
    private readonly ServiceProcess _qformer = new("qformer", Fixtures.Demo);
    private readonly ServiceProcess _decoderA = new("decoder", Fixtures.Demo);
    private readonly ServiceProcess _decoderB = new("decoder", Fixtures.Demo);
    private ServiceProcess? _gateway;

    private ServiceProcess Gateway => _gateway ??= new ServiceProcess("gateway", Fixtures.Demo,
        "--vision", _vision.Address, "--qformer", _qformer.Address, "--decoder", $"{_decoderA.Address},{_decoderB.Address}");

    public void Dispose()
    {
        foreach (var p in new IDisposable?[] { _gateway, _decoderA, _decoderB, _qformer, _vision }) p?.Dispose();
    }

    private static readonly string[] Prompts =
    [
        "", "Question: what color is the background? Answer:", "Question: how many shapes are there? Answer:",
        "Question: what shape is it? Answer:",
    ];

    private static string[] Samples() => Directory.GetFiles(Path.Combine(Fixtures.Demo, "samples")).Where(f => !f.EndsWith(".json")).Order().ToArray();

    /// <summary>What the model answers in-process, for every sample image and prompt.</summary>
    private static Dictionary<(string, string), int[]> ExpectedAnswers()
    {
        var pipeline = Fixtures.PipelineAt(Fixtures.Demo);
        var expected = new Dictionary<(string, string), int[]>();
        foreach (var image in Samples())
        {
            var queries = pipeline.EmbedImage(File.ReadAllBytes(image));
            foreach (var prompt in Prompts)
                expected[(image, prompt)] = pipeline.Generate(queries, prompt, new GenerationOptions()).Last().Final!.Best.Ids.Skip(1).ToArray();
        }
        return expected;
    }

    [Fact]
    public async Task KillingADecoderMidRunLosesNoAnswerSilentlyAndItsRestartTakesTraffic()
    {
        var expected = ExpectedAnswers();
        var client = MeshClients.Gateway(Gateway.Address, out var channel);
        using var _ = channel;
        var work = Enumerable.Range(0, 100).Select(i => (Image: Samples()[i % Samples().Length], Prompt: Prompts[i / Samples().Length % Prompts.Length])).ToList();
        var results = new ConcurrentBag<(Answer Answer, int[] Expected)>();
        var completed = 0;
        var killed = false;
        await Parallel.ForEachAsync(work, new ParallelOptions { MaxDegreeOfParallelism = 8 }, async (item, _) =>
        {
            var answer = await MeshClients.AskAsync(client, MeshClients.Request(File.ReadAllBytes(item.Image), item.Prompt));
            results.Add((answer, expected[(item.Image, item.Prompt)]));
            if (Interlocked.Increment(ref completed) == 20 && !killed)
            {
                killed = true;
                _decoderB.Kill();
            }
        });

        var failed = results.Where(r => r.Answer.Error is not null).ToList();
        output.WriteLine($"{results.Count} requests, {failed.Count} failed with UNAVAILABLE after the decoder was killed");
        Assert.Equal(100, results.Count);
        foreach (var (answer, want) in results.Where(r => r.Answer.Error is null))
        {
            Assert.Equal(want, answer.TokenIds);
            Assert.Equal("eos", answer.FinishReason);
        }
        // Only streams already running on the killed replica may fail, and they say so: never a truncated success.
        Assert.All(failed, r => Assert.Equal(StatusCode.Unavailable, r.Answer.Error!.StatusCode));
        Assert.All(failed, r => Assert.Contains("decoder", r.Answer.Error!.Status.Detail));
        Assert.True(failed.Count <= 8, $"{failed.Count} failures: more than the streams in flight at the kill");

        // Back up on the same address: the gateway sends it work again.
        _decoderB.Start();
        var before = _decoderB.Metric("blip2mesh_stage_requests_total");
        var deadline = DateTime.UtcNow.AddSeconds(60);
        while (_decoderB.Metric("blip2mesh_stage_requests_total") == before && DateTime.UtcNow < deadline)
        {
            var answer = await MeshClients.AskAsync(client, MeshClients.Request(File.ReadAllBytes(Samples()[0]), Prompts[1]));
            Assert.Null(answer.Error);
        }
        Assert.True(_decoderB.Metric("blip2mesh_stage_requests_total") > before, "the restarted decoder got no traffic");
    }

    /// <summary>
    /// A decoder that stops answering without closing its connections (SIGSTOP: a frozen node, a long pause) is found
    /// by the HTTP/2 keep-alive pings: its streams fail UNAVAILABLE within the ping delay and timeout. Its kernel still
    /// accepts connections, so only its failed health checks take it out of the round-robin: new requests go to the
    /// other replica at once (without them, some failed after four attempts had all picked the frozen one).
    /// </summary>
    [Fact]
    public async Task AHungDecoderFailsOnlyItsStreamsWithinTheKeepAliveBoundAndTheRestAreServedByTheOther()
    {
        var expected = ExpectedAnswers();
        var options = new ServiceOptions { Model = Fixtures.Demo, Port = MeshProcess.FreePort() };
        var resilience = new Gateway.ResilienceOptions { KeepAlivePingDelay = TimeSpan.FromSeconds(1), KeepAlivePingTimeout = TimeSpan.FromSeconds(1) };
        await using var gateway = Cli.StageHosts.Gateway(options, new Gateway.GatewayOptions
        {
            // A by name, as a Kubernetes headless Service gives them: looked up, then checked address by address.
            Vision = [_vision.Address], QFormer = [_qformer.Address], Decoder = [$"localhost:{_decoderA.Port}", _decoderB.Address], Resilience = resilience,
        });
        await gateway.StartAsync();
        var client = MeshClients.Gateway($"127.0.0.1:{options.Port}", out var channel);
        using var _ = channel;
        var image = File.ReadAllBytes(Samples()[0]);
        // Both replicas connected, so round-robin spreads the calls below over both.
        var deadline = DateTime.UtcNow.AddSeconds(30);
        while (_decoderB.Metric("blip2mesh_stage_requests_total") == 0 || _decoderA.Metric("blip2mesh_stage_requests_total") == 0)
        {
            Assert.True(DateTime.UtcNow < deadline, "a decoder got no traffic");
            Assert.Null((await MeshClients.AskAsync(client, MeshClients.Request(image))).Error);
        }

        // Long answers, each read up to its first tokens, so that those on B are mid-stream when it freezes.
        var longAnswer = new Contracts.V1.GenerationOptions { MaxNewTokens = 512, MinNewTokens = 512 };
        var calls = Enumerable.Range(0, 8).Select(_ => client.Generate(MeshClients.Request(image, "", longAnswer), deadline: DateTime.UtcNow.AddSeconds(60))).ToList();
        foreach (var call in calls) Assert.True(await call.ResponseStream.MoveNext());
        var clock = Stopwatch.StartNew();
        _decoderB.Pause();
        try
        {
            async Task<RpcException?> Rest(AsyncServerStreamingCall<Contracts.V1.GenerateResponse> call)
            {
                using (call)
                {
                    try
                    {
                        while (await call.ResponseStream.MoveNext()) { }
                        return null;
                    }
                    catch (RpcException e)
                    {
                        return e;
                    }
                }
            }
            var errors = await Task.WhenAll(calls.Select(Rest));
            var failed = errors.OfType<RpcException>().ToList();
            output.WriteLine($"{failed.Count} of 8 streams failed, {clock.Elapsed.TotalSeconds:F1} s after the pause: {failed.FirstOrDefault()?.Status.Detail}");
            Assert.NotEmpty(failed);
            Assert.All(failed, e => Assert.Equal(StatusCode.Unavailable, e.StatusCode));
            Assert.All(failed, e => Assert.Contains("decoder", e.Status.Detail));
            // Found by the pings (1 s + 1 s), not by the 60 s deadline.
            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(15), $"the frozen decoder's streams took {clock.Elapsed} to fail");

            // B still accepts connections (its kernel does) but never answers its health checks: new requests go to A.
            foreach (var prompt in Prompts)
            {
                var started = Stopwatch.StartNew();
                var answer = await MeshClients.AskAsync(client, MeshClients.Request(image, prompt), TimeSpan.FromSeconds(30));
                output.WriteLine($"'{prompt}' with a decoder frozen: {(answer.Error?.Status.Detail ?? "answered")} in {started.Elapsed.TotalSeconds:F1} s");
                Assert.Null(answer.Error);
                Assert.Equal(expected[(Samples()[0], prompt)], answer.TokenIds);
                Assert.True(started.Elapsed < TimeSpan.FromSeconds(5), $"a request took {started.Elapsed} with a decoder frozen");
            }
        }
        finally
        {
            _decoderB.Resume();
            await gateway.StopAsync();
        }
    }

    [Fact]
    public async Task VisionDownIsUnavailableNamingTheStageWithinTheDeadlineAndServedAgainWhenBack()
    {
        var client = MeshClients.Gateway(Gateway.Address, out var channel);
        using var _ = channel;
        _vision.Kill();
        var clock = Stopwatch.StartNew();
        var down = await MeshClients.AskAsync(client, MeshClients.Request(File.ReadAllBytes(Samples()[1])), TimeSpan.FromSeconds(20));
        Assert.NotNull(down.Error);
        Assert.Equal(StatusCode.Unavailable, down.Error!.StatusCode);
        Assert.Contains("vision", down.Error.Status.Detail);
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(20), $"took {clock.Elapsed}");

        _vision.Start();
        Answer? up = null;
        var deadline = DateTime.UtcNow.AddSeconds(30);
        while (DateTime.UtcNow < deadline && (up = await MeshClients.AskAsync(client, MeshClients.Request(File.ReadAllBytes(Samples()[1])))).Error is not null)
            await Task.Delay(200);
        Assert.Null(up!.Error);
        Assert.Equal("eos", up.FinishReason);
    }

    [Theory]
    [InlineData("vision")]
    [InlineData("qformer")]
    public async Task KillingAnEncoderStageUnderLoadFailsRequestsOnlyAsUnavailableNamingItAndItsRestartTakesTrafficWithin15Seconds(string stage)
    {
        var victim = stage == "vision" ? _vision : _qformer;
        var client = MeshClients.Gateway(Gateway.Address, out var channel);
        using var _ = channel;
        var png = File.ReadAllBytes(Path.Combine(Fixtures.Demo, "samples", "sample000.png"));
        // Bytes after the PNG's end give every request a new image id (a cache miss) with the same pixels.
        byte[] NewImage(int i) => [.. png, .. BitConverter.GetBytes(i)];
        var results = new ConcurrentBag<Answer>();
        var completed = 0;
        await Parallel.ForEachAsync(Enumerable.Range(0, 60), new ParallelOptions { MaxDegreeOfParallelism = 8 }, async (i, _) =>
        {
            results.Add(await MeshClients.AskAsync(client, MeshClients.Request(NewImage(i)), TimeSpan.FromSeconds(30)));
            if (Interlocked.Increment(ref completed) == 15) victim.Kill();
        });
        var failed = results.Where(r => r.Error is not null).ToList();
        output.WriteLine($"{results.Count} requests, {failed.Count} failed after {stage} was killed: {failed.FirstOrDefault()?.Error?.Status.Detail}");
        Assert.NotEmpty(failed);
        Assert.All(failed, r => Assert.Equal(StatusCode.Unavailable, r.Error!.StatusCode));
        Assert.All(failed, r => Assert.StartsWith($"{stage} stage", r.Error!.Status.Detail));
        Assert.All(results.Where(r => r.Error is null), r => Assert.Equal("eos", r.FinishReason));

        victim.Start();
        var clock = Stopwatch.StartNew();
        Answer? up = null;
        for (var i = 100; clock.Elapsed < TimeSpan.FromSeconds(30); i++)
        {
            if ((up = await MeshClients.AskAsync(client, MeshClients.Request(NewImage(i)), TimeSpan.FromSeconds(10))).Error is null) break;
            await Task.Delay(100);
        }
        output.WriteLine($"{stage} served again {clock.Elapsed.TotalSeconds:F1} s after its restart began");
        Assert.Null(up!.Error);
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(15), $"the restarted {stage} stage took {clock.Elapsed} to get traffic");
    }
}
