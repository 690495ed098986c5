using Blip2Mesh.ServiceDefaults;
using Grpc.Health.V1;
using Grpc.Net.Client;

namespace Blip2Mesh.Gateway;

/// <summary>The gateway is ready only while every stage has a replica that answers SERVING (asked with a short deadline).</summary>
public sealed class StageReadiness(StageChannels stages) : IReadinessCheck
{
    private static readonly TimeSpan Deadline = TimeSpan.FromSeconds(1);

    public async Task<string?> NotReadyBecauseAsync(CancellationToken cancellation)
    {
        foreach (var (stage, channel) in new[] { ("vision", stages.Vision), ("qformer", stages.QFormer), ("decoder", stages.Decoder) })
            if (!await ServingAsync(channel, cancellation)) return $"the {stage} stage is not serving";
        return null;
    }

    private static async Task<bool> ServingAsync(GrpcChannel channel, CancellationToken cancellation)
    {
        try
        {
            var reply = await new Health.HealthClient(channel).CheckAsync(new HealthCheckRequest(), deadline: DateTime.UtcNow + Deadline, cancellationToken: cancellation);
            return reply.Status == HealthCheckResponse.Types.ServingStatus.Serving;
        }
        catch (Grpc.Core.RpcException)
        {
            return false;
        }
    }
}
