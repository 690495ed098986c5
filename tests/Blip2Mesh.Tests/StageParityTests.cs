using Blip2Mesh.Model.Runtime;
using Xunit.Abstractions;

namespace Blip2Mesh.Tests;

/// <summary>
/// Every stage, fed the reference input of that stage, reproduces the Hugging Face reference output of every
/// reference checkpoint: pixel values within 1e-5, stage outputs and first-step logits within 1e-4 (float32, CPU).
/// </summary>
public sealed class StageParityTests(ITestOutputHelper output)
{
    private const float PixelTolerance = 1e-5f;
    private const float Tolerance = 1e-4f;

    public static TheoryData<string, int> Images() => Fixtures.ImageCases();

    private void AssertClose(string checkpoint, FloatTensor actual, string referenceName, float tolerance = Tolerance)
    {
        var expected = Fixtures.ReadTensor(Fixtures.Tensors(checkpoint), referenceName);
        var diff = Fixtures.MaxAbsDiff(actual, expected);
        output.WriteLine($"{checkpoint} {referenceName}: max |diff| = {diff:E2}");
        Assert.True(diff <= tolerance, $"{checkpoint} {referenceName}: max |diff| {diff} exceeds {tolerance}");
    }

    private static FloatTensor Reference(string checkpoint, string name) => Fixtures.ReadTensor(Fixtures.Tensors(checkpoint), name);

    [Theory]
    [MemberData(nameof(Images))]
    public void PreprocessingAndUint8VisionGraphMatchReference(string checkpoint, int image)
    {
        var pipeline = Fixtures.Pipeline(checkpoint);
        var bytes = File.ReadAllBytes(Path.Combine(Fixtures.CheckpointDir(checkpoint), Fixtures.Image(checkpoint, image).GetProperty("file").GetString()!));
        var resized = pipeline.Images.ToModelSize(bytes);
        AssertClose(checkpoint, new FloatTensor(pipeline.Images.ToPixelValues(resized), [1, 3, resized.Height, resized.Width]), $"img{image}/pixel_values", PixelTolerance);
        AssertClose(checkpoint, pipeline.Model.EmbedRgb(resized.Pixels, 1), $"img{image}/vision_last_hidden_state");
    }

    [Theory]
    [MemberData(nameof(Images))]
    public void VisionMatchesReference(string checkpoint, int image)
    {
        var pixels = Reference(checkpoint, $"img{image}/pixel_values");
        AssertClose(checkpoint, Fixtures.Pipeline(checkpoint).Model.EmbedPixelValues(pixels), $"img{image}/vision_last_hidden_state");
    }

    [Theory]
    [MemberData(nameof(Images))]
    public void QFormerMatchesReference(string checkpoint, int image)
    {
        var result = Fixtures.Pipeline(checkpoint).Model.RunQFormer(Reference(checkpoint, $"img{image}/vision_last_hidden_state"));
        AssertClose(checkpoint, result.QueryOutput, $"img{image}/qformer_last_hidden_state");
        AssertClose(checkpoint, result.QueryEmbeds, $"img{image}/language_projection");
    }

    [Theory]
    [MemberData(nameof(Images))]
    public void EncoderAndFirstDecoderStepMatchReference(string checkpoint, int image)
    {
        var model = Fixtures.Pipeline(checkpoint).Model;
        var queries = Reference(checkpoint, $"img{image}/language_projection");
        foreach (var prompt in Fixtures.Image(checkpoint, image).GetProperty("prompts").EnumerateArray())
        {
            var j = prompt.GetProperty("prompt_index").GetInt32();
            var encoded = model.Encode(queries, [Fixtures.Ints(prompt.GetProperty("input_ids"))], hiddenStates: true);
            AssertClose(checkpoint, encoded.InputsEmbeds!, $"img{image}/prompt{j}/inputs_embeds");
            AssertClose(checkpoint, encoded.LastHiddenState!, $"img{image}/prompt{j}/encoder_last_hidden_state");

            var logits = model.FirstStepLogits(encoded);
            AssertClose(checkpoint, logits with { Shape = [1, 1, model.Config.Text.VocabSize] }, $"img{image}/prompt{j}/first_step_logits");
        }
    }

    [Theory]
    [MemberData(nameof(Images))]
    public void PromptIdsMatchReference(string checkpoint, int image)
    {
        var tokenizer = Fixtures.Pipeline(checkpoint).Tokenizer;
        foreach (var prompt in Fixtures.Image(checkpoint, image).GetProperty("prompts").EnumerateArray())
            Assert.Equal(Fixtures.Ints(prompt.GetProperty("input_ids")), tokenizer.Encode(prompt.GetProperty("prompt").GetString()!));
    }
}
