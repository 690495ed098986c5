using Blip2Mesh.Contracts.QFormer.V1;
using Blip2Mesh.Model.Onnx;
using Blip2Mesh.Model.Runtime;
using Blip2Mesh.ServiceDefaults;
using Grpc.Core;
using Microsoft.AspNetCore.Builder;
using Microsoft.Extensions.DependencyInjection;

namespace Blip2Mesh.QFormer;

/// <summary>The Q-Former stage: image embeddings in, projected query embeddings out.</summary>
public sealed class QFormerService(LoadedModel<Blip2Model> model) : Contracts.QFormer.V1.QFormer.QFormerBase
{
    public override async Task Project(IAsyncStreamReader<ProjectRequest> requests, IServerStreamWriter<ProjectResponse> responses, ServerCallContext context)
    {
        await foreach (var request in requests.ReadAllAsync(context.CancellationToken))
        {
            var m = model.Value;
            ModelFingerprint.Check(request.ModelFingerprint, m.Checkpoint.Fingerprint, "qformer");
            var vision = m.Config.Vision;
            var embeds = TensorCodec.ToFloat(request.ImageEmbeds, "image_embeds", [-1, vision.SequenceLength, vision.HiddenSize],
                $"the vision output of model {m.Checkpoint.Fingerprint}");
            MeshTelemetry.StageRequests.Add(1, new KeyValuePair<string, object?>("stage", "qformer"));
            MeshTelemetry.BatchSize.Record((int)embeds.Shape[0], new KeyValuePair<string, object?>("stage", "qformer"));
            FloatTensor projected;
            using (MeshTelemetry.Time(MeshTelemetry.StageDuration, "stage", "qformer"))
                projected = await Task.Run(() => m.RunQFormer(embeds).QueryEmbeds, context.CancellationToken);
            await responses.WriteAsync(new ProjectResponse { QueryEmbeds = TensorCodec.FromFloat(projected) });
        }
    }

    public static WebApplication Build(ServiceOptions options)
    {
        var builder = MeshHost.CreateBuilder("blip2mesh.qformer.v1.QFormer", options);
        builder.Services.AddSingleton<Func<Blip2Model>>(() =>
        {
            // The Q-Former never sees pixels; normalisation settings are irrelevant here.
            var model = Blip2Model.Load(options.Model, new PixelInput.Rgb8(null, null, null), new ExecutionOptions(options.Device));
            model.Warm(qformer: true);
            return model;
        });
        builder.Services.AddSingleton<LoadedModel<Blip2Model>>();
        builder.Services.AddHostedService(sp => sp.GetRequiredService<LoadedModel<Blip2Model>>());
        var app = builder.Build();
        app.MapGrpcService<QFormerService>();
        app.MapMeshEndpoints();
        return app;
    }
}
