using Blip2Mesh.Model.Runtime;

namespace Blip2Mesh.Model.Generation;

/// <summary>Runs requests' decoding states on the model's T5 stages, one decoder step at a time.</summary>
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

    /// <summary>Advances the request by one decoder step; returns the tokens that became final.</summary>
    public IReadOnlyList<int> Step(DecodingState state)
    {
        var step = model.DecodeStep(state.NextInputIds(), state.KeyPositions(), state.PastKeys, state.PastValues,
            state.CrossKeys, state.CrossValues, state.EncoderMask);
        return state.Advance(step.Logits, step.PresentKeys, step.PresentValues);
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
}
