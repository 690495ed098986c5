namespace Blip2Mesh.Model.Generation;

/// <summary>
/// HF's logits processors and warpers, applied in the order <c>generate</c> applies them, to one row of
/// scores given that row's decoder ids so far (starting with the decoder start token).
/// </summary>
internal static class LogitsProcessors
{
    /// <summary>Processors that every strategy applies (repetition penalty, n-gram ban, minimum length).</summary>
    public static void Process(Span<float> scores, IReadOnlyList<int> ids, GenerationOptions options, int eosTokenId)
    {
        if (options.RepetitionPenalty != 1f)
        {
            // Each distinct token seen is penalised once (torch gathers then scatters the same value).
            foreach (var id in ids.Distinct())
            {
                var s = scores[id];
                scores[id] = s < 0 ? s * options.RepetitionPenalty : s / options.RepetitionPenalty;
            }
        }
        if (options.NoRepeatNgramSize > 0)
        {
            foreach (var banned in BannedNgramTokens(ids, options.NoRepeatNgramSize)) scores[banned] = float.NegativeInfinity;
        }
        // MinNewTokensLengthLogitsProcessor: the start token is the "prompt" of the decoder.
        if (ids.Count - 1 < options.MinNewTokens) scores[eosTokenId] = float.NegativeInfinity;
    }

    private static IEnumerable<int> BannedNgramTokens(IReadOnlyList<int> ids, int n)
    {
        if (ids.Count + 1 < n) yield break;
        // Tokens that followed an earlier occurrence of the last n−1 tokens.
        var start = ids.Count - n + 1;
        for (var i = 0; i + n <= ids.Count; i++)
        {
            var match = true;
            for (var j = 0; j < n - 1 && match; j++) match = ids[i + j] == ids[start + j];
            if (match) yield return ids[i + n - 1];
        }
    }

    /// <summary>Sampling warpers: temperature, then top-k, then top-p (min_tokens_to_keep 1).</summary>
    public static void Warp(Span<float> scores, GenerationOptions options)
    {
        if (options.Temperature != 1f)
            for (var i = 0; i < scores.Length; i++) scores[i] /= options.Temperature;

        if (options.TopK > 0)
        {
            var k = Math.Min(options.TopK, scores.Length);
            var kth = KthLargest(scores, k);
            for (var i = 0; i < scores.Length; i++)
                if (scores[i] < kth) scores[i] = float.NegativeInfinity;
        }

        if (options.TopP < 1f)
        {
            // Ascending sort; drop the low tail whose cumulative probability is <= 1 − top_p, keeping the top token.
            var order = Enumerable.Range(0, scores.Length).ToArray();
            var sorted = scores.ToArray();
            Array.Sort(sorted, order);
            var probabilities = Softmax(sorted);
            double cumulative = 0;
            for (var r = 0; r < order.Length - 1; r++)
            {
                cumulative += probabilities[r];
                if (cumulative <= 1 - options.TopP) scores[order[r]] = float.NegativeInfinity;
            }
        }
    }

    private static float KthLargest(ReadOnlySpan<float> scores, int k)
    {
        var sorted = scores.ToArray();
        Array.Sort(sorted);
        return sorted[^k];
    }

    /// <summary>Softmax computed in double for stability; returns probabilities.</summary>
    public static double[] Softmax(ReadOnlySpan<float> scores)
    {
        var max = float.NegativeInfinity;
        foreach (var s in scores) max = Math.Max(max, s);
        var result = new double[scores.Length];
        double sum = 0;
        for (var i = 0; i < scores.Length; i++)
        {
            result[i] = float.IsNegativeInfinity(scores[i]) ? 0 : Math.Exp(scores[i] - max);
            sum += result[i];
        }
        for (var i = 0; i < result.Length; i++) result[i] /= sum;
        return result;
    }

    /// <summary>log_softmax in float32 output, accumulated in double.</summary>
    public static void LogSoftmax(Span<float> scores)
    {
        var max = float.NegativeInfinity;
        foreach (var s in scores) max = Math.Max(max, s);
        double sum = 0;
        foreach (var s in scores) sum += Math.Exp(s - max);
        var logSum = (float)(max + Math.Log(sum));
        for (var i = 0; i < scores.Length; i++) scores[i] -= logSum;
    }

    public static int ArgMax(ReadOnlySpan<float> scores)
    {
        var best = 0;
        for (var i = 1; i < scores.Length; i++)
            if (scores[i] > scores[best]) best = i;
        return best;
    }

    /// <summary>The <paramref name="k"/> highest of <paramref name="logprobs"/>, best first; equal values keep the lower id first.</summary>
    public static TokenAlternative[] TopAlternatives(ReadOnlySpan<float> logprobs, int k)
    {
        if (k == 0) return [];
        var top = new List<TokenAlternative>(k + 1);
        for (var i = 0; i < logprobs.Length; i++)
        {
            var value = logprobs[i];
            if (float.IsNegativeInfinity(value) || (top.Count == k && value <= top[^1].Logprob)) continue;
            var at = top.Count;
            while (at > 0 && top[at - 1].Logprob < value) at--;
            top.Insert(at, new TokenAlternative(i, value));
            if (top.Count > k) top.RemoveAt(k);
        }
        return [.. top];
    }
}
