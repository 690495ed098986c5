using System.Collections.Concurrent;

namespace Blip2Mesh.Model.Runtime;

/// <summary>
/// Dynamic batching for the encoder stages: requests that arrive while the model is busy (or within the optional
/// queue delay) run together as one batch of at most <c>maxBatch</c> items. There is no batching thread: the caller
/// that finds the model idle runs the batch itself, so a lone request pays no hand-off between threads.
/// </summary>
public sealed class DynamicBatcher<TIn, TOut>
{
    private readonly Func<IReadOnlyList<TIn>, IReadOnlyList<TOut>> _run;
    private readonly int _maxBatch;
    private readonly TimeSpan _maxDelay;
    private readonly Action<int>? _onBatch;
    private readonly ConcurrentQueue<(TIn Input, TaskCompletionSource<TOut> Result)> _queue = new();
    private readonly SemaphoreSlim _model = new(1, 1);

    /// <param name="run">Runs one batch; returns one output per input, in order.</param>
    /// <param name="onBatch">Told the size of every batch (for the batch-size metric).</param>
    public DynamicBatcher(Func<IReadOnlyList<TIn>, IReadOnlyList<TOut>> run, int maxBatch, TimeSpan maxDelay, Action<int>? onBatch = null)
    {
        if (maxBatch < 1) throw new ArgumentOutOfRangeException(nameof(maxBatch), "a batch holds at least one request");
        _run = run;
        _maxBatch = maxBatch;
        _maxDelay = maxDelay;
        _onBatch = onBatch;
    }

    public async Task<TOut> RunAsync(TIn input, CancellationToken cancellation)
    {
        var result = new TaskCompletionSource<TOut>(TaskCreationOptions.RunContinuationsAsynchronously);
        _queue.Enqueue((input, result));
        // Whoever gets the idle model runs batches until the queue is empty; the others wait for their result.
        while (!result.Task.IsCompleted)
        {
            var model = _model.WaitAsync(cancellation);
            if (await Task.WhenAny(result.Task, model) != model)
            {
                // Our result came first: hand the model back if we were granted it meanwhile.
                _ = model.ContinueWith(t => { if (t.IsCompletedSuccessfully) _model.Release(); }, TaskScheduler.Default);
                break;
            }
            await model;
            try
            {
                if (_maxDelay > TimeSpan.Zero && _queue.Count < _maxBatch) await Task.Delay(_maxDelay, CancellationToken.None);
                RunQueued();
            }
            finally
            {
                _model.Release();
            }
        }
        return await result.Task.WaitAsync(cancellation);
    }

    private void RunQueued()
    {
        while (!_queue.IsEmpty)
        {
            var batch = new List<(TIn Input, TaskCompletionSource<TOut> Result)>(_maxBatch);
            while (batch.Count < _maxBatch && _queue.TryDequeue(out var item)) batch.Add(item);
            _onBatch?.Invoke(batch.Count);
            try
            {
                var outputs = _run(batch.Select(b => b.Input).ToList());
                for (var i = 0; i < batch.Count; i++) batch[i].Result.TrySetResult(outputs[i]);
            }
            catch (Exception e)
            {
                foreach (var item in batch) item.Result.TrySetException(e);
            }
        }
    }
}

/// <summary>How an encoder stage batches: at most this many requests per run, waiting at most this long for more.</summary>
public sealed record BatchingOptions(int MaxBatch = 8, TimeSpan MaxDelay = default);
