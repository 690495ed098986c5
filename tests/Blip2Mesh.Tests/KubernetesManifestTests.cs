using System.Collections.Concurrent;
using System.Diagnostics;
using System.Globalization;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using YamlDotNet.RepresentationModel;

namespace Blip2Mesh.Tests;

/// <summary>
/// k8s/: every overlay rendered with <c>kubectl kustomize</c> and checked for consistency on the parsed objects:
/// Services, probes, ports and gateway addresses agree with the containers; the serve flags used are the CLI's.
/// </summary>
public sealed partial class KubernetesManifestTests
{
    public static TheoryData<string> Overlays() => new() { "cpu-demo", "gpu" };

    private static readonly string[] Stages = ["vision", "qformer", "decoder"];
    private static readonly string[] Mesh = [.. Stages, "gateway"];

    /// <summary>The CLI contract: the options of <c>blip2mesh serve &lt;service&gt;</c>, without their dashes.</summary>
    private static readonly string[] CommonFlags = ["model", "port", "http-port", "bind", "tls-cert", "tls-key"];
    private static readonly Dictionary<string, string[]> ServeFlags = new()
    {
        ["vision"] = [.. CommonFlags, "device"],
        ["qformer"] = [.. CommonFlags, "device"],
        ["decoder"] = [.. CommonFlags, "device", "max-batch-rows"],
        ["gateway"] = [.. CommonFlags, "vision", "qformer", "decoder", "redis", "api-keys-file", "cache-mb", "max-image-mb", "tls-ca"],
    };

    /// <summary>How long a service lets in-flight streams finish after SIGTERM (ServiceOptions.ShutdownGrace).</summary>
    private const int ServiceShutdownGraceSeconds = 30;

    [Theory]
    [MemberData(nameof(Overlays))]
    public void ServicesSelectOneDeploymentAndTargetItsContainerPorts(string overlay)
    {
        var render = Render(overlay);
        foreach (var service in render.OfKind("Service"))
        {
            var name = Name(service);
            var selector = service["spec"]!["selector"]?.AsObject();
            Assert.True(selector is { Count: > 0 }, $"Service {name} has no selector");
            var backends = render.Workloads("Deployment").Where(d => Matches(selector, d.PodLabels)).ToList();
            Assert.True(backends.Count == 1, $"Service {name} selects {backends.Count} Deployments: {string.Join(", ", backends.Select(b => b.Name))}");
            var backend = backends[0];
            foreach (var port in service["spec"]!["ports"]!.AsArray())
            {
                var number = Int(port!["port"]);
                var target = port["targetPort"] ?? port["port"];
                var resolved = backend.ResolvePort(target);
                Assert.True(resolved is not null, $"Service {name} port {number}: targetPort {Text(target)} is no container port of Deployment {backend.Name}");
                // Clients of a headless Service dial the pod addresses at the Service's port.
                if (IsHeadless(service))
                    Assert.True(resolved == number, $"headless Service {name}: port {number} must equal its container port {resolved}");
            }
        }
    }

    [Theory]
    [MemberData(nameof(Overlays))]
    public void GatewayAddressesNameServicesAndTheirPorts(string overlay)
    {
        var render = Render(overlay);
        var gateway = render.Deployment("gateway");
        var args = ServeArgs(render, gateway);
        foreach (var (flag, component) in new[] { ("vision", "vision"), ("qformer", "qformer"), ("decoder", "decoder"), ("redis", "redis") })
        {
            Assert.True(args.TryGetValue(flag, out var value), $"gateway has no --{flag}");
            foreach (var address in value.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries))
            {
                var colon = address.LastIndexOf(':');
                Assert.True(colon > 0, $"gateway --{flag} {address}: expected HOST:PORT");
                var host = address[..colon].Split('.');
                var port = int.Parse(address[(colon + 1)..], CultureInfo.InvariantCulture);
                var service = render.OfKind("Service").SingleOrDefault(s => Name(s) == host[0]);
                Assert.True(service is not null, $"gateway --{flag} {address}: no Service named {host[0]}");
                if (host.Length > 1)
                    Assert.True(host.Length >= 3 && host[1] == Namespace(service) && host[2] == "svc",
                        $"gateway --{flag} {address}: expected {host[0]}.{Namespace(service)}.svc[.cluster.local]");
                Assert.True(service["spec"]!["ports"]!.AsArray().Any(p => Int(p!["port"]) == port), $"gateway --{flag} {address}: Service {host[0]} has no port {port}");
                var backend = render.Workloads("Deployment").Single(d => Matches(service["spec"]!["selector"]!.AsObject(), d.PodLabels));
                Assert.Equal(component, backend.Component);
                // Stages are headless so that the gateway balances its HTTP/2 connections over every pod.
                if (Stages.Contains(component)) Assert.True(IsHeadless(service), $"Service {host[0]} must be headless (clusterIP: None)");
            }
        }
    }

    [Theory]
    [MemberData(nameof(Overlays))]
    public void EveryContainerHasProbesOnItsPortsAndResources(string overlay)
    {
        var render = Render(overlay);
        foreach (var workload in render.Workloads("Deployment"))
            foreach (var container in workload.Containers)
            {
                var where = $"{workload.Name}/{Text(container["name"])}";
                foreach (var kind in new[] { "readinessProbe", "livenessProbe", "startupProbe" })
                {
                    var probe = container[kind];
                    Assert.True(probe is not null, $"{where} has no {kind}");
                    var port = probe["grpc"]?["port"] ?? probe["tcpSocket"]?["port"] ?? probe["httpGet"]?["port"];
                    if (probe["exec"] is null)
                        Assert.True(workload.ResolvePort(port) is not null, $"{where} {kind} port {Text(port)} is no container port");
                    if (Mesh.Contains(workload.Component))
                        Assert.True(Int(probe["grpc"]?["port"]) == int.Parse(ServeArgs(render, workload)["port"], CultureInfo.InvariantCulture),
                            $"{where} {kind} must be a gRPC probe (grpc.health.v1) on its --port");
                }
                AssertResources(where, container["resources"]);
            }
    }

    [Theory]
    [MemberData(nameof(Overlays))]
    public void MeshPodsOutliveTheirStreamsOnShutdown(string overlay)
    {
        var render = Render(overlay);
        foreach (var workload in Mesh.Select(render.Deployment))
        {
            var grace = Int(workload.PodSpec["terminationGracePeriodSeconds"]) ?? 30;
            var container = workload.Containers.Single();
            var preStop = container["lifecycle"]?["preStop"];
            Assert.True(preStop is not null, $"{workload.Name} has no preStop hook");
            var command = preStop["exec"]?["command"]?.AsArray().Select(Text).ToArray();
            var sleep = command is ["sleep", var seconds] ? int.Parse(seconds!, CultureInfo.InvariantCulture) : Int(preStop["sleep"]?["seconds"]) ?? 0;
            Assert.True(grace > ServiceShutdownGraceSeconds + sleep,
                $"{workload.Name}: terminationGracePeriodSeconds {grace} must exceed the preStop sleep ({sleep} s) plus the service's shutdown grace ({ServiceShutdownGraceSeconds} s)");
        }
    }

    [Theory]
    [MemberData(nameof(Overlays))]
    public void EveryPodRunsAsNonRoot(string overlay)
    {
        var render = Render(overlay);
        foreach (var workload in render.Workloads("Deployment"))
            foreach (var container in workload.Containers)
            {
                var where = $"{workload.Name}/{Text(container["name"])}";
                JsonNode? Setting(string key) => container["securityContext"]?[key] ?? workload.PodSpec["securityContext"]?[key];
                Assert.True(Setting("runAsNonRoot")?.GetValue<bool>() == true, $"{where}: runAsNonRoot is not set");
                Assert.True(Int(Setting("runAsUser")) is > 0, $"{where}: runAsUser must be a non-zero uid");
                Assert.True(container["securityContext"]?["allowPrivilegeEscalation"]?.GetValue<bool>() == false, $"{where}: allowPrivilegeEscalation must be false");
                // The images' own user (docker/Dockerfile*), so files they ship are readable.
                if (Mesh.Contains(workload.Component)) Assert.Equal(1654, Int(Setting("runAsUser")));
            }
    }

    [Theory]
    [MemberData(nameof(Overlays))]
    public void PrometheusScrapesEachMeshPodOnItsHttpPort(string overlay)
    {
        var render = Render(overlay);
        foreach (var workload in Mesh.Select(render.Deployment))
        {
            var annotations = workload.Obj["spec"]!["template"]!["metadata"]!["annotations"];
            Assert.Equal("true", Text(annotations?["prometheus.io/scrape"]));
            Assert.Equal("/metrics", Text(annotations?["prometheus.io/path"]));
            var port = Text(annotations?["prometheus.io/port"]);
            Assert.Equal(ServeArgs(render, workload)["http-port"], port);
            Assert.NotNull(workload.ResolvePort(JsonValue.Create(int.Parse(port!, CultureInfo.InvariantCulture))));
        }
    }

    [Theory]
    [MemberData(nameof(Overlays))]
    public void DecoderScalesOnActiveSequencesWithCpuFallback(string overlay)
    {
        var render = Render(overlay);
        var hpa = Assert.Single(render.OfKind("HorizontalPodAutoscaler"));
        Assert.Equal("autoscaling/v2", Text(hpa["apiVersion"]));
        var target = hpa["spec"]!["scaleTargetRef"]!;
        Assert.Equal(("apps/v1", "Deployment", "decoder"), (Text(target["apiVersion"]), Text(target["kind"]), Text(target["name"])));
        var decoder = render.Deployment("decoder");
        Assert.True(decoder.Obj["spec"]!["replicas"] is null, "the decoder Deployment sets replicas, which every apply would reset under the HPA");
        Assert.InRange(Int(hpa["spec"]!["minReplicas"]) ?? 1, 1, Int(hpa["spec"]!["maxReplicas"])!.Value);

        var metrics = hpa["spec"]!["metrics"]!.AsArray();
        var sequences = metrics.SingleOrDefault(m => Text(m!["type"]) == "Pods" && Text(m["pods"]!["metric"]!["name"]) == "blip2mesh_decoder_active_sequences");
        Assert.True(sequences is not null, "the HPA has no Pods metric blip2mesh_decoder_active_sequences");
        var average = double.Parse(Text(sequences["pods"]!["target"]!["averageValue"])!, CultureInfo.InvariantCulture);
        var rows = int.Parse(ServeArgs(render, decoder).GetValueOrDefault("max-batch-rows", "64"), CultureInfo.InvariantCulture);
        Assert.True(average > 0 && average <= rows, $"averageValue {average} of active sequences must be within the decoder's --max-batch-rows {rows}");
        Assert.Contains(metrics, m => Text(m!["type"]) == "Resource" && Text(m["resource"]!["name"]) == "cpu" && Text(m["resource"]!["target"]!["type"]) == "Utilization");
        Assert.NotNull(decoder.Containers.Single()["resources"]?["requests"]?["cpu"]);   // utilisation is relative to it
    }

    [Theory]
    [MemberData(nameof(Overlays))]
    public void DisruptionBudgetsCoverTheMeshWithoutBlockingDrains(string overlay)
    {
        var render = Render(overlay);
        var budgets = render.OfKind("PodDisruptionBudget").ToList();
        foreach (var budget in budgets)
        {
            var selected = render.Workloads("Deployment").Where(d => Matches(budget["spec"]!["selector"], d.PodLabels)).ToList();
            Assert.True(selected.Count == 1, $"PodDisruptionBudget {Name(budget)} selects {selected.Count} Deployments");
            if (budget["spec"]!["minAvailable"] is { } min)
                Assert.True(Int(min) < (Int(selected[0].Obj["spec"]!["replicas"]) ?? 1), $"PodDisruptionBudget {Name(budget)}: minAvailable {Text(min)} blocks every drain");
        }
        foreach (var workload in Mesh.Select(render.Deployment))
            Assert.True(budgets.Count(b => Matches(b["spec"]!["selector"], workload.PodLabels)) == 1, $"{workload.Name} needs one PodDisruptionBudget");
    }

    [Theory]
    [MemberData(nameof(Overlays))]
    public void OnlyTheGatewayReachesTheStagesAndRedis(string overlay)
    {
        var render = Render(overlay);
        var gateway = render.Deployment("gateway");
        var policies = render.OfKind("NetworkPolicy").ToList();
        Assert.DoesNotContain(policies, p => Matches(p["spec"]!["podSelector"], gateway.PodLabels));   // clients reach the gateway
        foreach (var workload in Stages.Append("redis").Select(render.Deployment))
        {
            var selecting = policies.Where(p => Matches(p["spec"]!["podSelector"], workload.PodLabels)).ToList();
            Assert.True(selecting.Count > 0, $"no NetworkPolicy selects {workload.Name}");
            var servicePort = workload.Component == "redis" ? 6379 : int.Parse(ServeArgs(render, workload)["port"], CultureInfo.InvariantCulture);
            var metricsPort = workload.Component == "redis" ? (int?)null : int.Parse(ServeArgs(render, workload)["http-port"], CultureInfo.InvariantCulture);
            var gatewayReachesService = false;
            foreach (var policy in selecting)
            {
                Assert.Contains("Ingress", policy["spec"]!["policyTypes"]!.AsArray().Select(Text));
                foreach (var rule in policy["spec"]!["ingress"]?.AsArray() ?? [])
                {
                    var ports = rule!["ports"]?.AsArray().Select(p => workload.ResolvePort(p!["port"])).ToList();
                    var from = rule["from"]?.AsArray();
                    if (from is null)
                    {
                        // Open to all: only the metrics port of a stage may be.
                        Assert.True(ports is { Count: > 0 } && ports.All(p => p == metricsPort),
                            $"NetworkPolicy {Name(policy)} lets anyone reach {workload.Name} on ports other than /metrics");
                        continue;
                    }
                    foreach (var peer in from)
                    {
                        Assert.True(peer!["namespaceSelector"] is null && peer["ipBlock"] is null && peer["podSelector"] is not null,
                            $"NetworkPolicy {Name(policy)}: only pods of this namespace may be peers of {workload.Name}");
                        var peers = render.Workloads("Deployment").Where(d => Matches(peer["podSelector"], d.PodLabels)).Select(d => d.Name).ToList();
                        Assert.True(peers.SequenceEqual(["gateway"]), $"NetworkPolicy {Name(policy)} lets {string.Join(", ", peers)} reach {workload.Name}");
                    }
                    gatewayReachesService |= ports is null || ports.Contains(servicePort);
                }
            }
            Assert.True(gatewayReachesService, $"no NetworkPolicy lets the gateway reach {workload.Name} on port {servicePort}");
        }
    }

    [Theory]
    [MemberData(nameof(Overlays))]
    public void ServeArgsUseOnlyTheCliContract(string overlay)
    {
        var render = Render(overlay);
        foreach (var workload in Mesh.Select(render.Deployment))
        {
            var container = workload.Containers.Single();
            Assert.True(container["command"] is null, $"{workload.Name} overrides the image's ENTRYPOINT (dotnet /app/blip2mesh.dll)");
            var args = container["args"]!.AsArray().Select(a => Expand(render, workload, Text(a)!)).ToList();
            Assert.Equal(new[] { "serve", workload.Component }, args.Take(2));
            for (var i = 2; i < args.Count; i += 2)
            {
                Assert.True(args[i].StartsWith("--", StringComparison.Ordinal), $"{workload.Name}: unexpected argument '{args[i]}'");
                Assert.True(ServeFlags[workload.Component].Contains(args[i][2..]), $"{workload.Name}: {args[i]} is no option of 'serve {workload.Component}'");
                Assert.True(i + 1 < args.Count && !args[i + 1].StartsWith("--", StringComparison.Ordinal), $"{workload.Name}: {args[i]} has no value");
            }
            var flags = ServeArgs(render, workload);
            foreach (var required in workload.Component == "gateway" ? new[] { "model", "port", "http-port", "bind", "vision", "qformer", "decoder" } : new[] { "model", "port", "http-port", "bind" })
                Assert.True(flags.ContainsKey(required), $"{workload.Name}: --{required} is missing");
            Assert.True(flags["bind"] == "0.0.0.0", $"{workload.Name}: --bind {flags["bind"]} is not reachable from other pods");
            Assert.NotNull(workload.ResolvePort(JsonValue.Create(int.Parse(flags["port"], CultureInfo.InvariantCulture))));
        }
    }

    /// <summary>
    /// Each flag of the contract is one the CLI reads: a renamed or missing option fails here, naming itself.
    /// (The flags are looked up as the string literals ServeCommand passes to its argument reader.)
    /// </summary>
    [Fact]
    public void ContractFlagsAreOptionsOfTheCli()
    {
        var sources = Directory.GetFiles(Path.Combine(Fixtures.RepoRoot, "src", "Blip2Mesh.ServiceDefaults"), "*.cs", SearchOption.AllDirectories)
            .Append(Path.Combine(Fixtures.RepoRoot, "src", "Blip2Mesh.Cli", "ServeCommand.cs"))
            .Select(File.ReadAllText).ToList();
        var missing = ServeFlags.Values.SelectMany(f => f).Distinct()
            .Where(flag => !sources.Any(s => s.Contains($"\"{flag}\"", StringComparison.Ordinal) || s.Contains($"\"--{flag}\"", StringComparison.Ordinal)))
            .Select(flag => "--" + flag).ToList();
        Assert.True(missing.Count == 0, $"serve options of the contract (used by k8s/) not found in ServeCommand.cs or ServiceDefaults: {string.Join(", ", missing)}");
    }

    [Fact]
    public void GpuOverlayPutsEachStageOnAGpuAndReadsTheModelClaim()
    {
        var render = Render("gpu");
        var claim = Assert.Single(render.OfKind("PersistentVolumeClaim"));
        foreach (var workload in Mesh.Select(render.Deployment))
        {
            var container = workload.Containers.Single();
            var gpus = Text(container["resources"]?["limits"]?["nvidia.com/gpu"]);
            if (workload.Component == "gateway")
                Assert.Null(gpus);
            else
            {
                Assert.True(gpus == "1", $"{workload.Name} must have one nvidia.com/gpu in its limits");
                Assert.Equal("cuda", ServeArgs(render, workload)["device"]);
                Assert.Contains(workload.PodSpec["tolerations"]?.AsArray() ?? [], t => Text(t!["key"]) == "nvidia.com/gpu");
            }
            var volume = workload.PodSpec["volumes"]?.AsArray().SingleOrDefault(v => Text(v!["persistentVolumeClaim"]?["claimName"]) == Name(claim));
            Assert.True(volume is not null, $"{workload.Name} does not mount the claim {Name(claim)}");
            var mount = container["volumeMounts"]!.AsArray().Single(m => Text(m!["name"]) == Text(volume["name"]))!;
            Assert.True(mount["readOnly"]?.GetValue<bool>() == true, $"{workload.Name} must mount the models read-only");
            Assert.StartsWith(Text(mount["mountPath"])!.TrimEnd('/') + "/", ServeArgs(render, workload)["model"]);
        }
        Assert.All(new[] { "redis" }.Select(render.Deployment), w => Assert.Null(w.Containers.Single()["resources"]?["limits"]?["nvidia.com/gpu"]));
    }

    [Fact]
    public void ModelDownloadJobFillsTheDirectoryTheGpuPodsRead()
    {
        var gpu = Render("gpu");
        var model = Render("gpu/model");
        var claim = Assert.Single(model.OfKind("PersistentVolumeClaim"));
        Assert.Equal(Assert.Single(gpu.OfKind("PersistentVolumeClaim")).ToJsonString(), claim.ToJsonString());
        var job = Assert.Single(model.Workloads("Job"));
        var container = job.Containers.Single();
        var volume = job.PodSpec["volumes"]!.AsArray().Single(v => Text(v!["persistentVolumeClaim"]?["claimName"]) == Name(claim))!;
        var mount = container["volumeMounts"]!.AsArray().Single(m => Text(m!["name"]) == Text(volume["name"]))!;
        Assert.True(mount["readOnly"]?.GetValue<bool>() != true, "the download Job must mount the claim writable");
        var target = Text(container["env"]!.AsArray().Single(e => Text(e!["name"]) == "TARGET")!["value"]);
        var modelDir = ServeArgs(gpu, gpu.Deployment("decoder"))["model"];
        Assert.True(target == modelDir, $"the model-download Job writes {target}, the gpu pods read --model {modelDir}");
        Assert.StartsWith(Text(mount["mountPath"])!.TrimEnd('/') + "/", target);
        AssertResources("model-download", container["resources"]);
    }

    [Fact]
    public void CpuDemoRunsTheDemoImageWithTheModelItCarries()
    {
        var render = Render("cpu-demo");
        var demo = File.ReadAllText(Path.Combine(Fixtures.RepoRoot, "docker", "Dockerfile.demo"));
        foreach (var workload in Mesh.Select(render.Deployment))
        {
            var container = workload.Containers.Single();
            Assert.StartsWith("blip2mesh-demo", Text(container["image"]));
            Assert.Null(container["resources"]?["limits"]?["nvidia.com/gpu"]);
            Assert.Equal(1, Int(workload.Obj["spec"]!["replicas"]) ?? 1);
            var model = ServeArgs(render, workload)["model"];
            Assert.True(Directory.Exists(Path.Combine(Fixtures.RepoRoot, "models", Path.GetFileName(model))), $"{workload.Name}: no bundled model for {model}");
            Assert.Matches($@"COPY .*models/{Path.GetFileName(model)}/? {Regex.Escape(model)}/?\s", demo);
            if (workload.Component != "gateway") Assert.Equal("cpu", ServeArgs(render, workload)["device"]);
        }
    }

    [Fact]
    public void DockerfilesRunTheCliAsTheManifestsUser()
    {
        foreach (var file in new[] { "Dockerfile", "Dockerfile.gpu" })
        {
            var text = File.ReadAllText(Path.Combine(Fixtures.RepoRoot, "docker", file));
            Assert.Contains("dotnet publish src/Blip2Mesh.Cli/Blip2Mesh.Cli.csproj -c Release -o /app", text);
            Assert.Contains("ENTRYPOINT [\"dotnet\", \"/app/blip2mesh.dll\"]", text);
            Assert.Contains("USER 1654", text);
        }
        Assert.Matches(@"(?m)^FROM mcr\.microsoft\.com/dotnet/aspnet:10\.0\s*$", File.ReadAllText(Path.Combine(Fixtures.RepoRoot, "docker", "Dockerfile")));
        Assert.Matches(@"(?m)^FROM nvidia/cuda:13\.[0-9.]+-cudnn-runtime-", File.ReadAllText(Path.Combine(Fixtures.RepoRoot, "docker", "Dockerfile.gpu")));
    }

    // ---- rendering and parsing ----

    private sealed record Rendered(IReadOnlyList<JsonObject> Objects)
    {
        public IEnumerable<JsonObject> OfKind(string kind) => Objects.Where(o => Text(o["kind"]) == kind);

        public IEnumerable<Workload> Workloads(string kind) => OfKind(kind).Select(o => new Workload(o));

        public Workload Deployment(string name) =>
            Workloads("Deployment").SingleOrDefault(d => d.Name == name) ?? throw new Xunit.Sdk.XunitException($"no Deployment {name}");
    }

    private sealed record Workload(JsonObject Obj)
    {
        public string Name => KubernetesManifestTests.Name(Obj);
        public JsonObject PodSpec => Obj["spec"]!["template"]!["spec"]!.AsObject();
        public JsonObject PodLabels => Obj["spec"]!["template"]!["metadata"]?["labels"]?.AsObject() ?? [];
        public string Component => Text(PodLabels["app.kubernetes.io/component"]) ?? Name;
        public IReadOnlyList<JsonObject> Containers => PodSpec["containers"]!.AsArray().Select(c => c!.AsObject()).ToList();

        /// <summary>The container port a Service or probe port (name or number) refers to, or null when none.</summary>
        public int? ResolvePort(JsonNode? port)
        {
            var ports = Containers.SelectMany(c => c["ports"]?.AsArray() ?? []).ToList();
            if (Int(port) is { } number) return ports.Any(p => Int(p!["containerPort"]) == number) ? number : null;
            return Int(ports.FirstOrDefault(p => Text(p!["name"]) == Text(port))?["containerPort"]);
        }
    }

    private static readonly ConcurrentDictionary<string, Lazy<Rendered>> Renders = new();

    private static Rendered Render(string overlay) => Renders.GetOrAdd(overlay, o => new Lazy<Rendered>(() => Parse(Kustomize(o)))).Value;

    private static string Kustomize(string overlay)
    {
        var dir = Path.Combine(Fixtures.RepoRoot, "k8s", "overlays", overlay);
        var start = new ProcessStartInfo("kubectl") { RedirectStandardOutput = true, RedirectStandardError = true };
        start.ArgumentList.Add("kustomize");
        start.ArgumentList.Add(dir);
        Process process;
        try { process = Process.Start(start)!; }
        catch (System.ComponentModel.Win32Exception e)
        {
            throw new InvalidOperationException("kubectl is needed to render k8s/ (Debian: apt-get install kubernetes-client)", e);
        }
        using (process)
        {
            var stdout = process.StandardOutput.ReadToEndAsync();
            var stderr = process.StandardError.ReadToEndAsync();
            if (!process.WaitForExit(TimeSpan.FromMinutes(1)))
            {
                process.Kill(entireProcessTree: true);
                throw new TimeoutException($"kubectl kustomize {dir} did not finish");
            }
            Assert.True(process.ExitCode == 0, $"kubectl kustomize {dir} failed: {stderr.Result}");
            return stdout.Result;
        }
    }

    private static Rendered Parse(string yaml)
    {
        var stream = new YamlStream();
        stream.Load(new StringReader(yaml));
        return new Rendered(stream.Documents.Select(d => ToJson(d.RootNode)).OfType<JsonObject>().ToList());
    }

    /// <summary>YAML to JSON nodes; plain scalars that read as integers or booleans become numbers and booleans.</summary>
    private static JsonNode? ToJson(YamlNode node) => node switch
    {
        YamlMappingNode map => new JsonObject(map.Children.Select(c => KeyValuePair.Create(((YamlScalarNode)c.Key).Value!, ToJson(c.Value)))),
        YamlSequenceNode list => new JsonArray(list.Children.Select(ToJson).ToArray()),
        YamlScalarNode { Style: YamlDotNet.Core.ScalarStyle.Plain } scalar => scalar.Value switch
        {
            null or "" or "null" or "~" => null,
            "true" => JsonValue.Create(true),
            "false" => JsonValue.Create(false),
            var text when long.TryParse(text, NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out var number) => JsonValue.Create(number),
            var text => JsonValue.Create(text),
        },
        YamlScalarNode scalar => JsonValue.Create(scalar.Value),
        _ => throw new NotSupportedException(node.GetType().Name),
    };

    // ---- helpers ----

    private static string Name(JsonNode obj) => Text(obj["metadata"]!["name"])!;

    private static string? Namespace(JsonNode obj) => Text(obj["metadata"]!["namespace"]);

    private static bool IsHeadless(JsonNode service) => Text(service["spec"]!["clusterIP"]) == "None";

    private static string? Text(JsonNode? node) => node?.GetValueKind() switch
    {
        null or System.Text.Json.JsonValueKind.Null => null,
        System.Text.Json.JsonValueKind.String => node.GetValue<string>(),
        _ => node.ToJsonString(),
    };

    private static int? Int(JsonNode? node) => int.TryParse(Text(node), NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out var value) ? value : null;

    /// <summary>A plain label map (Service) or a LabelSelector (matchLabels / matchExpressions) against pod labels.</summary>
    private static bool Matches(JsonNode? selector, JsonObject labels)
    {
        if (selector is null) return false;
        var isLabelSelector = selector["matchLabels"] is not null || selector["matchExpressions"] is not null || selector.AsObject().Count == 0;
        var matchLabels = isLabelSelector ? selector["matchLabels"]?.AsObject() : selector.AsObject();
        foreach (var (key, value) in matchLabels ?? [])
            if (Text(labels[key]) != Text(value)) return false;
        foreach (var expression in selector["matchExpressions"]?.AsArray() ?? [])
        {
            var value = Text(labels[Text(expression!["key"])!]);
            var values = expression["values"]?.AsArray().Select(Text).ToList() ?? [];
            var ok = Text(expression["operator"]) switch
            {
                "In" => value is not null && values.Contains(value),
                "NotIn" => value is null || !values.Contains(value),
                "Exists" => value is not null,
                "DoesNotExist" => value is null,
                var op => throw new NotSupportedException($"selector operator {op}"),
            };
            if (!ok) return false;
        }
        return true;
    }

    /// <summary>The "--flag value" pairs after "serve &lt;service&gt;", with $(VAR) references expanded.</summary>
    private static Dictionary<string, string> ServeArgs(Rendered render, Workload workload)
    {
        var args = workload.Containers.Single()["args"]!.AsArray().Select(a => Expand(render, workload, Text(a)!)).ToList();
        var flags = new Dictionary<string, string>();
        for (var i = 2; i + 1 < args.Count; i += 2)
            if (args[i].StartsWith("--", StringComparison.Ordinal)) flags[args[i][2..]] = args[i + 1];
        return flags;
    }

    /// <summary>Expands $(NAME) as the kubelet does, from the container's env and its envFrom ConfigMaps; unknown names fail.</summary>
    private static string Expand(Rendered render, Workload workload, string text)
    {
        var container = workload.Containers.Single();
        var env = new Dictionary<string, string>();
        foreach (var source in container["envFrom"]?.AsArray() ?? [])
        {
            var name = Text(source!["configMapRef"]?["name"]);
            if (name is null) continue;
            var map = render.OfKind("ConfigMap").SingleOrDefault(m => Name(m) == name);
            Assert.True(map is not null, $"{workload.Name}: envFrom names ConfigMap {name}, which is not in the render");
            foreach (var (key, value) in map["data"]?.AsObject() ?? []) env[key] = Text(value) ?? "";
        }
        foreach (var variable in container["env"]?.AsArray() ?? [])
            if (variable!["value"] is { } value) env[Text(variable["name"])!] = Text(value)!;
        return VariableReference().Replace(text, m =>
            env.TryGetValue(m.Groups[1].Value, out var value) ? value : throw new Xunit.Sdk.XunitException($"{workload.Name}: $({m.Groups[1].Value}) is not defined"));
    }

    [GeneratedRegex(@"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")]
    private static partial Regex VariableReference();

    private static void AssertResources(string where, JsonNode? resources)
    {
        foreach (var (resource, parse) in new (string, Func<string, double>)[] { ("cpu", Cpu), ("memory", Bytes) })
        {
            var request = Text(resources?["requests"]?[resource]);
            var limit = Text(resources?["limits"]?[resource]);
            Assert.True(request is not null && limit is not null, $"{where}: {resource} request and limit are both needed");
            Assert.True(parse(request) <= parse(limit), $"{where}: {resource} request {request} exceeds its limit {limit}");
        }
        if (resources?["limits"]?["nvidia.com/gpu"] is { } gpus && resources["requests"]?["nvidia.com/gpu"] is { } requested)
            Assert.Equal(Text(gpus), Text(requested));   // extended resources cannot be overcommitted
    }

    private static double Cpu(string quantity) =>
        quantity.EndsWith('m') ? double.Parse(quantity[..^1], CultureInfo.InvariantCulture) / 1000 : double.Parse(quantity, CultureInfo.InvariantCulture);

    private static double Bytes(string quantity)
    {
        var match = Regex.Match(quantity, @"^([0-9.]+)([KMGTE]i?|k)?$");
        Assert.True(match.Success, $"memory quantity {quantity}");
        var scale = match.Groups[2].Value switch
        {
            "" => 1d, "k" or "K" => 1e3, "M" => 1e6, "G" => 1e9, "T" => 1e12, "E" => 1e18,
            "Ki" => 1024d, "Mi" => 1024d * 1024, "Gi" => 1024d * 1024 * 1024, "Ti" => Math.Pow(1024, 4), "Ei" => Math.Pow(1024, 6),
            var unit => throw new NotSupportedException(unit),
        };
        return double.Parse(match.Groups[1].Value, CultureInfo.InvariantCulture) * scale;
    }
}
