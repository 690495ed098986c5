using Blip2Mesh.Model.Onnx.Proto;
using static Blip2Mesh.Model.Onnx.Layers;
using DataType = Blip2Mesh.Model.Onnx.Proto.TensorProto.Types.DataType;

namespace Blip2Mesh.Model.Onnx;

/// <summary>How the vision graph receives pixels.</summary>
public abstract record PixelInput
{
    /// <summary>Preprocessed float32 pixel_values [B, 3, H, W], as the HF image processor returns them.</summary>
    public sealed record Normalized : PixelInput;

    /// <summary>
    /// Resized uint8 RGB [B, H, W, 3]; rescale (in float64, as NumPy does) and normalisation (float32) run in the graph.
    /// A null factor or mean/std means the image processor skips that step.
    /// </summary>
    public sealed record Rgb8(double? RescaleFactor, float[]? Mean, float[]? Std) : PixelInput;
}

/// <summary>Blip2VisionModel: pixels → last_hidden_state after post_layernorm ("image_embeds").</summary>
public static class VisionGraph
{
    public const string PixelValues = "pixel_values";
    public const string Pixels = "pixels";
    public const string ImageEmbeds = "image_embeds";

    public static ModelProto Build(OnnxGraphBuilder g, PixelInput input)
    {
        var c = g.Config.Vision;
        var pixelValues = input switch
        {
            PixelInput.Normalized => g.Input(PixelValues, DataType.Float, "batch", 3, c.ImageSize, c.ImageSize),
            PixelInput.Rgb8 rgb => MakeNormalize(g, g.Input(Pixels, DataType.Uint8, "batch", c.ImageSize, c.ImageSize, 3), rgb),
            _ => throw new ArgumentOutOfRangeException(nameof(input)),
        };
        var hidden = MakeEmbeddings(g, pixelValues);
        for (var i = 0; i < c.NumHiddenLayers; i++) hidden = MakeEncoderLayer(g, i, hidden);
        var output = MakeLayerNorm(g, "/vision/post_layernorm", hidden, "vision_model.post_layernorm", c.HiddenSize, c.LayerNormEps);
        g.Output(output, ImageEmbeds, DataType.Float, "batch", c.SequenceLength, c.HiddenSize);
        return g.Build();
    }

    /// <summary>
    /// BlipImageProcessor's rescale and normalize on uint8 NHWC:
    /// <code>pixels ─Transpose(NCHW)─Cast(f64)─×factor─Cast(f32)─(−mean)─(÷std)──▶ pixel_values</code>
    /// </summary>
    private static string MakeNormalize(OnnxGraphBuilder g, string pixels, PixelInput.Rgb8 rgb)
    {
        const string name = "/vision/preprocess";
        var x = g.Op("Transpose", $"{name}/Transpose", [pixels], Attr.Ints("perm", 0, 3, 1, 2));
        if (rgb.RescaleFactor is { } factor)
        {
            var wide = g.Op("Cast", $"{name}/CastDouble", [x], Attr.Int("to", (long)DataType.Double));
            x = g.Op("Mul", $"{name}/Rescale", [wide, g.Doubles([factor])]);
        }
        x = g.Op("Cast", $"{name}/CastFloat", [x], Attr.Int("to", (long)DataType.Float));
        if (rgb.Mean is { } mean && rgb.Std is { } std)
        {
            x = g.Op("Sub", $"{name}/SubMean", [x, g.Floats(mean, 1, 3, 1, 1)]);
            x = g.Op("Div", $"{name}/DivStd", [x, g.Floats(std, 1, 3, 1, 1)]);
        }
        return x;
    }

    /// <summary>
    /// Blip2VisionEmbeddings:
    /// <code>
    /// pixel_values ─Conv(patch)─Reshape─Transpose──▶ patches [B, N, D]
    /// class_embedding ─Expand(B)──▶ Concat(cls ; patches) ─(+ position_embedding)──▶
    /// </code>
    /// </summary>
    private static string MakeEmbeddings(OnnxGraphBuilder g, string pixelValues)
    {
        const string name = "/vision/embeddings";
        var c = g.Config.Vision;
        long d = c.HiddenSize;
        var conv = g.Op("Conv", $"{name}/patch_embedding/Conv",
            [pixelValues, g.Weight("vision_model.embeddings.patch_embedding.weight", d, 3, c.PatchSize, c.PatchSize),
             g.Weight("vision_model.embeddings.patch_embedding.bias", d)],
            Attr.Ints("kernel_shape", c.PatchSize, c.PatchSize), Attr.Ints("strides", c.PatchSize, c.PatchSize));
        var flat = g.Op("Reshape", $"{name}/patch_embedding/Flatten", [conv, g.Ints(0, d, -1)]);
        var patches = g.Op("Transpose", $"{name}/patch_embedding/Transpose", [flat], Attr.Ints("perm", 0, 2, 1));
        var batch = g.Op("Shape", $"{name}/BatchSize", [pixelValues], Attr.Int("start", 0), Attr.Int("end", 1));
        var clsShape = g.Op("Concat", $"{name}/ClassShape", [batch, g.Ints(1, d)], Attr.Int("axis", 0));
        var cls = g.Op("Expand", $"{name}/class_embedding/Expand", [g.Weight("vision_model.embeddings.class_embedding", 1, 1, d), clsShape]);
        var tokens = g.Op("Concat", $"{name}/Concat", [cls, patches], Attr.Int("axis", 1));
        return g.Op("Add", $"{name}/position_embedding/Add",
            [tokens, g.Weight("vision_model.embeddings.position_embedding", 1, c.SequenceLength, d)]);
    }

    /// <summary>
    /// Blip2EncoderLayer (pre-norm):
    /// <code>
    /// h ─LN1─Attention─(+h)──▶ h' ─LN2─MLP─(+h')──▶
    /// </code>
    /// </summary>
    private static string MakeEncoderLayer(OnnxGraphBuilder g, int index, string hidden)
    {
        var c = g.Config.Vision;
        var name = $"/vision/layers.{index}";
        var prefix = $"vision_model.encoder.layers.{index}";
        long d = c.HiddenSize;

        var normed = MakeLayerNorm(g, $"{name}/layer_norm1", hidden, $"{prefix}.layer_norm1", d, c.LayerNormEps);
        var attention = MakeSelfAttention(g, $"{name}/self_attn", normed, $"{prefix}.self_attn");
        hidden = g.Op("Add", $"{name}/residual1", [hidden, attention]);

        normed = MakeLayerNorm(g, $"{name}/layer_norm2", hidden, $"{prefix}.layer_norm2", d, c.LayerNormEps);
        var mlp = MakeLinear(g, $"{name}/mlp/fc1", normed, $"{prefix}.mlp.fc1", d, c.IntermediateSize, bias: true);
        mlp = MakeActivation(g, $"{name}/mlp/act", mlp, c.HiddenAct);
        mlp = MakeLinear(g, $"{name}/mlp/fc2", mlp, $"{prefix}.mlp.fc2", c.IntermediateSize, d, bias: true);
        return g.Op("Add", $"{name}/residual2", [hidden, mlp]);
    }

    /// <summary>
    /// Blip2Attention: one fused qkv projection (its bias holds q_bias, zeros for k, v_bias), split into heads.
    /// <code>x ─qkv─Reshape[B,S,3,H,hd]─Transpose[3,B,H,S,hd]─Split──▶ q, k, v ─Attention(× hd^-0.5)─projection──▶</code>
    /// </summary>
    private static string MakeSelfAttention(OnnxGraphBuilder g, string name, string x, string prefix)
    {
        var c = g.Config.Vision;
        long d = c.HiddenSize, heads = c.NumAttentionHeads, headDim = c.HeadDim;
        var qkv = MakeLinear(g, $"{name}/qkv", x, $"{prefix}.qkv", d, 3 * d, bias: c.QkvBias);
        var reshaped = g.Op("Reshape", $"{name}/qkv/Reshape", [qkv, g.Ints(0, 0, 3, heads, headDim)]);
        var transposed = g.Op("Transpose", $"{name}/qkv/Transpose", [reshaped], Attr.Ints("perm", 2, 0, 3, 1, 4));
        var parts = g.Op("Split", $"{name}/qkv/Split", [transposed], 3, Attr.Int("axis", 0));
        var q = g.Op("Squeeze", $"{name}/q/Squeeze", [parts[0], g.Ints(0)]);
        var k = g.Op("Squeeze", $"{name}/k/Squeeze", [parts[1], g.Ints(0)]);
        var v = g.Op("Squeeze", $"{name}/v/Squeeze", [parts[2], g.Ints(0)]);
        var context = MakeAttention(g, $"{name}/attention", q, k, v, new AttentionScaling.Multiply((float)Math.Pow(headDim, -0.5)), bias: null);
        var merged = MakeMergeHeads(g, $"{name}/merge", context, heads, headDim);
        return MakeLinear(g, $"{name}/projection", merged, $"{prefix}.projection", d, d, bias: true);
    }
}
