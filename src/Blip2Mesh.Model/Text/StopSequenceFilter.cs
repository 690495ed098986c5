namespace Blip2Mesh.Model.Text;

/// <summary>
/// Cuts streamed text at the first stop string: the text before it is returned, the stop string and everything after
/// it never are. While streaming it holds back only the end of the text that could still become a stop string (the
/// longest suffix that is a start of one), so every other character is passed on as soon as it arrives.
/// </summary>
public sealed class StopSequenceFilter(IReadOnlyList<string> stops)
{
    private string _held = "";

    /// <summary>A stop string was found: the answer ends here.</summary>
    public bool Stopped { get; private set; }

    /// <summary>Adds the next text delta and returns what can be passed on now.</summary>
    public string Push(string delta)
    {
        if (Stopped || stops.Count == 0) return Stopped ? "" : delta;
        var text = _held + delta;
        // Text already passed on never held the start of a stop string, so a stop can only begin in the held text.
        var cut = stops.Select(s => text.IndexOf(s, StringComparison.Ordinal)).Where(i => i >= 0).DefaultIfEmpty(-1).Min();
        if (cut >= 0)
        {
            Stopped = true;
            _held = "";
            return text[..cut];
        }
        var hold = stops.Max(s => LongestSuffixStarting(text, s));
        _held = text[^hold..];
        return text[..^hold];
    }

    /// <summary>
    /// Adds tokens one at a time as <paramref name="text"/> decodes them and returns how many of them belong to the
    /// answer: all, or those up to the one whose text completes a stop string (none once stopped), so ids and logprobs
    /// end where the text does. <paramref name="passed"/> is the text that can be passed on now.
    /// </summary>
    public int PushTokens(IReadOnlyList<int> ids, StreamingDecoder text, out string passed)
    {
        var output = new System.Text.StringBuilder();
        var kept = 0;
        while (kept < ids.Count && !Stopped) output.Append(Push(text.Push(ids[kept++])));
        passed = output.ToString();
        return kept;
    }

    /// <summary>The answer's tokens ended: what <paramref name="text"/> still held, then what this filter held back, up to a stop string.</summary>
    public string FinishTokens(StreamingDecoder text)
    {
        if (Stopped) return "";
        var rest = Push(text.Finish());
        return Stopped ? rest : rest + Finish();
    }

    /// <summary>The answer ended without a stop string: the held text is the rest of it.</summary>
    public string Finish()
    {
        var rest = _held;
        _held = "";
        return rest;
    }

    /// <summary>Length of the longest suffix of <paramref name="text"/> that is a proper prefix of <paramref name="stop"/>.</summary>
    private static int LongestSuffixStarting(string text, string stop)
    {
        for (var length = Math.Min(stop.Length - 1, text.Length); length > 0; length--)
            if (text.AsSpan(text.Length - length).SequenceEqual(stop.AsSpan(0, length))) return length;
        return 0;
    }
}
