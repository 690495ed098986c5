using Blip2Mesh.Model.Errors;

namespace Blip2Mesh.Model.Imaging;

/// <summary>The encoded bytes cannot be turned into an image: empty, not a supported format, truncated or too large.</summary>
public sealed class InvalidImageException(string message) : ServingException(ErrorKind.InvalidRequest, $"image: {message}", "image");
