using Blip2Mesh.Contracts.Decoder.V1;
using Blip2Mesh.Model.Generation;
using Blip2Mesh.Model.Onnx;
using Blip2Mesh.Model.Runtime;
using Blip2Mesh.Model.Text;
using Blip2Mesh.ServiceDefaults;
using System.Threading.Channels;
using Blip2Mesh.Model.Errors;
using Grpc.Core;
using Microsoft.AspNetCore.Builder;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;

namespace Blip2Mesh.Decoder;

/// <summary>What the decoder stage runs: Flan-T5 (encoder + KV-cached decoder), its tokenizer and the batcher.</summary>
public sealed class DecoderRuntime : IDisposable
{
    public DecoderRuntime(ServiceOptions service, ContinuousBatchingOptions batching, ILogger logger)
    {
        Tokenizer = T5Tokenizer.Load(service.Model);
        Model = Blip2Model.Load(service.Model, new PixelInput.Rgb8(null, null, null), service.Execution);
        Model.Warm(decoder: true);
        Generator = new Generator(Model);
        Encoder = new PromptEncoder(Generator, batching, service.Device, n => MeshTelemetry.BatchSize.Record(n, new KeyValuePair<string, object?>("stage", "t5-encoder")));
        logger.LogInformation("{Decision}", Encoder.Decision);
        Batcher = new ContinuousBatcher(Generator, batching,
            onStep: rows => MeshTelemetry.BatchSize.Record(rows, new KeyValuePair<string, object?>("stage", "decoder")));
        MeshTelemetry.Meter.CreateObservableGauge("blip2mesh.decoder.active_sequences", () => Batcher.ActiveSequences,
            description: "Requests being decoded now (the autoscaling signal)");
        MeshTelemetry.Meter.CreateObservableGauge("blip2mesh.decoder.queue_depth", () => Batcher.QueueDepth,
            description: "Requests waiting for decoder rows");
    }

    public Blip2Model Model { get; }
    public T5Tokenizer Tokenizer { get; }
    public Generator Generator { get; }
    public PromptEncoder Encoder { get; }
    public ContinuousBatcher Batcher { get; }

    public void Dispose()
    {
        Batcher.DisposeAsync().AsTask().GetAwaiter().GetResult();
        Model.Dispose();
    }
}

/// <summary>The decoder stage's composition: model, batcher and limits, and its gRPC service.</summary>
public static class DecoderStage
{
    public const string ServiceName = "blip2mesh.decoder.v1.Decoder";

    public static WebApplicationBuilder AddDecoderStage(this WebApplicationBuilder builder, ContinuousBatchingOptions batching, GenerationLimits limits)
    {
        builder.Services.AddSingleton(limits.Validate());
        builder.Services.AddLoadedModel((service, logger) => new DecoderRuntime(service, batching.Validate(), logger));
        return builder;
    }

    public static WebApplication MapDecoderStage(this WebApplication app)
    {
        app.MapGrpcService<DecoderService>();
        return app;
    }
}

/// <summary>
/// The decoder stage: query embeddings + prompt in, tokens and text deltas streamed out. Every active request
/// shares the decoder steps of one continuous batch. A request asking for several samples decodes one state per
/// sample (one encoder run); their events interleave on the stream, each carrying its answer's index.
/// </summary>
public sealed class DecoderService(LoadedModel<DecoderRuntime> runtime, GenerationLimits limits) : Contracts.Decoder.V1.Decoder.DecoderBase
{
    public override async Task Generate(DecodeRequest request, IServerStreamWriter<DecodeEvent> responses, ServerCallContext context)
    {
        var r = runtime.Value;
        var config = r.Model.Config;
        ModelFingerprint.Check(request.ModelFingerprint, r.Model.Checkpoint.Fingerprint, "decoder");
        var queries = TensorCodec.ToFloat(request.QueryEmbeds, "query_embeds", [1, config.NumQueryTokens, config.Text.DModel],
            $"the Q-Former output of model {r.Model.Checkpoint.Fingerprint}");
        var options = GenerationRequests.ToOptions(request.Options, limits);
        var stops = GenerationRequests.StopSequences(request.Options);
        var promptIds = GenerationRequests.EncodePrompt(r.Tokenizer, request.Prompt, limits);
        // Decided before the encoder runs: a request that can never fit costs nothing but its refusal.
        r.Batcher.CheckFits(config.Text, options, config.NumQueryTokens + promptIds.Count);

        MeshTelemetry.StageRequests.Add(1, new KeyValuePair<string, object?>("stage", "decoder"));
        using var timer = MeshTelemetry.Time(MeshTelemetry.StageDuration, "stage", "decoder");
        var states = await r.Encoder.StartAsync(queries, promptIds, options, context.CancellationToken);
        // Each answer's events, in order; answers run side by side and their events are written as they come.
        var events = Channel.CreateUnbounded<DecodeEvent>(new UnboundedChannelOptions { SingleReader = true });
        using var answersDone = CancellationTokenSource.CreateLinkedTokenSource(context.CancellationToken);
        // One per answer: cancelled when a stop string ends it, so it leaves the batch at the next step.
        var stopDecoding = states.Select(_ => CancellationTokenSource.CreateLinkedTokenSource(answersDone.Token)).ToList();
        var answers = new List<Task>(states.Count);
        try
        {
            try
            {
                for (var i = 0; i < states.Count; i++)
                {
                    // Submit owns the state from here on; the states not yet submitted are disposed on a refusal.
                    var tokens = r.Batcher.Submit(states[i], stopDecoding[i].Token);
                    answers.Add(StreamAnswer(i, states[i], tokens, stops, options.IsBeamSearch, events.Writer, stopDecoding[i], answersDone.Token));
                }
            }
            catch
            {
                foreach (var state in states.Skip(answers.Count + 1)) state.Dispose();
                throw;
            }
            // The first answer to fail ends the stream with its error.
            _ = Task.WhenAll(answers).ContinueWith(t => events.Writer.TryComplete(t.Exception?.InnerException), TaskScheduler.Default);

            var generated = 0;
            await foreach (var e in events.Reader.ReadAllAsync(context.CancellationToken))
            {
                generated += e.TokenIds.Count;
                MeshTelemetry.GeneratedTokens.Add(e.TokenIds.Count);
                if (!string.IsNullOrEmpty(e.FinishReason))
                {
                    e.PromptTokens = promptIds.Count;
                    e.GeneratedTokens = generated;
                    e.DecoderMs = timer.ElapsedMs;
                }
                await responses.WriteAsync(e, context.CancellationToken);
            }
        }
        finally
        {
            // Answers still decoding (the request failed or its caller left) leave the batch at the next step.
            await answersDone.CancelAsync();
            await Task.WhenAll(answers).ContinueWith(_ => { }, TaskScheduler.Default);
            foreach (var source in stopDecoding) source.Dispose();
        }
    }

    /// <summary>
    /// One answer's events: text deltas cut at the first stop string, the last one with its finish_reason. A stop
    /// ends greedy decoding and sampling at once (<paramref name="stopDecoding"/> takes the answer out of the batch);
    /// beam search runs on (its best beam can still change) but sends no more text. Beam search's other answers
    /// follow its best one, each as one event.
    /// </summary>
    private async Task StreamAnswer(int index, DecodingState state, IAsyncEnumerable<DecodedTokens> tokens, IReadOnlyList<string> stops,
        bool beamSearch, ChannelWriter<DecodeEvent> events, CancellationTokenSource stopDecoding, CancellationToken cancellation)
    {
        var text = runtime.Value.Tokenizer.CreateStreamingDecoder();
        var stop = new StopSequenceFilter(stops);
        async Task Finish(DecodeEvent last, bool complete)
        {
            last.Text += stop.FinishTokens(text);
            last.FinishReason = stop.Stopped ? "stop" : state.Results[0].FinishReason;
            await events.WriteAsync(last, cancellation);
            if (!complete)
            {
                await stopDecoding.CancelAsync();
                return;
            }
            for (var k = 1; k < state.Results.Count; k++)
                await events.WriteAsync(WholeAnswer(k, state.Results[k], stops), cancellation);
        }
        await foreach (var decoded in tokens)
        {
            var kept = stop.PushTokens(decoded.Ids, text, out var passed);
            var delta = Event(index, [.. decoded.Ids.Take(kept)], [.. decoded.Logprobs.Take(kept)], passed);
            // The last tokens and the end of the answer travel together: one message fewer on every hop.
            if (decoded.IsLast || (stop.Stopped && !beamSearch))
            {
                await Finish(delta, decoded.IsLast);
                return;
            }
            await events.WriteAsync(delta, cancellation);
        }
        await Finish(Event(index, [], [], ""), complete: true);
    }

    /// <summary>A finished beam as one event, cut at its first stop string (its ids and logprobs too).</summary>
    private DecodeEvent WholeAnswer(int index, GeneratedSequence sequence, IReadOnlyList<string> stops)
    {
        var stop = new StopSequenceFilter(stops);
        var ids = sequence.Ids.Skip(1).ToList();
        var decoder = runtime.Value.Tokenizer.CreateStreamingDecoder();
        var kept = stop.PushTokens(ids, decoder, out var text);
        var e = Event(index, [.. ids.Take(kept)], [.. (sequence.Logprobs ?? []).Take(kept)], text + stop.FinishTokens(decoder));
        e.FinishReason = stop.Stopped ? "stop" : sequence.FinishReason;
        return e;
    }

    private DecodeEvent Event(int index, IReadOnlyList<int> ids, IReadOnlyList<TokenLogprob> logprobs, string text)
    {
        var e = new DecodeEvent { Index = index, Text = text };
        e.TokenIds.AddRange(ids);
        foreach (var logprob in logprobs)
        {
            var token = new Contracts.V1.TokenLogprob { TokenId = logprob.TokenId, Token = TokenText(logprob.TokenId), Logprob = logprob.Logprob };
            token.Top.AddRange(logprob.Top.Select(a => new Contracts.V1.TokenAlternative { TokenId = a.TokenId, Token = TokenText(a.TokenId), Logprob = a.Logprob }));
            e.Logprobs.Add(token);
        }
        return e;
    }

    /// <summary>A token's piece as text; ids past the tokenizer's (the vocabulary's padding) have none.</summary>
    private string TokenText(int id)
    {
        var tokenizer = runtime.Value.Tokenizer;
        return id < tokenizer.Count ? tokenizer.IdToToken(id).Replace('\u2581', ' ') : "";
    }
}
