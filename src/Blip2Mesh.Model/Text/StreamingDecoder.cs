using System.Text;

namespace Blip2Mesh.Model.Text;

/// <summary>
/// Turns generated ids into text deltas: the concatenation of every <see cref="Push"/> result and the
/// <see cref="Finish"/> result is exactly <see cref="T5Tokenizer.Decode"/>(ids, skipSpecialTokens: true).
/// A delta is never retracted, so text is held back while a later token could still change it:
/// trailing whitespace (stripped at the end, or kept before more text), an incomplete UTF-8 sequence from
/// byte-fallback pieces, and text a clean-up rule could still rewrite.
/// </summary>
public sealed class StreamingDecoder
{
    // Clean-up rules whose text after the leading space has more than one character; a cut inside that
    // text could split a match. The other rules need a space next to the cut, and cuts never touch one.
    private static readonly string[] MultiCharCleanUps = ["n't", "'m", "'s", "'ve", "'re"];

    private readonly T5Tokenizer _tokenizer;
    private readonly PieceDecoder _pieces;
    private int _emittedUpTo;
    private bool _textStarted;

    internal StreamingDecoder(T5Tokenizer tokenizer)
    {
        _tokenizer = tokenizer;
        _pieces = new PieceDecoder(tokenizer);
    }

    /// <summary>Adds the next generated id and returns the text that can be shown now (often empty).</summary>
    public string Push(int id)
    {
        T5Tokenizer.CheckId(id);
        if (_tokenizer.IsSpecial(id))
        {
            return "";
        }
        _pieces.Append(id);
        return Emit(final: false);
    }

    /// <summary>Ends the sequence and returns the rest of the text.</summary>
    public string Finish()
    {
        _pieces.Complete();
        return Emit(final: true);
    }

    /// <summary>
    /// Emits the clean-up of the text up to the last safe cut. Clean-up only deletes spaces in front of or
    /// around the rule text, so a cut between two non-space characters that cannot lie inside one rule's text
    /// splits the clean-up of the whole into the clean-up of the parts.
    /// </summary>
    private string Emit(bool final)
    {
        var text = _pieces.Text;
        if (!_textStarted)
        {
            // Decode strips leading whitespace, whatever follows.
            while (_emittedUpTo < text.Length && T5Tokenizer.IsPythonSpace(text[_emittedUpTo]))
            {
                _emittedUpTo++;
            }
            _textStarted = _emittedUpTo < text.Length;
        }

        int end = text.Length;
        if (final)
        {
            while (end > _emittedUpTo && T5Tokenizer.IsPythonSpace(text[end - 1]))
            {
                end--;
            }
        }
        else
        {
            while (end > _emittedUpTo && !IsSafeCut(text, end))
            {
                end--;
            }
        }
        if (end <= _emittedUpTo)
        {
            return "";
        }
        string delta = T5Tokenizer.CleanUpTokenization(text.ToString(_emittedUpTo, end - _emittedUpTo));
        _emittedUpTo = end;
        return delta;
    }

    private static bool IsSafeCut(StringBuilder text, int cut)
    {
        // At the end of the text the next character is still unknown. Should it be a space, only " ' " could
        // span the cut, and a cut after "'" is refused below.
        if (T5Tokenizer.IsPythonSpace(text[cut - 1]) || (cut < text.Length && T5Tokenizer.IsPythonSpace(text[cut])))
        {
            return false;
        }
        foreach (string rule in MultiCharCleanUps)
        {
            for (int split = 1; split < rule.Length; split++)
            {
                if (rule[split - 1] == text[cut - 1] && AgreesWith(text, cut, rule.AsSpan(split)))
                {
                    return false;
                }
            }
        }
        return true;
    }

    /// <summary>Whether the text from <paramref name="start"/> and <paramref name="expected"/> agree where both exist.</summary>
    private static bool AgreesWith(StringBuilder text, int start, ReadOnlySpan<char> expected)
    {
        for (int i = 0; i < expected.Length && start + i < text.Length; i++)
        {
            if (text[start + i] != expected[i])
            {
                return false;
            }
        }
        return true;
    }
}
