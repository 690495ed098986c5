using Blip2Mesh.Model.Checkpoint;
using Blip2Mesh.Model.Onnx.Proto;
using Google.Protobuf;
using Microsoft.ML.OnnxRuntime;

namespace Blip2Mesh.Model.Runtime;

/// <summary>One stage graph loaded into ONNX Runtime.</summary>
public sealed class StageSession : IDisposable
{
    private readonly InferenceSession _session;

    public string Name { get; }
    public List<string> OutputNames { get; }

    public StageSession(string name, ModelProto model, Blip2Checkpoint checkpoint, ExecutionOptions execution)
    {
        Name = name;
        using var options = execution.CreateSessionOptions(checkpoint.Directory);
        try
        {
            _session = new InferenceSession(model.ToByteArray(), options);
        }
        catch (OnnxRuntimeException e)
        {
            throw new InvalidOperationException($"ONNX Runtime could not load the {name} graph of {checkpoint.Directory}: {e.Message}", e);
        }
        OutputNames = _session.OutputNames.ToList();
    }

    /// <summary>Runs the graph; the caller owns (and disposes) the returned values, in <see cref="OutputNames"/> order.</summary>
    public IDisposableReadOnlyCollection<OrtValue> Run(IReadOnlyDictionary<string, OrtValue> inputs, RunOptions? runOptions = null)
    {
        using var defaultOptions = runOptions is null ? new RunOptions() : null;
        return _session.Run(runOptions ?? defaultOptions!, inputs.Keys.ToList(), inputs.Values.ToList(), OutputNames);
    }

    /// <summary>Position of the named output in what <see cref="Run"/> returns.</summary>
    public int OutputIndex(string name)
    {
        var index = OutputNames.IndexOf(name);
        return index >= 0 ? index : throw new KeyNotFoundException($"the {Name} graph has no output '{name}'");
    }

    public void Dispose() => _session.Dispose();
}
