using System.Collections.Concurrent;
using System.Diagnostics;
using System.Globalization;
using System.Runtime.InteropServices;
using System.Security.Cryptography;
using System.Text.Json;
using Blip2Mesh.Client;
using Blip2Mesh.Model.Checkpoint;
using Blip2Mesh.Model.Generation;
using Blip2Mesh.Model.Pipeline;
using Blip2Mesh.Model.Quantization;
using Blip2Mesh.Model.Runtime;
using Blip2Mesh.Model.Text;
using SkiaSharp;
using ApiOptions = Blip2Mesh.Contracts.V1.GenerationOptions;

namespace Blip2Mesh.Cli;

/// <summary>
/// <c>blip2mesh bench</c>: throughput and latency of generation at several concurrencies, in this process (a
/// <see cref="ContinuousBatcher"/> over <see cref="Blip2Pipeline"/>, as the decoder service runs it) or against a mesh
/// (streaming through <see cref="Blip2Client"/>). Writes a JSON report and prints a table; asserts nothing.
/// </summary>
internal static partial class BenchCommand
{
    /// <summary>One measured request: wall latency, time to the first message carrying tokens, tokens, and decoder time (T5 encoder + steps).</summary>
    private sealed record Sample(double LatencyMs, double TtftMs, int Tokens, double DecoderMs);

    private sealed record RunResult(string Mode, int Concurrency, int Requests, double WallSeconds, IReadOnlyList<Sample> Samples, int Errors, double WarmupSeconds);

    public static int Run(string[] argv)
    {
        var args = new Args(argv, new HashSet<string>(["in-process", "mesh", "unique-images"]));
        var modelArg = args.Required("model");
        var inProcess = args.Flag("in-process");
        var startMesh = args.Flag("mesh");
        var addr = args.Optional("addr");
        var pids = args.Optional("pids");
        var concurrencies = (args.Optional("concurrency") ?? "1,4,16").Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries)
            .Select(c => int.TryParse(c, NumberStyles.Integer, CultureInfo.InvariantCulture, out var n) && n > 0 ? n : throw new UsageException($"--concurrency: '{c}' is not a positive integer"))
            .ToList();
        var requests = args.Int("requests") ?? 64;
        var maxNewTokens = args.Int("max-new-tokens") ?? new GenerationOptions().MaxNewTokens;
        // Fixed-length answers (min = max) measure long histories, and random-weight models, which end anywhere.
        var minNewTokens = args.Int("min-new-tokens") ?? 0;
        var prompt = args.Optional("prompt") ?? "";
        var imagesDir = args.Optional("images");
        var device = args.Optional("device") ?? "cpu";
        var output = args.Optional("out");
        var decoderReplicas = args.Int("decoder-replicas") ?? 1;
        var uniqueImages = args.Flag("unique-images");
        var threads = args.Int("threads");
        var encoderBatching = ParseEncoderBatching(args.Optional("encoder-batching"));
        var weights = ModelInputs.Weights(args);
        var cacheDir = args.Optional("cache-dir");
        args.EnsureAllUsed();
        if ((inProcess ? 1 : 0) + (startMesh ? 1 : 0) + (addr is null ? 0 : 1) != 1)
            throw new UsageException("give exactly one of --in-process, --mesh and --addr HOST:PORT");
        if (pids is not null && addr is null) throw new UsageException("--pids goes with --addr (with --mesh the service pids are found)");
        if (requests < 1) throw new UsageException("--requests must be at least 1");
        if (concurrencies.Count == 0) throw new UsageException("--concurrency needs at least one value");
        if (maxNewTokens < 1) throw new UsageException("--max-new-tokens must be at least 1");
        if (minNewTokens < 0 || minNewTokens > maxNewTokens) throw new UsageException("--min-new-tokens must be from 0 to --max-new-tokens");
        if (addr is not null && !weights.IsExact) throw new UsageException("--weights goes with --in-process or --mesh (a running mesh was started with its own)");
        var execution = new ExecutionOptions(ExecutionOptions.ParseDevice(device), IntraOpThreads: threads ?? 0) { Weights = weights, WeightCache = cacheDir };
        ModelFolder.Require(modelArg);
        var model = Path.GetFullPath(modelArg);

        var images = LoadImages(model, imagesDir);
        Console.Error.WriteLine($"bench: {images.Count} image(s), {requests} request(s) per concurrency {string.Join(",", concurrencies)}, {minNewTokens}-{maxNewTokens} new tokens, prompt \"{prompt}\"");

        var loadWatch = Stopwatch.StartNew();
        IBenchTarget target = inProcess ? new InProcessTarget(model, execution, encoderBatching)
            : startMesh ? MeshTarget.StartMesh(model, device, decoderReplicas, threads, weights, cacheDir)
            : MeshTarget.Connect(addr!, ParsePids(pids));
        var loadSeconds = loadWatch.Elapsed.TotalSeconds;
        Console.Error.WriteLine($"bench: {target.Mode} target ready in {loadSeconds:F1} s");
        var runs = new List<RunResult>();
        double? imageMs;
        Dictionary<string, double> rss;
        try
        {
            var options = new GenerationOptions { MaxNewTokens = maxNewTokens, MinNewTokens = minNewTokens };
            if (!uniqueImages)
            {
                // Embed every image once up front, as a warm gateway cache holds them: the runs then measure the same
                // cache-hit requests at every concurrency, and the vision + Q-Former cost is measured on its own below.
                foreach (var image in images) target.CacheAsync(image).GetAwaiter().GetResult();
            }
            var noiseSeed = Environment.TickCount;
            foreach (var concurrency in concurrencies)
            {
                var inputs = uniqueImages
                    ? Enumerable.Range(0, requests).Select(i => NoiseImage(ImageSize(model), noiseSeed++)).ToList()
                    : images;
                runs.Add(RunAt(target, concurrency, requests, inputs, prompt, options));
            }
            imageMs = MeasureImages(target, model);
            rss = target.PeakRssMb();
        }
        finally
        {
            target.DisposeAsync().AsTask().GetAwaiter().GetResult();
        }

        var c1 = runs.FirstOrDefault(r => r.Concurrency == 1 && r.Samples.Count > 0);
        double? msPerToken = c1 is null || c1.Samples.Sum(s => s.Tokens) == 0 ? null
            : Percentile(c1.Samples.Where(s => s.Tokens > 0).Select(s => s.DecoderMs / s.Tokens).ToList(), 50);
        // Measured after the runs and their peak RSS, so the probes' buffers count in neither; the CPU's only (a GPU's
        // floor is its datasheet's, docs/performance.md), and not for a mesh started elsewhere, whose weights are unknown here.
        var floor = addr is null && execution.Device == ExecutionDevice.Cpu
            ? MeasureFloor(model, weights, execution.Device, threads ?? Environment.ProcessorCount, prompt, c1 is null ? maxNewTokens : c1.Samples.Average(s => s.Tokens))
            : null;
        var report = new Dictionary<string, object?>
        {
            ["runs"] = runs.Select(RunJson).ToList(),
            ["peak_rss_mb"] = rss,
            ["machine"] = Machine(),
            ["model"] = model,
            ["device"] = device,
            // Quantized schemes are approximate: their answers may differ from the exact weights'.
            ["weights"] = addr is null ? weights.Label : "as the mesh at --addr was started",
            ["max_new_tokens"] = maxNewTokens,
            ["min_new_tokens"] = minNewTokens,
            ["prompt"] = prompt,
            ["images"] = uniqueImages ? "unique" : images.Count,
            ["load_s"] = Round(loadSeconds),
            ["encoder_batching"] = (target as InProcessTarget)?.EncoderBatchingDecision,
            // Stage sessions are built on first use: the first warm-up request includes building them.
            ["first_request_s"] = runs.Count > 0 ? Round(runs[0].WarmupSeconds) : null,
            ["vision_qformer_ms_per_image"] = imageMs is { } ms ? Round(ms) : null,
            ["decoder_ms_per_token_c1"] = msPerToken is { } t ? Round(t) : null,
            ["floor"] = floor is null ? null : new Dictionary<string, object?>
            {
                ["read_gb_per_s"] = Round(floor.Machine.ReadGBps),
                ["float32_gemm_gflop_per_s"] = Round(floor.Machine.Float32Gflops),
                ["int8_gemm_gop_per_s"] = Round(floor.Machine.Int8Gops),
                ["vision_qformer_ms_per_image"] = Round(floor.ImageMs),
                ["t5_encoder_ms_per_run"] = Round(floor.EncoderMs),
                ["decoder_step_ms"] = Round(floor.StepMs),
                ["decoder_ms_per_token_c1"] = Round(floor.PerTokenMs),
                ["decoder_step_weight_gb"] = Round(floor.StepWeightBytes / 1e9),
                ["how"] = "max(weight bytes / read bandwidth, FLOPs / GEMM peak) per stage run, both measured on this machine in this run; per token = (encoder run + tokens x step) / tokens",
            },
        };
        if (output is not null)
            File.WriteAllText(output, JsonSerializer.Serialize(report, new JsonSerializerOptions(CliJson.Options) { WriteIndented = true }) + "\n");

        PrintTable(runs, rss, imageMs, msPerToken, floor, target.Mode, (string)report["weights"]!, output);
        var errors = runs.Sum(r => r.Errors);
        if (errors > 0) Console.Error.WriteLine($"bench: {errors} request(s) failed");
        return errors == 0 ? 0 : 1;
    }

    private static RunResult RunAt(IBenchTarget target, int concurrency, int requests, IReadOnlyList<byte[]> images, string prompt, GenerationOptions options)
    {
        // A warm-up request first, not counted: it builds sessions, fills caches and JIT-compiles the paths.
        var warmup = Stopwatch.StartNew();
        target.RunAsync(images[0], prompt, options).GetAwaiter().GetResult();
        var warmupSeconds = warmup.Elapsed.TotalSeconds;

        var samples = new ConcurrentBag<Sample>();
        var errors = 0;
        string? firstError = null;
        var next = -1;
        var watch = Stopwatch.StartNew();
        using var progress = new Timer(_ => DrawProgress(target.Mode, concurrency, samples.Count + Volatile.Read(ref errors), requests, watch.Elapsed), null, 0, 250);
        var workers = Enumerable.Range(0, Math.Min(concurrency, requests)).Select(_ => Task.Run(async () =>
        {
            int i;
            while ((i = Interlocked.Increment(ref next)) < requests)
            {
                try
                {
                    samples.Add(await target.RunAsync(images[i % images.Count], prompt, options));
                }
                catch (Exception e)
                {
                    Interlocked.Increment(ref errors);
                    Interlocked.CompareExchange(ref firstError, e.Message, null);
                }
            }
        })).ToArray();
        Task.WaitAll(workers);
        var wall = watch.Elapsed;
        progress.Change(Timeout.Infinite, Timeout.Infinite);
        DrawProgress(target.Mode, concurrency, requests, requests, wall);
        Console.Error.WriteLine();
        if (firstError is not null) Console.Error.WriteLine($"bench: {errors} request(s) failed at concurrency {concurrency}; first: {firstError}");
        return new RunResult(target.Mode, concurrency, requests, wall.TotalSeconds, samples.ToList(), errors, warmupSeconds);
    }

    private static readonly Lock ProgressLock = new();

    private static void DrawProgress(string mode, int concurrency, int done, int total, TimeSpan elapsed)
    {
        lock (ProgressLock)
            Console.Error.Write($"\r{mode} c={concurrency,-3} {ProgressBar.Bar(done, total)} {done}/{total} {elapsed.TotalSeconds,6:F1} s");
    }

    /// <summary>Median ms of the vision + Q-Former path over a few distinct, never-seen images (no cache can answer).</summary>
    private static double? MeasureImages(IBenchTarget target, string model)
    {
        var size = ImageSize(model);
        var seed = Environment.TickCount;
        var times = new List<double>();
        for (var k = 0; k < 4; k++)
        {
            var image = NoiseImage(size, seed + k);
            var watch = Stopwatch.StartNew();
            target.EmbedAsync(image).GetAwaiter().GetResult();
            if (k > 0) times.Add(watch.Elapsed.TotalMilliseconds);   // the first one warms the path up
        }
        return Percentile(times, 50);
    }

    private static object RunJson(RunResult run)
    {
        var latency = run.Samples.Select(s => s.LatencyMs).ToList();
        var ttft = run.Samples.Select(s => s.TtftMs).ToList();
        var tokens = run.Samples.Sum(s => s.Tokens);
        return new Dictionary<string, object?>
        {
            ["mode"] = run.Mode,
            ["concurrency"] = run.Concurrency,
            ["requests"] = run.Samples.Count,
            ["errors"] = run.Errors,
            ["wall_s"] = Round(run.WallSeconds),
            ["requests_per_s"] = Round(run.Samples.Count / run.WallSeconds),
            ["tokens_per_s"] = Round(tokens / run.WallSeconds),
            ["generated_tokens"] = tokens,
            ["latency_ms"] = new { p50 = Round(Percentile(latency, 50)), p95 = Round(Percentile(latency, 95)), p99 = Round(Percentile(latency, 99)) },
            ["ttft_ms"] = new { p50 = Round(Percentile(ttft, 50)), p95 = Round(Percentile(ttft, 95)) },
        };
    }

    private sealed record Floor(PhysicalFloor.Machine Machine, double ImageMs, double EncoderMs, double StepMs, double PerTokenMs, double StepWeightBytes);

    private static Floor MeasureFloor(string model, WeightScheme weights, ExecutionDevice device, int threads, string prompt, double tokensPerRequest)
    {
        Console.Error.WriteLine("bench: measuring this machine's floor (memory bandwidth, GEMM peaks)");
        var machine = PhysicalFloor.Measure(threads);
        using var checkpoint = Blip2Checkpoint.Open(model);
        var promptTokens = T5Tokenizer.Load(model).Encode(prompt).Count;
        var costs = PhysicalFloor.Model(checkpoint, weights, device, promptTokens);
        var tokens = Math.Max(1, tokensPerRequest);
        var encoderMs = costs.EncoderRun.Milliseconds(machine);
        var stepMs = costs.DecodeStep.Milliseconds(machine);
        return new Floor(machine, costs.Image.Milliseconds(machine), encoderMs, stepMs, (encoderMs + tokens * stepMs) / tokens, costs.DecodeStep.WeightBytes);
    }

    private static void PrintTable(List<RunResult> runs, Dictionary<string, double> rss, double? imageMs, double? msPerToken, Floor? floor, string mode, string weights, string? output)
    {
        var o = Console.Out;
        o.WriteLine($"{"mode",-10} {"conc",5} {"reqs",5} {"req/s",8} {"tok/s",8} {"p50 ms",9} {"p95 ms",9} {"p99 ms",9} {"ttft p50",9} {"ttft p95",9}");
        foreach (var r in runs)
        {
            var latency = r.Samples.Select(s => s.LatencyMs).ToList();
            var ttft = r.Samples.Select(s => s.TtftMs).ToList();
            o.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"{r.Mode,-10} {r.Concurrency,5} {r.Samples.Count,5} {r.Samples.Count / r.WallSeconds,8:F2} {r.Samples.Sum(s => s.Tokens) / r.WallSeconds,8:F1} {Percentile(latency, 50),9:F1} {Percentile(latency, 95),9:F1} {Percentile(latency, 99),9:F1} {Percentile(ttft, 50),9:F1} {Percentile(ttft, 95),9:F1}"));
        }
        var imagePath = mode == "mesh" ? "PutImage of a new image" : "EmbedImage";
        string Against(double measured, double? floorMs) => floorMs is { } f && f > 0
            ? string.Create(CultureInfo.InvariantCulture, $"; floor {f:F1} ms, {measured / f:F2}x") : "";
        if (imageMs is { } ms) o.WriteLine(string.Create(CultureInfo.InvariantCulture, $"vision+qformer: {ms:F1} ms/image ({imagePath}, median, uncached{Against(ms, floor?.ImageMs)})"));
        if (msPerToken is { } t) o.WriteLine(string.Create(CultureInfo.InvariantCulture, $"decoder at concurrency 1: {t:F2} ms/token (T5 encoder + decoder steps / generated tokens, median{Against(t, floor?.PerTokenMs)})"));
        if (floor is not null)
            o.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"floor: {floor.Machine.ReadGBps:F1} GB/s read, {floor.Machine.Float32Gflops:F0} GFLOP/s float32 GEMM, {floor.Machine.Int8Gops:F0} GOP/s int8 GEMM (measured now); a decode step reads {floor.StepWeightBytes / 1e9:F2} GB of weights, floor {floor.StepMs:F1} ms; a T5 encoder run {floor.EncoderMs:F1} ms"));
        o.WriteLine("peak RSS: " + string.Join(", ", rss.Select(kv => string.Create(CultureInfo.InvariantCulture, $"{kv.Key} {kv.Value:F0} MB"))));
        o.WriteLine($"weights: {weights}");
        if (output is not null) o.WriteLine($"report: {output}");
    }

    /// <summary>Linear interpolation between closest ranks (numpy's default), so p50 ≤ p95 ≤ p99 always holds.</summary>
    private static double Percentile(IReadOnlyList<double> values, double p)
    {
        if (values.Count == 0) return 0;
        var sorted = values.Order().ToArray();
        var rank = p / 100 * (sorted.Length - 1);
        var low = (int)Math.Floor(rank);
        var high = Math.Min(low + 1, sorted.Length - 1);
        return sorted[low] + (sorted[high] - sorted[low]) * (rank - low);
    }

    private static double Round(double value) => Math.Round(value, 3);

    // ---- inputs ----------------------------------------------------------------------------------------------------

    /// <summary>--images DIR, else the model's samples/, else the test fixtures' images, else one generated image.</summary>
    private static List<byte[]> LoadImages(string model, string? imagesDir)
    {
        static List<string> In(string? dir) => dir is not null && Directory.Exists(dir)
            ? Directory.EnumerateFiles(dir).Where(f => f.EndsWith(".png", StringComparison.OrdinalIgnoreCase) || f.EndsWith(".jpg", StringComparison.OrdinalIgnoreCase) || f.EndsWith(".jpeg", StringComparison.OrdinalIgnoreCase))
                .Order(StringComparer.Ordinal).ToList()
            : [];
        if (imagesDir is not null)
        {
            var given = In(imagesDir);
            return given.Count > 0 ? given.Select(File.ReadAllBytes).ToList() : throw new FileNotFoundException($"--images {imagesDir}: no .png or .jpg files");
        }
        var files = In(Path.Combine(model, "samples"));
        if (files.Count == 0) files = In(SynthCommand.RepoPath(Path.Combine("tests", "fixtures", "blip2-tiny-a", "images")));
        return files.Count > 0 ? files.Select(File.ReadAllBytes).ToList() : [NoiseImage(ImageSize(model), 1)];
    }

    private static int ImageSize(string model)
    {
        try { return Model.Checkpoint.Blip2Config.Load(Path.Combine(model, "config.json")).Vision.ImageSize; }
        catch (Exception e) when (e is IOException or InvalidDataException) { return 224; }
    }

    /// <summary>A PNG of seeded colour noise: distinct bytes for every seed, so no embedding cache can answer it.</summary>
    private static byte[] NoiseImage(int size, int seed)
    {
        var random = new Random(seed);
        using var bitmap = new SKBitmap(size, size, SKColorType.Rgba8888, SKAlphaType.Opaque);
        var pixels = new byte[size * size * 4];
        random.NextBytes(pixels);
        for (var i = 3; i < pixels.Length; i += 4) pixels[i] = 255;
        Marshal.Copy(pixels, 0, bitmap.GetPixels(), pixels.Length);
        using var data = bitmap.Encode(SKEncodedImageFormat.Png, 100);
        return data.ToArray();
    }

    private static Dictionary<string, int> ParsePids(string? text)
    {
        var pids = new Dictionary<string, int>(StringComparer.Ordinal);
        foreach (var pair in (text ?? "").Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries))
        {
            var parts = pair.Split('=', 2);
            if (parts.Length != 2 || !int.TryParse(parts[1], NumberStyles.Integer, CultureInfo.InvariantCulture, out var pid))
                throw new UsageException($"--pids: '{pair}' is not NAME=PID");
            pids[parts[0]] = pid;
        }
        return pids;
    }

    // ---- /proc ------------------------------------------------------------------------------------------------------

    /// <summary>Peak resident set (VmHWM) of a process in MB, or null when it cannot be read (gone, or not Linux).</summary>
    internal static double? PeakRssMb(int pid)
    {
        try
        {
            var line = File.ReadLines($"/proc/{pid}/status").FirstOrDefault(l => l.StartsWith("VmHWM:", StringComparison.Ordinal));
            return line is null ? null : KiB(line) / 1024.0;
        }
        catch (Exception e) when (e is IOException or FormatException) { return null; }
        catch (UnauthorizedAccessException) { return null; }
    }

    /// <summary>The number of a /proc line such as "VmHWM:\t18495636 kB" (a tab, not always spaces, follows the colon).</summary>
    private static long KiB(string line) =>
        long.Parse(line.Split([' ', '\t'], StringSplitOptions.RemoveEmptyEntries)[1], CultureInfo.InvariantCulture);

    private static string Machine()
    {
        string? cpu = null;
        double? memoryGb = null;
        try
        {
            cpu = File.ReadLines("/proc/cpuinfo").FirstOrDefault(l => l.StartsWith("model name", StringComparison.Ordinal))?.Split(':', 2)[1].Trim();
            var mem = File.ReadLines("/proc/meminfo").FirstOrDefault(l => l.StartsWith("MemTotal:", StringComparison.Ordinal));
            if (mem is not null) memoryGb = KiB(mem) / 1024.0 / 1024.0;
        }
        catch (Exception e) when (e is IOException or FormatException) { }
        return string.Create(CultureInfo.InvariantCulture,
            $"{cpu ?? RuntimeInformation.ProcessArchitecture.ToString()}, {Environment.ProcessorCount} cores, {memoryGb:F1} GB RAM, {RuntimeInformation.OSDescription}");
    }

    // ---- targets ----------------------------------------------------------------------------------------------------

    private interface IBenchTarget : IAsyncDisposable
    {
        string Mode { get; }
        Task<Sample> RunAsync(byte[] image, string prompt, GenerationOptions options);
        /// <summary>The vision + Q-Former path for one image.</summary>
        Task EmbedAsync(byte[] image);
        /// <summary>Puts the image's embedding into the cache generation requests use (the gateway's, or this process's).</summary>
        Task CacheAsync(byte[] image);
        Dictionary<string, double> PeakRssMb();
    }

    /// <summary>--encoder-batching auto|on|off (auto: measured at start-up, always on CUDA).</summary>
    public static EncoderBatching ParseEncoderBatching(string? value) => value switch
    {
        null or "auto" => EncoderBatching.Auto,
        "on" => EncoderBatching.On,
        "off" => EncoderBatching.Off,
        _ => throw new UsageException($"--encoder-batching: '{value}' is not auto, on or off"),
    };

    /// <summary>
    /// The mesh's work in this process: embeddings cached by image content (as the gateway caches them), then the
    /// T5 encoder and a shared <see cref="ContinuousBatcher"/> whose steps every concurrent request joins, with the
    /// streamed text decoded as the decoder service decodes it.
    /// </summary>
    private sealed class InProcessTarget : IBenchTarget
    {
        private readonly Blip2Pipeline _pipeline;
        private readonly ContinuousBatcher _batcher;
        private readonly PromptEncoder _encoder;
        private readonly ConcurrentDictionary<string, Lazy<Task<FloatTensor>>> _embeddings = new(StringComparer.Ordinal);

        public InProcessTarget(string model, ExecutionOptions execution, EncoderBatching encoderBatching)
        {
            _pipeline = Blip2Pipeline.Load(model, execution);
            // As the services do before reporting SERVING: no run measures building a session.
            _pipeline.Model.Warm(vision: true, qformer: true, decoder: true);
            _batcher = new ContinuousBatcher(_pipeline.Generator);
            _encoder = new PromptEncoder(_pipeline.Generator, _batcher.Options with { EncoderBatching = encoderBatching }, execution.Device);
            Console.Error.WriteLine(_encoder.Decision);
        }

        public string EncoderBatchingDecision => _encoder.Decision;

        public string Mode => "in-process";

        public async Task<Sample> RunAsync(byte[] image, string prompt, GenerationOptions options)
        {
            var start = Stopwatch.GetTimestamp();
            var queries = await Cached(image);
            var decoderStart = Stopwatch.GetTimestamp();
            var promptIds = _pipeline.Tokenizer.Encode(prompt);
            // One answer per request here (no num_return_sequences): its one state.
            var state = (await Task.Run(() => _encoder.StartAsync(queries, promptIds, options, CancellationToken.None)))[0];
            var text = _pipeline.Tokenizer.CreateStreamingDecoder();
            double? ttft = null;
            var tokens = 0;
            await foreach (var decoded in _batcher.Submit(state, CancellationToken.None))
            {
                ttft ??= Stopwatch.GetElapsedTime(start).TotalMilliseconds;
                tokens += decoded.Ids.Count;
                foreach (var id in decoded.Ids) text.Push(id);
            }
            text.Finish();
            var latency = Stopwatch.GetElapsedTime(start).TotalMilliseconds;
            return new Sample(latency, ttft ?? latency, tokens, Stopwatch.GetElapsedTime(decoderStart).TotalMilliseconds);
        }

        public Task EmbedAsync(byte[] image) => Task.Run(() => _pipeline.EmbedImage(image));

        public Task CacheAsync(byte[] image) => Cached(image);

        private Task<FloatTensor> Cached(byte[] image) =>
            _embeddings.GetOrAdd(Convert.ToHexString(SHA256.HashData(image)), _ => new Lazy<Task<FloatTensor>>(() => Task.Run(() => _pipeline.EmbedImage(image)))).Value;

        public Dictionary<string, double> PeakRssMb() => new() { ["bench"] = BenchCommand.PeakRssMb(Environment.ProcessId) ?? 0 };

        public async ValueTask DisposeAsync()
        {
            await _batcher.DisposeAsync();
            _pipeline.Dispose();
        }
    }

    /// <summary>A gateway reached with <see cref="Blip2Client"/>; with --mesh, one this command starts with <c>up</c> and stops.</summary>
    private sealed partial class MeshTarget : IBenchTarget
    {
        private readonly Blip2Client _client;
        private readonly Dictionary<string, int> _pids;
        private readonly Process? _up;

        private MeshTarget(string address, Dictionary<string, int> pids, Process? up)
        {
            _client = new Blip2Client(address);
            _pids = pids;
            _up = up;
        }

        public string Mode => "mesh";

        public static MeshTarget Connect(string address, Dictionary<string, int> pids) => new(address, pids, null);

        /// <summary>Runs <c>blip2mesh up</c> on ports the system chooses, waits for "ready" and finds each service's pid (children of up running "serve").</summary>
        public static MeshTarget StartMesh(string model, string device, int decoderReplicas, int? threads, WeightScheme weights, string? cacheDir)
        {
            var start = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true };
            start.ArgumentList.Add(typeof(BenchCommand).Assembly.Location);
            foreach (var arg in (string[])["up", "--model", model, "--port", "0", "--device", device,
                         "--decoder-replicas", decoderReplicas.ToString(CultureInfo.InvariantCulture)])
                start.ArgumentList.Add(arg);
            if (threads is { } n) { start.ArgumentList.Add("--threads"); start.ArgumentList.Add(n.ToString(CultureInfo.InvariantCulture)); }
            if (!weights.IsExact) { start.ArgumentList.Add("--weights"); start.ArgumentList.Add(weights.Argument); }
            if (cacheDir is not null) { start.ArgumentList.Add("--cache-dir"); start.ArgumentList.Add(Path.GetFullPath(cacheDir)); }
            var up = Process.Start(start) ?? throw new InvalidOperationException("could not start blip2mesh up");
            var log = new System.Text.StringBuilder();
            up.ErrorDataReceived += (_, e) => { if (e.Data is not null) lock (log) log.AppendLine(e.Data); };
            up.BeginErrorReadLine();
            var ports = new Dictionary<string, string>(StringComparer.Ordinal);
            try
            {
                var deadline = DateTime.UtcNow.AddMinutes(15);
                while (true)
                {
                    var read = up.StandardOutput.ReadLineAsync();
                    var remaining = deadline - DateTime.UtcNow;
                    if (remaining <= TimeSpan.Zero || !read.Wait(remaining) || read.Result is null)
                        throw new InvalidOperationException($"the mesh did not become ready:\n{log}");
                    var parts = read.Result.Split(' ');
                    if (parts is ["service", var name, var address]) ports[address[(address.LastIndexOf(':') + 1)..]] = name;
                    else if (parts is ["ready", var gateway])
                    {
                        // Keep draining stdout so up never blocks on a full pipe.
                        _ = up.StandardOutput.ReadToEndAsync();
                        var pids = new Dictionary<string, int> { ["up"] = up.Id };
                        foreach (var (service, pid) in ServicePids(up.Id, ports)) pids[service] = pid;
                        return new MeshTarget(gateway, pids, up);
                    }
                }
            }
            catch
            {
                Stop(up);
                throw;
            }
        }

        /// <summary>Children of <paramref name="parent"/> whose command line is "… serve KIND … --port P", named by the port up printed.</summary>
        private static IEnumerable<(string Name, int Pid)> ServicePids(int parent, Dictionary<string, string> ports)
        {
            foreach (var dir in Directory.EnumerateDirectories("/proc"))
            {
                if (!int.TryParse(Path.GetFileName(dir), NumberStyles.Integer, CultureInfo.InvariantCulture, out var pid)) continue;
                string[] cmdline;
                int ppid;
                try
                {
                    var stat = File.ReadAllText(Path.Combine(dir, "stat"));
                    // pid (comm) state ppid …: comm may hold spaces, so read after the last ')'.
                    ppid = int.Parse(stat[(stat.LastIndexOf(')') + 2)..].Split(' ')[1], CultureInfo.InvariantCulture);
                    cmdline = File.ReadAllText(Path.Combine(dir, "cmdline")).Split('\0');
                }
                catch (Exception e) when (e is IOException or UnauthorizedAccessException or FormatException) { continue; }
                if (ppid != parent) continue;
                var serve = Array.IndexOf(cmdline, "serve");
                var port = Array.IndexOf(cmdline, "--port");
                if (serve < 0 || serve + 1 >= cmdline.Length) continue;
                var name = port >= 0 && port + 1 < cmdline.Length && ports.TryGetValue(cmdline[port + 1], out var known) ? known : $"{cmdline[serve + 1]}-{pid}";
                yield return (name, pid);
            }
        }

        public async Task<Sample> RunAsync(byte[] image, string prompt, GenerationOptions options)
        {
            var start = Stopwatch.GetTimestamp();
            double? ttft = null;
            var tokens = 0;
            double decoderMs = 0;
            await foreach (var response in _client.GenerateAsync(image, prompt, new ApiOptions { MaxNewTokens = options.MaxNewTokens, MinNewTokens = options.MinNewTokens }))
            {
                if (response.TokenIds.Count > 0) ttft ??= Stopwatch.GetElapsedTime(start).TotalMilliseconds;
                tokens += response.TokenIds.Count;
                if (response.Usage is { } usage && usage.StageMs.TryGetValue("decoder", out var ms)) decoderMs = ms;
            }
            var latency = Stopwatch.GetElapsedTime(start).TotalMilliseconds;
            return new Sample(latency, ttft ?? latency, tokens, decoderMs);
        }

        public Task EmbedAsync(byte[] image) => _client.PutImageAsync(image);

        public Task CacheAsync(byte[] image) => _client.PutImageAsync(image);

        public Dictionary<string, double> PeakRssMb()
        {
            var rss = new Dictionary<string, double> { ["bench"] = BenchCommand.PeakRssMb(Environment.ProcessId) ?? 0 };
            foreach (var (name, pid) in _pids)
            {
                if (BenchCommand.PeakRssMb(pid) is { } mb) rss[name] = mb;
                else Console.Error.WriteLine($"bench: cannot read /proc/{pid}/status for {name}");
            }
            return rss;
        }

        public ValueTask DisposeAsync()
        {
            _client.Dispose();
            if (_up is not null) Stop(_up);
            return ValueTask.CompletedTask;
        }

        private static void Stop(Process up)
        {
            if (!up.HasExited)
            {
                _ = Kill(up.Id, 15);   // SIGTERM: up stops every service it started
                if (!up.WaitForExit(TimeSpan.FromSeconds(60))) up.Kill(entireProcessTree: true);
            }
            up.Dispose();
        }

        [LibraryImport("libc", EntryPoint = "kill")]
        private static partial int Kill(int pid, int signal);
    }
}
