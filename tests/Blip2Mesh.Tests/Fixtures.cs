using System.Text.Json;
using Blip2Mesh.Model.Checkpoint;
using Blip2Mesh.Model.Onnx;
using Blip2Mesh.Model.Runtime;

namespace Blip2Mesh.Tests;

/// <summary>Paths to the vendored checkpoints and their Hugging Face reference outputs.</summary>
public static class Fixtures
{
    public static readonly string RepoRoot = FindRepoRoot();
    public static readonly string TinyA = Path.Combine(RepoRoot, "tests", "fixtures", "blip2-tiny-a");
    public static readonly string Demo = Path.Combine(RepoRoot, "models", "blip2-demo");
    public static readonly string XlConfig = Path.Combine(RepoRoot, "tests", "fixtures", "blip2-flan-t5-xl-config");

    private static string FindRepoRoot()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
            if (File.Exists(Path.Combine(dir.FullName, "Blip2Mesh.sln"))) return dir.FullName;
        throw new InvalidOperationException("cannot find the repository root (Blip2Mesh.sln) above " + AppContext.BaseDirectory);
    }

    public static JsonDocument References(string checkpoint) =>
        JsonDocument.Parse(File.ReadAllBytes(Path.Combine(checkpoint, "references.json")));

    /// <summary>CLIP normalisation as in the fixtures' preprocessor_config.json.</summary>
    public static PixelInput.Rgb8 ClipNormalization => new(1 / 255.0,
        [0.48145466f, 0.4578275f, 0.40821073f], [0.26862954f, 0.26130258f, 0.27577711f]);

    public static FloatTensor ReadTensor(SafetensorsFile file, string name) =>
        new(file.ReadFloat32(name), file[name].Shape);

    public static float MaxAbsDiff(FloatTensor actual, FloatTensor expected)
    {
        Assert.Equal(expected.Shape, actual.Shape);
        var max = 0f;
        for (var i = 0; i < expected.Data.Length; i++) max = Math.Max(max, Math.Abs(actual.Data[i] - expected.Data[i]));
        return max;
    }
}
