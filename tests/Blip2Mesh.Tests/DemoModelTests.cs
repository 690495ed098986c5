using Blip2Mesh.Model.Pipeline;

namespace Blip2Mesh.Tests;

/// <summary>
/// The bundled demo model, end to end from encoded image files (decode, Pillow resize, the uint8 vision graph,
/// Q-Former, T5), in process: greedy output ids and text equal HF's for every sample (samples/expected.json) and
/// every dev-set case (tests/fixtures/blip2-demo-dev/eval.json).
/// </summary>
public sealed class DemoModelTests : IClassFixture<DemoModelTests.DemoPipeline>
{
    public sealed class DemoPipeline : IDisposable
    {
        public Blip2Pipeline Pipeline { get; } = Blip2Pipeline.Load(Fixtures.Demo);
        public void Dispose() => Pipeline.Dispose();
    }

    private readonly Blip2Pipeline _pipeline;

    public DemoModelTests(DemoPipeline demo) => _pipeline = demo.Pipeline;

    public static TheoryData<string, string> Images() => DemoReferences.Images();

    [Theory]
    [MemberData(nameof(Images))]
    public void GreedyOutputEqualsHuggingFace(string set, string file)
    {
        var cases = DemoReferences.Sets[set][file];
        var queries = _pipeline.EmbedImage(File.ReadAllBytes(cases[0].Image));
        foreach (var expected in cases)
        {
            Assert.Equal(expected.InputIds, _pipeline.Tokenizer.Encode(expected.Prompt));
            var deltas = _pipeline.Generate(queries, expected.Prompt, DemoReferences.Options).ToList();
            var final = deltas[^1].Final!;
            Assert.True(expected.OutputIds.SequenceEqual(final.Best.Ids),
                $"{expected}: HF [{string.Join(", ", expected.OutputIds)}], ours [{string.Join(", ", final.Best.Ids)}]");
            Assert.Equal(expected.OutputText, final.Text.Trim());
            Assert.Equal(final.Text, string.Concat(deltas.Select(d => d.Text)));
        }
    }
}

/// <summary>
/// The same reference answers through one mesh of real processes (gateway → vision → qformer → decoder), every
/// case of both sets sent from the image files as concurrent requests, as callers would send them.
/// </summary>
public sealed class DemoModelMeshTests(DemoModelMeshTests.DemoMesh demo) : IClassFixture<DemoModelMeshTests.DemoMesh>
{
    public sealed class DemoMesh : IDisposable
    {
        public MeshProcess Mesh { get; } = new(Fixtures.Demo);
        public void Dispose() => Mesh.Dispose();
    }

    [Fact]
    public async Task EveryReferenceAnswerComesBackThroughTheMesh()
    {
        var client = MeshClients.Gateway(demo.Mesh.GatewayAddress, out var channel);
        using var _ = channel;
        var options = new Contracts.V1.GenerationOptions { MaxNewTokens = DemoReferences.Options.MaxNewTokens };
        var cases = DemoReferences.All.ToList();
        var mismatches = new System.Collections.Concurrent.ConcurrentBag<string>();
        await Parallel.ForEachAsync(cases, new ParallelOptions { MaxDegreeOfParallelism = 16 }, async (expected, _) =>
        {
            var answer = await MeshClients.AskAsync(client, MeshClients.Request(File.ReadAllBytes(expected.Image), expected.Prompt, options));
            // The stream carries the generated ids, without the decoder start id.
            if (answer.Error is not null) mismatches.Add($"{expected}: {answer.Error.Status}");
            else if (!answer.TokenIds.SequenceEqual(expected.OutputIds[1..]) || answer.Text.Trim() != expected.OutputText || answer.FinishReason != "eos")
                mismatches.Add($"{expected}: HF [{string.Join(", ", expected.OutputIds[1..])}] \"{expected.OutputText}\", " +
                               $"mesh [{string.Join(", ", answer.TokenIds)}] \"{answer.Text}\" ({answer.FinishReason})");
        });
        Assert.True(mismatches.IsEmpty, $"{mismatches.Count} of {cases.Count} answers differ:\n{string.Join("\n", mismatches.Order())}");
    }
}
