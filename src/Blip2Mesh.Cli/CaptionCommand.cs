using Blip2Mesh.Client;
using ProtoOptions = Blip2Mesh.Contracts.V1.GenerationOptions;

namespace Blip2Mesh.Cli;

/// <summary><c>blip2mesh caption IMAGE</c>: asks a running gateway and streams the answer to the terminal.</summary>
internal static class CaptionCommand
{
    public static int Run(string[] argv)
    {
        var args = new Args(argv, ModelInputs.Flags);
        if (args.Positionals.Count != 1) throw new UsageException("caption needs one IMAGE file");
        var image = File.ReadAllBytes(args.Positionals[0]);
        var address = args.Optional("addr") ?? "127.0.0.1:50051";
        var prompt = args.Optional("prompt") ?? "";
        var apiKey = args.Optional("api-key") ?? Environment.GetEnvironmentVariable("BLIP2MESH_API_KEY");
        var options = ToProto(ModelInputs.FromFlags(args).Validate());
        args.EnsureAllUsed();

        using var client = new Blip2Client(address, apiKey);
        try
        {
            var stream = client.GenerateAsync(image, prompt, options).GetAsyncEnumerator();
            while (stream.MoveNextAsync().AsTask().GetAwaiter().GetResult())
            {
                Console.Out.Write(stream.Current.Text);
                Console.Out.Flush();
            }
            Console.Out.WriteLine();
            return 0;
        }
        catch (Grpc.Core.RpcException e)
        {
            Console.Error.WriteLine($"blip2mesh: {e.StatusCode}: {e.Status.Detail}");
            return 1;
        }
    }

    private static ProtoOptions ToProto(Model.Generation.GenerationOptions o)
    {
        var proto = new ProtoOptions
        {
            MaxNewTokens = o.MaxNewTokens, MinNewTokens = o.MinNewTokens, NumBeams = o.NumBeams, DoSample = o.DoSample,
            Temperature = o.Temperature, TopK = o.TopK, TopP = o.TopP, RepetitionPenalty = o.RepetitionPenalty,
            LengthPenalty = o.LengthPenalty, NoRepeatNgramSize = o.NoRepeatNgramSize,
        };
        if (o.Seed is { } seed) proto.Seed = seed;
        return proto;
    }
}
