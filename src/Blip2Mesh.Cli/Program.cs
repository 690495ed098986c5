using Blip2Mesh.Cli;
using Blip2Mesh.Model.Generation;
using Blip2Mesh.Model.Imaging;

const string GenerationOptions = """
    generation options: --max-new-tokens N (30) --min-new-tokens N --num-beams N --length-penalty X
      --do-sample --temperature X --top-k N (50) --top-p X --seed N --repetition-penalty X --no-repeat-ngram-size N
    """;
const string ServiceOptions = """
    every service: [--http-port N] [--bind ADDR (127.0.0.1)] [--tls-cert FILE --tls-key FILE] [--device cpu|cuda] [--threads N]
    vision, qformer, decoder: [--weights auto|int8|int4|STAGE=MODE,... (auto)] [--cache-dir DIR]
    vision, qformer: [--max-batch N (8)] [--max-batch-delay-ms M (0)]
    decoder: [--max-batch-rows N (64)] [--kv-cache-mb N (1024)] [--max-queued N (1024)]
             [--short-answer-tokens N (32)] [--long-answer-share X (0.75)]
             [--encoder-batching auto|on|off (auto: measured at start-up, on with CUDA)] [--max-encoder-batch N (8)] [--encoder-batch-delay-ms M (1)]
    gateway: --vision HOST:PORT[,...] --qformer HOST:PORT[,...] --decoder HOST:PORT[,...] [--redis HOST:PORT]
             [--api-keys-file FILE] [--cache-mb N (256)] [--max-image-mb N (20)] [--max-image-work-mb N (448)] [--tls-ca FILE]
             [--model-name NAME (the model folder's name; the OpenAI API's model id)]
    gateway and decoder (give both the same): [--max-new-tokens-limit N (512)] [--max-beams-limit N (8)]
             [--max-prompt-tokens N (256)] [--max-prompt-bytes N (16384)]
    """;

Command[] commands =
[
    new("generate", "caption or answer about an image in this process", $$"""
        usage: blip2mesh generate --model DIR (--image FILE | --pixel-values FILE) [--prompt TEXT] [generation options] [--json] [--device cpu|cuda]
                                [--weights auto|int8|int4|STAGE=MODE,...] [--cache-dir DIR]
               blip2mesh generate --model DIR --jsonl FILE [--device cpu|cuda] [--weights ...] [--cache-dir DIR]
        Streams the answer as it is generated (--json: one JSON object with ids, text and finish_reason at the end).
        --jsonl: one request per line, {"image": PATH, "prompt": TEXT, "num_beams": 4, ...} (options in snake_case), one JSON result per line.
        {{GenerationOptions}}
        """, GenerateCommand.Run),
    new("caption", "ask a running gateway (blip2mesh up) about an image", $"""
        usage: blip2mesh caption IMAGE [--prompt TEXT] [--addr HOST:PORT (127.0.0.1:50051)] [--api-key KEY] [--stop TEXT]
                                 [generation options]
        Streams the gateway's answer; --api-key (or BLIP2MESH_API_KEY) when the gateway requires one. --stop ends the
        answer before TEXT. With --num-return-sequences N > 1 (beams, or --do-sample) prints "[i] answer" per line.
        {GenerationOptions}
        """, CaptionCommand.Run),
    new("up", "the whole mesh on 127.0.0.1, until Ctrl-C", """
        usage: blip2mesh up --model DIR [--port P (50051)] [--http-port N (P+1)] [--decoder-replicas N (1)] [--redis HOST:PORT]
                            [--device cpu|cuda] [--threads N] [--weights auto|int8|int4|STAGE=MODE,...] [--cache-dir DIR]
                            [--model-name NAME (the model folder's name; the OpenAI API's model id)]
        Starts vision, qformer, the decoders and the gateway, each its own process; prints "ready 127.0.0.1:P" once
        all report SERVING. The gateway's gRPC API is on P, its HTTP/JSON API and playground on N (--port 0: both
        chosen by the system, and printed).
        """, UpCommand.Run),
    new("serve", "one service of the mesh in this process", $"""
        usage: blip2mesh serve vision|qformer|decoder|gateway --model DIR --port N [options]
        Prints "listening P N" once it listens: its gRPC and HTTP ports ("-" for none), chosen by the system for 0.
        {ServiceOptions}
        """, ServeCommand.Run),
    new("dump", "every stage's output for an image, as safetensors", """
        usage: blip2mesh dump --model DIR (--image FILE | --pixel-values FILE) [--prompt TEXT] --out FILE [--device cpu|cuda]
        Writes pixel_values, the vision, Q-Former, projection and encoder outputs and the first step's logits.
        """, DumpCommand.Run),
    new("tokenize", "the model's tokenizer: encode or decode", """
        usage: blip2mesh tokenize --model DIR (--text TEXT | --jsonl FILE | --decode ID,ID,...)
        --jsonl: one {"text": TEXT} per line.
        """, TokenizeCommand.Run),
    new("inspect", "a model's resolved config and parameter counts", """
        usage: blip2mesh inspect --model DIR [--weights auto|int8|int4|STAGE=MODE,...]
        """, InspectCommand.Run),
    new("export", "every stage graph as an .onnx file", """
        usage: blip2mesh export --model DIR [--out DIR]
        The weights stay in the checkpoint's safetensors files, so --out is the model folder or a folder above it.
        """, ExportCommand.Run),
    new("synth", "a random-weight checkpoint with a real model's layout", """
        usage: blip2mesh synth --like DIR|blip2-flan-t5-xl --out DIR [--dtype float32|float16|bfloat16] [--seed N] [--shard-mb N]
        The exact config, tensor names and shapes, in sharded safetensors.
        """, SynthCommand.Run),
    new("bench", "latency, time to first token and throughput", """
        usage: blip2mesh bench --model DIR (--in-process | --mesh | --addr HOST:PORT [--pids NAME=PID,...]) [--concurrency 1,4,16]
                               [--requests N] [--max-new-tokens N] [--min-new-tokens N] [--prompt TEXT]
                               [--images DIR | --unique-images] [--device cpu|cuda] [--threads N] [--decoder-replicas N] [--out report.json]
                               [--weights auto|int8|int4|STAGE=MODE,...] [--cache-dir DIR]
                               [--encoder-batching auto|on|off] (in-process; the mesh's decoders take it from serve)
        """, BenchCommand.Run),
];

var globalUsage = "usage: blip2mesh <command> [options]\n\ncommands:\n"
    + string.Concat(commands.Select(c => $"  {c.Name,-9} {c.Summary}\n"))
    + "\nblip2mesh <command> --help prints the command's options.";

if (args.Length == 0 || args[0] is "-h" or "--help" || (args is ["help"]))
{
    Console.WriteLine(globalUsage);
    return args.Length == 0 ? 2 : 0;
}
var name = args[0] == "help" ? args[1] : args[0];
var command = commands.FirstOrDefault(c => c.Name == name);
if (command is null)
{
    Console.Error.WriteLine($"blip2mesh: unknown command '{name}' (commands: {string.Join(", ", commands.Select(c => c.Name))}; blip2mesh --help for more)");
    return 2;
}
if (args[0] == "help")
{
    Console.WriteLine(command.Usage);
    return 0;
}

try
{
    return command.Run(args[1..]);
}
catch (HelpRequestedException)
{
    Console.WriteLine(command.Usage);
    return 0;
}
catch (UsageException e)
{
    Console.Error.WriteLine($"blip2mesh {command.Name}: {e.Message}");
    Console.Error.WriteLine();
    Console.Error.WriteLine(command.Usage);
    return 2;
}
catch (Exception e) when (e is Blip2Mesh.Model.Errors.ServingException or InvalidDataException
                              or FileNotFoundException or DirectoryNotFoundException or InvalidOperationException
                              or ArgumentException or System.Security.Cryptography.CryptographicException)
{
    Console.Error.WriteLine($"blip2mesh: {e.Message}");
    return 1;
}

/// <summary>A subcommand: its name, its line in the global help, its own usage, and what runs it.</summary>
internal sealed record Command(string Name, string Summary, string Usage, Func<string[], int> Run);
