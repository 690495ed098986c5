using Blip2Mesh.Model.Quantization;
using Blip2Mesh.Model.Runtime;

namespace Blip2Mesh.ServiceDefaults;

/// <summary>How one service process is run: its model, its endpoints and its limits.</summary>
public sealed record ServiceOptions
{
    public required string Model { get; init; }
    /// <summary>gRPC (HTTP/2 cleartext) port.</summary>
    public required int Port { get; init; }
    /// <summary>HTTP/1.1 port for JSON, the playground and metrics; none when null.</summary>
    public int? HttpPort { get; init; }
    /// <summary>Address to listen on; stages default to loopback so only the gateway's host reaches them.</summary>
    public string Bind { get; init; } = "127.0.0.1";
    public ExecutionDevice Device { get; init; } = ExecutionDevice.Cpu;
    /// <summary>ONNX Runtime intra-op threads per session; 0 lets it use every core.</summary>
    public int Threads { get; init; }

    /// <summary>How the stage's Linear weights are stored (<c>--weights</c>); quantized schemes are approximate.</summary>
    public WeightScheme Weights { get; init; } = WeightScheme.Exact;
    /// <summary>Root of the quantized-weight cache (<c>--cache-dir</c>); null for the user's cache folder.</summary>
    public string? WeightCache { get; init; }

    public ExecutionOptions Execution => new(Device, IntraOpThreads: Threads) { Weights = Weights, WeightCache = WeightCache };
    /// <summary>Largest gRPC message accepted or sent (tensors of a batch, encoded images).</summary>
    public int MaxMessageBytes { get; init; } = 64 * 1024 * 1024;
    /// <summary>PEM certificate and key: serve gRPC and HTTP over TLS instead of cleartext.</summary>
    public string? TlsCertificate { get; init; }
    public string? TlsKey { get; init; }
    /// <summary>How long in-flight streams may take to finish when the service is asked to stop.</summary>
    public TimeSpan ShutdownGrace { get; init; } = TimeSpan.FromSeconds(30);
}
