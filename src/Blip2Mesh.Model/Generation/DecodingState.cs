using Blip2Mesh.Model.Checkpoint;
using Blip2Mesh.Model.Runtime;

namespace Blip2Mesh.Model.Generation;

/// <summary>
/// One finished sequence: ids as HF <c>generate</c> returns them (decoder start token first); with logprobs asked for,
/// one <see cref="TokenLogprob"/> per id after the start token.
/// </summary>
public sealed record GeneratedSequence(IReadOnlyList<int> Ids, string FinishReason, double? Score, IReadOnlyList<TokenLogprob>? Logprobs = null);

/// <summary>
/// The decoding state of one request: the rows it advances each step (one, or one per beam), their token ids,
/// which rows of a shared self-attention cache are theirs, and the encoder's cross-attention keys/values. A
/// scheduler asks it for the next step's inputs and hands back the step's logits; it never runs the model
/// itself, so requests can share steps. Disposing it lets go of its cache (a request that leaves unfinished).
/// </summary>
public sealed class DecodingState : IDisposable
{
    private readonly T5Config _text;
    private readonly GenerationOptions _options;
    private readonly Random _random;
    private readonly int _maxLength;
    private List<int>[] _rows;
    // Per row, the logprob of each of its tokens after the start token (only when asked for).
    private List<TokenLogprob>[]? _rowLogprobs;
    private float[] _beamScores;
    private readonly List<Hypothesis> _hypotheses = [];
    private readonly List<GeneratedSequence> _results = [];
    private int _emitted;

    private sealed record Hypothesis(double Score, List<int> Ids, bool EndedWithEos, List<TokenLogprob>? Logprobs);

    /// <param name="row">This request's row of <paramref name="encoder"/> (requests encoded in one run share its output).</param>
    public DecodingState(Blip2Config config, EncoderOutput encoder, GenerationOptions options, int row = 0)
    {
        if (row < 0 || row >= encoder.Batch) throw new ArgumentOutOfRangeException(nameof(row), $"the encoder output has {encoder.Batch} rows");
        _text = config.Text;
        _options = options.Validate();
        _random = options.Seed is { } seed ? new Random(unchecked((int)seed ^ (int)(seed >> 32))) : Random.Shared;
        _maxLength = 1 + options.MaxNewTokens;
        var rows = options.NumBeams;
        _rows = Enumerable.Range(0, rows).Select(_ => new List<int> { _text.DecoderStartTokenId }).ToArray();
        if (options.Logprobs) _rowLogprobs = Enumerable.Range(0, rows).Select(_ => new List<TokenLogprob>()).ToArray();
        // HF starts every beam but the first at -1e9 so the first step expands one beam only.
        _beamScores = Enumerable.Range(0, rows).Select(i => i == 0 ? 0f : -1e9f).ToArray();

        // Every beam reads the request's one encoder row.
        Cross = new CacheRows(encoder.Cross, Enumerable.Repeat(row, rows).ToArray());
        encoder.Cross.Hold();
        var sequence = encoder.AttentionMask.Length / encoder.Batch;
        var mask = encoder.AttentionMask.AsSpan(row * sequence, sequence).ToArray();
        EncoderMask = Enumerable.Repeat(mask, rows).SelectMany(m => m).ToArray();
    }

    public int Rows => _rows.Length;
    public int MaxNewTokens => _options.MaxNewTokens;

    /// <summary>
    /// Bytes of KV cache this request can grow to (self-attention to its full length, plus cross-attention),
    /// reserved when it is admitted to a batch.
    /// </summary>
    public long KvCacheBytes => KvCacheBytesFor(_text, _options, EncoderMask.Length / _options.NumBeams);

    /// <summary>
    /// What <see cref="KvCacheBytes"/> will be for a request with these options over an encoder sequence of
    /// <paramref name="encoderLength"/> (query tokens + prompt tokens): known before the encoder runs, so admission
    /// can refuse a request that never fits without spending any compute on it.
    /// </summary>
    public static long KvCacheBytesFor(T5Config text, GenerationOptions options, int encoderLength) =>
        (long)options.NumBeams * text.NumDecoderLayers * 2 * text.NumHeads * text.DKv * sizeof(float)
        * (1 + options.MaxNewTokens + encoderLength);
    public int Length => _rows[0].Count;
    public bool IsFinished { get; private set; }
    /// <summary>This request's rows of a shared self-attention cache, one per row in row order; none before its first step.</summary>
    public CacheRows? Cache { get; private set; }
    /// <summary>The encoder's cross-attention keys/values for each row, until the request finishes.</summary>
    public CacheRows? Cross { get; private set; }
    public long[] EncoderMask { get; }
    /// <summary>Per generated step, the raw logit of the token greedy/sampling chose (for parity checks).</summary>
    public List<float> ChosenTokenLogits { get; } = [];

    /// <summary>The finished sequences, best first (num_return_sequences of them); empty until finished.</summary>
    public IReadOnlyList<GeneratedSequence> Results => _results;

    /// <summary>The logprobs of the tokens the last <see cref="Advance"/> returned (empty unless asked for).</summary>
    public IReadOnlyList<TokenLogprob> StableLogprobs { get; private set; } = [];

    /// <summary>Last token of every row: the decoder input of the next step.</summary>
    public long[] NextInputIds() => _rows.Select(r => (long)r[^1]).ToArray();

    /// <summary>
    /// Self-attention slot positions for the next step, in a cache of <paramref name="slots"/> past slots: empty
    /// (−1) slots in front, then 0..Length−2 for the history, then Length−1 for the new token, for every row.
    /// </summary>
    public long[] KeyPositions(long slots)
    {
        var history = Length - 1;
        if (slots < history) throw new ArgumentException($"{slots} slots cannot hold a history of {history}");
        var width = slots + 1;
        var positions = new long[Rows * width];
        for (var r = 0; r < Rows; r++)
            for (var k = 0; k < width; k++) positions[r * width + k] = k < slots - history ? -1 : k - (slots - history);
        return positions;
    }

    /// <summary>
    /// Consumes one step's logits [Rows, V] and this request's rows of the grown cache, and returns the tokens
    /// that are now final (every token for greedy and sampling; for beam search the prefix no candidate can
    /// change any more).
    /// </summary>
    public IReadOnlyList<int> Advance(FloatTensor logits, CacheRows present)
    {
        if (IsFinished) throw new InvalidOperationException("the request has already finished");
        if (_options.IsBeamSearch) AdvanceBeams(logits, present);
        else AdvanceSingle(logits, present);
        if (IsFinished) Dispose();
        return TakeStableTokens();
    }

    /// <summary>Lets go of the request's caches (done on finishing; call it for a request that leaves unfinished).</summary>
    public void Dispose()
    {
        Hold(null);
        Cross?.Cache.Release();
        Cross = null;
    }

    private void Hold(CacheRows? next)
    {
        next?.Cache.Hold();
        Cache?.Cache.Release();
        Cache = next;
    }

    /// <summary>Reads its cross-attention inputs from <paramref name="rows"/> (a batch's combined copy) from now on.</summary>
    internal void MoveCross(CacheRows rows)
    {
        rows.Cache.Hold();
        Cross?.Cache.Release();
        Cross = rows;
    }

    private void AdvanceSingle(FloatTensor logits, CacheRows present)
    {
        var ids = _rows[0];
        var scores = logits.Row(0).ToArray();
        var raw = logits.Row(0);
        LogitsProcessors.Process(scores, ids, _options, _text.EosTokenId);
        // Logprobs are of the processed distribution, before sampling's warping changes the scores in place.
        var logprobs = _rowLogprobs is null ? null : (float[])scores.Clone();
        int next;
        if (_options.DoSample)
        {
            LogitsProcessors.Warp(scores, _options);
            next = Sample(LogitsProcessors.Softmax(scores));
        }
        else
        {
            next = LogitsProcessors.ArgMax(scores);
        }
        ChosenTokenLogits.Add(raw[next]);
        if (logprobs is not null)
        {
            LogitsProcessors.LogSoftmax(logprobs);
            _rowLogprobs![0].Add(Logprob(logprobs, next));
        }
        ids.Add(next);
        Hold(present);
        if (next == _text.EosTokenId || ids.Count >= _maxLength)
        {
            _results.Add(new GeneratedSequence(ids, next == _text.EosTokenId ? "eos" : "length", null, _rowLogprobs?[0]));
            IsFinished = true;
        }
    }

    private TokenLogprob Logprob(ReadOnlySpan<float> logprobs, int token) =>
        new(token, logprobs[token], LogitsProcessors.TopAlternatives(logprobs, _options.TopLogprobs));

    private int Sample(double[] probabilities)
    {
        var u = _random.NextDouble();
        double cumulative = 0;
        var last = 0;
        for (var i = 0; i < probabilities.Length; i++)
        {
            if (probabilities[i] <= 0) continue;
            last = i;
            cumulative += probabilities[i];
            if (u < cumulative) return i;
        }
        return last;
    }

    /// <summary>One step of HF's beam_search with BeamSearchScorer.process and BeamHypotheses (transformers 4.33).</summary>
    private void AdvanceBeams(FloatTensor logits, CacheRows present)
    {
        var beams = _options.NumBeams;
        var vocab = (int)logits.Shape[1];
        var curLen = Length;
        var candidates = new float[beams * vocab];
        // Each row's processed log-probabilities before its beam score is added (only when logprobs are asked for).
        var tokenLogprobs = _rowLogprobs is null ? null : new float[beams * vocab];
        for (var b = 0; b < beams; b++)
        {
            var row = candidates.AsSpan(b * vocab, vocab);
            logits.Row(b).CopyTo(row);
            LogitsProcessors.LogSoftmax(row);
            LogitsProcessors.Process(row, _rows[b], _options, _text.EosTokenId);
            if (tokenLogprobs is not null) row.CopyTo(tokenLogprobs.AsSpan(b * vocab, vocab));
            for (var v = 0; v < vocab; v++) row[v] += _beamScores[b];
        }
        // A source row's logprobs continued by one token.
        List<TokenLogprob>? Extended(int source, int token) => tokenLogprobs is null ? null
            : [.. _rowLogprobs![source], Logprob(tokenLogprobs.AsSpan(source * vocab, vocab), token)];
        var top = TopK(candidates, 2 * beams);

        var nextRows = new List<int>[beams];
        var nextLogprobs = new List<TokenLogprob>[beams];
        var nextScores = new float[beams];
        var sources = new int[beams];
        var filled = 0;
        for (var rank = 0; rank < top.Length && filled < beams; rank++)
        {
            var (index, score) = top[rank];
            var token = index % vocab;
            var source = index / vocab;
            if (token == _text.EosTokenId)
            {
                // An end-of-sequence outside the top num_beams candidates is not a hypothesis.
                if (rank >= beams) continue;
                AddHypothesis(new List<int>(_rows[source]), score, endedWithEos: true, Extended(source, token));
            }
            else
            {
                nextRows[filled] = [.. _rows[source], token];
                nextScores[filled] = score;
                nextLogprobs[filled] = Extended(source, token)!;
                sources[filled] = source;
                filled++;
            }
        }
        // transformers 4.33 judges "done" at the length the new scores were computed for: input length + 1.
        var done = IsDone(top[0].Score, curLen + 1);

        _rows = nextRows;
        _beamScores = nextScores;
        if (_rowLogprobs is not null) _rowLogprobs = nextLogprobs;
        // Each beam continues the history of the row it was chosen from.
        Hold(present with { Rows = sources.Select(b => present.Rows[b]).ToArray() });

        if (done || Length >= _maxLength) Finalize(done);
    }

    private void AddHypothesis(List<int> ids, double sumLogProbs, bool endedWithEos, List<TokenLogprob>? logprobs)
    {
        var score = sumLogProbs / Math.Pow(ids.Count, _options.LengthPenalty);
        if (_hypotheses.Count < _options.NumBeams || score > WorstScore())
        {
            _hypotheses.Add(new Hypothesis(score, ids, endedWithEos, logprobs));
            if (_hypotheses.Count > _options.NumBeams) _hypotheses.RemoveAt(IndexOfWorst());
        }
    }

    private double WorstScore() => _hypotheses.Count == 0 ? 1e9 : _hypotheses.Min(h => h.Score);

    private int IndexOfWorst()
    {
        var worst = 0;
        for (var i = 1; i < _hypotheses.Count; i++)
            if (_hypotheses[i].Score < _hypotheses[worst].Score) worst = i;
        return worst;
    }

    private bool IsDone(double bestSumLogProbs, int curLen)
    {
        if (_hypotheses.Count < _options.NumBeams) return false;
        if (_options.EarlyStopping == "true") return true;
        var length = _options.EarlyStopping == "never" && _options.LengthPenalty > 0 ? _maxLength : curLen;
        return WorstScore() >= bestSumLogProbs / Math.Pow(length, _options.LengthPenalty);
    }

    private void Finalize(bool done)
    {
        // Open beams compete with the finished hypotheses unless the search already knew it was done.
        if (!done)
            for (var b = 0; b < _rows.Length; b++) AddHypothesis(_rows[b], _beamScores[b], endedWithEos: false, _rowLogprobs?[b]);
        // Best first; among equal scores the later-added wins, as Python's stable sort + pop() picks it.
        var ranked = _hypotheses.Select((h, i) => (h, i)).OrderByDescending(x => x.h.Score).ThenByDescending(x => x.i).Select(x => x.h);
        foreach (var h in ranked.Take(_options.NumReturnSequences))
        {
            var ids = h.EndedWithEos ? [.. h.Ids, _text.EosTokenId] : h.Ids;
            _results.Add(new GeneratedSequence(ids, h.EndedWithEos ? "eos" : "length", h.Score, h.Logprobs));
        }
        IsFinished = true;
    }

    /// <summary>Tokens (after the start token) that no longer depend on how the search continues.</summary>
    private List<int> TakeStableTokens()
    {
        IReadOnlyList<int> settled = IsFinished ? _results[0].Ids : CommonPrefix();
        var fresh = settled.Skip(1 + _emitted).ToList();
        // A settled prefix is row 0's prefix too, and a token's logprob depends only on the tokens before it.
        var logprobs = IsFinished ? _results[0].Logprobs : _rowLogprobs?[0];
        StableLogprobs = logprobs is null ? [] : logprobs.Skip(_emitted).Take(fresh.Count).ToList();
        _emitted += fresh.Count;
        return fresh;
    }

    private List<int> CommonPrefix()
    {
        var candidates = _rows.Concat(_hypotheses.Select(h => h.Ids)).ToList();
        var prefix = new List<int>();
        for (var t = 0; t < candidates.Min(c => c.Count); t++)
        {
            var token = candidates[0][t];
            if (candidates.Any(c => c[t] != token)) break;
            prefix.Add(token);
        }
        return prefix;
    }

    private static (int Index, float Score)[] TopK(float[] scores, int k)
    {
        // Highest first; equal scores keep the lower index first, as torch.topk does on CPU.
        return scores.Select((s, i) => (Index: i, Score: s))
            .OrderByDescending(x => x.Score).ThenBy(x => x.Index).Take(k).ToArray();
    }
}

/// <summary>Which rows of a shared self-attention cache belong to one request, in the request's row order.</summary>
public sealed record CacheRows(KeyValueCache Cache, int[] Rows);
