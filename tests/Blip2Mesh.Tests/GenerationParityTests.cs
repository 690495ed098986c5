using Blip2Mesh.Model.Generation;

namespace Blip2Mesh.Tests;

/// <summary>Greedy and beam-search ids, texts and scores equal HF generate's for every reference case.</summary>
public sealed class GenerationParityTests
{
    public static TheoryData<string, int, int> Cases() => Fixtures.PromptCases();

    private static (DecodingState State, List<int> Streamed, string Text, string StreamedText) Generate(string checkpoint, int image, int[] promptIds, GenerationOptions options)
    {
        var pipeline = Fixtures.Pipeline(checkpoint);
        var queries = Fixtures.ReadTensor(Fixtures.Tensors(checkpoint), $"img{image}/language_projection");
        var state = pipeline.Generator.Start(queries, promptIds, options);
        var decoder = pipeline.Tokenizer.CreateStreamingDecoder();
        var streamed = new List<int>();
        var text = "";
        foreach (var tokens in pipeline.Generator.Run(state))
        {
            streamed.AddRange(tokens);
            text += string.Concat(tokens.Select(decoder.Push));
        }
        return (state, streamed, pipeline.Tokenizer.Decode(state.Results[0].Ids), text + decoder.Finish());
    }

    private static int MaxNewTokens(string checkpoint) =>
        Fixtures.References(checkpoint).GetProperty("generation").GetProperty("max_new_tokens").GetInt32();

    [Theory]
    [MemberData(nameof(Cases))]
    public void GreedyMatchesReference(string checkpoint, int image, int prompt)
    {
        var reference = Fixtures.Prompt(checkpoint, image, prompt);
        var greedy = reference.GetProperty("greedy");
        var (state, streamed, text, streamedText) = Generate(checkpoint, image, Fixtures.Ints(reference.GetProperty("input_ids")),
            new GenerationOptions { MaxNewTokens = MaxNewTokens(checkpoint) });
        var expected = Fixtures.Ints(greedy.GetProperty("ids"));
        Assert.Equal(expected, state.Results[0].Ids);
        Assert.Equal(expected[1..], streamed);
        Assert.Equal(greedy.GetProperty("ended_with_eos").GetBoolean() ? "eos" : "length", state.Results[0].FinishReason);
        Assert.Equal(greedy.GetProperty("text").GetString(), text);
        Assert.Equal(text, streamedText);
        if (!greedy.TryGetProperty("chosen_token_logits", out var chosen)) return;
        var logits = chosen.EnumerateArray().Select(e => e.GetSingle()).ToArray();
        Assert.Equal(logits.Length, state.ChosenTokenLogits.Count);
        for (var t = 0; t < logits.Length; t++)
            Assert.True(Math.Abs(logits[t] - state.ChosenTokenLogits[t]) <= 1e-4, $"step {t}: logit {state.ChosenTokenLogits[t]} vs {logits[t]}");
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void BeamSearchMatchesReference(string checkpoint, int image, int prompt)
    {
        var reference = Fixtures.Prompt(checkpoint, image, prompt);
        var beam = reference.GetProperty("beam");
        var settings = Fixtures.References(checkpoint).GetProperty("generation").GetProperty("beam");
        var (state, streamed, text, streamedText) = Generate(checkpoint, image, Fixtures.Ints(reference.GetProperty("input_ids")), new GenerationOptions
        {
            MaxNewTokens = MaxNewTokens(checkpoint),
            NumBeams = beam.GetProperty("num_beams").GetInt32(),
            LengthPenalty = settings.TryGetProperty("length_penalty", out var penalty) ? penalty.GetSingle() : 1f,
            EarlyStopping = settings.TryGetProperty("early_stopping", out var early) ? early.ToString().ToLowerInvariant() : "false",
        });
        var expected = Fixtures.Ints(beam.GetProperty("ids"));
        Assert.Equal(expected, state.Results[0].Ids);
        Assert.Equal(expected[1..], streamed);
        Assert.Equal(beam.GetProperty("text").GetString(), text);
        Assert.Equal(text, streamedText);
        if (beam.TryGetProperty("sequence_score", out var score)) Assert.Equal(score.GetDouble(), state.Results[0].Score!.Value, 1e-4);
    }
}
