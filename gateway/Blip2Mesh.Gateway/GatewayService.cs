using System.Diagnostics;
using Blip2Mesh.Contracts.Decoder.V1;
using Blip2Mesh.Contracts.V1;
using Blip2Mesh.Model.Checkpoint;
using Blip2Mesh.Model.Imaging;
using Blip2Mesh.Model.Text;
using Blip2Mesh.ServiceDefaults;
using Grpc.Core;
using Microsoft.AspNetCore.Builder;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;
using Polly;

namespace Blip2Mesh.Gateway;

/// <summary>The public API: embeds images through the vision and Q-Former stages (or the cache) and streams the decoder's answer.</summary>
public sealed class GatewayService(
    ImageEmbedder embedder, StageChannels stages, StagePipelines pipelines, T5Tokenizer tokenizer, GenerationLimits limits, ILogger<GatewayService> logger)
    : Blip2.Blip2Base
{
    public override async Task<PutImageResponse> PutImage(PutImageRequest request, ServerCallContext context)
    {
        using var _ = MeshTelemetry.Time(MeshTelemetry.RequestDuration, "method", "PutImage");
        var embedding = await embedder.EmbedAsync(request.Image.Memory, context);
        return new PutImageResponse { ImageId = embedding.ImageId, CacheHit = embedding.CacheHit };
    }

    public override async Task Generate(GenerateRequest request, IServerStreamWriter<GenerateResponse> responses, ServerCallContext context)
    {
        using var timer = MeshTelemetry.Time(MeshTelemetry.RequestDuration, "method", "Generate");
        var hasImage = !request.Image.IsEmpty;
        var hasId = !string.IsNullOrEmpty(request.ImageId);
        if (hasImage == hasId)
            throw new RpcException(new Status(StatusCode.InvalidArgument, hasImage
                ? "give exactly one of image and image_id, not both"
                : "image is empty and no image_id was given: give exactly one of image and image_id"));
        if (hasId && !ImageEmbedder.IsImageId(request.ImageId))
            throw new RpcException(new Status(StatusCode.InvalidArgument, "image_id: must be the 64 hexadecimal characters PutImage returned"));
        var options = request.Options ?? new Contracts.V1.GenerationOptions();
        GenerationRequests.ToOptions(options, limits);
        var promptTokens = tokenizer.Encode(request.Prompt).Count;
        if (promptTokens > limits.MaxPromptTokens)
            throw new RpcException(new Status(StatusCode.InvalidArgument, $"prompt: {promptTokens} tokens exceed the limit of {limits.MaxPromptTokens}"));

        var embedding = hasImage
            ? await embedder.EmbedAsync(request.Image.Memory, context)
            : await embedder.FindAsync(request.ImageId) is { } cached
                ? new ImageEmbedding(request.ImageId, cached, true, new Dictionary<string, double>())
                : throw new RpcException(new Status(StatusCode.NotFound,
                    $"image_id {request.ImageId} is not known (or was evicted); send the image bytes or call PutImage first"));

        var decode = new DecodeRequest
        {
            QueryEmbeds = TensorCodec.FromFloat(embedding.QueryEmbeds),
            Prompt = request.Prompt,
            Options = options,
            ModelFingerprint = embedder.Fingerprint,
        };
        var client = new Contracts.Decoder.V1.Decoder.DecoderClient(stages.Decoder);
        var resilience = ResilienceContextPool.Shared.Get(context.CancellationToken);
        var forwarded = 0;
        double? firstTokenMs = null;
        try
        {
            await pipelines.Decoder.ExecuteAsync(async rc =>
            {
                using var call = client.Generate(decode, deadline: context.Deadline, cancellationToken: rc.CancellationToken);
                await foreach (var e in call.ResponseStream.ReadAllAsync(rc.CancellationToken))
                {
                    var response = new GenerateResponse { Text = e.Text };
                    response.TokenIds.AddRange(e.TokenIds);
                    if (forwarded == 0) response.ImageId = embedding.ImageId;
                    if (e.TokenIds.Count > 0 && firstTokenMs is null)
                    {
                        firstTokenMs = timer.ElapsedMs;
                        MeshTelemetry.TimeToFirstToken.Record(firstTokenMs.Value);
                    }
                    if (!string.IsNullOrEmpty(e.FinishReason))
                    {
                        response.FinishReason = e.FinishReason;
                        response.Usage = new Usage { PromptTokens = e.PromptTokens, GeneratedTokens = e.GeneratedTokens, CacheHit = embedding.CacheHit };
                        foreach (var (stage, ms) in embedding.StageMs) response.Usage.StageMs[stage] = ms;
                        response.Usage.StageMs["decoder"] = e.DecoderMs;
                        response.Usage.StageMs["total"] = timer.ElapsedMs;
                        if (firstTokenMs is { } first && e.GeneratedTokens > 1 && timer.ElapsedMs > first)
                            MeshTelemetry.TokensPerSecond.Record((e.GeneratedTokens - 1) / ((timer.ElapsedMs - first) / 1000));
                        logger.LogInformation("generated {Tokens} tokens ({FinishReason}) for image {ImageId} in {Milliseconds:F1} ms, cache hit {CacheHit}",
                            e.GeneratedTokens, e.FinishReason, embedding.ImageId, timer.ElapsedMs, embedding.CacheHit);
                    }
                    // From here on a failure cannot be retried: the caller already has part of the answer.
                    rc.Properties.Set(StagePipelines.StreamStarted, true);
                    forwarded++;
                    await responses.WriteAsync(response, rc.CancellationToken);
                }
            }, resilience);
        }
        catch (Exception e) when (forwarded > 0 && !context.CancellationToken.IsCancellationRequested && e is RpcException or IOException)
        {
            throw new RpcException(new Status(StatusCode.Unavailable,
                $"decoder stage: failed after part of the answer was streamed; the answer is incomplete ({(e as RpcException)?.Status.Detail ?? e.Message})"));
        }
        catch (Exception e) when (ImageEmbedder.StageFailure("decoder", e, context.CancellationToken) is { } failure)
        {
            throw failure;
        }
        finally
        {
            ResilienceContextPool.Shared.Return(resilience);
        }
    }

    public static WebApplication Build(ServiceOptions service, GatewayOptions gateway)
    {
        var builder = MeshHost.CreateBuilder("blip2.v1.Blip2", service);
        builder.Services.AddGrpc(o => o.Interceptors.Add<ApiKeyInterceptor>()).AddJsonTranscoding(o => o.JsonSettings.IgnoreDefaultValues = true);
        builder.Services.AddSingleton(ApiKeys.Load(gateway.ApiKeysFile));
        builder.Services.AddSingleton(gateway);
        builder.Services.AddSingleton(new GenerationLimits());
        builder.Services.AddSingleton(new StagePipelines(gateway.Resilience));
        builder.Services.AddSingleton(_ => new StageChannels(gateway, service.MaxMessageBytes));
        builder.Services.AddSingleton(_ => new EmbeddingCache(gateway.CacheBytes));
        builder.Services.AddSingleton(_ => T5Tokenizer.Load(service.Model));
        if (gateway.Redis is { } redis)
            builder.Services.AddSingleton(sp => new RedisEmbeddingStore(redis, gateway.RedisTtl, sp.GetRequiredService<ILoggerFactory>().CreateLogger<RedisEmbeddingStore>()));
        builder.Services.AddSingleton(sp =>
        {
            // The gateway needs the model's shapes and fingerprint, never its weights in memory.
            using var checkpoint = Blip2Checkpoint.Open(service.Model);
            var images = new ImagePreprocessor(PreprocessorConfig.Load(Path.Combine(service.Model, "preprocessor_config.json")), gateway.MaxImagePixels);
            return new ImageEmbedder(checkpoint.Config, checkpoint.Fingerprint, images, sp.GetRequiredService<StageChannels>(),
                sp.GetRequiredService<StagePipelines>(), sp.GetRequiredService<EmbeddingCache>(),
                sp.GetService<RedisEmbeddingStore>(), gateway);
        });
        var app = builder.Build();
        app.MapGrpcService<GatewayService>();
        app.MapMeshEndpoints();
        app.MapPlayground();
        app.MapLimits();
        // Load the model files now: a gateway that cannot read them must not report SERVING.
        _ = app.Services.GetRequiredService<ImageEmbedder>();
        _ = app.Services.GetRequiredService<T5Tokenizer>();
        var health = app.Services.GetRequiredService<ServiceHealth>();
        health.SetServing();
        app.Lifetime.ApplicationStopping.Register(health.SetStopping);
        return app;
    }
}
