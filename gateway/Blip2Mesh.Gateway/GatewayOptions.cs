namespace Blip2Mesh.Gateway;

/// <summary>Where the stages are and what the public endpoint accepts.</summary>
public sealed record GatewayOptions
{
    /// <summary>Replicas of each stage: "host:port" entries, or one DNS name resolving to many pods.</summary>
    public required IReadOnlyList<string> Vision { get; init; }
    public required IReadOnlyList<string> QFormer { get; init; }
    public required IReadOnlyList<string> Decoder { get; init; }
    /// <summary>Largest encoded image accepted.</summary>
    public int MaxImageBytes { get; init; } = 20 * 1024 * 1024;
    /// <summary>Largest decoded image (width × height), checked from the header before decoding.</summary>
    public long MaxImagePixels { get; init; } = 50_000_000;
    /// <summary>
    /// Memory that decoding and resizing images may hold at once (decoded pixels and the resampler's buffer, judged from
    /// each image's header before decoding it); an image needing more than all of it is refused.
    /// </summary>
    public long MaxImageWorkBytes { get; init; } = 448L << 20;
    /// <summary>Images decoded at once; the others wait their turn.</summary>
    public int MaxConcurrentDecodes { get; init; } = Environment.ProcessorCount;
    /// <summary>Bytes of query embeddings kept in memory (least recently used go first).</summary>
    public long CacheBytes { get; init; } = 256L * 1024 * 1024;
    /// <summary>Redis "host:port" shared by all gateway replicas as the second cache level; none when null.</summary>
    public string? Redis { get; init; }
    public TimeSpan RedisTtl { get; init; } = TimeSpan.FromDays(1);
    /// <summary>File of accepted API keys, one per line; the API is open when null.</summary>
    public string? ApiKeysFile { get; init; }
    /// <summary>PEM CA certificate the stages' TLS certificates are checked against; stage hops are cleartext when null.</summary>
    public string? StageTlsCa { get; init; }
    public ResilienceOptions Resilience { get; init; } = new();
    /// <summary>The model's name in the OpenAI API (/v1/models, "model"); the model folder's name when null.</summary>
    public string? ModelName { get; init; }
}
