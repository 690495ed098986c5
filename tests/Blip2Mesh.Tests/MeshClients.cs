using Blip2Mesh.Contracts.V1;
using Google.Protobuf;
using Grpc.Core;
using Grpc.Net.Client;

namespace Blip2Mesh.Tests;

/// <summary>The outcome of one Generate call: the streamed answer, or the status it failed with.</summary>
public sealed record Answer(int[] TokenIds, string Text, string FinishReason, Usage? Usage, int Messages, RpcException? Error = null);

/// <summary>Gateway calls the mesh tests share.</summary>
public static class MeshClients
{
    public static Blip2.Blip2Client Gateway(string address, out GrpcChannel channel)
    {
        channel = GrpcChannel.ForAddress($"http://{address}", new GrpcChannelOptions { MaxSendMessageSize = 64 << 20 });
        return new Blip2.Blip2Client(channel);
    }

    public static GenerateRequest Request(byte[] image, string prompt = "", GenerationOptions? options = null) =>
        new() { Image = ByteString.CopyFrom(image), Prompt = prompt, Options = options };

    public static async Task<Answer> AskAsync(Blip2.Blip2Client client, GenerateRequest request, TimeSpan? timeout = null, Metadata? headers = null)
    {
        var ids = new List<int>();
        var text = "";
        var finish = "";
        Usage? usage = null;
        var messages = 0;
        try
        {
            using var call = client.Generate(request, headers, deadline: DateTime.UtcNow + (timeout ?? TimeSpan.FromSeconds(60)));
            await foreach (var r in call.ResponseStream.ReadAllAsync())
            {
                messages++;
                ids.AddRange(r.TokenIds);
                text += r.Text;
                if (r.FinishReason.Length > 0)
                {
                    finish = r.FinishReason;
                    usage = r.Usage;
                }
            }
            return new Answer([.. ids], text, finish, usage, messages);
        }
        catch (RpcException e)
        {
            return new Answer([.. ids], text, finish, usage, messages, e);
        }
    }
}
