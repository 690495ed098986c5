using System.Text.Json;
using System.Text.Json.Nodes;
using Blip2Mesh.Model.Checkpoint;
using Blip2Mesh.Model.Generation;
using Blip2Mesh.Model.Onnx;
using Blip2Mesh.Model.Pipeline;
using Blip2Mesh.Model.Runtime;

namespace Blip2Mesh.Tests;

/// <summary>Checkpoints `blip2mesh synth` writes from tiny-a, shared by the tests (written once, deleted at the end).</summary>
public sealed class SynthesisedCheckpoints : IDisposable
{
    public string Root { get; } = Directory.CreateTempSubdirectory("blip2mesh-synth-").FullName;
    public string Float16 => Path.Combine(Root, "f16");
    public string Float32 => Path.Combine(Root, "f32");
    public string Widened => Path.Combine(Root, "f16-widened");

    public SynthesisedCheckpoints()
    {
        foreach (var (dtype, dir) in new[] { ("float16", Float16), ("float32", Float32) })
        {
            var result = CliProcess.Run("synth", "--like", Fixtures.TinyA, "--dtype", dtype, "--out", dir, "--shard-mb", "1", "--seed", "7");
            Assert.True(result.ExitCode == 0, result.Stderr);
        }
        WriteWidened(Float16, Widened);
    }

    /// <summary>The same checkpoint with every float16 weight widened (exactly) to float32, in one model.safetensors.</summary>
    private static void WriteWidened(string source, string output)
    {
        Directory.CreateDirectory(output);
        foreach (var file in Directory.GetFiles(source).Where(f => f.EndsWith(".json", StringComparison.Ordinal) || f.EndsWith(".model", StringComparison.Ordinal)))
            if (Path.GetFileName(file) != SyntheticCheckpoint.IndexFile) File.Copy(file, Path.Combine(output, Path.GetFileName(file)));
        using var checkpoint = Blip2Checkpoint.Open(source);
        var tensors = checkpoint.Weights.Values.OrderBy(w => w.Name, StringComparer.Ordinal)
            .Select(w => new TensorToWrite(w.Name, TensorDType.Float32, w.Entry.Shape, System.Runtime.InteropServices.MemoryMarshal.AsBytes(w.File.ReadFloat32(w.Entry).AsSpan()).ToArray()))
            .ToList();
        SafetensorsWriter.Write(Path.Combine(output, "model.safetensors"), tensors);
    }

    public void Dispose() => Directory.Delete(Root, recursive: true);
}

public sealed class SyntheticCheckpointTests(SynthesisedCheckpoints synth) : IClassFixture<SynthesisedCheckpoints>
{
    private static byte[] Image() => File.ReadAllBytes(Directory.GetFiles(Path.Combine(Fixtures.TinyA, "images"))[0]);

    /// <summary>Records which weights the stage graphs read from a real checkpoint, and with what shapes.</summary>
    private sealed class UsageRecorder(Blip2Checkpoint checkpoint) : IWeightSource
    {
        public readonly Dictionary<string, long[]> Used = new(StringComparer.Ordinal);
        public Blip2Config Config => checkpoint.Config;
        public bool Has(string name) => checkpoint.Has(name);
        public WeightLocation Describe(string name, long[] expectedShape)
        {
            var location = checkpoint.Describe(name, expectedShape);
            Used[name] = location.Shape;
            return location;
        }
    }

    private static Dictionary<string, long[]> UsedBy(string directory)
    {
        using var checkpoint = Blip2Checkpoint.Open(directory);
        var recorder = new UsageRecorder(checkpoint);
        VisionGraph.Build(new OnnxGraphBuilder(recorder, "vision"), new PixelInput.Normalized());
        QFormerGraph.Build(new OnnxGraphBuilder(recorder, "qformer"));
        T5EncoderGraph.Build(new OnnxGraphBuilder(recorder, "t5-encoder"));
        T5DecoderStepGraph.Build(new OnnxGraphBuilder(recorder, "t5-decoder-step"));
        return recorder.Used;
    }

    [Fact]
    public void WritesShardsAnIndexAndTheSourcesConfig()
    {
        foreach (var (dir, bytesPerValue) in new[] { (synth.Float16, 2), (synth.Float32, 4) })
        {
            var shards = Directory.GetFiles(dir, "model-*-of-*.safetensors");
            Assert.True(shards.Length >= 2, $"{dir}: {shards.Length} shard(s)");
            Assert.False(File.Exists(Path.Combine(dir, "model.safetensors")));
            Assert.Equal(File.ReadAllBytes(Path.Combine(Fixtures.TinyA, "config.json")), File.ReadAllBytes(Path.Combine(dir, "config.json")));
            Assert.True(File.Exists(Path.Combine(dir, "preprocessor_config.json")) && File.Exists(Path.Combine(dir, "spiece.model")));

            using var index = JsonDocument.Parse(File.ReadAllBytes(Path.Combine(dir, SyntheticCheckpoint.IndexFile)));
            var map = index.RootElement.GetProperty("weight_map").EnumerateObject().ToDictionary(p => p.Name, p => p.Value.GetString()!);
            using var checkpoint = Blip2Checkpoint.Open(dir);
            Assert.Equal(checkpoint.Weights.Keys.Order(StringComparer.Ordinal), map.Keys.Order(StringComparer.Ordinal));
            foreach (var (name, weight) in checkpoint.Weights)
            {
                Assert.Equal(map[name], Path.GetFileName(weight.File.Path));
                Assert.Equal(bytesPerValue, weight.Entry.DType.Size());
            }
            Assert.Equal(checkpoint.Weights.Values.Sum(w => w.Entry.Length), index.RootElement.GetProperty("metadata").GetProperty("total_size").GetInt64());
        }
    }

    [Fact]
    public void HoldsExactlyTheTensorsTheModelUsesFromTinyA()
    {
        var expected = UsedBy(Fixtures.TinyA);
        using (var tinyA = Blip2Checkpoint.Open(Fixtures.TinyA))
            Assert.All(expected.Keys, name => Assert.True(tinyA.Has(name)));
        foreach (var dir in new[] { synth.Float16, synth.Float32 })
        {
            using var checkpoint = Blip2Checkpoint.Open(dir);
            Assert.Equal(expected.Keys.Order(StringComparer.Ordinal), checkpoint.Weights.Keys.Order(StringComparer.Ordinal));
            foreach (var (name, shape) in expected) Assert.Equal(shape, checkpoint.Weights[name].Entry.Shape);
        }
    }

    [Fact]
    public void Float16ValuesAreTheFloat32OnesRoundedAndNormsAndBiasesAreInitialised()
    {
        using var f16 = Blip2Checkpoint.Open(synth.Float16);
        using var f32 = Blip2Checkpoint.Open(synth.Float32);
        foreach (var (name, weight) in f32.Weights)
        {
            var wide = weight.File.ReadFloat32(weight.Entry);
            var half = f16.Weights[name].File.ReadFloat32(f16.Weights[name].Entry);
            for (var i = 0; i < wide.Length; i++) Assert.Equal((float)(Half)wide[i], half[i]);
            Assert.All(wide, v => Assert.True(float.IsFinite(v)));
            switch (SyntheticCheckpoint.InitOf(name))
            {
                case SyntheticCheckpoint.Init.Zeros: Assert.All(wide, v => Assert.Equal(0f, v)); break;
                case SyntheticCheckpoint.Init.Ones: Assert.All(wide, v => Assert.Equal(1f, v)); break;
                default:
                    var std = Math.Sqrt(wide.Average(v => (double)v * v));
                    Assert.InRange(std, 0.01, 0.04);
                    break;
            }
        }
        Assert.Equal(SyntheticCheckpoint.Init.Ones, SyntheticCheckpoint.InitOf("language_model.encoder.final_layer_norm.weight"));
        Assert.Equal(SyntheticCheckpoint.Init.Ones, SyntheticCheckpoint.InitOf("qformer.encoder.layer.0.attention.output.LayerNorm.weight"));
        Assert.Equal(SyntheticCheckpoint.Init.Normal, SyntheticCheckpoint.InitOf("language_model.decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"));
    }

    [Fact]
    public void BothDTypesLoadAndGenerate()
    {
        foreach (var dir in new[] { synth.Float16, synth.Float32 })
        {
            using var pipeline = Blip2Pipeline.Load(dir);
            var queries = pipeline.EmbedImage(Image());
            var result = pipeline.Generate(queries, "Question: what is this? Answer:", new GenerationOptions { MaxNewTokens = 5 }).Last().Final!;
            Assert.InRange(result.Best.Ids.Count, 2, 6);
        }
    }

    [Fact]
    public void Float16StageOutputsEqualThoseOfTheWidenedFloat32Checkpoint()
    {
        using var half = Blip2Pipeline.Load(synth.Float16);
        using var wide = Blip2Pipeline.Load(synth.Widened);
        var a = StageOutputs(half);
        var b = StageOutputs(wide);
        Assert.Equal(b.Keys, a.Keys);
        foreach (var (name, tensor) in a)
        {
            var diff = Fixtures.MaxAbsDiff(tensor, b[name]);
            Assert.True(diff <= 1e-6f, $"{name}: max |diff| {diff}");
        }
    }

    /// <summary>Every stage's output for one image and prompt: vision, Q-Former, T5 encoder and the first decoder step's logits.</summary>
    private static Dictionary<string, FloatTensor> StageOutputs(Blip2Pipeline pipeline)
    {
        var model = pipeline.Model;
        var resized = pipeline.Images.ToModelSize(Image());
        var imageEmbeds = model.EmbedRgb(resized.Pixels, 1);
        var qformer = model.RunQFormer(imageEmbeds);
        var encoder = model.Encode(qformer.QueryEmbeds, [pipeline.Tokenizer.Encode("Question: what is this? Answer:")], hiddenStates: true);
        var logits = model.FirstStepLogits(encoder);
        return new()
        {
            ["image_embeds"] = imageEmbeds,
            ["query_output"] = qformer.QueryOutput,
            ["query_embeds"] = qformer.QueryEmbeds,
            ["last_hidden_state"] = encoder.LastHiddenState!,
            ["logits"] = logits,
        };
    }

    [Fact]
    public void OddShapedConfigRunsEndToEnd()
    {
        var source = Path.Combine(synth.Root, "odd-source");
        Directory.CreateDirectory(source);
        var config = JsonNode.Parse(File.ReadAllText(Path.Combine(Fixtures.TinyA, "config.json")))!.AsObject();
        config["num_query_tokens"] = 5;
        config["qformer_config"]!["cross_attention_frequency"] = 1;
        config["vision_config"]!["qkv_bias"] = false;
        var text = config["text_config"]!;
        text["d_kv"] = 24;   // 4 heads × 24 = 96 ≠ d_model 64
        text["vocab_size"] = 2240;
        text["feed_forward_proj"] = "gated-gelu";
        text["dense_act_fn"] = "gelu";
        text["num_layers"] = 3;
        text["num_decoder_layers"] = 1;
        text["tie_word_embeddings"] = true;
        File.WriteAllText(Path.Combine(source, "config.json"), config.ToJsonString());
        File.Copy(Path.Combine(Fixtures.TinyA, "preprocessor_config.json"), Path.Combine(source, "preprocessor_config.json"));

        var output = Path.Combine(synth.Root, "odd");
        SyntheticCheckpoint.Create(source, output, new SynthOptions(TensorDType.Float16, Seed: 3, MaxShardBytes: 200_000), tokenizerFallback: Fixtures.TinyA);
        using var pipeline = Blip2Pipeline.Load(output);
        var c = pipeline.Model.Config;
        Assert.NotEqual(c.Text.DModel, c.Text.InnerDim);
        using (var checkpoint = Blip2Checkpoint.Open(output))
        {
            Assert.False(checkpoint.Has("language_model.lm_head.weight"));
            Assert.False(checkpoint.Has("vision_model.encoder.layers.0.self_attn.qkv.bias"));
            Assert.True(checkpoint.Has("qformer.encoder.layer.1.crossattention.attention.key.weight"));
        }

        var queries = pipeline.EmbedImage(Image());
        Assert.Equal([1, 5, c.Text.DModel], queries.Shape);
        var encoder = pipeline.Model.Encode(queries, [pipeline.Tokenizer.Encode("a photo of")]);
        var logits = pipeline.Model.FirstStepLogits(encoder);
        Assert.Equal([1, 2240], logits.Shape);
        Assert.All(logits.Data, v => Assert.True(float.IsFinite(v)));
        var result = pipeline.Generate(queries, "a photo of", new GenerationOptions { MaxNewTokens = 6 }).Last().Final!;
        Assert.InRange(result.Best.Ids.Count, 2, 7);
        Assert.All(result.Best.Ids, id => Assert.InRange(id, 0, 2239));
    }
}
