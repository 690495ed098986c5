using System.Diagnostics;
using System.Runtime.InteropServices;
using System.Text;
using Grpc.Health.V1;
using Grpc.Net.Client;

namespace Blip2Mesh.Tests;

/// <summary>One `blip2mesh serve …` process on loopback, for tests that kill and restart services.</summary>
public sealed partial class ServiceProcess : IDisposable
{
    private readonly string[] _extra;
    private Process? _process;
    private readonly StringBuilder _log = new();

    public string Name { get; }
    /// <summary>The ports the system chose on the first start (serve's "listening P N"); restarts keep them.</summary>
    public int Port { get; private set; }
    public int HttpPort { get; private set; }
    public string Address => $"127.0.0.1:{Port}";
    public string Log { get { lock (_log) return _log.ToString(); } }

    public ServiceProcess(string service, string model, params string[] extra)
    {
        Name = service;
        _extra = [.. extra, "--model", model];
        Start();
    }

    /// <summary>Starts (or restarts, on the same ports) and waits until the service reports SERVING.</summary>
    public void Start()
    {
        var start = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true };
        start.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "blip2mesh.dll"));
        foreach (var arg in (string[])["serve", Name, "--port", Port.ToString(), "--http-port", HttpPort.ToString(), .. _extra]) start.ArgumentList.Add(arg);
        var listening = new TaskCompletionSource<(int, int)>(TaskCreationOptions.RunContinuationsAsynchronously);
        _process = Process.Start(start)!;
        _process.OutputDataReceived += (_, e) =>
        {
            if (e.Data?.Split(' ') is ["listening", var grpc, var http]) listening.TrySetResult((int.Parse(grpc), int.Parse(http)));
            lock (_log) _log.AppendLine(e.Data);
        };
        _process.ErrorDataReceived += (_, e) => { lock (_log) _log.AppendLine(e.Data); };
        _process.BeginOutputReadLine();
        _process.BeginErrorReadLine();
        var deadline = DateTime.UtcNow.AddMinutes(2);
        while (!listening.Task.Wait(TimeSpan.FromMilliseconds(100)))
            if (_process.HasExited || DateTime.UtcNow > deadline)
                throw new InvalidOperationException($"{Name} did not say where it listens:\n{Log}");
        (Port, HttpPort) = listening.Task.Result;
        WaitServing(TimeSpan.FromMinutes(2));
    }

    private void WaitServing(TimeSpan timeout)
    {
        // A TLS service is checked over TLS; which CA signed it is the business of the tests that use it.
        var tls = _extra.Contains("--tls-cert");
        using var channel = GrpcChannel.ForAddress($"{(tls ? "https" : "http")}://{Address}", new GrpcChannelOptions
        {
            HttpHandler = new SocketsHttpHandler { SslOptions = { RemoteCertificateValidationCallback = (_, _, _, _) => true } },
        });
        var health = new Health.HealthClient(channel);
        var deadline = DateTime.UtcNow + timeout;
        while (DateTime.UtcNow < deadline)
        {
            if (_process!.HasExited) throw new InvalidOperationException($"{Name} exited with {_process.ExitCode}:\n{Log}");
            try
            {
                if (health.Check(new HealthCheckRequest(), deadline: DateTime.UtcNow.AddSeconds(2)).Status == HealthCheckResponse.Types.ServingStatus.Serving) return;
            }
            catch (Grpc.Core.RpcException)
            {
                // not listening yet
            }
            Thread.Sleep(100);
        }
        throw new TimeoutException($"{Name} did not report SERVING:\n{Log}");
    }

    /// <summary>SIGKILL: the process dies as a crashed pod would, streams cut mid-flight.</summary>
    public void Kill()
    {
        if (_process is { HasExited: false }) _process.Kill(entireProcessTree: true);
        _process?.WaitForExit();
    }

    /// <summary>SIGTERM: graceful shutdown, in-flight streams finish.</summary>
    public void Terminate() => _ = SendSignal(_process!.Id, 15);

    /// <summary>SIGSTOP: the process stops answering but its connections stay open, as on a frozen node.</summary>
    public void Pause() => _ = SendSignal(_process!.Id, 19);

    /// <summary>SIGCONT after <see cref="Pause"/>.</summary>
    public void Resume() => _ = SendSignal(_process!.Id, 18);

    public bool WaitForExit(TimeSpan timeout) => _process!.WaitForExit(timeout);

    /// <summary>Sum of a Prometheus counter or gauge on this service's /metrics, matching a label filter.</summary>
    public double Metric(string name, string? labelContains = null)
    {
        using var http = new HttpClient();
        var text = http.GetStringAsync($"http://127.0.0.1:{HttpPort}/metrics").GetAwaiter().GetResult();
        return text.Split('\n')
            .Where(l => l.StartsWith(name + "{", StringComparison.Ordinal) || l.StartsWith(name + " ", StringComparison.Ordinal))
            .Where(l => labelContains is null || l.Contains(labelContains, StringComparison.Ordinal))
            .Select(l => double.Parse(l[(l.LastIndexOf(' ') + 1)..], System.Globalization.CultureInfo.InvariantCulture))
            .Sum();
    }

    public void Dispose()
    {
        Kill();
        _process?.Dispose();
    }

    [LibraryImport("libc", EntryPoint = "kill")]
    private static partial int SendSignal(int pid, int signal);
}

/// <summary>A redis-server of the test's own on a free loopback port, without persistence.</summary>
public sealed class RedisProcess : IDisposable
{
    private readonly Process _process;
    public int Port { get; } = MeshProcess.FreePort();
    public string Address => $"127.0.0.1:{Port}";

    public RedisProcess()
    {
        var start = new ProcessStartInfo("redis-server") { RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (var arg in (string[])["--port", Port.ToString(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]) start.ArgumentList.Add(arg);
        _process = Process.Start(start)!;
        _process.BeginOutputReadLine();
        _process.BeginErrorReadLine();
        var deadline = DateTime.UtcNow.AddSeconds(20);
        while (DateTime.UtcNow < deadline)
        {
            try
            {
                using var client = new System.Net.Sockets.TcpClient("127.0.0.1", Port);
                return;
            }
            catch (System.Net.Sockets.SocketException)
            {
                Thread.Sleep(50);
            }
        }
        throw new TimeoutException("redis-server did not start");
    }

    public void Kill()
    {
        if (!_process.HasExited) _process.Kill();
        _process.WaitForExit();
    }

    public void Dispose()
    {
        Kill();
        _process.Dispose();
    }
}
