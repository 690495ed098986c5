using Blip2Mesh.Contracts.Vision.V1;
using Blip2Mesh.Model.Pipeline;
using Blip2Mesh.Model.Runtime;
using Blip2Mesh.ServiceDefaults;
using Grpc.Core;
using Microsoft.AspNetCore.Builder;
using Microsoft.Extensions.DependencyInjection;

namespace Blip2Mesh.Vision;

/// <summary>The vision stage: resized uint8 RGB images in, image embeddings out.</summary>
public sealed class VisionService(LoadedModel<Blip2Model> model) : Contracts.Vision.V1.Vision.VisionBase
{
    public override async Task Embed(IAsyncStreamReader<EmbedRequest> requests, IServerStreamWriter<EmbedResponse> responses, ServerCallContext context)
    {
        await foreach (var request in requests.ReadAllAsync(context.CancellationToken))
        {
            var m = model.Value;
            ModelFingerprint.Check(request.ModelFingerprint, m.Checkpoint.Fingerprint, "vision");
            var size = m.Config.Vision.ImageSize;
            var pixels = TensorCodec.ToUInt8(request.Pixels, "pixels", [-1, size, size, 3], $"uint8 RGB images of {size}x{size}");
            var batch = (int)request.Pixels.Shape[0];
            MeshTelemetry.StageRequests.Add(1, new KeyValuePair<string, object?>("stage", "vision"));
            MeshTelemetry.BatchSize.Record(batch, new KeyValuePair<string, object?>("stage", "vision"));
            FloatTensor embeds;
            using (MeshTelemetry.Time(MeshTelemetry.StageDuration, "stage", "vision"))
                embeds = await Task.Run(() => m.EmbedRgb(pixels, batch), context.CancellationToken);
            await responses.WriteAsync(new EmbedResponse { ImageEmbeds = TensorCodec.FromFloat(embeds) });
        }
    }

    public static WebApplication Build(ServiceOptions options)
    {
        var builder = MeshHost.CreateBuilder("blip2mesh.vision.v1.Vision", options);
        builder.Services.AddSingleton<Func<Blip2Model>>(() =>
        {
            var model = Blip2Model.Load(options.Model, Blip2Pipeline.RgbNormalization(Blip2Pipeline.LoadImagePreprocessor(options.Model)), new ExecutionOptions(options.Device));
            model.Warm(vision: true);
            return model;
        });
        builder.Services.AddSingleton<LoadedModel<Blip2Model>>();
        builder.Services.AddHostedService(sp => sp.GetRequiredService<LoadedModel<Blip2Model>>());
        var app = builder.Build();
        app.MapGrpcService<VisionService>();
        app.MapMeshEndpoints();
        return app;
    }
}
