using Blip2Mesh.Client;
using Grpc.Core;
using ProtoOptions = Blip2Mesh.Contracts.V1.GenerationOptions;

namespace Blip2Mesh.Cli;

/// <summary><c>blip2mesh caption IMAGE</c>: asks a running gateway and streams the answer to the terminal.</summary>
internal static class CaptionCommand
{
    public static int Run(string[] argv)
    {
        var args = new Args(argv, ModelInputs.Flags);
        if (args.Positionals.Count != 1) throw new UsageException("caption needs one IMAGE file");
        var image = ModelInputs.ReadImageFile(args.Positionals[0]);
        var address = args.Optional("addr") ?? "127.0.0.1:50051";
        var prompt = args.Optional("prompt") ?? "";
        var apiKey = args.Optional("api-key") ?? Environment.GetEnvironmentVariable("BLIP2MESH_API_KEY");
        var options = ToProto(ModelInputs.FromFlags(args).Validate());
        if (args.Optional("stop") is { } stop) options.Stop.Add(stop);
        args.EnsureAllUsed();
        // One answer streams as it comes; several (their messages interleave) print one per line once complete.
        var answers = new SortedDictionary<int, string>();

        using var client = new Blip2Client(address, apiKey);
        var answered = false;
        try
        {
            var stream = client.GenerateAsync(image, prompt, options).GetAsyncEnumerator();
            while (stream.MoveNextAsync().AsTask().GetAwaiter().GetResult())
            {
                answered = true;
                var r = stream.Current;
                if (options.NumReturnSequences > 1)
                {
                    answers[r.Index] = answers.GetValueOrDefault(r.Index, "") + r.Text;
                    continue;
                }
                Console.Out.Write(r.Text);
                Console.Out.Flush();
            }
            if (options.NumReturnSequences > 1)
                foreach (var (index, text) in answers) Console.Out.WriteLine($"[{index}] {text}");
            else Console.Out.WriteLine();
            return 0;
        }
        catch (RpcException e)
        {
            if (answered) Console.Out.WriteLine();
            Console.Error.WriteLine($"blip2mesh: {Describe(e, address, answered)}");
            return 1;
        }
    }

    /// <summary>The failure in words for the person at the terminal: who could not be reached, and what to do.</summary>
    private static string Describe(RpcException e, string address, bool answered) => e switch
    {
        // The client's own failure (DebugException set): no connection, or one that broke; not a status the gateway sent.
        { StatusCode: StatusCode.Unavailable, Status.DebugException: not null } when !answered =>
            $"cannot connect to a gateway at {address}: start the mesh with `./blip2mesh up --model DIR` (or `make up`), or give a running gateway's address with --addr HOST:PORT",
        { StatusCode: StatusCode.Unavailable, Status.DebugException: not null } =>
            $"the connection to the gateway at {address} broke while the answer was streaming; the answer above is incomplete",
        { StatusCode: StatusCode.Unauthenticated } =>
            $"{e.StatusCode}: {e.Status.Detail} (give the key with --api-key KEY or BLIP2MESH_API_KEY)",
        _ => $"{e.StatusCode}: {e.Status.Detail}",
    };

    private static ProtoOptions ToProto(Model.Generation.GenerationOptions o)
    {
        var proto = new ProtoOptions
        {
            MaxNewTokens = o.MaxNewTokens, MinNewTokens = o.MinNewTokens, NumBeams = o.NumBeams, DoSample = o.DoSample,
            Temperature = o.Temperature, TopK = o.TopK, TopP = o.TopP, RepetitionPenalty = o.RepetitionPenalty,
            LengthPenalty = o.LengthPenalty, NoRepeatNgramSize = o.NoRepeatNgramSize,
        };
        if (o.Seed is { } seed) proto.Seed = seed;
        if (o.NumReturnSequences != 1) proto.NumReturnSequences = o.NumReturnSequences;
        return proto;
    }
}
