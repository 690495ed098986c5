using System.Diagnostics;
using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.InteropServices;
using Blip2Mesh.Model.Checkpoint;
using Blip2Mesh.Model.Onnx.Proto;
using Blip2Mesh.Model.Quantization;
using Blip2Mesh.Model.Runtime;
using Google.Protobuf;
using Microsoft.ML.OnnxRuntime;

namespace Blip2Mesh.Cli;

/// <summary>
/// The floor each bench figure is measured against, on this machine and in this run (the boxes are shared and vary
/// by 2x between sittings, so a floor from another day says nothing): how fast the bench's threads stream memory,
/// how fast ONNX Runtime's own float32 and int8 GEMMs compute on a large product, and, from the checkpoint and the
/// weight scheme, how many bytes and FLOPs each stage run costs. A run's floor is max(bytes ÷ bandwidth, FLOPs ÷ peak).
/// </summary>
internal static class PhysicalFloor
{
    /// <param name="ReadGBps">Reading a 1 GiB buffer once, all threads.</param>
    /// <param name="Float32Gflops">A 512 × 2048 · 2048 × 2048 float32 MatMul.</param>
    /// <param name="Int8Gops">The same product as MatMulIntegerToFloat (uint8 × int8: AMX or VNNI through MLAS).</param>
    public sealed record Machine(double ReadGBps, double Float32Gflops, double Int8Gops);

    /// <summary>What one run of a stage must at least move and compute.</summary>
    public sealed record Cost(double WeightBytes, double Float32Flops, double Int8Flops)
    {
        public double Milliseconds(Machine m) =>
            1e3 * Math.Max(WeightBytes / (m.ReadGBps * 1e9), Float32Flops / (m.Float32Gflops * 1e9) + Int8Flops / (m.Int8Gops * 1e9));

        public static Cost operator +(Cost a, Cost b) => new(a.WeightBytes + b.WeightBytes, a.Float32Flops + b.Float32Flops, a.Int8Flops + b.Int8Flops);
    }

    public sealed record ModelCosts(Cost Image, Cost EncoderRun, Cost DecodeStep);

    public static Machine Measure(int threads) => new(ReadBandwidth(threads), GemmPeak(int8: false, threads), GemmPeak(int8: true, threads));

    private static double ReadBandwidth(int threads)
    {
        var buffer = GC.AllocateUninitializedArray<float>(1 << 28);
        Array.Fill(buffer, 1f);
        var best = 0.0;
        for (var pass = 0; pass < 4; pass++)
        {
            var watch = Stopwatch.StartNew();
            var workers = Enumerable.Range(0, threads).Select(t => new Thread(() => Sum(buffer.AsSpan(buffer.Length / threads * t, buffer.Length / threads)))).ToList();
            workers.ForEach(w => w.Start());
            workers.ForEach(w => w.Join());
            best = Math.Max(best, buffer.Length * 4.0 / watch.Elapsed.TotalSeconds / 1e9);
        }
        return best;
    }

    /// <summary>Reads every value once, eight independent 512-bit sums so the loads, not the adds, set the pace.</summary>
    private static float Sum(ReadOnlySpan<float> values)
    {
        var vectors = MemoryMarshal.Cast<float, Vector512<float>>(values);
        ref var v = ref MemoryMarshal.GetReference(vectors);
        Vector512<float> a = default, b = default, c = default, d = default, e = default, f = default, g = default, h = default;
        for (nint i = 0; i + 7 < vectors.Length; i += 8)
        {
            a += Unsafe.Add(ref v, i); b += Unsafe.Add(ref v, i + 1); c += Unsafe.Add(ref v, i + 2); d += Unsafe.Add(ref v, i + 3);
            e += Unsafe.Add(ref v, i + 4); f += Unsafe.Add(ref v, i + 5); g += Unsafe.Add(ref v, i + 6); h += Unsafe.Add(ref v, i + 7);
        }
        return Vector512.Sum(a + b + c + d + e + f + g + h);
    }

    private static double GemmPeak(bool int8, int threads)
    {
        const int m = 512, k = 2048, n = 2048;
        var graph = new GraphProto { Name = "peak" };
        graph.Input.Add(Tensor("x", int8 ? TensorProto.Types.DataType.Uint8 : TensorProto.Types.DataType.Float, m, k));
        graph.Output.Add(Tensor("y", TensorProto.Types.DataType.Float, m, n));
        var node = new NodeProto { Name = "gemm", OpType = int8 ? "MatMulIntegerToFloat" : "MatMul", Domain = int8 ? "com.microsoft" : "" };
        node.Output.Add("y");
        var random = new Random(1);
        if (int8)
        {
            var b = new byte[k * n];
            random.NextBytes(b);
            graph.Initializer.Add(Initializer("b", TensorProto.Types.DataType.Int8, b, k, n));
            graph.Initializer.Add(Initializer("one", TensorProto.Types.DataType.Float, BitConverter.GetBytes(1f)));
            graph.Initializer.Add(Initializer("scales", TensorProto.Types.DataType.Float, MemoryMarshal.AsBytes(Enumerable.Repeat(0.01f, n).ToArray().AsSpan()).ToArray(), n));
            graph.Initializer.Add(Initializer("offset", TensorProto.Types.DataType.Uint8, [128]));
            node.Input.AddRange(["x", "b", "one", "scales", "offset"]);
        }
        else
        {
            var b = Enumerable.Range(0, k * n).Select(_ => (float)random.NextDouble() - 0.5f).ToArray();
            graph.Initializer.Add(Initializer("b", TensorProto.Types.DataType.Float, MemoryMarshal.AsBytes(b.AsSpan()).ToArray(), k, n));
            node.Input.AddRange(["x", "b"]);
        }
        graph.Node.Add(node);
        var model = new ModelProto { IrVersion = 8, Graph = graph };
        model.OpsetImport.Add(new OperatorSetIdProto { Domain = "", Version = 17 });
        model.OpsetImport.Add(new OperatorSetIdProto { Domain = "com.microsoft", Version = 1 });

        using var options = new SessionOptions { IntraOpNumThreads = threads };
        using var session = new InferenceSession(model.ToByteArray(), options);
        using var input = int8
            ? OrtValue.CreateTensorValueFromMemory(Enumerable.Range(0, m * k).Select(i => (byte)i).ToArray(), [m, k])
            : OrtValue.CreateTensorValueFromMemory(Enumerable.Range(0, m * k).Select(i => (float)Math.Sin(i)).ToArray(), [m, k]);
        var best = double.MaxValue;
        for (var run = 0; run < 7; run++)
        {
            var watch = Stopwatch.StartNew();
            using var outputs = session.Run(new RunOptions(), ["x"], [input], ["y"]);
            if (run >= 2) best = Math.Min(best, watch.Elapsed.TotalSeconds);
        }
        return 2.0 * m * n * k / best / 1e9;
    }

    private static ValueInfoProto Tensor(string name, TensorProto.Types.DataType type, params long[] dims)
    {
        var shape = new TensorShapeProto();
        foreach (var d in dims) shape.Dim.Add(new TensorShapeProto.Types.Dimension { DimValue = d });
        return new ValueInfoProto { Name = name, Type = new TypeProto { TensorType = new TypeProto.Types.Tensor { ElemType = (int)type, Shape = shape } } };
    }

    private static TensorProto Initializer(string name, TensorProto.Types.DataType type, byte[] raw, params long[] dims)
    {
        var tensor = new TensorProto { Name = name, DataType = (int)type, RawData = ByteString.CopyFrom(raw) };
        tensor.Dims.AddRange(dims);
        return tensor;
    }

    /// <summary>
    /// Bytes and FLOPs per image, per T5 encoder run (queries + <paramref name="promptTokens"/> rows) and per decode
    /// step at one row, from every Linear weight of the checkpoint as the scheme holds it (exact: float32, 4 bytes,
    /// as float16 checkpoints are widened; blocks: bits/8 + 4/block; per channel: 1 + 4/in). Quantized Linears
    /// compute in int8, the rest (attention's products, the patch convolution) in float32; norms and activations are
    /// left out, so the floor is a lower bound.
    /// </summary>
    public static ModelCosts Model(Blip2Checkpoint checkpoint, WeightScheme scheme, ExecutionDevice device, int promptTokens)
    {
        var c = checkpoint.Config;
        long tokens = (long)c.Vision.PatchesPerSide * c.Vision.PatchesPerSide + 1, queries = c.NumQueryTokens, encoderRows = queries + promptTokens;
        var inner = (long)c.Text.NumHeads * c.Text.DKv;
        var image = new Cost(0, 2.0 * (tokens - 1) * 3 * c.Vision.PatchSize * c.Vision.PatchSize * c.Vision.HiddenSize
            + c.Vision.NumHiddenLayers * 4.0 * tokens * tokens * c.Vision.HiddenSize
            + c.QFormer.NumHiddenLayers * 4.0 * queries * queries * c.QFormer.HiddenSize
            + (c.QFormer.NumHiddenLayers + c.QFormer.CrossAttentionFrequency - 1) / c.QFormer.CrossAttentionFrequency * 4.0 * queries * tokens * c.QFormer.HiddenSize, 0);
        var encoder = new Cost(0, c.Text.NumLayers * 4.0 * encoderRows * encoderRows * inner, 0);
        var step = new Cost(0, c.Text.NumDecoderLayers * 4.0 * encoderRows * inner, 0);
        var lmHead = c.Text.TieWordEmbeddings ? "language_model.shared.weight" : "language_model.lm_head.weight";
        foreach (var (name, weight) in checkpoint.Weights)
        {
            var shape = weight.Entry.Shape;
            if (shape.Length != 2 || !name.EndsWith(".weight", StringComparison.Ordinal) || name.Contains("relative_attention_bias", StringComparison.Ordinal)
                || name.Contains("embed", StringComparison.Ordinal) || (name == "language_model.shared.weight" && name != lmHead)) continue;
            var (stage, rows) = name switch
            {
                _ when name.StartsWith("vision_model.", StringComparison.Ordinal) => (WeightStage.Vision, tokens),
                _ when name.Contains(".crossattention.attention.key.", StringComparison.Ordinal) || name.Contains(".crossattention.attention.value.", StringComparison.Ordinal)
                    => (WeightStage.QFormer, tokens),
                _ when name.StartsWith("qformer.", StringComparison.Ordinal) || name.StartsWith("language_projection.", StringComparison.Ordinal) => (WeightStage.QFormer, queries),
                // The decoder's cross-attention keys and values are computed once per request, in the encoder's run.
                _ when name.StartsWith("language_model.encoder.", StringComparison.Ordinal) || name.Contains(".EncDecAttention.k.", StringComparison.Ordinal)
                    || name.Contains(".EncDecAttention.v.", StringComparison.Ordinal) => (WeightStage.Encoder, encoderRows),
                _ => (WeightStage.Decoder, 1L),
            };
            long outFeatures = shape[0], inFeatures = shape[1];
            var form = scheme.For(stage, name, device);
            var bytesPerWeight = form switch
            {
                BlockQuantization b => b.Bits / 8.0 + 4.0 / b.BlockSize,
                ChannelQuantization => 1 + 4.0 / inFeatures,
                _ => 4.0,
            };
            var flops = 2.0 * rows * outFeatures * inFeatures;
            var cost = new Cost(bytesPerWeight * outFeatures * inFeatures, form is null ? flops : 0, form is null ? 0 : flops);
            switch (stage)
            {
                case WeightStage.Vision or WeightStage.QFormer: image += cost; break;
                case WeightStage.Encoder: encoder += cost; break;
                default: step += cost; break;
            }
        }
        return new ModelCosts(image, encoder, step);
    }
}
