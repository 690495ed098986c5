using System.Runtime.InteropServices;
using System.Text.Json;
using System.Text.Json.Nodes;
using Blip2Mesh.Model.Onnx;
using Blip2Mesh.Model.Text;

namespace Blip2Mesh.Model.Checkpoint;

/// <summary>
/// An <see cref="IWeightSource"/> that holds no weights but records every one the graph builder asks for, with its
/// Hugging Face name and the shape the model expects. Building every stage graph against it lists exactly the
/// tensors a checkpoint of a config must hold, derived from the code that consumes them.
/// </summary>
public sealed class WeightRecorder(Blip2Config config) : IWeightSource
{
    private readonly Dictionary<string, long[]> _shapes = new(StringComparer.Ordinal);
    private readonly List<string> _order = [];

    public Blip2Config Config => config;

    /// <summary>The recorded checkpoint holds every weight the model can use (so the shared T5 embedding is "language_model.shared.weight").</summary>
    public bool Has(string name) => true;

    public WeightLocation Describe(string name, long[] expectedShape)
    {
        if (_shapes.TryGetValue(name, out var known))
        {
            if (!known.SequenceEqual(expectedShape))
                throw new InvalidOperationException($"weight '{name}' is used with shapes [{string.Join(", ", known)}] and [{string.Join(", ", expectedShape)}]");
        }
        else
        {
            _shapes[name] = expectedShape.ToArray();
            _order.Add(name);
        }
        var bytes = expectedShape.Aggregate(1L, (a, b) => a * b) * sizeof(float);
        return new WeightLocation(name, TensorDType.Float32, expectedShape, "recorded.safetensors", 0, bytes);
    }

    /// <summary>The recorded weights in the order the graphs first used them.</summary>
    public IReadOnlyList<(string Name, long[] Shape)> Weights => _order.Select(n => (n, _shapes[n])).ToList();

    /// <summary>Every weight the stage graphs of <paramref name="config"/> use: vision (both pixel inputs), Q-Former, T5 encoder and decoder step.</summary>
    public static IReadOnlyList<(string Name, long[] Shape)> Record(Blip2Config config)
    {
        var recorder = new WeightRecorder(config);
        foreach (var (name, build) in Runtime.Blip2Model.StageGraphs(new PixelInput.Rgb8(1 / 255.0, [0.5f, 0.5f, 0.5f], [0.5f, 0.5f, 0.5f])))
            build(new OnnxGraphBuilder(recorder, name));
        return recorder.Weights;
    }
}

/// <summary>How <see cref="SyntheticCheckpoint"/> fills and lays out the weights.</summary>
/// <param name="MaxShardBytes">Shard size limit (Hugging Face's default max_shard_size is "10GB" = 10⁹·10 bytes); a tensor larger than it gets a shard of its own.</param>
public sealed record SynthOptions(TensorDType DType = TensorDType.Float32, long Seed = 0, long MaxShardBytes = 10_000_000_000, float Std = 0.02f);

/// <summary>What <see cref="SyntheticCheckpoint.Create"/> wrote.</summary>
public sealed record SynthResult(int Tensors, long Parameters, long TotalBytes, IReadOnlyList<string> Shards, int TokenizerCount, string? TokenizerNote);

/// <summary>
/// Writes a random-weight BLIP-2 checkpoint in the real Hugging Face format: the source's config.json (copied byte for
/// byte), preprocessor and tokenizer files, and every tensor the model uses with its exact name and shape, as
/// sharded safetensors plus model.safetensors.index.json. Weights are drawn from N(0, std²) (layer-norm weights 1,
/// biases 0, so activations stay finite) and streamed to disk block by block: memory stays small whatever the size.
/// Values depend only on the seed, the tensor's name and the element index, not on the dtype, shard size or threads.
/// </summary>
public static class SyntheticCheckpoint
{
    public const string IndexFile = "model.safetensors.index.json";
    private const int BlockElements = 1 << 16;
    private const int BlocksPerChunk = 64;
    private static readonly string[] TokenizerFiles = ["spiece.model", "tokenizer_config.json", "special_tokens_map.json"];

    public enum Init { Normal, Ones, Zeros }

    /// <summary>Biases start at 0, layer-norm (and T5 RMS-norm) weights at 1, everything else random normal.</summary>
    public static Init InitOf(string name)
    {
        if (name.EndsWith(".bias", StringComparison.Ordinal)) return Init.Zeros;
        var parts = name.Split('.');
        if (parts.Length >= 2 && parts[^1] == "weight" && parts[^2].Contains("norm", StringComparison.OrdinalIgnoreCase)) return Init.Ones;
        return Init.Normal;
    }

    /// <param name="source">A model folder with config.json (and preprocessor_config.json); tokenizer files are copied from it when present.</param>
    /// <param name="tokenizerFallback">Where spiece.model and friends come from when <paramref name="source"/> has none.</param>
    /// <param name="progress">Told the bytes of weights written so far.</param>
    public static SynthResult Create(string source, string output, SynthOptions options, string? tokenizerFallback = null, Action<long, long>? progress = null)
    {
        var configPath = Path.Combine(source, "config.json");
        var config = Blip2Config.Load(configPath);
        if (options.DType is not (TensorDType.Float32 or TensorDType.Float16 or TensorDType.BFloat16))
            throw new ArgumentException($"dtype {options.DType} is not a floating-point weight type");
        if (options.MaxShardBytes <= 0) throw new ArgumentException("the shard size must be positive");
        Directory.CreateDirectory(output);

        File.Copy(configPath, Path.Combine(output, "config.json"), overwrite: true);
        foreach (var file in new[] { "preprocessor_config.json", "generation_config.json" })
            if (File.Exists(Path.Combine(source, file))) File.Copy(Path.Combine(source, file), Path.Combine(output, file), overwrite: true);
        var (tokenizerCount, note) = CopyTokenizer(source, output, tokenizerFallback, config.Text.VocabSize);

        var tensors = WeightRecorder.Record(config);
        var shards = WriteShards(output, tensors, options, progress);
        var total = tensors.Sum(t => Elements(t.Shape)) * options.DType.Size();
        return new SynthResult(tensors.Count, tensors.Sum(t => Elements(t.Shape)), total, shards, tokenizerCount, note);
    }

    /// <summary>
    /// Copies the tokenizer; when its length (pieces + sentinels) is below the model's vocab_size, raises extra_ids in
    /// tokenizer_config.json so every id the random model can emit decodes (as a sentinel, i.e. a special token).
    /// </summary>
    private static (int Count, string? Note) CopyTokenizer(string source, string output, string? fallback, int vocabSize)
    {
        var from = File.Exists(Path.Combine(source, "spiece.model")) ? source
            : fallback is not null && File.Exists(Path.Combine(fallback, "spiece.model")) ? fallback
            : throw new FileNotFoundException($"{source} has no spiece.model and no tokenizer to fall back on was given");
        foreach (var file in TokenizerFiles)
            if (File.Exists(Path.Combine(from, file))) File.Copy(Path.Combine(from, file), Path.Combine(output, file), overwrite: true);
        var count = T5Tokenizer.Load(output).Count;
        string? note = from == source ? null : $"tokenizer copied from {from}";
        if (count < vocabSize)
        {
            var configPath = Path.Combine(output, "tokenizer_config.json");
            var tokenizerConfig = File.Exists(configPath) ? JsonNode.Parse(File.ReadAllText(configPath)) as JsonObject ?? [] : [];
            var extraIds = tokenizerConfig["extra_ids"] is JsonValue v ? v.GetValue<int>() : 100;
            tokenizerConfig["extra_ids"] = extraIds + vocabSize - count;
            File.WriteAllText(configPath, tokenizerConfig.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
            note = $"{note ?? "tokenizer"}: {count} tokens for a vocabulary of {vocabSize}; extra_ids raised by {vocabSize - count} so ids {count}..{vocabSize - 1} decode as sentinels (fine for timing, not for reading text)";
            count = T5Tokenizer.Load(output).Count;
        }
        return (count, note);
    }

    private static long Elements(long[] shape) => shape.Aggregate(1L, (a, b) => a * b);

    private static List<string> WriteShards(string output, IReadOnlyList<(string Name, long[] Shape)> tensors, SynthOptions options, Action<long, long>? progress)
    {
        var size = options.DType.Size();
        // Hugging Face's greedy sharding: a new shard starts when the next tensor would push this one over the limit.
        var groups = new List<List<int>> { new() };
        long current = 0;
        for (var i = 0; i < tensors.Count; i++)
        {
            var bytes = Elements(tensors[i].Shape) * size;
            if (groups[^1].Count > 0 && current + bytes > options.MaxShardBytes)
            {
                groups.Add([]);
                current = 0;
            }
            groups[^1].Add(i);
            current += bytes;
        }
        var names = groups.Select((_, k) => $"model-{k + 1:D5}-of-{groups.Count:D5}.safetensors").ToList();
        var total = tensors.Sum(t => Elements(t.Shape)) * size;
        long written = 0;
        for (var k = 0; k < groups.Count; k++)
        {
            var path = Path.Combine(output, names[k]);
            var temporary = path + ".partial";
            using (var stream = new FileStream(temporary, FileMode.Create, FileAccess.Write, FileShare.None, 1 << 22))
            {
                WriteHeader(stream, groups[k].Select(i => tensors[i]).ToList(), options.DType);
                foreach (var i in groups[k])
                {
                    WriteTensor(stream, tensors[i].Name, Elements(tensors[i].Shape), options, bytes =>
                    {
                        written += bytes;
                        progress?.Invoke(written, total);
                    });
                }
            }
            File.Move(temporary, path, overwrite: true);
        }
        var index = new JsonObject
        {
            ["metadata"] = new JsonObject { ["total_size"] = total },
            ["weight_map"] = new JsonObject(groups.SelectMany((g, k) => g.Select(i => (tensors[i].Name, File: names[k])))
                .OrderBy(e => e.Name, StringComparer.Ordinal)
                .Select(e => KeyValuePair.Create(e.Name, (JsonNode?)JsonValue.Create(e.File)))),
        };
        File.WriteAllText(Path.Combine(output, IndexFile), index.ToJsonString(new JsonSerializerOptions { WriteIndented = true }) + "\n");
        return names;
    }

    private static void WriteHeader(Stream stream, IReadOnlyList<(string Name, long[] Shape)> tensors, TensorDType dtype)
    {
        var header = new Dictionary<string, object> { ["__metadata__"] = new Dictionary<string, string> { ["format"] = "pt" } };
        long offset = 0;
        foreach (var (name, shape) in tensors)
        {
            var length = Elements(shape) * dtype.Size();
            header[name] = new { dtype = dtype.SafetensorsName(), shape, data_offsets = new[] { offset, offset + length } };
            offset += length;
        }
        var json = JsonSerializer.SerializeToUtf8Bytes(header);
        var padded = (json.Length + 7) / 8 * 8;
        stream.Write(BitConverter.GetBytes((long)padded));
        stream.Write(json);
        for (var i = json.Length; i < padded; i++) stream.WriteByte((byte)' ');
    }

    /// <summary>Generates one tensor chunk by chunk (blocks of a chunk in parallel) and writes it in the target dtype.</summary>
    private static void WriteTensor(Stream stream, string name, long elements, SynthOptions options, Action<long> wrote)
    {
        var init = InitOf(name);
        var size = options.DType.Size();
        var tensorSeed = Mix((ulong)options.Seed ^ Fnv1a(name));
        var chunkElements = (long)BlockElements * BlocksPerChunk;
        var values = new float[Math.Min(elements, chunkElements)];
        var bytes = new byte[values.Length * size];
        for (long start = 0; start < elements; start += chunkElements)
        {
            var count = (int)Math.Min(chunkElements, elements - start);
            var blocks = (count + BlockElements - 1) / BlockElements;
            var firstBlock = start / BlockElements;
            Parallel.For(0, blocks, b =>
            {
                var span = values.AsSpan(b * BlockElements, Math.Min(BlockElements, count - b * BlockElements));
                switch (init)
                {
                    case Init.Zeros: span.Clear(); break;
                    case Init.Ones: span.Fill(1f); break;
                    default: FillNormal(span, Mix(tensorSeed + (ulong)(firstBlock + b) * 0x9E3779B97F4A7C15UL), options.Std); break;
                }
                Convert(span, bytes.AsSpan(b * BlockElements * size, span.Length * size), options.DType);
            });
            stream.Write(bytes, 0, count * size);
            wrote((long)count * size);
        }
    }

    private static void Convert(ReadOnlySpan<float> values, Span<byte> destination, TensorDType dtype)
    {
        switch (dtype)
        {
            case TensorDType.Float32:
                MemoryMarshal.AsBytes(values).CopyTo(destination);
                break;
            case TensorDType.Float16:
                var halves = MemoryMarshal.Cast<byte, Half>(destination);
                for (var i = 0; i < values.Length; i++) halves[i] = (Half)values[i];
                break;
            case TensorDType.BFloat16:
                var raw = MemoryMarshal.Cast<byte, ushort>(destination);
                for (var i = 0; i < values.Length; i++)
                {
                    // Round to nearest even, as torch's float32 → bfloat16 does (values here are never NaN).
                    var bits = (uint)BitConverter.SingleToInt32Bits(values[i]);
                    raw[i] = (ushort)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
                }
                break;
            default:
                throw new ArgumentOutOfRangeException(nameof(dtype));
        }
    }

    /// <summary>Box–Muller over a SplitMix64 stream: N(0, std²), deterministic per block seed.</summary>
    private static void FillNormal(Span<float> values, ulong state, float std)
    {
        for (var i = 0; i < values.Length; i += 2)
        {
            var u1 = ((Next(ref state) >> 40) + 1) * (1.0f / (1 << 24));   // (0, 1]
            var u2 = (Next(ref state) >> 40) * (1.0f / (1 << 24));         // [0, 1)
            var r = std * MathF.Sqrt(-2f * MathF.Log(u1));
            var (sin, cos) = MathF.SinCos(2f * MathF.PI * u2);
            values[i] = r * cos;
            if (i + 1 < values.Length) values[i + 1] = r * sin;
        }
    }

    private static ulong Next(ref ulong state) => Mix(state += 0x9E3779B97F4A7C15UL);

    private static ulong Mix(ulong z)
    {
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
        return z ^ (z >> 31);
    }

    private static ulong Fnv1a(string text)
    {
        var hash = 14695981039346656037UL;
        foreach (var c in text) hash = (hash ^ c) * 1099511628211UL;
        return hash;
    }
}
