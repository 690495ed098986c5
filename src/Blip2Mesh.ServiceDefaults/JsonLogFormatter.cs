using System.Diagnostics;
using System.Text.Json;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using Microsoft.Extensions.Logging.Console;
using Microsoft.Extensions.Options;

namespace Blip2Mesh.ServiceDefaults;

/// <summary>The JSON log line's settings: which service wrote it.</summary>
public sealed class JsonLogFormatterOptions : ConsoleFormatterOptions
{
    public string Service { get; set; } = "";
}

/// <summary>
/// One JSON object per line, every field at the top level (<c>jq</c>-friendly): ISO-8601 UTC timestamp, level, service,
/// category, message, the current trace and span ids, and the exception when there is one.
/// </summary>
public sealed class JsonLogFormatter(IOptionsMonitor<JsonLogFormatterOptions> options) : ConsoleFormatter(FormatterName)
{
    public const string FormatterName = "blip2mesh-json";

    public override void Write<TState>(in LogEntry<TState> entry, IExternalScopeProvider? scopeProvider, TextWriter textWriter)
    {
        using var buffer = new MemoryStream();
        using (var json = new Utf8JsonWriter(buffer))
        {
            json.WriteStartObject();
            json.WriteString("timestamp", DateTimeOffset.UtcNow.ToString("O"));
            json.WriteString("level", entry.LogLevel.ToString());
            json.WriteString("service", options.CurrentValue.Service);
            json.WriteString("category", entry.Category);
            json.WriteString("message", entry.Formatter(entry.State, entry.Exception));
            if (Activity.Current is { } activity)
            {
                json.WriteString("trace_id", activity.TraceId.ToHexString());
                json.WriteString("span_id", activity.SpanId.ToHexString());
            }
            if (entry.Exception is { } exception) json.WriteString("exception", exception.ToString());
            json.WriteEndObject();
        }
        textWriter.WriteLine(System.Text.Encoding.UTF8.GetString(buffer.GetBuffer(), 0, (int)buffer.Length));
    }
}
