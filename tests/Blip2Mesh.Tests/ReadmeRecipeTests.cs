using System.Diagnostics;
using System.Text;
using System.Text.Json;
using System.Text.RegularExpressions;
using Xunit.Abstractions;

namespace Blip2Mesh.Tests;

/// <summary>
/// The README's shell recipes as written: every ```sh block after a <c>&lt;!-- readme-test --&gt;</c> line runs, in
/// order, in one working folder laid out like the repository root, against a mesh serving the bundled demo model.
/// The README's addresses (127.0.0.1:50051 and :50052) are the only thing replaced, by that mesh's own.
/// </summary>
public sealed partial class ReadmeRecipeTests(ReadmeRecipeTests.DemoMesh mesh, ITestOutputHelper output) : IClassFixture<ReadmeRecipeTests.DemoMesh>
{
    public sealed class DemoMesh : IDisposable
    {
        public MeshProcess Mesh { get; } = new(Fixtures.Demo);
        public void Dispose() => Mesh.Dispose();
    }

    // Every recipe asks the same of the same image, so every answer it prints is checked against Hugging Face's.
    private const string Sample = "sample001.png";
    private const string Question = "Question: what color is the background? Answer:";

    [GeneratedRegex(@"^<!-- readme-test(?: needs=(?<needs>[\w,-]+))? -->\n```sh\n(?<body>.*?)^```", RegexOptions.Multiline | RegexOptions.Singleline)]
    private static partial Regex RunnableBlock();

    [Fact]
    public void EveryRunnableShellRecipeWorksOnTheBundledSample()
    {
        var readme = File.ReadAllText(Path.Combine(Fixtures.RepoRoot, "README.md"));
        var blocks = RunnableBlock().Matches(readme).ToList();
        Assert.True(blocks.Count >= 5, $"the README's runnable recipes are marked (found {blocks.Count})");
        var expected = ExpectedAnswer();

        var work = Directory.CreateTempSubdirectory("blip2mesh-readme-").FullName;
        try
        {
            LayOutLikeTheRepository(work);
            var answered = 0;
            foreach (var block in blocks)
            {
                var body = block.Groups["body"].Value;
                Assert.DoesNotContain("samples/", body.Replace($"samples/{Sample}", ""));
                if (block.Groups["needs"].Value.Split(',', StringSplitOptions.RemoveEmptyEntries).FirstOrDefault(tool => !OnPath(tool)) is { } missing)
                {
                    output.WriteLine($"not run, {missing} is not installed:\n{body}");
                    continue;
                }
                var script = body.Replace("127.0.0.1:50051", mesh.Mesh.GatewayAddress)
                    .Replace("127.0.0.1:50052", mesh.Mesh.HttpAddress["http://".Length..]);
                var (exitCode, stdout, stderr) = Bash(work, script);
                output.WriteLine($"$ {script}{stdout}");
                Assert.True(exitCode == 0, $"exit {exitCode} from\n{script}\n{stderr}");
                if (stdout.Length == 0) continue;   // a step that writes a file the next ones send
                Assert.Equal(expected, Answer(stdout));
                answered++;
            }
            Assert.True(answered >= 3, $"the recipes printed {answered} answers");
        }
        finally
        {
            // The links first, so that nothing can reach through them into the repository.
            foreach (var dir in LinkedFromTheRepository) File.Delete(Path.Combine(work, dir));
            Directory.Delete(work, recursive: true);
        }
    }

    /// <summary>What Hugging Face answers for the recipes' image and question (samples/expected.json).</summary>
    private static string ExpectedAnswer()
    {
        using var expected = JsonDocument.Parse(File.ReadAllBytes(Path.Combine(Fixtures.Demo, "samples", "expected.json")));
        var sample = expected.RootElement.GetProperty("samples").EnumerateArray().Single(s => s.GetProperty("file").GetString() == Sample);
        return sample.GetProperty("results").EnumerateArray().Single(r => r.GetProperty("prompt").GetString() == Question)
            .GetProperty("output_text").GetString()!;
    }

    /// <summary>The answer in what a recipe printed: the joined "text" of its JSON messages, or its plain text.</summary>
    private static string Answer(string stdout)
    {
        if (!stdout.StartsWith('{')) return stdout.TrimEnd('\n');
        var text = new StringBuilder();
        var reader = new Utf8JsonReader(Encoding.UTF8.GetBytes(stdout), new JsonReaderOptions { AllowMultipleValues = true });
        while (reader.Read())
        {
            using var message = JsonDocument.ParseValue(ref reader);
            if (message.RootElement.TryGetProperty("text", out var delta)) text.Append(delta.GetString());
        }
        return text.ToString();
    }

    /// <summary>The repository's models and protos, and a copy of the Python client (its stubs are generated there).</summary>
    private static readonly string[] LinkedFromTheRepository = ["models", "protos"];

    private static void LayOutLikeTheRepository(string work)
    {
        foreach (var dir in LinkedFromTheRepository)
            Directory.CreateSymbolicLink(Path.Combine(work, dir), Path.Combine(Fixtures.RepoRoot, dir));
        var client = Directory.CreateDirectory(Path.Combine(work, "clients", "python")).FullName;
        foreach (var file in Directory.GetFiles(Path.Combine(Fixtures.RepoRoot, "clients", "python")))
            File.Copy(file, Path.Combine(client, Path.GetFileName(file)));
        // File.Copy keeps the mode bits, so generate_stubs.sh stays executable.
    }

    private static bool OnPath(string tool) =>
        (Environment.GetEnvironmentVariable("PATH") ?? "").Split(':').Any(dir => File.Exists(Path.Combine(dir, tool)));

    // Debian's python3 (python3-grpcio, which make test installs) before any other python3 on PATH, such as a pyenv
    // shim's without grpcio.
    private static ProcessResult Bash(string workingDirectory, string script) =>
        TestProcess.Run("bash", ["-euo", "pipefail", "-c", script], TimeSpan.FromMinutes(2),
            new Dictionary<string, string> { ["PATH"] = "/usr/bin:" + Environment.GetEnvironmentVariable("PATH") }, workingDirectory);
}
