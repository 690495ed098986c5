using Blip2Mesh.Contracts.Vision.V1;
using Blip2Mesh.Model.Pipeline;
using Blip2Mesh.Model.Runtime;
using Blip2Mesh.ServiceDefaults;
using Grpc.Core;
using Microsoft.AspNetCore.Builder;

namespace Blip2Mesh.Vision;

/// <summary>Resized uint8 RGB images (HWC), <paramref name="Images"/> of them one after another.</summary>
public sealed record RgbImages(byte[] Pixels, int Images);

/// <summary>The vision stage's composition: its model and batcher, and its gRPC service.</summary>
public static class VisionStage
{
    public const string ServiceName = "blip2mesh.vision.v1.Vision";

    public static WebApplicationBuilder AddVisionStage(this WebApplicationBuilder builder, BatchingOptions batching)
    {
        builder.Services.AddLoadedModel((service, _) =>
        {
            var model = Blip2Model.Load(service.Model, Blip2Pipeline.RgbNormalization(Blip2Pipeline.LoadImagePreprocessor(service.Model)), service.Execution);
            model.Warm(vision: true);
            return new EncoderRuntime<RgbImages>("vision", model, batching,
                concat: inputs => new RgbImages(inputs.SelectMany(i => i.Pixels).ToArray(), inputs.Sum(i => i.Images)),
                rows: input => input.Images,
                run: input => model.EmbedRgb(input.Pixels, input.Images));
        });
        return builder;
    }

    public static WebApplication MapVisionStage(this WebApplication app)
    {
        app.MapGrpcService<VisionService>();
        return app;
    }
}

/// <summary>The vision stage: resized uint8 RGB images in, image embeddings out.</summary>
public sealed class VisionService(LoadedModel<EncoderRuntime<RgbImages>> runtime) : Contracts.Vision.V1.Vision.VisionBase
{
    public override Task Embed(IAsyncStreamReader<EmbedRequest> requests, IServerStreamWriter<EmbedResponse> responses, ServerCallContext context)
    {
        var r = runtime.Value;
        var size = r.Model.Config.Vision.ImageSize;
        return r.ServeAsync(requests, responses, context, request =>
        {
            ModelFingerprint.Check(request.ModelFingerprint, r.Model.Checkpoint.Fingerprint, "vision");
            var pixels = TensorCodec.ToUInt8(request.Pixels, "pixels", [-1, size, size, 3], $"uint8 RGB images of {size}x{size}");
            return new RgbImages(pixels, (int)request.Pixels.Shape[0]);
        }, embeds => new EmbedResponse { ImageEmbeds = TensorCodec.FromFloat(embeds) });
    }
}
