using Blip2Mesh.Model.Runtime;

namespace Blip2Mesh.Gateway;

/// <summary>
/// In-process cache of projected query embeddings, bounded by bytes with least-recently-used eviction.
/// Concurrent requests for the same missing key share one computation, which runs outside the cache's lock (a
/// lookup never waits for anybody's image) and is cancelled once nobody waits for it any more.
/// </summary>
public sealed class EmbeddingCache(long capacityBytes)
{
    private readonly Lock _lock = new();
    private readonly Dictionary<string, LinkedListNode<(string Key, FloatTensor Value)>> _entries = new(StringComparer.Ordinal);
    private readonly LinkedList<(string Key, FloatTensor Value)> _recency = new();
    private readonly Dictionary<string, Computation> _inFlight = new(StringComparer.Ordinal);
    private long _bytes;

    /// <summary>One computation of a missing key and the requests waiting for it.</summary>
    private sealed class Computation
    {
        public TaskCompletionSource<FloatTensor> Result { get; } = new(TaskCreationOptions.RunContinuationsAsynchronously);
        public CancellationTokenSource Abandoned { get; } = new();
        public int Waiters;
    }

    public bool TryGet(string key, out FloatTensor value)
    {
        lock (_lock)
        {
            if (_entries.TryGetValue(key, out var node))
            {
                _recency.Remove(node);
                _recency.AddFirst(node);
                value = node.Value.Value;
                return true;
            }
        }
        value = null!;
        return false;
    }

    /// <summary>
    /// The cached value, or the one <paramref name="compute"/> produces, once however many ask at once. The
    /// computation belongs to no caller: one giving up (<paramref name="cancellation"/>) stops waiting, not the others;
    /// when the last waiter gives up, the token given to <paramref name="compute"/> is cancelled.
    /// </summary>
    public async Task<(FloatTensor Value, bool Hit)> GetOrComputeAsync(string key, Func<CancellationToken, Task<FloatTensor>> compute, CancellationToken cancellation)
    {
        Computation computation;
        bool owner;
        lock (_lock)
        {
            if (_entries.TryGetValue(key, out var node))
            {
                _recency.Remove(node);
                _recency.AddFirst(node);
                return (node.Value.Value, true);
            }
            owner = !_inFlight.TryGetValue(key, out computation!);
            if (owner) _inFlight[key] = computation = new Computation();
            computation.Waiters++;
        }
        // Started outside the lock and off the caller's thread: decoding an image can take seconds of CPU.
        if (owner) _ = Task.Run(() => ComputeAndStoreAsync(key, computation, compute));
        try
        {
            return (await computation.Result.Task.WaitAsync(cancellation), !owner);
        }
        finally
        {
            Leave(key, computation);
        }
    }

    private void Leave(string key, Computation computation)
    {
        lock (_lock)
        {
            if (--computation.Waiters > 0 || computation.Result.Task.IsCompleted) return;
            // Nobody waits any more: the next request for this key starts afresh rather than joining a cancelled run.
            if (_inFlight.GetValueOrDefault(key) == computation) _inFlight.Remove(key);
        }
        computation.Abandoned.Cancel();
    }

    private async Task ComputeAndStoreAsync(string key, Computation computation, Func<CancellationToken, Task<FloatTensor>> compute)
    {
        try
        {
            var value = await compute(computation.Abandoned.Token);
            Add(key, value);
            computation.Result.TrySetResult(value);
        }
        catch (Exception e)
        {
            computation.Result.TrySetException(e);
        }
        finally
        {
            lock (_lock)
                if (_inFlight.GetValueOrDefault(key) == computation) _inFlight.Remove(key);
        }
    }

    public void Add(string key, FloatTensor value)
    {
        var size = (long)value.Data.Length * sizeof(float);
        if (size > capacityBytes) return;
        lock (_lock)
        {
            if (_entries.ContainsKey(key)) return;
            _entries[key] = _recency.AddFirst((key, value));
            _bytes += size;
            while (_bytes > capacityBytes && _recency.Last is { } last)
            {
                _recency.RemoveLast();
                _entries.Remove(last.Value.Key);
                _bytes -= (long)last.Value.Value.Data.Length * sizeof(float);
            }
        }
    }
}
