using System.Security.Cryptography;
using Blip2Mesh.Contracts.QFormer.V1;
using Blip2Mesh.Contracts.Vision.V1;
using Blip2Mesh.Model.Checkpoint;
using Blip2Mesh.Model.Imaging;
using Blip2Mesh.Model.Runtime;
using Blip2Mesh.ServiceDefaults;
using System.Threading.RateLimiting;
using Blip2Mesh.Model.Errors;
using Grpc.Core;
using Polly;
using ProtoTensor = Blip2Mesh.Contracts.Tensor.V1.Tensor;

namespace Blip2Mesh.Gateway;

/// <summary>The query embeddings of one image, where they came from and what each stage cost.</summary>
public sealed record ImageEmbedding(string ImageId, FloatTensor QueryEmbeds, bool CacheHit, IReadOnlyDictionary<string, double> StageMs);

/// <summary>
/// Image bytes → query embeddings: decode and resize here (uint8 RGB is 4x smaller than float pixels on the
/// wire), then the vision and Q-Former stages. Results are cached under the model's fingerprint and the image's
/// SHA-256: in this process (L1), then in Redis shared by every gateway (L2). One computation per new image,
/// however many requests ask for it at once.
/// </summary>
public sealed class ImageEmbedder(
    Blip2Config config, string fingerprint, ImagePreprocessor images, StageChannels stages, StagePipelines pipelines,
    EmbeddingCache cache, RedisEmbeddingStore? redis, GatewayOptions options)
{
    private sealed record Computed(FloatTensor Embeds, bool FromRedis, Dictionary<string, double> StageMs);

    // Image work is bounded: in megabytes of pixels and buffers held at once, and in decodes running at once.
    private readonly ConcurrencyLimiter _workMemory = new(new ConcurrencyLimiterOptions
    {
        PermitLimit = (int)(options.MaxImageWorkBytes >> 20), QueueLimit = int.MaxValue, QueueProcessingOrder = QueueProcessingOrder.OldestFirst,
    });
    private readonly ConcurrencyLimiter _decoders = new(new ConcurrencyLimiterOptions
    {
        PermitLimit = options.MaxConcurrentDecodes, QueueLimit = int.MaxValue, QueueProcessingOrder = QueueProcessingOrder.OldestFirst,
    });

    public string Fingerprint => fingerprint;

    private long[] QueryShape => [1, config.NumQueryTokens, config.Text.DModel];

    /// <summary>SHA-256 of the image bytes: the image's id for later requests.</summary>
    public static string ImageId(ReadOnlySpan<byte> image) => Convert.ToHexStringLower(SHA256.HashData(image));

    /// <summary>Whether a string has the form of an image id (so a bad one is refused before any cache lookup).</summary>
    public static bool IsImageId(string id) => id.Length == 64 && id.All(char.IsAsciiHexDigit);

    private string CacheKey(string imageId) => $"blip2mesh:embeds:{fingerprint}:{imageId}";

    public async Task<ImageEmbedding> EmbedAsync(ReadOnlyMemory<byte> image, CancellationToken cancellation)
    {
        if (image.Length == 0) throw ServingException.Invalid("image", "is empty");
        if (image.Length > options.MaxImageBytes)
            throw ServingException.Invalid("image", $"{image.Length} bytes exceed the limit of {options.MaxImageBytes}");
        var imageId = ImageId(image.Span);
        var key = CacheKey(imageId);
        Computed? computed = null;
        // Computed for whoever asks for this image, and abandoned when nobody does any more.
        var (embeds, shared) = await cache.GetOrComputeAsync(key, async abandoned =>
        {
            computed = await FromRedisOrStagesAsync(key, image, abandoned);
            return computed.Embeds;
        }, cancellation);
        // A hit: this process had it (L1), another request computed it meanwhile, or Redis had it (L2).
        var hit = shared || computed is null || computed.FromRedis;
        if (computed is null || shared) MeshTelemetry.CacheHits.Add(1, new KeyValuePair<string, object?>("level", "l1"));
        return new ImageEmbedding(imageId, embeds, hit, computed is { FromRedis: false } && !shared ? computed.StageMs : new Dictionary<string, double>());
    }

    /// <summary>The cached embeddings of an image id (L1, then L2), or null.</summary>
    public async Task<FloatTensor?> FindAsync(string imageId)
    {
        var key = CacheKey(imageId);
        if (cache.TryGet(key, out var embeds))
        {
            MeshTelemetry.CacheHits.Add(1, new KeyValuePair<string, object?>("level", "l1"));
            return embeds;
        }
        if (redis is null || await redis.TryGetAsync(key) is not { } stored || stored.Length != FloatTensor.ElementCount(QueryShape)) return null;
        MeshTelemetry.CacheHits.Add(1, new KeyValuePair<string, object?>("level", "l2"));
        var tensor = new FloatTensor(stored, QueryShape);
        cache.Add(key, tensor);
        return tensor;
    }

    private async Task<Computed> FromRedisOrStagesAsync(string key, ReadOnlyMemory<byte> image, CancellationToken abandoned)
    {
        if (redis is not null && await redis.TryGetAsync(key) is { } stored && stored.Length == FloatTensor.ElementCount(QueryShape))
        {
            MeshTelemetry.CacheHits.Add(1, new KeyValuePair<string, object?>("level", "l2"));
            return new Computed(new FloatTensor(stored, QueryShape), true, []);
        }
        MeshTelemetry.CacheMisses.Add(1);
        var stageMs = new Dictionary<string, double>();
        var embeds = await ComputeAsync(image, stageMs, abandoned);
        redis?.Set(key, embeds.Data);
        return new Computed(embeds, false, stageMs);
    }

    /// <summary>Decodes and resizes within the image-work budget: bytes of pixels and buffers in use, and decodes at once.</summary>
    private async Task<RgbImage> ToModelSizeAsync(ReadOnlyMemory<byte> image, CancellationToken abandoned)
    {
        // The header says what the work will cost before any of it is done.
        var megabytes = (int)Math.Min(int.MaxValue, (images.WorkBytes(image.Span) + (1 << 20) - 1) >> 20);
        if (megabytes > options.MaxImageWorkBytes >> 20)
            throw ServingException.Invalid("image", $"is too large to decode here: it needs {megabytes} MiB of working memory; the limit is {options.MaxImageWorkBytes >> 20} MiB");
        using var memory = await _workMemory.AcquireAsync(megabytes, abandoned);
        using var decoder = await _decoders.AcquireAsync(1, abandoned);
        if (!memory.IsAcquired || !decoder.IsAcquired) throw ServingException.Unavailable("the gateway is busy decoding images: try again shortly");
        return images.ToModelSize(image.Span, abandoned);
    }

    private async Task<FloatTensor> ComputeAsync(ReadOnlyMemory<byte> image, Dictionary<string, double> stageMs, CancellationToken abandoned)
    {
        RgbImage resized;
        using (var preprocess = MeshTelemetry.Time(MeshTelemetry.StageDuration, "stage", "preprocess"))
        {
            resized = await ToModelSizeAsync(image, abandoned);
            stageMs["preprocess"] = preprocess.ElapsedMs;
        }

        var size = config.Vision.ImageSize;
        var pixels = TensorCodec.FromUInt8(resized.Pixels, 1, size, size, 3);
        var clock = System.Diagnostics.Stopwatch.StartNew();
        var imageEmbeds = await CallEncoderStageAsync("vision", pipelines.Vision,
            ct => new Contracts.Vision.V1.Vision.VisionClient(stages.Vision).Embed(cancellationToken: ct),
            new EmbedRequest { Pixels = pixels, ModelFingerprint = fingerprint }, r => r.ImageEmbeds, abandoned);
        stageMs["vision"] = clock.Elapsed.TotalMilliseconds;

        clock.Restart();
        var queryEmbeds = await CallEncoderStageAsync("qformer", pipelines.QFormer,
            ct => new Contracts.QFormer.V1.QFormer.QFormerClient(stages.QFormer).Project(cancellationToken: ct),
            new ProjectRequest { ImageEmbeds = imageEmbeds, ModelFingerprint = fingerprint }, r => r.QueryEmbeds, abandoned);
        stageMs["qformer"] = clock.Elapsed.TotalMilliseconds;
        return TensorCodec.ToFloat(queryEmbeds, "query_embeds", QueryShape, "the Q-Former output");
    }

    /// <summary>One request on an encoder stage's stream, its one response's tensor back, through the stage's pipeline.</summary>
    private static Task<ProtoTensor> CallEncoderStageAsync<TRequest, TResponse>(string stage, ResiliencePipeline pipeline,
        Func<CancellationToken, AsyncDuplexStreamingCall<TRequest, TResponse>> open, TRequest request, Func<TResponse, ProtoTensor> pick,
        CancellationToken abandoned) =>
        CallAsync(stage, pipeline, async ct =>
        {
            using var call = open(ct);
            await call.RequestStream.WriteAsync(request, ct);
            await call.RequestStream.CompleteAsync();
            if (!await call.ResponseStream.MoveNext(ct)) throw ServingException.Unavailable($"{stage} stage closed its stream without an answer");
            var tensor = pick(call.ResponseStream.Current);
            // Read to the end, so the stage sees its call complete rather than reset.
            while (await call.ResponseStream.MoveNext(ct)) { }
            return tensor;
        }, abandoned);

    /// <summary>Runs a stage call through its resilience pipeline; a failure reaches the caller with the stage named.</summary>
    private static async Task<T> CallAsync<T>(string stage, ResiliencePipeline pipeline, Func<CancellationToken, Task<T>> call, CancellationToken abandoned)
    {
        var resilience = ResilienceContextPool.Shared.Get(abandoned);
        try
        {
            return await pipeline.ExecuteAsync(async rc => await call(rc.CancellationToken), resilience);
        }
        catch (Exception e)
        {
            throw StageErrors.ForCaller(stage, e, abandoned);
        }
        finally
        {
            ResilienceContextPool.Shared.Return(resilience);
        }
    }
}
