using System.Threading.Channels;
using Blip2Mesh.Model.Checkpoint;
using Blip2Mesh.Model.Errors;

namespace Blip2Mesh.Model.Generation;

/// <summary>How the decoder batches and admits requests; every default in one place.</summary>
public sealed record ContinuousBatchingOptions
{
    /// <summary>Most decoder rows (a beam is a row) stepped together.</summary>
    public int MaxRows { get; init; } = 64;
    /// <summary>KV cache the admitted requests may reserve together (each reserves what its cache can grow to).</summary>
    public long KvBudgetBytes { get; init; } = 1L << 30;
    /// <summary>Most requests waiting; beyond it a request is refused as overloaded (another replica may take it).</summary>
    public int MaxQueued { get; init; } = 1024;
    /// <summary>A request asking for at most this many new tokens is a short answer (a caption, a VQA answer).</summary>
    public int ShortAnswerTokens { get; init; } = 32;
    /// <summary>
    /// Share of the rows and of the KV budget that long answers may hold together while another long answer is
    /// active: the rest stays free for short answers, so a burst of long requests cannot hold a one-token answer
    /// back for as long as theirs take.
    /// </summary>
    public double LongAnswerShare { get; init; } = 0.75;
    /// <summary>Whether the T5 encoder runs requests arriving together as one batch (<see cref="PromptEncoder"/>).</summary>
    public EncoderBatching EncoderBatching { get; init; } = EncoderBatching.Auto;
    /// <summary>Most requests encoded in one T5 encoder run.</summary>
    public int MaxEncoderBatch { get; init; } = 8;
    /// <summary>
    /// How long a batched encoder run that finds the encoder idle waits for requests arriving with it. Without it a
    /// burst was encoded as its first request alone, then the rest: at XL size with int8 weights, four requests
    /// arriving together saw their first token 2.9x later than one alone.
    /// </summary>
    public TimeSpan EncoderBatchDelay { get; init; } = TimeSpan.FromMilliseconds(1);

    public ContinuousBatchingOptions Validate()
    {
        if (MaxRows < 1) throw new ArgumentOutOfRangeException(nameof(MaxRows), "a batch holds at least one row");
        if (KvBudgetBytes < 1) throw new ArgumentOutOfRangeException(nameof(KvBudgetBytes), "the KV budget must be positive");
        if (MaxQueued < 0) throw new ArgumentOutOfRangeException(nameof(MaxQueued), "the queue bound must not be negative");
        if (LongAnswerShare is <= 0 or > 1) throw new ArgumentOutOfRangeException(nameof(LongAnswerShare), "the long-answer share must be in (0, 1]");
        if (MaxEncoderBatch < 1) throw new ArgumentOutOfRangeException(nameof(MaxEncoderBatch), "an encoder batch holds at least one request");
        if (EncoderBatchDelay < TimeSpan.Zero) throw new ArgumentOutOfRangeException(nameof(EncoderBatchDelay), "the encoder batch delay must not be negative");
        return this;
    }
}

/// <summary>
/// Continuous batching: every active request advances together, one batched decoder step at a time; requests
/// join and leave at step boundaries. Admission is decided by a KV-cache memory budget (each request reserves what
/// its cache can grow to) and a cap on rows per step; the rest wait in a bounded queue, in two lanes served in
/// arrival order each: short answers first, then long ones (which together hold at most
/// <see cref="ContinuousBatchingOptions.LongAnswerShare"/> of the capacity while another long one runs). A request
/// whose caller cancels leaves the queue at once, or the batch at the next boundary, and frees its reservation.
/// </summary>
public sealed class ContinuousBatcher : IAsyncDisposable
{
    private readonly Generator _generator;
    private readonly ContinuousBatchingOptions _options;
    private readonly Action<int>? _onStep;
    private readonly Lock _gate = new();
    private readonly LinkedList<Sequence> _short = new();
    private readonly LinkedList<Sequence> _long = new();
    private readonly SemaphoreSlim _arrived = new(0);
    private readonly CancellationTokenSource _stop = new();
    private readonly Thread _loop;
    private bool _disposed;
    private int _queued;
    private int _activeSequences;

    private sealed class Sequence(DecodingState state, ChannelWriter<DecodedTokens> tokens, CancellationToken cancellation, bool isLong)
    {
        public DecodingState State { get; } = state;
        public ChannelWriter<DecodedTokens> Tokens { get; } = tokens;
        public CancellationToken Cancellation { get; } = cancellation;
        public bool IsLong { get; } = isLong;
        public LinkedListNode<Sequence>? Queued { get; set; }
        public CancellationTokenRegistration WhileQueued { get; set; }
    }

    /// <param name="onStep">Told the number of rows of every step (for the batch-size metric).</param>
    public ContinuousBatcher(Generator generator, ContinuousBatchingOptions? options = null, Action<int>? onStep = null)
    {
        _generator = generator;
        _options = (options ?? new ContinuousBatchingOptions()).Validate();
        _onStep = onStep;
        // The loop steps back to back while requests are active: it gets a thread of its own rather than holding a
        // thread-pool thread that the gRPC handlers streaming its tokens need.
        _loop = new Thread(Loop) { IsBackground = true, Name = "decoder batch loop" };
        _loop.Start();
    }

    public ContinuousBatchingOptions Options => _options;
    /// <summary>Requests being decoded now.</summary>
    public int ActiveSequences => Volatile.Read(ref _activeSequences);
    /// <summary>Requests waiting for rows.</summary>
    public int QueueDepth => Volatile.Read(ref _queued);

    /// <summary>
    /// Refuses, before any model runs, a request that could never be admitted however long it waited (more rows than
    /// a batch holds, or a KV reservation over the whole budget), saying what would fit.
    /// </summary>
    /// <param name="encoderLength">Query tokens + prompt tokens.</param>
    public void CheckFits(T5Config text, GenerationOptions options, int encoderLength)
    {
        if (options.NumBeams > _options.MaxRows)
            throw ServingException.NeverFits(
                $"num_beams {options.NumBeams} needs {options.NumBeams} decoder rows, but a decoder batch holds at most {_options.MaxRows}: ask for at most {_options.MaxRows} beams");
        var needed = DecodingState.KvCacheBytesFor(text, options, encoderLength);
        if (needed <= _options.KvBudgetBytes) return;
        var perToken = DecodingState.KvCacheBytesFor(text, options with { MaxNewTokens = 1 }, encoderLength)
                       - DecodingState.KvCacheBytesFor(text, options with { MaxNewTokens = 0 }, encoderLength);
        var fitting = (_options.KvBudgetBytes - DecodingState.KvCacheBytesFor(text, options with { MaxNewTokens = 0 }, encoderLength)) / perToken;
        var advice = fitting >= 1
            ? $"with {options.NumBeams} beam{(options.NumBeams == 1 ? "" : "s")} at most {fitting} new tokens fit; ask for fewer beams or tokens"
            : "ask for fewer beams or a shorter prompt";
        throw ServingException.NeverFits(
            $"the request needs {Bytes.Format(needed)} of KV cache for {options.NumBeams} beam{(options.NumBeams == 1 ? "" : "s")} × {options.MaxNewTokens} new tokens, " +
            $"but the decoder's whole budget is {Bytes.Format(_options.KvBudgetBytes)}: {advice}");
    }

    /// <summary>
    /// Queues an encoded request; its final tokens stream out as the batch advances, each read carrying every token
    /// decoded since the last one, so a consumer slower than the steps (a gRPC stream) sends fewer, fuller messages.
    /// Takes ownership of <paramref name="state"/> (disposed if it is refused, cancelled or fails).
    /// </summary>
    public IAsyncEnumerable<DecodedTokens> Submit(DecodingState state, CancellationToken cancellation)
    {
        var tokens = Channel.CreateUnbounded<DecodedTokens>(new UnboundedChannelOptions { SingleWriter = true, SingleReader = true });
        var sequence = new Sequence(state, tokens.Writer, cancellation, state.MaxNewTokens > _options.ShortAnswerTokens);
        try
        {
            if (state.Rows > _options.MaxRows || state.KvCacheBytes > _options.KvBudgetBytes)
                throw ServingException.NeverFits(
                    $"the request needs {state.Rows} rows and {Bytes.Format(state.KvCacheBytes)} of KV cache, more than the decoder can ever hold " +
                    $"({_options.MaxRows} rows, {Bytes.Format(_options.KvBudgetBytes)})");
            lock (_gate)
            {
                ObjectDisposedException.ThrowIf(_disposed, this);
                if (_queued >= _options.MaxQueued)
                    throw new QueueFullException($"the decoder is busy ({_options.MaxQueued} requests waiting): try again shortly");
                sequence.Queued = (sequence.IsLong ? _long : _short).AddLast(sequence);
                _queued++;
            }
        }
        catch
        {
            state.Dispose();
            throw;
        }
        // Registered outside the lock: a token already cancelled runs the callback at once, which takes the lock.
        sequence.WhileQueued = cancellation.Register(() => LeaveQueue(sequence));
        _arrived.Release();
        return ReadDecoded(tokens.Reader, cancellation);
    }

    /// <summary>A caller gave up while its request was still waiting: it leaves the queue now, not when admitted.</summary>
    private void LeaveQueue(Sequence sequence)
    {
        lock (_gate)
        {
            if (sequence.Queued is not { } node) return;
            node.List!.Remove(node);
            sequence.Queued = null;
            _queued--;
        }
        sequence.Tokens.TryComplete(new OperationCanceledException(sequence.Cancellation));
        sequence.State.Dispose();
    }

    private static async IAsyncEnumerable<DecodedTokens> ReadDecoded(ChannelReader<DecodedTokens> steps,
        [System.Runtime.CompilerServices.EnumeratorCancellation] CancellationToken cancellation)
    {
        while (await steps.WaitToReadAsync(cancellation))
        {
            var ids = new List<int>();
            var logprobs = new List<TokenLogprob>();
            while (steps.TryRead(out var step))
            {
                ids.AddRange(step.Ids);
                logprobs.AddRange(step.Logprobs);
            }
            // Completion is set as the last step is read from a completed channel: the consumer can end its answer
            // in the same message as its last tokens.
            yield return new DecodedTokens(ids, steps.Completion.IsCompletedSuccessfully, logprobs);
        }
    }

    /// <summary>Moves queued requests into the batch while they fit: the short lane first, then the long one.</summary>
    private void Admit(List<Sequence> active)
    {
        var admitted = new List<Sequence>();
        lock (_gate)
        {
            var rows = active.Sum(s => s.State.Rows);
            var reserved = active.Sum(s => s.State.KvCacheBytes);
            var longRows = active.Where(s => s.IsLong).Sum(s => s.State.Rows);
            var longReserved = active.Where(s => s.IsLong).Sum(s => s.State.KvCacheBytes);
            var longActive = active.Any(s => s.IsLong);
            foreach (var lane in new[] { _short, _long })
            {
                while (lane.First?.Value is { } next && rows + next.State.Rows <= _options.MaxRows
                       && reserved + next.State.KvCacheBytes <= _options.KvBudgetBytes
                       && (!next.IsLong || !longActive || (longRows + next.State.Rows <= _options.LongAnswerShare * _options.MaxRows
                           && longReserved + next.State.KvCacheBytes <= _options.LongAnswerShare * _options.KvBudgetBytes)))
                {
                    lane.RemoveFirst();
                    next.Queued = null;
                    _queued--;
                    admitted.Add(next);
                    rows += next.State.Rows;
                    reserved += next.State.KvCacheBytes;
                    if (!next.IsLong) continue;
                    longActive = true;
                    longRows += next.State.Rows;
                    longReserved += next.State.KvCacheBytes;
                }
            }
        }
        foreach (var sequence in admitted) sequence.WhileQueued.Dispose();
        active.AddRange(admitted);
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
                    _arrived.Wait(stop);
                }
                catch (OperationCanceledException) { break; }
            }
            Admit(active);
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
                if (stepped[i].Count > 0) sequence.Tokens.TryWrite(new DecodedTokens(stepped[i], false, sequence.State.StableLogprobs));
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
            sequence.Tokens.TryComplete(ServingException.Unavailable("the decoder is shutting down"));
            sequence.State.Dispose();
        }
    }

    public async ValueTask DisposeAsync()
    {
        List<Sequence> waiting;
        lock (_gate)
        {
            if (_disposed) return;
            _disposed = true;
            waiting = [.. _short, .. _long];
            _short.Clear();
            _long.Clear();
            _queued = 0;
        }
        await _stop.CancelAsync();
        await Task.Run(_loop.Join);
        foreach (var sequence in waiting)
        {
            sequence.WhileQueued.Dispose();
            sequence.Queued = null;
            sequence.Tokens.TryComplete(ServingException.Unavailable("the decoder is shutting down"));
            sequence.State.Dispose();
        }
        _stop.Dispose();
    }
}

/// <summary>
/// Tokens decoded for one request since its consumer last read; <paramref name="IsLast"/> when nothing follows;
/// their logprobs when the request asked for them (else empty).
/// </summary>
public sealed record DecodedTokens(IReadOnlyList<int> Ids, bool IsLast, IReadOnlyList<TokenLogprob> Logprobs);

/// <summary>The decoder's queue is full; the caller should retry later or elsewhere.</summary>
public sealed class QueueFullException(string message) : ServingException(ErrorKind.Overloaded, message);
