using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using Blip2Mesh.Contracts.V1;
using Blip2Mesh.Model.Errors;
using Blip2Mesh.ServiceDefaults;
using Google.Protobuf;
using Grpc.Core;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.Http.Features;
using Microsoft.AspNetCore.Routing;
using Microsoft.Extensions.Logging;

namespace Blip2Mesh.Gateway;

/// <summary>
/// OpenAI-compatible endpoints on the gateway's HTTP port: <c>GET /v1/models</c> and <c>POST /v1/chat/completions</c>
/// (plain and Server-Sent Events). A thin adapter: a chat request becomes one <see cref="GenerateRequest"/> for the
/// gateway's <see cref="GenerationPath"/>, and its answers become OpenAI's response shapes. Every field it cannot
/// honour is a 400 naming it; errors are OpenAI's error body, their HTTP status derived from the gRPC status.
/// </summary>
public static partial class OpenAiEndpoints
{
    /// <summary>The served model, as /v1/models lists it.</summary>
    public sealed record ServedModel(string Id, long Created);

    private static readonly string[] Fields =
    [
        "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "n", "stop",
        "logprobs", "top_logprobs", "stream", "stream_options", "response_format", "blip2",
    ];
    private static readonly string[] ExtensionFields = ["num_beams", "length_penalty", "repetition_penalty", "no_repeat_ngram_size", "min_tokens", "top_k"];

    /// <summary>Internal option names → the request field a chat caller set.</summary>
    private static readonly Dictionary<string, string> ParamNames = new()
    {
        ["max_new_tokens"] = "max_tokens", ["num_return_sequences"] = "n", ["min_new_tokens"] = "blip2.min_tokens",
        ["num_beams"] = "blip2.num_beams", ["length_penalty"] = "blip2.length_penalty", ["repetition_penalty"] = "blip2.repetition_penalty",
        ["no_repeat_ngram_size"] = "blip2.no_repeat_ngram_size", ["top_k"] = "blip2.top_k", ["do_sample"] = "temperature",
        ["image"] = "messages", ["image_id"] = "messages", ["prompt"] = "messages",
    };

    private static readonly JsonSerializerOptions Json = new(JsonSerializerDefaults.General);

    public static IEndpointRouteBuilder MapOpenAi(this IEndpointRouteBuilder app)
    {
        app.MapGet("/v1/models", (HttpContext context, ApiKeys keys, ServedModel model) =>
            keys.Refusal(context.Request.Headers.Authorization) is { } refusal
                ? Error(StatusCodes.Status401Unauthorized, refusal, null, "invalid_api_key")
                : Results.Json(new { @object = "list", data = new[] { new { id = model.Id, @object = "model", created = model.Created, owned_by = "blip2mesh" } } }, Json))
            .ExcludeFromDescription();
        app.MapPost("/v1/chat/completions", ChatCompletions).ExcludeFromDescription();
        return app;
    }

    /// <summary>An error that ends a chat request before any answer, with its HTTP status.</summary>
    private sealed class ChatError(int status, string message, string? param, string? code = null) : Exception(message)
    {
        public int Status { get; } = status;
        public string? Param { get; } = param;
        public string? Code { get; } = code;
    }

    private static ChatError Invalid(string param, string message) => new(StatusCodes.Status400BadRequest, $"{param}: {message}", param);

    private static async Task ChatCompletions(HttpContext context, ApiKeys keys, ServedModel model, GenerationPath generation,
        GatewayOptions gateway, ILogger<GenerationPath> logger)
    {
        var clock = System.Diagnostics.Stopwatch.StartNew();
        // The caller's own x-request-id is echoed; a new one is the completion's id.
        var requestId = RequestIds.FromHeader(context.Request.Headers[RequestIds.Header], newPrefix: "chatcmpl-");
        var completionId = requestId.StartsWith("chatcmpl-", StringComparison.Ordinal) ? requestId : "chatcmpl-" + requestId;
        context.Response.Headers[RequestIds.Header] = requestId;
        var created = DateTimeOffset.UtcNow.ToUnixTimeSeconds();
        SseWriter? stream = null;
        try
        {
            if (keys.Refusal(context.Request.Headers.Authorization) is { } refusal)
                throw new ChatError(StatusCodes.Status401Unauthorized, refusal, null, "invalid_api_key");
            var chat = await ReadRequest(context, gateway, model);
            var answers = new Dictionary<int, Answer>();
            Usage? usage = null;
            if (chat.Stream) stream = new SseWriter(context.Response, completionId, created, model.Id, chat.IncludeUsage);
            await generation.RunAsync(chat.Request, requestId, "ChatCompletions", async r =>
            {
                if (!answers.TryGetValue(r.Index, out var answer)) answers[r.Index] = answer = new Answer();
                answer.Text.Append(r.Text);
                answer.Logprobs.AddRange(r.Logprobs);
                if (r.FinishReason.Length > 0) answer.FinishReason = FinishReason(r.FinishReason);
                usage = r.Usage ?? usage;
                if (stream is not null) await stream.Write(r, chat.Logprobs, FinishReason(r.FinishReason));
            }, DateTime.MaxValue, context.RequestAborted);
            var prompt = usage?.PromptTokens ?? 0;
            var completion = usage?.GeneratedTokens ?? 0;
            var totals = new { prompt_tokens = prompt, completion_tokens = completion, total_tokens = prompt + completion };
            ServingErrors.RecordPublicRequest("ChatCompletions", StatusCode.OK, clock.Elapsed.TotalMilliseconds);
            if (stream is not null)
            {
                await stream.End(totals);
                return;
            }
            await context.Response.WriteAsJsonAsync(new
            {
                id = completionId,
                @object = "chat.completion",
                created,
                model = model.Id,
                choices = answers.OrderBy(a => a.Key).Select(a => new
                {
                    index = a.Key,
                    message = new { role = "assistant", content = a.Value.Text.ToString() },
                    logprobs = chat.Logprobs ? new { content = a.Value.Logprobs.Select(OpenAiLogprob) } : null,
                    finish_reason = a.Value.FinishReason,
                }),
                usage = totals,
            }, Json, context.RequestAborted);
        }
        catch (Exception e) when (!context.RequestAborted.IsCancellationRequested)
        {
            var (status, message, param, code) = e switch
            {
                ChatError chat => (chat.Status, chat.Message, chat.Param, chat.Code),
                ServingException serving => (HttpStatus(ServingErrors.Code(serving.Kind)), serving.Message, serving.Field, null),
                RpcException rpc when ServingErrors.IsOurs(rpc) => (HttpStatus(rpc.StatusCode), rpc.Status.Detail, ServingErrors.Field(rpc), null),
                _ => (StatusCodes.Status500InternalServerError, "internal error: the request could not be completed (the server log has the details)", (string?)null, (string?)null),
            };
            if (status == StatusCodes.Status500InternalServerError) logger.LogError(e, "chat completion {RequestId} failed", requestId);
            ServingErrors.RecordPublicRequest("ChatCompletions", e switch
            {
                ServingException serving => ServingErrors.Code(serving.Kind),
                RpcException rpc => rpc.StatusCode,
                _ => status switch
                {
                    StatusCodes.Status400BadRequest or StatusCodes.Status413RequestEntityTooLarge => StatusCode.InvalidArgument,
                    StatusCodes.Status401Unauthorized => StatusCode.Unauthenticated,
                    StatusCodes.Status404NotFound => StatusCode.NotFound,
                    _ => StatusCode.Internal,
                },
            }, clock.Elapsed.TotalMilliseconds);
            var openAiParam = param is not null && ParamNames.TryGetValue(param, out var renamed) ? renamed : param;
            // A generation option's sentence starts with its internal name; the caller set the chat field.
            if (param is not null && openAiParam != param && message.StartsWith(param + ":", StringComparison.Ordinal))
                message = openAiParam + message[param.Length..];
            var body = ErrorBody(status, message, openAiParam, code);
            if (stream is { Started: true })
                await stream.Fail(body);
            else
            {
                context.Response.StatusCode = status;
                await context.Response.WriteAsJsonAsync(body, Json);
            }
        }
    }

    /// <summary>The HTTP status of a gRPC status (ServingErrors.Code gives the status of every error kind).</summary>
    public static int HttpStatus(StatusCode code) => code switch
    {
        StatusCode.InvalidArgument or StatusCode.FailedPrecondition or StatusCode.OutOfRange => StatusCodes.Status400BadRequest,
        StatusCode.Unauthenticated => StatusCodes.Status401Unauthorized,
        StatusCode.PermissionDenied => StatusCodes.Status403Forbidden,
        StatusCode.NotFound => StatusCodes.Status404NotFound,
        StatusCode.ResourceExhausted => StatusCodes.Status429TooManyRequests,
        StatusCode.Unavailable => StatusCodes.Status503ServiceUnavailable,
        StatusCode.DeadlineExceeded => StatusCodes.Status504GatewayTimeout,
        _ => StatusCodes.Status500InternalServerError,
    };

    private static object ErrorBody(int status, string message, string? param, string? code) => new
    {
        error = new
        {
            message,
            type = status switch
            {
                StatusCodes.Status401Unauthorized => "authentication_error",
                StatusCodes.Status429TooManyRequests => "rate_limit_error",
                >= 500 => "server_error",
                _ => "invalid_request_error",
            },
            param,
            code,
        },
    };

    private static IResult Error(int status, string message, string? param, string? code) => Results.Json(ErrorBody(status, message, param, code), Json, statusCode: status);

    private static string FinishReason(string reason) => reason switch
    {
        "" => "",
        "length" => "length",
        _ => "stop",
    };

    private static object OpenAiLogprob(TokenLogprob t) => new
    {
        token = t.Token,
        logprob = t.Logprob,
        bytes = Encoding.UTF8.GetBytes(t.Token),
        top_logprobs = t.Top.Select(a => new { token = a.Token, logprob = a.Logprob, bytes = Encoding.UTF8.GetBytes(a.Token) }),
    };

    private sealed class Answer
    {
        public StringBuilder Text { get; } = new();
        public List<TokenLogprob> Logprobs { get; } = [];
        public string? FinishReason { get; set; }
    }

    /// <summary>Chunks as Server-Sent Events, started with the first answer (so an error before it is a plain HTTP error).</summary>
    private sealed class SseWriter(HttpResponse response, string id, long created, string model, bool includeUsage)
    {
        private readonly HashSet<int> _begun = [];
        public bool Started { get; private set; }

        private async Task Send(object chunk)
        {
            if (!Started)
            {
                Started = true;
                response.StatusCode = StatusCodes.Status200OK;
                response.ContentType = "text/event-stream";
                response.Headers.CacheControl = "no-cache";
            }
            await response.WriteAsync($"data: {JsonSerializer.Serialize(chunk, Json)}\n\n");
            await response.Body.FlushAsync();
        }

        private object Chunk(object[] choices) => includeUsage
            ? new { id, @object = "chat.completion.chunk", created, model, choices, usage = (object?)null }
            : new { id, @object = "chat.completion.chunk", created, model, choices };

        public async Task Write(GenerateResponse r, bool logprobs, string finishReason)
        {
            // Each answer's first chunk names the role; its last one carries the finish reason alone.
            var first = _begun.Add(r.Index);
            if (first || r.Text.Length > 0 || r.Logprobs.Count > 0)
            {
                object delta = first ? new { role = "assistant", content = r.Text } : new { content = r.Text };
                await Send(Chunk([new
                {
                    index = r.Index, delta,
                    logprobs = logprobs ? new { content = r.Logprobs.Select(OpenAiLogprob) } : null,
                    finish_reason = (string?)null,
                }]));
            }
            if (finishReason.Length > 0)
                await Send(Chunk([new { index = r.Index, delta = new { }, logprobs = (object?)null, finish_reason = finishReason }]));
        }

        public async Task End(object usage)
        {
            if (includeUsage) await Send(new { id, @object = "chat.completion.chunk", created, model, choices = Array.Empty<object>(), usage });
            await response.WriteAsync("data: [DONE]\n\n");
        }

        public async Task Fail(object error)
        {
            await response.WriteAsync($"data: {JsonSerializer.Serialize(error, Json)}\n\n");
        }
    }

    private sealed record ChatRequest(GenerateRequest Request, bool Stream, bool IncludeUsage, bool Logprobs);

    [GeneratedRegex(@"^data:image/(png|jpeg|jpg|webp|gif|bmp);base64,", RegexOptions.IgnoreCase)]
    private static partial Regex DataUrl();

    /// <summary>The chat request as a Generate request, refusing every field or value it cannot honour.</summary>
    private static async Task<ChatRequest> ReadRequest(HttpContext context, GatewayOptions gateway, ServedModel model)
    {
        // Base64 images are 4/3 of their bytes; a megabyte more for the rest of the conversation.
        long limit = gateway.MaxImageBytes / 3 * 4 + (1 << 20);
        if (context.Features.Get<IHttpMaxRequestBodySizeFeature>() is { IsReadOnly: false } size) size.MaxRequestBodySize = limit;
        if (context.Request.ContentLength > limit)
            throw new ChatError(StatusCodes.Status413RequestEntityTooLarge, $"the request body is over {limit} bytes; an image may be at most {gateway.MaxImageBytes} bytes", null, "request_too_large");
        JsonObject body;
        try
        {
            body = await JsonNode.ParseAsync(context.Request.Body, cancellationToken: context.RequestAborted) as JsonObject
                   ?? throw Invalid("body", "must be a JSON object");
        }
        catch (JsonException e)
        {
            throw new ChatError(StatusCodes.Status400BadRequest, $"the request body is not valid JSON ({e.Message.Split('.')[0]})", null);
        }
        catch (BadHttpRequestException e) when (e.StatusCode == StatusCodes.Status413RequestEntityTooLarge)
        {
            throw new ChatError(StatusCodes.Status413RequestEntityTooLarge, $"the request body is over {limit} bytes; an image may be at most {gateway.MaxImageBytes} bytes", null, "request_too_large");
        }

        var unknown = body.Select(p => p.Key).Where(k => !Fields.Contains(k)).ToList();
        if (unknown.Count > 0)
            throw new ChatError(StatusCodes.Status400BadRequest,
                $"unsupported field{(unknown.Count > 1 ? "s" : "")} {string.Join(", ", unknown.Select(u => $"'{u}'"))}: this server does not support {(unknown.Count > 1 ? "them" : "it")} (see the README's OpenAI section)",
                unknown[0]);

        if (Get<string>(body, "model") is { } asked && asked != model.Id)
            throw new ChatError(StatusCodes.Status404NotFound, $"the model '{asked}' does not exist here: this server serves '{model.Id}'", "model", "model_not_found");
        if (body["response_format"] is JsonObject format && Get<string>(format, "type") is not (null or "text"))
            throw Invalid("response_format", "only {\"type\": \"text\"} is supported");

        var request = new GenerateRequest { Options = new GenerationOptions() };
        var options = request.Options;
        ReadMessages(body, request);

        var maxTokens = Get<int?>(body, "max_completion_tokens") ?? Get<int?>(body, "max_tokens");
        if (maxTokens is { } max) options.MaxNewTokens = max;
        // Unset temperature keeps the checkpoint's default, greedy decoding, as the gRPC API does.
        if (Get<float?>(body, "temperature") is { } temperature)
        {
            if (temperature is < 0 or > 2) throw Invalid("temperature", $"must be between 0 and 2 (got {temperature})");
            if (temperature > 0)
            {
                options.DoSample = true;
                options.Temperature = temperature;
            }
        }
        if (Get<float?>(body, "top_p") is { } topP) options.TopP = topP;
        if (Get<long?>(body, "seed") is { } seed) options.Seed = seed;
        if (Get<int?>(body, "n") is { } n) options.NumReturnSequences = n;
        switch (body["stop"])
        {
            case null:
                break;
            case JsonArray stops:
                options.Stop.AddRange(stops.Select(s => s?.GetValueKind() == JsonValueKind.String ? s.GetValue<string>() : throw Invalid("stop", "must be a string or an array of strings")));
                break;
            case var single when single.GetValueKind() == JsonValueKind.String:
                options.Stop.Add(single.GetValue<string>());
                break;
            default:
                throw Invalid("stop", "must be a string or an array of strings");
        }
        var logprobs = Get<bool?>(body, "logprobs") ?? false;
        options.Logprobs = logprobs;
        if (Get<int?>(body, "top_logprobs") is { } top) options.TopLogprobs = top;

        var stream = Get<bool?>(body, "stream") ?? false;
        var includeUsage = false;
        if (body["stream_options"] is JsonObject streamOptions)
        {
            if (!stream) throw Invalid("stream_options", "is only allowed with stream: true");
            if (streamOptions.Select(p => p.Key).FirstOrDefault(k => k != "include_usage") is { } other)
                throw Invalid($"stream_options.{other}", "is not supported (only include_usage is)");
            includeUsage = Get<bool?>(streamOptions, "include_usage") ?? false;
        }

        if (body["blip2"] is JsonObject extension)
        {
            if (extension.Select(p => p.Key).FirstOrDefault(k => !ExtensionFields.Contains(k)) is { } other)
                throw Invalid($"blip2.{other}", $"is not a BLIP-2 option here (these are: {string.Join(", ", ExtensionFields)})");
            if (Get<int?>(extension, "num_beams") is { } beams) options.NumBeams = beams;
            if (Get<float?>(extension, "length_penalty") is { } lengthPenalty) options.LengthPenalty = lengthPenalty;
            if (Get<float?>(extension, "repetition_penalty") is { } repetition) options.RepetitionPenalty = repetition;
            if (Get<int?>(extension, "no_repeat_ngram_size") is { } ngram) options.NoRepeatNgramSize = ngram;
            if (Get<int?>(extension, "min_tokens") is { } minTokens) options.MinNewTokens = minTokens;
            if (Get<int?>(extension, "top_k") is { } topK) options.TopK = topK;
        }
        else if (body["blip2"] is not null) throw Invalid("blip2", "must be an object");
        return new ChatRequest(request, stream, includeUsage, logprobs);
    }

    /// <summary>
    /// The conversation → BLIP-2's prompt and image. One user text is the prompt as it is; earlier turns are folded
    /// with LAVIS's template ("Question: {q} Answer: {a}." joined, then " Question: {q} Answer:").
    /// </summary>
    private static void ReadMessages(JsonObject body, GenerateRequest request)
    {
        if (body["messages"] is not JsonArray { Count: > 0 } messages) throw Invalid("messages", "must be a non-empty array of messages");
        var turns = new List<string>();
        for (var i = 0; i < messages.Count; i++)
        {
            var at = $"messages[{i}]";
            if (messages[i] is not JsonObject message) throw Invalid(at, "must be an object");
            if (message.Select(p => p.Key).FirstOrDefault(k => k is not ("role" or "content" or "name")) is { } other)
                throw Invalid($"{at}.{other}", "is not supported");
            var role = Get<string>(message, "role");
            var expected = i % 2 == 0 ? "user" : "assistant";
            if (role is "system" or "developer")
                throw Invalid($"{at}.role", "system messages are not supported: BLIP-2 only answers the user's question about the image, so put any instruction in that question");
            if (role != expected)
                throw Invalid($"{at}.role", $"must be '{expected}': the conversation alternates user and assistant messages and ends with the user's question (got '{role}')");
            var text = new List<string>();
            switch (message["content"])
            {
                case JsonArray parts:
                    for (var k = 0; k < parts.Count; k++) ReadPart(parts[k] as JsonObject ?? throw Invalid($"{at}.content[{k}]", "must be an object"), $"{at}.content[{k}]", role == "user", request, text);
                    break;
                case var content when content?.GetValueKind() == JsonValueKind.String:
                    text.Add(content.GetValue<string>());
                    break;
                default:
                    throw Invalid($"{at}.content", "must be a string or an array of content parts");
            }
            turns.Add(string.Join("\n", text));
        }
        if (turns.Count % 2 == 0) throw Invalid($"messages[{turns.Count - 1}].role", "the conversation must end with the user's question");
        if (request.Image.IsEmpty && request.ImageId.Length == 0)
            throw Invalid("messages", "no image: a user message needs one image_url (a data: URL) or image_id content part");
        request.Prompt = turns.Count == 1
            ? turns[0]
            : string.Join(" ", Enumerable.Range(0, turns.Count / 2).Select(t => $"Question: {turns[2 * t]} Answer: {turns[2 * t + 1]}."))
              + $" Question: {turns[^1]} Answer:";
    }

    private static void ReadPart(JsonObject part, string at, bool fromUser, GenerateRequest request, List<string> text)
    {
        var type = Get<string>(part, "type");
        if (type is "image_url" or "image_id")
        {
            if (!fromUser) throw Invalid(at, "images are accepted in user messages only");
            if (!request.Image.IsEmpty || request.ImageId.Length > 0) throw Invalid(at, "BLIP-2 sees one image per conversation: send exactly one");
        }
        switch (type)
        {
            case "text":
                text.Add(Get<string>(part, "text") ?? throw Invalid($"{at}.text", "is missing"));
                break;
            case "image_url":
                var url = (part["image_url"] is JsonObject image ? Get<string>(image, "url") : null) ?? throw Invalid($"{at}.image_url.url", "is missing");
                if (url.StartsWith("http://", StringComparison.OrdinalIgnoreCase) || url.StartsWith("https://", StringComparison.OrdinalIgnoreCase))
                    throw Invalid($"{at}.image_url.url", "this server does not fetch images from http(s) URLs: send the image itself as a data: URL (data:image/png;base64,...)");
                if (DataUrl().Match(url) is not { Success: true } match)
                    throw Invalid($"{at}.image_url.url", "must be a data: URL of a PNG, JPEG, WebP, GIF or BMP image in base64 (data:image/png;base64,...)");
                try
                {
                    request.Image = ByteString.CopyFrom(Convert.FromBase64String(url[match.Length..]));
                }
                catch (FormatException)
                {
                    throw Invalid($"{at}.image_url.url", "the data: URL's base64 is not valid");
                }
                break;
            case "image_id":
                request.ImageId = Get<string>(part, "image_id") ?? throw Invalid($"{at}.image_id", "is missing");
                break;
            default:
                throw Invalid($"{at}.type", $"content parts may be text, image_url or image_id (got '{type}')");
        }
    }

    /// <summary>An optional field (null when absent or JSON null), refusing a value of the wrong type.</summary>
    private static T? Get<T>(JsonObject o, string name)
    {
        if (o[name] is not { } value) return default;
        try
        {
            return value.Deserialize<T>(Json);
        }
        catch (JsonException)
        {
            throw Invalid(name, $"has the wrong type ({value.GetValueKind().ToString().ToLowerInvariant()})");
        }
    }
}
