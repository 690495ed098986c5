using Blip2Mesh.Model.Errors;

namespace Blip2Mesh.Model.Generation;

/// <summary>An option value that generation cannot honour; the message names the option.</summary>
public sealed class InvalidGenerationOptionException(string option, string message)
    : ServingException(ErrorKind.InvalidRequest, $"{option}: {message}", option)
{
    public string Option { get; } = option;
}

/// <summary>
/// Decoding settings with Hugging Face transformers 4.33 <c>generate</c> semantics. Defaults: greedy, 30 new tokens.
/// </summary>
public sealed record GenerationOptions
{
    public int MaxNewTokens { get; init; } = 30;
    public int MinNewTokens { get; init; }
    public int NumBeams { get; init; } = 1;
    public float LengthPenalty { get; init; } = 1f;
    /// <summary>"true", "false" or "never", as HF's early_stopping.</summary>
    public string EarlyStopping { get; init; } = "false";
    public int NumReturnSequences { get; init; } = 1;
    public bool DoSample { get; init; }
    public float Temperature { get; init; } = 1f;
    /// <summary>HF's default top_k is 50; 0 disables it.</summary>
    public int TopK { get; init; } = 50;
    public float TopP { get; init; } = 1f;
    public float RepetitionPenalty { get; init; } = 1f;
    public int NoRepeatNgramSize { get; init; }
    /// <summary>Makes sampling reproducible; null draws from a shared random source.</summary>
    public long? Seed { get; init; }

    public bool IsBeamSearch => NumBeams > 1;

    /// <summary>Throws <see cref="InvalidGenerationOptionException"/> for the first value out of range.</summary>
    public GenerationOptions Validate()
    {
        static void Require(bool ok, string option, string message)
        {
            if (!ok) throw new InvalidGenerationOptionException(option, message);
        }
        Require(MaxNewTokens >= 1, "max_new_tokens", $"must be at least 1 (got {MaxNewTokens})");
        Require(MinNewTokens >= 0, "min_new_tokens", $"must not be negative (got {MinNewTokens})");
        Require(MinNewTokens <= MaxNewTokens, "min_new_tokens", $"({MinNewTokens}) must not exceed max_new_tokens ({MaxNewTokens})");
        Require(NumBeams >= 1, "num_beams", $"must be at least 1 (got {NumBeams})");
        Require(float.IsFinite(LengthPenalty), "length_penalty", "must be a finite number");
        Require(EarlyStopping is "true" or "false" or "never", "early_stopping", $"must be true, false or never (got '{EarlyStopping}')");
        Require(NumReturnSequences >= 1 && NumReturnSequences <= NumBeams, "num_return_sequences",
            $"must be between 1 and num_beams ({NumBeams}) (got {NumReturnSequences})");
        Require(!(DoSample && IsBeamSearch), "do_sample", "sampling with num_beams > 1 (beam sampling) is not supported; use one or the other");
        Require(float.IsFinite(Temperature) && Temperature > 0, "temperature", $"must be a positive number (got {Temperature})");
        Require(TopK >= 0, "top_k", $"must not be negative (got {TopK})");
        Require(float.IsFinite(TopP) && TopP > 0 && TopP <= 1, "top_p", $"must be in (0, 1] (got {TopP})");
        Require(float.IsFinite(RepetitionPenalty) && RepetitionPenalty > 0, "repetition_penalty", $"must be a positive number (got {RepetitionPenalty})");
        Require(NoRepeatNgramSize >= 0, "no_repeat_ngram_size", $"must not be negative (got {NoRepeatNgramSize})");
        return this;
    }
}
