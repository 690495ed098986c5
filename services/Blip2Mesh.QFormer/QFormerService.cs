using Blip2Mesh.Contracts.QFormer.V1;
using Blip2Mesh.Model.Onnx;
using Blip2Mesh.Model.Runtime;
using Blip2Mesh.ServiceDefaults;
using Grpc.Core;
using Microsoft.AspNetCore.Builder;
using Microsoft.Extensions.DependencyInjection;

namespace Blip2Mesh.QFormer;

/// <summary>The Q-Former and the batcher that runs the requests arriving together as one batch.</summary>
public sealed class QFormerRuntime : IDisposable
{
    public QFormerRuntime(string modelDir, ExecutionOptions execution, BatchingOptions batching)
    {
        // The Q-Former never sees pixels; normalisation settings are irrelevant here.
        Model = Blip2Model.Load(modelDir, new PixelInput.Rgb8(null, null, null), execution);
        Model.Warm(qformer: true);
        Batcher = new DynamicBatcher<FloatTensor, FloatTensor>(requests =>
        {
            var projected = Model.RunQFormer(requests.Count == 1 ? requests[0] : FloatTensor.Stack(requests)).QueryEmbeds;
            var outputs = new FloatTensor[requests.Count];
            for (int i = 0, row = 0; i < requests.Count; row += (int)requests[i].Shape[0], i++)
                outputs[i] = projected.Slice(row, (int)requests[i].Shape[0]);
            return outputs;
        }, batching.MaxBatch, batching.MaxDelay, n => MeshTelemetry.BatchSize.Record(n, new KeyValuePair<string, object?>("stage", "qformer")));
    }

    public Blip2Model Model { get; }
    public DynamicBatcher<FloatTensor, FloatTensor> Batcher { get; }

    public void Dispose() => Model.Dispose();
}

/// <summary>The Q-Former stage: image embeddings in, projected query embeddings out.</summary>
public sealed class QFormerService(LoadedModel<QFormerRuntime> runtime) : Contracts.QFormer.V1.QFormer.QFormerBase
{
    public override async Task Project(IAsyncStreamReader<ProjectRequest> requests, IServerStreamWriter<ProjectResponse> responses, ServerCallContext context)
    {
        await foreach (var request in requests.ReadAllAsync(context.CancellationToken))
        {
            var r = runtime.Value;
            ModelFingerprint.Check(request.ModelFingerprint, r.Model.Checkpoint.Fingerprint, "qformer");
            var vision = r.Model.Config.Vision;
            var embeds = TensorCodec.ToFloat(request.ImageEmbeds, "image_embeds", [-1, vision.SequenceLength, vision.HiddenSize],
                $"the vision output of model {r.Model.Checkpoint.Fingerprint}");
            MeshTelemetry.StageRequests.Add(1, new KeyValuePair<string, object?>("stage", "qformer"));
            FloatTensor projected;
            using (MeshTelemetry.Time(MeshTelemetry.StageDuration, "stage", "qformer"))
                projected = await r.Batcher.RunAsync(embeds, context.CancellationToken);
            await responses.WriteAsync(new ProjectResponse { QueryEmbeds = TensorCodec.FromFloat(projected) });
        }
    }

    public static WebApplication Build(ServiceOptions options, BatchingOptions? batching = null)
    {
        var builder = MeshHost.CreateBuilder("blip2mesh.qformer.v1.QFormer", options);
        builder.Services.AddLoadedModel(() => new QFormerRuntime(options.Model, options.Execution, batching ?? new BatchingOptions()));
        var app = builder.Build();
        app.MapGrpcService<QFormerService>();
        app.MapMeshEndpoints();
        return app;
    }
}
