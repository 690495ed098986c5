using Blip2Mesh.Contracts.QFormer.V1;
using Blip2Mesh.Model.Onnx;
using Blip2Mesh.Model.Runtime;
using Blip2Mesh.ServiceDefaults;
using Grpc.Core;
using Microsoft.AspNetCore.Builder;

namespace Blip2Mesh.QFormer;

/// <summary>The Q-Former stage's composition: its model and batcher, and its gRPC service.</summary>
public static class QFormerStage
{
    public const string ServiceName = "blip2mesh.qformer.v1.QFormer";

    public static WebApplicationBuilder AddQFormerStage(this WebApplicationBuilder builder, BatchingOptions batching)
    {
        builder.Services.AddLoadedModel((service, _) =>
        {
            // The Q-Former never sees pixels; normalisation settings are irrelevant here.
            var model = Blip2Model.Load(service.Model, new PixelInput.Rgb8(null, null, null), service.Execution);
            model.Warm(qformer: true);
            return new EncoderRuntime<FloatTensor>("qformer", model, batching,
                concat: FloatTensor.Stack,
                rows: input => (int)input.Shape[0],
                run: input => model.RunQFormer(input).QueryEmbeds);
        });
        return builder;
    }

    public static WebApplication MapQFormerStage(this WebApplication app)
    {
        app.MapGrpcService<QFormerService>();
        return app;
    }
}

/// <summary>The Q-Former stage: image embeddings in, projected query embeddings out.</summary>
public sealed class QFormerService(LoadedModel<EncoderRuntime<FloatTensor>> runtime) : Contracts.QFormer.V1.QFormer.QFormerBase
{
    public override Task Project(IAsyncStreamReader<ProjectRequest> requests, IServerStreamWriter<ProjectResponse> responses, ServerCallContext context)
    {
        var r = runtime.Value;
        var vision = r.Model.Config.Vision;
        return r.ServeAsync(requests, responses, context, request =>
        {
            ModelFingerprint.Check(request.ModelFingerprint, r.Model.Checkpoint.Fingerprint, "qformer");
            return TensorCodec.ToFloat(request.ImageEmbeds, "image_embeds", [-1, vision.SequenceLength, vision.HiddenSize],
                $"the vision output of model {r.Model.Checkpoint.Fingerprint}");
        }, projected => new ProjectResponse { QueryEmbeds = TensorCodec.FromFloat(projected) });
    }
}
