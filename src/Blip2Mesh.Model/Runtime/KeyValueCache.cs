using Microsoft.ML.OnnxRuntime;

namespace Blip2Mesh.Model.Runtime;

/// <summary>
/// Attention keys and values for a batch of rows, [rows, heads, slots, d_kv] per decoder layer: the decoder's
/// self-attention cache (a row's entries fill its last slots, empty slots in front) or the encoder's cross-attention
/// inputs (entries first, padding behind). Held by ONNX Runtime where they were computed (device memory on CUDA)
/// until a step reads them: they never pass through managed arrays. Shared by the requests whose rows it holds;
/// freed when the last of them lets go.
/// </summary>
public sealed class KeyValueCache : IDisposable
{
    private readonly OrtValue[] _keys;
    private readonly OrtValue[] _values;
    private int _holders;
    private int _disposed;

    internal KeyValueCache(OrtValue[] keys, OrtValue[] values)
    {
        _keys = keys;
        _values = values;
        var shape = keys[0].GetTensorTypeAndShape().Shape;
        Rows = (int)shape[0];
        Slots = shape[2];
    }

    public int Rows { get; }
    public long Slots { get; }

    internal OrtValue Key(int layer) => _keys[layer];
    internal OrtValue Value(int layer) => _values[layer];

    /// <summary>One more request holds rows of this cache.</summary>
    internal void Hold() => Interlocked.Increment(ref _holders);

    /// <summary>A request lets go of its rows; the cache is freed when no request holds any.</summary>
    internal void Release()
    {
        if (Interlocked.Decrement(ref _holders) == 0) Dispose();
    }

    public void Dispose()
    {
        if (Interlocked.Exchange(ref _disposed, 1) == 1) return;
        foreach (var value in _keys.Concat(_values)) value.Dispose();
    }
}
