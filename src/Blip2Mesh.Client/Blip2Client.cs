using Blip2Mesh.Contracts.V1;
using Google.Protobuf;
using Grpc.Core;
using Grpc.Net.Client;

namespace Blip2Mesh.Client;

/// <summary>
/// Calls a Blip2Mesh gateway:
/// <code>await foreach (var delta in client.GenerateAsync(image, "Question: what is this? Answer:")) Console.Write(delta.Text);</code>
/// </summary>
public sealed class Blip2Client : IDisposable
{
    private readonly GrpcChannel _channel;
    private readonly Blip2.Blip2Client _client;
    private readonly Metadata _headers = [];

    /// <param name="address">"host:port" or a full "http://host:port" URL.</param>
    /// <param name="apiKey">Sent as "authorization: Bearer …" when the gateway requires a key.</param>
    public Blip2Client(string address, string? apiKey = null)
    {
        var url = address.Contains("://", StringComparison.Ordinal) ? address : $"http://{address}";
        _channel = GrpcChannel.ForAddress(url, new GrpcChannelOptions { MaxReceiveMessageSize = 64 * 1024 * 1024, MaxSendMessageSize = 64 * 1024 * 1024 });
        _client = new Blip2.Blip2Client(_channel);
        if (apiKey is not null) _headers.Add("authorization", $"Bearer {apiKey}");
    }

    /// <summary>Streams the answer for image bytes; the last delta carries finish_reason and usage.</summary>
    public IAsyncEnumerable<GenerateResponse> GenerateAsync(byte[] image, string prompt = "", GenerationOptions? options = null, CancellationToken cancellationToken = default) =>
        StreamAsync(new GenerateRequest { Image = ByteString.CopyFrom(image), Prompt = prompt, Options = options }, cancellationToken);

    /// <summary>Streams the answer for an image embedded earlier (see <see cref="PutImageAsync"/>).</summary>
    public IAsyncEnumerable<GenerateResponse> GenerateAsync(string imageId, string prompt = "", GenerationOptions? options = null, CancellationToken cancellationToken = default) =>
        StreamAsync(new GenerateRequest { ImageId = imageId, Prompt = prompt, Options = options }, cancellationToken);

    /// <summary>Embeds an image once; ask about it later by its id without sending it again.</summary>
    public async Task<PutImageResponse> PutImageAsync(byte[] image, CancellationToken cancellationToken = default) =>
        await _client.PutImageAsync(new PutImageRequest { Image = ByteString.CopyFrom(image) }, _headers, cancellationToken: cancellationToken);

    private async IAsyncEnumerable<GenerateResponse> StreamAsync(GenerateRequest request, [System.Runtime.CompilerServices.EnumeratorCancellation] CancellationToken cancellationToken)
    {
        using var call = _client.Generate(request, _headers, cancellationToken: cancellationToken);
        await foreach (var response in call.ResponseStream.ReadAllAsync(cancellationToken)) yield return response;
    }

    public void Dispose() => _channel.Dispose();
}
