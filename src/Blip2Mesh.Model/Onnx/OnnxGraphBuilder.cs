using System.Runtime.InteropServices;
using Blip2Mesh.Model.Checkpoint;
using Blip2Mesh.Model.Onnx.Proto;
using Blip2Mesh.Model.Quantization;
using Google.Protobuf;

namespace Blip2Mesh.Model.Onnx;

/// <summary>How quantized Linears multiply: the least precise arithmetic they may use on the activations.</summary>
public enum QuantizedCompute
{
    /// <summary>float32 products with the dequantized weights, so the weights' rounding is the only error (MatMulNBits'
    /// accuracy_level 0, which dequantizes every run for 8-bit weights on x86; per channel, MatMul on the weights widened at load).</summary>
    Float32 = 0,
    /// <summary>
    /// Activations rounded to int8 and integer dot products: per block for MatMulNBits (accuracy_level 4: AVX2/VNNI,
    /// ARM SDOT; CUDA's kernels ignore it), per row for MatMulIntegerToFloat. On the demo dev set it moves block int8 from
    /// 98.9% to 98.6% of answers equal to float32's and int4 from 92.8% to 93.1%, and block int8 from 0.68 to
    /// 0.26 ms/token (exact weights: 0.28).
    /// </summary>
    Int8 = 4,
}

/// <summary>An ONNX node attribute.</summary>
public sealed record Attr(string Name, AttributeProto Proto)
{
    public static Attr Int(string name, long value) => new(name, new AttributeProto { Name = name, Type = AttributeProto.Types.AttributeType.Int, I = value });
    public static Attr Float(string name, float value) => new(name, new AttributeProto { Name = name, Type = AttributeProto.Types.AttributeType.Float, F = value });
    public static Attr Ints(string name, params long[] values)
    {
        var proto = new AttributeProto { Name = name, Type = AttributeProto.Types.AttributeType.Ints };
        proto.Ints.AddRange(values);
        return new(name, proto);
    }
}

/// <summary>
/// Builds one ONNX graph node by node, in the style of ONNX Runtime GenAI's model builder: node names say
/// where they sit (mirroring the Hugging Face weight names), outputs are "{node}/output_0", shared constants
/// are created once, and weights are initializers whose external data points straight into the checkpoint's
/// safetensors shards, so no copy of the weights is ever written.
/// </summary>
public sealed class OnnxGraphBuilder
{
    public const string MicrosoftDomain = "com.microsoft";
    private const int Opset = 17;

    private readonly IWeightSource _weightSource;
    private readonly Func<string, LinearQuantization?>? _linears;
    private readonly QuantizedCompute _compute;
    private readonly GraphProto _graph;
    private readonly Dictionary<string, string> _weights = new(StringComparer.Ordinal);
    private readonly Dictionary<string, string> _constants = new(StringComparer.Ordinal);
    private readonly HashSet<string> _nodeNames = new(StringComparer.Ordinal);

    /// <param name="weights">A checkpoint, or anything else that can say where each weight lives (see <see cref="IWeightSource"/>).</param>
    /// <param name="linears">How each Linear weight (by HF name) is stored, null meaning exact; without it every
    /// Linear is exact. When given, <paramref name="weights"/> must be able to quantize (an <see cref="IQuantizedWeightSource"/>).</param>
    /// <param name="compute">How quantized Linears multiply.</param>
    public OnnxGraphBuilder(IWeightSource weights, string graphName, Func<string, LinearQuantization?>? linears = null,
        QuantizedCompute compute = QuantizedCompute.Int8)
    {
        _compute = compute;
        if (linears is not null && weights is not IQuantizedWeightSource)
            throw new ArgumentException("quantized Linear weights need a weight source that can quantize them", nameof(weights));
        _weightSource = weights;
        _linears = linears;
        _graph = new GraphProto { Name = graphName };
    }

    public Blip2Config Config => _weightSource.Config;

    /// <summary>
    /// x · Wᵀ for the Linear weight <paramref name="hfName"/> ([out, in], HF's layout): FusedMatMul(transB) on the
    /// exact weight, or, when this graph's Linears are quantized, MatMulNBits on its block-quantized form or
    /// MatMulIntegerToFloat on its per-channel form.
    /// </summary>
    public string MatMulTransposed(string name, string x, string hfName, long outFeatures, long inFeatures)
    {
        switch (_linears?.Invoke(hfName))
        {
            case BlockQuantization q:
                var (packed, scales) = QuantizedWeight(hfName, outFeatures, inFeatures, q,
                    TensorProto.Types.DataType.Uint8, [outFeatures, q.BlockCount(inFeatures), q.BlobBytes]);
                return MsOp("MatMulNBits", $"{name}/MatMulNBits", [x, packed, scales],
                    Attr.Int("K", inFeatures), Attr.Int("N", outFeatures), Attr.Int("bits", q.Bits), Attr.Int("block_size", q.BlockSize), Attr.Int("accuracy_level", (long)_compute));
            case ChannelQuantization q:
                var (weights, weightScales) = QuantizedWeight(hfName, outFeatures, inFeatures, q, TensorProto.Types.DataType.Int8, [inFeatures, outFeatures]);
                if (_compute != QuantizedCompute.Float32) return RowQuantizedMatMul(name, x, weights, weightScales, inFeatures, outFeatures);
                // Cast × scale, folded into a float32 initializer at load (a DequantizeLinear would be fused back into an int8 kernel).
                var dequantized = Op("Mul", $"{name}/Dequantize", [Op("Cast", $"{name}/WeightToFloat", [weights], Attr.Int("to", (long)TensorProto.Types.DataType.Float)), weightScales]);
                return Op("MatMul", $"{name}/MatMul", [x, dequantized]);
            default:
                return MsOp("FusedMatMul", $"{name}/MatMul", [x, Weight(hfName, outFeatures, inFeatures)], Attr.Int("transB", 1));
        }
    }

    /// <summary>
    /// x · W for int8 W [K, N] with one scale per column: each row of x is rounded to int8 with its own scale
    /// s_r = max|x_r| / 127 (stored offset by 128 as uint8, the integer GEMM's fast unsigned × signed form),
    /// multiplied in integers, scaled by s_n in the GEMM's epilogue and by s_r after it.
    /// <code>
    /// x ─▶ [rows, K] ─▶ s_r = max(ReduceMax x, −ReduceMin x) / 127 ─▶ QuantizeLinear(x, s_r, 128, axis 0)
    ///   ─▶ MatMulIntegerToFloat(·, W, 1, s_n, 128) ─▶ × s_r ─▶ [..., N]
    /// </code>
    /// </summary>
    private string RowQuantizedMatMul(string name, string x, string weights, string weightScales, long inFeatures, long outFeatures)
    {
        var rows = Op("Reshape", $"{name}/Rows", [x, Ints(-1, inFeatures)]);
        var max = Op("ReduceMax", $"{name}/RowMax", [rows], Attr.Ints("axes", 1), Attr.Int("keepdims", 0));
        var min = Op("ReduceMin", $"{name}/RowMin", [rows], Attr.Ints("axes", 1), Attr.Int("keepdims", 0));
        var absMax = Op("Max", $"{name}/RowAbsMax", [max, Op("Neg", $"{name}/NegMin", [min]), Float(1e-30f)]); // 1e-30: an all-zero row, not 0/0
        var rowScale = Op("Mul", $"{name}/RowScale", [absMax, Float(1f / 127)]);
        var offset = Constant(TensorProto.Types.DataType.Uint8, [128], []);
        var rowOffsets = Op("Expand", $"{name}/RowOffsets", [offset, Op("Shape", $"{name}/RowCount", [rowScale])]);
        var levels = Op("QuantizeLinear", $"{name}/QuantizeRows", [rows, rowScale, rowOffsets], Attr.Int("axis", 0));
        var products = MsOp("MatMulIntegerToFloat", $"{name}/MatMulIntegerToFloat", [levels, weights, Float(1f), weightScales, offset]);
        var scaled = Op("Mul", $"{name}/RowRescale", [products, Op("Unsqueeze", $"{name}/RowScaleColumn", [rowScale, Ints(1)])]);
        var leading = Op("Slice", $"{name}/LeadingDims", [Op("Shape", $"{name}/InputShape", [x]), Ints(0), Ints(-1)]);
        return Op("Reshape", $"{name}/Unrows", [scaled, Op("Concat", $"{name}/OutputShape", [leading, Ints(outFeatures)], Attr.Int("axis", 0))]);
    }

    private (string Packed, string Scales) QuantizedWeight(string hfName, long outFeatures, long inFeatures, LinearQuantization q,
        TensorProto.Types.DataType packedType, long[] packedDims)
    {
        var packedName = $"{hfName}.{q.CacheKey}_packed";
        var scalesName = $"{hfName}.{q.CacheKey}_scales";
        if (_weights.ContainsKey(packedName)) return (packedName, scalesName);
        var weight = ((IQuantizedWeightSource)_weightSource).DescribeQuantized(hfName, outFeatures, inFeatures, q);
        AddExternal(packedName, packedType, packedDims, weight.Location, 0, weight.PackedLength);
        AddExternal(scalesName, TensorProto.Types.DataType.Float, [weight.ScalesLength / sizeof(float)], weight.Location, weight.ScalesOffset, weight.ScalesLength);
        _weights[packedName] = packedName;
        _weights[scalesName] = scalesName;
        return (packedName, scalesName);
    }

    private void AddExternal(string name, TensorProto.Types.DataType type, long[] dims, string location, long offset, long length)
    {
        var tensor = new TensorProto { Name = name, DataType = (int)type, DataLocation = TensorProto.Types.DataLocation.External };
        tensor.Dims.AddRange(dims);
        tensor.ExternalData.Add(new StringStringEntryProto { Key = "location", Value = location });
        tensor.ExternalData.Add(new StringStringEntryProto { Key = "offset", Value = offset.ToString() });
        tensor.ExternalData.Add(new StringStringEntryProto { Key = "length", Value = length.ToString() });
        _graph.Initializer.Add(tensor);
    }

    /// <summary>Declares a graph input; a dimension is a long (fixed) or a string (symbolic).</summary>
    public string Input(string name, TensorProto.Types.DataType type, params object[] dims)
    {
        _graph.Input.Add(ValueInfo(name, type, dims));
        return name;
    }

    /// <summary>Exposes <paramref name="value"/> as the graph output <paramref name="name"/>.</summary>
    public void Output(string value, string name, TensorProto.Types.DataType type, params object[] dims)
    {
        var node = new NodeProto { Name = $"/outputs/{name}", OpType = "Identity" };
        node.Input.Add(value);
        node.Output.Add(name);
        _graph.Node.Add(node);
        _graph.Output.Add(ValueInfo(name, type, dims));
    }

    /// <summary>Adds a node with one output and returns that output's name.</summary>
    public string Op(string opType, string name, string[] inputs, params Attr[] attrs) =>
        Op(opType, name, inputs, 1, attrs)[0];

    public string[] Op(string opType, string name, string[] inputs, int outputCount, params Attr[] attrs) =>
        AddNode(opType, "", name, inputs, outputCount, attrs);

    /// <summary>Adds a contrib operator from ONNX Runtime's com.microsoft domain.</summary>
    public string MsOp(string opType, string name, string[] inputs, params Attr[] attrs) =>
        AddNode(opType, MicrosoftDomain, name, inputs, 1, attrs)[0];

    private string[] AddNode(string opType, string domain, string name, string[] inputs, int outputCount, Attr[] attrs)
    {
        if (!_nodeNames.Add(name)) throw new InvalidOperationException($"duplicate node name '{name}'");
        var node = new NodeProto { Name = name, OpType = opType, Domain = domain };
        node.Input.AddRange(inputs);
        var outputs = Enumerable.Range(0, outputCount).Select(i => $"{name}/output_{i}").ToArray();
        node.Output.AddRange(outputs);
        node.Attribute.AddRange(attrs.Select(a => a.Proto));
        _graph.Node.Add(node);
        return outputs;
    }

    /// <summary>
    /// The checkpoint weight <paramref name="hfName"/> as a float32 value, shape-checked against config.json.
    /// Stored float32 weights are used in place; float16/bfloat16 ones get a Cast that ORT folds at load.
    /// </summary>
    public string Weight(string hfName, params long[] shape)
    {
        if (_weights.TryGetValue(hfName, out var existing)) return existing;
        var weight = _weightSource.Describe(hfName, shape);
        AddExternal(hfName, ToOnnx(weight.DType), weight.Shape, weight.Location, weight.Offset, weight.Length);
        var value = weight.DType == TensorDType.Float32
            ? hfName
            : Op("Cast", $"/weights/{hfName}/Cast", [hfName], Attr.Int("to", (long)TensorProto.Types.DataType.Float));
        _weights[hfName] = value;
        return value;
    }

    public bool HasWeight(string hfName) => _weightSource.Has(hfName);

    public string Floats(float[] values, params long[] dims) =>
        Constant(TensorProto.Types.DataType.Float, MemoryMarshal.AsBytes(values.AsSpan()), dims);

    public string Float(float value) => Floats([value]);

    public string Doubles(double[] values, params long[] dims) =>
        Constant(TensorProto.Types.DataType.Double, MemoryMarshal.AsBytes(values.AsSpan()), dims);

    public string Ints(long[] values, params long[] dims) =>
        Constant(TensorProto.Types.DataType.Int64, MemoryMarshal.AsBytes(values.AsSpan()), dims);

    /// <summary>A 1-D int64 constant, the usual form of shapes, axes and indices.</summary>
    public string Ints(params long[] values) => Ints(values, values.Length);

    public string Int(long value) => Ints([value], []);

    private string Constant(TensorProto.Types.DataType type, ReadOnlySpan<byte> raw, long[] dims)
    {
        var key = $"{type}|{string.Join(",", dims)}|{Convert.ToHexString(raw)}";
        if (_constants.TryGetValue(key, out var existing)) return existing;
        var name = $"/constants/{_constants.Count}";
        var tensor = new TensorProto { Name = name, DataType = (int)type, RawData = ByteString.CopyFrom(raw) };
        tensor.Dims.AddRange(dims);
        _graph.Initializer.Add(tensor);
        _constants[key] = name;
        return name;
    }

    public ModelProto Build()
    {
        var model = new ModelProto { IrVersion = 8, ProducerName = "blip2mesh", Graph = _graph };
        model.OpsetImport.Add(new OperatorSetIdProto { Domain = "", Version = Opset });
        model.OpsetImport.Add(new OperatorSetIdProto { Domain = MicrosoftDomain, Version = 1 });
        return model;
    }

    public static TensorProto.Types.DataType ToOnnx(TensorDType dtype) => dtype switch
    {
        TensorDType.Float32 => TensorProto.Types.DataType.Float,
        TensorDType.Float16 => TensorProto.Types.DataType.Float16,
        TensorDType.BFloat16 => TensorProto.Types.DataType.Bfloat16,
        TensorDType.Int64 => TensorProto.Types.DataType.Int64,
        TensorDType.Int32 => TensorProto.Types.DataType.Int32,
        TensorDType.UInt8 => TensorProto.Types.DataType.Uint8,
        _ => throw new ArgumentOutOfRangeException(nameof(dtype)),
    };

    private static ValueInfoProto ValueInfo(string name, TensorProto.Types.DataType type, object[] dims)
    {
        var shape = new TensorShapeProto();
        foreach (var dim in dims)
        {
            shape.Dim.Add(dim switch
            {
                string symbol => new TensorShapeProto.Types.Dimension { DimParam = symbol },
                int n => new TensorShapeProto.Types.Dimension { DimValue = n },
                long n => new TensorShapeProto.Types.Dimension { DimValue = n },
                _ => throw new ArgumentException($"dimension {dim} of '{name}' is neither a number nor a symbol"),
            });
        }
        return new ValueInfoProto
        {
            Name = name,
            Type = new TypeProto { TensorType = new TypeProto.Types.Tensor { ElemType = (int)type, Shape = shape } },
        };
    }
}
