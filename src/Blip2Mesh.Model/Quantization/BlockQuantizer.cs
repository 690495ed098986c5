using System.Runtime.InteropServices;
using Blip2Mesh.Model.Checkpoint;

namespace Blip2Mesh.Model.Quantization;

/// <summary>
/// Quantizes one nn.Linear weight [N, K] (HF's [out, in] layout) into ONNX Runtime MatMulNBits' layout: B is
/// uint8 [N, ceil(K / block), block·bits/8] (4-bit: element 2i in the low nibble, 2i+1 in the high one), scales are
/// float32 [N · ceil(K / block)], and with no zero_points input the stored value is level + 2^(bits−1).
/// Reads the checkpoint's bytes row by row, so a weight is never widened to float32 as a whole.
/// </summary>
public static class BlockQuantizer
{
    public static long PackedBytes(long rows, long inFeatures, BlockQuantization q) => rows * q.BlockCount(inFeatures) * q.BlobBytes;

    public static void Quantize(ReadOnlySpan<byte> source, TensorDType dtype, int rows, int inFeatures, BlockQuantization q, Span<byte> packed, Span<float> scales)
    {
        var blocks = (int)q.BlockCount(inFeatures);
        if (source.Length != (long)rows * inFeatures * dtype.Size()) throw new ArgumentException("source size does not match [rows, in_features]");
        if (packed.Length != PackedBytes(rows, inFeatures, q) || scales.Length != rows * blocks) throw new ArgumentException("output sizes do not match the quantized layout");
        var row = new float[blocks * q.BlockSize];
        var rowBytes = inFeatures * dtype.Size();
        for (var n = 0; n < rows; n++)
        {
            if (!SafetensorsFile.TryWiden(source.Slice(n * rowBytes, rowBytes), dtype, row.AsSpan(0, inFeatures)))
                throw new InvalidDataException($"weight of type {dtype} cannot be quantized: it is not floating-point");
            row.AsSpan(inFeatures).Clear();
            for (var b = 0; b < blocks; b++)
            {
                var block = row.AsSpan(b * q.BlockSize, q.BlockSize);
                var scale = MaxAbs(block) / q.MaxLevel;
                scales[n * blocks + b] = scale;
                var blob = packed.Slice((n * blocks + b) * q.BlobBytes, q.BlobBytes);
                if (q.Bits == 8)
                {
                    for (var i = 0; i < block.Length; i++) blob[i] = (byte)(Level(block[i], scale, q) + q.ZeroPoint);
                }
                else
                {
                    for (var i = 0; i < block.Length; i += 2)
                        blob[i / 2] = (byte)((Level(block[i], scale, q) + q.ZeroPoint) | ((Level(block[i + 1], scale, q) + q.ZeroPoint) << 4));
                }
            }
        }
    }

    /// <summary>round(w / s), clamped to ±max level; 0 for an all-zero block.</summary>
    private static int Level(float w, float scale, BlockQuantization q) =>
        scale == 0 ? 0 : Math.Clamp((int)MathF.Round(w / scale, MidpointRounding.AwayFromZero), -q.MaxLevel, q.MaxLevel);

    private static float MaxAbs(ReadOnlySpan<float> values)
    {
        var max = 0f;
        foreach (var v in values) max = MathF.Max(max, MathF.Abs(v));
        return max;
    }
}
