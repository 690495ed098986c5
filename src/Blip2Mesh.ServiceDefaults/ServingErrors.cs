using System.Diagnostics;
using Blip2Mesh.Model.Errors;
using Google.Protobuf.WellKnownTypes;
using Google.Rpc;
using Grpc.Core;
using Grpc.Core.Interceptors;
using Microsoft.Extensions.Logging;
using RpcStatus = Google.Rpc.Status;

namespace Blip2Mesh.ServiceDefaults;

/// <summary>
/// The one mapping from the error model to gRPC statuses (JSON transcoding turns those into HTTP statuses). A status
/// made here carries a short sentence for the caller, <c>google.rpc.BadRequest</c> details when a field is at fault,
/// and a trailer marking it as ours, so the gateway can pass a stage's sentence on and replace anything else.
/// </summary>
public static class ServingErrors
{
    /// <summary>Trailer set on every status made here: its detail is a sentence meant for the caller.</summary>
    public const string MarkerTrailer = "blip2mesh-error";

    public static StatusCode Code(ErrorKind kind) => kind switch
    {
        ErrorKind.InvalidRequest or ErrorKind.NeverFits => StatusCode.InvalidArgument,
        ErrorKind.NotFound => StatusCode.NotFound,
        ErrorKind.Mismatch => StatusCode.FailedPrecondition,
        ErrorKind.Overloaded => StatusCode.ResourceExhausted,
        ErrorKind.Unavailable => StatusCode.Unavailable,
        ErrorKind.DeadlineExceeded => StatusCode.DeadlineExceeded,
        ErrorKind.Internal => StatusCode.Internal,
        _ => StatusCode.Internal,
    };

    public static RpcException ToRpc(ServingException e) => Create(Code(e.Kind), e.Message, e.Field);

    /// <summary>A status with the caller's sentence; BadRequest details name <paramref name="field"/> when given.</summary>
    public static RpcException Create(StatusCode code, string message, string? field = null)
    {
        var status = new RpcStatus { Code = (int)code, Message = message };
        if (field is not null)
            status.Details.Add(Any.Pack(new BadRequest { FieldViolations = { new BadRequest.Types.FieldViolation { Field = field, Description = message } } }));
        var exception = status.ToRpcException();
        exception.Trailers.Add(MarkerTrailer, "1");
        return exception;
    }

    /// <summary>The gRPC code's canonical name (OK, INVALID_ARGUMENT, …), as metrics and logs label it.</summary>
    public static string CodeName(StatusCode code) => code switch
    {
        StatusCode.OK => "OK",
        StatusCode.InvalidArgument => "INVALID_ARGUMENT",
        StatusCode.DeadlineExceeded => "DEADLINE_EXCEEDED",
        StatusCode.NotFound => "NOT_FOUND",
        StatusCode.AlreadyExists => "ALREADY_EXISTS",
        StatusCode.PermissionDenied => "PERMISSION_DENIED",
        StatusCode.ResourceExhausted => "RESOURCE_EXHAUSTED",
        StatusCode.FailedPrecondition => "FAILED_PRECONDITION",
        StatusCode.OutOfRange => "OUT_OF_RANGE",
        StatusCode.Unimplemented => "UNIMPLEMENTED",
        StatusCode.DataLoss => "DATA_LOSS",
        StatusCode.Unauthenticated => "UNAUTHENTICATED",
        _ => code.ToString().ToUpperInvariant(),
    };

    /// <summary>Counts and times one public API request by method and status (every API records its requests here).</summary>
    public static void RecordPublicRequest(string method, StatusCode code, double milliseconds)
    {
        var tags = new TagList { { "method", method }, { "status", CodeName(code) } };
        MeshTelemetry.RequestDuration.Record(milliseconds, tags);
        MeshTelemetry.Requests.Add(1, tags);
    }

    /// <summary>Whether a status was made by <see cref="Create"/> (in this process or a stage's).</summary>
    public static bool IsOurs(RpcException e) => e.Trailers.Get(MarkerTrailer) is not null;

    /// <summary>The field a status's BadRequest details name, if any.</summary>
    public static string? Field(RpcException e) =>
        e.GetRpcStatus()?.GetDetail<BadRequest>()?.FieldViolations.FirstOrDefault()?.Field;
}

/// <summary>
/// Every service's handlers run inside this, the one place that sees how each call ends: a <see cref="ServingException"/>
/// becomes its status, an unexpected exception becomes INTERNAL with no .NET text (the server log gets the exception),
/// and a status already made passes as it is. Each failed call is logged once at warning level with its status, trace
/// id and request id (<c>x-request-id</c>, when the caller sent one); calls of the public API are timed and counted by
/// method and status.
/// </summary>
public sealed class ServingErrorInterceptor(ILogger<ServingErrorInterceptor> logger) : Interceptor
{
    /// <summary>Methods of the public API (the gateway's), whose calls feed the request metrics.</summary>
    private const string PublicApi = "/blip2.v1.";
    public override Task<TResponse> UnaryServerHandler<TRequest, TResponse>(TRequest request, ServerCallContext context,
        UnaryServerMethod<TRequest, TResponse> continuation) =>
        Observe(context, () => continuation(request, context));

    public override Task<TResponse> ClientStreamingServerHandler<TRequest, TResponse>(IAsyncStreamReader<TRequest> requestStream,
        ServerCallContext context, ClientStreamingServerMethod<TRequest, TResponse> continuation) =>
        Observe(context, () => continuation(requestStream, context));

    public override Task ServerStreamingServerHandler<TRequest, TResponse>(TRequest request, IServerStreamWriter<TResponse> responseStream,
        ServerCallContext context, ServerStreamingServerMethod<TRequest, TResponse> continuation) =>
        Observe(context, async () => { await continuation(request, responseStream, context); return true; });

    public override Task DuplexStreamingServerHandler<TRequest, TResponse>(IAsyncStreamReader<TRequest> requestStream,
        IServerStreamWriter<TResponse> responseStream, ServerCallContext context, DuplexStreamingServerMethod<TRequest, TResponse> continuation) =>
        Observe(context, async () => { await continuation(requestStream, responseStream, context); return true; });

    /// <summary>Runs one call: its outcome recorded, any failure answered as <see cref="Translate"/> says.</summary>
    private async Task<T> Observe<T>(ServerCallContext context, Func<Task<T>> call)
    {
        var clock = Stopwatch.StartNew();
        try
        {
            var result = await call();
            Record(context, clock, StatusCode.OK);
            return result;
        }
        catch (Exception e) when (Translate(e, context, clock) is { } status)
        {
            throw status;
        }
    }

    /// <summary>The status to answer with; null lets the exception pass (the caller went away: nobody reads an answer).</summary>
    private RpcException? Translate(Exception e, ServerCallContext context, Stopwatch clock)
    {
        if (context.CancellationToken.IsCancellationRequested && e is OperationCanceledException or IOException)
        {
            Record(context, clock, context.Deadline <= DateTime.UtcNow ? StatusCode.DeadlineExceeded : StatusCode.Cancelled);
            return null;
        }
        RpcException status;
        switch (e)
        {
            case ServingException serving:
                status = ServingErrors.ToRpc(serving);
                break;
            case RpcException rpc:
                status = rpc;
                break;
            default:
                logger.LogError(e, "{Method} failed unexpectedly (request id {RequestId})", context.Method, RequestId(context));
                status = ServingErrors.Create(StatusCode.Internal, "internal error: the request could not be completed (the server log has the details)");
                break;
        }
        // The cause (a stage's failure the caller was told of in words) goes to this log only.
        if (e is ServingException or RpcException)
            logger.LogWarning(e.InnerException, "{Method} answered {Status}: {Detail} (request id {RequestId})", context.Method, status.StatusCode, status.Status.Detail, RequestId(context));
        Record(context, clock, status.StatusCode);
        return status;
    }

    private static string RequestId(ServerCallContext context) => context.RequestHeaders.GetValue("x-request-id") ?? "none";

    private static void Record(ServerCallContext context, Stopwatch clock, StatusCode code)
    {
        if (context.Method.StartsWith(PublicApi, StringComparison.Ordinal))
            ServingErrors.RecordPublicRequest(context.Method[(context.Method.LastIndexOf('/') + 1)..], code, clock.Elapsed.TotalMilliseconds);
    }
}
