using Blip2Mesh.Model.Checkpoint;
using Blip2Mesh.Model.Onnx.Proto;
using Google.Protobuf;
using Microsoft.ML.OnnxRuntime;

namespace Blip2Mesh.Model.Runtime;

/// <summary>One stage graph loaded into ONNX Runtime.</summary>
public sealed class StageSession : IDisposable
{
    private readonly InferenceSession _session;
    private readonly OrtMemoryInfo _deviceMemory;

    public string Name { get; }
    public List<string> OutputNames { get; }

    /// <param name="externalDataFolder">The folder the graph's external-data locations are relative to.</param>
    public StageSession(string name, ModelProto model, Blip2Checkpoint checkpoint, string externalDataFolder, ExecutionOptions execution)
    {
        Name = name;
        using var options = execution.CreateSessionOptions(externalDataFolder);
        try
        {
            _session = new InferenceSession(model.ToByteArray(), options);
        }
        catch (OnnxRuntimeException e)
        {
            throw new InvalidOperationException($"ONNX Runtime could not load the {name} graph of {checkpoint.Directory}: {e.Message}", e);
        }
        OutputNames = _session.OutputNames.ToList();
        _deviceMemory = execution.DeviceMemory();
    }

    /// <summary>Runs the graph; the caller owns (and disposes) the returned values, in <see cref="OutputNames"/> order.</summary>
    public IDisposableReadOnlyCollection<OrtValue> Run(IReadOnlyDictionary<string, OrtValue> inputs)
    {
        using var runOptions = new RunOptions();
        return _session.Run(runOptions, inputs.Keys.ToList(), inputs.Values.ToList(), OutputNames);
    }

    /// <summary>
    /// Runs the graph with its outputs left where they were computed (device memory on CUDA), except
    /// <paramref name="hostOutputs"/>, which come back in host memory; inputs may live on either. The caller owns
    /// (and disposes) the returned values, in <see cref="OutputNames"/> order.
    /// </summary>
    public IDisposableReadOnlyCollection<OrtValue> RunOnDevice(IReadOnlyDictionary<string, OrtValue> inputs, IReadOnlySet<string> hostOutputs)
    {
        using var binding = _session.CreateIoBinding();
        foreach (var (name, value) in inputs) binding.BindInput(name, value);
        foreach (var name in OutputNames) binding.BindOutputToDevice(name, hostOutputs.Contains(name) ? OrtMemoryInfo.DefaultInstance : _deviceMemory);
        using var runOptions = new RunOptions();
        _session.RunWithBinding(runOptions, binding);
        return binding.GetOutputValues();
    }

    /// <summary>Position of the named output in what <see cref="Run"/> returns.</summary>
    public int OutputIndex(string name)
    {
        var index = OutputNames.IndexOf(name);
        return index >= 0 ? index : throw new KeyNotFoundException($"the {Name} graph has no output '{name}'");
    }

    public void Dispose()
    {
        _session.Dispose();
        if (!ReferenceEquals(_deviceMemory, OrtMemoryInfo.DefaultInstance)) _deviceMemory.Dispose();
    }
}
