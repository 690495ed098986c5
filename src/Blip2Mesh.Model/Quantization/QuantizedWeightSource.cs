using System.Runtime.InteropServices;
using Blip2Mesh.Model.Checkpoint;

namespace Blip2Mesh.Model.Quantization;

/// <summary>Where a quantized Linear weight's two MatMulNBits initializers are, as ONNX external-data references.</summary>
public sealed record QuantizedWeightLocation(string Name, long OutFeatures, long InFeatures, LinearQuantization Quantization,
    string Location, long PackedLength, long ScalesOffset, long ScalesLength);

/// <summary>A weight source that can also hand out block-quantized Linear weights.</summary>
public interface IQuantizedWeightSource : IWeightSource
{
    QuantizedWeightLocation DescribeQuantized(string name, long outFeatures, long inFeatures, LinearQuantization quantization);
}

/// <summary>
/// A checkpoint plus an on-disk cache of its quantized Linear weights, one file per tensor and format under
/// {cache}/{checkpoint fingerprint}/{format}/. A missing tensor is quantized on first use and written atomically
/// (several stage processes may share the cache); ONNX Runtime then memory-maps the file like any external data.
/// Every location it gives (exact weights too) is relative to <see cref="ExternalDataFolder"/>, the deepest folder
/// holding both the checkpoint and the cache, because a session reads external data from one folder only.
/// </summary>
public sealed class QuantizedWeightSource : IQuantizedWeightSource
{
    private readonly Blip2Checkpoint _checkpoint;

    public QuantizedWeightSource(Blip2Checkpoint checkpoint, string cacheRoot)
    {
        _checkpoint = checkpoint;
        CacheFolder = Path.Combine(Path.GetFullPath(cacheRoot), checkpoint.Fingerprint);
        ExternalDataFolder = CommonFolder(checkpoint.Directory, CacheFolder);
    }

    /// <summary>$XDG_CACHE_HOME/blip2mesh/weights, else ~/.cache/blip2mesh/weights (the local application data folder on Windows).</summary>
    public static string DefaultCacheRoot()
    {
        var xdg = Environment.GetEnvironmentVariable("XDG_CACHE_HOME");
        var root = !string.IsNullOrEmpty(xdg) ? xdg
            : OperatingSystem.IsWindows() ? Environment.GetFolderPath(Environment.SpecialFolder.LocalApplicationData)
            : Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".cache");
        return Path.Combine(root, "blip2mesh", "weights");
    }

    public string ExternalDataFolder { get; }
    /// <summary>Where this checkpoint's quantized tensors are cached, one subfolder per format.</summary>
    public string CacheFolder { get; }
    public Blip2Config Config => _checkpoint.Config;
    public bool Has(string name) => _checkpoint.Has(name);

    public WeightLocation Describe(string name, long[] expectedShape)
    {
        var weight = _checkpoint.Describe(name, expectedShape);
        return weight with { Location = Relative(Path.Combine(_checkpoint.Directory, weight.Location)) };
    }

    public QuantizedWeightLocation DescribeQuantized(string name, long outFeatures, long inFeatures, LinearQuantization quantization)
    {
        var weight = _checkpoint.Weight(name, outFeatures, inFeatures);
        var packedLength = LinearQuantizer.PackedBytes(outFeatures, inFeatures, quantization);
        var scalesLength = LinearQuantizer.ScaleCount(outFeatures, inFeatures, quantization) * sizeof(float);
        var path = Path.Combine(CacheFolder, quantization.CacheKey, name + ".bin");
        if (!File.Exists(path) || new FileInfo(path).Length != packedLength + scalesLength)
        {
            try
            {
                Write(path, weight, (int)outFeatures, (int)inFeatures, quantization, packedLength, scalesLength);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                throw new InvalidOperationException(
                    $"the quantized weights of {_checkpoint.Directory} cannot be written to the cache folder {CacheFolder}; give a writable folder with --cache-dir", e);
            }
        }
        return new QuantizedWeightLocation(name, outFeatures, inFeatures, quantization, Relative(path), packedLength, packedLength, scalesLength);
    }

    /// <summary>Quantizes one tensor into a temporary file beside <paramref name="path"/>, then renames it into place.</summary>
    private static void Write(string path, WeightRef weight, int rows, int inFeatures, LinearQuantization q, long packedLength, long scalesLength)
    {
        var packed = new byte[packedLength];
        var scales = new float[scalesLength / sizeof(float)];
        LinearQuantizer.Quantize(weight.File.Bytes(weight.Entry), weight.Entry.DType, rows, inFeatures, q, packed, scales);
        weight.File.ReleasePages(weight.Entry);
        Directory.CreateDirectory(Path.GetDirectoryName(path)!);
        var temporary = $"{path}.{Environment.ProcessId}.{Guid.NewGuid():N}.tmp";
        try
        {
            using (var file = new FileStream(temporary, FileMode.CreateNew, FileAccess.Write))
            {
                file.Write(packed);
                file.Write(MemoryMarshal.AsBytes(scales.AsSpan()));
            }
            File.Move(temporary, path, overwrite: true);
        }
        finally
        {
            File.Delete(temporary);
        }
    }

    private string Relative(string path) => Path.GetRelativePath(ExternalDataFolder, path);

    /// <summary>The deepest folder that contains both <paramref name="a"/> and <paramref name="b"/> (at worst the file system root).</summary>
    internal static string CommonFolder(string a, string b)
    {
        var left = Path.GetFullPath(a).TrimEnd(Path.DirectorySeparatorChar).Split(Path.DirectorySeparatorChar);
        var right = Path.GetFullPath(b).TrimEnd(Path.DirectorySeparatorChar).Split(Path.DirectorySeparatorChar);
        var shared = left.Zip(right).TakeWhile(p => p.First == p.Second).Count();
        var folder = string.Join(Path.DirectorySeparatorChar, left.Take(shared));
        return folder.Length == 0 || folder.EndsWith(':') ? folder + Path.DirectorySeparatorChar : folder;
    }
}
