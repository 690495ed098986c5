using Blip2Mesh.Model.Generation;
using Blip2Mesh.Model.Text;

namespace Blip2Mesh.Tests;

/// <summary>
/// Logprobs, several answers and stop strings in process on tiny-a: asking for them leaves the answers equal to
/// Hugging Face's, and logprobs agree with HF's own first-step logits and beam scores.
/// </summary>
public sealed class GenerationFeatureTests
{
    private const string Checkpoint = "blip2-tiny-a";

    private static DecodingState Run(int image, int prompt, GenerationOptions options) => RunAll(image, prompt, options)[0];

    private static IReadOnlyList<DecodingState> RunAll(int image, int prompt, GenerationOptions options)
    {
        var pipeline = Fixtures.Pipeline(Checkpoint);
        var queries = Fixtures.ReadTensor(Fixtures.Tensors(Checkpoint), $"img{image}/language_projection");
        var states = pipeline.Generator.StartRequest(queries, Fixtures.Ints(Fixtures.Prompt(Checkpoint, image, prompt).GetProperty("input_ids")), options);
        foreach (var _ in pipeline.Generator.RunBatch(states)) { }
        return states;
    }

    private static float[] LogSoftmax(float[] logits)
    {
        var copy = (float[])logits.Clone();
        LogitsProcessors.LogSoftmax(copy);
        return copy;
    }

    [Theory]
    [InlineData(0, 0)]
    [InlineData(2, 1)]
    [InlineData(5, 2)]
    public void GreedyLogprobsMatchHuggingFacesFirstStepLogitsAndLeaveTheAnswerAsItWas(int image, int prompt)
    {
        var reference = Fixtures.Prompt(Checkpoint, image, prompt);
        var state = Run(image, prompt, new GenerationOptions { MaxNewTokens = 30, Logprobs = true, TopLogprobs = 5 });
        var expectedIds = Fixtures.Ints(reference.GetProperty("greedy").GetProperty("ids"));
        var result = state.Results[0];
        Assert.Equal(expectedIds, result.Ids);
        Assert.Equal(expectedIds.Length - 1, result.Logprobs!.Count);
        Assert.Equal(expectedIds[1..], result.Logprobs.Select(l => l.TokenId));

        // HF's logits of the first step ([decoder_start]) give the first token's distribution.
        var hf = LogSoftmax(Fixtures.Tensors(Checkpoint).ReadFloat32($"img{image}/prompt{prompt}/first_step_logits"));
        var first = result.Logprobs[0];
        Assert.Equal(hf[first.TokenId], first.Logprob, 1e-4);
        var hfTop = hf.Select((l, id) => (id, l)).OrderByDescending(x => x.l).ThenBy(x => x.id).Take(5).ToArray();
        Assert.Equal(hfTop.Select(x => x.id), first.Top.Select(t => t.TokenId));
        for (var k = 0; k < 5; k++) Assert.Equal(hfTop[k].l, first.Top[k].Logprob, 1e-4);

        foreach (var token in result.Logprobs)
        {
            // Greedy picks the most likely token: it heads its own alternatives.
            Assert.Equal(token.TokenId, token.Top[0].TokenId);
            Assert.Equal(token.Logprob, token.Top[0].Logprob);
            Assert.True(token.Logprob <= 0);
            Assert.True(token.Top.Zip(token.Top.Skip(1)).All(p => p.First.Logprob >= p.Second.Logprob));
        }
    }

    [Theory]
    [InlineData(0, 0)]
    [InlineData(3, 2)]
    [InlineData(6, 1)]
    public void BeamLogprobsSumToHuggingFacesSequenceScore(int image, int prompt)
    {
        var beam = Fixtures.Prompt(Checkpoint, image, prompt).GetProperty("beam");
        var state = Run(image, prompt, new GenerationOptions { MaxNewTokens = 30, NumBeams = 4, Logprobs = true, TopLogprobs = 2 });
        var result = state.Results[0];
        var logprobs = result.Logprobs!;
        Assert.Equal(Fixtures.Ints(beam.GetProperty("ids")), result.Ids);
        Assert.Equal(result.Ids.Skip(1), logprobs.Select(l => l.TokenId));
        // length_penalty 1: the score is the summed log-probabilities over the ids (start token included) / length.
        var sum = logprobs.Sum(l => (double)l.Logprob);
        Assert.Equal(beam.GetProperty("sequence_score").GetDouble(), sum / (result.Ids.Count - (result.FinishReason == "eos" ? 1 : 0)), 1e-4);
        Assert.All(logprobs, l => Assert.Equal(2, l.Top.Count));
    }

    [Fact]
    public void BeamSearchReturnsItsBestBeamsBestFirstTheFirstBeingHuggingFacesAnswer()
    {
        var beam = Fixtures.Prompt(Checkpoint, 0, 1).GetProperty("beam");
        var state = Run(0, 1, new GenerationOptions { MaxNewTokens = 30, NumBeams = 4, NumReturnSequences = 3 });
        Assert.Equal(3, state.Results.Count);
        Assert.Equal(Fixtures.Ints(beam.GetProperty("ids")), state.Results[0].Ids);
        Assert.Equal(3, state.Results.Select(r => string.Join(",", r.Ids)).Distinct().Count());
        Assert.True(state.Results.Zip(state.Results.Skip(1)).All(p => p.First.Score >= p.Second.Score));
    }

    [Fact]
    public void SeveralSamplesAreTheSamplesOfConsecutiveSeeds()
    {
        var options = new GenerationOptions { MaxNewTokens = 12, DoSample = true, Seed = 40 };
        var samples = RunAll(1, 1, options with { NumReturnSequences = 3 });
        Assert.Equal(3, samples.Count);
        for (var i = 0; i < 3; i++)
            Assert.Equal(Run(1, 1, options with { Seed = 40 + i }).Results[0].Ids, samples[i].Results[0].Ids);
        Assert.True(samples.Select(s => string.Join(",", s.Results[0].Ids)).Distinct().Count() > 1, "three seeds gave one sample");
    }

    [Fact]
    public void GreedyDecodingRefusesSeveralAnswers()
    {
        var e = Assert.Throws<InvalidGenerationOptionException>(() => new GenerationOptions { NumReturnSequences = 2 }.Validate());
        Assert.Equal("num_return_sequences", e.Option);
        Assert.Equal("top_logprobs", Assert.Throws<InvalidGenerationOptionException>(() => new GenerationOptions { TopLogprobs = 3 }.Validate()).Option);
    }

    private static (string Text, bool Stopped, List<string> Deltas) Filter(IReadOnlyList<string> stops, params string[] deltas)
    {
        var filter = new StopSequenceFilter(stops);
        var passed = deltas.Select(filter.Push).ToList();
        if (!filter.Stopped) passed.Add(filter.Finish());
        return (string.Concat(passed), filter.Stopped, passed);
    }

    [Fact]
    public void StopStringsNeverLeakAndOnlyWhatCouldStillBecomeOneIsHeldBack()
    {
        // Split across deltas: nothing of the stop string is passed on.
        var (text, stopped, deltas) = Filter(["415"], "X 18", "2 4", "1", "5 $2");
        Assert.Equal("X 182 ", text);
        Assert.True(stopped);
        Assert.Equal(["X 18", "2 ", "", ""], deltas);
        // A start of a stop string that does not go on is passed on once it cannot.
        (text, stopped, deltas) = Filter(["415"], "a 4", "1", "6 b");
        Assert.Equal("a 416 b", text);
        Assert.False(stopped);
        Assert.Equal(["a ", "", "416 b", ""], deltas);
        // The earliest of several stop strings wins; overlapping starts hold back the longest possible one.
        Assert.Equal("one ", Filter(["three", "two"], "one two three").Text);
        Assert.Equal(["", "abx", ""], Filter(["abc", "bcd"], "ab", "x").Deltas);
        Assert.Equal(["a", "bc"], Filter(["bcd"], "abc").Deltas);
        // No stop strings: everything passes at once.
        Assert.Equal(["a", "b", ""], Filter([], "a", "b").Deltas);
    }
}
