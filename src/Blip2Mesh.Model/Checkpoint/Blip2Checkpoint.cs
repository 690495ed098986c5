using System.Security.Cryptography;
using System.Text;
using System.Text.Json;

namespace Blip2Mesh.Model.Checkpoint;

/// <summary>A weight located in one of the checkpoint's memory-mapped safetensors files.</summary>
public sealed record WeightRef(SafetensorsFile File, SafetensorsEntry Entry)
{
    public string Name => Entry.Name;
}

/// <summary>Where a weight's bytes are, as an ONNX external-data reference: a file relative to the model folder, offset and length.</summary>
public sealed record WeightLocation(string Name, TensorDType DType, long[] Shape, string Location, long Offset, long Length);

/// <summary>
/// What the graph builder reads weights from: the model's config, which optional weights exist, and where each
/// weight (checked against the shape the model expects) lives. A <see cref="Blip2Checkpoint"/> is one; a recorder
/// that lists every weight the graphs ask for (see <see cref="WeightRecorder"/>) is another.
/// </summary>
public interface IWeightSource
{
    Blip2Config Config { get; }
    bool Has(string name);
    WeightLocation Describe(string name, long[] expectedShape);
}

/// <summary>
/// A Hugging Face BLIP-2 snapshot directory: config.json plus model.safetensors or the shards listed in
/// model.safetensors.index.json. Weights stay memory-mapped; nothing is read until a graph needs it.
/// </summary>
public sealed class Blip2Checkpoint : IWeightSource, IDisposable
{
    private readonly List<SafetensorsFile> _files = [];
    private readonly Dictionary<string, WeightRef> _weights = new(StringComparer.Ordinal);

    public string Directory { get; }
    public Blip2Config Config { get; }
    /// <summary>Identifies this exact model: config, tensor layout and a sample of the weight bytes.</summary>
    public string Fingerprint { get; }
    public IReadOnlyDictionary<string, WeightRef> Weights => _weights;

    private Blip2Checkpoint(string directory)
    {
        ModelFolder.Require(directory, ModelFiles.Config | ModelFiles.Weights);
        Directory = Path.GetFullPath(directory);
        var configPath = Path.Combine(Directory, "config.json");
        Config = Blip2Config.Load(configPath);
        try
        {
            foreach (var file in ModelFolder.WeightFiles(Directory)) Add(SafetensorsFile.Open(Path.Combine(Directory, file)));
        }
        catch
        {
            Dispose();
            throw;
        }
        Fingerprint = ComputeFingerprint(configPath);
    }

    public static Blip2Checkpoint Open(string directory) => new(directory);

    private void Add(SafetensorsFile file)
    {
        _files.Add(file);
        foreach (var entry in file.Tensors.Values)
        {
            if (!_weights.TryAdd(entry.Name, new WeightRef(file, entry)))
                throw new InvalidDataException($"{file.Path}: tensor '{entry.Name}' also appears in {_weights[entry.Name].File.Path}");
        }
    }

    public bool Has(string name) => _weights.ContainsKey(name);

    /// <summary>The named weight, checked against the shape the model expects.</summary>
    public WeightRef Weight(string name, params long[] expectedShape)
    {
        if (!_weights.TryGetValue(name, out var weight))
            throw new InvalidDataException($"{Directory}: weight '{name}' is missing from {string.Join(", ", _files.Select(f => Path.GetFileName(f.Path)))}");
        if (!weight.Entry.Shape.SequenceEqual(expectedShape))
            throw new InvalidDataException(
                $"{weight.File.Path}: weight '{name}' has shape [{string.Join(", ", weight.Entry.Shape)}], expected [{string.Join(", ", expectedShape)}] from config.json");
        return weight;
    }

    public WeightLocation Describe(string name, long[] expectedShape)
    {
        var weight = Weight(name, expectedShape);
        return new WeightLocation(name, weight.Entry.DType, weight.Entry.Shape, Path.GetRelativePath(Directory, weight.File.Path), weight.Entry.Offset, weight.Entry.Length);
    }

    private const int FingerprintSample = 256;

    private string ComputeFingerprint(string configPath)
    {
        using var sha = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        sha.AppendData(File.ReadAllBytes(configPath));
        foreach (var w in _weights.Values.OrderBy(w => w.Name, StringComparer.Ordinal))
        {
            sha.AppendData(Encoding.UTF8.GetBytes($"{w.Name}|{w.Entry.DType}|{string.Join(",", w.Entry.Shape)}\n"));
            // Samples of each tensor's bytes, at its start, middle and end, tell apart checkpoints of one architecture
            // without hashing GBs (training moves a tensor's bytes throughout, so its samples too). Their pages are
            // dropped again: nothing else reads this mapping unless weights are quantized.
            var bytes = w.File.Bytes(w.Entry);
            var sample = Math.Min(bytes.Length, FingerprintSample);
            foreach (var start in new[] { 0, (bytes.Length - sample) / 2, bytes.Length - sample }.Distinct())
                sha.AppendData(bytes.Slice(start, sample));
            w.File.ReleasePages(w.Entry);
        }
        return Convert.ToHexStringLower(sha.GetHashAndReset())[..16];
    }

    public void Dispose()
    {
        foreach (var file in _files) file.Dispose();
        _files.Clear();
    }
}
