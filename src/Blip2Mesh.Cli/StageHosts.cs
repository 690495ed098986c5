using Blip2Mesh.Decoder;
using Blip2Mesh.Gateway;
using Blip2Mesh.Model.Generation;
using Blip2Mesh.Model.Runtime;
using Blip2Mesh.QFormer;
using Blip2Mesh.ServiceDefaults;
using Blip2Mesh.Vision;
using Microsoft.AspNetCore.Builder;

namespace Blip2Mesh.Cli;

/// <summary>The one place each service host is composed (<c>serve</c> runs them; tests start them in-process).</summary>
public static class StageHosts
{
    public static WebApplication Vision(ServiceOptions options, BatchingOptions? batching = null) =>
        MeshHost.Build(VisionStage.ServiceName, options, b => b.AddVisionStage(batching ?? new BatchingOptions()), a => a.MapVisionStage());

    public static WebApplication QFormer(ServiceOptions options, BatchingOptions? batching = null) =>
        MeshHost.Build(QFormerStage.ServiceName, options, b => b.AddQFormerStage(batching ?? new BatchingOptions()), a => a.MapQFormerStage());

    public static WebApplication Decoder(ServiceOptions options, ContinuousBatchingOptions? batching = null, GenerationLimits? limits = null) =>
        MeshHost.Build(DecoderStage.ServiceName, options,
            b => b.AddDecoderStage(batching ?? new ContinuousBatchingOptions(), limits ?? new GenerationLimits()), a => a.MapDecoderStage());

    public static WebApplication Gateway(ServiceOptions options, GatewayOptions gateway, GenerationLimits? limits = null) =>
        MeshHost.Build(GatewayStage.ServiceName, options, b => b.AddGatewayStage(gateway, limits ?? new GenerationLimits()), a => a.MapGatewayStage());
}
