using Blip2Mesh.Model.Checkpoint;

namespace Blip2Mesh.Model.Quantization;

/// <summary>
/// Quantizes one nn.Linear weight [N, K] (HF's [out, in] layout) into the layout its operator reads:
/// <list type="bullet">
/// <item><see cref="BlockQuantization"/>: ONNX Runtime MatMulNBits' B, uint8 [N, ceil(K / block), block·bits/8]
/// (4-bit: element 2i in the low nibble, 2i+1 in the high one; with no zero_points input the stored value is
/// level + 2^(bits−1)), and float32 scales [N · ceil(K / block)].</item>
/// <item><see cref="ChannelQuantization"/>: MatMulIntegerToFloat's B, int8 [K, N] (transposed), and float32 scales [N].</item>
/// </list>
/// Reads the checkpoint's bytes row by row, so a weight is never widened to float32 as a whole.
/// </summary>
public static class LinearQuantizer
{
    public static long PackedBytes(long rows, long inFeatures, LinearQuantization q) => q switch
    {
        BlockQuantization b => rows * b.BlockCount(inFeatures) * b.BlobBytes,
        _ => rows * inFeatures,
    };

    public static long ScaleCount(long rows, long inFeatures, LinearQuantization q) => q switch
    {
        BlockQuantization b => rows * b.BlockCount(inFeatures),
        _ => rows,
    };

    public static void Quantize(ReadOnlySpan<byte> source, TensorDType dtype, int rows, int inFeatures, LinearQuantization q, Span<byte> packed, Span<float> scales)
    {
        if (source.Length != (long)rows * inFeatures * dtype.Size()) throw new ArgumentException("source size does not match [rows, in_features]");
        if (packed.Length != PackedBytes(rows, inFeatures, q) || scales.Length != ScaleCount(rows, inFeatures, q))
            throw new ArgumentException("output sizes do not match the quantized layout");
        var group = q.GroupSize(inFeatures);
        var groups = (inFeatures + group - 1) / group;
        var row = new float[groups * group];
        var rowBytes = inFeatures * dtype.Size();
        for (var n = 0; n < rows; n++)
        {
            if (!SafetensorsFile.TryWiden(source.Slice(n * rowBytes, rowBytes), dtype, row.AsSpan(0, inFeatures)))
                throw new InvalidDataException($"weight of type {dtype} cannot be quantized: it is not floating-point");
            row.AsSpan(inFeatures).Clear();
            for (var b = 0; b < groups; b++)
            {
                var values = row.AsSpan(b * group, group);
                var scale = MaxAbs(values) / q.MaxLevel;
                scales[n * groups + b] = scale;
                switch (q)
                {
                    case BlockQuantization { Bits: 8 } block:
                        var blob8 = packed.Slice((n * groups + b) * block.BlobBytes, block.BlobBytes);
                        for (var i = 0; i < values.Length; i++) blob8[i] = (byte)(Level(values[i], scale, q) + block.ZeroPoint);
                        break;
                    case BlockQuantization block:
                        var blob4 = packed.Slice((n * groups + b) * block.BlobBytes, block.BlobBytes);
                        for (var i = 0; i < values.Length; i += 2)
                            blob4[i / 2] = (byte)((Level(values[i], scale, q) + block.ZeroPoint) | ((Level(values[i + 1], scale, q) + block.ZeroPoint) << 4));
                        break;
                    case ChannelQuantization:
                        for (var k = 0; k < inFeatures; k++) packed[k * rows + n] = (byte)(sbyte)Level(values[k], scale, q);
                        break;
                }
            }
        }
    }

    /// <summary>round(w / s), clamped to ±max level; 0 for an all-zero group.</summary>
    private static int Level(float w, float scale, LinearQuantization q) =>
        scale == 0 ? 0 : Math.Clamp((int)MathF.Round(w / scale, MidpointRounding.AwayFromZero), -q.MaxLevel, q.MaxLevel);

    private static float MaxAbs(ReadOnlySpan<float> values)
    {
        var max = 0f;
        foreach (var v in values) max = MathF.Max(max, MathF.Abs(v));
        return max;
    }
}
