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
        var layers = model.Config.Text.NumDecoderLayers;
        var keys = states.Max(s => s.Length);
        var sequence = states.Max(s => s.EncoderMask.Length / s.Rows);

        var inputIds = states.SelectMany(s => s.NextInputIds()).ToArray();
        var keyPositions = states.SelectMany(s => RowBatch.PadPositions(s.KeyPositions(), s.Rows, keys)).ToArray();
        FloatTensor[] Combine(Func<DecodingState, FloatTensor[]> pick, Func<FloatTensor, FloatTensor> pad) =>
            Enumerable.Range(0, layers).Select(i => FloatTensor.Stack(states.Select(s => pad(pick(s)[i])).ToList())).ToArray();

        // The cross-attention inputs never change while the same requests step together: combine them once.
        var cross = _cross;
        if (cross is null || !cross.States.SequenceEqual(states))
        {
            cross = new CrossInputs([.. states],
                Combine(s => s.CrossKeys, t => RowBatch.PadBack(t, sequence)), Combine(s => s.CrossValues, t => RowBatch.PadBack(t, sequence)),
                states.SelectMany(s => RowBatch.PadMask(s.EncoderMask, s.Rows, sequence)).ToArray());
            _cross = cross;
        }

        var step = model.DecodeStep(inputIds, keyPositions,
            Combine(s => s.PastKeys, t => RowBatch.PadFront(t, keys - 1)), Combine(s => s.PastValues, t => RowBatch.PadFront(t, keys - 1)),
            cross.Keys, cross.Values, cross.EncoderMask);

        var results = new List<IReadOnlyList<int>>(states.Count);
        var row = 0;
        foreach (var state in states)
        {
            var rows = state.Rows;
            var slots = state.Length;
            var logits = step.Logits.Slice(row, rows);
            var presentKeys = step.PresentKeys.Select(t => RowBatch.StripFront(t.Slice(row, rows), slots)).ToArray();
            var presentValues = step.PresentValues.Select(t => RowBatch.StripFront(t.Slice(row, rows), slots)).ToArray();
            results.Add(state.Advance(logits, presentKeys, presentValues));
            row += rows;
        }
        // A finished request leaves the batch: let its cross-attention inputs go rather than hold them while idle.
        if (states.Any(s => s.IsFinished)) _cross = null;
        return results;
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
    /// <summary>[R, H, L, d] → [R, H, length, d] with L − length empty slots in front (their positions are −1).</summary>
    public static FloatTensor PadFront(FloatTensor t, long length) => Pad(t, length, front: true);

    /// <summary>[R, H, S, d] → [R, H, length, d] with zeros after the real entries (masked out).</summary>
    public static FloatTensor PadBack(FloatTensor t, long length) => Pad(t, length, front: false);

    private static FloatTensor Pad(FloatTensor t, long length, bool front)
    {
        var (rows, heads, current, dim) = (t.Shape[0], t.Shape[1], t.Shape[2], t.Shape[3]);
        if (current == length) return t;
        var result = FloatTensor.Zeros(rows, heads, length, dim);
        var offset = front ? length - current : 0;
        for (long rh = 0; rh < rows * heads; rh++)
            Array.Copy(t.Data, rh * current * dim, result.Data, (rh * length + offset) * dim, current * dim);
        return result;
    }

    /// <summary>Drops the empty leading slots a padded row got: [R, H, K, d] → [R, H, slots, d].</summary>
    public static FloatTensor StripFront(FloatTensor t, long slots)
    {
        var (rows, heads, current, dim) = (t.Shape[0], t.Shape[1], t.Shape[2], t.Shape[3]);
        if (current == slots) return t;
        var result = FloatTensor.Zeros(rows, heads, slots, dim);
        for (long rh = 0; rh < rows * heads; rh++)
            Array.Copy(t.Data, (rh * current + current - slots) * dim, result.Data, rh * slots * dim, slots * dim);
        return result;
    }

    public static IEnumerable<long> PadPositions(long[] positions, int rows, int keys)
    {
        var length = positions.Length / rows;
        for (var r = 0; r < rows; r++)
        {
            for (var k = length; k < keys; k++) yield return -1;
            for (var k = 0; k < length; k++) yield return positions[r * length + k];
        }
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
