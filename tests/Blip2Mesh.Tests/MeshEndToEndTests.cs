using System.Diagnostics;
using System.Net.Http.Json;
using System.Text;
using System.Text.Json;
using Blip2Mesh.Client;
using Blip2Mesh.Contracts.V1;
using Grpc.Core;
using Grpc.Health.V1;
using Grpc.Net.Client;
using Grpc.Reflection.V1Alpha;

namespace Blip2Mesh.Tests;

/// <summary>The mesh as separate processes on loopback, serving blip2-tiny-a, called by clients that are not ours.</summary>
public sealed class MeshEndToEndTests(MeshEndToEndTests.TinyMesh mesh) : IClassFixture<MeshEndToEndTests.TinyMesh>
{
    private const string Checkpoint = "blip2-tiny-a";

    public sealed class TinyMesh : IDisposable
    {
        public MeshProcess Mesh { get; } = new(Fixtures.TinyA);
        public void Dispose() => Mesh.Dispose();
    }

    private static string ImagePath(int image) =>
        Path.Combine(Fixtures.TinyA, Fixtures.Image(Checkpoint, image).GetProperty("file").GetString()!);

    [Fact]
    public void PythonGrpcClientGetsReferenceIdsStreamed()
    {
        var cases = new List<(int Image, int Prompt, int Beams)> { (0, 1, 1), (2, 2, 1), (4, 0, 1), (5, 1, 4), (6, 2, 4), (3, 0, 4) };
        var requests = Path.GetTempFileName();
        File.WriteAllLines(requests, cases.Select(c => JsonSerializer.Serialize(new
        {
            image = ImagePath(c.Image),
            prompt = Fixtures.Prompt(Checkpoint, c.Image, c.Prompt).GetProperty("prompt").GetString(),
            options = new { num_beams = c.Beams },
        })));
        var lines = PythonClients.Run(Path.Combine(Fixtures.RepoRoot, "tests", "e2e", "blip2_client.py"), mesh.Mesh.GatewayAddress, requests);
        File.Delete(requests);

        Assert.Equal(cases.Count, lines.Count);
        for (var k = 0; k < cases.Count; k++)
        {
            var (image, prompt, beams) = cases[k];
            var expected = Fixtures.Prompt(Checkpoint, image, prompt).GetProperty(beams == 1 ? "greedy" : "beam");
            var result = lines[k];
            Assert.False(result.TryGetProperty("error", out var error), error.ToString());
            Assert.Equal(Fixtures.Ints(expected.GetProperty("ids"))[1..], Fixtures.Ints(result.GetProperty("token_ids")));
            Assert.Equal(expected.GetProperty("text").GetString(), result.GetProperty("text").GetString());
            Assert.Equal(expected.GetProperty("ended_with_eos").GetBoolean() ? "eos" : "length", result.GetProperty("finish_reason").GetString());
        }
    }

    [Fact]
    public async Task EveryServiceReportsServingAndReflectionListsTheApi()
    {
        Assert.Equal(["decoder-0", "gateway", "qformer", "vision"], mesh.Mesh.Services.Keys.Order());
        foreach (var (name, address) in mesh.Mesh.Services)
        {
            using var channel = GrpcChannel.ForAddress($"http://{address}");
            var status = new Health.HealthClient(channel).Check(new HealthCheckRequest()).Status;
            Assert.True(status == HealthCheckResponse.Types.ServingStatus.Serving, $"{name} is {status}");
        }
        using var gateway = GrpcChannel.ForAddress($"http://{mesh.Mesh.GatewayAddress}");
        using var call = new ServerReflection.ServerReflectionClient(gateway).ServerReflectionInfo();
        await call.RequestStream.WriteAsync(new ServerReflectionRequest { ListServices = "" });
        await call.RequestStream.CompleteAsync();
        Assert.True(await call.ResponseStream.MoveNext());
        var services = call.ResponseStream.Current.ListServicesResponse.Service.Select(s => s.Name).ToList();
        Assert.Contains("blip2.v1.Blip2", services);
        Assert.Contains("grpc.health.v1.Health", services);
    }

    [Fact]
    public async Task JsonTranscodingStreamsNewlineDelimitedJson()
    {
        using var http = new HttpClient { BaseAddress = new Uri(mesh.Mesh.HttpAddress) };
        var image = Convert.ToBase64String(File.ReadAllBytes(ImagePath(1)));
        var put = await http.PostAsJsonAsync("/v1/images", new { image });
        put.EnsureSuccessStatusCode();
        var imageId = (await put.Content.ReadFromJsonAsync<JsonElement>()).GetProperty("imageId").GetString()!;

        using var request = new HttpRequestMessage(HttpMethod.Post, "/v1/generate")
        {
            Content = JsonContent.Create(new { imageId, prompt = "a photo of", options = new { numBeams = 4 } }),
        };
        using var response = await http.SendAsync(request, HttpCompletionOption.ResponseHeadersRead);
        response.EnsureSuccessStatusCode();
        var lines = (await response.Content.ReadAsStringAsync()).Split('\n', StringSplitOptions.RemoveEmptyEntries)
            .Select(l => JsonDocument.Parse(l).RootElement).ToList();
        var ids = lines.SelectMany(l => l.TryGetProperty("tokenIds", out var t) ? Fixtures.Ints(t) : []).ToArray();
        Assert.Equal(Fixtures.Ints(Fixtures.Prompt(Checkpoint, 1, 1).GetProperty("beam").GetProperty("ids"))[1..], ids);
        var last = lines[^1];
        Assert.True(last.GetProperty("usage").GetProperty("cacheHit").GetBoolean());
        Assert.Equal(string.Concat(lines.Select(l => l.TryGetProperty("text", out var t) ? t.GetString() : "")),
            Fixtures.Prompt(Checkpoint, 1, 1).GetProperty("beam").GetProperty("text").GetString());
    }

    [Fact]
    public async Task DotnetClientStreamsAndReusesCachedImages()
    {
        using var client = new Blip2Client(mesh.Mesh.GatewayAddress);
        var bytes = File.ReadAllBytes(ImagePath(7));
        var put = await client.PutImageAsync(bytes);
        var expected = Fixtures.Prompt(Checkpoint, 7, 2).GetProperty("greedy");
        var deltas = new List<GenerateResponse>();
        await foreach (var delta in client.GenerateAsync(put.ImageId, "Question: what is in the picture? Answer:")) deltas.Add(delta);
        Assert.Equal(Fixtures.Ints(expected.GetProperty("ids"))[1..], deltas.SelectMany(d => d.TokenIds).ToArray());
        Assert.Equal(expected.GetProperty("text").GetString(), string.Concat(deltas.Select(d => d.Text)));
        Assert.True(deltas[^1].Usage.CacheHit);
        Assert.Equal(12, deltas[^1].Usage.PromptTokens);
        Assert.Equal(put.ImageId, deltas[0].ImageId);
    }

    [Fact]
    public async Task RequestsWithoutExactlyOneImageOrWithAnUnknownIdAreRefused()
    {
        using var channel = GrpcChannel.ForAddress($"http://{mesh.Mesh.GatewayAddress}");
        var client = new Blip2.Blip2Client(channel);
        async Task<RpcException> Fails(GenerateRequest request) =>
            await Assert.ThrowsAsync<RpcException>(async () =>
            {
                using var call = client.Generate(request);
                await foreach (var _ in call.ResponseStream.ReadAllAsync()) { }
            });
        var neither = await Fails(new GenerateRequest());
        Assert.Equal(StatusCode.InvalidArgument, neither.StatusCode);
        var both = await Fails(new GenerateRequest { ImageId = "abc", Image = Google.Protobuf.ByteString.CopyFrom(File.ReadAllBytes(ImagePath(0))) });
        Assert.Equal(StatusCode.InvalidArgument, both.StatusCode);
        var unknown = await Fails(new GenerateRequest { ImageId = new string('0', 64) });
        Assert.Equal(StatusCode.NotFound, unknown.StatusCode);
        Assert.Contains(new string('0', 64), unknown.Status.Detail);
        var badOption = await Fails(new GenerateRequest { Image = Google.Protobuf.ByteString.CopyFrom(File.ReadAllBytes(ImagePath(0))), Options = new GenerationOptions { TopP = 2 } });
        Assert.Equal(StatusCode.InvalidArgument, badOption.StatusCode);
        Assert.Contains("top_p", badOption.Status.Detail);
    }
}
