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
    /// <summary>Bytes of query embeddings kept in memory (least recently used go first).</summary>
    public long CacheBytes { get; init; } = 256L * 1024 * 1024;
}
