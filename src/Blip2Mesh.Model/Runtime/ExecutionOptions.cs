using Blip2Mesh.Model.Onnx;
using Blip2Mesh.Model.Quantization;
using Microsoft.ML.OnnxRuntime;

namespace Blip2Mesh.Model.Runtime;

public enum ExecutionDevice { Cpu, Cuda }

/// <summary>Where and how the stage graphs run. CPU unless CUDA is asked for; never a silent fallback.</summary>
public sealed record ExecutionOptions(ExecutionDevice Device = ExecutionDevice.Cpu, int DeviceId = 0, int IntraOpThreads = 0)
{
    /// <summary>How the stages' Linear weights are stored: exact (the default), or block-quantized at load.</summary>
    public WeightScheme Weights { get; init; } = WeightScheme.Exact;

    /// <summary>Root of the quantized-weight cache; null means <see cref="QuantizedWeightSource.DefaultCacheRoot"/>.</summary>
    public string? WeightCache { get; init; }

    /// <summary>How quantized Linears multiply; int8 activations are what the CPU's fast kernels run.</summary>
    public QuantizedCompute QuantizedCompute { get; init; } = QuantizedCompute.Int8;

    public static ExecutionDevice ParseDevice(string value) => value.ToLowerInvariant() switch
    {
        "cpu" => ExecutionDevice.Cpu,
        "cuda" or "gpu" => ExecutionDevice.Cuda,
        _ => throw new ArgumentException($"unknown device '{value}' (expected cpu or cuda)"),
    };

    /// <summary>Where tensors that stay on the execution device between runs (the decoder's caches) live.</summary>
    internal OrtMemoryInfo DeviceMemory() => Device == ExecutionDevice.Cuda
        ? new OrtMemoryInfo("Cuda", OrtAllocatorType.DeviceAllocator, DeviceId, OrtMemType.Default)
        : OrtMemoryInfo.DefaultInstance;

    internal SessionOptions CreateSessionOptions(string externalDataFolder)
    {
        var options = new SessionOptions
        {
            GraphOptimizationLevel = GraphOptimizationLevel.ORT_ENABLE_ALL,
            IntraOpNumThreads = IntraOpThreads,
        };
        // Several stage processes and sessions often share a machine's cores: idle threads must not spin on them.
        options.AddSessionConfigEntry("session.intra_op.allow_spinning", "0");
        // The graphs are built in memory; their weights are external data inside the checkpoint's shards.
        options.AddSessionConfigEntry("session.model_external_initializers_file_folder_path", externalDataFolder);
        if (Device == ExecutionDevice.Cuda)
        {
            try
            {
                options.AppendExecutionProvider_CUDA(DeviceId);
            }
            catch (Exception e) when (e is OnnxRuntimeException or EntryPointNotFoundException or DllNotFoundException)
            {
                options.Dispose();
                throw new InvalidOperationException(
                    $"CUDA execution was requested but is not available on this machine (device {DeviceId}): {e.Message}. " +
                    "ONNX Runtime 1.31 needs the CUDA 13 runtime (libcudart.so.13, libcublas.so.13) and cuDNN 9; install them, or run with --device cpu.", e);
            }
        }
        return options;
    }
}
