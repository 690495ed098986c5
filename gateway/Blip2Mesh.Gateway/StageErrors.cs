using System.Net.Sockets;
using Blip2Mesh.Model.Errors;
using Blip2Mesh.ServiceDefaults;
using Grpc.Core;
using Polly.CircuitBreaker;
using Polly.Timeout;

namespace Blip2Mesh.Gateway;

/// <summary>
/// Every exception a stage call can throw, classified once: what the retries and circuit breakers see (only a stage
/// that is overloaded or unreachable; never a caller's mistake), and what the caller is told (a sentence naming the
/// stage; never transport wording or a stage's address).
/// </summary>
public static class StageErrors
{
    /// <summary>The same call may succeed on another attempt or replica: the stage is overloaded, down or unreachable.</summary>
    public static bool IsTransient(Exception e) => e switch
    {
        // A stage that cancelled a call its caller still waits for (stopping, or a reset stream) may serve it elsewhere.
        RpcException r => r.StatusCode is StatusCode.Unavailable or StatusCode.ResourceExhausted or StatusCode.Aborted or StatusCode.Cancelled
            // A stage that dies mid-call, or a connection reset, reaches the client as INTERNAL or UNKNOWN unless the
            // stage itself said so.
            || (r.StatusCode is StatusCode.Internal or StatusCode.Unknown && !ServingErrors.IsOurs(r)),
        TimeoutRejectedException => true,
        HttpRequestException or HttpIOException or IOException or SocketException => true,
        _ => false,
    };

    /// <summary>What the caller is told of a failed call to <paramref name="stage"/>.</summary>
    /// <param name="callerGone">The caller's own cancellation: set when it cancelled or its deadline passed.</param>
    public static Exception ForCaller(string stage, Exception e, CancellationToken callerGone)
    {
        if (callerGone.IsCancellationRequested) return new OperationCanceledException(callerGone);
        return e switch
        {
            ServingException serving => serving,
            // The stage's own sentence: a caller error passes on as it is, an overload or outage names the stage.
            RpcException r when ServingErrors.IsOurs(r) => r.StatusCode switch
            {
                StatusCode.InvalidArgument or StatusCode.NotFound or StatusCode.FailedPrecondition =>
                    ServingErrors.Create(r.StatusCode, r.Status.Detail, ServingErrors.Field(r)),
                _ => ServingErrors.Create(r.StatusCode == StatusCode.Internal ? StatusCode.Internal : r.StatusCode, $"{stage} stage: {r.Status.Detail}"),
            },
            RpcException { StatusCode: StatusCode.DeadlineExceeded } => new ServingException(ErrorKind.DeadlineExceeded,
                $"the request's deadline passed while the {stage} stage was working on it"),
            BrokenCircuitException => ServingException.Unavailable($"{stage} stage is unavailable (it failed repeatedly; calls resume shortly): try again later"),
            TimeoutRejectedException => ServingException.Unavailable($"{stage} stage did not answer in time: try again later"),
            _ when IsTransient(e) => ServingException.Unavailable($"{stage} stage is unavailable (no replica answered): try again later"),
            // A status that is not ours (a stage of another version, a proxy in between): nothing of it is passed on;
            // the gateway's log gets it.
            _ => new ServingException(ErrorKind.Internal, $"{stage} stage failed unexpectedly (the gateway log has the details)", cause: e),
        };
    }
}
