using Blip2Mesh.Model.Runtime;

namespace Blip2Mesh.Model.Generation;

/// <summary>
/// Runs requests' decoding states on the model's T5 stages. One decoder step advances the rows of any number
/// of requests together: rows with shorter histories get empty (masked) leading self-attention slots, and
/// shorter encoder outputs get masked padding, so each row computes what it would alone.
/// </summary>
public sealed class Generator(Blip2Model model)
{
    public Blip2Model Model => model;

    /// <summary>Encodes [query_embeds ; prompt ids] once and prepares the request's decoding state.</summary>
    public DecodingState Start(FloatTensor queryEmbeds, IReadOnlyList<int> promptIds, GenerationOptions options)
    {
        options.Validate();
        if (promptIds.Count == 0) throw new ArgumentException("the prompt must hold at least the end-of-sequence token");
        return new DecodingState(model.Config, model.Encode(queryEmbeds, [promptIds]), options);
    }

    /// <summary>
    /// Encodes several requests in one T5 encoder run (prompts padded, each row masked to its own tokens) and prepares
    /// each one's decoding states: one state (greedy, or beam search returning its best num_return_sequences beams),
    /// or one per sample when sampling asks for several answers (sample i draws with seed + i, so the first of n
    /// samples is the one a single sample with the same seed gives). The same states, step for step, as each request
    /// encoded alone gives.
    /// </summary>
    public IReadOnlyList<IReadOnlyList<DecodingState>> StartBatch(IReadOnlyList<(FloatTensor QueryEmbeds, IReadOnlyList<int> PromptIds, GenerationOptions Options)> requests)
    {
        foreach (var request in requests)
        {
            request.Options.Validate();
            if (request.PromptIds.Count == 0) throw new ArgumentException("the prompt must hold at least the end-of-sequence token");
        }
        var encoded = model.Encode(FloatTensor.Stack(requests.Select(r => r.QueryEmbeds).ToList()), requests.Select(r => r.PromptIds).ToList());
        return requests.Select((r, row) => StatesOf(encoded, row, r.Options)).ToList();
    }

    /// <summary>The decoding states of one request, from one encoder run (see <see cref="StartBatch"/>).</summary>
    public IReadOnlyList<DecodingState> StartRequest(FloatTensor queryEmbeds, IReadOnlyList<int> promptIds, GenerationOptions options) =>
        StartBatch([(queryEmbeds, promptIds, options)])[0];

    private IReadOnlyList<DecodingState> StatesOf(EncoderOutput encoded, int row, GenerationOptions options) =>
        !options.DoSample || options.NumReturnSequences == 1
            ? [new DecodingState(model.Config, encoded, options, row)]
            : Enumerable.Range(0, options.NumReturnSequences)
                .Select(i => new DecodingState(model.Config, encoded, options with { NumReturnSequences = 1, Seed = options.Seed + i }, row))
                .ToList();

    /// <summary>Advances one request by one decoder step; returns the tokens that became final.</summary>
    public IReadOnlyList<int> Step(DecodingState state) => Step([state])[0];

    /// <summary>Advances unfinished requests by one batched decoder step; returns each one's newly final tokens.</summary>
    public IReadOnlyList<IReadOnlyList<int>> Step(IReadOnlyList<DecodingState> states)
    {
        var slots = states.Max(s => s.Length) - 1;
        var sequence = states.Max(s => s.EncoderMask.Length / s.Rows);
        var inputIds = states.SelectMany(s => s.NextInputIds()).ToArray();
        var keyPositions = states.SelectMany(s => s.KeyPositions(slots)).ToArray();
        var encoderMask = states.SelectMany(s => RowBatch.PadMask(s.EncoderMask, s.Rows, sequence)).ToArray();

        // The cross-attention inputs never change while the same requests step together: when the batch changes,
        // the requests move to one regrouped copy and share it from then on.
        var (cross, crossRegrouped) = Combine(states.Select(s => s.Cross).ToList(), states, sequence, SlotPadding.Back);
        if (crossRegrouped) HandOut(states, cross, (state, rows) => state.MoveCross(rows));

        var (past, pastRegrouped) = Combine(states.Select(s => s.Cache).ToList(), states, slots, SlotPadding.Front);
        DecoderStepOutput step;
        try
        {
            step = model.DecodeStep(inputIds, keyPositions, past, cross, encoderMask);
        }
        finally
        {
            if (pastRegrouped) past.Dispose();
        }

        var logits = step.Logits;
        var results = new List<IReadOnlyList<int>>(states.Count);
        HandOut(states, step.Present, (state, rows) => results.Add(state.Advance(logits.Slice(rows.Rows[0], state.Rows), rows)));
        return results;
    }

    /// <summary>Gives each request its rows of a batch cache (the batch's rows are the requests' rows in order).</summary>
    private static void HandOut(IReadOnlyList<DecodingState> states, KeyValueCache cache, Action<DecodingState, CacheRows> give)
    {
        // Held while it is handed out, so a request that finishes (and lets go) before the others cannot free it.
        cache.Hold();
        var row = 0;
        foreach (var state in states)
        {
            give(state, new CacheRows(cache, Enumerable.Range(row, state.Rows).ToArray()));
            row += state.Rows;
        }
        cache.Release();
    }

    /// <summary>
    /// One cache with the requests' rows in step order and <paramref name="slots"/> slots: the cache they already
    /// share when they hold all of its rows in order (the usual case while a batch keeps its members), else a new
    /// one regrouped from theirs (Regrouped: the caller owns it). A request without rows yet gets empty ones.
    /// </summary>
    private (KeyValueCache Cache, bool Regrouped) Combine(IReadOnlyList<CacheRows?> held, IReadOnlyList<DecodingState> states, long slots, SlotPadding padding)
    {
        var shared = held[0]?.Cache;
        var order = held.SelectMany(h => h?.Rows ?? []).ToArray();
        if (shared is not null && shared.Slots == slots && shared.Rows == order.Length && held.All(h => h?.Cache == shared)
            && order.Select((r, i) => r == i).All(inOrder => inOrder))
            return (shared, false);

        var sources = held.OfType<CacheRows>().Select(h => h.Cache).Distinct().ToList();
        var firstRow = new Dictionary<KeyValueCache, int>();
        var total = 0;
        foreach (var source in sources)
        {
            firstRow[source] = total;
            total += source.Rows;
        }
        var rowOrder = new List<long>();
        var fresh = 0;
        for (var k = 0; k < states.Count; k++)
        {
            if (held[k] is { } rows)
            {
                rowOrder.AddRange(rows.Rows.Select(r => (long)firstRow[rows.Cache] + r));
                continue;
            }
            if (states[k].Length != 1) throw new InvalidOperationException("a request past its first step has no cache");
            for (var r = 0; r < states[k].Rows; r++) rowOrder.Add(total + fresh++);
        }
        return (model.RegroupCache(sources, [.. rowOrder], fresh, slots, padding), true);
    }

    /// <summary>Steps until the request finishes, yielding each step's final tokens as soon as they are known.</summary>
    public IEnumerable<IReadOnlyList<int>> Run(DecodingState state, CancellationToken cancellation = default)
    {
        while (!state.IsFinished)
        {
            cancellation.ThrowIfCancellationRequested();
            var tokens = Step(state);
            if (tokens.Count > 0) yield return tokens;
        }
    }

    /// <summary>Steps several requests together until all finish, yielding (request index, final tokens).</summary>
    public IEnumerable<(int Request, IReadOnlyList<int> Tokens)> RunBatch(IReadOnlyList<DecodingState> states, CancellationToken cancellation = default)
    {
        while (true)
        {
            var active = Enumerable.Range(0, states.Count).Where(i => !states[i].IsFinished).ToList();
            if (active.Count == 0) yield break;
            cancellation.ThrowIfCancellationRequested();
            var tokens = Step(active.Select(i => states[i]).ToList());
            for (var k = 0; k < active.Count; k++)
                if (tokens[k].Count > 0) yield return (active[k], tokens[k]);
        }
    }
}

/// <summary>Padding that lets rows of different requests share one decoder step.</summary>
internal static class RowBatch
{
    public static IEnumerable<long> PadMask(long[] mask, int rows, int sequence)
    {
        var length = mask.Length / rows;
        for (var r = 0; r < rows; r++)
        {
            for (var s = 0; s < length; s++) yield return mask[r * length + s];
            for (var s = length; s < sequence; s++) yield return 0;
        }
    }
}
