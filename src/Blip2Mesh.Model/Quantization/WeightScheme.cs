namespace Blip2Mesh.Model.Quantization;

/// <summary>The stages whose Linear weights can be quantized, each its own graph.</summary>
public enum WeightStage { Vision, QFormer, Encoder, Decoder }

/// <summary>
/// Block-wise symmetric weight-only quantization: every run of <see cref="BlockSize"/> weights along a row's
/// input features shares one float32 scale, s = max|w| / (2^(bits−1) − 1), and stores round(w / s) in
/// <see cref="Bits"/> bits. So no weight moves by more than s / 2, the bound the error tests derive theirs from.
/// </summary>
public sealed record BlockQuantization(int Bits, int BlockSize)
{
    public const int DefaultBlockSize = 32;
    public static readonly BlockQuantization Int8 = new(8, DefaultBlockSize);
    public static readonly BlockQuantization Int4 = new(4, DefaultBlockSize);

    /// <summary>Largest stored magnitude: 127 for 8 bits, 7 for 4 bits.</summary>
    public int MaxLevel => (1 << (Bits - 1)) - 1;
    /// <summary>MatMulNBits' implied zero point when none is given: stored = level + 2^(bits−1).</summary>
    public int ZeroPoint => 1 << (Bits - 1);
    public int BlobBytes => BlockSize * Bits / 8;
    public string Name => $"int{Bits}";
    /// <summary>Names the cached tensors' format: a change to the quantizer must change it.</summary>
    public string CacheKey => $"q{Bits}b{BlockSize}v1";
    public long BlockCount(long inFeatures) => (inFeatures + BlockSize - 1) / BlockSize;
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
    /// The decoder's feed-forward output projections (<c>decoder.….DenseReluDense.wo</c>) and the lm_head stay exact
    /// in every scheme. On the demo dev set, int8 elsewhere with them at int8 too kept 81.7% of answers equal to
    /// float32's, with them exact 98.9% (int4: 67.4% → 92.8%): nearly all of the difference is first tokens whose
    /// float32 top two logits lie within 0.013 of each other (mostly the position question's bottom/left/right), and
    /// the logit error of these two layers lands there. The encoder's <c>wo</c> quantizes like any other Linear
    /// (int8 98.5%, int4 92.3% with it quantized too).
    /// </summary>
    public BlockQuantization? For(WeightStage stage, string weightName) =>
        IsSensitive(weightName) ? null : For(stage);

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
