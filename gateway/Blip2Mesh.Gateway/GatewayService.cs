using System.Diagnostics;
using Blip2Mesh.Contracts.Decoder.V1;
using Blip2Mesh.Contracts.V1;
using Blip2Mesh.Model.Checkpoint;
using Blip2Mesh.Model.Imaging;
using Blip2Mesh.Model.Text;
using Blip2Mesh.ServiceDefaults;
using Blip2Mesh.Model.Errors;
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
        var embedding = await embedder.EmbedAsync(request.Image.Memory, context);
        return new PutImageResponse { ImageId = embedding.ImageId, CacheHit = embedding.CacheHit };
    }

    public override async Task Generate(GenerateRequest request, IServerStreamWriter<GenerateResponse> responses, ServerCallContext context)
    {
        // The request's duration and status are recorded by ServingErrorInterceptor; this clock serves stage_ms and TTFT.
        var timer = System.Diagnostics.Stopwatch.StartNew();
        var hasImage = !request.Image.IsEmpty;
        var hasId = !string.IsNullOrEmpty(request.ImageId);
        if (hasImage == hasId)
            throw hasImage
                ? ServingException.Invalid("image", "give exactly one of image and image_id, not both")
                : ServingException.Invalid("image", "is empty and no image_id was given: give exactly one of image and image_id");
        if (hasId && !ImageEmbedder.IsImageId(request.ImageId))
            throw ServingException.Invalid("image_id", "must be the 64 hexadecimal characters PutImage returned");
        var options = request.Options ?? new Contracts.V1.GenerationOptions();
        GenerationRequests.ToOptions(options, limits);
        GenerationRequests.EncodePrompt(tokenizer, request.Prompt, limits);

        var embedding = hasImage
            ? await embedder.EmbedAsync(request.Image.Memory, context)
            : await embedder.FindAsync(request.ImageId) is { } cached
                ? new ImageEmbedding(request.ImageId, cached, true, new Dictionary<string, double>())
                : throw ServingException.NotFound(
                    $"image_id {request.ImageId} is not known (or was evicted); send the image bytes or call PutImage first");

        var decode = new DecodeRequest
        {
            QueryEmbeds = TensorCodec.FromFloat(embedding.QueryEmbeds),
            Prompt = request.Prompt,
            Options = options,
            ModelFingerprint = embedder.Fingerprint,
        };
        var client = new Contracts.Decoder.V1.Decoder.DecoderClient(stages.Decoder);
        // A caller that sets no deadline still gets an answer or an error in bounded time.
        var deadline = context.Deadline == DateTime.MaxValue ? DateTime.UtcNow + pipelines.DefaultDecodeTimeout : context.Deadline;
        var resilience = ResilienceContextPool.Shared.Get(context.CancellationToken);
        var forwarded = 0;
        double? firstTokenMs = null;
        try
        {
            await pipelines.Decoder.ExecuteAsync(async rc =>
            {
                using var call = client.Generate(decode, deadline: deadline, cancellationToken: rc.CancellationToken);
                await foreach (var e in call.ResponseStream.ReadAllAsync(rc.CancellationToken))
                {
                    var response = new GenerateResponse { Text = e.Text };
                    response.TokenIds.AddRange(e.TokenIds);
                    if (forwarded == 0) response.ImageId = embedding.ImageId;
                    if (e.TokenIds.Count > 0 && firstTokenMs is null)
                    {
                        firstTokenMs = timer.Elapsed.TotalMilliseconds;
                        MeshTelemetry.TimeToFirstToken.Record(firstTokenMs.Value);
                    }
                    if (!string.IsNullOrEmpty(e.FinishReason))
                    {
                        response.FinishReason = e.FinishReason;
                        response.Usage = new Usage { PromptTokens = e.PromptTokens, GeneratedTokens = e.GeneratedTokens, CacheHit = embedding.CacheHit };
                        foreach (var (stage, ms) in embedding.StageMs) response.Usage.StageMs[stage] = ms;
                        response.Usage.StageMs["decoder"] = e.DecoderMs;
                        response.Usage.StageMs["total"] = timer.Elapsed.TotalMilliseconds;
                        if (firstTokenMs is { } first && e.GeneratedTokens > 1 && timer.Elapsed.TotalMilliseconds > first)
                            MeshTelemetry.TokensPerSecond.Record((e.GeneratedTokens - 1) / ((timer.Elapsed.TotalMilliseconds - first) / 1000));
                        logger.LogInformation("generated {Tokens} tokens ({FinishReason}) for image {ImageId} in {Milliseconds:F1} ms, cache hit {CacheHit}",
                            e.GeneratedTokens, e.FinishReason, embedding.ImageId, timer.Elapsed.TotalMilliseconds, embedding.CacheHit);
                    }
                    // From here on a failure cannot be retried: the caller already has part of the answer.
                    rc.Properties.Set(StagePipelines.StreamStarted, true);
                    forwarded++;
                    await responses.WriteAsync(response, rc.CancellationToken);
                }
            }, resilience);
        }
        catch (Exception e) when (forwarded > 0 && !context.CancellationToken.IsCancellationRequested)
        {
            logger.LogWarning(e, "the decoder stream failed after {Messages} messages", forwarded);
            throw ServingException.Unavailable("decoder stage failed after part of the answer was streamed; the answer is incomplete: ask again");
        }
        catch (Exception e)
        {
            throw StageErrors.ForCaller("decoder", e, context.CancellationToken);
        }
        finally
        {
            ResilienceContextPool.Shared.Return(resilience);
        }
    }
}

/// <summary>The gateway's composition: stage channels and pipelines, caches, limits, the public gRPC + JSON API and the playground.</summary>
public static class GatewayStage
{
    public const string ServiceName = "blip2.v1.Blip2";

    public static WebApplicationBuilder AddGatewayStage(this WebApplicationBuilder builder, GatewayOptions gateway, GenerationLimits limits)
    {
        var services = builder.Services;
        services.AddGrpc(o => o.Interceptors.Add<ApiKeyInterceptor>()).AddJsonTranscoding(o =>
        {
            o.JsonSettings.IgnoreDefaultValues = true;
            // Error bodies carry the statuses' BadRequest details, which JSON can only name from a registry.
            o.TypeRegistry = Google.Protobuf.Reflection.TypeRegistry.FromMessages(Google.Rpc.BadRequest.Descriptor);
        });
        services.AddSingleton(ApiKeys.Load(gateway.ApiKeysFile));
        services.AddSingleton(gateway);
        services.AddSingleton(limits.Validate());
        services.AddSingleton(new StagePipelines(gateway.Resilience));
        services.AddSingleton(sp => new StageChannels(gateway, sp.GetRequiredService<ServiceOptions>().MaxMessageBytes));
        services.AddSingleton(_ => new EmbeddingCache(gateway.CacheBytes));
        services.AddSingleton<IReadinessCheck, StageReadiness>();
        services.AddSingleton(sp => T5Tokenizer.Load(sp.GetRequiredService<ServiceOptions>().Model));
        if (gateway.Redis is { } redis)
            services.AddSingleton(sp => new RedisEmbeddingStore(redis, gateway.RedisTtl, sp.GetRequiredService<ILoggerFactory>().CreateLogger<RedisEmbeddingStore>()));
        services.AddSingleton(sp =>
        {
            // The gateway needs the model's shapes and fingerprint, never its weights in memory.
            var model = sp.GetRequiredService<ServiceOptions>().Model;
            using var checkpoint = Blip2Checkpoint.Open(model);
            var images = new ImagePreprocessor(PreprocessorConfig.Load(Path.Combine(model, "preprocessor_config.json")), gateway.MaxImagePixels);
            return new ImageEmbedder(checkpoint.Config, checkpoint.Fingerprint, images, sp.GetRequiredService<StageChannels>(),
                sp.GetRequiredService<StagePipelines>(), sp.GetRequiredService<EmbeddingCache>(),
                sp.GetService<RedisEmbeddingStore>(), gateway);
        });
        return builder;
    }

    public static WebApplication MapGatewayStage(this WebApplication app)
    {
        app.UseStrictJsonRequests();
        app.UseStrictGrpcRequests();
        app.MapGrpcService<GatewayService>();
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
