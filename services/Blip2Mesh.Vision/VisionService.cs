using Blip2Mesh.Contracts.Vision.V1;
using Blip2Mesh.Model.Pipeline;
using Blip2Mesh.Model.Runtime;
using Blip2Mesh.ServiceDefaults;
using Grpc.Core;
using Microsoft.AspNetCore.Builder;
using Microsoft.Extensions.DependencyInjection;

namespace Blip2Mesh.Vision;

/// <summary>The vision model and the batcher that runs the images arriving together as one batch.</summary>
public sealed class VisionRuntime : IDisposable
{
    public VisionRuntime(string modelDir, ExecutionOptions execution, BatchingOptions batching)
    {
        Model = Blip2Model.Load(modelDir, Blip2Pipeline.RgbNormalization(Blip2Pipeline.LoadImagePreprocessor(modelDir)), execution);
        Model.Warm(vision: true);
        var pixelsPerImage = Model.Config.Vision.ImageSize * Model.Config.Vision.ImageSize * 3;
        Batcher = new DynamicBatcher<(byte[] Pixels, int Images), FloatTensor>(requests =>
        {
            var pixels = requests.Count == 1 ? requests[0].Pixels : requests.SelectMany(r => r.Pixels).ToArray();
            var embeds = Model.EmbedRgb(pixels, pixels.Length / pixelsPerImage);
            var outputs = new FloatTensor[requests.Count];
            for (int i = 0, row = 0; i < requests.Count; row += requests[i].Images, i++) outputs[i] = embeds.Slice(row, requests[i].Images);
            return outputs;
        }, batching.MaxBatch, batching.MaxDelay, images => MeshTelemetry.BatchSize.Record(images, new KeyValuePair<string, object?>("stage", "vision")));
    }

    public Blip2Model Model { get; }
    public DynamicBatcher<(byte[] Pixels, int Images), FloatTensor> Batcher { get; }

    public void Dispose() => Model.Dispose();
}

/// <summary>The vision stage: resized uint8 RGB images in, image embeddings out.</summary>
public sealed class VisionService(LoadedModel<VisionRuntime> runtime) : Contracts.Vision.V1.Vision.VisionBase
{
    public override async Task Embed(IAsyncStreamReader<EmbedRequest> requests, IServerStreamWriter<EmbedResponse> responses, ServerCallContext context)
    {
        await foreach (var request in requests.ReadAllAsync(context.CancellationToken))
        {
            var r = runtime.Value;
            ModelFingerprint.Check(request.ModelFingerprint, r.Model.Checkpoint.Fingerprint, "vision");
            var size = r.Model.Config.Vision.ImageSize;
            var pixels = TensorCodec.ToUInt8(request.Pixels, "pixels", [-1, size, size, 3], $"uint8 RGB images of {size}x{size}");
            MeshTelemetry.StageRequests.Add(1, new KeyValuePair<string, object?>("stage", "vision"));
            FloatTensor embeds;
            using (MeshTelemetry.Time(MeshTelemetry.StageDuration, "stage", "vision"))
                embeds = await r.Batcher.RunAsync((pixels, (int)request.Pixels.Shape[0]), context.CancellationToken);
            await responses.WriteAsync(new EmbedResponse { ImageEmbeds = TensorCodec.FromFloat(embeds) });
        }
    }

    public static WebApplication Build(ServiceOptions options, BatchingOptions? batching = null)
    {
        var builder = MeshHost.CreateBuilder("blip2mesh.vision.v1.Vision", options);
        builder.Services.AddLoadedModel(() => new VisionRuntime(options.Model, options.Execution, batching ?? new BatchingOptions()));
        var app = builder.Build();
        app.MapGrpcService<VisionService>();
        app.MapMeshEndpoints();
        return app;
    }
}
