using System.Runtime.InteropServices;
using Blip2Mesh.Model.Checkpoint;
using Blip2Mesh.Model.Pipeline;
using Blip2Mesh.Model.Runtime;

namespace Blip2Mesh.Cli;

/// <summary><c>blip2mesh dump</c>: every stage's output for one image and prompt, named as in references.safetensors.</summary>
internal static class DumpCommand
{
    public static int Run(string[] argv)
    {
        var args = new Args(argv, ModelInputs.Flags);
        var model = args.Required("model");
        var execution = ModelInputs.Execution(args);
        var image = args.Optional("image");
        var pixelValuesPath = args.Optional("pixel-values");
        var prompt = args.Optional("prompt") ?? "";
        var output = args.Required("out");
        args.EnsureAllUsed();
        if ((image is null) == (pixelValuesPath is null)) throw new UsageException("give exactly one of --image and --pixel-values");

        using var pipeline = Blip2Pipeline.Load(model, execution);
        FloatTensor pixelValues;
        if (image is not null)
        {
            var resized = pipeline.Images.ToModelSize(ModelInputs.ReadImageFile(image));
            pixelValues = new FloatTensor(pipeline.Images.ToPixelValues(resized), [1, 3, resized.Height, resized.Width]);
        }
        else
        {
            pixelValues = ModelInputs.ReadPixelValues(pixelValuesPath!);
        }

        var m = pipeline.Model;
        var vision = m.EmbedPixelValues(pixelValues);
        var qformer = m.RunQFormer(vision);
        var encoded = m.Encode(qformer.QueryEmbeds, [pipeline.Tokenizer.Encode(prompt)], hiddenStates: true);
        var text = m.Config.Text;
        var firstStepLogits = m.FirstStepLogits(encoded);

        SafetensorsWriter.Write(output,
        [
            Float("pixel_values", pixelValues),
            Float("vision_last_hidden_state", vision),
            Float("qformer_last_hidden_state", qformer.QueryOutput),
            Float("language_projection", qformer.QueryEmbeds),
            Float("inputs_embeds", encoded.InputsEmbeds!),
            Float("encoder_last_hidden_state", encoded.LastHiddenState!),
            Float("first_step_logits", firstStepLogits with { Shape = [1, 1, text.VocabSize] }),
        ]);
        Console.Out.WriteLine($"wrote {output}");
        return 0;
    }

    private static TensorToWrite Float(string name, FloatTensor tensor) =>
        new(name, TensorDType.Float32, tensor.Shape, MemoryMarshal.AsBytes(tensor.Data.AsSpan()).ToArray());
}
