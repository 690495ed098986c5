using Blip2Mesh.Contracts.V1;
using Grpc.Core;

namespace Blip2Mesh.Tests;

/// <summary>
/// The embedding cache with real processes and a real Redis: repeated questions skip vision and Q-Former, a second
/// gateway sharing Redis hits too, and Redis dying never fails a request.
/// </summary>
public sealed class CacheTests : IDisposable
{
    private readonly RedisProcess _redis = new();
    private readonly ServiceProcess _vision = new("vision", Fixtures.TinyA);
    private readonly ServiceProcess _qformer = new("qformer", Fixtures.TinyA);
    private readonly ServiceProcess _decoder = new("decoder", Fixtures.TinyA);
    private readonly ServiceProcess _gateway1;
    private readonly ServiceProcess _gateway2;

    public CacheTests()
    {
        string[] stages = ["--vision", _vision.Address, "--qformer", _qformer.Address, "--decoder", _decoder.Address, "--redis", _redis.Address];
        _gateway1 = new ServiceProcess("gateway", Fixtures.TinyA, stages);
        _gateway2 = new ServiceProcess("gateway", Fixtures.TinyA, stages);
    }

    public void Dispose()
    {
        foreach (var p in new IDisposable[] { _gateway1, _gateway2, _decoder, _qformer, _vision, _redis }) p.Dispose();
    }

    private static byte[] Image(int index) =>
        File.ReadAllBytes(Path.Combine(Fixtures.TinyA, Fixtures.Image("blip2-tiny-a", index).GetProperty("file").GetString()!));

    private static int[] Expected(int image, int prompt) =>
        Fixtures.Ints(Fixtures.Prompt("blip2-tiny-a", image, prompt).GetProperty("greedy").GetProperty("ids"))[1..];

    private static string Prompt(int image, int prompt) => Fixtures.Prompt("blip2-tiny-a", image, prompt).GetProperty("prompt").GetString()!;

    private double VisionCalls => _vision.Metric("blip2mesh_stage_requests_total");
    private double QFormerCalls => _qformer.Metric("blip2mesh_stage_requests_total");

    [Fact]
    public async Task RepeatedQuestionsSharedGatewaysAndRedisFailure()
    {
        var first = MeshClients.Gateway(_gateway1.Address, out var channel1);
        var second = MeshClients.Gateway(_gateway2.Address, out var channel2);
        using var _ = channel1;
        using var __ = channel2;

        // A new image goes through vision and Q-Former once.
        var a = await MeshClients.AskAsync(first, MeshClients.Request(Image(2), Prompt(2, 1)));
        Assert.Null(a.Error);
        Assert.Equal(Expected(2, 1), a.TokenIds);
        Assert.False(a.Usage!.CacheHit);
        Assert.Equal((1, 1), (VisionCalls, QFormerCalls));

        // A second question about it: cache hit, no stage call.
        var b = await MeshClients.AskAsync(first, MeshClients.Request(Image(2), Prompt(2, 2)));
        Assert.Equal(Expected(2, 2), b.TokenIds);
        Assert.True(b.Usage!.CacheHit);
        Assert.Equal((1, 1), (VisionCalls, QFormerCalls));

        // The other gateway finds it in Redis, by bytes and by id.
        var c = await MeshClients.AskAsync(second, MeshClients.Request(Image(2), Prompt(2, 0)));
        Assert.Equal(Expected(2, 0), c.TokenIds);
        Assert.True(c.Usage!.CacheHit);
        var put = await first.PutImageAsync(new PutImageRequest { Image = Google.Protobuf.ByteString.CopyFrom(Image(5)) });
        var d = await MeshClients.AskAsync(second, new GenerateRequest { ImageId = put.ImageId, Prompt = Prompt(5, 1) });
        Assert.Null(d.Error);
        Assert.Equal(Expected(5, 1), d.TokenIds);
        Assert.Equal((2, 2), (VisionCalls, QFormerCalls));
        Assert.True(_gateway2.Metric("blip2mesh_cache_hits_total", "level=\"l2\"") >= 2);

        // Concurrent requests for one new image compute it once.
        var burst = await Task.WhenAll(Enumerable.Range(0, 6).Select(_ => MeshClients.AskAsync(first, MeshClients.Request(Image(6), Prompt(6, 2)))));
        Assert.All(burst, r => Assert.Equal(Expected(6, 2), r.TokenIds));
        Assert.Equal((3, 3), (VisionCalls, QFormerCalls));

        // A caller that gives up while its new image is being embedded does not fail the others waiting for it.
        for (var k = 0; k < 10; k++)
        {
            var bytes = Image(k % 8).Concat(BitConverter.GetBytes(k)).ToArray(); // new bytes, same pixels
            using var giveUp = new CancellationTokenSource(TimeSpan.FromMilliseconds(1 + k));
            var quitter = first.PutImageAsync(new PutImageRequest { Image = Google.Protobuf.ByteString.CopyFrom(bytes) }, cancellationToken: giveUp.Token).ResponseAsync;
            var patient = await MeshClients.AskAsync(first, MeshClients.Request(bytes, Prompt(k % 8, 1)));
            Assert.Null(patient.Error);
            Assert.Equal(Expected(k % 8, 1), patient.TokenIds);
            try
            {
                await quitter;
            }
            catch (RpcException cancelled)
            {
                Assert.Equal(StatusCode.Cancelled, cancelled.StatusCode);
            }
        }

        // Redis dies: requests still succeed, from the local cache and the stages; the failures are counted.
        _redis.Kill();
        var e = await MeshClients.AskAsync(second, MeshClients.Request(Image(7), Prompt(7, 1)));
        Assert.Null(e.Error);
        Assert.Equal(Expected(7, 1), e.TokenIds);
        var f = await MeshClients.AskAsync(first, MeshClients.Request(Image(2), Prompt(2, 1)));
        Assert.Equal(Expected(2, 1), f.TokenIds);
        Assert.True(f.Usage!.CacheHit);
        Assert.True(_gateway2.Metric("blip2mesh_cache_l2_errors_total") >= 1);

        // An id nobody knows (Redis gone, not in this gateway's memory) is NOT_FOUND, not an error of Redis.
        var missing = await MeshClients.AskAsync(first, new GenerateRequest { ImageId = new string('f', 64) });
        Assert.Equal(StatusCode.NotFound, missing.Error!.StatusCode);
    }
}
