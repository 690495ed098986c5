using System.Text.Json;

namespace Blip2Mesh.Model.Checkpoint;

/// <summary>A tensor to write: raw little-endian bytes with their dtype and shape.</summary>
public sealed record TensorToWrite(string Name, TensorDType DType, long[] Shape, ReadOnlyMemory<byte> Data);

public static class SafetensorsWriter
{
    /// <summary>Writes tensors in the order given, header padded to 8 bytes as the reference implementation does.</summary>
    public static void Write(string path, IReadOnlyList<TensorToWrite> tensors, IReadOnlyDictionary<string, string>? metadata = null)
    {
        var header = new Dictionary<string, object>();
        if (metadata is { Count: > 0 }) header["__metadata__"] = metadata;
        long offset = 0;
        foreach (var t in tensors)
        {
            var expected = t.Shape.Aggregate(1L, (a, b) => a * b) * t.DType.Size();
            if (expected != t.Data.Length)
                throw new ArgumentException($"tensor '{t.Name}': {t.Data.Length} bytes do not match shape [{string.Join(",", t.Shape)}] of {t.DType}");
            header[t.Name] = new { dtype = t.DType.SafetensorsName(), shape = t.Shape, data_offsets = new[] { offset, offset + t.Data.Length } };
            offset += t.Data.Length;
        }
        var json = JsonSerializer.SerializeToUtf8Bytes(header);
        var padded = (json.Length + 7) / 8 * 8;
        using var stream = File.Create(path);
        stream.Write(BitConverter.GetBytes((long)padded));
        stream.Write(json);
        for (var i = json.Length; i < padded; i++) stream.WriteByte((byte)' ');
        foreach (var t in tensors) stream.Write(t.Data.Span);
    }
}
