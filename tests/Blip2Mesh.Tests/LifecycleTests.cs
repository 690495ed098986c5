using System.Collections.Concurrent;
using System.Diagnostics;
using Blip2Mesh.Contracts.V1;
using Grpc.Core;
using Xunit.Abstractions;

namespace Blip2Mesh.Tests;

/// <summary>Cancellation, graceful shutdown and sustained load, with real processes.</summary>
public sealed class LifecycleTests(ITestOutputHelper output) : IDisposable
{
    private readonly List<IDisposable> _processes = [];

    public void Dispose()
    {
        foreach (var p in Enumerable.Reverse(_processes)) p.Dispose();
    }

    private (ServiceProcess Decoder, ServiceProcess Gateway) TinyMesh()
    {
        ServiceProcess Serve(string service, params string[] extra)
        {
            var p = new ServiceProcess(service, Fixtures.TinyA, extra);
            _processes.Add(p);
            return p;
        }
        var vision = Serve("vision");
        var qformer = Serve("qformer");
        string[] limit = ["--max-new-tokens-limit", LongTokens.ToString()];
        var decoder = Serve("decoder", limit);
        return (decoder, Serve("gateway", ["--vision", vision.Address, "--qformer", qformer.Address, "--decoder", decoder.Address, .. limit]));
    }

    private static byte[] TinyImage => File.ReadAllBytes(Path.Combine(Fixtures.TinyA, Fixtures.Image("blip2-tiny-a", 0).GetProperty("file").GetString()!));

    /// <summary>
    /// A request that decodes for a long time (no early end): seconds even on a quiet machine, so a cancel that takes
    /// effect in well under a second is told apart from one that never does.
    /// </summary>
    private const int LongTokens = 4096;
    private static GenerateRequest LongRequest => MeshClients.Request(TinyImage, "a photo of", new Contracts.V1.GenerationOptions { MaxNewTokens = LongTokens, MinNewTokens = LongTokens });

    [Fact]
    public async Task TokensStreamWhileTheAnswerIsDecoded()
    {
        var (_, gateway) = TinyMesh();
        var client = MeshClients.Gateway(gateway.Address, out var channel);
        using var _ = channel;
        var answer = await MeshClients.AskAsync(client, LongRequest);
        Assert.Null(answer.Error);
        Assert.Equal(("length", LongTokens), (answer.FinishReason, answer.TokenIds.Length));
        // Each message carries what was decoded since the last was sent: many messages, never the whole answer at once.
        Assert.True(answer.Messages > 10, $"{answer.Messages} messages for {LongTokens} tokens");
    }

    [Fact]
    public async Task ACancelledRequestStopsDecodingPromptly()
    {
        var (decoder, gateway) = TinyMesh();
        var client = MeshClients.Gateway(gateway.Address, out var channel);
        using var _ = channel;
        using var cancel = new CancellationTokenSource();
        using (var call = client.Generate(LongRequest, cancellationToken: cancel.Token))
        {
            Assert.True(await call.ResponseStream.MoveNext());
            await cancel.CancelAsync();
        }
        var clock = Stopwatch.StartNew();
        while (decoder.Metric("blip2mesh_decoder_active_sequences") > 0 && clock.Elapsed < TimeSpan.FromSeconds(5)) await Task.Delay(50);
        output.WriteLine($"decoder idle {clock.ElapsedMilliseconds} ms after the cancel");
        Assert.Equal(0, decoder.Metric("blip2mesh_decoder_active_sequences"));
        var generated = decoder.Metric("blip2mesh_decoder_generated_tokens_total");
        await Task.Delay(500);
        Assert.Equal(generated, decoder.Metric("blip2mesh_decoder_generated_tokens_total"));
        Assert.True(generated < LongTokens, $"{generated} tokens: the cancelled request decoded to the end");
    }

    [Fact]
    public async Task ADecoderAskedToStopFinishesTheStreamsItHasAndThenExits()
    {
        var (decoder, gateway) = TinyMesh();
        var client = MeshClients.Gateway(gateway.Address, out var channel);
        using var _ = channel;
        var ids = new List<int>();
        var finish = "";
        using (var call = client.Generate(LongRequest))
        {
            Assert.True(await call.ResponseStream.MoveNext());
            ids.AddRange(call.ResponseStream.Current.TokenIds);
            decoder.Terminate();
            while (await call.ResponseStream.MoveNext())
            {
                ids.AddRange(call.ResponseStream.Current.TokenIds);
                if (call.ResponseStream.Current.FinishReason.Length > 0) finish = call.ResponseStream.Current.FinishReason;
            }
        }
        Assert.Equal("length", finish);
        Assert.Equal(LongTokens, ids.Count);
        Assert.True(decoder.WaitForExit(TimeSpan.FromSeconds(30)), "the decoder did not exit after its last stream");
    }

    [Fact]
    public async Task ALoadRunLosesNothing()
    {
        using var mesh = new MeshProcess(Fixtures.Demo);
        var pipeline = Fixtures.PipelineAt(Fixtures.Demo);
        string[] prompts = ["", "Question: what color is the background? Answer:", "Question: how many shapes are there? Answer:"];
        var images = Directory.GetFiles(Path.Combine(Fixtures.Demo, "samples")).Where(f => !f.EndsWith(".json")).Order().ToArray();
        var expected = new Dictionary<(string, string), int[]>();
        foreach (var image in images)
        {
            var queries = pipeline.EmbedImage(File.ReadAllBytes(image));
            foreach (var prompt in prompts)
                expected[(image, prompt)] = pipeline.Generate(queries, prompt, new Model.Generation.GenerationOptions()).Last().Final!.Best.Ids.Skip(1).ToArray();
        }

        var client = MeshClients.Gateway(mesh.GatewayAddress, out var channel);
        using var _ = channel;
        var bytes = images.ToDictionary(i => i, File.ReadAllBytes);
        var wrong = new ConcurrentBag<string>();
        var clock = Stopwatch.StartNew();
        await Parallel.ForEachAsync(Enumerable.Range(0, 1000), new ParallelOptions { MaxDegreeOfParallelism = 16 }, async (i, _) =>
        {
            var (image, prompt) = (images[i % images.Length], prompts[i / images.Length % prompts.Length]);
            var answer = await MeshClients.AskAsync(client, MeshClients.Request(bytes[image], prompt));
            if (answer.Error is not null) wrong.Add($"{i}: {answer.Error.Status}");
            else if (!answer.TokenIds.SequenceEqual(expected[(image, prompt)]) || answer.FinishReason != "eos") wrong.Add($"{i}: [{string.Join(",", answer.TokenIds)}]");
        });
        output.WriteLine($"1000 requests at concurrency 16 in {clock.Elapsed.TotalSeconds:F1} s");
        Assert.Empty(wrong);
    }
}
