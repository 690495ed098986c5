namespace Blip2Mesh.Model.Onnx;

/// <summary>
/// The sub-blocks every stage graph is made of, one small Make… function each. Names passed in are the node
/// prefix (e.g. "/vision/layers.3/attn") and the Hugging Face weight prefix (e.g. "vision_model.encoder.layers.3").
/// </summary>
public static class Layers
{
    /// <summary>
    /// nn.Linear with HF's [out, in] weight layout (exact or block-quantized, see <see cref="OnnxGraphBuilder.MatMulTransposed"/>):
    /// <code>x ──FusedMatMul(transB) | MatMulNBits──▶ (+ bias) ──▶</code>
    /// </summary>
    public static string MakeLinear(OnnxGraphBuilder g, string name, string x, string weightPrefix, long inFeatures, long outFeatures, bool bias)
    {
        var y = g.MatMulTransposed(name, x, $"{weightPrefix}.weight", outFeatures, inFeatures);
        if (!bias) return y;
        var b = g.Weight($"{weightPrefix}.bias", outFeatures);
        return g.Op("Add", $"{name}/Add", [y, b]);
    }

    public static string MakeLayerNorm(OnnxGraphBuilder g, string name, string x, string weightPrefix, long size, double eps) =>
        g.Op("LayerNormalization", $"{name}/LayerNorm",
            [x, g.Weight($"{weightPrefix}.weight", size), g.Weight($"{weightPrefix}.bias", size)],
            Attr.Int("axis", -1), Attr.Float("epsilon", (float)eps));

    /// <summary>T5LayerNorm: x * rsqrt(mean(x²) + eps) * weight; no mean subtraction, no bias. (ORT registers this fused op in the ONNX domain.)</summary>
    public static string MakeRmsNorm(OnnxGraphBuilder g, string name, string x, string weightPrefix, long size, double eps) =>
        g.Op("SimplifiedLayerNormalization", $"{name}/RMSNorm",
            [x, g.Weight($"{weightPrefix}.weight", size)],
            Attr.Int("axis", -1), Attr.Float("epsilon", (float)eps));

    /// <summary>transformers' ACT2FN (gelu = erf form, gelu_new = tanh form).</summary>
    public static string MakeActivation(OnnxGraphBuilder g, string name, string x, string act)
    {
        switch (act)
        {
            case "gelu":
                // 0.5 * x * (1 + erf(x / sqrt(2))) in one pass (ONNX Runtime's Gelu, the same float32 operations as
                // Mul, Erf, Add, Mul, Mul): at XL the five ops took 160 ms of an image's vision run.
                return g.MsOp("Gelu", $"{name}/Gelu", [x]);
            case "gelu_new" or "gelu_pytorch_tanh" or "gelu_fast":
                // 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))
                var cube = g.Op("Pow", $"{name}/Pow", [x, g.Float(3f)]);
                var inner = g.Op("Add", $"{name}/Inner", [x, g.Op("Mul", $"{name}/Cubic", [cube, g.Float(0.044715f)])]);
                var tanh = g.Op("Tanh", $"{name}/Tanh", [g.Op("Mul", $"{name}/Scale", [inner, g.Float((float)Math.Sqrt(2 / Math.PI))])]);
                var gate = g.Op("Add", $"{name}/AddOne", [tanh, g.Float(1f)]);
                return g.Op("Mul", $"{name}/Mul", [g.Op("Mul", $"{name}/Half", [x, g.Float(0.5f)]), gate]);
            case "relu":
                return g.Op("Relu", $"{name}/Relu", [x]);
            case "silu" or "swish":
                return g.Op("Mul", $"{name}/Mul", [x, g.Op("Sigmoid", $"{name}/Sigmoid", [x])]);
            case "quick_gelu":
                return g.Op("Mul", $"{name}/Mul", [x, g.Op("Sigmoid", $"{name}/Sigmoid", [g.Op("Mul", $"{name}/Scale", [x, g.Float(1.702f)])])]);
            default:
                throw new NotSupportedException($"activation '{act}' is not supported");
        }
    }

    /// <summary>[B, S, heads*dim] → [B, heads, S, dim]</summary>
    public static string MakeSplitHeads(OnnxGraphBuilder g, string name, string x, long heads, long headDim)
    {
        var reshaped = g.Op("Reshape", $"{name}/Reshape", [x, g.Ints(0, 0, heads, headDim)]);
        return g.Op("Transpose", $"{name}/Transpose", [reshaped], Attr.Ints("perm", 0, 2, 1, 3));
    }

    /// <summary>[B, heads, S, dim] → [B, S, heads*dim]</summary>
    public static string MakeMergeHeads(OnnxGraphBuilder g, string name, string x, long heads, long headDim)
    {
        var transposed = g.Op("Transpose", $"{name}/Transpose", [x], Attr.Ints("perm", 0, 2, 1, 3));
        return g.Op("Reshape", $"{name}/Reshape", [transposed, g.Ints(0, 0, heads * headDim)]);
    }

    /// <summary>
    /// Scaled dot-product attention on split heads:
    /// <code>
    /// q ─┐
    ///    MatMul(q, kᵀ) ──▶ (× scale | ÷ divisor) ──▶ (+ bias) ──▶ Softmax ──▶ MatMul(·, v)
    /// k ─┘
    /// </code>
    /// Scaling is applied the way each HF model does it (BLIP vision multiplies, BERT divides, T5 does neither).
    /// </summary>
    public static string MakeAttention(OnnxGraphBuilder g, string name, string q, string k, string v, AttentionScaling scaling, string? bias)
    {
        var kT = g.Op("Transpose", $"{name}/TransposeK", [k], Attr.Ints("perm", 0, 1, 3, 2));
        var scores = g.Op("MatMul", $"{name}/QK", [q, kT]);
        scores = scaling switch
        {
            AttentionScaling.NoScaling => scores,
            AttentionScaling.Multiply m => g.Op("Mul", $"{name}/Scale", [scores, g.Float(m.Factor)]),
            AttentionScaling.Divide d => g.Op("Div", $"{name}/Scale", [scores, g.Float(d.Divisor)]),
            _ => throw new ArgumentOutOfRangeException(nameof(scaling)),
        };
        if (bias is not null) scores = g.Op("Add", $"{name}/AddBias", [scores, bias]);
        var probs = g.Op("Softmax", $"{name}/Softmax", [scores], Attr.Int("axis", -1));
        return g.Op("MatMul", $"{name}/PV", [probs, v]);
    }

    /// <summary>
    /// HF T5's _relative_position_bucket on int64 relative positions (key − query), computed in float32 exactly
    /// as torch does (log, divisions and truncation), so bucket boundaries land where the reference puts them.
    /// </summary>
    public static string MakeRelativePositionBucket(OnnxGraphBuilder g, string name, string relative, bool bidirectional, int numBuckets, int maxDistance)
    {
        string buckets;
        string distance;
        if (bidirectional)
        {
            numBuckets /= 2;
            var positive = g.Op("Greater", $"{name}/IsPositive", [relative, g.Int(0)]);
            buckets = g.Op("Mul", $"{name}/DirectionOffset", [g.Op("Cast", $"{name}/CastPositive", [positive], Attr.Int("to", 7)), g.Int(numBuckets)]);
            distance = g.Op("Abs", $"{name}/Abs", [relative]);
        }
        else
        {
            buckets = g.Int(0);
            distance = g.Op("Neg", $"{name}/Neg", [g.Op("Min", $"{name}/Min0", [relative, g.Int(0)])]);
        }
        var maxExact = numBuckets / 2;
        var isSmall = g.Op("Less", $"{name}/IsSmall", [distance, g.Int(maxExact)]);
        var asFloat = g.Op("Cast", $"{name}/CastFloat", [distance], Attr.Int("to", 1));
        var logRatio = g.Op("Log", $"{name}/Log", [g.Op("Div", $"{name}/DivExact", [asFloat, g.Float(maxExact)])]);
        var scaled = g.Op("Mul", $"{name}/MulBuckets",
            [g.Op("Div", $"{name}/DivLogMax", [logRatio, g.Float((float)Math.Log((double)maxDistance / maxExact))]), g.Float(numBuckets - maxExact)]);
        var large = g.Op("Add", $"{name}/AddExact", [g.Op("Cast", $"{name}/CastLong", [scaled], Attr.Int("to", 7)), g.Int(maxExact)]);
        large = g.Op("Min", $"{name}/Clamp", [large, g.Int(numBuckets - 1)]);
        return g.Op("Add", $"{name}/Bucket", [buckets, g.Op("Where", $"{name}/Where", [isSmall, distance, large])]);
    }

    /// <summary>(1 − mask) × float32.min, the additive form HF gives an int attention mask; [B, S] → [B, 1, 1, S].</summary>
    public static string MakeAdditiveMask(OnnxGraphBuilder g, string name, string mask)
    {
        var inverted = g.Op("Sub", $"{name}/Invert", [g.Float(1f), g.Op("Cast", $"{name}/Cast", [mask], Attr.Int("to", 1))]);
        var additive = g.Op("Mul", $"{name}/Scale", [inverted, g.Float(float.MinValue)]);
        return g.Op("Unsqueeze", $"{name}/Unsqueeze", [additive, g.Ints(1, 2)]);
    }
}

/// <summary>How attention scores are scaled before the softmax.</summary>
public abstract record AttentionScaling
{
    public static readonly AttentionScaling None = new NoScaling();
    public sealed record NoScaling : AttentionScaling;
    public sealed record Multiply(float Factor) : AttentionScaling;
    public sealed record Divide(float Divisor) : AttentionScaling;
}
