using System.Diagnostics;

namespace Blip2Mesh.Tests;

/// <summary>How a program run to its end by a test finished.</summary>
public sealed record ProcessResult(int ExitCode, string Stdout, string Stderr);

/// <summary>The one way tests run a program to its end: output captured, killed (with its children) past its time limit.</summary>
public static class TestProcess
{
    public static ProcessResult Run(string program, IEnumerable<string> args, TimeSpan timeout,
        IReadOnlyDictionary<string, string>? environment = null, string? workingDirectory = null)
    {
        var start = new ProcessStartInfo(program) { RedirectStandardOutput = true, RedirectStandardError = true };
        if (workingDirectory is not null) start.WorkingDirectory = workingDirectory;
        foreach (var arg in args) start.ArgumentList.Add(arg);
        foreach (var (name, value) in environment ?? new Dictionary<string, string>()) start.Environment[name] = value;
        using var process = Process.Start(start)!;
        var stdout = process.StandardOutput.ReadToEndAsync();
        var stderr = process.StandardError.ReadToEndAsync();
        if (!process.WaitForExit(timeout))
        {
            process.Kill(entireProcessTree: true);
            throw new TimeoutException($"{program} {string.Join(' ', start.ArgumentList)} did not finish within {timeout}");
        }
        return new ProcessResult(process.ExitCode, stdout.Result, stderr.Result);
    }
}

/// <summary>Runs the built CLI (copied next to the tests) as a separate process.</summary>
public static class CliProcess
{
    public static ProcessResult Run(params string[] args) =>
        TestProcess.Run("dotnet", [Path.Combine(AppContext.BaseDirectory, "blip2mesh.dll"), .. args], TimeSpan.FromMinutes(2));
}
