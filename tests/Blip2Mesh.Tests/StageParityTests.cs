using Blip2Mesh.Model.Checkpoint;
using Blip2Mesh.Model.Runtime;
using Xunit.Abstractions;

namespace Blip2Mesh.Tests;

/// <summary>
/// Every stage, fed the reference input of that stage, reproduces the Hugging Face reference output of
/// blip2-tiny-a within 1e-4 (float32, CPU).
/// </summary>
public sealed class StageParityTests(ITestOutputHelper output, StageParityTests.TinyModel tiny) : IClassFixture<StageParityTests.TinyModel>
{
    private const float Tolerance = 1e-4f;

    public sealed class TinyModel : IDisposable
    {
        public Blip2Model Model { get; } = Blip2Model.Load(Fixtures.TinyA, Fixtures.ClipNormalization);
        public SafetensorsFile References { get; } = SafetensorsFile.Open(Path.Combine(Fixtures.TinyA, "references.safetensors"));

        public void Dispose()
        {
            Model.Dispose();
            References.Dispose();
        }
    }

    private readonly TinyModel _tiny = tiny;

    public static TheoryData<int> Images() => new(Enumerable.Range(0, 8));

    private void AssertClose(FloatTensor actual, string referenceName)
    {
        var expected = Fixtures.ReadTensor(_tiny.References, referenceName);
        var diff = Fixtures.MaxAbsDiff(actual, expected);
        output.WriteLine($"{referenceName}: max |diff| = {diff:E2}");
        Assert.True(diff <= Tolerance, $"{referenceName}: max |diff| {diff} exceeds {Tolerance}");
    }

    [Theory]
    [MemberData(nameof(Images))]
    public void VisionMatchesReference(int image)
    {
        var pixels = Fixtures.ReadTensor(_tiny.References, $"img{image}/pixel_values");
        AssertClose(_tiny.Model.EmbedPixelValues(pixels), $"img{image}/vision_last_hidden_state");
    }

    [Theory]
    [MemberData(nameof(Images))]
    public void QFormerMatchesReference(int image)
    {
        var embeds = Fixtures.ReadTensor(_tiny.References, $"img{image}/vision_last_hidden_state");
        var result = _tiny.Model.RunQFormer(embeds);
        AssertClose(result.QueryOutput, $"img{image}/qformer_last_hidden_state");
        AssertClose(result.QueryEmbeds, $"img{image}/language_projection");
    }

    [Theory]
    [MemberData(nameof(Images))]
    public void EncoderAndFirstDecoderStepMatchReference(int image)
    {
        using var references = Fixtures.References(Fixtures.TinyA);
        var queries = Fixtures.ReadTensor(_tiny.References, $"img{image}/language_projection");
        foreach (var prompt in references.RootElement.GetProperty("images")[image].GetProperty("prompts").EnumerateArray())
        {
            var j = prompt.GetProperty("prompt_index").GetInt32();
            var ids = prompt.GetProperty("input_ids").EnumerateArray().Select(e => e.GetInt32()).ToArray();
            var encoded = _tiny.Model.Encode(queries, [ids]);
            AssertClose(encoded.InputsEmbeds, $"img{image}/prompt{j}/inputs_embeds");
            AssertClose(encoded.LastHiddenState, $"img{image}/prompt{j}/encoder_last_hidden_state");

            var config = _tiny.Model.Config.Text;
            var empty = Enumerable.Range(0, config.NumDecoderLayers).Select(_ => FloatTensor.Zeros(1, config.NumHeads, 0, config.DKv)).ToArray();
            var step = _tiny.Model.DecodeStep([config.DecoderStartTokenId], [0], empty, empty, encoded.CrossKeys, encoded.CrossValues, encoded.AttentionMask);
            AssertClose(new FloatTensor(step.Logits.Data, [1, 1, config.VocabSize]), $"img{image}/prompt{j}/first_step_logits");
        }
    }
}
