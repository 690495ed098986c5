using Blip2Mesh.Model.Checkpoint;
using Blip2Mesh.Model.Onnx;
using Blip2Mesh.Model.Pipeline;
using Blip2Mesh.Model.Quantization;
using Blip2Mesh.Model.Runtime;
using Xunit.Abstractions;
using DataType = Blip2Mesh.Model.Onnx.Proto.TensorProto.Types.DataType;

namespace Blip2Mesh.Tests;

/// <summary>A fresh quantized-weight cache folder per test class, removed afterwards.</summary>
public sealed class TemporaryCache : IDisposable
{
    public string Root { get; } = Path.Combine(Path.GetTempPath(), $"blip2mesh-qcache-{Guid.NewGuid():N}");
    public void Dispose() { if (Directory.Exists(Root)) Directory.Delete(Root, recursive: true); }
}

public sealed class WeightSchemeTests
{
    [Fact]
    public void ParsesWholeModelAndPerStageSchemes()
    {
        Assert.True(WeightScheme.Parse("auto").IsExact);
        Assert.Equal("auto (exact)", WeightScheme.Parse("auto").Label);
        var int8 = WeightScheme.Parse("int8");
        Assert.Equal("int8 (approximate)", int8.Label);
        Assert.All(Enum.GetValues<WeightStage>(), s => Assert.Equal(BlockQuantization.Int8, int8.For(s)));
        var mixed = WeightScheme.Parse("vision=int8,decoder=int4");
        Assert.Equal(BlockQuantization.Int8, mixed.For(WeightStage.Vision));
        Assert.Null(mixed.For(WeightStage.QFormer));
        Assert.Equal(BlockQuantization.Int4, mixed.For(WeightStage.Decoder));
        Assert.Equal("vision=int8,qformer=exact,encoder=exact,decoder=int4 (approximate)", mixed.Label);
        Assert.Equal(WeightScheme.Parse("int4"), WeightScheme.Parse("vision=int4,qformer=int4,encoder=int4,decoder=int4"));
    }

    [Fact]
    public void OnlyTheDecodersFeedForwardOutputAndTheLmHeadStayExact()
    {
        var int4 = WeightScheme.Parse("int4");
        Assert.Null(int4.For(WeightStage.Decoder, "language_model.decoder.block.3.layer.2.DenseReluDense.wo.weight"));
        Assert.Null(int4.For(WeightStage.Decoder, "language_model.lm_head.weight"));
        Assert.Equal(BlockQuantization.Int4, int4.For(WeightStage.Encoder, "language_model.encoder.block.3.layer.1.DenseReluDense.wo.weight"));
        Assert.Equal(BlockQuantization.DecoderInt4, int4.For(WeightStage.Decoder, "language_model.decoder.block.3.layer.2.DenseReluDense.wi_0.weight"));
        // int8: per output channel where a run multiplies many rows, blocks in the decoder.
        var int8 = WeightScheme.Parse("int8");
        Assert.Equal(ChannelQuantization.Int8, int8.For(WeightStage.Vision, "vision_model.encoder.layers.0.mlp.fc1.weight"));
        Assert.Equal(ChannelQuantization.Int8, int8.For(WeightStage.Encoder, "language_model.encoder.block.3.layer.1.DenseReluDense.wo.weight"));
        Assert.Equal(BlockQuantization.DecoderInt8, int8.For(WeightStage.Decoder, "language_model.decoder.block.3.layer.2.DenseReluDense.wi_0.weight"));
        Assert.Equal(BlockQuantization.Int8, int8.For(WeightStage.Vision, "vision_model.encoder.layers.0.mlp.fc1.weight", ExecutionDevice.Cuda));
    }

    /// <summary>"int8" (blocks of 32), "int4" (blocks of 128), "int8 blocks of 128" or "int8 per channel".</summary>
    internal static LinearQuantization Form(string name) => name switch
    {
        "int8" => BlockQuantization.Int8,
        "int4" => BlockQuantization.Int4,
        "int8 per channel" => ChannelQuantization.Int8,
        "int8 blocks of 128" => BlockQuantization.DecoderInt8,
        _ => throw new ArgumentException(name),
    };

    [Theory]
    [InlineData("int3")]
    [InlineData("decoder=int5")]
    [InlineData("lm=int8")]
    public void RejectsUnknownSchemesWithASentence(string value)
    {
        var e = Assert.Throws<ArgumentException>(() => WeightScheme.Parse(value));
        Assert.Contains($"'", e.Message);
        Assert.DoesNotContain("Exception", e.Message);
    }
}

/// <summary>
/// Quantized Linears against float32 with bounds derived from the scheme. Each weight moves by at most s/2, s the
/// scale of its block (max |w| / (2^(bits−1) − 1)), so an output element of x·Wᵀ moves by at most
/// Σ_blocks s_b/2 · Σ_{k in b} |x_k|, plus float32 rounding of the exact sum.
/// </summary>
public sealed class QuantizedLinearTests(ITestOutputHelper output) : IDisposable
{
    private readonly TemporaryCache _cache = new();

    public void Dispose() => _cache.Dispose();

    public static TheoryData<string, string> Linears() => new()
    {
        { "vision_model.encoder.layers.0.self_attn.qkv.weight", "int8" }, { "vision_model.encoder.layers.0.self_attn.qkv.weight", "int4" },
        { "vision_model.encoder.layers.0.self_attn.qkv.weight", "int8 per channel" },
        { "vision_model.encoder.layers.0.mlp.fc2.weight", "int8" }, { "vision_model.encoder.layers.0.mlp.fc2.weight", "int4" },
        { "vision_model.encoder.layers.0.mlp.fc2.weight", "int8 per channel" },
        { "qformer.encoder.layer.0.crossattention.attention.key.weight", "int4" },
        { "qformer.encoder.layer.0.crossattention.attention.key.weight", "int8 per channel" },
        { "language_projection.weight", "int8" },
        { "language_model.encoder.block.0.layer.1.DenseReluDense.wo.weight", "int4" },
        { "language_model.encoder.block.0.layer.1.DenseReluDense.wo.weight", "int8 per channel" },
        { "language_model.lm_head.weight", "int4" },
        { "language_model.lm_head.weight", "int8" },
        { "language_model.decoder.block.0.layer.0.SelfAttention.q.weight", "int8" },
        { "language_model.decoder.block.0.layer.2.DenseReluDense.wo.weight", "int8" },
        { "language_model.decoder.block.0.layer.2.DenseReluDense.wi_0.weight", "int8 blocks of 128" },
    };

    [Theory]
    [MemberData(nameof(Linears))]
    public void EveryOutputStaysWithinTheGroupErrorBound(string weightName, string form)
    {
        using var checkpoint = Blip2Checkpoint.Open(Fixtures.TinyA);
        var q = WeightSchemeTests.Form(form);
        var entry = checkpoint.Weights[weightName].Entry;
        int n = (int)entry.Shape[0], k = (int)entry.Shape[1], rows = 1;
        var w = checkpoint.Weights[weightName].File.ReadFloat32(entry);

        var source = new QuantizedWeightSource(checkpoint, _cache.Root);
        // float32 compute, so the output is exactly x·dequantized(W)ᵀ and the weight bound is the whole error.
        var g = new OnnxGraphBuilder(source, "linear", _ => q, QuantizedCompute.Float32);
        var x = g.Input("x", DataType.Float, rows, k);
        g.Output(g.MatMulTransposed("/linear", x, weightName, n, k), "y", DataType.Float, rows, n);
        using var session = new StageSession("linear", g.Build(), checkpoint, source.ExternalDataFolder, new ExecutionOptions());

        var random = new Random(q.Bits * 1000 + k);
        var input = Enumerable.Range(0, rows * k).Select(_ => (float)(random.NextDouble() * 4 - 2)).ToArray();
        using var value = Microsoft.ML.OnnxRuntime.OrtValue.CreateTensorValueFromMemory(input, [rows, k]);
        using var outputs = session.Run(new Dictionary<string, Microsoft.ML.OnnxRuntime.OrtValue> { ["x"] = value });
        var actual = outputs[0].GetTensorDataAsSpan<float>().ToArray();

        var worstShare = 0.0;
        for (var r = 0; r < rows; r++)
        {
            for (var o = 0; o < n; o++)
            {
                double exact = 0, magnitude = 0, bound = 0, dequantized = 0;
                var group = q.GroupSize(k);
                for (var b = 0; b * group < k; b++)
                {
                    var block = Enumerable.Range(b * group, Math.Min(group, k - b * group)).ToList();
                    var scale = block.Max(i => Math.Abs(w[o * k + i])) / q.MaxLevel;
                    bound += scale / 2 * block.Sum(i => Math.Abs(input[r * k + i]));
                    if (scale > 0)
                        dequantized += block.Sum(i => input[r * k + i] * Math.Round(w[o * k + i] / scale, MidpointRounding.AwayFromZero) * scale);
                }
                for (var i = 0; i < k; i++)
                {
                    exact += (double)input[r * k + i] * w[o * k + i];
                    magnitude += Math.Abs((double)input[r * k + i] * w[o * k + i]);
                }
                // float32 accumulation of k products, and of the scales' own rounding.
                var limit = bound * (1 + 1e-5) + magnitude * k * 6e-8;
                var error = Math.Abs(actual[r * n + o] - exact);
                Assert.True(error <= limit, $"{weightName} {form} row {r} output {o}: |error| {error} exceeds the bound {limit}");
                // And it is the product with the dequantized weights (float32 compute, activations not quantized).
                Assert.True(Math.Abs(actual[r * n + o] - dequantized) <= magnitude * k * 6e-8 + bound * 1e-5,
                    $"{weightName} {form} row {r} output {o}: {actual[r * n + o]} is not x·dequantized(W)ᵀ = {dequantized}");
                if (limit > 0) worstShare = Math.Max(worstShare, error / limit);
            }
        }
        output.WriteLine($"{weightName} {form}: worst error is {worstShare:P1} of its bound");
    }
}

public sealed class RowQuantizedLinearTests : IDisposable
{
    private const string Weight = "vision_model.encoder.layers.0.mlp.fc2.weight";
    private readonly TemporaryCache _cache = new();

    public void Dispose() => _cache.Dispose();

    /// <summary>
    /// The per-channel form with int8 activations: each row is rounded to int8 with its own scale, multiplied in
    /// integers and scaled back, so every output is s_r · s_n · Σ_k round(x_rk / s_r) · q_kn exactly, and a row's
    /// result is the same whatever rows share its run (here: one 1000x larger, one all zero).
    /// </summary>
    [Fact]
    public void EachRowIsRoundedWithItsOwnScaleAndMultipliedInIntegers()
    {
        using var checkpoint = Blip2Checkpoint.Open(Fixtures.TinyA);
        var source = new QuantizedWeightSource(checkpoint, _cache.Root);
        var shape = checkpoint.Weights[Weight].Entry.Shape;
        int n = (int)shape[0], k = (int)shape[1];
        var location = source.DescribeQuantized(Weight, n, k, ChannelQuantization.Int8);
        var file = File.ReadAllBytes(Path.Combine(source.ExternalDataFolder, location.Location));
        var levels = file.AsSpan(0, (int)location.PackedLength).ToArray().Select(b => (int)(sbyte)b).ToArray();
        var columnScales = System.Runtime.InteropServices.MemoryMarshal.Cast<byte, float>(file.AsSpan((int)location.ScalesOffset, (int)location.ScalesLength)).ToArray();

        var random = new Random(7);
        var first = Enumerable.Range(0, k).Select(_ => (float)(random.NextDouble() * 4 - 2)).ToArray();
        float[] rows = [.. first, .. first.Select(v => v * 1000), .. new float[k]];
        var batched = Run(source, checkpoint, rows, 3, n, k);
        var alone = Run(source, checkpoint, first, 1, n, k);
        Assert.Equal(alone, batched[..n]);
        for (var r = 0; r < 3; r++)
        {
            var x = rows.AsSpan(r * k, k);
            var rowScale = MathF.Max(x.ToArray().Max(MathF.Abs), 1e-30f) * (1f / 127);
            for (var o = 0; o < n; o++)
            {
                long sum = 0;
                for (var i = 0; i < k; i++) sum += (long)MathF.Round(x[i] / rowScale, MidpointRounding.ToEven) * levels[i * n + o];
                var expected = sum * columnScales[o] * rowScale;
                Assert.True(Math.Abs(batched[r * n + o] - expected) <= 1e-6 * Math.Abs(expected) + 1e-30,
                    $"row {r} output {o}: {batched[r * n + o]}, expected s_r·s_n·Σ levels = {expected}");
            }
        }
    }

    private static float[] Run(QuantizedWeightSource source, Blip2Checkpoint checkpoint, float[] input, int rows, int n, int k)
    {
        var g = new OnnxGraphBuilder(source, "linear", _ => ChannelQuantization.Int8, QuantizedCompute.Int8);
        var x = g.Input("x", DataType.Float, "rows", k);
        g.Output(g.MatMulTransposed("/linear", x, Weight, n, k), "y", DataType.Float, "rows", n);
        using var session = new StageSession("linear", g.Build(), checkpoint, source.ExternalDataFolder, new ExecutionOptions());
        using var value = Microsoft.ML.OnnxRuntime.OrtValue.CreateTensorValueFromMemory(input, [rows, k]);
        using var outputs = session.Run(new Dictionary<string, Microsoft.ML.OnnxRuntime.OrtValue> { ["x"] = value });
        return outputs[0].GetTensorDataAsSpan<float>().ToArray();
    }
}

/// <summary>
/// Accuracy measured on the demo model's dev set (100 images, 6 prompts each, HF float32 greedy answers): int8
/// answers equal float32's on at least 97% of cases, int4 on at least 90%. Task accuracy (answers equal to the
/// scene's ground truth) is reported beside float32's.
/// </summary>
public sealed class QuantizedDemoAccuracyTests(ITestOutputHelper output) : IDisposable
{
    private readonly TemporaryCache _cache = new();

    public void Dispose() => _cache.Dispose();

    [Theory]
    [InlineData("int8", 0.97)]
    [InlineData("int4", 0.90)]
    public void DevSetAnswersAgreeWithFloat32(string scheme, double requiredAgreement)
    {
        using var pipeline = Blip2Pipeline.Load(Fixtures.Demo, new ExecutionOptions { Weights = WeightScheme.Parse(scheme), WeightCache = _cache.Root });
        int cases = 0, agree = 0, tasks = 0, correct = 0, referenceCorrect = 0;
        var disagreements = new List<string>();
        foreach (var (file, results) in DemoReferences.Sets["dev"])
        {
            var queries = pipeline.EmbedImage(File.ReadAllBytes(results[0].Image));
            foreach (var expected in results)
            {
                var text = pipeline.Generate(queries, expected.Prompt, DemoReferences.Options).Last().Final!.Text.Trim();
                cases++;
                if (text == expected.OutputText) agree++;
                else disagreements.Add($"{expected}: float32 '{expected.OutputText}', {scheme} '{text}'");
                if (expected.Target is null) continue;
                tasks++;
                if (text == expected.Target) correct++;
                if (expected.OutputText == expected.Target) referenceCorrect++;
            }
        }
        var agreement = (double)agree / cases;
        output.WriteLine($"{scheme}: {agree}/{cases} = {agreement:P1} answers equal float32's; task accuracy {correct}/{tasks} = {(double)correct / tasks:P1} (float32 {referenceCorrect}/{tasks} = {(double)referenceCorrect / tasks:P1})");
        foreach (var line in disagreements.Take(20)) output.WriteLine(line);
        Assert.True(agreement >= requiredAgreement, $"{scheme}: {agreement:P1} of answers equal float32's, below {requiredAgreement:P0}");
    }
}

/// <summary>
/// Each stage of the tiny reference checkpoints with quantized Linears against the same stage with exact weights,
/// fed the same reference input, with float32 compute so that the weights' rounding is the only error (served on CPU,
/// the activations are rounded to int8 too: the demo accuracy test measures that path). The bound is a first-order estimate from the scheme, not a worst case: each
/// quantized Linear perturbs its output by about ‖ΔW‖_F / ‖W‖_F relative (ΔW the scheme's rounding of the
/// checkpoint's weights, each entry within s/2 of its block), and to first order these add up along the stage, whose
/// norms keep the scale of the residual stream, so the output's relative RMS error stays below their sum.
/// (The worst-case per-output bound is checked exactly, Linear by Linear, in <see cref="QuantizedLinearTests"/>.)
/// </summary>
public sealed class QuantizedStageErrorTests(ITestOutputHelper output) : IDisposable
{
    private readonly TemporaryCache _cache = new();

    public void Dispose() => _cache.Dispose();

    public static TheoryData<string, int> Cases()
    {
        var data = new TheoryData<string, int>();
        foreach (var checkpoint in Fixtures.ReferenceCheckpoints) { data.Add(checkpoint, 8); data.Add(checkpoint, 4); }
        return data;
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void EveryStageStaysWithinTheFirstOrderBound(string checkpoint, int bits)
    {
        var q = bits == 8 ? BlockQuantization.Int8 : BlockQuantization.Int4;
        var exact = Fixtures.Pipeline(checkpoint).Model;
        using var quantized = Blip2Model.Load(Fixtures.CheckpointDir(checkpoint), new PixelInput.Rgb8(null, null, null),
            new ExecutionOptions { Weights = WeightScheme.All(q), WeightCache = _cache.Root, QuantizedCompute = QuantizedCompute.Float32 });
        var references = Fixtures.Tensors(checkpoint);
        var prompt = Fixtures.Prompt(checkpoint, 0, 0);
        var pixels = Fixtures.ReadTensor(references, "img0/pixel_values");
        var imageEmbeds = Fixtures.ReadTensor(references, "img0/vision_last_hidden_state");
        var queries = Fixtures.ReadTensor(references, "img0/language_projection");
        int[] ids = Fixtures.Ints(prompt.GetProperty("input_ids"));

        // The decoder step runs on the exact encoder's output (its cross-attention keys/values included), so each
        // stage's error is its own Linears' alone.
        var encoded = exact.Encode(queries, [ids]);
        var stages = new (string Name, Func<string, bool> Owns, Func<Blip2Model, FloatTensor> Run)[]
        {
            ("vision", n => n.StartsWith("vision_model.", StringComparison.Ordinal), m => m.EmbedPixelValues(pixels)),
            ("qformer", n => n.StartsWith("qformer.", StringComparison.Ordinal) || n.StartsWith("language_projection.", StringComparison.Ordinal),
                m => m.RunQFormer(imageEmbeds).QueryEmbeds),
            ("encoder", n => n.StartsWith("language_model.encoder.", StringComparison.Ordinal), m => m.Encode(queries, [ids], hiddenStates: true).LastHiddenState!),
            ("decoder", n => n.StartsWith("language_model.decoder.", StringComparison.Ordinal) && !n.Contains(".EncDecAttention.k.") && !n.Contains(".EncDecAttention.v."),
                m => m.FirstStepLogits(encoded)),
        };
        foreach (var (name, owns, run) in stages)
        {
            var actual = run(quantized);
            var expected = run(exact);
            var relative = Rms(actual.Data.Zip(expected.Data, (a, e) => a - e)) / Rms(expected.Data);
            var bound = StageWeightError(checkpoint, owns);
            output.WriteLine($"{checkpoint} int{bits} {name}: relative RMS error {relative:E2}, max |diff| {Fixtures.MaxAbsDiff(actual, expected):E2}, first-order bound {bound:E2}");
            Assert.True(relative <= bound, $"{checkpoint} int{bits} {name}: relative RMS error {relative} exceeds the first-order bound {bound}");
        }
    }

    /// <summary>Σ ‖ΔW‖_F / ‖W‖_F over the stage's quantized Linears (those the cache holds, in whichever form).</summary>
    private double StageWeightError(string checkpoint, Func<string, bool> owns)
    {
        using var weights = Blip2Checkpoint.Open(Fixtures.CheckpointDir(checkpoint));
        LinearQuantization[] forms = [BlockQuantization.Int8, BlockQuantization.DecoderInt8, BlockQuantization.Int4, BlockQuantization.DecoderInt4, ChannelQuantization.Int8];
        var cached = Directory.GetFiles(_cache.Root, "*.bin", SearchOption.AllDirectories)
            .Select(f => (Name: Path.GetFileNameWithoutExtension(f), Form: forms.Single(q => q.CacheKey == Path.GetFileName(Path.GetDirectoryName(f))))).ToList();
        var total = 0.0;
        foreach (var (name, q) in cached.Where(c => owns(c.Name)))
        {
            var entry = weights.Weights[name].Entry;
            var w = weights.Weights[name].File.ReadFloat32(entry);
            int k = (int)entry.Shape[1], group = q.GroupSize(k);
            double error = 0, norm = 0;
            for (var start = 0; start < w.Length; start += Math.Min(group, k - start % k))
            {
                var length = Math.Min(group, k - start % k);
                var block = w.AsSpan(start, length).ToArray();
                var scale = block.Max(Math.Abs) / q.MaxLevel;
                foreach (var v in block)
                {
                    var dequantized = scale == 0 ? 0 : Math.Round(v / scale, MidpointRounding.AwayFromZero) * scale;
                    error += (v - dequantized) * (v - dequantized);
                    norm += (double)v * v;
                }
            }
            if (norm > 0) total += Math.Sqrt(error / norm);
        }
        return total;
    }

    private static double Rms(IEnumerable<float> values)
    {
        double sum = 0; long n = 0;
        foreach (var v in values) { sum += (double)v * v; n++; }
        return Math.Sqrt(sum / n);
    }
}

public sealed class QuantizedWeightCacheTests : IDisposable
{
    private const string Weight = "language_model.encoder.block.0.layer.0.SelfAttention.q.weight";
    private readonly TemporaryCache _cache = new();

    public void Dispose() => _cache.Dispose();

    [Fact]
    public void QuantizedTensorsAreCachedPerFingerprintAndFormatAndReusedOnTheNextLoad()
    {
        using var checkpoint = Blip2Checkpoint.Open(Fixtures.TinyA);
        var shape = checkpoint.Weights[Weight].Entry.Shape;
        var first = new QuantizedWeightSource(checkpoint, _cache.Root).DescribeQuantized(Weight, shape[0], shape[1], BlockQuantization.Int8);
        var file = Path.Combine(_cache.Root, checkpoint.Fingerprint, BlockQuantization.Int8.CacheKey, Weight + ".bin");
        Assert.True(File.Exists(file));
        Assert.Equal(first.PackedLength + first.ScalesLength, new FileInfo(file).Length);
        var written = File.GetLastWriteTimeUtc(file);

        var source = new QuantizedWeightSource(checkpoint, _cache.Root);
        var again = source.DescribeQuantized(Weight, shape[0], shape[1], BlockQuantization.Int8);
        Assert.Equal(first, again);
        Assert.Equal(written, File.GetLastWriteTimeUtc(file));
        Assert.Equal(Path.GetFullPath(file), Path.GetFullPath(Path.Combine(source.ExternalDataFolder, again.Location)));

        var int4 = source.DescribeQuantized(Weight, shape[0], shape[1], BlockQuantization.DecoderInt4);
        Assert.NotEqual(again.Location, int4.Location);
        Assert.Equal(first.PackedLength / 2, int4.PackedLength);
        // Exact weights come from the checkpoint, relative to the same folder.
        var exact = source.Describe("language_model.shared.weight", checkpoint.Weights["language_model.shared.weight"].Entry.Shape);
        Assert.True(File.Exists(Path.Combine(source.ExternalDataFolder, exact.Location)));
        Assert.Empty(Directory.GetFiles(_cache.Root, "*.tmp", SearchOption.AllDirectories));
    }

    [Fact]
    public void AnUnwritableCacheFolderIsOneSentenceNamingIt()
    {
        using var checkpoint = Blip2Checkpoint.Open(Fixtures.TinyA);
        var blocked = Path.Combine(_cache.Root, "a-file");
        Directory.CreateDirectory(_cache.Root);
        File.WriteAllText(blocked, "not a folder");
        var shape = checkpoint.Weights[Weight].Entry.Shape;
        var e = Assert.Throws<InvalidOperationException>(() =>
            new QuantizedWeightSource(checkpoint, blocked).DescribeQuantized(Weight, shape[0], shape[1], BlockQuantization.Int8));
        Assert.Equal($"the quantized weights of {checkpoint.Directory} cannot be written to the cache folder {Path.Combine(blocked, checkpoint.Fingerprint)}; give a writable folder with --cache-dir", e.Message);
    }

    [Theory]
    [InlineData(TensorDType.Float16, 8)]
    [InlineData(TensorDType.BFloat16, 4)]
    public void HalfPrecisionWeightsQuantizeAsTheirFloat32Values(TensorDType dtype, int bits)
    {
        using var checkpoint = Blip2Checkpoint.Open(Fixtures.TinyA);
        var entry = checkpoint.Weights[Weight].Entry;
        var wide = checkpoint.Weights[Weight].File.ReadFloat32(entry);
        var narrow = dtype == TensorDType.Float16
            ? System.Runtime.InteropServices.MemoryMarshal.AsBytes(wide.Select(v => (Half)v).ToArray().AsSpan()).ToArray()
            : System.Runtime.InteropServices.MemoryMarshal.AsBytes(wide.Select(v => (ushort)(BitConverter.SingleToInt32Bits(v) >> 16)).ToArray().AsSpan()).ToArray();
        var widened = dtype == TensorDType.Float16
            ? wide.Select(v => (float)(Half)v).ToArray()
            : wide.Select(v => BitConverter.Int32BitsToSingle(BitConverter.SingleToInt32Bits(v) & unchecked((int)0xFFFF0000))).ToArray();
        var q = bits == 8 ? BlockQuantization.Int8 : BlockQuantization.Int4;
        int rows = (int)entry.Shape[0], k = (int)entry.Shape[1];
        (byte[], float[]) Quantize(byte[] bytes, TensorDType type)
        {
            var packed = new byte[LinearQuantizer.PackedBytes(rows, k, q)];
            var scales = new float[rows * q.BlockCount(k)];
            LinearQuantizer.Quantize(bytes, type, rows, k, q, packed, scales);
            return (packed, scales);
        }
        var (fromNarrow, narrowScales) = Quantize(narrow, dtype);
        var (fromWide, wideScales) = Quantize(System.Runtime.InteropServices.MemoryMarshal.AsBytes(widened.AsSpan()).ToArray(), TensorDType.Float32);
        Assert.Equal(fromWide, fromNarrow);
        Assert.Equal(wideScales, narrowScales);
    }
}

/// <summary><c>up --weights int8</c>: every model stage loads quantized, says so, and the mesh answers as the in-process int8 pipeline does.</summary>
public sealed class QuantizedMeshTests : IDisposable
{
    private readonly TemporaryCache _cache = new();

    public void Dispose() => _cache.Dispose();

    [Fact]
    public async Task TheMeshServesTheQuantizedWeightsAndLabelsThemApproximate()
    {
        var execution = new ExecutionOptions { Weights = WeightScheme.Parse("int8"), WeightCache = _cache.Root };
        using var pipeline = Blip2Pipeline.Load(Fixtures.Demo, execution);
        using var mesh = new MeshProcess(Fixtures.Demo, 1, null, "--weights", "int8", "--cache-dir", _cache.Root);
        foreach (var stage in new[] { "vision", "qformer", "decoder-0" })
            Assert.Contains($"[{stage}]", mesh.Log.Split('\n').First(l => l.Contains("with weights int8 (approximate); serving") && l.Contains($"[{stage}]")));
        using (var http = new HttpClient())
        {
            foreach (var stage in new[] { "vision", "qformer", "decoder-0" })
                Assert.Contains("approximate=\"true\",weights=\"int8 (approximate)\"} 1", (await http.GetStringAsync(mesh.Metrics[stage])).Split('\n').Single(l => l.StartsWith("blip2mesh_model_weights{", StringComparison.Ordinal)));
        }

        var client = MeshClients.Gateway(mesh.GatewayAddress, out var channel);
        using var _ = channel;
        var options = new Contracts.V1.GenerationOptions { MaxNewTokens = DemoReferences.Options.MaxNewTokens };
        foreach (var (file, cases) in DemoReferences.Sets["samples"])
        {
            var image = File.ReadAllBytes(cases[0].Image);
            var queries = pipeline.EmbedImage(image);
            foreach (var c in cases)
            {
                var expected = pipeline.Generate(queries, c.Prompt, DemoReferences.Options).Last().Final!;
                var answer = await MeshClients.AskAsync(client, MeshClients.Request(image, c.Prompt, options));
                Assert.Null(answer.Error);
                Assert.Equal(expected.Best.Ids.Skip(1), answer.TokenIds);
            }
        }
    }
}

/// <summary>
/// What a built quantized model keeps resident of its cache: ONNX Runtime memory-maps the cached tensors and keeps the
/// scales mapped though MatMulNBits (x86, int8 compute) packed its own copy, so the model drops those pages once each
/// session is built; pages a kernel does read again fault back in.
/// </summary>
public sealed class QuantizedCacheResidencyTests : IDisposable
{
    private readonly TemporaryCache _cache = new();

    public void Dispose() => _cache.Dispose();

    [Fact]
    public void BuiltSessionsKeepNoCachePagesResidentAndStillAnswer()
    {
        using var pipeline = Blip2Pipeline.Load(Fixtures.Demo, new ExecutionOptions { Weights = WeightScheme.Parse("int4"), WeightCache = _cache.Root });
        pipeline.Model.Warm(vision: true, qformer: true, decoder: true);

        var mappings = MappedPages.MappingsUnder(_cache.Root).ToList();
        Assert.True(mappings.Count > 0, "ONNX Runtime did not memory-map the quantized cache, so this test checks nothing");
        Assert.Equal(0, mappings.Sum(m => m.ResidentKilobytes));

        // The first dev case is one int4 answers as float32 does; the kernels read their packed copies, not the dropped pages.
        var expected = DemoReferences.Sets["dev"].First().Value[0];
        var queries = pipeline.EmbedImage(File.ReadAllBytes(expected.Image));
        Assert.Equal(expected.OutputText, pipeline.Generate(queries, expected.Prompt, DemoReferences.Options).Last().Final!.Text.Trim());
    }
}

public sealed class CheckpointFingerprintTests : IDisposable
{
    private readonly string _copy = Path.Combine(Path.GetTempPath(), $"blip2mesh-fingerprint-{Guid.NewGuid():N}");

    public void Dispose() { if (Directory.Exists(_copy)) Directory.Delete(_copy, recursive: true); }

    /// <summary>The quantized cache and the stages' compatibility checks are keyed by it: a copy of the same weights
    /// elsewhere is the same model, and a change at a tensor's start, middle or end (here one byte) is another. A
    /// change elsewhere only is not seen: it samples rather than hashing gigabytes.</summary>
    [Fact]
    public void TheFingerprintSamplesEveryTensorAtItsStartMiddleAndEnd()
    {
        Directory.CreateDirectory(_copy);
        foreach (var file in Directory.GetFiles(Fixtures.TinyA)) File.Copy(file, Path.Combine(_copy, Path.GetFileName(file)));
        string original, path;
        long first, middle, last;
        using (var checkpoint = Blip2Checkpoint.Open(Fixtures.TinyA))
        {
            original = checkpoint.Fingerprint;
            var weight = checkpoint.Weights["language_model.shared.weight"];
            path = Path.Combine(_copy, Path.GetFileName(weight.File.Path));
            first = weight.Entry.Offset;
            middle = weight.Entry.Offset + weight.Entry.Length / 2;
            last = weight.Entry.Offset + weight.Entry.Length - 1;
        }
        Assert.Equal(original, Fingerprint());
        foreach (var position in new[] { first, middle, last })
        {
            FlipByte(path, position);
            Assert.NotEqual(original, Fingerprint());
            FlipByte(path, position);
            Assert.Equal(original, Fingerprint());
        }
    }

    private string Fingerprint()
    {
        using var checkpoint = Blip2Checkpoint.Open(_copy);
        return checkpoint.Fingerprint;
    }

    private static void FlipByte(string path, long position)
    {
        using var stream = new FileStream(path, FileMode.Open, FileAccess.ReadWrite);
        stream.Position = position;
        var value = stream.ReadByte();
        stream.Position = position;
        stream.WriteByte((byte)(value ^ 0xFF));
    }
}
