using System.Threading.Channels;

namespace Blip2Mesh.ServiceDefaults;

/// <summary>
/// Dynamic batching for the encoder stages: requests that arrive while the model is busy (or within the optional
/// queue delay) run together as one batch of at most <c>maxBatch</c> items. An idle stage runs a lone request at
/// once, so batching never adds latency unless a delay is configured.
/// </summary>
public sealed class DynamicBatcher<TIn, TOut> : IAsyncDisposable
{
    private readonly Func<IReadOnlyList<TIn>, IReadOnlyList<TOut>> _run;
    private readonly int _maxBatch;
    private readonly TimeSpan _maxDelay;
    private readonly Action<int>? _onBatch;
    private readonly Channel<(TIn Input, TaskCompletionSource<TOut> Result)> _queue =
        Channel.CreateUnbounded<(TIn, TaskCompletionSource<TOut>)>(new UnboundedChannelOptions { SingleReader = true });
    private readonly Task _loop;

    /// <param name="run">Runs one batch; returns one output per input, in order.</param>
    /// <param name="onBatch">Told the size of every batch (for the batch-size metric).</param>
    public DynamicBatcher(Func<IReadOnlyList<TIn>, IReadOnlyList<TOut>> run, int maxBatch, TimeSpan maxDelay, Action<int>? onBatch = null)
    {
        if (maxBatch < 1) throw new ArgumentOutOfRangeException(nameof(maxBatch), "a batch holds at least one request");
        _run = run;
        _maxBatch = maxBatch;
        _maxDelay = maxDelay;
        _onBatch = onBatch;
        _loop = Task.Factory.StartNew(Loop, TaskCreationOptions.LongRunning).Unwrap();
    }

    public Task<TOut> RunAsync(TIn input, CancellationToken cancellation)
    {
        var result = new TaskCompletionSource<TOut>(TaskCreationOptions.RunContinuationsAsynchronously);
        if (!_queue.Writer.TryWrite((input, result))) throw new ObjectDisposedException(nameof(DynamicBatcher<TIn, TOut>), "the stage is shutting down");
        return result.Task.WaitAsync(cancellation);
    }

    private async Task Loop()
    {
        var reader = _queue.Reader;
        var batch = new List<(TIn Input, TaskCompletionSource<TOut> Result)>(_maxBatch);
        while (await reader.WaitToReadAsync())
        {
            while (batch.Count < _maxBatch && reader.TryRead(out var item)) batch.Add(item);
            if (batch.Count < _maxBatch && _maxDelay > TimeSpan.Zero)
            {
                using var delay = new CancellationTokenSource(_maxDelay);
                try
                {
                    while (batch.Count < _maxBatch && await reader.WaitToReadAsync(delay.Token))
                        while (batch.Count < _maxBatch && reader.TryRead(out var item)) batch.Add(item);
                }
                catch (OperationCanceledException)
                {
                    // The delay is over: run what we have.
                }
            }
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
            batch.Clear();
        }
    }

    public async ValueTask DisposeAsync()
    {
        _queue.Writer.TryComplete();
        await _loop;
    }
}

/// <summary>How an encoder stage batches: at most this many requests per run, waiting at most this long for more.</summary>
public sealed record BatchingOptions(int MaxBatch = 8, TimeSpan MaxDelay = default);
