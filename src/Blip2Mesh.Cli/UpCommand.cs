using System.Diagnostics;
using System.Globalization;
using System.Net;
using System.Runtime.InteropServices;
using Blip2Mesh.Model.Checkpoint;
using Grpc.Health.V1;
using Grpc.Net.Client;

namespace Blip2Mesh.Cli;

/// <summary>
/// <c>blip2mesh up</c>: the whole mesh on this machine, each service its own process on 127.0.0.1. Prints
/// "ready ADDRESS" once every service reports SERVING and stops them all on SIGINT/SIGTERM.
/// </summary>
internal static partial class UpCommand
{
    /// <summary>A started service; <see cref="Port"/> and <see cref="HttpPort"/> once it has said where it listens.</summary>
    private sealed record Service(string Name, Process Process, Task<(int Port, int? HttpPort)> Listening)
    {
        public int Port => Listening.Result.Port;
        public int? HttpPort => Listening.Result.HttpPort;
    }

    public static int Run(string[] argv)
    {
        var args = new Args(argv, ModelInputs.Flags);
        var modelArg = args.Required("model");
        var port = args.Int("port") ?? 50051;
        var httpPort = args.Int("http-port") ?? (port == 0 ? 0 : port + 1);
        var decoders = args.Int("decoder-replicas") ?? 1;
        var device = args.Optional("device") ?? "cpu";
        var redis = args.Optional("redis");
        var modelName = args.Optional("model-name");
        // Three model processes share this machine's cores.
        var threads = args.Int("threads") ?? Math.Max(1, Environment.ProcessorCount / 3);
        // Each model stage reads the stages of the scheme it runs (the decoder service runs encoder and decoder).
        var weights = ModelInputs.Weights(args);
        var cacheDir = args.Optional("cache-dir");
        string[] weightArgs = weights.IsExact ? [] : cacheDir is null ? ["--weights", weights.Argument] : ["--weights", weights.Argument, "--cache-dir", Path.GetFullPath(cacheDir)];
        args.EnsureAllUsed();
        if (decoders < 1) throw new UsageException("--decoder-replicas must be at least 1");
        if (httpPort == port && port != 0) throw new UsageException("--port and --http-port must differ");
        // Checked here, before any service starts, so a mistake is one line rather than a service's failure.
        ModelFolder.Require(modelArg);
        var model = Path.GetFullPath(modelArg);
        ListenPorts.RequireFree("the gateway", IPAddress.Loopback, port, "--port N (make up PORT=N, make run PORT=N)");
        ListenPorts.RequireFree("the gateway", IPAddress.Loopback, httpPort, "--http-port N (make up HTTP_PORT=N, make run HTTP_PORT=N)");

        var services = new List<Service>();
        using var stopping = new CancellationTokenSource();
        using var sigint = PosixSignalRegistration.Create(PosixSignal.SIGINT, c => { c.Cancel = true; stopping.Cancel(); });
        using var sigterm = PosixSignalRegistration.Create(PosixSignal.SIGTERM, c => { c.Cancel = true; stopping.Cancel(); });
        try
        {
            // The stages listen on ports the system chooses (0): a port chosen here could be taken by another process
            // before the stage binds it. The gateway starts once they have said which.
            Service StartStage(string name) => Start(services, name, model, device, threads, 0, 0, weightArgs);
            var vision = StartStage("vision");
            var qformer = StartStage("qformer");
            var stageDecoders = Enumerable.Range(0, decoders).Select(i => StartStage($"decoder-{i}")).ToList();
            foreach (var stage in services.ToList()) WaitUntilListening(stage, stopping.Token);
            string[] gatewayArgs = ["--vision", $"127.0.0.1:{vision.Port}", "--qformer", $"127.0.0.1:{qformer.Port}",
                "--decoder", string.Join(",", stageDecoders.Select(d => $"127.0.0.1:{d.Port}"))];
            if (redis is not null) gatewayArgs = [.. gatewayArgs, "--redis", redis];
            if (modelName is not null) gatewayArgs = [.. gatewayArgs, "--model-name", modelName];
            var gateway = Start(services, "gateway", model, device, threads, port, httpPort, gatewayArgs);
            WaitUntilListening(gateway, stopping.Token);

            WaitUntilServing(services, stopping.Token);
            foreach (var service in services) Console.Out.WriteLine($"service {service.Name} 127.0.0.1:{service.Port}");
            foreach (var service in services) Console.Out.WriteLine($"metrics {service.Name} http://127.0.0.1:{service.HttpPort}/metrics");
            Console.Out.WriteLine($"http http://127.0.0.1:{gateway.HttpPort}");
            Console.Out.WriteLine($"ready 127.0.0.1:{gateway.Port}");
            Console.Out.Flush();
            while (!stopping.IsCancellationRequested)
            {
                if (services.FirstOrDefault(s => s.Process.HasExited) is { } dead)
                    throw new InvalidOperationException($"the {dead.Name} service exited with code {dead.Process.ExitCode}");
                stopping.Token.WaitHandle.WaitOne(500);
            }
            return 0;
        }
        catch (OperationCanceledException)
        {
            return 0;
        }
        finally
        {
            StopAll(services);
        }
    }

    private static Service Start(List<Service> services, string name, string model, string device, int threads, int port, int httpPort, params string[] extra)
    {
        var start = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true };
        start.ArgumentList.Add(typeof(UpCommand).Assembly.Location);
        foreach (var arg in (string[])["serve", name.Split('-')[0], "--model", model, "--port", port.ToString(), "--http-port", httpPort.ToString(), "--device", device, "--threads", threads.ToString()])
            start.ArgumentList.Add(arg);
        foreach (var arg in extra) start.ArgumentList.Add(arg);
        var process = Process.Start(start) ?? throw new InvalidOperationException($"could not start the {name} service");
        var listening = new TaskCompletionSource<(int, int?)>(TaskCreationOptions.RunContinuationsAsynchronously);
        // Service logs go to stderr, prefixed, so stdout stays the machine-readable "ready" line.
        // JSON log lines pass through as they are (they name their service), so `jq` reads them; others get a prefix.
        void Forward(string? line)
        {
            if (line is not null) Console.Error.WriteLine(line.StartsWith('{') ? line : $"[{name}] {line}");
        }
        process.OutputDataReceived += (_, e) =>
        {
            // serve's "listening P N" (N: "-" for none)
            if (e.Data?.Split(' ') is ["listening", var grpc, var http])
                listening.TrySetResult((int.Parse(grpc, CultureInfo.InvariantCulture), http == "-" ? null : int.Parse(http, CultureInfo.InvariantCulture)));
            else Forward(e.Data);
        };
        process.ErrorDataReceived += (_, e) => Forward(e.Data);
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
        var service = new Service(name, process, listening.Task);
        services.Add(service);
        return service;
    }

    /// <summary>Until the service has said where it listens (it does so before it loads its model: seconds).</summary>
    private static void WaitUntilListening(Service service, CancellationToken stopping)
    {
        var deadline = DateTime.UtcNow + TimeSpan.FromMinutes(2);
        while (!service.Listening.Wait(TimeSpan.FromMilliseconds(200)))
        {
            stopping.ThrowIfCancellationRequested();
            if (DateTime.UtcNow > deadline) throw new InvalidOperationException($"the {service.Name} service did not start listening in time");
            if (!service.Process.HasExited) continue;
            service.Process.WaitForExit(); // its last output, which may still say where it listened
            if (service.Listening.IsCompleted) return;
            throw new InvalidOperationException($"the {service.Name} service exited with code {service.Process.ExitCode} before it listened");
        }
    }

    private static void WaitUntilServing(List<Service> services, CancellationToken stopping)
    {
        var deadline = DateTime.UtcNow + TimeSpan.FromMinutes(10);
        foreach (var service in services)
        {
            using var channel = GrpcChannel.ForAddress($"http://127.0.0.1:{service.Port}");
            var health = new Health.HealthClient(channel);
            while (true)
            {
                stopping.ThrowIfCancellationRequested();
                if (service.Process.HasExited)
                    throw new InvalidOperationException($"the {service.Name} service exited with code {service.Process.ExitCode} before it was ready");
                if (DateTime.UtcNow > deadline) throw new InvalidOperationException($"the {service.Name} service did not report SERVING in time");
                try
                {
                    var status = health.Check(new HealthCheckRequest(), deadline: DateTime.UtcNow.AddSeconds(2)).Status;
                    if (status == HealthCheckResponse.Types.ServingStatus.Serving) break;
                }
                catch (Grpc.Core.RpcException)
                {
                    // Not listening yet.
                }
                stopping.WaitHandle.WaitOne(200);
            }
        }
    }

    private static void StopAll(List<Service> services)
    {
        // SIGTERM lets each service finish the streams it has in flight; the gateway goes first.
        foreach (var service in Enumerable.Reverse(services).Where(s => !s.Process.HasExited)) Kill(service.Process.Id, Sigterm);
        foreach (var service in services)
        {
            if (!service.Process.WaitForExit(TimeSpan.FromSeconds(35))) service.Process.Kill(entireProcessTree: true);
            service.Process.WaitForExit(); // drains the forwarded output, so a service's last words are not lost
            service.Process.Dispose();
        }
    }

    private const int Sigterm = 15;

    [LibraryImport("libc", EntryPoint = "kill", SetLastError = true)]
    private static partial int Kill(int pid, int signal);
}
