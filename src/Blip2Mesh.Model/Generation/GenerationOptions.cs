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
    /// <summary>Answers returned: the best n beams (at most num_beams), or n independent samples.</summary>
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
    /// <summary>Report each chosen token's log-probability (see <see cref="TokenLogprob"/>).</summary>
    public bool Logprobs { get; init; }
    /// <summary>With <see cref="Logprobs"/>: also the this many most likely tokens at each step.</summary>
    public int TopLogprobs { get; init; }

    /// <summary>Most alternatives reported per token (as OpenAI's top_logprobs).</summary>
    public const int MaxTopLogprobs = 20;

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
        Require(NumReturnSequences >= 1, "num_return_sequences", $"must be at least 1 (got {NumReturnSequences})");
        // Several answers come from several beams or several samples; greedy decoding has only one.
        Require(DoSample || NumReturnSequences <= NumBeams, "num_return_sequences",
            $"must be at most num_beams ({NumBeams}) without sampling (got {NumReturnSequences}): use beams or do_sample for several answers");
        Require(!(DoSample && IsBeamSearch), "do_sample", "sampling with num_beams > 1 (beam sampling) is not supported; use one or the other");
        Require(float.IsFinite(Temperature) && Temperature > 0, "temperature", $"must be a positive number (got {Temperature})");
        Require(TopK >= 0, "top_k", $"must not be negative (got {TopK})");
        Require(float.IsFinite(TopP) && TopP > 0 && TopP <= 1, "top_p", $"must be in (0, 1] (got {TopP})");
        Require(float.IsFinite(RepetitionPenalty) && RepetitionPenalty > 0, "repetition_penalty", $"must be a positive number (got {RepetitionPenalty})");
        Require(NoRepeatNgramSize >= 0, "no_repeat_ngram_size", $"must not be negative (got {NoRepeatNgramSize})");
        Require(TopLogprobs >= 0 && TopLogprobs <= MaxTopLogprobs, "top_logprobs", $"must be between 0 and {MaxTopLogprobs} (got {TopLogprobs})");
        Require(TopLogprobs == 0 || Logprobs, "top_logprobs", "needs logprobs to be on");
        return this;
    }
}

/// <summary>A token that might have been chosen at a step, with its log-probability.</summary>
public readonly record struct TokenAlternative(int TokenId, float Logprob);

/// <summary>
/// A chosen token's log-probability under the distribution the decoder chose it from: log-softmax of the logits after
/// the logits processors (repetition penalty, no-repeat n-grams, min tokens), before temperature, top-k and top-p; for
/// beam search the step's increment of the beam score (so a sequence's logprobs sum to its beam's log-probability).
/// <paramref name="Top"/>: the most likely tokens at that step, best first (empty unless asked for).
/// </summary>
public sealed record TokenLogprob(int TokenId, float Logprob, IReadOnlyList<TokenAlternative> Top);
