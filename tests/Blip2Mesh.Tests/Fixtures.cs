using System.Collections.Concurrent;
using System.Text.Json;
using Blip2Mesh.Model.Checkpoint;
using Blip2Mesh.Model.Pipeline;
using Blip2Mesh.Model.Runtime;

namespace Blip2Mesh.Tests;

/// <summary>
/// The vendored checkpoints and their Hugging Face reference outputs. Every directory under tests/fixtures with a
/// references.json is a reference checkpoint: the parity tests run on each of them, whatever its shape.
/// </summary>
public static class Fixtures
{
    public static readonly string RepoRoot = FindRepoRoot();
    public static readonly string TinyA = Path.Combine(RepoRoot, "tests", "fixtures", "blip2-tiny-a");
    public static readonly string Demo = Path.Combine(RepoRoot, "models", "blip2-demo");
    public static readonly string XlConfig = Path.Combine(RepoRoot, "tests", "fixtures", "blip2-flan-t5-xl-config");

    public static IReadOnlyList<string> ReferenceCheckpoints { get; } =
        Directory.GetDirectories(Path.Combine(RepoRoot, "tests", "fixtures"))
            .Where(d => File.Exists(Path.Combine(d, "references.json")) && File.Exists(Path.Combine(d, "references.safetensors")))
            .Select(Path.GetFileName).Order(StringComparer.Ordinal).ToList()!;

    public static string CheckpointDir(string name) => Path.Combine(RepoRoot, "tests", "fixtures", name);

    private static readonly ConcurrentDictionary<string, Lazy<Blip2Pipeline>> Pipelines = new();
    private static readonly ConcurrentDictionary<string, Lazy<SafetensorsFile>> ReferenceTensors = new();
    private static readonly ConcurrentDictionary<string, Lazy<JsonDocument>> ReferenceJson = new();

    /// <summary>One loaded pipeline per checkpoint, shared by all tests (ONNX Runtime sessions are thread-safe).</summary>
    public static Blip2Pipeline Pipeline(string name) => PipelineAt(CheckpointDir(name));

    public static Blip2Pipeline PipelineAt(string directory) =>
        Pipelines.GetOrAdd(directory, d => new Lazy<Blip2Pipeline>(() => Blip2Pipeline.Load(d))).Value;

    public static SafetensorsFile Tensors(string name) =>
        ReferenceTensors.GetOrAdd(name, n => new Lazy<SafetensorsFile>(() => SafetensorsFile.Open(Path.Combine(CheckpointDir(n), "references.safetensors")))).Value;

    public static JsonElement References(string name) =>
        ReferenceJson.GetOrAdd(name, n => new Lazy<JsonDocument>(() => JsonDocument.Parse(File.ReadAllBytes(Path.Combine(CheckpointDir(n), "references.json"))))).Value.RootElement;

    public static JsonElement Image(string checkpoint, int image) => References(checkpoint).GetProperty("images")[image];

    public static JsonElement Prompt(string checkpoint, int image, int prompt) => Image(checkpoint, image).GetProperty("prompts")[prompt];

    /// <summary>(checkpoint, image) for every reference image of every reference checkpoint.</summary>
    public static TheoryData<string, int> ImageCases()
    {
        var data = new TheoryData<string, int>();
        foreach (var checkpoint in ReferenceCheckpoints)
            for (var i = 0; i < References(checkpoint).GetProperty("images").GetArrayLength(); i++) data.Add(checkpoint, i);
        return data;
    }

    /// <summary>(checkpoint, image, prompt) for every reference generation.</summary>
    public static TheoryData<string, int, int> PromptCases()
    {
        var data = new TheoryData<string, int, int>();
        foreach (var (checkpoint, image) in ImageCases().Select(row => ((string)row[0], (int)row[1])))
            for (var j = 0; j < Image(checkpoint, image).GetProperty("prompts").GetArrayLength(); j++) data.Add(checkpoint, image, j);
        return data;
    }

    public static int[] Ints(JsonElement array) => array.EnumerateArray().Select(e => e.GetInt32()).ToArray();

    public static FloatTensor ReadTensor(SafetensorsFile file, string name) => new(file.ReadFloat32(name), file[name].Shape);

    public static float MaxAbsDiff(FloatTensor actual, FloatTensor expected)
    {
        Assert.Equal(expected.Shape, actual.Shape);
        var max = 0f;
        for (var i = 0; i < expected.Data.Length; i++) max = Math.Max(max, Math.Abs(actual.Data[i] - expected.Data[i]));
        return max;
    }

    private static string FindRepoRoot()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
            if (File.Exists(Path.Combine(dir.FullName, "Blip2Mesh.sln"))) return dir.FullName;
        throw new InvalidOperationException("cannot find the repository root (Blip2Mesh.sln) above " + AppContext.BaseDirectory);
    }
}
