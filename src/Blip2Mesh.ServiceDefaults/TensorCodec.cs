using System.Buffers;
using System.Runtime.InteropServices;
using Blip2Mesh.Contracts.Tensor.V1;
using Blip2Mesh.Model.Runtime;
using Google.Protobuf;
using Blip2Mesh.Model.Errors;
using ProtoTensor = Blip2Mesh.Contracts.Tensor.V1.Tensor;

namespace Blip2Mesh.ServiceDefaults;

/// <summary>Tensors to and from the wire: raw little-endian bytes, wrapped without copying when sent.</summary>
public static class TensorCodec
{
    public static ProtoTensor FromFloat(FloatTensor tensor)
    {
        var proto = new ProtoTensor
        {
            Dtype = DType.Float32,
            Data = UnsafeByteOperations.UnsafeWrap(new FloatBytes(tensor.Data).Memory),
        };
        proto.Shape.AddRange(tensor.Shape);
        return proto;
    }

    public static ProtoTensor FromUInt8(byte[] data, params long[] shape)
    {
        var proto = new ProtoTensor { Dtype = DType.Uint8, Data = UnsafeByteOperations.UnsafeWrap(data) };
        proto.Shape.AddRange(shape);
        return proto;
    }

    /// <summary>A float32 tensor whose shape must match <paramref name="expected"/> (−1 = any size), else FAILED_PRECONDITION.</summary>
    public static FloatTensor ToFloat(ProtoTensor? proto, string name, long[] expected, string expectation)
    {
        Check(proto, name, DType.Float32, expected, expectation);
        return new FloatTensor(MemoryMarshal.Cast<byte, float>(proto!.Data.Span).ToArray(), proto.Shape.ToArray());
    }

    public static byte[] ToUInt8(ProtoTensor? proto, string name, long[] expected, string expectation)
    {
        Check(proto, name, DType.Uint8, expected, expectation);
        return proto!.Data.ToByteArray();
    }

    private static void Check(ProtoTensor? proto, string name, DType dtype, long[] expected, string expectation)
    {
        if (proto is null) throw ServingException.Invalid(name, "is missing");
        var shape = proto.Shape;
        var shapeOk = shape.Count == expected.Length && shape.Zip(expected).All(p => p.Second < 0 ? p.First > 0 : p.First == p.Second);
        if (proto.Dtype != dtype || !shapeOk)
            throw ServingException.Mismatch(
                $"{name} is {proto.Dtype} [{string.Join(", ", shape)}] but this stage takes {dtype} [{string.Join(", ", expected.Select(d => d < 0 ? "N" : d.ToString()))}] ({expectation})");
        var bytes = shape.Aggregate(1L, (a, b) => a * b) * (dtype == DType.Uint8 ? 1 : 4);
        if (proto.Data.Length != bytes)
            throw ServingException.Invalid(name, $"holds {proto.Data.Length} bytes, its shape needs {bytes}");
    }

    /// <summary>A float array seen as bytes, so protobuf can send it without a copy.</summary>
    private sealed class FloatBytes(float[] data) : MemoryManager<byte>
    {
        public override Span<byte> GetSpan() => MemoryMarshal.AsBytes(data.AsSpan());

        // Each pin is its own handle, freed when the caller disposes the MemoryHandle.
        public override unsafe MemoryHandle Pin(int elementIndex = 0)
        {
            var pin = GCHandle.Alloc(data, GCHandleType.Pinned);
            return new MemoryHandle((byte*)pin.AddrOfPinnedObject() + elementIndex, pin);
        }

        public override void Unpin() { }

        protected override void Dispose(bool disposing) { }
    }
}

/// <summary>Checks that caller and stage run the same model, naming both fingerprints when they do not.</summary>
public static class ModelFingerprint
{
    public static void Check(string requested, string served, string stage)
    {
        if (!string.IsNullOrEmpty(requested) && requested != served)
            throw ServingException.Mismatch($"model mismatch: the caller expects model {requested} but the {stage} stage serves model {served}");
    }
}
