using Blip2Mesh.Cli;
using Blip2Mesh.Model.Generation;
using Blip2Mesh.Model.Imaging;

const string Usage = """
    usage: blip2mesh <command> [options]

    commands:
      generate  --model DIR (--image FILE | --pixel-values FILE) [--prompt TEXT] [generation options] [--json]
                --model DIR --jsonl FILE          one JSON request per line, one JSON result per line
      dump      --model DIR (--image FILE | --pixel-values FILE) [--prompt TEXT] --out FILE
      tokenize  --model DIR (--text TEXT | --jsonl FILE | --decode IDS)
      inspect   --model DIR
      export    --model DIR [--out DIR]          every stage graph as an .onnx file (weights stay in the checkpoint)
      serve     vision|qformer|decoder --model DIR --port N [--http-port N] [--bind ADDR]
      serve     gateway --model DIR --port N [--http-port N] --vision HOST:PORT[,...] --qformer HOST:PORT[,...] --decoder HOST:PORT[,...]
                [--redis HOST:PORT] [--api-keys-file FILE] [--cache-mb N] [--max-image-mb N] [--tls-ca FILE]
                every service: [--tls-cert FILE --tls-key FILE] [--device cpu|cuda] [--threads N]; decoder: [--max-batch-rows N] [--kv-cache-mb N];
                vision, qformer: [--max-batch N] [--max-batch-delay-ms M]
      up        --model DIR [--port P] [--http-port N] [--decoder-replicas N] [--redis HOST:PORT] [--threads N]   the whole mesh on 127.0.0.1
      caption   IMAGE [--prompt TEXT] [--addr HOST:PORT] [generation options]  ask a running gateway
      synth     --like DIR|blip2-flan-t5-xl --out DIR [--dtype float32|float16|bfloat16] [--seed N] [--shard-mb N]
                a random-weight checkpoint with the exact config, tensor names and shapes (sharded safetensors)
      bench     --model DIR (--in-process | --mesh | --addr HOST:PORT [--pids NAME=PID,...]) [--concurrency 1,4,16]
                [--requests N] [--max-new-tokens N] [--min-new-tokens N] [--prompt TEXT] [--images DIR | --unique-images] [--device cpu|cuda]
                [--decoder-replicas N] [--out report.json]   latency, time to first token and throughput per concurrency

    generation options: --max-new-tokens N --min-new-tokens N --num-beams N --length-penalty X
      --do-sample --temperature X --top-k N --top-p X --seed N --repetition-penalty X --no-repeat-ngram-size N
    common: --device cpu|cuda
    """;

if (args.Length == 0 || args[0] is "-h" or "--help" or "help")
{
    Console.WriteLine(Usage);
    return args.Length == 0 ? 2 : 0;
}

try
{
    return args[0] switch
    {
        "generate" => GenerateCommand.Run(args[1..]),
        "dump" => DumpCommand.Run(args[1..]),
        "tokenize" => TokenizeCommand.Run(args[1..]),
        "inspect" => InspectCommand.Run(args[1..]),
        "export" => ExportCommand.Run(args[1..]),
        "serve" => ServeCommand.Run(args[1..]),
        "up" => UpCommand.Run(args[1..]),
        "caption" => CaptionCommand.Run(args[1..]),
        "synth" => SynthCommand.Run(args[1..]),
        "bench" => BenchCommand.Run(args[1..]),
        _ => throw new UsageException($"unknown command '{args[0]}'"),
    };
}
catch (UsageException e)
{
    Console.Error.WriteLine($"blip2mesh: {e.Message}");
    Console.Error.WriteLine(Usage);
    return 2;
}
catch (Exception e) when (e is Blip2Mesh.Model.Errors.ServingException or InvalidDataException
                              or FileNotFoundException or DirectoryNotFoundException or InvalidOperationException
                              or ArgumentException or System.Security.Cryptography.CryptographicException)
{
    Console.Error.WriteLine($"blip2mesh: {e.Message}");
    return 1;
}
