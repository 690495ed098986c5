using System.Diagnostics;
using Blip2Mesh.Contracts.Decoder.V1;
using Blip2Mesh.Contracts.V1;
using Blip2Mesh.Model.Checkpoint;
using Blip2Mesh.Model.Imaging;
using Blip2Mesh.Model.Runtime;
using Blip2Mesh.ServiceDefaults;
using Grpc.Core;
using Microsoft.AspNetCore.Builder;
using Microsoft.Extensions.DependencyInjection;

namespace Blip2Mesh.Gateway;

/// <summary>The public API: embeds images through the vision and Q-Former stages (or the cache) and streams the decoder's answer.</summary>
public sealed class GatewayService(ImageEmbedder embedder, StageChannels stages, GenerationLimits limits) : Blip2.Blip2Base
{
    public override async Task<PutImageResponse> PutImage(PutImageRequest request, ServerCallContext context)
    {
        var embedding = await embedder.EmbedAsync(request.Image.Memory, context);
        return new PutImageResponse { ImageId = embedding.ImageId, CacheHit = embedding.CacheHit };
    }

    public override async Task Generate(GenerateRequest request, IServerStreamWriter<GenerateResponse> responses, ServerCallContext context)
    {
        var total = Stopwatch.StartNew();
        var hasImage = !request.Image.IsEmpty;
        var hasId = !string.IsNullOrEmpty(request.ImageId);
        if (hasImage == hasId)
            throw new RpcException(new Status(StatusCode.InvalidArgument, "give exactly one of image and image_id"));
        var options = request.Options ?? new Contracts.V1.GenerationOptions();
        GenerationRequests.ToOptions(options, limits);

        ImageEmbedding embedding;
        if (hasImage)
        {
            embedding = await embedder.EmbedAsync(request.Image.Memory, context);
        }
        else
        {
            if (!embedder.TryGetCached(request.ImageId, out var cached))
                throw new RpcException(new Status(StatusCode.NotFound, $"image_id {request.ImageId} is not known (or was evicted); send the image bytes or call PutImage first"));
            embedding = new ImageEmbedding(request.ImageId, cached, true, new Dictionary<string, double>());
        }

        var decode = new DecodeRequest
        {
            QueryEmbeds = TensorCodec.FromFloat(embedding.QueryEmbeds),
            Prompt = request.Prompt,
            Options = options,
            ModelFingerprint = embedder.Fingerprint,
        };
        var client = new Contracts.Decoder.V1.Decoder.DecoderClient(stages.Decoder);
        var first = true;
        try
        {
            using var call = client.Generate(decode, deadline: context.Deadline, cancellationToken: context.CancellationToken);
            await foreach (var e in call.ResponseStream.ReadAllAsync(context.CancellationToken))
            {
                var response = new GenerateResponse { Text = e.Text };
                response.TokenIds.AddRange(e.TokenIds);
                if (first) response.ImageId = embedding.ImageId;
                first = false;
                if (!string.IsNullOrEmpty(e.FinishReason))
                {
                    response.FinishReason = e.FinishReason;
                    response.Usage = new Usage { PromptTokens = e.PromptTokens, GeneratedTokens = e.GeneratedTokens, CacheHit = embedding.CacheHit };
                    foreach (var (stage, ms) in embedding.StageMs) response.Usage.StageMs[stage] = ms;
                    response.Usage.StageMs["decoder"] = e.DecoderMs;
                    response.Usage.StageMs["total"] = total.Elapsed.TotalMilliseconds;
                }
                await responses.WriteAsync(response, context.CancellationToken);
            }
        }
        catch (RpcException e) when (e.StatusCode != StatusCode.Cancelled)
        {
            throw ImageEmbedder.StageFailure("decoder", e);
        }
    }

    public static WebApplication Build(ServiceOptions service, GatewayOptions gateway)
    {
        var builder = MeshHost.CreateBuilder("blip2.v1.Blip2", service);
        builder.Services.AddGrpc().AddJsonTranscoding(o => o.JsonSettings.IgnoreDefaultValues = true);
        builder.Services.AddSingleton(gateway);
        builder.Services.AddSingleton(new GenerationLimits());
        builder.Services.AddSingleton(_ => new StageChannels(gateway, service.MaxMessageBytes));
        builder.Services.AddSingleton(_ => new EmbeddingCache(gateway.CacheBytes));
        builder.Services.AddSingleton(sp =>
        {
            // The gateway needs the model's shapes and fingerprint, never its weights in memory.
            using var checkpoint = Blip2Checkpoint.Open(service.Model);
            var images = new ImagePreprocessor(PreprocessorConfig.Load(Path.Combine(service.Model, "preprocessor_config.json")), gateway.MaxImagePixels);
            return new ImageEmbedder(checkpoint.Config, checkpoint.Fingerprint, images, sp.GetRequiredService<StageChannels>(), sp.GetRequiredService<EmbeddingCache>(), gateway);
        });
        var app = builder.Build();
        app.MapGrpcService<GatewayService>();
        app.MapMeshEndpoints();
        app.MapPlayground();
        // The gateway's own readiness: its model files are readable. Stage health is the stages' own.
        _ = app.Services.GetRequiredService<ImageEmbedder>();
        app.Services.GetRequiredService<ServiceHealth>().SetServing();
        return app;
    }
}
