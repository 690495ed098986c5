using Blip2Mesh.Model.Generation;
using Grpc.Core;
using ProtoOptions = Blip2Mesh.Contracts.V1.GenerationOptions;

namespace Blip2Mesh.ServiceDefaults;

/// <summary>Service-side limits on what one request may ask for.</summary>
public sealed record GenerationLimits
{
    public int MaxNewTokens { get; init; } = 512;
    public int MaxBeams { get; init; } = 8;
    public int MaxPromptTokens { get; init; } = 256;
}

/// <summary>Public API options → generation options, with every bad value an INVALID_ARGUMENT naming the option.</summary>
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
        };
        try
        {
            options.Validate();
        }
        catch (InvalidGenerationOptionException e)
        {
            throw new RpcException(new Status(StatusCode.InvalidArgument, e.Message));
        }
        if (options.MaxNewTokens > limits.MaxNewTokens)
            throw new RpcException(new Status(StatusCode.InvalidArgument, $"max_new_tokens: must be at most {limits.MaxNewTokens} (got {options.MaxNewTokens})"));
        if (options.NumBeams > limits.MaxBeams)
            throw new RpcException(new Status(StatusCode.InvalidArgument, $"num_beams: must be at most {limits.MaxBeams} (got {options.NumBeams})"));
        return options;
    }
}
