using System.Text.Json;
using Blip2Mesh.Model.Generation;

namespace Blip2Mesh.Tests;

/// <summary>One Hugging Face greedy answer of the bundled demo model: an image file, a prompt and what HF generated.</summary>
/// <param name="OutputIds">HF's ids, starting with the decoder start id 0.</param>
/// <param name="Target">The scene's ground truth, where the prompt is one of the grammar's tasks.</param>
public sealed record DemoCase(string Image, string Prompt, int[] InputIds, int[] OutputIds, string OutputText, string? Target)
{
    public override string ToString() => $"{System.IO.Path.GetFileName(Image)} \"{Prompt}\"";
}

/// <summary>
/// The demo model's reference answers: its samples (models/blip2-demo/samples/expected.json) and its dev set
/// (tests/fixtures/blip2-demo-dev/eval.json). Both files share one layout: images, each with its results.
/// </summary>
public static class DemoReferences
{
    /// <summary>The options the references were generated with (greedy, batch size 1).</summary>
    public static readonly GenerationOptions Options = new() { MaxNewTokens = 20 };

    public static readonly string SamplesDir = Path.Combine(Fixtures.Demo, "samples");
    public static readonly string DevDir = Path.Combine(Fixtures.RepoRoot, "tests", "fixtures", "blip2-demo-dev");

    /// <summary>Set name ("samples", "dev") → image file name → its cases, in the files' order.</summary>
    public static IReadOnlyDictionary<string, IReadOnlyDictionary<string, IReadOnlyList<DemoCase>>> Sets { get; } =
        new Dictionary<string, IReadOnlyDictionary<string, IReadOnlyList<DemoCase>>>
        {
            ["samples"] = Load(SamplesDir, "expected.json", "samples"),
            ["dev"] = Load(DevDir, "eval.json", "images"),
        };

    public static IEnumerable<DemoCase> All => Sets.Values.SelectMany(set => set.Values.SelectMany(cases => cases));

    /// <summary>
    /// HF's answer for a sample image and prompt. A prompt can be both one of the scene's tasks and one of the extra
    /// prompts (the same answer); the task comes first and carries the target.
    /// </summary>
    public static DemoCase Sample(string file, string prompt) => Sets["samples"][file].First(c => c.Prompt == prompt);

    /// <summary>(set, image file) for every reference image.</summary>
    public static TheoryData<string, string> Images()
    {
        var data = new TheoryData<string, string>();
        foreach (var (set, images) in Sets)
            foreach (var file in images.Keys) data.Add(set, file);
        return data;
    }

    private static IReadOnlyDictionary<string, IReadOnlyList<DemoCase>> Load(string directory, string file, string imagesKey)
    {
        using var json = JsonDocument.Parse(File.ReadAllBytes(Path.Combine(directory, file)));
        return json.RootElement.GetProperty(imagesKey).EnumerateArray().ToDictionary(
            image => image.GetProperty("file").GetString()!,
            image => (IReadOnlyList<DemoCase>)image.GetProperty("results").EnumerateArray().Select(r => new DemoCase(
                Path.Combine(directory, image.GetProperty("file").GetString()!),
                r.GetProperty("prompt").GetString()!,
                Fixtures.Ints(r.GetProperty("input_ids")),
                Fixtures.Ints(r.GetProperty("output_ids")),
                r.GetProperty("output_text").GetString()!,
                r.TryGetProperty("target", out var target) && target.ValueKind == JsonValueKind.String ? target.GetString() : null)).ToList());
    }
}
