using System.Text.Json;
using Blip2Mesh.Model.Checkpoint;

namespace Blip2Mesh.Cli;

/// <summary><c>blip2mesh inspect</c>: the resolved configuration and the parameters of each stage.</summary>
internal static class InspectCommand
{
    public static int Run(string[] argv)
    {
        var args = new Args(argv, ModelInputs.Flags);
        using var checkpoint = Blip2Checkpoint.Open(args.Required("model"));
        var weights = ModelInputs.Weights(args);
        args.EnsureAllUsed();

        var stages = new Dictionary<string, long> { ["vision"] = 0, ["qformer"] = 0, ["t5_encoder"] = 0, ["t5_decoder"] = 0, ["t5_shared_embedding"] = 0 };
        foreach (var weight in checkpoint.Weights.Values)
            stages[StageOf(weight.Name)] += weight.Entry.ElementCount;
        var report = new
        {
            directory = checkpoint.Directory,
            fingerprint = checkpoint.Fingerprint,
            config = checkpoint.Config,
            parameters = stages,
            total_parameters = stages.Values.Sum(),
            // What --weights would run: quantized schemes are approximate.
            weights = weights.Label,
            approximate = !weights.IsExact,
            weight_files = checkpoint.Weights.Values.Select(w => Path.GetFileName(w.File.Path)).Distinct(),
        };
        Console.Out.WriteLine(JsonSerializer.Serialize(report, new JsonSerializerOptions(CliJson.Options)
        {
            WriteIndented = true,
            PropertyNamingPolicy = JsonNamingPolicy.SnakeCaseLower,
        }));
        return 0;
    }

    private static string StageOf(string name) => name switch
    {
        _ when name.StartsWith("vision_model.", StringComparison.Ordinal) => "vision",
        _ when name.StartsWith("qformer.", StringComparison.Ordinal) || name == "query_tokens" || name.StartsWith("language_projection.", StringComparison.Ordinal) => "qformer",
        _ when name.StartsWith("language_model.encoder.", StringComparison.Ordinal) => "t5_encoder",
        _ when name.StartsWith("language_model.decoder.", StringComparison.Ordinal) || name.StartsWith("language_model.lm_head.", StringComparison.Ordinal) => "t5_decoder",
        _ => "t5_shared_embedding",
    };
}
