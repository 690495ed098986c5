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

/// <summary>The public gRPC (and JSON) API over the gateway's one generation path.</summary>
public sealed class GatewayService(ImageEmbedder embedder, GenerationPath generation) : Blip2.Blip2Base
{
    public override async Task<PutImageResponse> PutImage(PutImageRequest request, ServerCallContext context)
    {
        var embedding = await embedder.EmbedAsync(request.Image.Memory, context.CancellationToken);
        return new PutImageResponse { ImageId = embedding.ImageId, CacheHit = embedding.CacheHit };
    }

    public override async Task Generate(GenerateRequest request, IServerStreamWriter<GenerateResponse> responses, ServerCallContext context)
    {
        var http = context.GetHttpContext();
        var requestId = RequestIds.FromHeader(http.Request.Headers[RequestIds.Header]);
        // Sent with the response headers (gRPC metadata, or the HTTP headers of the JSON API).
        http.Response.Headers[RequestIds.Header] = requestId;
        await generation.RunAsync(request, requestId, "Generate", responses.WriteAsync, context.Deadline, context.CancellationToken);
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
        services.AddSingleton<GenerationPath>();
        services.AddSingleton(sp =>
        {
            var model = Path.TrimEndingDirectorySeparator(sp.GetRequiredService<ServiceOptions>().Model);
            return new OpenAiEndpoints.ServedModel(gateway.ModelName ?? Path.GetFileName(model),
                new DateTimeOffset(File.GetLastWriteTimeUtc(Path.Combine(model, "config.json"))).ToUnixTimeSeconds());
        });
        services.AddSingleton(new StagePipelines(gateway.Resilience));
        services.AddSingleton(sp => new StageChannels(gateway, sp.GetRequiredService<ServiceOptions>().MaxMessageBytes, sp.GetRequiredService<ILogger<StageChannels>>()));
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
        app.MapOpenAi();
        // Load the model files now: a gateway that cannot read them must not report SERVING.
        _ = app.Services.GetRequiredService<ImageEmbedder>();
        _ = app.Services.GetRequiredService<T5Tokenizer>();
        var health = app.Services.GetRequiredService<ServiceHealth>();
        health.SetServing();
        app.Lifetime.ApplicationStopping.Register(health.SetStopping);
        return app;
    }
}
