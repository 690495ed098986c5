using System.Diagnostics;
using System.Text.Json;

namespace Blip2Mesh.Tests;

/// <summary>Third-party clients written in Python (tests/e2e/*.py), run as the tests' subprocesses.</summary>
public static class PythonClients
{
    /// <summary>Runs python3 ARGS and returns its stdout's JSON lines, failing on a non-zero exit with its stderr.</summary>
    public static List<JsonElement> Run(params string[] args)
    {
        var start = new ProcessStartInfo("/usr/bin/python3") { RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (var arg in args) start.ArgumentList.Add(arg);
        using var process = Process.Start(start)!;
        var stdout = process.StandardOutput.ReadToEndAsync();
        var stderr = process.StandardError.ReadToEndAsync();
        Assert.True(process.WaitForExit(TimeSpan.FromMinutes(3)), "python client timed out");
        Assert.True(process.ExitCode == 0, $"python client failed: {stderr.Result}");
        return stdout.Result.Split('\n', StringSplitOptions.RemoveEmptyEntries).Select(l => JsonDocument.Parse(l).RootElement).ToList();
    }
}
