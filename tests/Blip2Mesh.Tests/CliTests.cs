using System.Runtime.InteropServices;
using System.Text.Json;
using Blip2Mesh.Model.Checkpoint;

namespace Blip2Mesh.Tests;

/// <summary>The command line, run as a process, against the tiny-a references.</summary>
public sealed class CliTests : IDisposable
{
    private readonly string _temp = Directory.CreateTempSubdirectory("blip2mesh-cli-").FullName;

    public void Dispose() => Directory.Delete(_temp, recursive: true);

    private const string Checkpoint = "blip2-tiny-a";

    private static string ImagePath(int image)
    {
        return Path.Combine(Fixtures.TinyA, Fixtures.Image(Checkpoint, image).GetProperty("file").GetString()!);
    }

    private static ProcessResult Ok(params string[] args)
    {
        var result = CliProcess.Run(args);
        Assert.True(result.ExitCode == 0, $"exit {result.ExitCode}: {result.Stderr}");
        return result;
    }

    [Theory]
    [InlineData(0, 1, 1)]
    [InlineData(6, 2, 1)]
    [InlineData(2, 2, 4)]
    public void GenerateJsonEqualsReference(int image, int prompt, int beams)
    {
        var reference = Fixtures.Prompt(Checkpoint, image, prompt);
        var expected = reference.GetProperty(beams == 1 ? "greedy" : "beam");
        var result = Ok("generate", "--model", Fixtures.TinyA, "--image", ImagePath(image),
            "--prompt", reference.GetProperty("prompt").GetString()!, "--num-beams", beams.ToString(), "--json");
        using var json = JsonDocument.Parse(result.Stdout);
        Assert.Equal(Fixtures.Ints(expected.GetProperty("ids")), Fixtures.Ints(json.RootElement.GetProperty("ids")));
        Assert.Equal(expected.GetProperty("text").GetString(), json.RootElement.GetProperty("text").GetString());
        Assert.Equal(expected.GetProperty("ended_with_eos").GetBoolean() ? "eos" : "length", json.RootElement.GetProperty("finish_reason").GetString());
    }

    [Fact]
    public void GenerateStreamsPlainText()
    {
        var result = Ok("generate", "--model", Fixtures.TinyA, "--image", ImagePath(0));
        Assert.Equal(Fixtures.Prompt(Checkpoint, 0, 0).GetProperty("greedy").GetProperty("text").GetString() + "\n", result.Stdout);
    }

    [Fact]
    public void JsonlRunsEveryLineAndReportsBadOnes()
    {
        var requests = Path.Combine(_temp, "requests.jsonl");
        File.WriteAllLines(requests,
        [
            JsonSerializer.Serialize(new { image = ImagePath(5), prompt = "a photo of", num_beams = 4 }),
            JsonSerializer.Serialize(new { image = ImagePath(5), prompt = "a photo of", num_beams = 0 }),
            JsonSerializer.Serialize(new { image = Path.Combine(_temp, "missing.png") }),
            JsonSerializer.Serialize(new { image = ImagePath(3), prompt = "", max_new_tokens = 5 }),
        ]);
        var result = CliProcess.Run("generate", "--model", Fixtures.TinyA, "--jsonl", requests);
        Assert.Equal(1, result.ExitCode);
        var lines = result.Stdout.Split('\n', StringSplitOptions.RemoveEmptyEntries).Select(l => JsonDocument.Parse(l).RootElement).ToArray();
        Assert.Equal(4, lines.Length);
        Assert.Equal(Fixtures.Ints(Fixtures.Prompt(Checkpoint, 5, 1).GetProperty("beam").GetProperty("ids")), Fixtures.Ints(lines[0].GetProperty("ids")));
        Assert.Contains("num_beams", lines[1].GetProperty("error").GetString());
        Assert.Contains("missing.png", lines[2].GetProperty("error").GetString());
        var greedy = Fixtures.Prompt(Checkpoint, 3, 0).GetProperty("greedy").GetProperty("ids").EnumerateArray().Take(6).Select(e => e.GetInt32());
        Assert.Equal(greedy, Fixtures.Ints(lines[3].GetProperty("ids")));
        Assert.Equal("length", lines[3].GetProperty("finish_reason").GetString());
    }

    [Fact]
    public void DumpFromPixelValuesMatchesEveryReferenceTensor()
    {
        using var references = SafetensorsFile.Open(Path.Combine(Fixtures.TinyA, "references.safetensors"));
        var pixels = Path.Combine(_temp, "pixels.safetensors");
        var pixelValues = Fixtures.ReadTensor(references, "img4/pixel_values");
        SafetensorsWriter.Write(pixels, [new TensorToWrite("pixel_values", TensorDType.Float32, pixelValues.Shape, MemoryMarshal.AsBytes(pixelValues.Data.AsSpan()).ToArray())]);
        var output = Path.Combine(_temp, "dump.safetensors");
        Ok("dump", "--model", Fixtures.TinyA, "--pixel-values", pixels, "--prompt", "Question: what is in the picture? Answer:", "--out", output);

        using var dump = SafetensorsFile.Open(output);
        foreach (var name in new[] { "pixel_values", "vision_last_hidden_state", "qformer_last_hidden_state", "language_projection" })
            Assert.True(Fixtures.MaxAbsDiff(Fixtures.ReadTensor(dump, name), Fixtures.ReadTensor(references, $"img4/{name}")) <= 1e-4f, name);
        foreach (var name in new[] { "inputs_embeds", "encoder_last_hidden_state", "first_step_logits" })
            Assert.True(Fixtures.MaxAbsDiff(Fixtures.ReadTensor(dump, name), Fixtures.ReadTensor(references, $"img4/prompt2/{name}")) <= 1e-4f, name);
    }

    [Fact]
    public void DumpFromImagePreprocessesLikeHuggingFace()
    {
        using var references = SafetensorsFile.Open(Path.Combine(Fixtures.TinyA, "references.safetensors"));
        var output = Path.Combine(_temp, "dump.safetensors");
        Ok("dump", "--model", Fixtures.TinyA, "--image", ImagePath(6), "--out", output);
        using var dump = SafetensorsFile.Open(output);
        Assert.True(Fixtures.MaxAbsDiff(Fixtures.ReadTensor(dump, "pixel_values"), Fixtures.ReadTensor(references, "img6/pixel_values")) <= 1e-5f);
        Assert.True(Fixtures.MaxAbsDiff(Fixtures.ReadTensor(dump, "first_step_logits"), Fixtures.ReadTensor(references, "img6/prompt0/first_step_logits")) <= 1e-4f);
    }

    [Fact]
    public void TokenizeEncodesDecodesAndReadsJsonl()
    {
        Assert.Equal("{\"ids\":[3,16,21,9,1]}\n", Ok("tokenize", "--model", Fixtures.TinyA, "--text", "a photo of").Stdout);
        Assert.Equal("{\"text\":\"a red square on the left\"}\n", Ok("tokenize", "--model", Fixtures.TinyA, "--decode", "0,3,94,220,27,4,104,1,0,0").Stdout);
        var lines = Path.Combine(_temp, "texts.jsonl");
        File.WriteAllLines(lines, [JsonSerializer.Serialize(new { text = "Zürich and São Paulo" })]);
        Assert.Equal("{\"ids\":[521,3,32,98,437,252,438,1],\"decoded\":\"Zürich and São Paulo\"}\n", Ok("tokenize", "--model", Fixtures.TinyA, "--jsonl", lines).Stdout);
    }

    [Fact]
    public void InspectReportsResolvedConfigAndParameterCounts()
    {
        using var json = JsonDocument.Parse(Ok("inspect", "--model", Fixtures.TinyA).Stdout);
        var root = json.RootElement;
        Assert.Equal(1e-5, root.GetProperty("config").GetProperty("vision").GetProperty("layer_norm_eps").GetDouble());
        Assert.Equal("gelu_new", root.GetProperty("config").GetProperty("text").GetProperty("dense_act_fn").GetString());
        using var checkpoint = Blip2Checkpoint.Open(Fixtures.TinyA);
        var total = checkpoint.Weights.Values.Sum(w => w.Entry.ElementCount);
        Assert.Equal(total, root.GetProperty("total_parameters").GetInt64());
        Assert.Equal(total, root.GetProperty("parameters").EnumerateObject().Sum(p => p.Value.GetInt64()));
    }

    [Fact]
    public void ExportedOnnxFilesRunInAPlainOnnxRuntimeSession()
    {
        // Into a copy of the checkpoint, as exporting writes next to the weights.
        var output = Path.Combine(_temp, "checkpoint");
        Directory.CreateDirectory(output);
        foreach (var file in Directory.GetFiles(Fixtures.TinyA)) File.Copy(file, Path.Combine(output, Path.GetFileName(file)));
        Ok("export", "--model", output);
        var outside = CliProcess.Run("export", "--model", output, "--out", Path.Combine(_temp, "elsewhere"));
        Assert.Equal(2, outside.ExitCode);
        Assert.Contains("external data", outside.Stderr);
        Assert.Equal(["qformer.onnx", "t5-decoder-step.onnx", "t5-encoder.onnx", "vision-rgb8.onnx", "vision.onnx"],
            Directory.GetFiles(output, "*.onnx").Select(Path.GetFileName).Order());

        // Loaded from its path alone, as another tool would: the weights come from the checkpoint's shards.
        using var references = SafetensorsFile.Open(Path.Combine(Fixtures.TinyA, "references.safetensors"));
        using var session = new Microsoft.ML.OnnxRuntime.InferenceSession(Path.Combine(output, "qformer.onnx"));
        var input = Fixtures.ReadTensor(references, "img3/vision_last_hidden_state");
        using var value = Microsoft.ML.OnnxRuntime.OrtValue.CreateTensorValueFromMemory(input.Data, input.Shape);
        using var runOptions = new Microsoft.ML.OnnxRuntime.RunOptions();
        using var outputs = session.Run(runOptions, ["image_embeds"], [value], ["query_embeds"]);
        var actual = new Model.Runtime.FloatTensor(outputs[0].GetTensorDataAsSpan<float>().ToArray(), outputs[0].GetTensorTypeAndShape().Shape);
        Assert.True(Fixtures.MaxAbsDiff(actual, Fixtures.ReadTensor(references, "img3/language_projection")) <= 1e-4f);
    }

    [Fact]
    public void CudaOnRequestRunsOrFailsClearlyNeverFallsBackSilently()
    {
        var result = CliProcess.Run("generate", "--model", Fixtures.TinyA, "--image", ImagePath(0), "--device", "cuda", "--max-new-tokens", "3");
        // On a machine with CUDA this runs; everywhere else it is an error saying so, not a quiet CPU run.
        if (result.ExitCode != 0)
        {
            Assert.Equal(1, result.ExitCode);
            Assert.Contains("CUDA execution was requested but is not available", result.Stderr);
            Assert.Equal("", result.Stdout);
        }
    }

    [Fact]
    public void BadArgumentsAreClearErrors()
    {
        var unknown = CliProcess.Run("generate", "--model", Fixtures.TinyA, "--image", ImagePath(0), "--beams", "3");
        Assert.Equal(2, unknown.ExitCode);
        Assert.Contains("--beams", unknown.Stderr);
        var invalid = CliProcess.Run("generate", "--model", Fixtures.TinyA, "--image", ImagePath(0), "--top-p", "1.5");
        Assert.Equal(1, invalid.ExitCode);
        Assert.Contains("top_p", invalid.Stderr);
        var missing = CliProcess.Run("generate", "--model", Path.Combine(_temp, "nowhere"), "--image", ImagePath(0));
        Assert.Equal(1, missing.ExitCode);
        Assert.Contains("nowhere", missing.Stderr);
    }
}
