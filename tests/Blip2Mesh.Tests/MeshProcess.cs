using System.Diagnostics;
using System.Runtime.InteropServices;

namespace Blip2Mesh.Tests;

/// <summary>`blip2mesh up` as a real process tree on loopback, stopped with SIGTERM on dispose.</summary>
public sealed partial class MeshProcess : IDisposable
{
    private readonly Process _process;

    public string GatewayAddress { get; }
    public string HttpAddress { get; }
    /// <summary>Service name (vision, qformer, decoder-0, …, gateway) → "127.0.0.1:port".</summary>
    public IReadOnlyDictionary<string, string> Services { get; }
    /// <summary>Service name → its Prometheus /metrics URL.</summary>
    public IReadOnlyDictionary<string, string> Metrics { get; }
    public string Log => _log.ToString();
    private readonly System.Text.StringBuilder _log = new();

    /// <param name="extra">More <c>up</c> options (e.g. <c>--weights int8</c>).</param>
    public MeshProcess(string model, int decoderReplicas = 1, IReadOnlyDictionary<string, string>? environment = null, params string[] extra)
    {
        var start = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (var (name, value) in environment ?? new Dictionary<string, string>()) start.Environment[name] = value;
        start.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "blip2mesh.dll"));
        foreach (var arg in (string[])["up", "--model", model, "--port", "0", "--decoder-replicas", decoderReplicas.ToString(), .. extra])
            start.ArgumentList.Add(arg);
        _process = Process.Start(start)!;
        _process.ErrorDataReceived += (_, e) => { lock (_log) _log.AppendLine(e.Data); };
        _process.BeginErrorReadLine();

        var services = new Dictionary<string, string>();
        var metrics = new Dictionary<string, string>();
        var deadline = DateTime.UtcNow.AddMinutes(3);
        string? http = null;
        while (true)
        {
            var read = _process.StandardOutput.ReadLineAsync();
            if (!read.Wait(deadline - DateTime.UtcNow) || read.Result is null)
            {
                // Dispose waits for the exit, which drains stderr too: the log then holds why the mesh stopped.
                var exited = _process.HasExited;
                Dispose();
                // Why first: a CI log shows only a failure's first lines.
                var why = Log.Split('\n', StringSplitOptions.RemoveEmptyEntries).Where(l => l.Contains("crit:") || l.Contains("fail:") || l.StartsWith("blip2mesh")).Take(4);
                throw new InvalidOperationException($"the mesh {(exited ? "exited" : "did not become ready in time")}: {string.Join(" | ", why)}\nits log:\n{Log}");
            }
            var parts = read.Result.Split(' ');
            if (parts[0] == "service") services[parts[1]] = parts[2];
            else if (parts[0] == "metrics") metrics[parts[1]] = parts[2];
            else if (parts[0] == "http") http = parts[1];
            else if (parts[0] == "ready")
            {
                GatewayAddress = parts[1];
                break;
            }
        }
        Services = services;
        Metrics = metrics;
        HttpAddress = http ?? throw new InvalidOperationException("no http address printed");
    }

    public static int FreePort() => LoopbackPorts.Free();

    public void Dispose()
    {
        if (!_process.HasExited)
        {
            _ = Kill(_process.Id, 15);
            if (!_process.WaitForExit(TimeSpan.FromSeconds(60))) _process.Kill(entireProcessTree: true);
        }
        _process.WaitForExit();
        _process.Dispose();
    }

    [LibraryImport("libc", EntryPoint = "kill")]
    private static partial int Kill(int pid, int signal);
}
