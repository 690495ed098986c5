using Blip2Mesh.Model.Runtime;

namespace Blip2Mesh.Model.Quantization;

/// <summary>The stages whose Linear weights can be quantized, each its own graph.</summary>
public enum WeightStage { Vision, QFormer, Encoder, Decoder }

/// <summary>How one Linear weight [out, in] is stored at reduced precision: symmetric, one float32 scale per group of
/// weights along a row, s = max|w| / (2^(bits−1) − 1), round(w / s) stored in <see cref="Bits"/> bits, so no weight
/// moves by more than s / 2 (the bound the error tests derive theirs from).</summary>
public abstract record LinearQuantization(int Bits)
{
    /// <summary>Largest stored magnitude: 127 for 8 bits, 7 for 4 bits.</summary>
    public int MaxLevel => (1 << (Bits - 1)) - 1;
    public string Name => $"int{Bits}";
    /// <summary>Names the cached tensors' format: a change to the quantizer must change it.</summary>
    public abstract string CacheKey { get; }
    /// <summary>How many consecutive weights of a row share one scale.</summary>
    public abstract int GroupSize(int inFeatures);
}

/// <summary>
/// Block-wise: every run of <see cref="BlockSize"/> weights along a row's input features shares one scale, in ONNX
/// Runtime MatMulNBits' layout. Its CPU kernels read the fewest bytes per weight, so they serve the decoder, which
/// multiplies one row per sequence per step.
/// </summary>
public sealed record BlockQuantization(int Bits, int BlockSize) : LinearQuantization(Bits)
{
    public const int DefaultBlockSize = 32;
    public static readonly BlockQuantization Int8 = new(8, DefaultBlockSize);
    /// <summary>
    /// int4 for vision, Q-Former and the T5 encoder, in blocks of 128. MLAS' int8-compute kernel packs two floats per
    /// block beside the 4-bit weights (its scale and the block's sum): 0.25 of the 0.75 bytes a weight holds at blocks
    /// of 32, 0.0625 at 128. At 32 an int4 XL bench peaked at 4207 MB. Demo dev set, with the decoder at
    /// <see cref="DecoderInt4"/>: 92.2% of answers equal float32's (these stages at 64: 90.8%), though there a row is
    /// 96–256 weights long, so a block of 128 is most of one (XL's rows: 1408–6144).
    /// </summary>
    public static readonly BlockQuantization Int4 = new(4, 128);
    /// <summary>The decoder's int4 blocks: at 128 the demo dev set fell to 88.2% of answers equal float32's.</summary>
    public static readonly BlockQuantization DecoderInt4 = new(4, 64);
    /// <summary>
    /// The decoder's int8 blocks: at one row per step MLAS' 8-bit kernel is bound by its per-block work, not by
    /// memory, and streamed 32 XL-sized layers at 19.8 GB/s with blocks of 128 against 15.2 with 32 (this machine
    /// reads 21.5). Demo dev set: 97.8% of answers equal float32's (blocks of 32: 98.0%), though there a block of 128
    /// is a whole row. int4 streamed no faster at 64 or 128 (6–7 GB/s) either; at 128 it fell to 88.9%.
    /// </summary>
    public static readonly BlockQuantization DecoderInt8 = new(8, 128);

    /// <summary>MatMulNBits' implied zero point when none is given: stored = level + 2^(bits−1).</summary>
    public int ZeroPoint => 1 << (Bits - 1);
    public int BlobBytes => BlockSize * Bits / 8;
    public override string CacheKey => $"q{Bits}b{BlockSize}v1";
    public override int GroupSize(int inFeatures) => BlockSize;
    public long BlockCount(long inFeatures) => (inFeatures + BlockSize - 1) / BlockSize;
}

/// <summary>
/// int8 with one scale per output feature, stored transposed as int8 [in, out] for MatMulIntegerToFloat, which the
/// graph feeds each activation row rounded to int8 with its own scale: an integer GEMM (AMX or VNNI through MLAS)
/// for the stages whose Linears see hundreds of rows per run (vision: 257 per image). Per row, so a row's result never
/// depends on the rows batched with it. In the XL vision stage its products took 0.33 s where MatMulNBits int8's took
/// 2.88 s, slower than float32's at 257 rows (docs/performance.md).
/// </summary>
public sealed record ChannelQuantization() : LinearQuantization(8)
{
    public static readonly ChannelQuantization Int8 = new();
    public override string CacheKey => "q8c1v1";
    public override int GroupSize(int inFeatures) => inFeatures;
}

/// <summary>
/// Which weights of which stage are quantized (<c>--weights</c>): <c>auto</c> runs every stage on the
/// checkpoint's exact weights (today's path, the default); <c>int8</c> or <c>int4</c> quantizes every Linear of
/// every stage; <c>vision=int8,decoder=int4,…</c> chooses per stage (stages not named stay exact).
/// Token embeddings, norms, biases and the patch convolution always stay exact, and so do the layers
/// <see cref="For(WeightStage, string)"/> names as sensitive.
/// </summary>
public sealed record WeightScheme
{
    private readonly IReadOnlyDictionary<WeightStage, BlockQuantization> _stages;

    private WeightScheme(IReadOnlyDictionary<WeightStage, BlockQuantization> stages) => _stages = stages;

    public static readonly WeightScheme Exact = new(new Dictionary<WeightStage, BlockQuantization>());

    public static WeightScheme All(BlockQuantization quantization) =>
        new(Enum.GetValues<WeightStage>().ToDictionary(s => s, _ => quantization));

    public bool IsExact => _stages.Count == 0;

    /// <summary>How the Linear weights of <paramref name="stage"/> are stored; null when exact.</summary>
    public BlockQuantization? For(WeightStage stage) => _stages.GetValueOrDefault(stage);

    /// <summary>
    /// How the Linear weight <paramref name="weightName"/> of <paramref name="stage"/> is stored; null when exact.
    /// On the CPU, int8 outside the decoder is per output channel (<see cref="ChannelQuantization"/>: those stages
    /// multiply many rows at once, and MLAS' integer GEMM is the fast kernel for that); the decoder (its own block sizes,
    /// <see cref="BlockQuantization.DecoderInt8"/> and <see cref="BlockQuantization.DecoderInt4"/>), int4 and CUDA
    /// (whose fast kernel is MatMulNBits) use blocks.
    /// The decoder's feed-forward output projections (<c>decoder.….DenseReluDense.wo</c>) and the lm_head stay exact
    /// in every scheme. On the demo dev set, int8 elsewhere with them at int8 too kept 81.7% of answers equal to
    /// float32's, with them exact 98.9% (int4: 67.4% → 92.8%): nearly all of the difference is first tokens whose
    /// float32 top two logits lie within 0.013 of each other (mostly the position question's bottom/left/right), and
    /// the logit error of these two layers lands there. The encoder's <c>wo</c> quantizes like any other Linear.
    /// </summary>
    public LinearQuantization? For(WeightStage stage, string weightName, ExecutionDevice device = ExecutionDevice.Cpu)
    {
        if (IsSensitive(weightName) || For(stage) is not { } bits) return null;
        if (stage == WeightStage.Decoder) return bits.Bits == 8 ? BlockQuantization.DecoderInt8 : BlockQuantization.DecoderInt4;
        return bits.Bits == 8 && device == ExecutionDevice.Cpu ? ChannelQuantization.Int8 : bits;
    }

    private static bool IsSensitive(string weightName) =>
        (weightName.StartsWith("language_model.decoder.", StringComparison.Ordinal) && weightName.EndsWith(".DenseReluDense.wo.weight", StringComparison.Ordinal))
        || weightName == "language_model.lm_head.weight"
        || (weightName is "language_model.shared.weight" or "language_model.encoder.embed_tokens.weight");

    /// <exception cref="ArgumentException">with a sentence for the caller when <paramref name="value"/> is not a scheme.</exception>
    public static WeightScheme Parse(string value)
    {
        var text = value.Trim().ToLowerInvariant();
        if (text is "auto" or "exact") return Exact;
        if (!text.Contains('=')) return All(ParseBits(text, value));
        var stages = new Dictionary<WeightStage, BlockQuantization>();
        foreach (var part in text.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries))
        {
            var eq = part.IndexOf('=');
            if (eq < 0) throw Invalid(value);
            var stage = part[..eq].Trim() switch
            {
                "vision" => WeightStage.Vision,
                "qformer" => WeightStage.QFormer,
                "encoder" => WeightStage.Encoder,
                "decoder" => WeightStage.Decoder,
                var other => throw new ArgumentException($"'{other}' in '{value}' is not a stage (expected vision, qformer, encoder or decoder)"),
            };
            var mode = part[(eq + 1)..].Trim();
            if (mode is "auto" or "exact") stages.Remove(stage);
            else stages[stage] = ParseBits(mode, value);
        }
        return new WeightScheme(stages);
    }

    private static BlockQuantization ParseBits(string mode, string value) => mode switch
    {
        "int8" => BlockQuantization.Int8,
        "int4" => BlockQuantization.Int4,
        _ => throw Invalid(value),
    };

    private static ArgumentException Invalid(string value) =>
        new($"'{value}' is not a weight scheme (expected auto, int8, int4, or per stage such as vision=int8,decoder=int4)");

    /// <summary>What reports show: "auto (exact)", "int8 (approximate)", or per stage.</summary>
    public string Label
    {
        get
        {
            if (IsExact) return "auto (exact)";
            var distinct = _stages.Values.Distinct().ToList();
            if (_stages.Count == Enum.GetValues<WeightStage>().Length && distinct.Count == 1) return $"{distinct[0].Name} (approximate)";
            return string.Join(",", Enum.GetValues<WeightStage>().Select(s => $"{s.ToString().ToLowerInvariant()}={(For(s)?.Name ?? "exact")}")) + " (approximate)";
        }
    }

    /// <summary>The <c>--weights</c> value that parses back to this scheme.</summary>
    public string Argument => IsExact ? "auto"
        : string.Join(",", Enum.GetValues<WeightStage>().Where(s => For(s) is not null).Select(s => $"{s.ToString().ToLowerInvariant()}={For(s)!.Name}"));

    public override string ToString() => Label;

    public bool Equals(WeightScheme? other) =>
        other is not null && _stages.Count == other._stages.Count && _stages.All(kv => other._stages.GetValueOrDefault(kv.Key) == kv.Value);

    public override int GetHashCode() => Label.GetHashCode(StringComparison.Ordinal);
}
