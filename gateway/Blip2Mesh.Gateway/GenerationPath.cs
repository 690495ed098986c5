using System.Diagnostics;
using Blip2Mesh.Contracts.Decoder.V1;
using Blip2Mesh.Contracts.V1;
using Blip2Mesh.Model.Errors;
using Blip2Mesh.Model.Text;
using Blip2Mesh.ServiceDefaults;
using Grpc.Core;
using Microsoft.Extensions.Logging;
using Polly;

namespace Blip2Mesh.Gateway;

/// <summary>
/// The gateway's one generation path, behind every public API (gRPC, its JSON transcoding, the OpenAI endpoints):
/// checks the request, embeds its image through the vision and Q-Former stages (or the cache) and streams the
/// decoder's answers to <c>write</c>, with usage, the request id, metrics and logs.
/// </summary>
public sealed class GenerationPath(
    ImageEmbedder embedder, StageChannels stages, StagePipelines pipelines, T5Tokenizer tokenizer, GenerationLimits limits, ILogger<GenerationPath> logger)
{
    /// <param name="method">The API method, for the request-duration metric.</param>
    /// <param name="deadline">The caller's deadline; <see cref="DateTime.MaxValue"/> for none.</param>
    public async Task RunAsync(GenerateRequest request, string requestId, string method,
        Func<GenerateResponse, Task> write, DateTime deadline, CancellationToken cancellation)
    {
        // Requests are counted and timed by status where each API ends them (ServingErrorInterceptor for gRPC and
        // JSON, the OpenAI endpoint for its own); this clock serves stage_ms and time to first token.
        var timer = Stopwatch.StartNew();
        var hasImage = !request.Image.IsEmpty;
        var hasId = !string.IsNullOrEmpty(request.ImageId);
        if (hasImage == hasId)
            throw hasImage
                ? ServingException.Invalid("image", "give exactly one of image and image_id, not both")
                : ServingException.Invalid("image", "is empty and no image_id was given: give exactly one of image and image_id");
        if (hasId && !ImageEmbedder.IsImageId(request.ImageId))
            throw ServingException.Invalid("image_id", "must be the 64 hexadecimal characters PutImage returned");
        var options = request.Options ?? new Contracts.V1.GenerationOptions();
        var answers = GenerationRequests.ToOptions(options, limits).NumReturnSequences;
        GenerationRequests.EncodePrompt(tokenizer, request.Prompt, limits);

        var embedding = hasImage
            ? await embedder.EmbedAsync(request.Image.Memory, cancellation)
            : await embedder.FindAsync(request.ImageId) is { } cached
                ? new ImageEmbedding(request.ImageId, cached, true, new Dictionary<string, double>())
                : throw ServingException.NotFound(
                    $"image_id {request.ImageId} is not known (or was evicted); send the image bytes or call PutImage first");

        var decode = new DecodeRequest
        {
            QueryEmbeds = TensorCodec.FromFloat(embedding.QueryEmbeds),
            Prompt = request.Prompt,
            Options = options,
            ModelFingerprint = embedder.Fingerprint,
        };
        var client = new Contracts.Decoder.V1.Decoder.DecoderClient(stages.Decoder);
        // A caller that sets no deadline still gets an answer or an error in bounded time.
        if (deadline == DateTime.MaxValue) deadline = DateTime.UtcNow + pipelines.DefaultDecodeTimeout;
        var resilience = ResilienceContextPool.Shared.Get(cancellation);
        var forwarded = 0;
        var finished = 0;
        double? firstTokenMs = null;
        try
        {
            await pipelines.Decoder.ExecuteAsync(async rc =>
            {
                using var call = client.Generate(decode, deadline: deadline, cancellationToken: rc.CancellationToken);
                await foreach (var e in call.ResponseStream.ReadAllAsync(rc.CancellationToken))
                {
                    var response = new GenerateResponse { Text = e.Text, Index = e.Index };
                    response.TokenIds.AddRange(e.TokenIds);
                    response.Logprobs.AddRange(e.Logprobs);
                    if (forwarded == 0)
                    {
                        response.ImageId = embedding.ImageId;
                        response.RequestId = requestId;
                    }
                    if (e.TokenIds.Count > 0 && firstTokenMs is null)
                    {
                        firstTokenMs = timer.Elapsed.TotalMilliseconds;
                        MeshTelemetry.TimeToFirstToken.Record(firstTokenMs.Value);
                    }
                    if (!string.IsNullOrEmpty(e.FinishReason))
                    {
                        response.FinishReason = e.FinishReason;
                        // The last answer to finish ends the stream: its event carries the request's totals.
                        if (++finished == answers)
                        {
                            response.RequestId = requestId;
                            response.Usage = new Usage { PromptTokens = e.PromptTokens, GeneratedTokens = e.GeneratedTokens, CacheHit = embedding.CacheHit };
                            foreach (var (stage, ms) in embedding.StageMs) response.Usage.StageMs[stage] = ms;
                            response.Usage.StageMs["decoder"] = e.DecoderMs;
                            response.Usage.StageMs["total"] = timer.Elapsed.TotalMilliseconds;
                            if (firstTokenMs is { } first && e.GeneratedTokens > 1 && timer.Elapsed.TotalMilliseconds > first)
                                MeshTelemetry.TokensPerSecond.Record((e.GeneratedTokens - 1) / ((timer.Elapsed.TotalMilliseconds - first) / 1000));
                            logger.LogInformation("request {RequestId}: generated {Tokens} tokens in {Answers} answer(s) (last {FinishReason}) for image {ImageId} in {Milliseconds:F1} ms, cache hit {CacheHit}",
                                requestId, e.GeneratedTokens, answers, e.FinishReason, embedding.ImageId, timer.Elapsed.TotalMilliseconds, embedding.CacheHit);
                        }
                    }
                    // From here on a failure cannot be retried: the caller already has part of the answer.
                    rc.Properties.Set(StagePipelines.StreamStarted, true);
                    forwarded++;
                    await write(response);
                }
            }, resilience);
        }
        catch (Exception e) when (forwarded > 0 && !cancellation.IsCancellationRequested)
        {
            logger.LogWarning(e, "request {RequestId}: the decoder stream failed after {Messages} messages", requestId, forwarded);
            throw ServingException.Unavailable("decoder stage failed after part of the answer was streamed; the answer is incomplete: ask again");
        }
        catch (Exception e)
        {
            throw StageErrors.ForCaller("decoder", e, cancellation);
        }
        finally
        {
            ResilienceContextPool.Shared.Return(resilience);
        }
    }
}

/// <summary>Request ids: the caller's own (x-request-id) when it is a usable one, else a new one.</summary>
public static class RequestIds
{
    public const string Header = "x-request-id";

    public static string FromHeader(string? presented, string newPrefix = "") =>
        presented is { Length: > 0 and <= 128 } id && id.All(c => char.IsAsciiLetterOrDigit(c) || c is '-' or '_' or '.' or ':')
            ? id
            : newPrefix + Guid.NewGuid().ToString("N");
}
