using Blip2Mesh.Contracts.Decoder.V1;
using Blip2Mesh.Model.Generation;
using Blip2Mesh.Model.Onnx;
using Blip2Mesh.Model.Runtime;
using Blip2Mesh.Model.Text;
using Blip2Mesh.ServiceDefaults;
using Grpc.Core;
using Microsoft.AspNetCore.Builder;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;

namespace Blip2Mesh.Decoder;

/// <summary>What the decoder stage runs: Flan-T5 (encoder + KV-cached decoder), its tokenizer and the batcher.</summary>
public sealed class DecoderRuntime : IDisposable
{
    public DecoderRuntime(ServiceOptions service, ContinuousBatchingOptions batching, ILogger logger)
    {
        Tokenizer = T5Tokenizer.Load(service.Model);
        Model = Blip2Model.Load(service.Model, new PixelInput.Rgb8(null, null, null), service.Execution);
        Model.Warm(decoder: true);
        Generator = new Generator(Model);
        Encoder = new PromptEncoder(Generator, batching.EncoderBatching, batching.MaxEncoderBatch, service.Device);
        logger.LogInformation("{Decision}", Encoder.Decision);
        Batcher = new ContinuousBatcher(Generator, batching,
            onStep: rows => MeshTelemetry.BatchSize.Record(rows, new KeyValuePair<string, object?>("stage", "decoder")));
        MeshTelemetry.Meter.CreateObservableGauge("blip2mesh.decoder.active_sequences", () => Batcher.ActiveSequences,
            description: "Requests being decoded now (the autoscaling signal)");
        MeshTelemetry.Meter.CreateObservableGauge("blip2mesh.decoder.queue_depth", () => Batcher.QueueDepth,
            description: "Requests waiting for decoder rows");
    }

    public Blip2Model Model { get; }
    public T5Tokenizer Tokenizer { get; }
    public Generator Generator { get; }
    public PromptEncoder Encoder { get; }
    public ContinuousBatcher Batcher { get; }

    public void Dispose()
    {
        Batcher.DisposeAsync().AsTask().GetAwaiter().GetResult();
        Model.Dispose();
    }
}

/// <summary>The decoder stage's composition: model, batcher and limits, and its gRPC service.</summary>
public static class DecoderStage
{
    public const string ServiceName = "blip2mesh.decoder.v1.Decoder";

    public static WebApplicationBuilder AddDecoderStage(this WebApplicationBuilder builder, ContinuousBatchingOptions batching, GenerationLimits limits)
    {
        builder.Services.AddSingleton(limits.Validate());
        builder.Services.AddLoadedModel((service, logger) => new DecoderRuntime(service, batching.Validate(), logger));
        return builder;
    }

    public static WebApplication MapDecoderStage(this WebApplication app)
    {
        app.MapGrpcService<DecoderService>();
        return app;
    }
}

/// <summary>
/// The decoder stage: query embeddings + prompt in, tokens and text deltas streamed out. Every active request
/// shares the decoder steps of one continuous batch.
/// </summary>
public sealed class DecoderService(LoadedModel<DecoderRuntime> runtime, GenerationLimits limits) : Contracts.Decoder.V1.Decoder.DecoderBase
{
    public override async Task Generate(DecodeRequest request, IServerStreamWriter<DecodeEvent> responses, ServerCallContext context)
    {
        var r = runtime.Value;
        var config = r.Model.Config;
        ModelFingerprint.Check(request.ModelFingerprint, r.Model.Checkpoint.Fingerprint, "decoder");
        var queries = TensorCodec.ToFloat(request.QueryEmbeds, "query_embeds", [1, config.NumQueryTokens, config.Text.DModel],
            $"the Q-Former output of model {r.Model.Checkpoint.Fingerprint}");
        var options = GenerationRequests.ToOptions(request.Options, limits);
        var promptIds = GenerationRequests.EncodePrompt(r.Tokenizer, request.Prompt, limits);
        // Decided before the encoder runs: a request that can never fit costs nothing but its refusal.
        r.Batcher.CheckFits(config.Text, options, config.NumQueryTokens + promptIds.Count);

        MeshTelemetry.StageRequests.Add(1, new KeyValuePair<string, object?>("stage", "decoder"));
        using var timer = MeshTelemetry.Time(MeshTelemetry.StageDuration, "stage", "decoder");
        var cancellation = context.CancellationToken;
        var state = await r.Encoder.StartAsync(queries, promptIds, options, cancellation);
        var tokens = r.Batcher.Submit(state, cancellation);

        var text = r.Tokenizer.CreateStreamingDecoder();
        var generated = 0;
        DecodeEvent Finish(DecodeEvent e)
        {
            e.Text += text.Finish();
            e.FinishReason = state.Results[0].FinishReason;
            e.PromptTokens = promptIds.Count;
            e.GeneratedTokens = generated;
            e.DecoderMs = timer.ElapsedMs;
            return e;
        }
        await foreach (var decoded in tokens)
        {
            generated += decoded.Ids.Count;
            MeshTelemetry.GeneratedTokens.Add(decoded.Ids.Count);
            var delta = new DecodeEvent { Text = string.Concat(decoded.Ids.Select(text.Push)) };
            delta.TokenIds.AddRange(decoded.Ids);
            // The last tokens and the end of the answer travel together: one message fewer on every hop.
            await responses.WriteAsync(decoded.IsLast ? Finish(delta) : delta, cancellation);
            if (decoded.IsLast) return;
        }
        await responses.WriteAsync(Finish(new DecodeEvent()), cancellation);
    }
}
