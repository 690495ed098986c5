using System.Net;
using System.Net.Sockets;

namespace Blip2Mesh.Tests;

/// <summary>What the command line says when it is asked for help or cannot do what it was asked: one clear line.</summary>
public sealed class CliMessageTests : IDisposable
{
    private readonly string _temp = Directory.CreateTempSubdirectory("blip2mesh-cli-messages-").FullName;

    public void Dispose() => Directory.Delete(_temp, recursive: true);

    private static readonly string Sample = Path.Combine(Fixtures.Demo, "samples", "sample000.png");

    private static string[] Lines(string text) => text.TrimEnd('\n').Split('\n');

    [Theory]
    [InlineData("generate")]
    [InlineData("caption")]
    [InlineData("up")]
    [InlineData("serve")]
    [InlineData("dump")]
    [InlineData("tokenize")]
    [InlineData("inspect")]
    [InlineData("export")]
    [InlineData("synth")]
    [InlineData("bench")]
    public void EveryCommandPrintsItsOwnUsageForHelp(string command)
    {
        var help = CliProcess.Run(command, "--help");
        Assert.True(help.ExitCode == 0, $"exit {help.ExitCode}: {help.Stderr}");
        Assert.StartsWith($"usage: blip2mesh {command} ", help.Stdout);
        Assert.Equal("", help.Stderr);
        // Only this command's usage, not the global list of commands.
        Assert.DoesNotContain("commands:", help.Stdout);
        Assert.Equal(help.Stdout, CliProcess.Run(command, "-h").Stdout);
        Assert.Equal(help.Stdout, CliProcess.Run("help", command).Stdout);
        // --help wins wherever it stands among the options.
        Assert.Equal(help.Stdout, CliProcess.Run(command, "--model", "nowhere", "--help").Stdout);
    }

    [Fact]
    public void GlobalHelpListsEveryCommandOnOneLineEach()
    {
        var help = CliProcess.Run("--help");
        Assert.Equal(0, help.ExitCode);
        foreach (var command in new[] { "generate", "caption", "up", "serve", "dump", "tokenize", "inspect", "export", "synth", "bench" })
            Assert.Single(Lines(help.Stdout), l => l.StartsWith($"  {command} ", StringComparison.Ordinal));
        Assert.Contains("blip2mesh <command> --help", help.Stdout);
    }

    [Fact]
    public void AUsageErrorIsOneLineThenThatCommandsUsage()
    {
        var usage = CliProcess.Run("generate", "--help").Stdout;
        var unknown = CliProcess.Run("generate", "--model", Fixtures.Demo, "--image", Sample, "--beams", "3");
        Assert.Equal(2, unknown.ExitCode);
        Assert.Equal($"blip2mesh generate: unknown option(s): --beams\n\n{usage}", unknown.Stderr);

        var noValue = CliProcess.Run("caption", Sample, "--addr");
        Assert.Equal(2, noValue.ExitCode);
        Assert.Equal("blip2mesh caption: --addr needs a value", Lines(noValue.Stderr)[0]);
        Assert.EndsWith(CliProcess.Run("caption", "--help").Stdout, noValue.Stderr);

        var command = CliProcess.Run("frobnicate");
        Assert.Equal(2, command.ExitCode);
        Assert.Equal(["blip2mesh: unknown command 'frobnicate' (commands: generate, caption, up, serve, dump, tokenize, inspect, export, synth, bench; blip2mesh --help for more)"], Lines(command.Stderr));
    }

    [Theory]
    [InlineData("generate", "int3")]
    [InlineData("bench", "decoder=fp8")]
    [InlineData("up", "lm=int4")]
    public void AnUnknownWeightSchemeIsAUsageErrorThatListsTheChoices(string command, string scheme)
    {
        var result = command switch
        {
            "generate" => CliProcess.Run("generate", "--model", Fixtures.Demo, "--image", Sample, "--weights", scheme),
            "bench" => CliProcess.Run("bench", "--model", Fixtures.Demo, "--in-process", "--weights", scheme),
            _ => CliProcess.Run("up", "--model", Fixtures.Demo, "--weights", scheme),
        };
        Assert.Equal(2, result.ExitCode);
        var line = Lines(result.Stderr)[0];
        Assert.StartsWith($"blip2mesh {command}: --weights: '", line);
        Assert.True(line.Contains("expected auto, int8, int4") || line.Contains("expected vision, qformer, encoder or decoder"), line);
        Assert.EndsWith(CliProcess.Run(command, "--help").Stdout, result.Stderr);
    }

    [Fact]
    public void APortInUseIsOneLineNamingThePortAndTheService()
    {
        using var holder = new TcpListener(IPAddress.Loopback, MeshProcess.FreePort());
        holder.Start();
        var busy = ((IPEndPoint)holder.LocalEndpoint).Port;
        var free = MeshProcess.FreePort().ToString();

        var vision = CliProcess.Run("serve", "vision", "--model", Fixtures.Demo, "--port", busy.ToString());
        Assert.Equal(1, vision.ExitCode);
        Assert.Equal([$"blip2mesh: the vision service cannot listen on 127.0.0.1:{busy}: the port is in use (another blip2mesh?); stop what holds it or choose another port with --port N"], Lines(vision.Stderr));

        var decoderHttp = CliProcess.Run("serve", "decoder", "--model", Fixtures.Demo, "--port", free, "--http-port", busy.ToString());
        Assert.Equal(1, decoderHttp.ExitCode);
        Assert.Equal([$"blip2mesh: the decoder service cannot listen on 127.0.0.1:{busy}: the port is in use (another blip2mesh?); stop what holds it or choose another port with --http-port N"], Lines(decoderHttp.Stderr));

        var gateway = CliProcess.Run("serve", "gateway", "--model", Fixtures.Demo, "--port", busy.ToString(),
            "--vision", "127.0.0.1:1", "--qformer", "127.0.0.1:1", "--decoder", "127.0.0.1:1");
        Assert.Equal(1, gateway.ExitCode);
        Assert.Single(Lines(gateway.Stderr));
        Assert.StartsWith($"blip2mesh: the gateway cannot listen on 127.0.0.1:{busy}: the port is in use", gateway.Stderr);

        var up = CliProcess.Run("up", "--model", Fixtures.Demo, "--port", busy.ToString());
        Assert.Equal(1, up.ExitCode);
        Assert.Equal([$"blip2mesh: the gateway cannot listen on 127.0.0.1:{busy}: the port is in use (another blip2mesh?); stop what holds it or choose another port with --port N (make up PORT=N, make run PORT=N)"], Lines(up.Stderr));
        var upHttp = CliProcess.Run("up", "--model", Fixtures.Demo, "--port", free, "--http-port", busy.ToString());
        Assert.Equal(1, upHttp.ExitCode);
        Assert.Equal([$"blip2mesh: the gateway cannot listen on 127.0.0.1:{busy}: the port is in use (another blip2mesh?); stop what holds it or choose another port with --http-port N (make up HTTP_PORT=N, make run HTTP_PORT=N)"], Lines(upHttp.Stderr));
        Assert.Equal("", up.Stdout + upHttp.Stdout);
    }

    [Fact]
    public void NoGatewayAtTheAddressNamesItAndSuggestsUp()
    {
        // A port nothing listens on: taken and released.
        var address = $"127.0.0.1:{MeshProcess.FreePort()}";
        var result = CliProcess.Run("caption", Sample, "--addr", address);
        Assert.Equal(1, result.ExitCode);
        Assert.Equal([$"blip2mesh: cannot connect to a gateway at {address}: start the mesh with `./blip2mesh up --model DIR` (or `make up`), or give a running gateway's address with --addr HOST:PORT"], Lines(result.Stderr));
        Assert.Equal("", result.Stdout);
    }

    public static TheoryData<string[]> ModelCommands() => new()
    {
        { ["generate", "--image", Sample] },
        { ["dump", "--image", Sample, "--out", "never.safetensors"] },
        { ["export"] },
        { ["serve", "vision", "--port", MeshProcess.FreePort().ToString()] },
        { ["serve", "gateway", "--port", MeshProcess.FreePort().ToString(), "--vision", "127.0.0.1:1", "--qformer", "127.0.0.1:1", "--decoder", "127.0.0.1:1"] },
        { ["up", "--port", MeshProcess.FreePort().ToString()] },
        { ["bench", "--in-process", "--requests", "1"] },
    };

    private const string Holds = "a model folder holds config.json, the weights (model.safetensors, or model.safetensors.index.json and its shards), preprocessor_config.json and spiece.model";

    [Theory]
    [MemberData(nameof(ModelCommands))]
    public void AMissingOrIncompleteModelFolderReadsTheSameInEveryCommand(string[] command)
    {
        var nowhere = Path.Combine(_temp, "nowhere");
        var missing = CliProcess.Run([command[0], .. command[1..], "--model", nowhere]);
        Assert.Equal(1, missing.ExitCode);
        Assert.Equal([$"blip2mesh: model folder '{nowhere}' does not exist; {Holds}"], Lines(missing.Stderr));

        // Everything but the tokenizer and the image settings.
        var partial = Path.Combine(_temp, "partial");
        Directory.CreateDirectory(partial);
        foreach (var file in new[] { "config.json", "model.safetensors" }) File.Copy(Path.Combine(Fixtures.Demo, file), Path.Combine(partial, file));
        var incomplete = CliProcess.Run([command[0], .. command[1..], "--model", partial]);
        Assert.Equal(1, incomplete.ExitCode);
        Assert.Equal([$"blip2mesh: model folder '{partial}' is incomplete: it has no {(command[0] == "export" ? "preprocessor_config.json" : "preprocessor_config.json, no spiece.model")}; {Holds}"], Lines(incomplete.Stderr));
    }

    [Fact]
    public void CommandsThatReadPartOfAModelFolderNameWhatTheyLack()
    {
        var partial = Path.Combine(_temp, "config-only");
        Directory.CreateDirectory(partial);
        File.Copy(Path.Combine(Fixtures.Demo, "config.json"), Path.Combine(partial, "config.json"));
        var inspect = CliProcess.Run("inspect", "--model", partial);
        Assert.Equal(1, inspect.ExitCode);
        Assert.Equal([$"blip2mesh: model folder '{partial}' is incomplete: it has no model.safetensors or model.safetensors.index.json; {Holds}"], Lines(inspect.Stderr));
        var tokenize = CliProcess.Run("tokenize", "--model", partial, "--text", "a photo of");
        Assert.Equal(1, tokenize.ExitCode);
        Assert.Equal([$"blip2mesh: model folder '{partial}' is incomplete: it has no spiece.model; {Holds}"], Lines(tokenize.Stderr));
    }
}
