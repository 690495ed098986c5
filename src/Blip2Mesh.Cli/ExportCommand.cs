using Blip2Mesh.Model.Checkpoint;
using Blip2Mesh.Model.Onnx;
using Blip2Mesh.Model.Pipeline;
using Blip2Mesh.Model.Runtime;
using Google.Protobuf;

namespace Blip2Mesh.Cli;

/// <summary>
/// <c>blip2mesh export</c>: writes every stage graph as an ordinary .onnx file (for Netron or other runtimes). The
/// weights stay where they are: each file's external data points into the checkpoint's safetensors shards. ONNX
/// Runtime reads external data only below the model file's folder, so the files go into the checkpoint folder or a
/// folder above it.
/// </summary>
internal static class ExportCommand
{
    public static int Run(string[] argv)
    {
        var args = new Args(argv, ModelInputs.Flags);
        var model = Path.GetFullPath(args.Required("model"));
        var output = Path.GetFullPath(args.Optional("out") ?? model);
        args.EnsureAllUsed();
        if (Path.GetRelativePath(output, model).StartsWith("..", StringComparison.Ordinal))
            throw new UsageException($"--out must be the checkpoint folder or a folder above it: ONNX Runtime reads external data only below the .onnx file's folder, and the weights stay in {model}");

        using var checkpoint = Blip2Checkpoint.Open(model);
        var rgb = Blip2Pipeline.RgbNormalization(Blip2Pipeline.LoadImagePreprocessor(model));
        Directory.CreateDirectory(output);
        foreach (var (name, build) in Blip2Model.StageGraphs(rgb))
        {
            var graph = build(new OnnxGraphBuilder(checkpoint, name));
            // External data locations are relative to the file that names them.
            foreach (var tensor in graph.Graph.Initializer)
                foreach (var entry in tensor.ExternalData.Where(e => e.Key == "location"))
                    entry.Value = Path.GetRelativePath(output, Path.Combine(model, entry.Value));
            var path = Path.Combine(output, $"{name}.onnx");
            File.WriteAllBytes(path, graph.ToByteArray());
            Console.Out.WriteLine($"wrote {path} ({graph.Graph.Node.Count} nodes, {graph.Graph.Initializer.Count(t => t.ExternalData.Count > 0)} weights in the checkpoint)");
        }
        return 0;
    }
}
