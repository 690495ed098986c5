using System.Text.Json;
using Blip2Mesh.Model.Generation;
using Blip2Mesh.Model.Pipeline;

namespace Blip2Mesh.Tests;

/// <summary>
/// The bundled demo model, end to end from encoded image files (decode, Pillow resize, the uint8 vision graph,
/// Q-Former, T5): greedy output equals HF's for every sample image and prompt in samples/expected.json.
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

    public static TheoryData<string> Samples()
    {
        using var expected = JsonDocument.Parse(File.ReadAllBytes(Path.Combine(Fixtures.Demo, "samples", "expected.json")));
        return new TheoryData<string>(expected.RootElement.GetProperty("samples").EnumerateArray().Select(s => s.GetProperty("file").GetString()!));
    }

    [Theory]
    [MemberData(nameof(Samples))]
    public void GreedyOutputEqualsHuggingFace(string file)
    {
        using var expected = JsonDocument.Parse(File.ReadAllBytes(Path.Combine(Fixtures.Demo, "samples", "expected.json")));
        var sample = expected.RootElement.GetProperty("samples").EnumerateArray().Single(s => s.GetProperty("file").GetString() == file);
        var queries = _pipeline.EmbedImage(File.ReadAllBytes(Path.Combine(Fixtures.Demo, "samples", file)));
        foreach (var result in sample.GetProperty("results").EnumerateArray())
        {
            var prompt = result.GetProperty("prompt").GetString()!;
            Assert.Equal(result.GetProperty("input_ids").EnumerateArray().Select(e => e.GetInt32()), _pipeline.Tokenizer.Encode(prompt));
            var deltas = _pipeline.Generate(queries, prompt, new GenerationOptions { MaxNewTokens = 20 }).ToList();
            var final = deltas[^1].Final!;
            Assert.Equal(result.GetProperty("output_ids").EnumerateArray().Select(e => e.GetInt32()), final.Best.Ids);
            Assert.Equal(result.GetProperty("output_text").GetString(), final.Text.Trim());
            Assert.Equal(final.Text, string.Concat(deltas.Select(d => d.Text)));
        }
    }
}
