using Blip2Mesh.Decoder;
using Blip2Mesh.Gateway;
using Blip2Mesh.Model.Runtime;
using Blip2Mesh.QFormer;
using Blip2Mesh.ServiceDefaults;
using Blip2Mesh.Vision;

namespace Blip2Mesh.Cli;

/// <summary><c>blip2mesh serve vision|qformer|decoder|gateway</c>: one service in this process.</summary>
internal static class ServeCommand
{
    public static int Run(string[] argv)
    {
        var args = new Args(argv, ModelInputs.Flags);
        if (args.Positionals.Count != 1) throw new UsageException("serve needs one of: vision, qformer, decoder, gateway");
        var stage = args.Positionals[0];
        var options = new ServiceOptions
        {
            Model = args.Required("model"),
            Port = args.Int("port") ?? throw new UsageException("--port is required"),
            HttpPort = args.Int("http-port"),
            Bind = args.Optional("bind") ?? "127.0.0.1",
            Device = ExecutionOptions.ParseDevice(args.Optional("device") ?? "cpu"),
            Threads = args.Int("threads") ?? 0,
            TlsCertificate = args.Optional("tls-cert"),
            TlsKey = args.Optional("tls-key"),
        };
        if (!Directory.Exists(options.Model)) throw new DirectoryNotFoundException($"model directory '{options.Model}' does not exist");

        var app = stage switch
        {
            "vision" => VisionService.Build(options, Batching(args)),
            "qformer" => QFormerService.Build(options, Batching(args)),
            "decoder" => DecoderApp(args, options),
            "gateway" => GatewayApp(args, options),
            _ => throw new UsageException($"unknown service '{stage}' (expected vision, qformer, decoder or gateway)"),
        };
        app.Run();
        return 0;
    }

    /// <summary>--max-batch N (8) and --max-batch-delay-ms M (0: batch only what arrives while the model is busy).</summary>
    private static BatchingOptions Batching(Args args)
    {
        var batching = new BatchingOptions(args.Int("max-batch") ?? 8, TimeSpan.FromMilliseconds(args.Float("max-batch-delay-ms") ?? 0));
        args.EnsureAllUsed();
        if (batching.MaxBatch < 1) throw new UsageException("--max-batch must be at least 1");
        return batching;
    }

    private static Microsoft.AspNetCore.Builder.WebApplication DecoderApp(Args args, ServiceOptions options)
    {
        var rows = args.Int("max-batch-rows") ?? 64;
        var kvCacheMb = args.Int("kv-cache-mb") ?? 1024;
        args.EnsureAllUsed();
        return DecoderService.Build(options, rows, (long)kvCacheMb << 20);
    }

    private static Microsoft.AspNetCore.Builder.WebApplication GatewayApp(Args args, ServiceOptions options)
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
        args.EnsureAllUsed();
        return GatewayService.Build(options, gateway);
    }
}
