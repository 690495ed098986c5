using Blip2Mesh.Model.Errors;
using Blip2Mesh.Model.Generation;
using Blip2Mesh.Model.Runtime;
using Blip2Mesh.ServiceDefaults;

namespace Blip2Mesh.Tests;

/// <summary>Continuous batching in the decoder and dynamic batching in the encoder stages give unbatched results.</summary>
public sealed class BatchingTests
{
    private const string Checkpoint = "blip2-tiny-a";
    private static Model.Pipeline.Blip2Pipeline Pipeline => Fixtures.Pipeline(Checkpoint);

    private static FloatTensor Queries(int image) => Fixtures.ReadTensor(Fixtures.Tensors(Checkpoint), $"img{image}/language_projection");

    private static DecodingState Start(int image, string prompt, GenerationOptions options) =>
        Pipeline.Generator.Start(Queries(image), Pipeline.Tokenizer.Encode(prompt), options);

    private static IReadOnlyList<int> Alone(int image, string prompt, GenerationOptions options)
    {
        var state = Start(image, prompt, options);
        _ = Pipeline.Generator.Run(state).ToList();
        return state.Results[0].Ids;
    }

    private static async Task<List<int>> Collect(IAsyncEnumerable<DecodedTokens> tokens)
    {
        var all = new List<int>();
        var last = false;
        await foreach (var decoded in tokens)
        {
            Assert.False(last, "tokens after the read marked last");
            all.AddRange(decoded.Ids);
            last = decoded.IsLast;
        }
        return all;
    }

    [Fact]
    public async Task RequestsJoiningAMovingBatchDecodeExactlyAsAlone()
    {
        (int Image, string Prompt, GenerationOptions Options)[] requests =
        [
            (0, "a photo of", new GenerationOptions { MaxNewTokens = 40, MinNewTokens = 40 }),
            (3, "", new GenerationOptions { NumBeams = 4 }),
            (5, "Question: what is in the picture? Answer:", new GenerationOptions { DoSample = true, Seed = 11 }),
            (6, "a photo of", new GenerationOptions { NumBeams = 2, MaxNewTokens = 9 }),
        ];
        var stepRows = new List<int>();
        var others = new List<(DecodingState State, Task<List<int>> Tokens)>();
        int[] joinBeforeStep = [3, 7, 12];
        ContinuousBatcher batcher = null!;
        // The others join one by one while the first is mid-way, so rows of different lengths share steps. They are
        // submitted from the batch loop itself (told of every step), so when they join never depends on thread timing.
        batcher = new ContinuousBatcher(Pipeline.Generator, onStep: rows =>
        {
            stepRows.Add(rows);
            if (others.Count < joinBeforeStep.Length && stepRows.Count == joinBeforeStep[others.Count])
            {
                var (image, prompt, options) = requests[others.Count + 1];
                var state = Start(image, prompt, options);
                others.Add((state, Collect(batcher.Submit(state, CancellationToken.None))));
            }
        });
        await using var _ = batcher;
        var first = Start(requests[0].Image, requests[0].Prompt, requests[0].Options);
        var firstTokens = await Collect(batcher.Submit(first, CancellationToken.None));
        Assert.Equal(requests.Length - 1, others.Count);
        await Task.WhenAll(others.Select(o => o.Tokens));
        Assert.True(stepRows.Max() > 1, "no step was shared");
        Assert.Equal(Alone(requests[0].Image, requests[0].Prompt, requests[0].Options), first.Results[0].Ids);
        Assert.Equal(first.Results[0].Ids.Skip(1), firstTokens);
        for (var k = 0; k < others.Count; k++)
        {
            var (image, prompt, options) = requests[k + 1];
            var streamed = await others[k].Tokens;
            Assert.Equal(Alone(image, prompt, options), others[k].State.Results[0].Ids);
            Assert.Equal(others[k].State.Results[0].Ids.Skip(1), streamed);
        }
    }

    [Fact]
    public void RequestsEncodedInOneRunDecodeExactlyAsAlone()
    {
        (int Image, string Prompt, GenerationOptions Options)[] requests =
        [
            (0, "a photo of", new GenerationOptions { MaxNewTokens = 12, MinNewTokens = 12 }),
            (3, "", new GenerationOptions { NumBeams = 4 }),
            (5, "Question: what is in the picture? Answer:", new GenerationOptions { DoSample = true, Seed = 11 }),
            (2, "Question: how many? Answer:", new GenerationOptions { NumBeams = 2, MaxNewTokens = 9 }),
        ];
        var states = Pipeline.Generator.StartBatch(requests.Select(r => (Queries(r.Image), (IReadOnlyList<int>)Pipeline.Tokenizer.Encode(r.Prompt), r.Options)).ToList())
            .Select(request => Assert.Single(request)).ToList();
        // Stepped together, as the decoder's batch would, from the one shared encoder output.
        _ = Pipeline.Generator.RunBatch(states).ToList();
        for (var k = 0; k < requests.Length; k++)
            Assert.Equal(Alone(requests[k].Image, requests[k].Prompt, requests[k].Options), states[k].Results[0].Ids);
    }

    [Fact]
    public async Task APromptEncoderThatBatchesEncodesWhatArrivesTogetherInOneRunAndGivesTheSameAnswers()
    {
        // A delay far longer than four Task.Runs take to arrive, so that they always make one run.
        var batches = new System.Collections.Concurrent.ConcurrentQueue<int>();
        var encoder = new PromptEncoder(Pipeline.Generator,
            new ContinuousBatchingOptions { EncoderBatching = EncoderBatching.On, EncoderBatchDelay = TimeSpan.FromMilliseconds(300) }, ExecutionDevice.Cpu, batches.Enqueue);
        Assert.True(encoder.Batches);
        var prompts = new[] { "", "a photo of", "Question: what is in the picture? Answer:", "Question: how many? Answer:" };
        var options = new GenerationOptions { MaxNewTokens = 10 };
        var states = (await Task.WhenAll(prompts.Select((p, i) => Task.Run(() => encoder.StartAsync(Queries(i), Pipeline.Tokenizer.Encode(p), options, CancellationToken.None)))))
            .Select(request => Assert.Single(request)).ToList();
        Assert.Equal([4], batches);
        foreach (var (state, k) in states.Select((s, k) => (s, k)))
        {
            _ = Pipeline.Generator.Run(state).ToList();
            Assert.Equal(Alone(k, prompts[k], options), state.Results[0].Ids);
        }
        var off = new PromptEncoder(Pipeline.Generator, new ContinuousBatchingOptions(), ExecutionDevice.Cpu);
        Assert.False(double.IsNaN(off.MeasuredShareOfSingles));
        Assert.Contains("T5 encoder batching", off.Decision);
    }

    [Fact]
    public void CachesOfSeparateBatchesMergeAndShrinkWithoutChangingAnyResult()
    {
        var generator = Pipeline.Generator;
        var longer = new GenerationOptions { NumBeams = 3, MaxNewTokens = 14, MinNewTokens = 14 };
        var shorter = new GenerationOptions { MaxNewTokens = 40, MinNewTokens = 40 };
        var beams = Start(2, "a photo of", longer);
        var greedy = Start(5, "", shorter);
        // Apart first, each in a cache of its own and of its own length…
        for (var i = 0; i < 6; i++) generator.Step(beams);
        for (var i = 0; i < 2; i++) generator.Step(greedy);
        var apart = (beams.Cache!.Cache, greedy.Cache!.Cache);
        Assert.NotSame(apart.Item1, apart.Item2);
        // …then together: both caches regrouped into one, the shorter history behind empty slots; the beam rows
        // reorder within it every step.
        while (!beams.IsFinished) generator.Step([greedy, beams]);
        Assert.NotSame(apart.Item1, greedy.Cache!.Cache);
        Assert.NotSame(apart.Item2, greedy.Cache.Cache);
        Assert.Null(beams.Cache);
        var slotsWithBeams = greedy.Cache.Cache.Slots;
        // The longest history has left: the next step crops the slots nobody uses any more.
        generator.Step(greedy);
        Assert.Equal(greedy.Length - 1, greedy.Cache!.Cache.Slots);
        Assert.True(greedy.Cache.Cache.Slots < slotsWithBeams, $"{greedy.Cache.Cache.Slots} slots after the longer request left, {slotsWithBeams} before");
        while (!greedy.IsFinished) generator.Step(greedy);

        Assert.Equal(Alone(2, "a photo of", longer), beams.Results[0].Ids);
        Assert.Equal(Alone(5, "", shorter), greedy.Results[0].Ids);
    }

    [Theory]
    [InlineData(SlotPadding.Front)]
    [InlineData(SlotPadding.Back)]
    public void TheCacheRegroupGraphCopiesExactlyWhatTheHostCopyDoes(SlotPadding padding)
    {
        // The graph is what CUDA runs; on CPU the host copy runs. Three sources of different slot counts (merged two
        // at a time), rows reordered and repeated, empty rows, slots both cropped and padded.
        var model = Pipeline.Model;
        var text = model.Config.Text;
        var random = new Random(5);
        Microsoft.ML.OnnxRuntime.OrtValue Random(int rows, long slots) => Microsoft.ML.OnnxRuntime.OrtValue.CreateTensorValueFromMemory(
            Enumerable.Range(0, rows * text.NumHeads * (int)slots * text.DKv).Select(_ => (float)random.NextDouble()).ToArray(),
            [rows, text.NumHeads, slots, text.DKv]);
        KeyValueCache Cache(int rows, long slots) => new(
            Enumerable.Range(0, text.NumDecoderLayers).Select(_ => Random(rows, slots)).ToArray(),
            Enumerable.Range(0, text.NumDecoderLayers).Select(_ => Random(rows, slots)).ToArray());
        using var a = Cache(2, 5);
        using var b = Cache(3, 9);
        using var c = Cache(1, 7);
        // Rows counted through a (0-1), b (2-4), c (5), then the empty one (6).
        long[] order = [6, 3, 0, 0, 5, 2, 4, 1];
        using var onHost = model.RegroupOnHost([a, b, c], order, freshRows: 1, slots: 7, padding);
        using var onDevice = model.RegroupOnDevice([a, b, c], order, freshRows: 1, slots: 7, padding);
        Assert.Equal((8, 7L), (onHost.Rows, onHost.Slots));
        Assert.Equal((8, 7L), (onDevice.Rows, onDevice.Slots));
        for (var i = 0; i < text.NumDecoderLayers; i++)
        {
            Assert.Equal(onHost.Key(i).GetTensorDataAsSpan<float>().ToArray(), onDevice.Key(i).GetTensorDataAsSpan<float>().ToArray());
            Assert.Equal(onHost.Value(i).GetTensorDataAsSpan<float>().ToArray(), onDevice.Value(i).GetTensorDataAsSpan<float>().ToArray());
        }
        // Row 0 is the empty row; row 5 is b's first row, cropped (front: its last 7 slots; back: its first 7).
        Assert.All(onHost.Key(0).GetTensorDataAsSpan<float>()[..(text.NumHeads * 7 * text.DKv)].ToArray(), x => Assert.Equal(0f, x));
        var bKey = b.Key(0).GetTensorDataAsSpan<float>();
        var from = padding == SlotPadding.Front ? 2 : 0;
        Assert.Equal(bKey.Slice(from * text.DKv, 7 * text.DKv).ToArray(),
            onHost.Key(0).GetTensorDataAsSpan<float>().Slice(5 * text.NumHeads * 7 * text.DKv, 7 * text.DKv).ToArray());
    }

    [Fact]
    public async Task TheKvBudgetQueuesWhatDoesNotFitAndCancellationFreesIt()
    {
        var options = new GenerationOptions { MaxNewTokens = 20, MinNewTokens = 20 };
        // A request that would decode for a long time and reserves the whole budget.
        var hog = Start(1, "a photo of", new GenerationOptions { MaxNewTokens = 5000, MinNewTokens = 5000 });
        await using var batcher = new ContinuousBatcher(Pipeline.Generator, new ContinuousBatchingOptions { KvBudgetBytes = hog.KvCacheBytes, MaxQueued = 2 });
        var second = Start(2, "a photo of", options);
        var third = Start(4, "a photo of", options);
        var fourth = Start(5, "", options);
        using var cancelHog = new CancellationTokenSource();
        var hogTokens = batcher.Submit(hog, cancelHog.Token).GetAsyncEnumerator();
        Assert.True(await hogTokens.MoveNextAsync());

        var b = Collect(batcher.Submit(second, CancellationToken.None));
        var c = Collect(batcher.Submit(third, CancellationToken.None));
        Assert.Throws<QueueFullException>(() => batcher.Submit(fourth, CancellationToken.None));
        Assert.Equal(2, batcher.QueueDepth);
        Assert.Equal(1, batcher.ActiveSequences);

        await cancelHog.CancelAsync();
        await Assert.ThrowsAnyAsync<OperationCanceledException>(async () => { while (await hogTokens.MoveNextAsync()) { } });
        Assert.Equal(Alone(2, "a photo of", options).Skip(1), await b);
        Assert.Equal(Alone(4, "a photo of", options).Skip(1), await c);
        var huge = Start(1, "", new GenerationOptions { NumBeams = 8, MaxNewTokens = 6000 });
        var error = Assert.Throws<ServingException>(() => batcher.Submit(huge, CancellationToken.None));
        Assert.Equal(ErrorKind.NeverFits, error.Kind);
        Assert.Contains("KV cache", error.Message);
    }

    [Fact]
    public void VisionAndQFormerBatchesEqualSingleImages()
    {
        var model = Pipeline.Model;
        var images = new[] { 0, 3, 6 }.Select(i => Pipeline.Images.ToModelSize(File.ReadAllBytes(Path.Combine(Fixtures.TinyA,
            Fixtures.Image(Checkpoint, i).GetProperty("file").GetString()!)))).ToList();
        var batched = model.EmbedRgb(images.SelectMany(i => i.Pixels).ToArray(), images.Count);
        var projected = model.RunQFormer(batched).QueryEmbeds;
        for (var k = 0; k < images.Count; k++)
        {
            var single = model.EmbedRgb(images[k].Pixels, 1);
            Assert.Equal(0f, Fixtures.MaxAbsDiff(batched.Slice(k, 1), single));
            Assert.Equal(0f, Fixtures.MaxAbsDiff(projected.Slice(k, 1), model.RunQFormer(single).QueryEmbeds));
        }
    }

    [Fact]
    public async Task TheDynamicBatcherRunsWhatArrivesWhileBusyAsOneBatch()
    {
        var sizes = new List<int>();
        using var running = new SemaphoreSlim(0);
        using var release = new SemaphoreSlim(0);
        var batcher = new DynamicBatcher<int, int>(inputs =>
        {
            if (sizes.Count == 0)
            {
                running.Release();
                release.Wait();
            }
            sizes.Add(inputs.Count);
            return inputs.Select(x => x * 10).ToList();
        }, maxBatch: 4, maxDelay: TimeSpan.Zero);
        // The first caller finds the model idle and runs it on its own thread; the others arrive while it is busy.
        var first = Task.Run(() => batcher.RunAsync(1, CancellationToken.None));
        await running.WaitAsync();
        var waiting = Enumerable.Range(2, 6).Select(x => batcher.RunAsync(x, CancellationToken.None)).ToList();
        release.Release();
        Assert.Equal(10, await first);
        Assert.Equal(Enumerable.Range(2, 6).Select(x => x * 10), await Task.WhenAll(waiting));
        Assert.Equal([1, 4, 2], sizes);
    }
}
