using System.Buffers;
using System.Runtime.InteropServices;
using System.Text;

namespace Blip2Mesh.Model.Text;

/// <summary>
/// SentencePiece's decoding of a run of non-special pieces, fed one id at a time: '▁' becomes a space,
/// the first non-byte piece loses its leading '▁' (the dummy prefix), and runs of byte-fallback pieces are decoded
/// as UTF-8 with one U+FFFD per malformed byte. A byte sequence that is still incomplete stays pending,
/// out of <see cref="Text"/>, until a later piece completes or ends it.
/// </summary>
internal sealed class PieceDecoder(T5Tokenizer tokenizer)
{
    private readonly List<byte> _pendingBytes = [];
    private bool _atStart = true;

    public StringBuilder Text { get; } = new();

    public void Append(int id)
    {
        if (tokenizer.TryGetByte(id, out byte value))
        {
            _pendingBytes.Add(value);
            DecodeBytes(final: false);
            return;
        }
        DecodeBytes(final: true);
        string piece = tokenizer.PieceText(id);
        if (piece.Length == 0)
        {
            return; // a control piece: no text, and the dummy prefix is still to come
        }
        Text.Append(_atStart && piece.StartsWith(' ') ? piece.AsSpan(1) : piece);
        _atStart = false;
    }

    /// <summary>Ends the input: an incomplete byte sequence becomes U+FFFD per byte.</summary>
    public void Complete() => DecodeBytes(final: true);

    private void DecodeBytes(bool final)
    {
        Span<char> utf16 = stackalloc char[2];
        int used = 0;
        while (used < _pendingBytes.Count)
        {
            ReadOnlySpan<byte> rest = CollectionsMarshal.AsSpan(_pendingBytes)[used..];
            OperationStatus status = Rune.DecodeFromUtf8(rest, out Rune rune, out int consumed);
            if (status == OperationStatus.NeedMoreData && !final)
            {
                break;
            }
            if (status == OperationStatus.Done)
            {
                Text.Append(utf16[..rune.EncodeToUtf16(utf16)]);
                used += consumed;
            }
            else
            {
                Text.Append('\uFFFD');
                used += 1;
            }
        }
        _pendingBytes.RemoveRange(0, used);
    }
}
