using System.Text.Json;
using Blip2Mesh.Model.Text;
using Microsoft.ML.Tokenizers;

namespace Blip2Mesh.Tests;

public class TokenizerTests
{
    private static readonly string RepoRoot = FindRepoRoot();
    private static readonly string TinyDir = Path.Combine(RepoRoot, "tests", "fixtures", "blip2-tiny-a");
    private static readonly string DemoDir = Path.Combine(RepoRoot, "models", "blip2-demo");
    private static readonly JsonElement Reference = JsonDocument.Parse(File.ReadAllText(Path.Combine(TinyDir, "tokenizer_reference.json"))).RootElement;
    private static readonly T5Tokenizer Tiny = T5Tokenizer.Load(TinyDir);
    private static readonly T5Tokenizer Demo = T5Tokenizer.Load(DemoDir);

    public static TheoryData<int> EncodeCases => Indices("encode_cases");

    public static TheoryData<int> DecodeCases => Indices("decode_cases");

    [Theory]
    [MemberData(nameof(EncodeCases))]
    public void EncodeCase_MatchesReference(int index)
    {
        JsonElement c = Reference.GetProperty("encode_cases")[index];
        int[] expected = Ints(c.GetProperty("input_ids"));

        IReadOnlyList<int> ids = Tiny.Encode(c.GetProperty("text").GetString()!);

        Assert.Equal(expected, ids);
        Assert.Equal(c.GetProperty("decoded_skip_special").GetString(), Tiny.Decode(expected, skipSpecialTokens: true));
        Assert.Equal(c.GetProperty("decoded_keep_special").GetString(), Tiny.Decode(expected, skipSpecialTokens: false));
        AssertStreams(Tiny, expected);
    }

    [Theory]
    [MemberData(nameof(DecodeCases))]
    public void DecodeCase_MatchesReference(int index)
    {
        JsonElement c = Reference.GetProperty("decode_cases")[index];
        int[] ids = Ints(c.GetProperty("ids"));

        Assert.Equal(c.GetProperty("decoded_skip_special").GetString(), Tiny.Decode(ids, skipSpecialTokens: true));
        Assert.Equal(c.GetProperty("decoded_keep_special").GetString(), Tiny.Decode(ids, skipSpecialTokens: false));
        AssertStreams(Tiny, ids);
    }

    [Fact]
    public void IdToToken_MatchesReferenceForEveryId()
    {
        string[] expected = Reference.GetProperty("id_to_token").EnumerateArray().Select(e => e.GetString()!).ToArray();

        Assert.Equal(Reference.GetProperty("tokenizer_length").GetInt32(), Tiny.Count);
        Assert.Equal(expected, Enumerable.Range(0, Tiny.Count).Select(Tiny.IdToToken));
    }

    [Fact]
    public void SpecialIds_MatchReference()
    {
        Assert.Equal(Reference.GetProperty("pad_token_id").GetInt32(), Tiny.PadId);
        Assert.Equal(Reference.GetProperty("eos_token_id").GetInt32(), Tiny.EosId);
        Assert.Equal(Reference.GetProperty("unk_token_id").GetInt32(), Tiny.UnkId);
        Assert.Equal(Ints(Reference.GetProperty("all_special_ids")), Enumerable.Range(0, Tiny.Count).Where(Tiny.IsSpecial));
    }

    [Fact]
    public void LibraryDefect_BosIdMinusOne_IsHandled()
    {
        // Microsoft.ML.Tokenizers 2.0.1 cannot load T5's layout (bos_id -1) as it is; Load rewrites it.
        using (FileStream raw = File.OpenRead(Path.Combine(TinyDir, "spiece.model")))
        {
            Assert.Throws<IndexOutOfRangeException>(() => SentencePieceTokenizer.Create(raw, false, false));
        }

        Assert.Equal(2100, Tiny.Count);
        Assert.Equal([3, 16, 21, 9, 1], Tiny.Encode("a photo of"));
    }

    [Fact]
    public void LibraryDefect_UnknownRun_GivesOneUnk()
    {
        // "と" is not in the vocabulary: SentencePiece gives one <unk> for the run "とと", the library one per character.
        Assert.Equal([513, 2, 834, 1], Tiny.Encode("猫とと犬"));
        Assert.Equal([15, 2, 1], Tiny.Encode("∑∫≈"));
        // A written <unk> is its own token and does not merge with an unknown run next to it.
        Assert.Equal([2, 15, 2, 1], Tiny.Encode("<unk>∑"));
    }

    [Fact]
    public void LibraryDefect_PadOnDecode_IsDropped()
    {
        Assert.Equal("a red", Tiny.Decode([0, 3, 94, 1, 0]));
        Assert.Equal("<pad> a red</s><pad>", Tiny.Decode([0, 3, 94, 1, 0], skipSpecialTokens: false));
    }

    [Fact]
    public void LibraryDefect_CharactersNormalizedAway_AreRemoved()
    {
        // nmt_nfkc maps control characters such as U+0007 to nothing; the library kept them as <unk>.
        Assert.Equal(Tiny.Encode("ab"), Tiny.Encode("a\u0007b"));
        Assert.Equal(Tiny.Encode("a b"), Tiny.Encode("a \u0001\u007f b"));
        Assert.Equal(Tiny.Encode("a"), Tiny.Encode("\u0007 a"));
    }

    [Fact]
    public void Encode_SpecialTokensInText_AreSplitWithHfWhitespaceHandling()
    {
        Assert.Equal([2099, 2099, 1], Tiny.Encode("<extra_id_0> <extra_id_0>"));
        Assert.Equal([3, 1, 3, 1], Tiny.Encode("a </s> a"));
        // Not a sentinel of this tokenizer (100 sentinels, and no leading zeros): plain text.
        Assert.Equal(Tiny.Encode("<extra_id_100>"), Tiny.Encode(" <extra_id_100>"));
        Assert.NotEqual(2099, Tiny.Encode("<extra_id_00>")[0]);
    }

    [Fact]
    public void Decode_TreatsIdsOfThePaddedVocabularyAsSpecialAndRejectsNegativeOnes()
    {
        // tiny-a has 2176 logits for 2100 tokens: a sampled id in the padding must not break a stream.
        Assert.Equal("a red", Tiny.Decode([3, 2100, 94, 2175]));
        Assert.Equal("<extra_id_-1>", Tiny.IdToToken(2100));
        var streaming = Tiny.CreateStreamingDecoder();
        Assert.Equal("a red", string.Concat(new[] { 3, 2100, 94, 2175 }.Select(streaming.Push)) + streaming.Finish());
        Assert.Throws<ArgumentOutOfRangeException>(() => Tiny.Decode([-1]));
    }

    [Fact]
    public void StreamingDecoder_EmitsTextBeforeTheEnd()
    {
        StreamingDecoder decoder = Tiny.CreateStreamingDecoder();

        Assert.Equal("a", decoder.Push(3));
        Assert.Equal(" red", decoder.Push(94));
        Assert.Equal(" square", decoder.Push(220));
        Assert.Equal("", decoder.Push(1));
        Assert.Equal("", decoder.Finish());
    }

    [Fact]
    public void StreamingDecoder_HoldsTextTheCleanUpCanRewrite()
    {
        // isn 't it ? -> "isn 't it?": the space before "?" is only removed once "?" arrives.
        int[] ids = [7, 23, 497, 43, 33, 15, 10, 1];
        AssertStreams(Tiny, ids);
        StreamingDecoder decoder = Tiny.CreateStreamingDecoder();
        string shown = string.Concat(ids[..6].Select(decoder.Push));
        Assert.Equal("isn 't it", shown);
    }

    [Fact]
    public void DemoModel_LoadsAndRoundTrips()
    {
        const string prompt = "Question: what color is the background? Answer:";

        IReadOnlyList<int> ids = Demo.Encode(prompt);

        Assert.Equal(700, Demo.Count);
        Assert.Equal(Demo.EosId, ids[^1]);
        Assert.DoesNotContain(Demo.UnkId, ids);
        Assert.Equal(prompt, Demo.Decode(ids));
        Assert.Equal(prompt + "</s>", Demo.Decode(ids, skipSpecialTokens: false));
        Assert.Equal("<extra_id_0>", Demo.IdToToken(699));
        Assert.Equal([1], Demo.Encode(""));
    }

    [Theory]
    [InlineData("Question: what color is the background? Answer:")]
    [InlineData("a red circle and a green square on a white background")]
    [InlineData("a orange star on a purple background.")]
    [InlineData("Question: how many shapes are there? Answer: two")]
    [InlineData("it's isn't don't I'm you're we've ' they 're , ok !")]
    public void StreamingDecoder_DemoModel_ConcatenatesToDecode(string text)
    {
        AssertStreams(Demo, Demo.Encode(text).ToArray());
    }

    [Fact]
    public void StreamingDecoder_RandomSequencesOfCleanUpSensitivePieces_ConcatenateToDecode()
    {
        // Pieces that take part in clean-up rules and whitespace handling, mixed with special ids.
        string[] pieces = ["▁", "▁'", "'", "n", "t", "s", "m", "v", "e", "re", "▁a", ".", ",", "?", "!", "▁!", "▁it"];
        Dictionary<string, int> idOf = Enumerable.Range(0, Tiny.Count).ToDictionary(Tiny.IdToToken);
        int[] alphabet = [.. pieces.Select(p => idOf[p]), Tiny.PadId, Tiny.EosId, Tiny.UnkId, 2099];
        var random = new Random(1234);
        for (int n = 0; n < 3000; n++)
        {
            int[] ids = Enumerable.Range(0, random.Next(1, 12)).Select(_ => alphabet[random.Next(alphabet.Length)]).ToArray();
            AssertStreams(Tiny, ids);
        }
    }

    [Fact]
    public void ByteFallbackPieces_DecodeAsUtf8AndStreamWhenComplete()
    {
        // tiny-a with the 256 byte pieces <0x00>..<0xFF> appended (ids 2000..2255): repeated protobuf fields
        // may be appended to a serialized message.
        string dir = Directory.CreateTempSubdirectory("t5-bytes").FullName;
        try
        {
            var model = new List<byte>(File.ReadAllBytes(Path.Combine(TinyDir, "spiece.model")));
            for (int b = 0; b < 256; b++)
            {
                byte[] piece = System.Text.Encoding.ASCII.GetBytes($"<0x{b:X2}>");
                byte[] message = [0x0A, (byte)piece.Length, .. piece, 0x18, 6];
                model.AddRange([0x0A, (byte)message.Length, .. message]);
            }
            File.WriteAllBytes(Path.Combine(dir, "spiece.model"), model.ToArray());
            T5Tokenizer tokenizer = T5Tokenizer.Load(dir);
            int Byte(int value) => 2000 + value;

            Assert.Equal(2356, tokenizer.Count);
            Assert.Equal("<0xC3>", tokenizer.IdToToken(Byte(0xC3)));
            Assert.Equal("aé", tokenizer.Decode([3, Byte(0xC3), Byte(0xA9)]));
            // One U+FFFD per malformed byte, as SentencePiece does.
            Assert.Equal("a\uFFFD\uFFFD red", tokenizer.Decode([3, Byte(0xE3), Byte(0x81), 94]));

            StreamingDecoder decoder = tokenizer.CreateStreamingDecoder();
            Assert.Equal("a", decoder.Push(3));
            Assert.Equal("", decoder.Push(Byte(0xE7)));
            Assert.Equal("", decoder.Push(Byte(0x8C)));
            Assert.Equal("猫", decoder.Push(Byte(0xAB)));
            Assert.Equal("", decoder.Push(Byte(0xC3)));
            Assert.Equal("\uFFFD", decoder.Finish());
            AssertStreams(tokenizer, [Byte(0xE3), 2255 + 100, Byte(0x81), Byte(0x82), 94, Byte(0xF0), 1]);
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    /// <summary>Pushes ids one at a time: every partial concatenation is a prefix of the final text, which equals Decode(ids, true).</summary>
    private static void AssertStreams(T5Tokenizer tokenizer, int[] ids)
    {
        string expected = tokenizer.Decode(ids, skipSpecialTokens: true);
        StreamingDecoder decoder = tokenizer.CreateStreamingDecoder();
        string shown = "";
        foreach (int id in ids)
        {
            shown += decoder.Push(id);
            Assert.StartsWith(shown, expected, StringComparison.Ordinal);
        }
        shown += decoder.Finish();
        Assert.Equal(expected, shown);
    }

    private static TheoryData<int> Indices(string name)
    {
        var data = new TheoryData<int>();
        for (int i = 0; i < Reference.GetProperty(name).GetArrayLength(); i++)
        {
            data.Add(i);
        }
        return data;
    }

    private static int[] Ints(JsonElement array) => array.EnumerateArray().Select(e => e.GetInt32()).ToArray();

    private static string FindRepoRoot()
    {
        string? dir = AppContext.BaseDirectory;
        while (dir is not null && !File.Exists(Path.Combine(dir, "Blip2Mesh.sln")))
        {
            dir = Path.GetDirectoryName(dir);
        }
        return dir ?? throw new DirectoryNotFoundException("Blip2Mesh.sln not found above the test binaries.");
    }
}
