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

    /// <summary>Whether a status was made by <see cref="Create"/> (in this process or a stage's).</summary>
    public static bool IsOurs(RpcException e) => e.Trailers.Get(MarkerTrailer) is not null;

    /// <summary>The field a status's BadRequest details name, if any.</summary>
    public static string? Field(RpcException e) =>
        e.GetRpcStatus()?.GetDetail<BadRequest>()?.FieldViolations.FirstOrDefault()?.Field;
}

/// <summary>
/// Every service's handlers run inside this: a <see cref="ServingException"/> becomes its status (logged once at
/// warning level), an unexpected exception becomes INTERNAL with no .NET text (the server log gets the exception),
/// and a status already made passes as it is.
/// </summary>
public sealed class ServingErrorInterceptor(ILogger<ServingErrorInterceptor> logger) : Interceptor
{
    public override async Task<TResponse> UnaryServerHandler<TRequest, TResponse>(TRequest request, ServerCallContext context,
        UnaryServerMethod<TRequest, TResponse> continuation)
    {
        try
        {
            return await continuation(request, context);
        }
        catch (Exception e) when (Translate(e, context) is { } status)
        {
            throw status;
        }
    }

    public override async Task ServerStreamingServerHandler<TRequest, TResponse>(TRequest request, IServerStreamWriter<TResponse> responseStream,
        ServerCallContext context, ServerStreamingServerMethod<TRequest, TResponse> continuation)
    {
        try
        {
            await continuation(request, responseStream, context);
        }
        catch (Exception e) when (Translate(e, context) is { } status)
        {
            throw status;
        }
    }

    public override async Task DuplexStreamingServerHandler<TRequest, TResponse>(IAsyncStreamReader<TRequest> requestStream,
        IServerStreamWriter<TResponse> responseStream, ServerCallContext context, DuplexStreamingServerMethod<TRequest, TResponse> continuation)
    {
        try
        {
            await continuation(requestStream, responseStream, context);
        }
        catch (Exception e) when (Translate(e, context) is { } status)
        {
            throw status;
        }
    }

    public override async Task<TResponse> ClientStreamingServerHandler<TRequest, TResponse>(IAsyncStreamReader<TRequest> requestStream,
        ServerCallContext context, ClientStreamingServerMethod<TRequest, TResponse> continuation)
    {
        try
        {
            return await continuation(requestStream, context);
        }
        catch (Exception e) when (Translate(e, context) is { } status)
        {
            throw status;
        }
    }

    /// <summary>The status to answer with; null lets the exception pass (the caller went away: nobody reads an answer).</summary>
    private RpcException? Translate(Exception e, ServerCallContext context)
    {
        if (context.CancellationToken.IsCancellationRequested && e is OperationCanceledException or IOException) return null;
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
                logger.LogError(e, "{Method} failed unexpectedly", context.Method);
                return ServingErrors.Create(StatusCode.Internal, "internal error: the request could not be completed (the server log has the details)");
        }
        logger.LogWarning("{Method} answered {Status}: {Detail}", context.Method, status.StatusCode, status.Status.Detail);
        return status;
    }
}
