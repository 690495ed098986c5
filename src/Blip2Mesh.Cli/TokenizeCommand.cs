using System.Text.Json;
using Blip2Mesh.Model.Text;

namespace Blip2Mesh.Cli;

/// <summary><c>blip2mesh tokenize</c>: the checkpoint's tokenizer, encode and decode.</summary>
internal static class TokenizeCommand
{
    public static int Run(string[] argv)
    {
        var args = new Args(argv, ModelInputs.Flags);
        var tokenizer = T5Tokenizer.Load(args.Required("model"));
        var text = args.Optional("text");
        var jsonl = args.Optional("jsonl");
        var decode = args.Optional("decode");
        args.EnsureAllUsed();
        if (new[] { text, jsonl, decode }.Count(x => x is not null) != 1)
            throw new UsageException("give exactly one of --text, --jsonl and --decode");

        if (text is not null)
        {
            Console.Out.WriteLine(CliJson.Serialize(new { ids = tokenizer.Encode(text) }));
        }
        else if (decode is not null)
        {
            var ids = decode.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).Select(ParseId).ToArray();
            foreach (var id in ids)
                if (id < 0 || id >= tokenizer.Count) throw new UsageException($"--decode: id {id} is outside the vocabulary (0..{tokenizer.Count - 1})");
            Console.Out.WriteLine(CliJson.Serialize(new { text = tokenizer.Decode(ids) }));
        }
        else
        {
            foreach (var line in File.ReadLines(jsonl!))
            {
                if (string.IsNullOrWhiteSpace(line)) continue;
                using var doc = JsonDocument.Parse(line);
                var ids = tokenizer.Encode(doc.RootElement.GetProperty("text").GetString() ?? "");
                Console.Out.WriteLine(CliJson.Serialize(new { ids, decoded = tokenizer.Decode(ids) }));
            }
        }
        return 0;
    }

    private static int ParseId(string s) =>
        int.TryParse(s, out var id) ? id : throw new UsageException($"--decode: '{s}' is not a token id");
}
