using System.Buffers;
using System.Buffers.Binary;
using System.Text;

namespace Blip2Mesh.Model.Text;

/// <summary>
/// SentencePiece's normalization rules (normalizer_spec.precompiled_charsmap): a uint32 trie size, a
/// darts-clone double-array trie over UTF-8 keys, then the NUL-terminated replacement strings.
/// Used only to find the sequences the rules delete (e.g. U+0007 in nmt_nfkc), because
/// Microsoft.ML.Tokenizers 2.0.1 keeps such sequences instead of removing them.
/// </summary>
internal sealed class PrecompiledCharsMap
{
    private readonly uint[] _units;
    private readonly byte[] _replacements;

    public PrecompiledCharsMap(ReadOnlySpan<byte> blob)
    {
        int trieBytes = checked((int)BinaryPrimitives.ReadUInt32LittleEndian(blob));
        _units = new uint[trieBytes / 4];
        for (int i = 0; i < _units.Length; i++)
        {
            _units[i] = BinaryPrimitives.ReadUInt32LittleEndian(blob.Slice(4 + 4 * i));
        }
        _replacements = blob.Slice(4 + trieBytes).ToArray();
    }

    /// <summary>
    /// Removes every sequence whose replacement is empty, walking the text the way SentencePiece's
    /// normalizer does (longest rule at each position, else one character), and leaves everything else
    /// for the library's own normalization.
    /// </summary>
    public string RemoveDeleted(string text)
    {
        byte[] utf8 = Encoding.UTF8.GetBytes(text);
        var kept = new ArrayBufferWriter<byte>(utf8.Length);
        bool removed = false;
        int i = 0;
        while (i < utf8.Length)
        {
            (int length, int replacement) = LongestMatch(utf8.AsSpan(i));
            if (length > 0 && _replacements[replacement] == 0)
            {
                removed = true;
                i += length;
                continue;
            }
            if (length == 0)
            {
                Rune.DecodeFromUtf8(utf8.AsSpan(i), out _, out length);
            }
            kept.Write(utf8.AsSpan(i, length));
            i += length;
        }
        return removed ? Encoding.UTF8.GetString(kept.WrittenSpan) : text;
    }

    /// <summary>Longest key that prefixes <paramref name="input"/>: its byte length (0 if none) and the offset of its replacement.</summary>
    private (int Length, int Replacement) LongestMatch(ReadOnlySpan<byte> input)
    {
        int length = 0, replacement = 0;
        uint position = Offset(_units[0]);
        for (int i = 0; i < input.Length; i++)
        {
            position ^= input[i];
            if (position >= _units.Length || Label(_units[position]) != input[i])
            {
                break;
            }
            uint unit = _units[position];
            position ^= Offset(unit);
            if (HasLeaf(unit) && position < _units.Length)
            {
                length = i + 1;
                replacement = (int)(_units[position] & 0x7FFFFFFF);
            }
        }
        return (length, replacement);
    }

    // darts-clone unit layout.
    private static uint Offset(uint unit) => (unit >> 10) << (int)((unit & (1u << 9)) >> 6);

    private static uint Label(uint unit) => unit & ((1u << 31) | 0xFF);

    private static bool HasLeaf(uint unit) => ((unit >> 8) & 1) == 1;
}
