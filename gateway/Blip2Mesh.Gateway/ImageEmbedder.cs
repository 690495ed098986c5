using System.Diagnostics;
using System.Security.Cryptography;
using Blip2Mesh.Contracts.QFormer.V1;
using Blip2Mesh.Contracts.Vision.V1;
using Blip2Mesh.Model.Checkpoint;
using Blip2Mesh.Model.Imaging;
using Blip2Mesh.Model.Runtime;
using Blip2Mesh.ServiceDefaults;
using Grpc.Core;

namespace Blip2Mesh.Gateway;

/// <summary>The query embeddings of one image, where they came from and what each stage cost.</summary>
public sealed record ImageEmbedding(string ImageId, FloatTensor QueryEmbeds, bool CacheHit, IReadOnlyDictionary<string, double> StageMs);

/// <summary>
/// Image bytes → query embeddings: decode and resize here (uint8 RGB is 4x smaller than float pixels on the
/// wire), then the vision and Q-Former stages, with the result cached under the image's id and the model.
/// </summary>
public sealed class ImageEmbedder(Blip2Config config, string fingerprint, ImagePreprocessor images, StageChannels stages, EmbeddingCache cache, GatewayOptions options)
{
    public string Fingerprint => fingerprint;

    /// <summary>SHA-256 of the image bytes: the image's id for later requests.</summary>
    public static string ImageId(ReadOnlySpan<byte> image) => Convert.ToHexStringLower(SHA256.HashData(image));

    private string CacheKey(string imageId) => $"{fingerprint}:{imageId}";

    public async Task<ImageEmbedding> EmbedAsync(ReadOnlyMemory<byte> image, ServerCallContext context)
    {
        if (image.Length == 0) throw new RpcException(new Status(StatusCode.InvalidArgument, "image: is empty"));
        if (image.Length > options.MaxImageBytes)
            throw new RpcException(new Status(StatusCode.InvalidArgument, $"image: {image.Length} bytes exceed the limit of {options.MaxImageBytes}"));
        var imageId = ImageId(image.Span);
        var stageMs = new Dictionary<string, double>();
        var (embeds, hit) = await cache.GetOrComputeAsync(CacheKey(imageId), () => ComputeAsync(image, stageMs, context));
        return new ImageEmbedding(imageId, embeds, hit, hit ? new Dictionary<string, double>() : stageMs);
    }

    public bool TryGetCached(string imageId, out FloatTensor embeds) => cache.TryGet(CacheKey(imageId), out embeds);

    private async Task<FloatTensor> ComputeAsync(ReadOnlyMemory<byte> image, Dictionary<string, double> stageMs, ServerCallContext context)
    {
        var clock = Stopwatch.StartNew();
        RgbImage resized;
        try
        {
            resized = await Task.Run(() => images.ToModelSize(image.Span));
        }
        catch (InvalidImageException e)
        {
            throw new RpcException(new Status(StatusCode.InvalidArgument, $"image: {e.Message}"));
        }
        stageMs["preprocess"] = clock.Elapsed.TotalMilliseconds;

        clock.Restart();
        var size = config.Vision.ImageSize;
        var imageEmbeds = await CallStageAsync("vision", async () =>
        {
            using var call = new Contracts.Vision.V1.Vision.VisionClient(stages.Vision).Embed(deadline: context.Deadline, cancellationToken: context.CancellationToken);
            await call.RequestStream.WriteAsync(new EmbedRequest { Pixels = TensorCodec.FromUInt8(resized.Pixels, 1, size, size, 3), ModelFingerprint = fingerprint });
            await call.RequestStream.CompleteAsync();
            if (!await call.ResponseStream.MoveNext(context.CancellationToken)) throw new RpcException(new Status(StatusCode.Internal, "no response"));
            return call.ResponseStream.Current.ImageEmbeds;
        });
        stageMs["vision"] = clock.Elapsed.TotalMilliseconds;

        clock.Restart();
        var queryEmbeds = await CallStageAsync("qformer", async () =>
        {
            using var call = new Contracts.QFormer.V1.QFormer.QFormerClient(stages.QFormer).Project(deadline: context.Deadline, cancellationToken: context.CancellationToken);
            await call.RequestStream.WriteAsync(new ProjectRequest { ImageEmbeds = imageEmbeds, ModelFingerprint = fingerprint });
            await call.RequestStream.CompleteAsync();
            if (!await call.ResponseStream.MoveNext(context.CancellationToken)) throw new RpcException(new Status(StatusCode.Internal, "no response"));
            return call.ResponseStream.Current.QueryEmbeds;
        });
        stageMs["qformer"] = clock.Elapsed.TotalMilliseconds;
        return TensorCodec.ToFloat(queryEmbeds, "query_embeds", [1, config.NumQueryTokens, config.Text.DModel], "the Q-Former output");
    }

    /// <summary>Runs a stage call; a failure reaches the caller with the stage named.</summary>
    public static async Task<T> CallStageAsync<T>(string stage, Func<Task<T>> call)
    {
        try
        {
            return await call();
        }
        catch (RpcException e) when (e.StatusCode != StatusCode.Cancelled)
        {
            throw StageFailure(stage, e);
        }
    }

    public static RpcException StageFailure(string stage, RpcException e) =>
        new(new Status(e.StatusCode, $"{stage} stage: {e.Status.Detail}"));
}
