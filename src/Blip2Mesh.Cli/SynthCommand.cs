using System.Diagnostics;
using System.Globalization;
using Blip2Mesh.Model.Checkpoint;

namespace Blip2Mesh.Cli;

/// <summary>
/// <c>blip2mesh synth</c>: a random-weight checkpoint with the exact config, tensor names and shapes of another one
/// (or of the real blip2-flan-t5-xl), for loading and speed tests at real size without downloading weights.
/// </summary>
internal static class SynthCommand
{
    /// <summary>Names usable as --like without a folder: the vendored configs of real models.</summary>
    private static readonly Dictionary<string, string> KnownConfigs = new(StringComparer.Ordinal)
    {
        ["blip2-flan-t5-xl"] = Path.Combine("tests", "fixtures", "blip2-flan-t5-xl-config"),
    };

    public static int Run(string[] argv)
    {
        var args = new Args(argv, ModelInputs.Flags);
        var like = args.Required("like");
        var dtype = ParseDType(args.Optional("dtype") ?? "float32");
        var output = args.Required("out");
        var seed = args.Long("seed") ?? 0;
        var shardMb = Parse(args.Optional("shard-mb"), "shard-mb") ?? 10_000;
        args.EnsureAllUsed();
        if (shardMb <= 0) throw new UsageException("--shard-mb must be positive");

        var source = Directory.Exists(like) ? like
            : KnownConfigs.TryGetValue(like, out var known) ? RepoPath(known) ?? throw new DirectoryNotFoundException($"cannot find {known} (run from the repository or a GPU kit)")
            : throw new DirectoryNotFoundException($"--like '{like}' is neither a folder nor one of: {string.Join(", ", KnownConfigs.Keys)}");
        if (Path.GetFullPath(source).TrimEnd('/') == Path.GetFullPath(output).TrimEnd('/'))
            throw new UsageException("--out must differ from --like");
        if (Directory.Exists(output) && Directory.EnumerateFileSystemEntries(output).Any())
            throw new InvalidOperationException($"{output} is not empty; synth writes into a new or empty folder");

        var options = new SynthOptions(dtype, seed, (long)(shardMb * 1_000_000));
        var watch = Stopwatch.StartNew();
        var lastDraw = TimeSpan.Zero;
        var result = SyntheticCheckpoint.Create(source, output, options, RepoPath(Path.Combine("models", "blip2-demo")), (done, total) =>
        {
            if (watch.Elapsed - lastDraw < TimeSpan.FromMilliseconds(250) && done < total) return;
            lastDraw = watch.Elapsed;
            Console.Error.Write($"\rsynth {ProgressBar.Bar(done, total)} {done / 1e9:F2}/{total / 1e9:F2} GB");
            if (done == total) Console.Error.WriteLine();
        });
        Console.Out.WriteLine($"wrote {output}: {result.Tensors} tensors, {result.Parameters / 1e6:F1} M parameters, {result.TotalBytes / 1e9:F3} GB of {dtype.ToString().ToLowerInvariant()} in {result.Shards.Count} shard(s), {watch.Elapsed.TotalSeconds:F1} s");
        if (result.TokenizerNote is { } note) Console.Out.WriteLine($"note: {note}");
        return 0;
    }

    private static double? Parse(string? text, string name)
    {
        if (text is null) return null;
        return double.TryParse(text, NumberStyles.Float, CultureInfo.InvariantCulture, out var value) ? value
            : throw new UsageException($"--{name}: '{text}' is not a number");
    }

    private static TensorDType ParseDType(string text) => text.ToLowerInvariant() switch
    {
        "float32" or "fp32" or "f32" => TensorDType.Float32,
        "float16" or "fp16" or "f16" or "half" => TensorDType.Float16,
        "bfloat16" or "bf16" => TensorDType.BFloat16,
        _ => throw new UsageException($"--dtype: '{text}' is not float32, float16 or bfloat16"),
    };

    /// <summary>
    /// A path inside the repository, or inside a GPU kit (scripts/gpu-kit.sh), which carries the same folders for the
    /// files the CLI reads from here; found above the working directory or above the CLI's own folder.
    /// </summary>
    public static string? RepoPath(string relative)
    {
        foreach (var start in new[] { Directory.GetCurrentDirectory(), AppContext.BaseDirectory })
            for (var dir = new DirectoryInfo(start); dir is not null; dir = dir.Parent)
                if ((File.Exists(Path.Combine(dir.FullName, "Blip2Mesh.sln")) || File.Exists(Path.Combine(dir.FullName, "blip2mesh-kit.json")))
                    && Path.Exists(Path.Combine(dir.FullName, relative)))
                    return Path.Combine(dir.FullName, relative);
        return null;
    }
}

/// <summary>A text progress bar for stderr.</summary>
internal static class ProgressBar
{
    public static string Bar(double done, double total, int width = 30)
    {
        var fraction = total <= 0 ? 1 : Math.Clamp(done / total, 0, 1);
        var filled = (int)Math.Round(fraction * width);
        return $"[{new string('#', filled)}{new string('.', width - filled)}] {fraction * 100,3:F0}%";
    }
}
