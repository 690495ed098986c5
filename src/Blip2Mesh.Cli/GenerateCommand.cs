using System.Text.Json;
using Blip2Mesh.Model.Pipeline;

namespace Blip2Mesh.Cli;

/// <summary><c>blip2mesh generate</c>: caption or answer in-process, streaming the text as it is produced.</summary>
internal static class GenerateCommand
{
    public static int Run(string[] argv)
    {
        var args = new Args(argv, ModelInputs.Flags);
        var model = args.Required("model");
        var execution = ModelInputs.Execution(args);
        var jsonl = args.Optional("jsonl");
        if (jsonl is not null)
        {
            args.EnsureAllUsed();
            using var batchPipeline = Blip2Pipeline.Load(model, execution);
            return RunJsonl(batchPipeline, jsonl);
        }

        var image = args.Optional("image");
        var pixelValues = args.Optional("pixel-values");
        var prompt = args.Optional("prompt") ?? "";
        var json = args.Flag("json");
        var options = ModelInputs.FromFlags(args).Validate();
        args.EnsureAllUsed();

        using var pipeline = Blip2Pipeline.Load(model, execution);
        var queries = ModelInputs.QueryEmbeds(pipeline, image, pixelValues);
        GenerationResult? result = null;
        foreach (var delta in pipeline.Generate(queries, prompt, options))
        {
            if (!json) Console.Out.Write(delta.Text);
            result = delta.Final ?? result;
        }
        if (json) Console.Out.WriteLine(ResultJson(result!));
        else Console.Out.WriteLine();
        return 0;
    }

    /// <summary>One request per line; each failure is reported on its line and the rest still run.</summary>
    private static int RunJsonl(Blip2Pipeline pipeline, string path)
    {
        var failures = 0;
        foreach (var line in File.ReadLines(path))
        {
            if (string.IsNullOrWhiteSpace(line)) continue;
            try
            {
                using var request = JsonDocument.Parse(line);
                var root = request.RootElement;
                var options = ModelInputs.FromJson(root).Validate();
                var queries = ModelInputs.QueryEmbeds(pipeline, Text(root, "image"), Text(root, "pixel_values"));
                var result = pipeline.Generate(queries, Text(root, "prompt") ?? "", options).Last().Final!;
                Console.Out.WriteLine(ResultJson(result));
            }
            catch (Exception e) when (e is JsonException or ArgumentException or Model.Errors.ServingException or UsageException or IOException
                                          or InvalidDataException)
            {
                failures++;
                Console.Out.WriteLine(CliJson.Serialize(new { error = e.Message }));
            }
        }
        return failures == 0 ? 0 : 1;
    }

    private static string? Text(JsonElement root, string name) =>
        root.TryGetProperty(name, out var value) && value.ValueKind == JsonValueKind.String ? value.GetString() : null;

    public static string ResultJson(GenerationResult result) =>
        CliJson.Serialize(new { ids = result.Best.Ids, text = result.Text, finish_reason = result.Best.FinishReason });
}
