using Blip2Mesh.Model.Runtime;

namespace Blip2Mesh.Gateway;

/// <summary>
/// In-process cache of projected query embeddings, bounded by bytes with least-recently-used eviction.
/// Concurrent requests for the same missing key share one computation.
/// </summary>
public sealed class EmbeddingCache(long capacityBytes)
{
    private readonly object _lock = new();
    private readonly Dictionary<string, LinkedListNode<(string Key, FloatTensor Value)>> _entries = new(StringComparer.Ordinal);
    private readonly LinkedList<(string Key, FloatTensor Value)> _recency = new();
    private readonly Dictionary<string, Task<FloatTensor>> _inFlight = new(StringComparer.Ordinal);
    private long _bytes;

    public long Bytes { get { lock (_lock) return _bytes; } }
    public int Count { get { lock (_lock) return _entries.Count; } }

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
    /// computation belongs to no caller: one giving up (<paramref name="cancellation"/>) stops waiting, not the others.
    /// </summary>
    public async Task<(FloatTensor Value, bool Hit)> GetOrComputeAsync(string key, Func<Task<FloatTensor>> compute, CancellationToken cancellation)
    {
        Task<FloatTensor> task;
        bool owner;
        lock (_lock)
        {
            if (_entries.TryGetValue(key, out var node))
            {
                _recency.Remove(node);
                _recency.AddFirst(node);
                return (node.Value.Value, true);
            }
            owner = !_inFlight.TryGetValue(key, out task!);
            if (owner)
            {
                task = ComputeAndStoreAsync(key, compute);
                _inFlight[key] = task;
            }
        }
        return (await task.WaitAsync(cancellation), !owner);
    }

    private async Task<FloatTensor> ComputeAndStoreAsync(string key, Func<Task<FloatTensor>> compute)
    {
        try
        {
            var value = await compute();
            Add(key, value);
            return value;
        }
        finally
        {
            lock (_lock) _inFlight.Remove(key);
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
