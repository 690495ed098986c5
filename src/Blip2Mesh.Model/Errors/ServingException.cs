namespace Blip2Mesh.Model.Errors;

/// <summary>What went wrong, from the caller's side; the services map each kind to one gRPC (and HTTP) status.</summary>
public enum ErrorKind
{
    /// <summary>The request is wrong (a field, a value, a size): the same request fails again anywhere.</summary>
    InvalidRequest,
    /// <summary>The request is well formed but larger than this deployment can ever serve (over a whole budget).</summary>
    NeverFits,
    /// <summary>Something the request names (an image id) is not known here.</summary>
    NotFound,
    /// <summary>Caller and server disagree on something fixed, such as the model both must run.</summary>
    Mismatch,
    /// <summary>Too busy right now: the same request may succeed later or on another replica.</summary>
    Overloaded,
    /// <summary>Not able to serve at all right now (loading, stopping, a stage down): retry later or elsewhere.</summary>
    Unavailable,
    /// <summary>The caller's deadline passed before the work was done.</summary>
    DeadlineExceeded,
    /// <summary>Something failed that the caller can do nothing about (the server log has the cause).</summary>
    Internal,
}

/// <summary>
/// An error meant for the caller: <see cref="Exception.Message"/> is a sentence they can act on (no .NET wording, no
/// internal addresses), <see cref="Field"/> the request field at fault, if one is. Raised where the decision is made;
/// mapped to a status in one place (ServiceDefaults' ServingErrors).
/// </summary>
public class ServingException(ErrorKind kind, string message, string? field = null, Exception? cause = null) : Exception(message, cause)
{
    public ErrorKind Kind { get; } = kind;
    public string? Field { get; } = field;

    /// <summary>Whether the same request may succeed on another attempt or replica.</summary>
    public bool IsTransient => Kind is ErrorKind.Overloaded or ErrorKind.Unavailable;

    public static ServingException Invalid(string field, string message) => new(ErrorKind.InvalidRequest, $"{field}: {message}", field);
    public static ServingException NeverFits(string message) => new(ErrorKind.NeverFits, message);
    public static ServingException NotFound(string message) => new(ErrorKind.NotFound, message);
    public static ServingException Mismatch(string message) => new(ErrorKind.Mismatch, message);
    public static ServingException Unavailable(string message) => new(ErrorKind.Unavailable, message);
}
