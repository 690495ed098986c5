using Blip2Mesh.Contracts.V1;
using Blip2Mesh.Contracts.Vision.V1;
using Google.Protobuf;
using Grpc.Core;
using Grpc.Net.Client;
using Xunit.Abstractions;

namespace Blip2Mesh.Tests;

/// <summary>A public endpoint receives garbage: each bad request gets a clear status, and the mesh keeps serving.</summary>
public sealed class BadInputTests(BadInputTests.DemoMesh demo, ITestOutputHelper output) : IClassFixture<BadInputTests.DemoMesh>
{
    public sealed class DemoMesh : IDisposable
    {
        public MeshProcess Mesh { get; } = new(Fixtures.Demo);
        public void Dispose() => Mesh.Dispose();
    }

    private static readonly byte[] Png = File.ReadAllBytes(Path.Combine(Fixtures.Demo, "samples", "sample000.png"));
    private static readonly byte[] Jpeg = File.ReadAllBytes(Path.Combine(Fixtures.Demo, "samples", "sample002.jpg"));

    private async Task<Answer> Ask(GenerateRequest request)
    {
        var client = MeshClients.Gateway(demo.Mesh.GatewayAddress, out var channel);
        using var _ = channel;
        return await MeshClients.AskAsync(client, request, TimeSpan.FromSeconds(30));
    }

    public static TheoryData<string, string> BadImages() => new()
    {
        { "empty", "empty" },
        { "text", "not a supported image" },
        { "truncated-png", "truncated" },
        { "truncated-jpeg", "truncated" },
        { "bomb", "exceeds the limit" },
        { "too-large", "exceed the limit of 20971520" },
    };

    private static byte[] BadImage(string kind) => kind switch
    {
        "empty" => [],
        "text" => "this is not an image"u8.ToArray(),
        "truncated-png" => Png[..(Png.Length / 2)],
        "truncated-jpeg" => Jpeg[..(Jpeg.Length / 2)],
        "bomb" => TestImages.BombPng(50_000, 50_000),
        "too-large" => new byte[20 * 1024 * 1024 + 1],
        _ => throw new ArgumentOutOfRangeException(nameof(kind)),
    };

    [Theory]
    [MemberData(nameof(BadImages))]
    public async Task BadImagesAreInvalidArgumentNamingTheProblem(string kind, string message)
    {
        var answer = await Ask(MeshClients.Request(BadImage(kind)));
        Assert.Equal(StatusCode.InvalidArgument, answer.Error?.StatusCode);
        Assert.Contains(message, answer.Error!.Status.Detail);
        output.WriteLine($"{kind}: {answer.Error.Status.Detail}");
    }

    public static TheoryData<string, string> BadOptions() => new()
    {
        { "max_new_tokens=0", "max_new_tokens" },
        { "max_new_tokens=100000", "max_new_tokens" },
        { "num_beams=0", "num_beams" },
        { "num_beams=64", "num_beams" },
        { "temperature=-1", "temperature" },
        { "top_p=0", "top_p" },
        { "top_p=1.5", "top_p" },
        { "top_k=-3", "top_k" },
        { "repetition_penalty=0", "repetition_penalty" },
    };

    [Theory]
    [MemberData(nameof(BadOptions))]
    public async Task OptionsOutOfRangeAreInvalidArgumentNamingTheOption(string setting, string option)
    {
        var value = double.Parse(setting.Split('=')[1], System.Globalization.CultureInfo.InvariantCulture);
        var options = option switch
        {
            "max_new_tokens" => new GenerationOptions { MaxNewTokens = (int)value },
            "num_beams" => new GenerationOptions { NumBeams = (int)value },
            "temperature" => new GenerationOptions { DoSample = true, Temperature = (float)value },
            "top_p" => new GenerationOptions { DoSample = true, TopP = (float)value },
            "top_k" => new GenerationOptions { DoSample = true, TopK = (int)value },
            _ => new GenerationOptions { RepetitionPenalty = (float)value },
        };
        var answer = await Ask(MeshClients.Request(Png, "", options));
        Assert.Equal(StatusCode.InvalidArgument, answer.Error?.StatusCode);
        Assert.StartsWith(option, answer.Error!.Status.Detail);
    }

    [Fact]
    public async Task PromptOverTheTokenLimitAndImageChoiceErrors()
    {
        var longPrompt = await Ask(MeshClients.Request(Png, string.Join(" ", Enumerable.Repeat("red square", 300))));
        Assert.Equal(StatusCode.InvalidArgument, longPrompt.Error?.StatusCode);
        Assert.Contains("prompt", longPrompt.Error!.Status.Detail);
        var neither = await Ask(new GenerateRequest { Prompt = "x" });
        Assert.Equal(StatusCode.InvalidArgument, neither.Error?.StatusCode);
        var both = await Ask(new GenerateRequest { Image = ByteString.CopyFrom(Png), ImageId = "abc" });
        Assert.Equal(StatusCode.InvalidArgument, both.Error?.StatusCode);
        Assert.Contains("exactly one of image and image_id", both.Error!.Status.Detail);
        var malformed = await Ask(new GenerateRequest { ImageId = new string('x', 100_000) });
        Assert.Equal(StatusCode.InvalidArgument, malformed.Error?.StatusCode);
        Assert.StartsWith("image_id", malformed.Error!.Status.Detail);
        Assert.True(malformed.Error.Status.Detail.Length < 200, "the message does not echo the id back");
    }

    [Fact]
    public async Task AStageGivenAnotherModelsTensorsIsFailedPreconditionNamingBothModels()
    {
        using var channel = GrpcChannel.ForAddress($"http://{demo.Mesh.Services["vision"]}");
        var vision = new Contracts.Vision.V1.Vision.VisionClient(channel);
        async Task<RpcException> Embed(EmbedRequest request) => await Assert.ThrowsAsync<RpcException>(async () =>
        {
            using var call = vision.Embed();
            await call.RequestStream.WriteAsync(request);
            await call.RequestStream.CompleteAsync();
            await call.ResponseStream.MoveNext();
        });
        using var checkpoint = Model.Checkpoint.Blip2Checkpoint.Open(Fixtures.Demo);
        var pixels = new Contracts.Tensor.V1.Tensor { Dtype = Contracts.Tensor.V1.DType.Uint8, Data = ByteString.CopyFrom(new byte[224 * 224 * 3]) };
        pixels.Shape.Add([1, 224, 224, 3]);
        var otherModel = await Embed(new EmbedRequest { Pixels = pixels, ModelFingerprint = "0123456789abcdef" });
        Assert.Equal(StatusCode.FailedPrecondition, otherModel.StatusCode);
        Assert.Contains("0123456789abcdef", otherModel.Status.Detail);
        Assert.Contains(checkpoint.Fingerprint, otherModel.Status.Detail);

        var wrongShape = pixels.Clone();
        wrongShape.Shape.Clear();
        wrongShape.Shape.Add([1, 3, 224, 224]);
        var shape = await Embed(new EmbedRequest { Pixels = wrongShape });
        Assert.Equal(StatusCode.FailedPrecondition, shape.StatusCode);
        Assert.Contains("[1, 3, 224, 224]", shape.Status.Detail);
    }

    [Fact]
    public async Task FuzzedImageBytesAreEachAnsweredWithAStatusAndTheMeshKeepsServing()
    {
        var client = MeshClients.Gateway(demo.Mesh.GatewayAddress, out var channel);
        using var _ = channel;
        var random = new Random(20261126);
        var statuses = new Dictionary<StatusCode, int>();
        const int count = 2000;
        await Parallel.ForEachAsync(Enumerable.Range(0, count), new ParallelOptions { MaxDegreeOfParallelism = 4 }, async (i, ct) =>
        {
            byte[] bytes;
            lock (random) bytes = Fuzz(random, i);
            StatusCode code;
            try
            {
                await client.PutImageAsync(new PutImageRequest { Image = ByteString.CopyFrom(bytes) }, deadline: DateTime.UtcNow.AddSeconds(30), cancellationToken: ct);
                code = StatusCode.OK;
            }
            catch (RpcException e)
            {
                code = e.StatusCode;
            }
            lock (statuses) statuses[code] = statuses.GetValueOrDefault(code) + 1;
        });
        output.WriteLine(string.Join(", ", statuses.Select(s => $"{s.Key}: {s.Value}")));
        Assert.Equal(count, statuses.Values.Sum());
        Assert.True(statuses.Keys.All(c => c is StatusCode.OK or StatusCode.InvalidArgument), string.Join(", ", statuses.Keys));
        var after = await MeshClients.AskAsync(client, MeshClients.Request(Png));
        Assert.Null(after.Error);
        Assert.Equal(DemoReferences.Sample("sample000.png", "").OutputText, after.Text);
    }

    /// <summary>Random bytes, or a sample image with bytes flipped, cut or spliced.</summary>
    private static byte[] Fuzz(Random random, int i)
    {
        var source = i % 2 == 0 ? Png : Jpeg;
        switch (i % 4)
        {
            case 0:
                return random.GetItems<byte>(Enumerable.Range(0, 256).Select(b => (byte)b).ToArray(), random.Next(0, 4096));
            case 1:
            {
                var mutated = source.ToArray();
                for (var k = random.Next(1, 20); k > 0; k--) mutated[random.Next(mutated.Length)] = (byte)random.Next(256);
                return mutated;
            }
            case 2:
                return source[..random.Next(1, source.Length)];
            default:
            {
                var cut = random.Next(8, source.Length);
                return [.. source[..cut], .. random.GetItems<byte>([0, 0xFF, 0x7F, 0x89], random.Next(1, 64)), .. source[cut..]];
            }
        }
    }
}
