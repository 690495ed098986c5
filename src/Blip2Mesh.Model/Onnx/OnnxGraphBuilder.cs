using System.Runtime.InteropServices;
using Blip2Mesh.Model.Checkpoint;
using Blip2Mesh.Model.Onnx.Proto;
using Google.Protobuf;

namespace Blip2Mesh.Model.Onnx;

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
    private readonly GraphProto _graph;
    private readonly Dictionary<string, string> _weights = new(StringComparer.Ordinal);
    private readonly Dictionary<string, string> _constants = new(StringComparer.Ordinal);
    private readonly HashSet<string> _nodeNames = new(StringComparer.Ordinal);

    /// <param name="weights">A checkpoint, or anything else that can say where each weight lives (see <see cref="IWeightSource"/>).</param>
    public OnnxGraphBuilder(IWeightSource weights, string graphName)
    {
        _weightSource = weights;
        _graph = new GraphProto { Name = graphName };
    }

    public Blip2Config Config => _weightSource.Config;

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
        var tensor = new TensorProto
        {
            Name = hfName,
            DataType = (int)ToOnnx(weight.DType),
            DataLocation = TensorProto.Types.DataLocation.External,
        };
        tensor.Dims.AddRange(weight.Shape);
        tensor.ExternalData.Add(new StringStringEntryProto { Key = "location", Value = weight.Location });
        tensor.ExternalData.Add(new StringStringEntryProto { Key = "offset", Value = weight.Offset.ToString() });
        tensor.ExternalData.Add(new StringStringEntryProto { Key = "length", Value = weight.Length.ToString() });
        _graph.Initializer.Add(tensor);
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
