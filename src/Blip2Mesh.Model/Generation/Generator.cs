using Blip2Mesh.Model.Runtime;

namespace Blip2Mesh.Model.Generation;

/// <summary>
/// Runs requests' decoding states on the model's T5 stages. One decoder step advances the rows of any number
/// of requests together: rows with shorter histories get empty (masked) leading self-attention slots, and
/// shorter encoder outputs get masked padding, so each row computes what it would alone.
/// </summary>
public sealed class Generator(Blip2Model model)
{
    private sealed record CrossInputs(DecodingState[] States, FloatTensor[] Keys, FloatTensor[] Values, long[] EncoderMask);

    private volatile CrossInputs? _cross;

    public Blip2Model Model => model;

    /// <summary>Encodes [query_embeds ; prompt ids] once and prepares the request's decoding state.</summary>
    public DecodingState Start(FloatTensor queryEmbeds, IReadOnlyList<int> promptIds, GenerationOptions options)
    {
        options.Validate();
        if (promptIds.Count == 0) throw new ArgumentException("the prompt must hold at least the end-of-sequence token");
        return new DecodingState(model.Config, model.Encode(queryEmbeds, [promptIds]), options);
    }

    /// <summary>Advances one request by one decoder step; returns the tokens that became final.</summary>
    public IReadOnlyList<int> Step(DecodingState state) => Step([state])[0];

    /// <summary>Advances unfinished requests by one batched decoder step; returns each one's newly final tokens.</summary>
    public IReadOnlyList<IReadOnlyList<int>> Step(IReadOnlyList<DecodingState> states)
    {
        var slots = states.Max(s => s.Length) - 1;
        var sequence = states.Max(s => s.EncoderMask.Length / s.Rows);
        var inputIds = states.SelectMany(s => s.NextInputIds()).ToArray();
        var keyPositions = states.SelectMany(s => s.KeyPositions(slots)).ToArray();

        // The cross-attention inputs never change while the same requests step together: combine them once.
        var cross = _cross;
        if (cross is null || !cross.States.SequenceEqual(states))
        {
            FloatTensor[] Combine(Func<DecodingState, FloatTensor[]> pick) => Enumerable.Range(0, model.Config.Text.NumDecoderLayers)
                .Select(i => FloatTensor.Stack(states.Select(s => RowBatch.PadBack(pick(s)[i], sequence)).ToList())).ToArray();
            cross = new CrossInputs([.. states], Combine(s => s.CrossKeys), Combine(s => s.CrossValues),
                states.SelectMany(s => RowBatch.PadMask(s.EncoderMask, s.Rows, sequence)).ToArray());
            _cross = cross;
        }

        var (past, regrouped) = PastFor(states, slots);
        DecoderStepOutput step;
        try
        {
            step = model.DecodeStep(inputIds, keyPositions, past, cross.Keys, cross.Values, cross.EncoderMask);
        }
        finally
        {
            if (regrouped) past.Dispose();
        }

        var results = new List<IReadOnlyList<int>>(states.Count);
        var row = 0;
        // Held while it is handed out, so a request that finishes (and lets go) before the others cannot free it.
        step.Present.Hold();
        foreach (var state in states)
        {
            var rows = Enumerable.Range(row, state.Rows).ToArray();
            results.Add(state.Advance(step.Logits.Slice(row, state.Rows), new CacheRows(step.Present, rows)));
            row += state.Rows;
        }
        step.Present.Release();
        // A finished request leaves the batch: let its cross-attention inputs go rather than hold them while idle.
        if (states.Any(s => s.IsFinished)) _cross = null;
        return results;
    }

    /// <summary>
    /// The step's past cache: the cache the requests already share when they hold all of its rows in order (the
    /// usual case while a batch keeps its members), else a new one regrouped from theirs on the device.
    /// </summary>
    private (SelfAttentionCache Past, bool Regrouped) PastFor(IReadOnlyList<DecodingState> states, long slots)
    {
        var shared = states[0].Cache?.Cache;
        var order = states.SelectMany(s => s.Cache?.Rows ?? []).ToArray();
        if (shared is not null && shared.Slots == slots && shared.Rows == order.Length && states.All(s => s.Cache?.Cache == shared)
            && order.Select((r, i) => r == i).All(inOrder => inOrder))
            return (shared, false);

        var sources = states.Where(s => s.Cache is not null).Select(s => s.Cache!.Cache).Distinct().ToList();
        var firstRow = new Dictionary<SelfAttentionCache, int>();
        var total = 0;
        foreach (var source in sources)
        {
            firstRow[source] = total;
            total += source.Rows;
        }
        var rowOrder = new List<long>();
        var fresh = 0;
        foreach (var state in states)
        {
            if (state.Cache is { } held)
            {
                rowOrder.AddRange(held.Rows.Select(r => (long)firstRow[held.Cache] + r));
                continue;
            }
            if (state.Length != 1) throw new InvalidOperationException("a request past its first step has no cache");
            for (var r = 0; r < state.Rows; r++) rowOrder.Add(total + fresh++);
        }
        return (model.RegroupCache(sources, [.. rowOrder], fresh, slots), true);
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
    /// <summary>[R, H, S, d] → [R, H, length, d] with zeros after the real entries (masked out).</summary>
    public static FloatTensor PadBack(FloatTensor t, long length)
    {
        var (rows, heads, current, dim) = (t.Shape[0], t.Shape[1], t.Shape[2], t.Shape[3]);
        if (current == length) return t;
        var result = FloatTensor.Zeros(rows, heads, length, dim);
        for (long rh = 0; rh < rows * heads; rh++)
            Array.Copy(t.Data, rh * current * dim, result.Data, rh * length * dim, current * dim);
        return result;
    }

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
