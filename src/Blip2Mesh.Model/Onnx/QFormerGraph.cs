using Blip2Mesh.Model.Onnx.Proto;
using static Blip2Mesh.Model.Onnx.Layers;
using DataType = Blip2Mesh.Model.Onnx.Proto.TensorProto.Types.DataType;

namespace Blip2Mesh.Model.Onnx;

/// <summary>
/// Blip2QFormerModel over the learned query tokens, then language_projection:
/// image_embeds → query_output [B, Q, Dq] → query_embeds [B, Q, d_model] (the LLM-space vectors worth caching).
/// </summary>
public static class QFormerGraph
{
    public const string ImageEmbeds = "image_embeds";
    public const string QueryOutput = "query_output";
    public const string QueryEmbeds = "query_embeds";

    public static ModelProto Build(OnnxGraphBuilder g)
    {
        var c = g.Config.QFormer;
        var vision = g.Config.Vision;
        long q = g.Config.NumQueryTokens, d = c.HiddenSize;
        var imageEmbeds = g.Input(ImageEmbeds, DataType.Float, "batch", vision.SequenceLength, c.EncoderHiddenSize);

        // The queries are layer-normed once before the first layer.
        var batch = g.Op("Shape", "/qformer/BatchSize", [imageEmbeds], Attr.Int("start", 0), Attr.Int("end", 1));
        var shape = g.Op("Concat", "/qformer/QueryShape", [batch, g.Ints(q, d)], Attr.Int("axis", 0));
        var queries = g.Op("Expand", "/qformer/query_tokens/Expand", [g.Weight("query_tokens", 1, q, d), shape]);
        var hidden = MakeLayerNorm(g, "/qformer/layernorm", queries, "qformer.layernorm", d, c.LayerNormEps);

        for (var i = 0; i < c.NumHiddenLayers; i++) hidden = MakeLayer(g, i, hidden, imageEmbeds);
        g.Output(hidden, QueryOutput, DataType.Float, "batch", q, d);

        var projected = MakeLinear(g, "/language_projection", hidden, "language_projection", d, g.Config.Text.DModel, bias: true);
        g.Output(projected, QueryEmbeds, DataType.Float, "batch", q, g.Config.Text.DModel);
        return g.Build();
    }

    /// <summary>
    /// Blip2QFormerLayer for the query tokens (post-norm BERT):
    /// <code>
    /// h ─SelfAttention─Output(LN(x + h))──▶ ─[CrossAttention(image)─Output(LN)]──▶ ─intermediate_query─output_query(LN)──▶
    /// </code>
    /// Cross-attention exists only on every cross_attention_frequency-th layer.
    /// </summary>
    private static string MakeLayer(OnnxGraphBuilder g, int index, string hidden, string imageEmbeds)
    {
        var c = g.Config.QFormer;
        var name = $"/qformer/layer.{index}";
        var prefix = $"qformer.encoder.layer.{index}";
        long d = c.HiddenSize;

        hidden = MakeBertAttention(g, $"{name}/attention", hidden, hidden, d, $"{prefix}.attention");
        if (c.HasCrossAttention(index))
            hidden = MakeBertAttention(g, $"{name}/crossattention", hidden, imageEmbeds, c.EncoderHiddenSize, $"{prefix}.crossattention");

        var intermediate = MakeLinear(g, $"{name}/intermediate_query/dense", hidden, $"{prefix}.intermediate_query.dense", d, c.IntermediateSize, bias: true);
        intermediate = MakeActivation(g, $"{name}/intermediate_query/act", intermediate, c.HiddenAct);
        var output = MakeLinear(g, $"{name}/output_query/dense", intermediate, $"{prefix}.output_query.dense", c.IntermediateSize, d, bias: true);
        output = g.Op("Add", $"{name}/output_query/residual", [output, hidden]);
        return MakeLayerNorm(g, $"{name}/output_query/LayerNorm", output, $"{prefix}.output_query.LayerNorm", d, c.LayerNormEps);
    }

    /// <summary>
    /// BERT attention block: multi-head attention (scores ÷ sqrt(head_dim)), then dense + residual + LayerNorm.
    /// Keys and values come from <paramref name="context"/> (the queries themselves, or the image embeddings).
    /// </summary>
    private static string MakeBertAttention(OnnxGraphBuilder g, string name, string hidden, string context, long contextSize, string prefix)
    {
        var c = g.Config.QFormer;
        long d = c.HiddenSize, heads = c.NumAttentionHeads, headDim = c.HeadDim;
        var q = MakeSplitHeads(g, $"{name}/query/split", MakeLinear(g, $"{name}/query", hidden, $"{prefix}.attention.query", d, d, bias: true), heads, headDim);
        var k = MakeSplitHeads(g, $"{name}/key/split", MakeLinear(g, $"{name}/key", context, $"{prefix}.attention.key", contextSize, d, bias: true), heads, headDim);
        var v = MakeSplitHeads(g, $"{name}/value/split", MakeLinear(g, $"{name}/value", context, $"{prefix}.attention.value", contextSize, d, bias: true), heads, headDim);
        var attended = MakeAttention(g, $"{name}/attention", q, k, v, new AttentionScaling.Divide((float)Math.Sqrt(headDim)), bias: null);
        var merged = MakeMergeHeads(g, $"{name}/merge", attended, heads, headDim);
        var dense = MakeLinear(g, $"{name}/output/dense", merged, $"{prefix}.output.dense", d, d, bias: true);
        var residual = g.Op("Add", $"{name}/output/residual", [dense, hidden]);
        return MakeLayerNorm(g, $"{name}/output/LayerNorm", residual, $"{prefix}.output.LayerNorm", d, c.LayerNormEps);
    }
}
