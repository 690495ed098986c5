using System.Threading.Channels;

namespace Blip2Mesh.Model.Generation;

/// <summary>
/// Continuous batching: every active request advances together, one batched decoder step at a time; requests
/// join and leave at step boundaries. Admission is decided by a KV-cache memory budget (each request reserves what
/// its cache can grow to) and a cap on rows per step; the rest wait in a bounded queue. A request whose caller
/// cancels leaves at the next boundary and frees its reservation.
/// </summary>
public sealed class ContinuousBatcher : IAsyncDisposable
{
    private readonly Generator _generator;
    private readonly int _maxRows;
    private readonly long _kvBudgetBytes;
    private readonly int _maxQueued;
    private readonly Action<int>? _onStep;
    private readonly Channel<Sequence> _incoming = Channel.CreateUnbounded<Sequence>(new UnboundedChannelOptions { SingleReader = true });
    private readonly CancellationTokenSource _stop = new();
    private readonly Thread _loop;
    private int _queued;
    private int _activeSequences;

    private sealed record Sequence(DecodingState State, ChannelWriter<IReadOnlyList<int>> Tokens, CancellationToken Cancellation);

    /// <param name="maxRows">Most decoder rows (a beam is a row) stepped together.</param>
    /// <param name="kvBudgetBytes">KV cache the admitted requests may reserve together.</param>
    /// <param name="maxQueued">Most requests waiting; beyond it <see cref="Submit"/> refuses with <see cref="QueueFullException"/>.</param>
    /// <param name="onStep">Told the number of rows of every step (for the batch-size metric).</param>
    public ContinuousBatcher(Generator generator, int maxRows = 64, long kvBudgetBytes = 1L << 30, int maxQueued = 1024, Action<int>? onStep = null)
    {
        _generator = generator;
        _kvBudgetBytes = kvBudgetBytes;
        _onStep = onStep;
        _maxRows = maxRows;
        _maxQueued = maxQueued;
        // The loop steps back to back while requests are active: it gets a thread of its own rather than holding a
        // thread-pool thread that the gRPC handlers streaming its tokens need.
        _loop = new Thread(Loop) { IsBackground = true, Name = "decoder batch loop" };
        _loop.Start();
    }

    /// <summary>Requests being decoded now.</summary>
    public int ActiveSequences => Volatile.Read(ref _activeSequences);
    /// <summary>Requests waiting for rows.</summary>
    public int QueueDepth => Volatile.Read(ref _queued);

    /// <summary>
    /// Queues an encoded request; its final tokens stream out as the batch advances, each read carrying every token
    /// decoded since the last one, so a consumer slower than the steps (a gRPC stream) sends fewer, fuller messages.
    /// </summary>
    public IAsyncEnumerable<DecodedTokens> Submit(DecodingState state, CancellationToken cancellation)
    {
        if (state.Rows > _maxRows) throw new ArgumentException($"the request needs {state.Rows} rows but a batch holds at most {_maxRows}");
        if (state.KvCacheBytes > _kvBudgetBytes)
            throw new ArgumentException($"the request needs {state.KvCacheBytes >> 20} MB of KV cache, more than the decoder's whole budget of {_kvBudgetBytes >> 20} MB");
        if (Interlocked.Increment(ref _queued) > _maxQueued)
        {
            Interlocked.Decrement(ref _queued);
            throw new QueueFullException($"the decoder queue is full ({_maxQueued} requests waiting)");
        }
        var tokens = Channel.CreateUnbounded<IReadOnlyList<int>>(new UnboundedChannelOptions { SingleWriter = true, SingleReader = true });
        _incoming.Writer.TryWrite(new Sequence(state, tokens.Writer, cancellation));
        return ReadDecoded(tokens.Reader, cancellation);
    }

    private static async IAsyncEnumerable<DecodedTokens> ReadDecoded(ChannelReader<IReadOnlyList<int>> steps,
        [System.Runtime.CompilerServices.EnumeratorCancellation] CancellationToken cancellation)
    {
        while (await steps.WaitToReadAsync(cancellation))
        {
            var ids = new List<int>();
            while (steps.TryRead(out var step)) ids.AddRange(step);
            // Completion is set as the last step is read from a completed channel: the consumer can end its answer
            // in the same message as its last tokens.
            yield return new DecodedTokens(ids, steps.Completion.IsCompletedSuccessfully);
        }
    }

    private void Loop()
    {
        var active = new List<Sequence>();
        var stop = _stop.Token;
        while (!stop.IsCancellationRequested)
        {
            if (active.Count == 0)
            {
                try
                {
                    if (!_incoming.Reader.WaitToReadAsync(stop).AsTask().GetAwaiter().GetResult()) break;
                }
                catch (OperationCanceledException) { break; }
            }
            var rows = active.Sum(s => s.State.Rows);
            var reserved = active.Sum(s => s.State.KvCacheBytes);
            while (_incoming.Reader.TryPeek(out var next) && rows + next.State.Rows <= _maxRows
                   && reserved + next.State.KvCacheBytes <= _kvBudgetBytes && _incoming.Reader.TryRead(out next))
            {
                Interlocked.Decrement(ref _queued);
                active.Add(next);
                rows += next.State.Rows;
                reserved += next.State.KvCacheBytes;
            }
            foreach (var cancelled in active.Where(s => s.Cancellation.IsCancellationRequested).ToList())
            {
                cancelled.Tokens.TryComplete(new OperationCanceledException(cancelled.Cancellation));
                cancelled.State.Dispose();
                active.Remove(cancelled);
            }
            Volatile.Write(ref _activeSequences, active.Count);
            if (active.Count == 0) continue;

            _onStep?.Invoke(active.Sum(s => s.State.Rows));
            IReadOnlyList<IReadOnlyList<int>> stepped;
            try
            {
                stepped = _generator.Step(active.Select(s => s.State).ToList());
            }
            catch (Exception e)
            {
                foreach (var sequence in active)
                {
                    sequence.Tokens.TryComplete(e);
                    sequence.State.Dispose();
                }
                active.Clear();
                continue;
            }
            for (var i = active.Count - 1; i >= 0; i--)
            {
                var sequence = active[i];
                if (stepped[i].Count > 0) sequence.Tokens.TryWrite(stepped[i]);
                if (sequence.State.IsFinished)
                {
                    sequence.Tokens.TryComplete();
                    active.RemoveAt(i);
                }
            }
            Volatile.Write(ref _activeSequences, active.Count);
        }
        foreach (var sequence in active)
        {
            sequence.Tokens.TryComplete(new OperationCanceledException("the decoder is shutting down"));
            sequence.State.Dispose();
        }
    }

    public async ValueTask DisposeAsync()
    {
        _incoming.Writer.TryComplete();
        await _stop.CancelAsync();
        await Task.Run(_loop.Join);
        while (_incoming.Reader.TryRead(out var waiting)) waiting.Tokens.TryComplete(new OperationCanceledException("the decoder is shutting down"));
        _stop.Dispose();
    }
}

/// <summary>Tokens decoded for one request since its consumer last read; <paramref name="IsLast"/> when nothing follows.</summary>
public sealed record DecodedTokens(IReadOnlyList<int> Ids, bool IsLast);

/// <summary>The decoder's queue is full; the caller should retry later or elsewhere.</summary>
public sealed class QueueFullException(string message) : Exception(message);
