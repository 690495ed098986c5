using Blip2Mesh.Model.Generation;
using Blip2Mesh.Model.Pipeline;

namespace Blip2Mesh.Tests;

/// <summary>Batches give what each item gives alone; sampling is reproducible and degenerates to greedy.</summary>
public sealed class BatchAndSamplingTests
{
    private const string Checkpoint = "blip2-tiny-a";

    private static Blip2Pipeline Pipeline => Fixtures.Pipeline(Checkpoint);

    private static GenerationItem Item(int image, string prompt, GenerationOptions options) =>
        new(Fixtures.ReadTensor(Fixtures.Tensors(Checkpoint), $"img{image}/language_projection"), prompt, options);

    private static Dictionary<int, GenerationResult> RunBatch(IReadOnlyList<GenerationItem> items)
    {
        var results = new Dictionary<int, GenerationResult>();
        var texts = new Dictionary<int, string>();
        foreach (var (k, delta) in Pipeline.GenerateBatch(items))
        {
            texts[k] = texts.GetValueOrDefault(k, "") + delta.Text;
            if (delta.Final is { } final) results.Add(k, final);
        }
        foreach (var (k, result) in results) Assert.Equal(result.Text, texts[k]);
        return results;
    }

    private static GenerationResult RunAlone(GenerationItem item) => RunBatch([item])[0];

    [Theory]
    [InlineData("greedy_ids", 1)]
    [InlineData("beam_ids", 4)]
    public void ReferenceBatchEqualsHuggingFace(string key, int beams)
    {
        var batch = Fixtures.References(Checkpoint).GetProperty("batch");
        var prompt = batch.GetProperty("prompt").GetString()!;
        var images = Fixtures.Ints(batch.GetProperty("image_indices"));
        var results = RunBatch(images.Select(i => Item(i, prompt, new GenerationOptions { NumBeams = beams })).ToList());
        var expected = batch.GetProperty(key).EnumerateArray().ToArray();
        for (var k = 0; k < images.Length; k++)
        {
            // HF pads rows that finished early with pad (0) after their </s>.
            var ids = Fixtures.Ints(expected[k]).ToList();
            while (ids.Count > 1 && ids[^1] == 0 && ids[^2] is 0 or 1) ids.RemoveAt(ids.Count - 1);
            Assert.Equal(ids, results[k].Best.Ids);
        }
    }

    [Fact]
    public void MixedBatchEqualsEachItemAlone()
    {
        GenerationItem[] items =
        [
            Item(0, "", new GenerationOptions()),
            Item(1, "Question: what is in the picture? Answer:", new GenerationOptions { NumBeams = 3, MaxNewTokens = 12 }),
            Item(2, "a photo of", new GenerationOptions { DoSample = true, Seed = 7, TopP = 0.9f }),
            Item(3, "a photo of", new GenerationOptions { MaxNewTokens = 5, RepetitionPenalty = 1.3f, NoRepeatNgramSize = 2 }),
            Item(7, "", new GenerationOptions { NumBeams = 2, MinNewTokens = 8, LengthPenalty = 0.5f }),
        ];
        var batched = RunBatch(items);
        for (var k = 0; k < items.Length; k++)
        {
            var alone = RunAlone(items[k]);
            Assert.Equal(alone.Best.Ids, batched[k].Best.Ids);
            Assert.Equal(alone.Text, batched[k].Text);
        }
    }

    [Fact]
    public void SamplingWithASeedIsReproducible()
    {
        var options = new GenerationOptions { DoSample = true, Seed = 1234, Temperature = 1.5f };
        var first = RunAlone(Item(4, "a photo of", options));
        var second = RunAlone(Item(4, "a photo of", options));
        Assert.Equal(first.Best.Ids, second.Best.Ids);
        var seeds = Enumerable.Range(0, 4).Select(seed => RunAlone(Item(4, "a photo of", options with { Seed = seed })).Best.Ids.ToArray()).ToList();
        Assert.True(seeds.Select(ids => string.Join(",", ids)).Distinct().Count() > 1, "different seeds should not all sample the same text");
    }

    [Theory]
    [InlineData(1f, 1)]
    [InlineData(1e-4f, 50)]
    public void SamplingDegeneratesToGreedy(float temperature, int topK)
    {
        var greedy = Fixtures.Ints(Fixtures.Prompt(Checkpoint, 6, 2).GetProperty("greedy").GetProperty("ids"));
        var sampled = RunAlone(Item(6, "Question: what is in the picture? Answer:", new GenerationOptions { DoSample = true, Temperature = temperature, TopK = topK, Seed = 99 }));
        Assert.Equal(greedy, sampled.Best.Ids);
    }

    [Fact]
    public void MinNewTokensAndRepetitionControlsApply()
    {
        var minimum = RunAlone(Item(7, "Question: what is in the picture? Answer:", new GenerationOptions { MinNewTokens = 10 }));
        Assert.True(minimum.Best.Ids.Count >= 11 && !minimum.Best.Ids.Take(11).Contains(1), "no </s> before 10 new tokens");
        var noRepeat = RunAlone(Item(1, "a photo of", new GenerationOptions { NoRepeatNgramSize = 2 }));
        var bigrams = noRepeat.Best.Ids.Zip(noRepeat.Best.Ids.Skip(1)).ToList();
        Assert.Equal(bigrams.Count, bigrams.Distinct().Count());
        var beams = RunAlone(Item(1, "a photo of", new GenerationOptions { NumBeams = 4, NumReturnSequences = 3 }));
        Assert.Equal(3, beams.Sequences.Count);
        Assert.True(beams.Sequences[0].Score >= beams.Sequences[1].Score && beams.Sequences[1].Score >= beams.Sequences[2].Score);
    }

    [Theory]
    [InlineData("max_new_tokens")]
    [InlineData("num_beams")]
    [InlineData("temperature")]
    [InlineData("top_p")]
    [InlineData("top_k")]
    [InlineData("repetition_penalty")]
    [InlineData("num_return_sequences")]
    public void InvalidOptionsNameTheOption(string option)
    {
        var options = option switch
        {
            "max_new_tokens" => new GenerationOptions { MaxNewTokens = 0 },
            "num_beams" => new GenerationOptions { NumBeams = 0 },
            "temperature" => new GenerationOptions { DoSample = true, Temperature = 0 },
            "top_p" => new GenerationOptions { TopP = 1.5f },
            "top_k" => new GenerationOptions { TopK = -1 },
            "repetition_penalty" => new GenerationOptions { RepetitionPenalty = 0 },
            _ => new GenerationOptions { NumBeams = 2, NumReturnSequences = 3 },
        };
        var e = Assert.Throws<InvalidGenerationOptionException>(() => options.Validate());
        Assert.Equal(option, e.Option);
        Assert.StartsWith(option, e.Message);
    }
}
