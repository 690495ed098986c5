using System.Net;
using Blip2Mesh.Decoder;
using Blip2Mesh.Gateway;
using Blip2Mesh.Model.Checkpoint;
using Blip2Mesh.Model.Runtime;
using Blip2Mesh.QFormer;
using Blip2Mesh.ServiceDefaults;
using Blip2Mesh.Vision;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Connections;

namespace Blip2Mesh.Cli;

/// <summary><c>blip2mesh serve vision|qformer|decoder|gateway</c>: one service in this process.</summary>
internal static class ServeCommand
{
    public static int Run(string[] argv)
    {
        var args = new Args(argv, ModelInputs.Flags);
        if (args.Positionals.Count != 1) throw new UsageException("serve needs one of: vision, qformer, decoder, gateway");
        var stage = args.Positionals[0];
        if (stage is not ("vision" or "qformer" or "decoder" or "gateway"))
            throw new UsageException($"unknown service '{stage}' (expected vision, qformer, decoder or gateway)");
        var bind = args.Optional("bind") ?? "127.0.0.1";
        if (!IPAddress.TryParse(bind, out var address)) throw new UsageException($"--bind: '{bind}' is not an IP address");
        var options = new ServiceOptions
        {
            Model = args.Required("model"),
            Port = args.Int("port") ?? throw new UsageException("--port is required"),
            HttpPort = args.Int("http-port"),
            Bind = bind,
            Device = ExecutionOptions.ParseDevice(args.Optional("device") ?? "cpu"),
            Threads = args.Int("threads") ?? 0,
            TlsCertificate = args.Optional("tls-cert"),
            TlsKey = args.Optional("tls-key"),
        };
        Func<WebApplication> build = stage switch
        {
            "vision" => Batched(args, batching => VisionService.Build(options, batching)),
            "qformer" => Batched(args, batching => QFormerService.Build(options, batching)),
            "decoder" => DecoderApp(args, options),
            _ => GatewayApp(args, options),
        };
        args.EnsureAllUsed();
        ModelFolder.Require(options.Model);
        var service = stage == "gateway" ? "the gateway" : $"the {stage} service";
        ListenPorts.RequireFree(service, address, options.Port, "--port N");
        if (options.HttpPort is { } httpPort) ListenPorts.RequireFree(service, address, httpPort, "--http-port N");

        var app = build();
        try
        {
            app.Run();
        }
        catch (IOException e) when (e.InnerException is AddressInUseException)
        {
            // Taken between the check above and the bind.
            throw new InvalidOperationException($"{service} cannot listen on {bind}:{options.Port}{(options.HttpPort is { } http ? $" and :{http}" : "")}: a port was taken while it started; choose others with --port and --http-port");
        }
        return 0;
    }

    /// <summary>--max-batch N (8) and --max-batch-delay-ms M (0: batch only what arrives while the model is busy).</summary>
    private static Func<WebApplication> Batched(Args args, Func<BatchingOptions, WebApplication> build)
    {
        var batching = new BatchingOptions(args.Int("max-batch") ?? 8, TimeSpan.FromMilliseconds(args.Float("max-batch-delay-ms") ?? 0));
        if (batching.MaxBatch < 1) throw new UsageException("--max-batch must be at least 1");
        return () => build(batching);
    }

    private static Func<WebApplication> DecoderApp(Args args, ServiceOptions options)
    {
        var rows = args.Int("max-batch-rows") ?? 64;
        var kvCacheMb = args.Int("kv-cache-mb") ?? 1024;
        return () => DecoderService.Build(options, rows, (long)kvCacheMb << 20);
    }

    private static Func<WebApplication> GatewayApp(Args args, ServiceOptions options)
    {
        static IReadOnlyList<string> List(string value) => value.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        var defaults = new GatewayOptions { Vision = [], QFormer = [], Decoder = [] };
        var gateway = new GatewayOptions
        {
            Vision = List(args.Required("vision")),
            QFormer = List(args.Required("qformer")),
            Decoder = List(args.Required("decoder")),
            CacheBytes = (long)((args.Float("cache-mb") ?? defaults.CacheBytes / 1048576f) * 1048576),
            MaxImageBytes = (int)((args.Float("max-image-mb") ?? defaults.MaxImageBytes / 1048576f) * 1048576),
            Redis = args.Optional("redis"),
            ApiKeysFile = args.Optional("api-keys-file"),
            StageTlsCa = args.Optional("tls-ca"),
        };
        return () => GatewayService.Build(options, gateway);
    }
}
