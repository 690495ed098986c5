using Blip2Mesh.Model.Checkpoint;
using Blip2Mesh.Model.Onnx;
using Blip2Mesh.Model.Quantization;
using Microsoft.ML.OnnxRuntime;

namespace Blip2Mesh.Model.Runtime;

/// <summary>Output of the Q-Former stage.</summary>
public sealed record QFormerOutput(FloatTensor QueryOutput, FloatTensor QueryEmbeds);

/// <summary>
/// Output of the T5 encoder stage: what the decoder needs for every step of a request (every decoder layer's
/// cross-attention keys/values, left on the execution device, and the encoder padding mask).
/// </summary>
/// <summary>
/// What the T5 encoder leaves for decoding: the cross-attention keys/values (on the execution device) and the mask.
/// <see cref="InputsEmbeds"/> and <see cref="LastHiddenState"/> are copied to the host only when asked for (dumps, parity tests).
/// </summary>
public sealed record EncoderOutput(KeyValueCache Cross, long[] AttentionMask, int Batch, FloatTensor? InputsEmbeds = null, FloatTensor? LastHiddenState = null);

/// <summary>Which side of a cache's slots holds the empty ones: in front (self-attention), or behind (cross-attention).</summary>
public enum SlotPadding { Front, Back }

/// <summary>One decoder step's result: logits [B, V] and the self-attention cache grown by one slot (the caller owns it).</summary>
public sealed record DecoderStepOutput(FloatTensor Logits, KeyValueCache Present);

/// <summary>
/// The four BLIP-2 stage graphs of one checkpoint, each built on first use and run with ONNX Runtime.
/// Services load only the stages they serve.
/// </summary>
public sealed class Blip2Model : IDisposable
{
    private readonly ExecutionOptions _execution;
    private readonly Lazy<StageSession> _visionPixelValues;
    private readonly Lazy<StageSession> _visionRgb8;
    private readonly Lazy<StageSession> _qformer;
    private readonly Lazy<StageSession> _encoder;
    private readonly Lazy<StageSession> _decoder;
    /// <summary>Regroup graphs by their number of sources: 0, 1 or 2 (more are merged two at a time).</summary>
    private readonly Lazy<StageSession>[] _cacheRegroup;

    /// <summary>Where the graphs' weights come from: the checkpoint itself, or it plus the quantized-weight cache.</summary>
    private readonly IWeightSource _weights;
    private readonly string _externalDataFolder;
    /// <summary>The quantized-weight cache's folder for this checkpoint; null when every weight is exact.</summary>
    private readonly string? _cacheFolder;

    public Blip2Checkpoint Checkpoint { get; }
    public Blip2Config Config => Checkpoint.Config;
    /// <summary>How the Linear weights of each stage are stored (exact unless <c>--weights</c> says otherwise).</summary>
    public WeightScheme Weights => _execution.Weights;

    private Blip2Model(Blip2Checkpoint checkpoint, ExecutionOptions execution, PixelInput.Rgb8 rgbNormalization)
    {
        Checkpoint = checkpoint;
        _execution = execution;
        if (execution.Weights.IsExact)
        {
            _weights = checkpoint;
            _externalDataFolder = checkpoint.Directory;
        }
        else
        {
            var quantized = new QuantizedWeightSource(checkpoint, execution.WeightCache ?? QuantizedWeightSource.DefaultCacheRoot());
            _weights = quantized;
            _externalDataFolder = quantized.ExternalDataFolder;
            _cacheFolder = quantized.CacheFolder;
        }
        var graphs = StageGraphs(rgbNormalization).ToDictionary(g => g.Name, g => g.Build);
        _visionPixelValues = Stage("vision", WeightStage.Vision, graphs["vision"]);
        _visionRgb8 = Stage("vision-rgb8", WeightStage.Vision, graphs["vision-rgb8"]);
        _qformer = Stage("qformer", WeightStage.QFormer, graphs["qformer"]);
        _encoder = Stage("t5-encoder", WeightStage.Encoder, graphs["t5-encoder"]);
        _decoder = Stage("t5-decoder-step", WeightStage.Decoder, graphs["t5-decoder-step"]);
        _cacheRegroup = Enumerable.Range(0, 3).Select(n => Stage($"t5-cache-regroup-{n}", null, g => T5CacheRegroupGraph.Build(g, n))).ToArray();
    }

    /// <param name="rgbNormalization">The image processor's rescale/normalise settings, folded into the uint8 vision graph.</param>
    public static Blip2Model Load(string directory, PixelInput.Rgb8 rgbNormalization, ExecutionOptions? execution = null) =>
        new(Blip2Checkpoint.Open(directory), execution ?? new ExecutionOptions(), rgbNormalization);

    /// <summary>Every stage graph of a BLIP-2 checkpoint, by name.</summary>
    public static IReadOnlyList<(string Name, Func<OnnxGraphBuilder, Onnx.Proto.ModelProto> Build)> StageGraphs(PixelInput.Rgb8 rgbNormalization) =>
    [
        ("vision", g => VisionGraph.Build(g, new PixelInput.Normalized())),
        ("vision-rgb8", g => VisionGraph.Build(g, rgbNormalization)),
        ("qformer", QFormerGraph.Build),
        ("t5-encoder", T5EncoderGraph.Build),
        ("t5-decoder-step", T5DecoderStepGraph.Build),
    ];

    /// <param name="stage">Whose Linear weights the graph holds (null: none), so whose quantization applies.</param>
    private Lazy<StageSession> Stage(string name, WeightStage? stage, Func<OnnxGraphBuilder, Onnx.Proto.ModelProto> build) =>
        new(() =>
        {
            StageSession Build() => new(name, build(new OnnxGraphBuilder(_weights, name, Linears(stage), _execution.QuantizedCompute)),
                Checkpoint, _externalDataFolder, _execution);
            // MatMulNBits (x86, int8 compute) packs its scales into its own buffer yet keeps the scales tensor, which
            // ONNX Runtime memory-maps from the cache: 424 MB resident at XL int4 that no kernel reads again.
            return _cacheFolder is not null && _execution.Device == ExecutionDevice.Cpu ? MappedPages.ReleaseNewMappingsUnder(_cacheFolder, Build) : Build();
        });

    private Func<string, LinearQuantization?>? Linears(WeightStage? stage) =>
        stage is { } s && _execution.Weights.For(s) is not null ? weight => _execution.Weights.For(s, weight, _execution.Device) : null;

    /// <summary>
    /// Builds the sessions of the named stages now rather than on first request. The decoder's come first: building it
    /// briefly holds its exact lm_head twice (mapped, and packed by its kernel; 263 MB at XL), best done before the
    /// other stages' weights are resident (at XL int4 that peak was 4317 MB with the decoder built last).
    /// </summary>
    public void Warm(bool vision = false, bool qformer = false, bool decoder = false)
    {
        if (decoder)
        {
            _ = _decoder.Value;
            _ = _encoder.Value;
            if (_execution.Device != ExecutionDevice.Cpu)
                foreach (var regroup in _cacheRegroup) _ = regroup.Value;
        }
        if (vision) _ = _visionRgb8.Value;
        if (qformer) _ = _qformer.Value;
    }

    /// <summary>Vision stage on preprocessed float pixel_values [B, 3, H, W] → image_embeds [B, N, Dv].</summary>
    public FloatTensor EmbedPixelValues(FloatTensor pixelValues)
    {
        using var input = Tensors.ToOrt(pixelValues);
        using var outputs = _visionPixelValues.Value.Run(new Dictionary<string, OrtValue> { [VisionGraph.PixelValues] = input });
        return Tensors.ToFloat(outputs[0]);
    }

    /// <summary>Vision stage on resized uint8 RGB pixels [B, H, W, 3] → image_embeds [B, N, Dv].</summary>
    public FloatTensor EmbedRgb(byte[] pixels, int batch)
    {
        var size = Config.Vision.ImageSize;
        using var input = OrtValue.CreateTensorValueFromMemory(pixels, [batch, size, size, 3]);
        using var outputs = _visionRgb8.Value.Run(new Dictionary<string, OrtValue> { [VisionGraph.Pixels] = input });
        return Tensors.ToFloat(outputs[0]);
    }

    /// <summary>Q-Former + language projection on image_embeds [B, N, Dv].</summary>
    public QFormerOutput RunQFormer(FloatTensor imageEmbeds)
    {
        using var input = Tensors.ToOrt(imageEmbeds);
        var session = _qformer.Value;
        using var outputs = session.Run(new Dictionary<string, OrtValue> { [QFormerGraph.ImageEmbeds] = input });
        return new QFormerOutput(
            Tensors.ToFloat(outputs[session.OutputIndex(QFormerGraph.QueryOutput)]),
            Tensors.ToFloat(outputs[session.OutputIndex(QFormerGraph.QueryEmbeds)]));
    }

    /// <summary>
    /// T5 encoder over [query_embeds ; prompt ids] for a batch; prompts of different lengths are right-padded
    /// with pad_token_id and masked, as HF pads them.
    /// </summary>
    /// <param name="hiddenStates">Also copy the encoder's input embeddings and last hidden state to the host.</param>
    public EncoderOutput Encode(FloatTensor queryEmbeds, IReadOnlyList<IReadOnlyList<int>> promptIds, bool hiddenStates = false)
    {
        var batch = promptIds.Count;
        if (queryEmbeds.Shape[0] != batch) throw new ArgumentException("one prompt per query_embeds row is required");
        var promptLength = promptIds.Max(p => p.Count);
        var sequence = Config.NumQueryTokens + promptLength;
        var ids = new long[batch * promptLength];
        var mask = new long[batch * sequence];
        for (var b = 0; b < batch; b++)
        {
            for (var t = 0; t < promptLength; t++) ids[b * promptLength + t] = t < promptIds[b].Count ? promptIds[b][t] : Config.Text.PadTokenId;
            for (var s = 0; s < Config.NumQueryTokens + promptIds[b].Count; s++) mask[b * sequence + s] = 1;
        }
        using var queries = Tensors.ToOrt(queryEmbeds);
        using var idsValue = OrtValue.CreateTensorValueFromMemory(ids, [batch, promptLength]);
        using var maskValue = OrtValue.CreateTensorValueFromMemory(mask, [batch, sequence]);
        var session = _encoder.Value;
        // The cross-attention keys/values stay where they were computed: every decoder step reads them there.
        var outputs = session.RunOnDevice(new Dictionary<string, OrtValue>
        {
            [T5EncoderGraph.QueryEmbeds] = queries,
            [T5EncoderGraph.InputIds] = idsValue,
            [T5EncoderGraph.AttentionMask] = maskValue,
        }, hiddenStates ? new HashSet<string> { T5EncoderGraph.InputsEmbeds, T5EncoderGraph.LastHiddenState } : new HashSet<string>());
        using var inputsEmbeds = outputs[session.OutputIndex(T5EncoderGraph.InputsEmbeds)];
        using var lastHiddenState = outputs[session.OutputIndex(T5EncoderGraph.LastHiddenState)];
        var layers = Config.Text.NumDecoderLayers;
        var cross = new KeyValueCache(
            Enumerable.Range(0, layers).Select(i => outputs[session.OutputIndex(T5EncoderGraph.CrossKey(i))]).ToArray(),
            Enumerable.Range(0, layers).Select(i => outputs[session.OutputIndex(T5EncoderGraph.CrossValue(i))]).ToArray());
        return hiddenStates
            ? new EncoderOutput(cross, mask, batch, Tensors.ToFloat(inputsEmbeds), Tensors.ToFloat(lastHiddenState))
            : new EncoderOutput(cross, mask, batch);
    }

    /// <summary>
    /// One decoder step for a batch of rows. <paramref name="keyPositions"/> is [B, past.Slots + 1] (row-major): the
    /// position of each self-attention slot, the last being the new token's own position, −1 for an empty slot.
    /// </summary>
    public DecoderStepOutput DecodeStep(long[] inputIds, long[] keyPositions, KeyValueCache past, KeyValueCache cross, long[] encoderMask)
    {
        var batch = inputIds.Length;
        var keys = keyPositions.Length / batch;
        var sequence = encoderMask.Length / batch;
        if (past.Rows != batch || past.Slots != keys - 1)
            throw new ArgumentException($"the cache holds {past.Rows} rows of {past.Slots} slots; the step has {batch} rows of {keys - 1}");
        if (cross.Rows != batch || cross.Slots != sequence)
            throw new ArgumentException($"the cross-attention inputs hold {cross.Rows} rows of {cross.Slots}; the step has {batch} rows of {sequence}");
        var created = new List<OrtValue>();
        try
        {
            OrtValue Add(OrtValue v) { created.Add(v); return v; }
            var inputs = new Dictionary<string, OrtValue>
            {
                [T5DecoderStepGraph.InputIds] = Add(OrtValue.CreateTensorValueFromMemory(inputIds, [batch])),
                [T5DecoderStepGraph.KeyPositions] = Add(OrtValue.CreateTensorValueFromMemory(keyPositions, [batch, keys])),
                [T5DecoderStepGraph.EncoderAttentionMask] = Add(OrtValue.CreateTensorValueFromMemory(encoderMask, [batch, sequence])),
            };
            var layers = Config.Text.NumDecoderLayers;
            for (var i = 0; i < layers; i++)
            {
                inputs[T5DecoderStepGraph.PastKey(i)] = past.Key(i);
                inputs[T5DecoderStepGraph.PastValue(i)] = past.Value(i);
                inputs[T5EncoderGraph.CrossKey(i)] = cross.Key(i);
                inputs[T5EncoderGraph.CrossValue(i)] = cross.Value(i);
            }
            var session = _decoder.Value;
            // The grown cache stays where it was computed; only the logits come back to the host.
            var outputs = session.RunOnDevice(inputs, new HashSet<string> { T5DecoderStepGraph.Logits });
            using var logits = outputs[session.OutputIndex(T5DecoderStepGraph.Logits)];
            var present = new KeyValueCache(
                Enumerable.Range(0, layers).Select(i => outputs[session.OutputIndex(T5DecoderStepGraph.PresentKey(i))]).ToArray(),
                Enumerable.Range(0, layers).Select(i => outputs[session.OutputIndex(T5DecoderStepGraph.PresentValue(i))]).ToArray());
            return new DecoderStepOutput(Tensors.ToFloat(logits), present);
        }
        finally
        {
            foreach (var v in created) v.Dispose();
        }
    }

    /// <summary>The logits of the first decoder step of one encoded request (no history yet).</summary>
    public FloatTensor FirstStepLogits(EncoderOutput encoded)
    {
        using var empty = RegroupCache([], [0], freshRows: 1, slots: 0, SlotPadding.Front);
        var step = DecodeStep([Config.Text.DecoderStartTokenId], [0], empty, encoded.Cross, encoded.AttentionMask);
        step.Present.Dispose();
        return step.Logits;
    }

    /// <summary>
    /// A new cache of <paramref name="slots"/> slots whose rows are, in order, the rows <paramref name="rowOrder"/>
    /// names: an index counts through every row of <paramref name="sources"/> in turn, then through
    /// <paramref name="freshRows"/> empty rows. Each source gains or loses empty slots on the side
    /// <paramref name="padding"/> says. Sources are left as they are; the caller owns the result.
    /// </summary>
    public KeyValueCache RegroupCache(IReadOnlyList<KeyValueCache> sources, long[] rowOrder, int freshRows, long slots, SlotPadding padding) =>
        // In host memory a copy loop does it in microseconds; a graph run costs more than the copying it does there.
        _execution.Device == ExecutionDevice.Cpu
            ? RegroupOnHost(sources, rowOrder, freshRows, slots, padding)
            : RegroupOnDevice(sources, rowOrder, freshRows, slots, padding);

    internal KeyValueCache RegroupOnHost(IReadOnlyList<KeyValueCache> sources, long[] rowOrder, int freshRows, long slots, SlotPadding padding)
    {
        var text = Config.Text;
        var (heads, dim) = (text.NumHeads, text.DKv);
        var concatenated = sources.SelectMany(s => Enumerable.Range(0, s.Rows).Select(r => (Cache: (KeyValueCache?)s, Row: r)))
            .Concat(Enumerable.Repeat((Cache: (KeyValueCache?)null, Row: 0), freshRows)).ToArray();
        OrtValue Copy(Func<KeyValueCache, OrtValue> pick)
        {
            var result = OrtValue.CreateAllocatedTensorValue(OrtAllocator.DefaultInstance, Microsoft.ML.OnnxRuntime.Tensors.TensorElementType.Float, [rowOrder.Length, heads, slots, dim]);
            var target = result.GetTensorMutableDataAsSpan<float>();
            target.Clear();
            for (var i = 0; i < rowOrder.Length; i++)
            {
                if (concatenated[rowOrder[i]] is not ({ } cache, var row)) continue;
                var source = pick(cache).GetTensorDataAsSpan<float>();
                var kept = (int)Math.Min(cache.Slots, slots);
                var from = padding == SlotPadding.Front ? cache.Slots - kept : 0;
                var to = padding == SlotPadding.Front ? slots - kept : 0;
                for (var h = 0; h < heads; h++)
                    source.Slice((int)(((row * heads + h) * cache.Slots + from) * dim), kept * (int)dim)
                        .CopyTo(target.Slice((int)(((i * heads + h) * slots + to) * dim)));
            }
            return result;
        }
        var layers = Enumerable.Range(0, text.NumDecoderLayers).ToArray();
        return new KeyValueCache(layers.Select(i => Copy(c => c.Key(i))).ToArray(), layers.Select(i => Copy(c => c.Value(i))).ToArray());
    }

    internal KeyValueCache RegroupOnDevice(IReadOnlyList<KeyValueCache> sources, long[] rowOrder, int freshRows, long slots, SlotPadding padding)
    {
        if (sources.Count <= 2) return RunRegroupGraph(sources, rowOrder, freshRows, slots, padding);
        // The first two merged keep their rows' numbering, so the order still holds.
        var firstTwo = sources[0].Rows + sources[1].Rows;
        using var merged = RunRegroupGraph([sources[0], sources[1]], [.. Enumerable.Range(0, firstTwo).Select(r => (long)r)], 0, slots, padding);
        return RegroupOnDevice([merged, .. sources.Skip(2)], rowOrder, freshRows, slots, padding);
    }

    private KeyValueCache RunRegroupGraph(IReadOnlyList<KeyValueCache> sources, long[] rowOrder, int freshRows, long slots, SlotPadding padding)
    {
        var text = Config.Text;
        var session = _cacheRegroup[sources.Count].Value;
        var created = new List<OrtValue>();
        try
        {
            OrtValue Add(OrtValue v) { created.Add(v); return v; }
            var inputs = new Dictionary<string, OrtValue>
            {
                [T5CacheRegroupGraph.RowOrder] = Add(OrtValue.CreateTensorValueFromMemory(rowOrder, [rowOrder.Length])),
                [T5CacheRegroupGraph.FreshShape] = Add(OrtValue.CreateTensorValueFromMemory(new long[] { freshRows, text.NumHeads, slots, text.DKv }, [4])),
            };
            for (var j = 0; j < sources.Count; j++)
            {
                var source = sources[j];
                var (keptStart, keptEnd) = padding == SlotPadding.Front
                    ? (Math.Max(0, source.Slots - slots), source.Slots)
                    : (0, Math.Min(source.Slots, slots));
                inputs[T5CacheRegroupGraph.KeptStart(j)] = Add(OrtValue.CreateTensorValueFromMemory(new[] { keptStart }, [1]));
                inputs[T5CacheRegroupGraph.KeptEnd(j)] = Add(OrtValue.CreateTensorValueFromMemory(new[] { keptEnd }, [1]));
                var empty = Math.Max(0, slots - source.Slots);
                long[] pads = padding == SlotPadding.Front ? [0, 0, empty, 0, 0, 0, 0, 0] : [0, 0, 0, 0, 0, 0, empty, 0];
                inputs[T5CacheRegroupGraph.Pads(j)] = Add(OrtValue.CreateTensorValueFromMemory(pads, [8]));
                for (var i = 0; i < text.NumDecoderLayers; i++)
                {
                    inputs[T5CacheRegroupGraph.SourceKey(j, i)] = source.Key(i);
                    inputs[T5CacheRegroupGraph.SourceValue(j, i)] = source.Value(i);
                }
            }
            var outputs = session.RunOnDevice(inputs, new HashSet<string>());
            return new KeyValueCache(
                Enumerable.Range(0, text.NumDecoderLayers).Select(i => outputs[session.OutputIndex(T5CacheRegroupGraph.Key(i))]).ToArray(),
                Enumerable.Range(0, text.NumDecoderLayers).Select(i => outputs[session.OutputIndex(T5CacheRegroupGraph.Value(i))]).ToArray());
        }
        finally
        {
            foreach (var v in created) v.Dispose();
        }
    }

    public void Dispose()
    {
        foreach (var stage in new[] { _visionPixelValues, _visionRgb8, _qformer, _encoder, _decoder }.Concat(_cacheRegroup))
            if (stage.IsValueCreated) stage.Value.Dispose();
        Checkpoint.Dispose();
    }
}

internal static class Tensors
{
    public static OrtValue ToOrt(FloatTensor tensor) => OrtValue.CreateTensorValueFromMemory(tensor.Data, tensor.Shape);

    public static FloatTensor ToFloat(OrtValue value)
    {
        var shape = value.GetTensorTypeAndShape().Shape;
        return new FloatTensor(value.GetTensorDataAsSpan<float>().ToArray(), shape);
    }
}
