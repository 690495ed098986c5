using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using Blip2Mesh.Gateway;
using Blip2Mesh.Model.Errors;
using Blip2Mesh.Model.Generation;
using Blip2Mesh.Model.Imaging;
using Blip2Mesh.Model.Runtime;
using Blip2Mesh.ServiceDefaults;
using Grpc.Core;
using Microsoft.Extensions.Logging.Abstractions;
using Xunit.Abstractions;

namespace Blip2Mesh.Tests;

/// <summary>The pieces that keep one caller from hurting another, each tested where it lives.</summary>
public sealed class IsolationTests(ITestOutputHelper output)
{
    private static FloatTensor Tensor(float value) => new([value], [1]);

    [Fact]
    public async Task ACacheLookupNeverWaitsForAComputationInProgress()
    {
        var cache = new EmbeddingCache(1 << 20);
        cache.Add("cached", Tensor(1));
        var release = new TaskCompletionSource();
        var slow = cache.GetOrComputeAsync("slow", async _ => { await release.Task; return Tensor(2); }, CancellationToken.None);
        // A computation that blocks its thread outright (a synchronous decode) must not block lookups either.
        var blocking = cache.GetOrComputeAsync("blocking", _ => { release.Task.Wait(); return Task.FromResult(Tensor(3)); }, CancellationToken.None);
        var clock = Stopwatch.StartNew();
        Assert.True(cache.TryGet("cached", out var hit));
        Assert.Equal(1, hit.Data[0]);
        var (other, wasHit) = await cache.GetOrComputeAsync("cached", _ => throw new InvalidOperationException("not called"), CancellationToken.None);
        Assert.True(wasHit);
        Assert.Equal(1, other.Data[0]);
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(1));
        release.SetResult();
        Assert.Equal(2, (await slow).Value.Data[0]);
        Assert.Equal(3, (await blocking).Value.Data[0]);
    }

    [Fact]
    public async Task AComputationIsSharedWhileAnyoneWaitsAndCancelledWhenTheLastOneLeaves()
    {
        var cache = new EmbeddingCache(1 << 20);
        var started = 0;
        var abandoned = new TaskCompletionSource();
        async Task<FloatTensor> Compute(CancellationToken token)
        {
            Interlocked.Increment(ref started);
            token.Register(() => abandoned.TrySetResult());
            await Task.Delay(Timeout.Infinite, token);
            return Tensor(0);
        }
        using var first = new CancellationTokenSource();
        using var second = new CancellationTokenSource();
        var a = cache.GetOrComputeAsync("k", Compute, first.Token);
        var b = cache.GetOrComputeAsync("k", Compute, second.Token);
        await first.CancelAsync();
        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => a);
        await Task.Delay(100);
        Assert.False(abandoned.Task.IsCompleted, "cancelled while another caller still waited");
        await second.CancelAsync();
        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => b);
        await abandoned.Task.WaitAsync(TimeSpan.FromSeconds(5));
        Assert.Equal(1, started);

        // A caller arriving afterwards starts afresh instead of joining the abandoned computation.
        var (value, hit) = await cache.GetOrComputeAsync("k", _ => Task.FromResult(Tensor(7)), CancellationToken.None);
        Assert.False(hit);
        Assert.Equal(7, value.Data[0]);
    }

    public static TheoryData<string, bool, StatusCode> StageFailures() => new()
    {
        { "connection", true, StatusCode.Unavailable },
        { "reset", true, StatusCode.Unavailable },
        { "unknown", true, StatusCode.Unavailable },
        { "stage-invalid", false, StatusCode.InvalidArgument },
        { "stage-busy", true, StatusCode.ResourceExhausted },
        { "foreign-invalid", false, StatusCode.Internal },
    };

    [Theory]
    [MemberData(nameof(StageFailures))]
    public void EveryStageFailureIsClassifiedOnceForRetriesAndForTheCaller(string failure, bool transient, StatusCode told)
    {
        Exception e = failure switch
        {
            "connection" => new HttpRequestException("Connection refused (127.0.0.1:50061)"),
            "reset" => new HttpIOException(HttpRequestError.ResponseEnded, "An HTTP/2 connection could not be established"),
            "unknown" => new RpcException(new Grpc.Core.Status(StatusCode.Unknown, "Exception was thrown by handler.")),
            "stage-invalid" => ServingErrors.Create(StatusCode.InvalidArgument, "prompt: 300 tokens exceed the limit of 256", "prompt"),
            "stage-busy" => ServingErrors.Create(StatusCode.ResourceExhausted, "the decoder is busy (1024 requests waiting): try again shortly"),
            "foreign-invalid" => new RpcException(new Grpc.Core.Status(StatusCode.InvalidArgument, "Error parsing 10.0.0.3:80")),
            _ => throw new ArgumentOutOfRangeException(nameof(failure)),
        };
        Assert.Equal(transient, StageErrors.IsTransient(e));
        var forCaller = StageErrors.ForCaller("decoder", e, CancellationToken.None);
        var (code, message) = forCaller switch
        {
            ServingException s => (ServingErrors.Code(s.Kind), s.Message),
            RpcException r => (r.StatusCode, r.Status.Detail),
            _ => throw new InvalidOperationException(forCaller.GetType().Name),
        };
        output.WriteLine($"{failure}: {code} {message}");
        Assert.Equal(told, code);
        Assert.DoesNotContain("127.0.0.1", message);
        Assert.DoesNotContain("10.0.0.3", message);
        Assert.DoesNotContain("Exception", message);
        if (code != StatusCode.InvalidArgument) Assert.StartsWith("decoder stage", message);
    }

    [Fact]
    public void ACallerThatWentAwayIsNeverReportedAsAStageFailure()
    {
        using var gone = new CancellationTokenSource();
        gone.Cancel();
        Assert.IsType<OperationCanceledException>(StageErrors.ForCaller("vision", new HttpRequestException("reset"), gone.Token));
    }

    [Fact]
    public void AnImageTooThinToResampleIsRefusedFromItsHeaderAndAnOrdinaryOneIsCosted()
    {
        var images = new ImagePreprocessor(PreprocessorConfig.Load(Path.Combine(Fixtures.Demo, "preprocessor_config.json")));
        var e = Assert.Throws<InvalidImageException>(() => images.WorkBytes(TestImages.BombPng(50, 1_000_000)));
        Assert.Contains("50x1000000", e.Message);
        Assert.Equal("image", e.Field);
        var sample = File.ReadAllBytes(Path.Combine(Fixtures.Demo, "samples", "sample000.png"));
        var (width, height) = ImageDecoder.ReadSize(sample);
        Assert.Equal(7L * width * height + (width == images.Width ? 0 : 3L * images.Width * height), images.WorkBytes(sample));
    }

    [Fact]
    public async Task AWaitingRequestWhoseCallerGivesUpLeavesTheQueueAtOnce()
    {
        var pipeline = Fixtures.Pipeline("blip2-tiny-a");
        var options = new GenerationOptions { MaxNewTokens = 4000, MinNewTokens = 4000 };
        var hog = Start(pipeline, options);
        await using var batcher = new ContinuousBatcher(pipeline.Generator, new ContinuousBatchingOptions { KvBudgetBytes = hog.KvCacheBytes });
        using var stopHog = new CancellationTokenSource();
        var hogTokens = batcher.Submit(hog, stopHog.Token).GetAsyncEnumerator();
        Assert.True(await hogTokens.MoveNextAsync());
        using var giveUp = new CancellationTokenSource();
        var waiting = batcher.Submit(Start(pipeline, options), giveUp.Token).GetAsyncEnumerator();
        Assert.Equal(1, batcher.QueueDepth);
        await giveUp.CancelAsync();
        Assert.Equal(0, batcher.QueueDepth);
        Assert.Equal(1, batcher.ActiveSequences);
        await Assert.ThrowsAnyAsync<OperationCanceledException>(async () => await waiting.MoveNextAsync());
        await stopHog.CancelAsync();
    }

    [Fact]
    public async Task AShortAnswerBehindFiftyLongOnesIsDecodedWhileTheyStillRun()
    {
        var pipeline = Fixtures.Pipeline("blip2-tiny-a");
        var heavy = new GenerationOptions { NumBeams = 4, MaxNewTokens = 300, MinNewTokens = 300 };
        // Room for eight long requests' rows: the other 42 wait in the queue.
        await using var batcher = new ContinuousBatcher(pipeline.Generator, new ContinuousBatchingOptions { MaxRows = 40 });
        var longOnes = Enumerable.Range(0, 50).Select(_ => Collect(batcher.Submit(Start(pipeline, heavy), CancellationToken.None))).ToList();
        await Task.Delay(50);
        var clock = Stopwatch.StartNew();
        var shortOne = await Collect(batcher.Submit(Start(pipeline, new GenerationOptions { MaxNewTokens = 1 }), CancellationToken.None));
        output.WriteLine($"the 1-token answer took {clock.ElapsedMilliseconds} ms with {batcher.QueueDepth} long requests still queued");
        Assert.Single(shortOne);
        Assert.True(batcher.QueueDepth > 30, $"only {batcher.QueueDepth} long requests were still waiting");
        Assert.DoesNotContain(longOnes, t => t.IsCompleted);
        await batcher.DisposeAsync();
        await Task.WhenAll(longOnes.Select(t => t.ContinueWith(_ => { }, TaskScheduler.Default)));
    }

    [Fact]
    public async Task ARequestThatNeverFitsIsRefusedBeforeAnyModelRunsSayingWhatFits()
    {
        var pipeline = Fixtures.Pipeline("blip2-tiny-a");
        var text = pipeline.Model.Config.Text;
        await using var batcher = new ContinuousBatcher(pipeline.Generator, new ContinuousBatchingOptions { KvBudgetBytes = 1 << 20, MaxRows = 6 });
        var e = Assert.Throws<ServingException>(() => batcher.CheckFits(text, new GenerationOptions { NumBeams = 8, MaxNewTokens = 5 }, 40));
        Assert.Equal(ErrorKind.NeverFits, e.Kind);
        Assert.Contains("needs 8 decoder rows", e.Message);
        var kv = Assert.Throws<ServingException>(() => batcher.CheckFits(text, new GenerationOptions { NumBeams = 4, MaxNewTokens = 4000 }, 40));
        var fitting = int.Parse(System.Text.RegularExpressions.Regex.Match(kv.Message, @"at most (\d+) new tokens fit").Groups[1].Value);
        output.WriteLine(kv.Message);
        batcher.CheckFits(text, new GenerationOptions { NumBeams = 4, MaxNewTokens = fitting }, 40);
        Assert.Throws<ServingException>(() => batcher.CheckFits(text, new GenerationOptions { NumBeams = 4, MaxNewTokens = fitting + 1 }, 40));
    }

    [Fact]
    public async Task ARedisThatStopsAnsweringCostsARequestLittleAndIsSkippedOnceItKeepsFailing()
    {
        // A listener that accepts and never answers: Redis paused (SIGSTOP) looks like this to a client.
        using var blackhole = new TcpListener(IPAddress.Loopback, 0);
        blackhole.Start(100);
        var accepted = new List<Socket>();
        _ = Task.Run(async () => { while (true) accepted.Add(await blackhole.AcceptSocketAsync()); });
        using var store = new RedisEmbeddingStore($"127.0.0.1:{((IPEndPoint)blackhole.LocalEndpoint).Port}", TimeSpan.FromMinutes(1), NullLogger.Instance);
        var times = new List<double>();
        for (var i = 0; i < 10; i++)
        {
            var clock = Stopwatch.StartNew();
            Assert.Null(await store.TryGetAsync($"key{i}"));
            times.Add(clock.Elapsed.TotalMilliseconds);
        }
        output.WriteLine(string.Join(", ", times.Select(t => $"{t:F0} ms")));
        Assert.All(times, t => Assert.True(t < 2000, $"a read took {t:F0} ms"));
        // Once the breaker is open, reads are skipped: far quicker than the 250 ms a read waits for a silent Redis.
        Assert.True(times.Skip(6).Max() < 100, $"reads after repeated failures took {string.Join(", ", times.Skip(6))} ms");
    }

    private static readonly Lazy<FloatTensor> Queries = new(() => Fixtures.Pipeline("blip2-tiny-a").EmbedImage(
        File.ReadAllBytes(Path.Combine(Fixtures.TinyA, Fixtures.Image("blip2-tiny-a", 0).GetProperty("file").GetString()!))));

    private static DecodingState Start(Model.Pipeline.Blip2Pipeline pipeline, GenerationOptions options) =>
        pipeline.Generator.Start(Queries.Value, [1], options);

    private static async Task<List<int>> Collect(IAsyncEnumerable<DecodedTokens> tokens)
    {
        var ids = new List<int>();
        await foreach (var step in tokens) ids.AddRange(step.Ids);
        return ids;
    }
}
