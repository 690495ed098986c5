using System.Globalization;
using System.Text.Json;
using Blip2Mesh.Model.Checkpoint;
using Blip2Mesh.Model.Generation;
using Blip2Mesh.Model.Pipeline;
using Blip2Mesh.Model.Quantization;
using Blip2Mesh.Model.Runtime;

namespace Blip2Mesh.Cli;

/// <summary>What the model-running commands share: loading, image inputs and generation options.</summary>
internal static class ModelInputs
{
    public static readonly HashSet<string> Flags = ["do-sample", "json"];

    public static ExecutionOptions Execution(Args args) =>
        new(ExecutionOptions.ParseDevice(args.Optional("device") ?? "cpu")) { Weights = Weights(args), WeightCache = args.Optional("cache-dir") };

    /// <summary>--weights auto|int8|int4|STAGE=MODE,… (auto: the checkpoint's exact weights).</summary>
    public static WeightScheme Weights(Args args)
    {
        var value = args.Optional("weights");
        if (value is null) return WeightScheme.Exact;
        try { return WeightScheme.Parse(value); }
        catch (ArgumentException e) { throw new UsageException($"--weights: {e.Message}"); }
    }

    /// <summary>Query embeddings [1, Q, d] for an encoded image file or a safetensors file holding pixel_values.</summary>
    public static FloatTensor QueryEmbeds(Blip2Pipeline pipeline, string? image, string? pixelValues)
    {
        if ((image is null) == (pixelValues is null)) throw new UsageException("give exactly one of --image and --pixel-values");
        if (image is not null) return pipeline.EmbedImage(ReadImageFile(image));
        var pixels = ReadPixelValues(pixelValues!);
        return pipeline.Model.RunQFormer(pipeline.Model.EmbedPixelValues(pixels)).QueryEmbeds;
    }

    public static byte[] ReadImageFile(string path) =>
        File.Exists(path) ? File.ReadAllBytes(path) : throw new FileNotFoundException($"image file '{path}' does not exist");

    public static FloatTensor ReadPixelValues(string path)
    {
        using var file = SafetensorsFile.Open(path);
        var entry = file["pixel_values"];
        return new FloatTensor(file.ReadFloat32(entry), entry.Shape);
    }

    /// <summary>The option names, in snake_case as in JSON requests; flags use the same names with dashes.</summary>
    public static readonly string[] OptionNames =
    [
        "max_new_tokens", "min_new_tokens", "num_beams", "length_penalty", "early_stopping", "num_return_sequences",
        "do_sample", "temperature", "top_k", "top_p", "seed", "repetition_penalty", "no_repeat_ngram_size",
    ];

    public static GenerationOptions FromFlags(Args args)
    {
        var options = new GenerationOptions();
        foreach (var name in OptionNames)
        {
            var flag = name.Replace('_', '-');
            if (name == "do_sample") { if (args.Flag(flag)) options = options with { DoSample = true }; continue; }
            if (args.Optional(flag) is { } value) options = With(options, name, value);
        }
        return options;
    }

    public static GenerationOptions FromJson(JsonElement request)
    {
        var options = new GenerationOptions();
        foreach (var name in OptionNames)
        {
            if (!request.TryGetProperty(name, out var value) || value.ValueKind == JsonValueKind.Null) continue;
            options = With(options, name, value.ValueKind == JsonValueKind.String ? value.GetString()! : value.GetRawText());
        }
        return options;
    }

    private static GenerationOptions With(GenerationOptions o, string name, string value)
    {
        int Int() => int.TryParse(value, NumberStyles.Integer, CultureInfo.InvariantCulture, out var v) ? v : throw Bad("an integer");
        long Long() => long.TryParse(value, NumberStyles.Integer, CultureInfo.InvariantCulture, out var v) ? v : throw Bad("an integer");
        float Float() => float.TryParse(value, NumberStyles.Float, CultureInfo.InvariantCulture, out var v) ? v : throw Bad("a number");
        bool Bool() => bool.TryParse(value, out var v) ? v : throw Bad("true or false");
        InvalidGenerationOptionException Bad(string what) => new(name, $"'{value}' is not {what}");
        return name switch
        {
            "max_new_tokens" => o with { MaxNewTokens = Int() },
            "min_new_tokens" => o with { MinNewTokens = Int() },
            "num_beams" => o with { NumBeams = Int() },
            "length_penalty" => o with { LengthPenalty = Float() },
            "early_stopping" => o with { EarlyStopping = value.ToLowerInvariant() },
            "num_return_sequences" => o with { NumReturnSequences = Int() },
            "do_sample" => o with { DoSample = Bool() },
            "temperature" => o with { Temperature = Float() },
            "top_k" => o with { TopK = Int() },
            "top_p" => o with { TopP = Float() },
            "seed" => o with { Seed = Long() },
            "repetition_penalty" => o with { RepetitionPenalty = Float() },
            "no_repeat_ngram_size" => o with { NoRepeatNgramSize = Int() },
            _ => throw new ArgumentOutOfRangeException(nameof(name)),
        };
    }
}
