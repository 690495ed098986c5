using Blip2Mesh.Model.Onnx.Proto;
using static Blip2Mesh.Model.Onnx.Layers;
using DataType = Blip2Mesh.Model.Onnx.Proto.TensorProto.Types.DataType;

namespace Blip2Mesh.Model.Onnx;

/// <summary>
/// The Flan-T5 encoder over [query_embeds ; shared(input_ids)], plus every decoder layer's cross-attention
/// keys and values, which depend only on the encoder output and so are computed once per request.
/// </summary>
public static class T5EncoderGraph
{
    public const string QueryEmbeds = "query_embeds";
    public const string InputIds = "input_ids";
    public const string AttentionMask = "attention_mask";
    public const string InputsEmbeds = "inputs_embeds";
    public const string LastHiddenState = "last_hidden_state";
    public static string CrossKey(int layer) => $"cross_key.{layer}";
    public static string CrossValue(int layer) => $"cross_value.{layer}";

    public static ModelProto Build(OnnxGraphBuilder g)
    {
        var c = g.Config.Text;
        long d = c.DModel;
        var queries = g.Input(QueryEmbeds, DataType.Float, "batch", g.Config.NumQueryTokens, d);
        var ids = g.Input(InputIds, DataType.Int64, "batch", "prompt_length");
        var mask = g.Input(AttentionMask, DataType.Int64, "batch", "sequence");

        var prompt = g.Op("Gather", "/encoder/embed_tokens/Gather", [T5Weights.Shared(g), ids]);
        var hidden = g.Op("Concat", "/encoder/inputs_embeds/Concat", [queries, prompt], Attr.Int("axis", 1));
        g.Output(hidden, InputsEmbeds, DataType.Float, "batch", "sequence", d);

        var bias = MakeEncoderPositionBias(g, hidden, mask);
        for (var i = 0; i < c.NumLayers; i++)
        {
            var name = $"/encoder/block.{i}";
            var prefix = $"language_model.encoder.block.{i}";
            var normed = MakeRmsNorm(g, $"{name}/layer.0/layer_norm", hidden, $"{prefix}.layer.0.layer_norm", d, c.LayerNormEpsilon);
            var q = T5Weights.Project(g, $"{name}/layer.0/SelfAttention/q", normed, $"{prefix}.layer.0.SelfAttention.q");
            var k = T5Weights.Project(g, $"{name}/layer.0/SelfAttention/k", normed, $"{prefix}.layer.0.SelfAttention.k");
            var v = T5Weights.Project(g, $"{name}/layer.0/SelfAttention/v", normed, $"{prefix}.layer.0.SelfAttention.v");
            var attended = MakeAttention(g, $"{name}/layer.0/SelfAttention", q, k, v, AttentionScaling.None, bias);
            hidden = g.Op("Add", $"{name}/layer.0/residual", [hidden, T5Weights.Output(g, $"{name}/layer.0/SelfAttention/o", attended, $"{prefix}.layer.0.SelfAttention.o")]);
            hidden = T5Weights.MakeFeedForward(g, $"{name}/layer.1", hidden, $"{prefix}.layer.1");
        }
        var output = MakeRmsNorm(g, "/encoder/final_layer_norm", hidden, "language_model.encoder.final_layer_norm", d, c.LayerNormEpsilon);
        g.Output(output, LastHiddenState, DataType.Float, "batch", "sequence", d);

        for (var i = 0; i < c.NumDecoderLayers; i++)
        {
            var name = $"/decoder/block.{i}/layer.1/EncDecAttention";
            var prefix = $"language_model.decoder.block.{i}.layer.1.EncDecAttention";
            g.Output(T5Weights.Project(g, $"{name}/k", output, $"{prefix}.k"), CrossKey(i), DataType.Float, "batch", c.NumHeads, "sequence", c.DKv);
            g.Output(T5Weights.Project(g, $"{name}/v", output, $"{prefix}.v"), CrossValue(i), DataType.Float, "batch", c.NumHeads, "sequence", c.DKv);
        }
        return g.Build();
    }

    /// <summary>
    /// Bidirectional relative position bias of block 0, shared by all blocks, with the padding mask folded in:
    /// <code>Range(S) ─(k − q)─bucket─Gather(relative_attention_bias)─Transpose──▶ [1, H, S, S] (+ mask [B, 1, 1, S])</code>
    /// </summary>
    private static string MakeEncoderPositionBias(OnnxGraphBuilder g, string hidden, string mask)
    {
        const string name = "/encoder/block.0/layer.0/SelfAttention/relative_attention_bias";
        var c = g.Config.Text;
        var length = g.Op("Squeeze", $"{name}/Length", [g.Op("Shape", $"{name}/Shape", [hidden], Attr.Int("start", 1), Attr.Int("end", 2)), g.Ints(0)]);
        var positions = g.Op("Range", $"{name}/Range", [g.Int(0), length, g.Int(1)]);
        var keys = g.Op("Unsqueeze", $"{name}/KeyPositions", [positions, g.Ints(0)]);
        var queries = g.Op("Unsqueeze", $"{name}/QueryPositions", [positions, g.Ints(1)]);
        var relative = g.Op("Sub", $"{name}/Relative", [keys, queries]);
        var buckets = MakeRelativePositionBucket(g, $"{name}/buckets", relative, bidirectional: true, c.RelativeAttentionNumBuckets, c.RelativeAttentionMaxDistance);
        var table = g.Weight("language_model.encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", c.RelativeAttentionNumBuckets, c.NumHeads);
        var values = g.Op("Gather", $"{name}/Gather", [table, buckets]);
        var perHead = g.Op("Transpose", $"{name}/Transpose", [values], Attr.Ints("perm", 2, 0, 1));
        var bias = g.Op("Unsqueeze", $"{name}/Unsqueeze", [perHead, g.Ints(0)]);
        return g.Op("Add", $"{name}/AddMask", [bias, MakeAdditiveMask(g, "/encoder/attention_mask", mask)]);
    }
}

/// <summary>
/// One Flan-T5 decoder step for a batch of rows. Each row brings its own self-attention history: the positions
/// of its key slots (the last slot is the new token; −1 marks an empty slot, so rows of different lengths and
/// rows that joined late share one batch), its past keys/values and its cross-attention keys/values.
/// Returns the next-token logits and the self-attention keys/values extended by the new token.
/// </summary>
public static class T5DecoderStepGraph
{
    public const string InputIds = "input_ids";
    public const string KeyPositions = "self_key_positions";
    public const string EncoderAttentionMask = "encoder_attention_mask";
    public const string Logits = "logits";
    public static string PastKey(int layer) => $"past_key.{layer}";
    public static string PastValue(int layer) => $"past_value.{layer}";
    public static string PresentKey(int layer) => $"present_key.{layer}";
    public static string PresentValue(int layer) => $"present_value.{layer}";

    public static ModelProto Build(OnnxGraphBuilder g)
    {
        var c = g.Config.Text;
        long d = c.DModel;
        var ids = g.Input(InputIds, DataType.Int64, "batch");
        var keyPositions = g.Input(KeyPositions, DataType.Int64, "batch", "keys");
        var encoderMask = g.Input(EncoderAttentionMask, DataType.Int64, "batch", "sequence");

        var embedded = g.Op("Gather", "/decoder/embed_tokens/Gather", [T5Weights.Shared(g), ids]);
        var hidden = g.Op("Unsqueeze", "/decoder/embed_tokens/Unsqueeze", [embedded, g.Ints(1)]);
        var selfBias = MakeDecoderPositionBias(g, keyPositions);
        var crossBias = MakeAdditiveMask(g, "/decoder/encoder_attention_mask", encoderMask);

        for (var i = 0; i < c.NumDecoderLayers; i++)
        {
            var name = $"/decoder/block.{i}";
            var prefix = $"language_model.decoder.block.{i}";
            var pastKey = g.Input(PastKey(i), DataType.Float, "batch", c.NumHeads, "past", c.DKv);
            var pastValue = g.Input(PastValue(i), DataType.Float, "batch", c.NumHeads, "past", c.DKv);
            var crossKey = g.Input(T5EncoderGraph.CrossKey(i), DataType.Float, "batch", c.NumHeads, "sequence", c.DKv);
            var crossValue = g.Input(T5EncoderGraph.CrossValue(i), DataType.Float, "batch", c.NumHeads, "sequence", c.DKv);

            // Self-attention over the cache grown by this token.
            var normed = MakeRmsNorm(g, $"{name}/layer.0/layer_norm", hidden, $"{prefix}.layer.0.layer_norm", d, c.LayerNormEpsilon);
            var q = T5Weights.Project(g, $"{name}/layer.0/SelfAttention/q", normed, $"{prefix}.layer.0.SelfAttention.q");
            var k = g.Op("Concat", $"{name}/layer.0/SelfAttention/k/Concat",
                [pastKey, T5Weights.Project(g, $"{name}/layer.0/SelfAttention/k", normed, $"{prefix}.layer.0.SelfAttention.k")], Attr.Int("axis", 2));
            var v = g.Op("Concat", $"{name}/layer.0/SelfAttention/v/Concat",
                [pastValue, T5Weights.Project(g, $"{name}/layer.0/SelfAttention/v", normed, $"{prefix}.layer.0.SelfAttention.v")], Attr.Int("axis", 2));
            g.Output(k, PresentKey(i), DataType.Float, "batch", c.NumHeads, "keys", c.DKv);
            g.Output(v, PresentValue(i), DataType.Float, "batch", c.NumHeads, "keys", c.DKv);
            var attended = MakeAttention(g, $"{name}/layer.0/SelfAttention", q, k, v, AttentionScaling.None, selfBias);
            hidden = g.Op("Add", $"{name}/layer.0/residual", [hidden, T5Weights.Output(g, $"{name}/layer.0/SelfAttention/o", attended, $"{prefix}.layer.0.SelfAttention.o")]);

            // Cross-attention over the encoder output (keys/values precomputed by the encoder graph).
            normed = MakeRmsNorm(g, $"{name}/layer.1/layer_norm", hidden, $"{prefix}.layer.1.layer_norm", d, c.LayerNormEpsilon);
            q = T5Weights.Project(g, $"{name}/layer.1/EncDecAttention/q", normed, $"{prefix}.layer.1.EncDecAttention.q");
            attended = MakeAttention(g, $"{name}/layer.1/EncDecAttention", q, crossKey, crossValue, AttentionScaling.None, crossBias);
            hidden = g.Op("Add", $"{name}/layer.1/residual", [hidden, T5Weights.Output(g, $"{name}/layer.1/EncDecAttention/o", attended, $"{prefix}.layer.1.EncDecAttention.o")]);

            hidden = T5Weights.MakeFeedForward(g, $"{name}/layer.2", hidden, $"{prefix}.layer.2");
        }

        hidden = MakeRmsNorm(g, "/decoder/final_layer_norm", hidden, "language_model.decoder.final_layer_norm", d, c.LayerNormEpsilon);
        var tied = g.Config.TieWordEmbeddings || c.TieWordEmbeddings;
        // T5 rescales before a tied lm_head only when the text config itself ties them.
        if (c.TieWordEmbeddings) hidden = g.Op("Mul", "/decoder/lm_head/Rescale", [hidden, g.Float((float)Math.Pow(d, -0.5))]);
        var lmHead = tied ? T5Weights.SharedName(g) : "language_model.lm_head.weight";
        var logits = g.MatMulTransposed("/lm_head", hidden, lmHead, c.VocabSize, d);
        g.Output(g.Op("Squeeze", "/lm_head/Squeeze", [logits, g.Ints(1)]), Logits, DataType.Float, "batch", c.VocabSize);
        return g.Build();
    }

    /// <summary>
    /// Causal relative position bias for each row's new token, with empty slots masked:
    /// <code>
    /// key_positions ─(− own position)─bucket─Gather─Transpose──▶ [B, H, 1, K]
    /// key_positions &lt; 0 ─Cast─× float.min──────────────────────▶ (+)
    /// </code>
    /// </summary>
    private static string MakeDecoderPositionBias(OnnxGraphBuilder g, string keyPositions)
    {
        const string name = "/decoder/block.0/layer.0/SelfAttention/relative_attention_bias";
        var c = g.Config.Text;
        var own = g.Op("Slice", $"{name}/OwnPosition", [keyPositions, g.Ints(-1), g.Ints(long.MaxValue), g.Ints(1)]);
        var relative = g.Op("Sub", $"{name}/Relative", [keyPositions, own]);
        var buckets = MakeRelativePositionBucket(g, $"{name}/buckets", relative, bidirectional: false, c.RelativeAttentionNumBuckets, c.RelativeAttentionMaxDistance);
        var table = g.Weight("language_model.decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", c.RelativeAttentionNumBuckets, c.NumHeads);
        var values = g.Op("Gather", $"{name}/Gather", [table, buckets]);
        var perHead = g.Op("Transpose", $"{name}/Transpose", [values], Attr.Ints("perm", 0, 2, 1));
        var bias = g.Op("Unsqueeze", $"{name}/Unsqueeze", [perHead, g.Ints(2)]);
        var empty = g.Op("Cast", $"{name}/EmptySlots", [g.Op("Less", $"{name}/IsEmpty", [keyPositions, g.Int(0)])], Attr.Int("to", (long)DataType.Float));
        var mask = g.Op("Unsqueeze", $"{name}/MaskUnsqueeze", [g.Op("Mul", $"{name}/MaskScale", [empty, g.Float(float.MinValue)]), g.Ints(1, 2)]);
        return g.Op("Add", $"{name}/AddMask", [bias, mask]);
    }
}

/// <summary>T5 pieces shared by the encoder and decoder graphs.</summary>
internal static class T5Weights
{
    /// <summary>The shared token embedding (encoder and decoder embed_tokens are tied to it).</summary>
    public static string Shared(OnnxGraphBuilder g) => g.Weight(SharedName(g), g.Config.Text.VocabSize, g.Config.Text.DModel);

    public static string SharedName(OnnxGraphBuilder g) =>
        g.HasWeight("language_model.shared.weight") ? "language_model.shared.weight" : "language_model.encoder.embed_tokens.weight";

    /// <summary>A bias-free q/k/v projection d_model → heads × d_kv, split into heads [B, H, S, d_kv].</summary>
    public static string Project(OnnxGraphBuilder g, string name, string x, string weightPrefix)
    {
        var c = g.Config.Text;
        var projected = MakeLinear(g, name, x, weightPrefix, c.DModel, c.InnerDim, bias: false);
        return MakeSplitHeads(g, $"{name}/split", projected, c.NumHeads, c.DKv);
    }

    /// <summary>Merges heads and applies the bias-free output projection heads × d_kv → d_model.</summary>
    public static string Output(OnnxGraphBuilder g, string name, string attended, string weightPrefix)
    {
        var c = g.Config.Text;
        var merged = MakeMergeHeads(g, $"{name}/merge", attended, c.NumHeads, c.DKv);
        return MakeLinear(g, name, merged, weightPrefix, c.InnerDim, c.DModel, bias: false);
    }

    /// <summary>
    /// T5LayerFF with its pre-norm and residual:
    /// <code>h ─RMSNorm─┬─wi_0─act─┐
    ///             └─wi_1─────(×)─wo─(+h)──▶   (non-gated: wi─act─wo)</code>
    /// </summary>
    public static string MakeFeedForward(OnnxGraphBuilder g, string name, string hidden, string prefix)
    {
        var c = g.Config.Text;
        long d = c.DModel, ff = c.DFf;
        var normed = MakeRmsNorm(g, $"{name}/layer_norm", hidden, $"{prefix}.layer_norm", d, c.LayerNormEpsilon);
        string inner;
        if (c.IsGatedAct)
        {
            var gate = MakeActivation(g, $"{name}/DenseReluDense/act", MakeLinear(g, $"{name}/DenseReluDense/wi_0", normed, $"{prefix}.DenseReluDense.wi_0", d, ff, bias: false), c.DenseActFn);
            var linear = MakeLinear(g, $"{name}/DenseReluDense/wi_1", normed, $"{prefix}.DenseReluDense.wi_1", d, ff, bias: false);
            inner = g.Op("Mul", $"{name}/DenseReluDense/Gate", [gate, linear]);
        }
        else
        {
            inner = MakeActivation(g, $"{name}/DenseReluDense/act", MakeLinear(g, $"{name}/DenseReluDense/wi", normed, $"{prefix}.DenseReluDense.wi", d, ff, bias: false), c.DenseActFn);
        }
        var output = MakeLinear(g, $"{name}/DenseReluDense/wo", inner, $"{prefix}.DenseReluDense.wo", ff, d, bias: false);
        return g.Op("Add", $"{name}/residual", [hidden, output]);
    }
}

/// <summary>
/// Regroups attention caches for the next batched step, on the device the step runs on: rows from any number of
/// source caches, each brought to the batch's slot count (slots that no kept row uses are cropped, missing ones
/// added as empty slots, in front for the self-attention cache and behind for cross-attention inputs), then empty
/// rows for requests that have no cache yet, then every row put in the order the step wants (which also applies
/// beam search's row choices).
/// <code>
/// source_j ─Slice(kept_j slots)─Pad(pads_j: empty slots)──────────────────┐
/// …                                                                        ├─Concat(rows)─Gather(row_order)─▶ key.{i}, value.{i}
/// ConstantOfShape(fresh_shape): zero rows ─────────────────────────────────┘
/// </code>
/// </summary>
public static class T5CacheRegroupGraph
{
    public const string RowOrder = "row_order";
    public const string FreshShape = "fresh_shape";
    public static string KeptStart(int source) => $"kept_start.{source}";
    public static string KeptEnd(int source) => $"kept_end.{source}";
    public static string Pads(int source) => $"pads.{source}";
    public static string SourceKey(int source, int layer) => $"source.{source}.key.{layer}";
    public static string SourceValue(int source, int layer) => $"source.{source}.value.{layer}";
    public static string Key(int layer) => $"key.{layer}";
    public static string Value(int layer) => $"value.{layer}";

    public static ModelProto Build(OnnxGraphBuilder g, int sources)
    {
        var c = g.Config.Text;
        var order = g.Input(RowOrder, DataType.Int64, "rows");
        var freshShape = g.Input(FreshShape, DataType.Int64, 4);
        var keptStarts = Enumerable.Range(0, sources).Select(j => g.Input(KeptStart(j), DataType.Int64, 1)).ToArray();
        var keptEnds = Enumerable.Range(0, sources).Select(j => g.Input(KeptEnd(j), DataType.Int64, 1)).ToArray();
        var pads = Enumerable.Range(0, sources).Select(j => g.Input(Pads(j), DataType.Int64, 8)).ToArray();
        var fresh = g.Op("ConstantOfShape", "/fresh/ConstantOfShape", [freshShape]);
        for (var i = 0; i < c.NumDecoderLayers; i++)
        {
            foreach (var (kind, source, output) in new[] { ("key", (Func<int, int, string>)SourceKey, Key(i)), ("value", SourceValue, Value(i)) })
            {
                var name = $"/layer.{i}/{kind}";
                var parts = new List<string>();
                for (var j = 0; j < sources; j++)
                {
                    var cache = g.Input(source(j, i), DataType.Float, $"rows_{j}", c.NumHeads, $"slots_{j}", c.DKv);
                    var cropped = g.Op("Slice", $"{name}/source.{j}/Crop", [cache, keptStarts[j], keptEnds[j], g.Ints(2)]);
                    parts.Add(g.Op("Pad", $"{name}/source.{j}/Pad", [cropped, pads[j]]));
                }
                parts.Add(fresh);
                var rows = g.Op("Concat", $"{name}/Concat", [.. parts], Attr.Int("axis", 0));
                g.Output(g.Op("Gather", $"{name}/Gather", [rows, order]), output, DataType.Float, "rows", c.NumHeads, "slots", c.DKv);
            }
        }
        return g.Build();
    }
}
