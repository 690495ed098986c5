using System.Diagnostics;
using Blip2Mesh.Model.Runtime;

namespace Blip2Mesh.Model.Generation;

/// <summary>Whether the T5 encoder runs the requests that arrive together as one batch.</summary>
public enum EncoderBatching
{
    /// <summary>Batch where it was measured to pay: on CUDA, or where a batch's rows cost clearly less than as many runs.</summary>
    Auto,
    On,
    Off,
}

/// <summary>
/// Starts requests' decoding with the T5 encoder. Where batching pays (the run is dominated by reading the encoder's
/// weights, which a batch reads once: real-size models, GPUs), requests that arrive while a run is busy are encoded in
/// one run; elsewhere (a tiny model is all compute, and concurrent runs use the cores in parallel) each runs alone on
/// its caller's thread, as before. Either way the encoder never runs on the decoder's batch loop, so new requests do
/// not stall the running batch, and the states are the same as encoding each alone.
/// </summary>
public sealed class PromptEncoder
{
    /// <summary>
    /// Batching is chosen when a batch of <see cref="ProbeRows"/> costs less than as many single runs at once: then it
    /// also starts the rows' decoding together. (At 80%, the float32 XL encoder, measured at 88-95%, stayed unbatched,
    /// and served 1.7x the tokens/s at concurrency 4 against 2.6x batched, TTFT 3.3x against 2.5x.)
    /// </summary>
    public const double PaysBelow = 1.0;
    private const int ProbeRows = 4;

    private readonly Generator _generator;
    private readonly DynamicBatcher<(FloatTensor Queries, IReadOnlyList<int> PromptIds, GenerationOptions Options), IReadOnlyList<DecodingState>>? _batcher;

    /// <param name="options">Whether to batch (<see cref="ContinuousBatchingOptions.EncoderBatching"/>), how many requests
    /// at most and how long a run waits for requests arriving with it.</param>
    /// <param name="onBatch">Told the number of requests of every batched run (for the batch-size metric).</param>
    public PromptEncoder(Generator generator, ContinuousBatchingOptions options, ExecutionDevice device, Action<int>? onBatch = null)
    {
        _generator = generator;
        var mode = options.EncoderBatching;
        var batch = mode switch
        {
            EncoderBatching.On => true,
            EncoderBatching.Off => false,
            _ when device == ExecutionDevice.Cuda => true,
            _ => MeasuredShare() <= PaysBelow,
        };
        Decision = mode == EncoderBatching.Auto && device != ExecutionDevice.Cuda
            ? $"T5 encoder batching {(batch ? "on" : "off")}: {ProbeRows} rows in one run cost {MeasuredShareOfSingles:P0} of {ProbeRows} single runs at once (on below {PaysBelow:P0})"
            : $"T5 encoder batching {(batch ? "on" : "off")} ({(mode == EncoderBatching.Auto ? "always on CUDA" : "as configured")})";
        if (batch && options.MaxEncoderBatch > 1)
            _batcher = new DynamicBatcher<(FloatTensor, IReadOnlyList<int>, GenerationOptions), IReadOnlyList<DecodingState>>(
                _generator.StartBatch, options.MaxEncoderBatch, options.EncoderBatchDelay, onBatch);
    }

    /// <summary>What was decided and why, for the start-up log.</summary>
    public string Decision { get; }
    public bool Batches => _batcher is not null;
    /// <summary>The measured cost of a batch of <see cref="ProbeRows"/> against as many single runs at once (NaN when not measured).</summary>
    public double MeasuredShareOfSingles { get; private set; } = double.NaN;

    /// <summary>The request's decoding states (<see cref="Generator.StartRequest"/>), its prompt encoded alone or with the requests that arrived with it.</summary>
    public async Task<IReadOnlyList<DecodingState>> StartAsync(FloatTensor queries, IReadOnlyList<int> promptIds, GenerationOptions options, CancellationToken cancellation)
    {
        if (_batcher is null) return _generator.StartRequest(queries, promptIds, options);
        // The batch runs whether or not this caller still waits: states nobody takes let go of their cache.
        var started = _batcher.RunAsync((queries, promptIds, options), CancellationToken.None);
        try
        {
            return await started.WaitAsync(cancellation);
        }
        catch (OperationCanceledException)
        {
            _ = started.ContinueWith(t => { foreach (var state in t.Result) state.Dispose(); }, CancellationToken.None, TaskContinuationOptions.OnlyOnRanToCompletion, TaskScheduler.Default);
            throw;
        }
    }

    /// <summary>
    /// Times one encoder run of <see cref="ProbeRows"/> prompts against as many single runs at once, which is what not
    /// batching does with requests that arrive together (best of two each, after a warm run). Against single runs one
    /// after another, the float32 XL encoder (mostly compute on a 2-core box) measured 72-95%, turned off or on by
    /// noise.
    /// </summary>
    private double MeasuredShare()
    {
        var model = _generator.Model;
        var config = model.Config;
        var queries = FloatTensor.Zeros(1, config.NumQueryTokens, config.Text.DModel);
        IReadOnlyList<int> prompt = Enumerable.Repeat(config.Text.EosTokenId, 16).ToArray();
        double Best(int rows, int runs)
        {
            var batch = FloatTensor.Stack(Enumerable.Repeat(queries, rows).ToList());
            var prompts = Enumerable.Repeat(prompt, rows).ToList();
            var best = double.MaxValue;
            for (var i = 0; i < runs; i++)
            {
                var clock = Stopwatch.StartNew();
                model.Encode(batch, prompts).Cross.Dispose();
                best = Math.Min(best, clock.Elapsed.TotalMilliseconds);
            }
            return best;
        }
        double BestConcurrentSingles(int runs)
        {
            var best = double.MaxValue;
            for (var i = 0; i < runs; i++)
            {
                var clock = Stopwatch.StartNew();
                Task.WaitAll(Enumerable.Range(0, ProbeRows).Select(_ => Task.Factory.StartNew(() => model.Encode(queries, [prompt]).Cross.Dispose(),
                    CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default)).ToArray());
                best = Math.Min(best, clock.Elapsed.TotalMilliseconds);
            }
            return best;
        }
        Best(ProbeRows, 1);
        var singles = BestConcurrentSingles(2);
        MeasuredShareOfSingles = Best(ProbeRows, 2) / singles;
        return MeasuredShareOfSingles;
    }
}
