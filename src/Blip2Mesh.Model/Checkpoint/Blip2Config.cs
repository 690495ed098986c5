using System.Text.Json;
using System.Text.Json.Nodes;

namespace Blip2Mesh.Model.Checkpoint;

/// <summary>Blip2VisionConfig (EVA ViT), with transformers 4.33 defaults for omitted keys.</summary>
public sealed record VisionConfig(
    int HiddenSize, int IntermediateSize, int NumHiddenLayers, int NumAttentionHeads,
    int ImageSize, int PatchSize, string HiddenAct, double LayerNormEps, bool QkvBias)
{
    public int PatchesPerSide => ImageSize / PatchSize;
    /// <summary>Patches plus the class token.</summary>
    public int SequenceLength => PatchesPerSide * PatchesPerSide + 1;
    public int HeadDim => HiddenSize / NumAttentionHeads;
}

/// <summary>Blip2QFormerConfig (BERT-style), with transformers 4.33 defaults for omitted keys.</summary>
public sealed record QFormerConfig(
    int HiddenSize, int IntermediateSize, int NumHiddenLayers, int NumAttentionHeads,
    string HiddenAct, double LayerNormEps, int CrossAttentionFrequency, int EncoderHiddenSize)
{
    public int HeadDim => HiddenSize / NumAttentionHeads;
    public bool HasCrossAttention(int layer) => layer % CrossAttentionFrequency == 0;
}

/// <summary>T5Config, resolved the way transformers 4.33 resolves it.</summary>
public sealed record T5Config(
    int VocabSize, int DModel, int DKv, int DFf, int NumLayers, int NumDecoderLayers, int NumHeads,
    int RelativeAttentionNumBuckets, int RelativeAttentionMaxDistance, double LayerNormEpsilon,
    string DenseActFn, bool IsGatedAct, bool TieWordEmbeddings,
    int PadTokenId, int EosTokenId, int DecoderStartTokenId)
{
    public int InnerDim => NumHeads * DKv;
}

/// <summary>
/// Blip2Config as read from a checkpoint's config.json. Every model dimension used anywhere comes from here.
/// </summary>
public sealed record Blip2Config(
    VisionConfig Vision, QFormerConfig QFormer, T5Config Text, int NumQueryTokens, bool TieWordEmbeddings)
{
    public static Blip2Config Load(string path)
    {
        JsonObject root;
        try
        {
            root = JsonNode.Parse(File.ReadAllText(path)) as JsonObject
                ?? throw new InvalidDataException($"{path}: not a JSON object");
        }
        catch (JsonException e)
        {
            throw new InvalidDataException($"{path}: invalid JSON: {e.Message}", e);
        }
        return Parse(root, path);
    }

    public static Blip2Config Parse(JsonObject root, string source)
    {
        var model = new Keys(root, source);
        var modelType = model.String("model_type", "blip-2");
        if (modelType != "blip-2")
            throw new InvalidDataException($"{source}: model_type is '{modelType}', expected 'blip-2'");
        if (model.Bool("use_decoder_only_language_model", false))
            throw new InvalidDataException($"{source}: decoder-only language models (OPT) are not supported; Blip2Mesh serves Flan-T5");

        var v = model.Section("vision_config");
        var vision = new VisionConfig(
            v.Int("hidden_size", 1408), v.Int("intermediate_size", 6144), v.Int("num_hidden_layers", 39),
            v.Int("num_attention_heads", 16), v.Int("image_size", 224), v.Int("patch_size", 14),
            v.String("hidden_act", "gelu"), v.Double("layer_norm_eps", 1e-5), v.Bool("qkv_bias", true));

        var q = model.Section("qformer_config");
        var qformer = new QFormerConfig(
            q.Int("hidden_size", 768), q.Int("intermediate_size", 3072), q.Int("num_hidden_layers", 12),
            q.Int("num_attention_heads", 12), q.String("hidden_act", "gelu"), q.Double("layer_norm_eps", 1e-12),
            q.Int("cross_attention_frequency", 2), q.Int("encoder_hidden_size", 1408));

        var t = model.Section("text_config");
        // Blip2Config builds text_config with CONFIG_MAPPING[model_type], defaulting to OPT.
        var textType = t.String("model_type", "opt");
        if (textType != "t5")
            throw new InvalidDataException($"{source}: text_config.model_type is '{textType}'; only T5 (Flan-T5) is supported");
        var feedForwardProj = t.String("feed_forward_proj", "relu");
        var actInfo = feedForwardProj.Split('-');
        if ((actInfo.Length > 1 && actInfo[0] != "gated") || actInfo.Length > 2)
            throw new InvalidDataException($"{source}: text_config.feed_forward_proj '{feedForwardProj}' is not '{{ACT}}' or 'gated-{{ACT}}'");
        // T5Config derives these from feed_forward_proj ("gated-gelu" means the tanh form for backward
        // compatibility), but explicit keys in config.json win because PretrainedConfig applies them last.
        var derivedAct = feedForwardProj == "gated-gelu" ? "gelu_new" : actInfo[^1];
        var numLayers = t.Int("num_layers", 6);
        var text = new T5Config(
            t.Int("vocab_size", 32128), t.Int("d_model", 512), t.Int("d_kv", 64), t.Int("d_ff", 2048),
            numLayers, t.IntOrNull("num_decoder_layers") ?? numLayers, t.Int("num_heads", 8),
            t.Int("relative_attention_num_buckets", 32), t.Int("relative_attention_max_distance", 128),
            t.Double("layer_norm_epsilon", 1e-6),
            t.String("dense_act_fn", derivedAct), t.Bool("is_gated_act", actInfo[0] == "gated"),
            t.Bool("tie_word_embeddings", true),
            t.IntOrNull("pad_token_id") ?? 0, t.IntOrNull("eos_token_id") ?? 1, t.IntOrNull("decoder_start_token_id") ?? 0);

        var config = new Blip2Config(vision, qformer, text, model.Int("num_query_tokens", 32), model.Bool("tie_word_embeddings", true));
        config.Validate(source);
        return config;
    }

    private void Validate(string source)
    {
        void Require(bool ok, string what)
        {
            if (!ok) throw new InvalidDataException($"{source}: {what}");
        }
        Require(Vision.HiddenSize % Vision.NumAttentionHeads == 0, "vision_config.hidden_size must be divisible by num_attention_heads");
        Require(Vision.ImageSize % Vision.PatchSize == 0, "vision_config.image_size must be a multiple of patch_size");
        Require(QFormer.HiddenSize % QFormer.NumAttentionHeads == 0, "qformer_config.hidden_size must be divisible by num_attention_heads");
        Require(QFormer.CrossAttentionFrequency > 0, "qformer_config.cross_attention_frequency must be positive");
        Require(QFormer.EncoderHiddenSize == Vision.HiddenSize, "qformer_config.encoder_hidden_size must equal vision_config.hidden_size");
        Require(NumQueryTokens > 0, "num_query_tokens must be positive");
        foreach (var act in new[] { Vision.HiddenAct, QFormer.HiddenAct, Text.DenseActFn })
            Require(Activations.IsSupported(act), $"activation '{act}' is not supported (supported: {string.Join(", ", Activations.Supported)})");
    }

    /// <summary>Typed access to one JSON section with defaults for absent or null keys.</summary>
    private sealed class Keys(JsonObject node, string context)
    {
        public Keys Section(string name) => new(node[name] as JsonObject ?? [], $"{context}: {name}");
        public int Int(string key, int fallback) => IntOrNull(key) ?? fallback;
        public int? IntOrNull(string key) => Read(key, n => n.GetValue<int>());
        public double Double(string key, double fallback) => Read(key, n => n.GetValue<double>()) ?? fallback;
        public bool Bool(string key, bool fallback) => Read(key, n => n.GetValue<bool>()) ?? fallback;
        public string String(string key, string fallback) => node[key] is JsonValue v ? v.GetValue<string>() : fallback;

        private T? Read<T>(string key, Func<JsonValue, T> get) where T : struct
        {
            if (node[key] is not JsonValue value) return null;
            try { return get(value); }
            catch (Exception e) when (e is InvalidOperationException or FormatException)
            {
                throw new InvalidDataException($"{context}.{key}: unexpected value {value.ToJsonString()}");
            }
        }
    }
}

/// <summary>The activation names of transformers' ACT2FN that BLIP-2 checkpoints use.</summary>
public static class Activations
{
    public static readonly string[] Supported = ["gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu", "silu", "swish", "quick_gelu"];
    public static bool IsSupported(string name) => Supported.Contains(name);
}
