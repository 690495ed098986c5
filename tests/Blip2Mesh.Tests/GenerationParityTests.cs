using System.Text.Json;
using Blip2Mesh.Model.Checkpoint;
using Blip2Mesh.Model.Generation;
using Blip2Mesh.Model.Runtime;

namespace Blip2Mesh.Tests;

/// <summary>Greedy and beam-search ids equal HF generate's on every blip2-tiny-a image and prompt.</summary>
public sealed class GenerationParityTests(StageParityTests.TinyModel tiny) : IClassFixture<StageParityTests.TinyModel>
{
    public static TheoryData<int, int> Cases()
    {
        var data = new TheoryData<int, int>();
        for (var i = 0; i < 8; i++)
            for (var j = 0; j < 3; j++) data.Add(i, j);
        return data;
    }

    private static JsonElement Prompt(JsonDocument references, int image, int prompt) =>
        references.RootElement.GetProperty("images")[image].GetProperty("prompts")[prompt];

    private static int[] Ints(JsonElement array) => array.EnumerateArray().Select(e => e.GetInt32()).ToArray();

    private (IReadOnlyList<GeneratedSequence> Results, List<int> Streamed, DecodingState State) Generate(int image, int[] promptIds, GenerationOptions options)
    {
        var generator = new Generator(tiny.Model);
        var queries = Fixtures.ReadTensor(tiny.References, $"img{image}/language_projection");
        var state = generator.Start(queries, promptIds, options);
        var streamed = generator.Run(state).SelectMany(t => t).ToList();
        return (state.Results, streamed, state);
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void GreedyMatchesReference(int image, int prompt)
    {
        using var references = Fixtures.References(Fixtures.TinyA);
        var reference = Prompt(references, image, prompt);
        var (results, streamed, state) = Generate(image, Ints(reference.GetProperty("input_ids")), new GenerationOptions());
        var expected = Ints(reference.GetProperty("greedy").GetProperty("ids"));
        Assert.Equal(expected, results[0].Ids);
        Assert.Equal(expected[1..], streamed);
        Assert.Equal(expected[^1] == 1 ? "eos" : "length", results[0].FinishReason);
        var logits = reference.GetProperty("greedy").GetProperty("chosen_token_logits").EnumerateArray().Select(e => e.GetSingle()).ToArray();
        Assert.Equal(logits.Length, state.ChosenTokenLogits.Count);
        for (var t = 0; t < logits.Length; t++)
            Assert.True(Math.Abs(logits[t] - state.ChosenTokenLogits[t]) <= 1e-4, $"step {t}: logit {state.ChosenTokenLogits[t]} vs {logits[t]}");
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void BeamSearchMatchesReference(int image, int prompt)
    {
        using var references = Fixtures.References(Fixtures.TinyA);
        var reference = Prompt(references, image, prompt);
        var (results, streamed, _) = Generate(image, Ints(reference.GetProperty("input_ids")), new GenerationOptions { NumBeams = 4 });
        var beam = reference.GetProperty("beam");
        var expected = Ints(beam.GetProperty("ids"));
        Assert.Equal(expected, results[0].Ids);
        Assert.Equal(expected[1..], streamed);
        Assert.Equal(beam.GetProperty("sequence_score").GetDouble(), results[0].Score!.Value, 1e-4);
    }
}
