using Blip2Mesh.Model.Errors;
using Blip2Mesh.Model.Generation;
using Blip2Mesh.Model.Text;
using ProtoOptions = Blip2Mesh.Contracts.V1.GenerationOptions;

namespace Blip2Mesh.ServiceDefaults;

/// <summary>Service-side limits on what one request may ask for (the gateway and the decoder enforce the same ones).</summary>
public sealed record GenerationLimits
{
    public int MaxNewTokens { get; init; } = 512;
    public int MaxBeams { get; init; } = 8;
    public int MaxPromptTokens { get; init; } = 256;
    /// <summary>UTF-8 bytes of prompt accepted, checked before tokenizing: a huge prompt costs nothing but its refusal.</summary>
    public int MaxPromptBytes { get; init; } = 16 * 1024;

    public GenerationLimits Validate()
    {
        if (MaxNewTokens < 1 || MaxBeams < 1 || MaxPromptTokens < 1 || MaxPromptBytes < 1)
            throw new ArgumentOutOfRangeException(nameof(GenerationLimits), "every generation limit must be at least 1");
        return this;
    }
}

/// <summary>Public API options and prompts → what generation runs, with every bad value an invalid request naming its field.</summary>
public static class GenerationRequests
{
    public static GenerationOptions ToOptions(ProtoOptions? proto, GenerationLimits limits)
    {
        var defaults = new GenerationOptions();
        var options = proto is null ? defaults : new GenerationOptions
        {
            MaxNewTokens = proto.HasMaxNewTokens ? proto.MaxNewTokens : defaults.MaxNewTokens,
            MinNewTokens = proto.HasMinNewTokens ? proto.MinNewTokens : defaults.MinNewTokens,
            NumBeams = proto.HasNumBeams ? proto.NumBeams : defaults.NumBeams,
            DoSample = proto.HasDoSample ? proto.DoSample : defaults.DoSample,
            Temperature = proto.HasTemperature ? proto.Temperature : defaults.Temperature,
            TopK = proto.HasTopK ? proto.TopK : defaults.TopK,
            TopP = proto.HasTopP ? proto.TopP : defaults.TopP,
            RepetitionPenalty = proto.HasRepetitionPenalty ? proto.RepetitionPenalty : defaults.RepetitionPenalty,
            LengthPenalty = proto.HasLengthPenalty ? proto.LengthPenalty : defaults.LengthPenalty,
            NoRepeatNgramSize = proto.HasNoRepeatNgramSize ? proto.NoRepeatNgramSize : defaults.NoRepeatNgramSize,
            Seed = proto.HasSeed ? proto.Seed : null,
            NumReturnSequences = proto.HasNumReturnSequences ? proto.NumReturnSequences : defaults.NumReturnSequences,
            Logprobs = proto.Logprobs,
            TopLogprobs = proto.TopLogprobs,
        };
        options.Validate();
        if (options.MaxNewTokens > limits.MaxNewTokens)
            throw ServingException.Invalid("max_new_tokens", $"must be at most {limits.MaxNewTokens} (got {options.MaxNewTokens})");
        if (options.NumBeams > limits.MaxBeams)
            throw ServingException.Invalid("num_beams", $"must be at most {limits.MaxBeams} (got {options.NumBeams})");
        // Each sample is a decoder row, as each beam is.
        if (options.NumReturnSequences > limits.MaxBeams)
            throw ServingException.Invalid("num_return_sequences", $"must be at most {limits.MaxBeams} (got {options.NumReturnSequences})");
        StopSequences(proto);
        return options;
    }

    public const int MaxStopSequences = 4;
    public const int MaxStopLength = 64;

    /// <summary>The request's stop strings, refusing more than 4, an empty one or one over 64 characters.</summary>
    public static IReadOnlyList<string> StopSequences(ProtoOptions? proto)
    {
        if (proto is null) return [];
        if (proto.Stop.Count > MaxStopSequences)
            throw ServingException.Invalid("stop", $"at most {MaxStopSequences} stop strings are accepted (got {proto.Stop.Count})");
        if (proto.Stop.Any(s => s.Length is 0 or > MaxStopLength))
            throw ServingException.Invalid("stop", $"every stop string must be 1 to {MaxStopLength} characters long");
        return proto.Stop;
    }

    /// <summary>The prompt's token ids, refusing a prompt over the byte limit before tokenizing it and one over the token limit after.</summary>
    public static IReadOnlyList<int> EncodePrompt(T5Tokenizer tokenizer, string prompt, GenerationLimits limits)
    {
        // UTF-8 is at most 3 bytes per UTF-16 unit: a short prompt is never counted.
        if (prompt.Length * 3L > limits.MaxPromptBytes && System.Text.Encoding.UTF8.GetByteCount(prompt) is var bytes && bytes > limits.MaxPromptBytes)
            throw ServingException.Invalid("prompt", $"{bytes} bytes exceed the limit of {limits.MaxPromptBytes} bytes");
        var ids = tokenizer.Encode(prompt);
        if (ids.Count > limits.MaxPromptTokens)
            throw ServingException.Invalid("prompt", $"{ids.Count} tokens exceed the limit of {limits.MaxPromptTokens}");
        return ids;
    }
}
