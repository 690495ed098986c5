using System.Diagnostics;

namespace Blip2Mesh.Tests;

/// <summary>
/// `make run` (scripts/demo.sh) as a user runs it, with the CLI these tests built: every answer it prints is Hugging
/// Face's for that sample and prompt, a wrong one is followed by the scene's target, and its last line counts them.
/// </summary>
[System.Runtime.Versioning.SupportedOSPlatform("linux")]   // a bash script, and an executable file made for it
public sealed class DemoScriptTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("blip2mesh-demo-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    [Fact]
    public void MakeRunPrintsTheReferenceAnswersAndHowManyMatchTheScene()
    {
        var lines = RunDemoScript();

        // "FILE  PROMPT  → ANSWER" per answer (the prompt shown as "(caption)" when empty), and after a wrong one
        // "✗ the scene: TARGET".
        const string Note = "✗ the scene: ";
        var answers = new List<DemoCase>();
        var notes = new Dictionary<DemoCase, string>();
        DemoCase? last = null;
        foreach (var line in lines)
        {
            var arrow = line.IndexOf(" → ", StringComparison.Ordinal);
            if (arrow >= 0)
            {
                var shown = line[14..arrow].Trim();
                last = DemoReferences.Sample(line[..14].Trim(), shown == "(caption)" ? "" : shown);
                Assert.Equal(last.OutputText, line[(arrow + 3)..]);
                answers.Add(last);
            }
            else if (line.Trim().StartsWith(Note, StringComparison.Ordinal)) notes.Add(last!, line.Trim()[Note.Length..]);
        }

        Assert.Equal(DemoReferences.Sets["samples"].Keys.Order(), answers.Select(a => Path.GetFileName(a.Image)).Distinct().Order());
        Assert.All(answers, a => Assert.NotNull(a.Target));
        Assert.Equal(answers.Where(a => a.OutputText != a.Target).ToDictionary(a => a, a => a.Target!), notes);
        Assert.Equal($"accuracy: {answers.Count(a => a.OutputText == a.Target)}/{answers.Count} answers match the scene (blip2-demo/samples/scenes.json)", lines[^1]);
    }

    private List<string> RunDemoScript()
    {
        // The script runs ./blip2mesh, which builds the CLI into out/; this one runs the CLI built next to the tests.
        var cli = Path.Combine(_dir, "blip2mesh");
        File.WriteAllText(cli, $"#!/bin/sh\nexec dotnet '{Path.Combine(AppContext.BaseDirectory, "blip2mesh.dll")}' \"$@\"\n");
        File.SetUnixFileMode(cli, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute);

        var run = TestProcess.Run("bash", [Path.Combine(Fixtures.RepoRoot, "scripts", "demo.sh")], TimeSpan.FromMinutes(3), new Dictionary<string, string>
        {
            ["MODEL"] = Fixtures.Demo,
            ["PORT"] = MeshProcess.FreePort().ToString(),
            ["HTTP_PORT"] = MeshProcess.FreePort().ToString(),
            ["BLIP2MESH"] = cli,
        });
        Assert.True(run.ExitCode == 0, $"scripts/demo.sh failed ({run.ExitCode}):\n{run.Stdout}\n{run.Stderr}");
        return run.Stdout.Split('\n', StringSplitOptions.RemoveEmptyEntries).ToList();
    }
}
