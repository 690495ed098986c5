using System.Net;
using System.Net.Http.Json;
using System.Text;
using System.Text.Json;
using Blip2Mesh.Cli;
using Blip2Mesh.Contracts.V1;
using Blip2Mesh.Gateway;
using Blip2Mesh.Model.Generation;
using Blip2Mesh.ServiceDefaults;
using Grpc.Core;
using Microsoft.AspNetCore.Builder;
using GenerationOptions = Blip2Mesh.Contracts.V1.GenerationOptions;

namespace Blip2Mesh.Tests;

/// <summary>
/// stop, several answers, logprobs and request ids through gRPC, JSON and the OpenAI endpoints of a tiny-a mesh in
/// this process: answers equal Hugging Face's references and the gRPC API's, stop strings never leak, and every
/// field the OpenAI adapter cannot honour is a 400 naming it.
/// </summary>
public sealed class OpenAiTests(OpenAiTests.TinyMesh mesh) : IClassFixture<OpenAiTests.TinyMesh>
{
    public sealed class TinyMesh : IAsyncLifetime
    {
        private readonly List<WebApplication> _apps = [];
        public string Gateway { get; private set; } = "";
        public HttpClient Http { get; } = new() { Timeout = TimeSpan.FromSeconds(60) };

        private static ServiceOptions Options(bool http = false) =>
            new() { Model = Fixtures.TinyA, Port = MeshProcess.FreePort(), HttpPort = http ? MeshProcess.FreePort() : null, Threads = 1 };

        public async Task InitializeAsync()
        {
            var (vision, qformer, decoder, gateway) = (Options(), Options(), Options(), Options(http: true));
            _apps.AddRange([
                StageHosts.Vision(vision), StageHosts.QFormer(qformer), StageHosts.Decoder(decoder),
                StageHosts.Gateway(gateway, new GatewayOptions
                {
                    Vision = [$"127.0.0.1:{vision.Port}"], QFormer = [$"127.0.0.1:{qformer.Port}"], Decoder = [$"127.0.0.1:{decoder.Port}"],
                }),
            ]);
            foreach (var app in _apps) await app.StartAsync();
            Gateway = $"127.0.0.1:{gateway.Port}";
            Http.BaseAddress = new Uri($"http://127.0.0.1:{gateway.HttpPort}");
            var client = MeshClients.Gateway(Gateway, out var channel);
            using var _ = channel;
            var deadline = DateTime.UtcNow.AddSeconds(60);
            while ((await MeshClients.AskAsync(client, MeshClients.Request(Image(0)))).Error is not null && DateTime.UtcNow < deadline) await Task.Delay(100);
        }

        public async Task DisposeAsync()
        {
            Http.Dispose();
            foreach (var app in _apps) await app.DisposeAsync();
        }
    }

    private const string Checkpoint = "blip2-tiny-a";

    private static byte[] Image(int index) =>
        File.ReadAllBytes(Path.Combine(Fixtures.TinyA, Fixtures.Image(Checkpoint, index).GetProperty("file").GetString()!));

    private static string Greedy(int image, int prompt) => Fixtures.Prompt(Checkpoint, image, prompt).GetProperty("greedy").GetProperty("text").GetString()!;

    private async Task<(List<GenerateResponse> Messages, Metadata Headers)> Stream(GenerateRequest request, Metadata? headers = null)
    {
        var client = MeshClients.Gateway(mesh.Gateway, out var channel);
        using var _ = channel;
        using var call = client.Generate(request, headers, deadline: DateTime.UtcNow.AddSeconds(60));
        var messages = new List<GenerateResponse>();
        await foreach (var r in call.ResponseStream.ReadAllAsync()) messages.Add(r);
        return (messages, await call.ResponseHeadersAsync);
    }

    private static string Text(IEnumerable<GenerateResponse> messages, int index = 0) => string.Concat(messages.Where(m => m.Index == index).Select(m => m.Text));

    [Fact]
    public async Task GrpcStopStringsEndTheAnswerAndNeverReachTheStream()
    {
        var full = Greedy(0, 0);
        Assert.StartsWith("X 182 415", full);
        var (messages, _) = await Stream(MeshClients.Request(Image(0), "", new GenerationOptions { Stop = { "415", "nothing like it" }, Logprobs = true }));
        Assert.Equal("X 182 ", Text(messages));
        Assert.All(messages, m => Assert.DoesNotContain("4", m.Text));
        Assert.Equal("stop", messages[^1].FinishReason);
        Assert.Equal(messages.Sum(m => m.TokenIds.Count), messages[^1].Usage.GeneratedTokens);
        EndAtTheStop(messages, 0);

        var (beam, _) = await Stream(MeshClients.Request(Image(0), "", new GenerationOptions { NumBeams = 4, NumReturnSequences = 2, Stop = { "415" }, Logprobs = true }));
        Assert.Equal("X 182 ", Text(beam));
        Assert.Equal("stop", beam.Last(m => m.Index == 0 && m.FinishReason.Length > 0).FinishReason);
        EndAtTheStop(beam, 0);
    }

    /// <summary>
    /// An answer cut by a stop string lists the tokens up to the one whose text completed it, and no more (tiny-a's
    /// steps are fast: the decoder often has the whole answer before it sees the stop), each with its logprob.
    /// </summary>
    private static void EndAtTheStop(List<GenerateResponse> messages, int index)
    {
        var tokenizer = Model.Text.T5Tokenizer.Load(Fixtures.TinyA);
        var ids = messages.Where(m => m.Index == index).SelectMany(m => m.TokenIds).ToList();
        Assert.Equal(ids.Count, messages.Where(m => m.Index == index).Sum(m => m.Logprobs.Count));
        Assert.Contains("415", tokenizer.Decode(ids));
        Assert.DoesNotContain("415", tokenizer.Decode(ids[..^1]));
    }

    [Fact]
    public async Task ChatCompletionsAreCountedByStatusInTheRequestMetrics()
    {
        const string refused = "blip2mesh_gateway_requests_total{otel_scope_name=\"Blip2Mesh\",method=\"ChatCompletions\",status=\"INVALID_ARGUMENT\"}";
        async Task<double> Count()
        {
            var line = (await mesh.Http.GetStringAsync("/metrics")).Split('\n').FirstOrDefault(l => l.StartsWith(refused, StringComparison.Ordinal));
            return line is null ? 0 : double.Parse(line[(line.LastIndexOf(' ') + 1)..], System.Globalization.CultureInfo.InvariantCulture);
        }
        var before = await Count();
        using var response = await mesh.Http.PostAsJsonAsync("/v1/chat/completions", new { model = "x", messages = Array.Empty<object>(), tools = Array.Empty<object>() });
        Assert.Equal(System.Net.HttpStatusCode.BadRequest, response.StatusCode);
        Assert.True(await Count() >= before + 1, "the refused chat completion was not counted");
    }

    [Fact]
    public async Task GrpcReturnsTheBestBeamsWithLogprobsAndTheRequestIdFirstAndLast()
    {
        var reference = Fixtures.Prompt(Checkpoint, 0, 1).GetProperty("beam");
        var headers = new Metadata { { "x-request-id", "my-request-7" } };
        var (messages, responseHeaders) = await Stream(MeshClients.Request(Image(0), "a photo of",
            new GenerationOptions { NumBeams = 4, NumReturnSequences = 3, Logprobs = true, TopLogprobs = 2 }), headers);
        Assert.Equal(reference.GetProperty("text").GetString(), Text(messages));
        Assert.Equal([0, 1, 2], messages.Where(m => m.FinishReason.Length > 0).Select(m => m.Index));
        Assert.Equal(3, Enumerable.Range(0, 3).Select(i => Text(messages, i)).Distinct().Count());
        Assert.All(messages, m => Assert.Equal(m.TokenIds, m.Logprobs.Select(l => l.TokenId)));
        Assert.All(messages.SelectMany(m => m.Logprobs), l => Assert.Equal(2, l.Top.Count));
        Assert.Equal("my-request-7", messages[0].RequestId);
        Assert.Equal("my-request-7", messages[^1].RequestId);
        Assert.NotNull(messages[^1].Usage);
        Assert.Equal(messages.Sum(m => m.TokenIds.Count), messages[^1].Usage.GeneratedTokens);
        Assert.Equal("my-request-7", responseHeaders.GetValue("x-request-id"));
    }

    [Fact]
    public async Task JsonApiTakesTheNewOptionsAndRefusesUnknownOnes()
    {
        var image = Convert.ToBase64String(Image(0));
        using var ok = await mesh.Http.PostAsync("/v1/generate", new StringContent(
            $$$"""{"image": "{{{image}}}", "options": {"stop": ["415"], "numReturnSequences": 2, "doSample": true, "seed": 3}}""", Encoding.UTF8, "application/json"));
        Assert.Equal(HttpStatusCode.OK, ok.StatusCode);
        Assert.True(ok.Headers.Contains("x-request-id"));
        using var bad = await mesh.Http.PostAsync("/v1/generate", new StringContent(
            $$$"""{"image": "{{{image}}}", "options": {"stops": ["415"]}}""", Encoding.UTF8, "application/json"));
        Assert.Equal(HttpStatusCode.BadRequest, bad.StatusCode);
        Assert.Contains("stops", await bad.Content.ReadAsStringAsync());
    }

    private static object ImagePart(int image) =>
        new { type = "image_url", image_url = new { url = "data:image/png;base64," + Convert.ToBase64String(Image(image)) } };

    private async Task<(HttpResponseMessage Response, JsonElement Body)> Chat(object body)
    {
        var response = await mesh.Http.PostAsJsonAsync("/v1/chat/completions", body);
        var text = await response.Content.ReadAsStringAsync();
        return (response, text.StartsWith('{') ? JsonDocument.Parse(text).RootElement : default);
    }

    [Fact]
    public async Task UpServesTheOpenAiApiUnderTheModelNameItIsGiven()
    {
        using var up = new MeshProcess(Fixtures.Demo, 1, null, "--model-name", "demo-vqa");
        using var http = new HttpClient { BaseAddress = new Uri(up.HttpAddress) };
        using var models = await http.GetFromJsonAsync<JsonDocument>("/v1/models");
        Assert.Equal("demo-vqa", models!.RootElement.GetProperty("data")[0].GetProperty("id").GetString());
    }

    [Fact]
    public async Task ChatCompletionsAnswerAsHuggingFaceWithOpenAisShape()
    {
        using var models = await mesh.Http.GetFromJsonAsync<JsonDocument>("/v1/models");
        Assert.Equal("blip2-tiny-a", models!.RootElement.GetProperty("data")[0].GetProperty("id").GetString());

        var (response, body) = await Chat(new
        {
            model = "blip2-tiny-a",
            messages = new object[] { new { role = "user", content = new object[] { ImagePart(0), new { type = "text", text = "a photo of" } } } },
            max_tokens = 30, logprobs = true, top_logprobs = 3,
        });
        Assert.Equal(HttpStatusCode.OK, response.StatusCode);
        var id = body.GetProperty("id").GetString()!;
        Assert.StartsWith("chatcmpl-", id);
        Assert.Equal(id, response.Headers.GetValues("x-request-id").Single());
        Assert.Equal("chat.completion", body.GetProperty("object").GetString());
        var choice = body.GetProperty("choices")[0];
        var reference = Fixtures.Prompt(Checkpoint, 0, 1).GetProperty("greedy");
        Assert.Equal(reference.GetProperty("text").GetString(), choice.GetProperty("message").GetProperty("content").GetString());
        Assert.Equal(reference.GetProperty("ended_with_eos").GetBoolean() ? "stop" : "length", choice.GetProperty("finish_reason").GetString());
        var generated = Fixtures.Ints(reference.GetProperty("ids")).Length - 1;
        Assert.Equal(generated, choice.GetProperty("logprobs").GetProperty("content").GetArrayLength());
        Assert.Equal(3, choice.GetProperty("logprobs").GetProperty("content")[0].GetProperty("top_logprobs").GetArrayLength());
        var usage = body.GetProperty("usage");
        Assert.Equal(5, usage.GetProperty("prompt_tokens").GetInt32());
        Assert.Equal(generated, usage.GetProperty("completion_tokens").GetInt32());
        Assert.Equal(5 + generated, usage.GetProperty("total_tokens").GetInt32());
    }

    [Fact]
    public async Task StreamedChatIsTheSameAnswerInChunksWithUsageLastAndNeverAStopString()
    {
        var request = new HttpRequestMessage(HttpMethod.Post, "/v1/chat/completions")
        {
            Content = JsonContent.Create(new
            {
                messages = new object[] { new { role = "user", content = new object[] { ImagePart(0) } } },
                stream = true, stream_options = new { include_usage = true }, stop = "415",
            }),
        };
        using var response = await mesh.Http.SendAsync(request, HttpCompletionOption.ResponseHeadersRead);
        Assert.Equal("text/event-stream", response.Content.Headers.ContentType?.MediaType);
        var lines = (await response.Content.ReadAsStringAsync()).Split('\n').Where(l => l.StartsWith("data: ")).Select(l => l["data: ".Length..]).ToList();
        Assert.Equal("[DONE]", lines[^1]);
        var chunks = lines[..^1].Select(l => JsonDocument.Parse(l).RootElement).ToList();
        var deltas = chunks.Where(c => c.GetProperty("choices").GetArrayLength() > 0).Select(c => c.GetProperty("choices")[0]).ToList();
        Assert.Equal("assistant", deltas[0].GetProperty("delta").GetProperty("role").GetString());
        var text = string.Concat(deltas.Select(d => d.GetProperty("delta").TryGetProperty("content", out var c) ? c.GetString() : ""));
        Assert.Equal("X 182 ", text);
        Assert.Equal("stop", deltas[^1].GetProperty("finish_reason").GetString());
        Assert.Equal(0, chunks[^1].GetProperty("choices").GetArrayLength());
        Assert.True(chunks[^1].GetProperty("usage").GetProperty("completion_tokens").GetInt32() > 0);
    }

    [Fact]
    public async Task ConversationsFoldIntoLavisPromptAndSeveralSamplesComeAsChoices()
    {
        var (_, body) = await Chat(new
        {
            messages = new object[]
            {
                new { role = "user", content = new object[] { ImagePart(1), new { type = "text", text = "what is it?" } } },
                new { role = "assistant", content = "a cat" },
                new { role = "user", content = "what colour?" },
            },
            temperature = 0.7, seed = 11, n = 2, max_tokens = 8,
        });
        var (messages, _) = await Stream(MeshClients.Request(Image(1), "Question: what is it? Answer: a cat. Question: what colour? Answer:",
            new GenerationOptions { DoSample = true, Temperature = 0.7f, Seed = 11, NumReturnSequences = 2, MaxNewTokens = 8 }));
        var choices = body.GetProperty("choices");
        Assert.Equal(2, choices.GetArrayLength());
        for (var i = 0; i < 2; i++) Assert.Equal(Text(messages, i), choices[i].GetProperty("message").GetProperty("content").GetString());
    }

    public static TheoryData<string, string?, int> Refusals() => new()
    {
        { """{"messages": [{"role": "user", "content": "hi"}], "tools": []}""", "tools", 400 },
        { """{"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}]}""", "messages[0].role", 400 },
        { """{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]}""", "messages[0].content[0].image_url.url", 400 },
        { """{"messages": [{"role": "user", "content": "no image"}]}""", "messages", 400 },
        { """{"messages": [{"role": "user", "content": [{"type": "image_id", "image_id": "IMAGE"}]}], "n": 2}""", "n", 400 },
        { """{"messages": [{"role": "user", "content": [{"type": "image_id", "image_id": "IMAGE"}]}], "blip2": {"num_beams": 2, "beam_groups": 2}}""", "blip2.beam_groups", 400 },
        { """{"messages": [{"role": "user", "content": [{"type": "image_id", "image_id": "IMAGE"}]}], "max_tokens": 100000}""", "max_tokens", 400 },
        { """{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}""", "model", 404 },
        { """{"messages": [{"role": "user", "content": [{"type": "image_id", "image_id": "0000000000000000000000000000000000000000000000000000000000000000"}]}]}""", null, 404 },
    };

    [Theory]
    [MemberData(nameof(Refusals))]
    public async Task WhatCannotBeHonouredIsRefusedInOpenAisErrorShapeNamingTheField(string body, string? param, int status)
    {
        var client = MeshClients.Gateway(mesh.Gateway, out var channel);
        using var _ = channel;
        var imageId = (await client.PutImageAsync(new PutImageRequest { Image = Google.Protobuf.ByteString.CopyFrom(Image(0)) })).ImageId;
        using var response = await mesh.Http.PostAsync("/v1/chat/completions", new StringContent(body.Replace("IMAGE", imageId), Encoding.UTF8, "application/json"));
        Assert.Equal(status, (int)response.StatusCode);
        var error = JsonDocument.Parse(await response.Content.ReadAsStringAsync()).RootElement.GetProperty("error");
        Assert.Equal(param, error.GetProperty("param").GetString());
        Assert.Equal(status == 400 || status == 404 ? "invalid_request_error" : "server_error", error.GetProperty("type").GetString());
        Assert.DoesNotContain("Exception", error.GetProperty("message").GetString());
    }

    [Fact]
    public void PythonsStandardLibraryGetsHuggingFacesAnswerPlainAndStreamed()
    {
        var expected = Fixtures.Prompt(Checkpoint, 2, 1).GetProperty("greedy");
        var image = Path.Combine(Fixtures.TinyA, Fixtures.Image(Checkpoint, 2).GetProperty("file").GetString()!);
        var lines = PythonClients.Run(Path.Combine(Fixtures.RepoRoot, "tests", "e2e", "openai_urllib.py"), mesh.Http.BaseAddress!.ToString().TrimEnd('/'), image, "a photo of");
        var (plain, streamed, refused) = (lines[0], lines[1], lines[2]);
        var finish = expected.GetProperty("ended_with_eos").GetBoolean() ? "stop" : "length";
        var generated = Fixtures.Ints(expected.GetProperty("ids")).Length - 1;
        foreach (var answer in new[] { plain, streamed })
        {
            Assert.Equal(expected.GetProperty("text").GetString(), answer.GetProperty("text").GetString());
            Assert.Equal(finish, answer.GetProperty("finish_reason").GetString());
            Assert.Equal(generated, answer.GetProperty("usage").GetProperty("completion_tokens").GetInt32());
        }
        Assert.Equal(plain.GetProperty("id").GetString(), plain.GetProperty("x_request_id").GetString());
        Assert.True(streamed.GetProperty("chunks").GetInt32() > 2);
        Assert.Equal(400, refused.GetProperty("status").GetInt32());
        Assert.Equal("frequency_penalty", refused.GetProperty("error").GetProperty("param").GetString());
    }

    [Fact]
    public void TheCliCaptionsWithAStopStringAndPrintsSeveralAnswers()
    {
        var image = Path.Combine(Fixtures.TinyA, Fixtures.Image(Checkpoint, 0).GetProperty("file").GetString()!);
        var stopped = CliProcess.Run("caption", image, "--addr", mesh.Gateway, "--stop", "415");
        Assert.Equal(0, stopped.ExitCode);
        Assert.Equal("X 182 \n", stopped.Stdout);
        var beams = CliProcess.Run("caption", image, "--addr", mesh.Gateway, "--prompt", "a photo of", "--num-beams", "4", "--num-return-sequences", "3");
        Assert.Equal(0, beams.ExitCode);
        var lines = beams.Stdout.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.Equal(3, lines.Length);
        Assert.Equal("[0] " + Fixtures.Prompt(Checkpoint, 0, 1).GetProperty("beam").GetProperty("text").GetString(), lines[0]);
        Assert.StartsWith("[2] ", lines[2]);
    }
}
