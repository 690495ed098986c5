using System.Text;
using System.Text.Json;
using System.Text.RegularExpressions;
using Blip2Mesh.Model.Checkpoint;
using Blip2Mesh.Model.Text.SentencePieceProto;
using Google.Protobuf;
using Microsoft.ML.Tokenizers;
using PieceType = Blip2Mesh.Model.Text.SentencePieceProto.ModelProto.Types.SentencePiece.Types.Type;

namespace Blip2Mesh.Model.Text;

/// <summary>
/// T5's SentencePiece tokenizer, matching Hugging Face transformers 4.33 slow <c>T5Tokenizer</c> in legacy
/// mode: the SentencePiece pieces, then <c>extra_ids</c> sentinels <c>&lt;extra_id_N&gt;</c> at id
/// <c>Count - 1 - N</c>. Segmentation is done by Microsoft.ML.Tokenizers' <see cref="SentencePieceTokenizer"/>.
/// </summary>
public sealed partial class T5Tokenizer
{
    private const int DefaultExtraIds = 100;

    private readonly SentencePieceTokenizer _segmenter;
    private readonly PrecompiledCharsMap? _charsMap;
    private readonly string[] _pieces;
    private readonly string[] _pieceTexts;
    private readonly int[] _byteValues;
    private readonly Dictionary<string, int> _specialTokenIds;

    private T5Tokenizer(ModelProto model, int extraIds)
    {
        _pieces = model.Pieces.Select(p => p.Piece).ToArray();
        // SentencePiece decodes control pieces (other than the special ids handled outside it) to nothing.
        _pieceTexts = model.Pieces.Select(p => p.Type == PieceType.Control ? "" : p.Piece.Replace('\u2581', ' ')).ToArray();
        _byteValues = model.Pieces.Select(p => p.Type == PieceType.Byte ? Convert.ToInt32(p.Piece[3..^1], 16) : -1).ToArray();
        Count = _pieces.Length + extraIds;
        PadId = model.TrainerSpec.PadId;
        EosId = model.TrainerSpec.EosId;
        UnkId = model.TrainerSpec.UnkId;

        _specialTokenIds = new Dictionary<string, int>(StringComparer.Ordinal);
        foreach (int id in new[] { PadId, EosId, UnkId }.Where(id => id >= 0))
        {
            _specialTokenIds[_pieces[id]] = id;
        }
        for (int id = _pieces.Length; id < Count; id++)
        {
            _specialTokenIds[IdToToken(id)] = id;
        }

        byte[] charsMap = model.NormalizerSpec?.PrecompiledCharsmap.ToByteArray() ?? [];
        _charsMap = charsMap.Length > 0 ? new PrecompiledCharsMap(charsMap) : null;

        // Microsoft.ML.Tokenizers 2.0.1 indexes its piece table with trainer_spec.bos_id and throws
        // IndexOutOfRangeException for T5's bos_id -1. Give it a <s> control piece after the last real
        // piece: ids of the real pieces stay the same, and the extra id is never produced (no BOS is added).
        if (model.TrainerSpec.BosId < 0)
        {
            model.Pieces.Add(new ModelProto.Types.SentencePiece { Piece = model.TrainerSpec.BosPiece, Score = 0, Type = PieceType.Control });
            model.TrainerSpec.BosId = model.Pieces.Count - 1;
        }
        using var stream = new MemoryStream(model.ToByteArray());
        _segmenter = SentencePieceTokenizer.Create(stream, addBeginningOfSentence: false, addEndOfSentence: false);
    }

    /// <summary>Tokenizer length: SentencePiece pieces plus sentinels.</summary>
    public int Count { get; }

    public int PadId { get; }

    public int EosId { get; }

    public int UnkId { get; }

    /// <summary>Loads <c>spiece.model</c> and <c>extra_ids</c> from <c>tokenizer_config.json</c> (default 100) in a Hugging Face model folder.</summary>
    public static T5Tokenizer Load(string modelDir)
    {
        ModelFolder.Require(modelDir, ModelFiles.Tokenizer);
        ModelProto model = ModelProto.Parser.ParseFrom(File.ReadAllBytes(Path.Combine(modelDir, "spiece.model")));
        int extraIds = DefaultExtraIds;
        string configPath = Path.Combine(modelDir, "tokenizer_config.json");
        if (File.Exists(configPath))
        {
            using JsonDocument config = JsonDocument.Parse(File.ReadAllText(configPath));
            if (config.RootElement.TryGetProperty("extra_ids", out JsonElement value))
            {
                extraIds = value.GetInt32();
            }
        }
        return new T5Tokenizer(model, extraIds);
    }

    /// <summary>
    /// Ids of <c>tokenizer(text).input_ids</c>: special tokens written in the text are split out first
    /// (whitespace next to them is dropped), the rest is segmented by SentencePiece, and <c>&lt;/s&gt;</c>
    /// is appended unless the ids already end with it.
    /// </summary>
    public IReadOnlyList<int> Encode(string text)
    {
        var ids = new List<int>();
        int start = 0;
        foreach (Match match in SpecialTokenCandidate().Matches(text))
        {
            if (_specialTokenIds.TryGetValue(match.Value, out int id))
            {
                ReadOnlySpan<char> before = text.AsSpan(start, match.Index - start);
                EncodeOrdinary(TrimEndPython(start > 0 ? TrimStartPython(before) : before), ids);
                ids.Add(id);
                start = match.Index + match.Length;
            }
        }
        ReadOnlySpan<char> rest = text.AsSpan(start);
        EncodeOrdinary(start > 0 ? TrimStartPython(rest) : rest, ids);
        if (ids.Count == 0 || ids[^1] != EosId)
        {
            ids.Add(EosId);
        }
        return ids;
    }

    /// <summary>
    /// <c>tokenizer.decode(ids, skip_special_tokens)</c> with <c>clean_up_tokenization_spaces=True</c>: special
    /// tokens are kept out of SentencePiece decoding (with a space before the first of a group), the text is
    /// stripped and then cleaned up.
    /// </summary>
    public string Decode(IReadOnlyList<int> ids, bool skipSpecialTokens = true)
    {
        var text = new StringBuilder();
        var run = new PieceDecoder(this);
        bool previousSpecial = false;
        foreach (int id in ids)
        {
            CheckId(id);
            if (!IsSpecial(id))
            {
                run.Append(id);
                previousSpecial = false;
            }
            else if (!skipSpecialTokens)
            {
                if (!previousSpecial)
                {
                    text.Append(' ');
                }
                run.Complete();
                text.Append(run.Text).Append(IdToToken(id));
                run = new PieceDecoder(this);
                previousSpecial = true;
            }
        }
        run.Complete();
        text.Append(run.Text);
        return CleanUpTokenization(StripPython(text.ToString()));
    }

    /// <summary>A decoder that turns ids into text deltas as they are generated; see <see cref="StreamingDecoder"/>.</summary>
    public StreamingDecoder CreateStreamingDecoder() => new(this);

    public string IdToToken(int id)
    {
        CheckId(id);
        return id < _pieces.Length ? _pieces[id] : $"<extra_id_{Count - 1 - id}>";
    }

    /// <summary>Whether <paramref name="id"/> is one of HF's <c>all_special_ids</c>: pad, eos, unk and the sentinels.</summary>
    public bool IsSpecial(int id) => id == PadId || id == EosId || id == UnkId || id >= _pieces.Length;

    internal string PieceText(int id) => _pieceTexts[id];

    internal bool TryGetByte(int id, out byte value)
    {
        value = (byte)_byteValues[id];
        return _byteValues[id] >= 0;
    }

    /// <summary>
    /// Ids at or above <see cref="Count"/> exist in models whose vocabulary is padded (Flan-T5: 32128 logits for
    /// 32100 tokens); a sampling request can draw one. They decode as the special tokens HF names them after
    /// (<c>&lt;extra_id_-N&gt;</c>), never as a crash of the stream.
    /// </summary>
    internal static void CheckId(int id) => ArgumentOutOfRangeException.ThrowIfNegative(id);

    private void EncodeOrdinary(ReadOnlySpan<char> text, List<int> ids)
    {
        if (text.IsEmpty)
        {
            return;
        }
        string normalizable = _charsMap?.RemoveDeleted(text.ToString()) ?? text.ToString();
        int first = ids.Count;
        foreach (int id in _segmenter.EncodeToIds(normalizable, addBeginningOfSentence: false, addEndOfSentence: false))
        {
            // SentencePiece emits one <unk> for a run of unknown characters; the library emits one per character.
            if (id == UnkId && ids.Count > first && ids[^1] == UnkId)
            {
                continue;
            }
            ids.Add(id);
        }
    }

    /// <summary>HF's <c>clean_up_tokenization</c>, applied in the same order.</summary>
    internal static string CleanUpTokenization(string text) => text
        .Replace(" .", ".")
        .Replace(" ?", "?")
        .Replace(" !", "!")
        .Replace(" ,", ",")
        .Replace(" ' ", "'")
        .Replace(" n't", "n't")
        .Replace(" 'm", "'m")
        .Replace(" 's", "'s")
        .Replace(" 've", "'ve")
        .Replace(" 're", "'re");

    /// <summary>Python's <c>str.isspace</c> for one character (adds U+001C..U+001F to .NET's set).</summary>
    internal static bool IsPythonSpace(char c) => char.IsWhiteSpace(c) || c is >= '\u001C' and <= '\u001F';

    private static string StripPython(string text) => TrimEndPython(TrimStartPython(text)).ToString();

    private static ReadOnlySpan<char> TrimStartPython(ReadOnlySpan<char> text)
    {
        int start = 0;
        while (start < text.Length && IsPythonSpace(text[start]))
        {
            start++;
        }
        return text[start..];
    }

    private static ReadOnlySpan<char> TrimEndPython(ReadOnlySpan<char> text)
    {
        int end = text.Length;
        while (end > 0 && IsPythonSpace(text[end - 1]))
        {
            end--;
        }
        return text[..end];
    }

    // Every special token is '<', no '<' or '>', then '>', so each occurrence is one of these matches.
    [GeneratedRegex("<[^<>]*>")]
    private static partial Regex SpecialTokenCandidate();
}
