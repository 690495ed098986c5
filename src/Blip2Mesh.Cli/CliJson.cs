using System.Text.Encodings.Web;
using System.Text.Json;

namespace Blip2Mesh.Cli;

internal static class CliJson
{
    /// <summary>Compact JSON that keeps non-ASCII text readable on a terminal.</summary>
    public static readonly JsonSerializerOptions Options = new() { Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping };

    public static string Serialize<T>(T value) => JsonSerializer.Serialize(value, Options);
}
