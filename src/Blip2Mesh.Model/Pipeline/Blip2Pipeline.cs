using Blip2Mesh.Model.Checkpoint;
using Blip2Mesh.Model.Generation;
using Blip2Mesh.Model.Imaging;
using Blip2Mesh.Model.Onnx;
using Blip2Mesh.Model.Runtime;
using Blip2Mesh.Model.Text;

namespace Blip2Mesh.Model.Pipeline;

/// <summary>A piece of streamed output: new token ids, the text they add, and on the last piece the result.</summary>
public sealed record TextDelta(IReadOnlyList<int> TokenIds, string Text, GenerationResult? Final = null);

/// <summary>One item of a generation batch: an image's query embeddings [1, Q, d], a prompt and its options.</summary>
public sealed record GenerationItem(FloatTensor QueryEmbeds, string Prompt, GenerationOptions Options);

/// <summary>The finished generation: the best sequence first, its decoded text and why it stopped.</summary>
public sealed record GenerationResult(IReadOnlyList<GeneratedSequence> Sequences, string Text, int PromptTokens)
{
    public GeneratedSequence Best => Sequences[0];
}

/// <summary>
/// BLIP-2 in one process: image bytes → preprocessing → vision → Q-Former → Flan-T5 generation with streamed text.
/// The services split exactly these steps across processes.
/// </summary>
public sealed class Blip2Pipeline : IDisposable
{
    public Blip2Model Model { get; }
    public ImagePreprocessor Images { get; }
    public T5Tokenizer Tokenizer { get; }
    public Generator Generator { get; }

    private Blip2Pipeline(Blip2Model model, ImagePreprocessor images, T5Tokenizer tokenizer)
    {
        Model = model;
        Images = images;
        Tokenizer = tokenizer;
        Generator = new Generator(model);
    }

    public static Blip2Pipeline Load(string directory, ExecutionOptions? execution = null)
    {
        ModelFolder.Require(directory);
        var images = LoadImagePreprocessor(directory);
        var tokenizer = T5Tokenizer.Load(directory);
        var model = Blip2Model.Load(directory, RgbNormalization(images), execution);
        if (images.Height != model.Config.Vision.ImageSize || images.Width != model.Config.Vision.ImageSize)
        {
            model.Dispose();
            throw new InvalidDataException(
                $"{directory}: preprocessor_config.json resizes to {images.Width}x{images.Height} but the vision model takes {model.Config.Vision.ImageSize}x{model.Config.Vision.ImageSize}");
        }
        return new Blip2Pipeline(model, images, tokenizer);
    }

    public static ImagePreprocessor LoadImagePreprocessor(string directory)
    {
        ModelFolder.Require(directory, ModelFiles.Preprocessor);
        return new(PreprocessorConfig.Load(Path.Combine(directory, "preprocessor_config.json")));
    }

    /// <summary>The image processor's rescale/normalise steps, to be folded into the uint8 vision graph.</summary>
    public static PixelInput.Rgb8 RgbNormalization(ImagePreprocessor images) =>
        new(images.DoRescale ? images.RescaleFactor : null, images.DoNormalize ? images.Mean : null, images.DoNormalize ? images.Std : null);

    /// <summary>Encoded image → projected query embeddings [1, Q, d_model].</summary>
    public FloatTensor EmbedImage(ReadOnlySpan<byte> encoded)
    {
        var image = Images.ToModelSize(encoded);
        return Model.RunQFormer(Model.EmbedRgb(image.Pixels, 1)).QueryEmbeds;
    }

    /// <summary>Streams the answer for one image's query embeddings and a prompt.</summary>
    public IEnumerable<TextDelta> Generate(FloatTensor queryEmbeds, string prompt, GenerationOptions options, CancellationToken cancellation = default) =>
        GenerateBatch([new GenerationItem(queryEmbeds, prompt, options)], cancellation).Select(x => x.Delta);

    /// <summary>
    /// Streams the answers of several (image, prompt, options) items decoded together, step by step; each item's
    /// deltas arrive in order and its last delta carries its result.
    /// </summary>
    public IEnumerable<(int Item, TextDelta Delta)> GenerateBatch(IReadOnlyList<GenerationItem> items, CancellationToken cancellation = default)
    {
        var promptIds = items.Select(i => Tokenizer.Encode(i.Prompt)).ToList();
        var states = items.Select((item, k) => Generator.Start(item.QueryEmbeds, promptIds[k], item.Options)).ToList();
        var decoders = items.Select(_ => Tokenizer.CreateStreamingDecoder()).ToList();
        foreach (var (k, tokens) in Generator.RunBatch(states, cancellation))
        {
            yield return (k, new TextDelta(tokens, string.Concat(tokens.Select(decoders[k].Push))));
            if (states[k].IsFinished)
            {
                var result = new GenerationResult(states[k].Results, Tokenizer.Decode(states[k].Results[0].Ids), promptIds[k].Count);
                yield return (k, new TextDelta([], decoders[k].Finish(), result));
            }
        }
    }

    public void Dispose() => Model.Dispose();
}
