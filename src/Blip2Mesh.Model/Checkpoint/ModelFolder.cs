using System.Text.Json;

namespace Blip2Mesh.Model.Checkpoint;

/// <summary>The files of a model folder a loader reads.</summary>
[Flags]
public enum ModelFiles
{
    Config = 1,
    Weights = 2,
    Preprocessor = 4,
    Tokenizer = 8,
    All = Config | Weights | Preprocessor | Tokenizer,
}

/// <summary>A model folder that does not exist or lacks a file: one wording for every command and service.</summary>
public sealed class ModelFolderException(string message) : FileNotFoundException(message);

/// <summary>
/// What a Hugging Face BLIP-2 model folder must hold, checked before anything is loaded so that a missing folder
/// or file reads the same wherever it is found: which file is missing, and what the folder should hold.
/// </summary>
public static class ModelFolder
{
    public const string SingleWeightsFile = "model.safetensors";
    public const string WeightsIndexFile = "model.safetensors.index.json";

    private const string Holds =
        "a model folder holds config.json, the weights (model.safetensors, or model.safetensors.index.json and its shards), " +
        "preprocessor_config.json and spiece.model";

    /// <summary>Throws <see cref="ModelFolderException"/> naming every file of <paramref name="files"/> that is missing.</summary>
    public static void Require(string directory, ModelFiles files = ModelFiles.All)
    {
        if (!Directory.Exists(directory))
            throw new ModelFolderException($"model folder '{directory}' does not exist; {Holds}");
        var missing = new List<string>();
        if (files.HasFlag(ModelFiles.Config)) MissingFile(directory, "config.json", missing);
        if (files.HasFlag(ModelFiles.Weights))
        {
            if (File.Exists(Path.Combine(directory, WeightsIndexFile)))
                missing.AddRange(WeightFiles(directory).Where(f => !File.Exists(Path.Combine(directory, f))).Select(f => $"{f} (listed in {WeightsIndexFile})"));
            else if (!File.Exists(Path.Combine(directory, SingleWeightsFile)))
                missing.Add($"{SingleWeightsFile} or {WeightsIndexFile}");
        }
        if (files.HasFlag(ModelFiles.Preprocessor)) MissingFile(directory, "preprocessor_config.json", missing);
        if (files.HasFlag(ModelFiles.Tokenizer)) MissingFile(directory, "spiece.model", missing);
        if (missing.Count > 0)
            throw new ModelFolderException($"model folder '{directory}' is incomplete: it has no {string.Join(", no ", missing)}; {Holds}");
    }

    /// <summary>The safetensors files holding the weights: the shards the index names, or the single file.</summary>
    public static IReadOnlyList<string> WeightFiles(string directory)
    {
        var indexPath = Path.Combine(directory, WeightsIndexFile);
        if (!File.Exists(indexPath)) return [SingleWeightsFile];
        using var index = JsonDocument.Parse(File.ReadAllBytes(indexPath));
        if (!index.RootElement.TryGetProperty("weight_map", out var map))
            throw new InvalidDataException($"{indexPath}: no weight_map");
        return map.EnumerateObject().Select(p => p.Value.GetString() ?? "").Distinct().Order(StringComparer.Ordinal).ToList();
    }

    private static void MissingFile(string directory, string name, List<string> missing)
    {
        if (!File.Exists(Path.Combine(directory, name))) missing.Add(name);
    }
}
