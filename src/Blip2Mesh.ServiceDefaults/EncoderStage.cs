using Blip2Mesh.Model.Runtime;
using Grpc.Core;

namespace Blip2Mesh.ServiceDefaults;

/// <summary>
/// What an encoder stage (vision, Q-Former) runs: its model, and a batcher that runs the requests arriving together
/// as one batch (their rows concatenated, each request's rows of the output handed back to it).
/// </summary>
public sealed class EncoderRuntime<TInput> : IDisposable
{
    private readonly string _stage;
    private readonly DynamicBatcher<TInput, FloatTensor> _batcher;

    /// <param name="concat">One input holding the rows of all the given inputs, in order.</param>
    /// <param name="rows">How many rows (images) an input holds.</param>
    /// <param name="run">Runs the model on one input; the output has one row per input row.</param>
    public EncoderRuntime(string stage, Blip2Model model, BatchingOptions batching,
        Func<IReadOnlyList<TInput>, TInput> concat, Func<TInput, int> rows, Func<TInput, FloatTensor> run)
    {
        _stage = stage;
        Model = model;
        _batcher = new DynamicBatcher<TInput, FloatTensor>(inputs =>
        {
            var output = run(inputs.Count == 1 ? inputs[0] : concat(inputs));
            var outputs = new FloatTensor[inputs.Count];
            for (int i = 0, row = 0; i < inputs.Count; row += rows(inputs[i]), i++) outputs[i] = output.Slice(row, rows(inputs[i]));
            return outputs;
        }, batching.MaxBatch, batching.MaxDelay, n => MeshTelemetry.BatchSize.Record(n, new KeyValuePair<string, object?>("stage", stage)));
    }

    public Blip2Model Model { get; }

    /// <summary>
    /// Serves one stage stream: each request read is checked and decoded (<paramref name="decode"/>), run in a batch
    /// with whatever else is waiting, and answered in order.
    /// </summary>
    public async Task ServeAsync<TRequest, TResponse>(IAsyncStreamReader<TRequest> requests, IServerStreamWriter<TResponse> responses,
        ServerCallContext context, Func<TRequest, TInput> decode, Func<FloatTensor, TResponse> encode)
    {
        await foreach (var request in requests.ReadAllAsync(context.CancellationToken))
        {
            var input = decode(request);
            MeshTelemetry.StageRequests.Add(1, new KeyValuePair<string, object?>("stage", _stage));
            FloatTensor output;
            using (MeshTelemetry.Time(MeshTelemetry.StageDuration, "stage", _stage))
                output = await _batcher.RunAsync(input, context.CancellationToken);
            await responses.WriteAsync(encode(output), context.CancellationToken);
        }
    }

    public void Dispose() => Model.Dispose();
}
