namespace Blip2Mesh.Model.Runtime;

/// <summary>A dense row-major float32 tensor.</summary>
public sealed record FloatTensor(float[] Data, long[] Shape)
{
    public static FloatTensor Zeros(params long[] shape) => new(new float[ElementCount(shape)], shape);

    public static long ElementCount(long[] shape) => shape.Aggregate(1L, (a, b) => a * b);

    public long Dim(int axis) => Shape[axis < 0 ? Shape.Length + axis : axis];

    /// <summary>The contiguous slab of row <paramref name="index"/> along the first axis.</summary>
    public ReadOnlySpan<float> Row(int index)
    {
        var rowSize = checked((int)(Data.Length / Shape[0]));
        return Data.AsSpan(index * rowSize, rowSize);
    }

    /// <summary>Stacks equally shaped [n, …] tensors into one batch (a single tensor is returned as it is).</summary>
    public static FloatTensor Stack(IReadOnlyList<FloatTensor> rows)
    {
        if (rows.Count == 1) return rows[0];
        var rowShape = rows[0].Shape[1..];
        var data = new float[rows.Sum(r => r.Data.Length)];
        var offset = 0;
        foreach (var row in rows)
        {
            if (!row.Shape[1..].SequenceEqual(rowShape)) throw new ArgumentException("rows of a batch must have the same shape");
            row.Data.CopyTo(data, offset);
            offset += row.Data.Length;
        }
        return new FloatTensor(data, [rows.Sum(r => r.Shape[0]), .. rowShape]);
    }

    /// <summary>Rows [start, start+count) along the first axis (the tensor itself when that is all of it).</summary>
    public FloatTensor Slice(int start, int count)
    {
        if (start == 0 && count == Shape[0]) return this;
        var rowSize = checked((int)(Data.Length / Shape[0]));
        return new FloatTensor(Data.AsSpan(start * rowSize, count * rowSize).ToArray(), [count, .. Shape[1..]]);
    }
}
