using System.Net;
using Blip2Mesh.Gateway;
using Blip2Mesh.Model.Checkpoint;
using Blip2Mesh.Model.Generation;
using Blip2Mesh.Model.Runtime;
using Blip2Mesh.ServiceDefaults;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Connections;
using Microsoft.AspNetCore.Hosting.Server;
using Microsoft.AspNetCore.Hosting.Server.Features;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.DependencyInjection;

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
        if (stage != "gateway") options = options with { Weights = ModelInputs.Weights(args), WeightCache = args.Optional("cache-dir") };
        Func<WebApplication> build = stage switch
        {
            "vision" => Batched(args, batching => StageHosts.Vision(options, batching)),
            "qformer" => Batched(args, batching => StageHosts.QFormer(options, batching)),
            "decoder" => DecoderApp(args, options),
            _ => GatewayApp(args, options),
        };
        args.EnsureAllUsed();
        ModelFolder.Require(options.Model);
        var service = stage == "gateway" ? "the gateway" : $"the {stage} service";
        ListenPorts.RequireFree(service, address, options.Port, "--port N");
        if (options.HttpPort is { } httpPort) ListenPorts.RequireFree(service, address, httpPort, "--http-port N");

        using var app = build(); // Run would have disposed it; Start and WaitForShutdown do not
        try
        {
            app.Start();
            // Machine-readable, for `up`, which starts its stages on port 0 (the system's choice, so no other process
            // can take a port between choosing and binding it): the gRPC port, then the HTTP port or "-".
            var ports = app.Services.GetRequiredService<IServer>().Features.Get<IServerAddressesFeature>()!.Addresses
                .Select(a => new Uri(a).Port).ToList();
            Console.Out.WriteLine($"listening {ports[0]} {(ports.Count > 1 ? ports[1] : "-")}");
            app.WaitForShutdown();
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
        var defaults = new BatchingOptions();
        var batching = new BatchingOptions(args.Int("max-batch") ?? defaults.MaxBatch,
            TimeSpan.FromMilliseconds(args.Float("max-batch-delay-ms") ?? defaults.MaxDelay.TotalMilliseconds));
        if (batching.MaxBatch < 1) throw new UsageException("--max-batch must be at least 1");
        return () => build(batching);
    }

    /// <summary>
    /// --max-new-tokens-limit, --max-beams-limit, --max-prompt-tokens, --max-prompt-bytes: what one request may ask for
    /// (give the gateway and the decoders the same values).
    /// </summary>
    private static GenerationLimits Limits(Args args)
    {
        var defaults = new GenerationLimits();
        var limits = new GenerationLimits
        {
            MaxNewTokens = args.Int("max-new-tokens-limit") ?? defaults.MaxNewTokens,
            MaxBeams = args.Int("max-beams-limit") ?? defaults.MaxBeams,
            MaxPromptTokens = args.Int("max-prompt-tokens") ?? defaults.MaxPromptTokens,
            MaxPromptBytes = args.Int("max-prompt-bytes") ?? defaults.MaxPromptBytes,
        };
        if (limits.MaxNewTokens < 1 || limits.MaxBeams < 1 || limits.MaxPromptTokens < 1 || limits.MaxPromptBytes < 1)
            throw new UsageException("every request limit (--max-new-tokens-limit, --max-beams-limit, --max-prompt-tokens, --max-prompt-bytes) must be at least 1");
        return limits;
    }

    private static Func<WebApplication> DecoderApp(Args args, ServiceOptions options)
    {
        var defaults = new ContinuousBatchingOptions();
        var batching = new ContinuousBatchingOptions
        {
            MaxRows = args.Int("max-batch-rows") ?? defaults.MaxRows,
            KvBudgetBytes = (long)((args.Float("kv-cache-mb") ?? defaults.KvBudgetBytes / 1048576f) * 1048576),
            MaxQueued = args.Int("max-queued") ?? defaults.MaxQueued,
            ShortAnswerTokens = args.Int("short-answer-tokens") ?? defaults.ShortAnswerTokens,
            LongAnswerShare = args.Float("long-answer-share") ?? defaults.LongAnswerShare,
            EncoderBatching = BenchCommand.ParseEncoderBatching(args.Optional("encoder-batching")),
            MaxEncoderBatch = args.Int("max-encoder-batch") ?? defaults.MaxEncoderBatch,
            EncoderBatchDelay = TimeSpan.FromMilliseconds(args.Float("encoder-batch-delay-ms") ?? defaults.EncoderBatchDelay.TotalMilliseconds),
        };
        var limits = Limits(args);
        if (batching.MaxRows < 1) throw new UsageException("--max-batch-rows must be at least 1");
        if (batching.KvBudgetBytes < 1) throw new UsageException("--kv-cache-mb must be positive");
        if (batching.MaxQueued < 0) throw new UsageException("--max-queued must not be negative");
        if (batching.LongAnswerShare is <= 0 or > 1) throw new UsageException("--long-answer-share must be in (0, 1]");
        if (batching.MaxEncoderBatch < 1) throw new UsageException("--max-encoder-batch must be at least 1");
        if (batching.EncoderBatchDelay < TimeSpan.Zero) throw new UsageException("--encoder-batch-delay-ms must not be negative");
        return () => StageHosts.Decoder(options, batching, limits);
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
            MaxImageWorkBytes = (long)((args.Float("max-image-work-mb") ?? defaults.MaxImageWorkBytes / 1048576f) * 1048576),
            Redis = args.Optional("redis"),
            ApiKeysFile = args.Optional("api-keys-file"),
            ModelName = args.Optional("model-name"),
            StageTlsCa = args.Optional("tls-ca"),
        };
        var limits = Limits(args);
        if (gateway.CacheBytes <= 0) throw new UsageException("--cache-mb must be positive");
        if (gateway.MaxImageBytes <= 0) throw new UsageException("--max-image-mb must be positive");
        if (gateway.MaxImageWorkBytes < 1 << 20) throw new UsageException("--max-image-work-mb must be at least 1");
        return () => StageHosts.Gateway(options, gateway, limits);
    }
}
