using System.Net.Security;
using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;
using Blip2Mesh.Contracts.V1;
using Grpc.Core;
using Grpc.Health.V1;
using Grpc.Net.Client;

namespace Blip2Mesh.Tests;

/// <summary>API keys on the gateway, and TLS on every hop when certificates are configured.</summary>
public sealed class SecurityTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("blip2mesh-security-").FullName;
    private readonly List<IDisposable> _processes = [];
    private static readonly byte[] Image = File.ReadAllBytes(Path.Combine(Fixtures.Demo, "samples", "sample000.png"));

    public void Dispose()
    {
        foreach (var p in Enumerable.Reverse(_processes)) p.Dispose();
        Directory.Delete(_dir, recursive: true);
    }

    private ServiceProcess Serve(string service, params string[] extra)
    {
        var process = new ServiceProcess(service, Fixtures.Demo, extra);
        _processes.Add(process);
        return process;
    }

    [Fact]
    public async Task ApiKeysGuardThePublicApiButNotHealth()
    {
        var keys = Path.Combine(_dir, "keys");
        File.WriteAllLines(keys, ["# one key per line", "s3cret-key-1", "another-key"]);
        var vision = Serve("vision");
        var qformer = Serve("qformer");
        var decoder = Serve("decoder");
        var gateway = Serve("gateway", "--vision", vision.Address, "--qformer", qformer.Address, "--decoder", decoder.Address, "--api-keys-file", keys, "--max-image-mb", "1");
        var client = MeshClients.Gateway(gateway.Address, out var channel);
        using var _ = channel;

        var none = await MeshClients.AskAsync(client, MeshClients.Request(Image));
        Assert.Equal(StatusCode.Unauthenticated, none.Error?.StatusCode);
        Assert.Contains("authorization: Bearer", none.Error!.Status.Detail);
        var wrong = await MeshClients.AskAsync(client, MeshClients.Request(Image), headers: new Metadata { { "authorization", "Bearer nope" } });
        Assert.Equal(StatusCode.Unauthenticated, wrong.Error?.StatusCode);
        var put = await Assert.ThrowsAsync<RpcException>(async () => await client.PutImageAsync(new PutImageRequest { Image = Google.Protobuf.ByteString.CopyFrom(Image) }));
        Assert.Equal(StatusCode.Unauthenticated, put.StatusCode);

        var ok = await MeshClients.AskAsync(client, MeshClients.Request(Image), headers: new Metadata { { "authorization", "Bearer another-key" } });
        Assert.Null(ok.Error);
        Assert.Equal(DemoReferences.Sample("sample000.png", "").OutputText, ok.Text);
        Assert.Equal(HealthCheckResponse.Types.ServingStatus.Serving, new Health.HealthClient(channel).Check(new HealthCheckRequest()).Status);

        using var http = new HttpClient { BaseAddress = new Uri($"http://127.0.0.1:{gateway.HttpPort}") };
        var json = await http.PostAsync("/v1/images", new StringContent($"{{\"image\":\"{Convert.ToBase64String(Image)}\"}}", System.Text.Encoding.UTF8, "application/json"));
        Assert.Equal(System.Net.HttpStatusCode.Unauthorized, json.StatusCode);

        // GET /v1/limits is guarded the same way, and refuses in the same JSON shape as the transcoded API.
        var limits = await http.GetAsync("/v1/limits");
        Assert.Equal(System.Net.HttpStatusCode.Unauthorized, limits.StatusCode);
        using var refusal = System.Text.Json.JsonDocument.Parse(await limits.Content.ReadAsStringAsync());
        using var transcoded = System.Text.Json.JsonDocument.Parse(await json.Content.ReadAsStringAsync());
        Assert.Equal(transcoded.RootElement.GetProperty("code").GetInt32(), refusal.RootElement.GetProperty("code").GetInt32());
        Assert.Equal(transcoded.RootElement.GetProperty("message").GetString(), refusal.RootElement.GetProperty("message").GetString());
        using var wrongKey = new HttpRequestMessage(HttpMethod.Get, "/v1/limits") { Headers = { { "Authorization", "Bearer nope" } } };
        var refusedKey = await http.SendAsync(wrongKey);
        Assert.Equal(System.Net.HttpStatusCode.Unauthorized, refusedKey.StatusCode);
        Assert.Contains("the API key is not valid", await refusedKey.Content.ReadAsStringAsync());
        using var withKey = new HttpRequestMessage(HttpMethod.Get, "/v1/limits") { Headers = { { "Authorization", "Bearer s3cret-key-1" } } };
        var allowed = await http.SendAsync(withKey);
        Assert.Equal(System.Net.HttpStatusCode.OK, allowed.StatusCode);
        using var served = System.Text.Json.JsonDocument.Parse(await allowed.Content.ReadAsStringAsync());
        var generation = new ServiceDefaults.GenerationLimits();
        var gatewayOptions = new Gateway.GatewayOptions { Vision = [], QFormer = [], Decoder = [], MaxImageBytes = 1 << 20 };
        Assert.Equal(["maxNewTokens", "maxBeams", "maxPromptTokens", "maxImageBytes", "maxImagePixels"], served.RootElement.EnumerateObject().Select(p => p.Name));
        Assert.Equal(generation.MaxNewTokens, served.RootElement.GetProperty("maxNewTokens").GetInt32());
        Assert.Equal(generation.MaxBeams, served.RootElement.GetProperty("maxBeams").GetInt32());
        Assert.Equal(generation.MaxPromptTokens, served.RootElement.GetProperty("maxPromptTokens").GetInt32());
        Assert.Equal(gatewayOptions.MaxImageBytes, served.RootElement.GetProperty("maxImageBytes").GetInt32());
        Assert.Equal(gatewayOptions.MaxImagePixels, served.RootElement.GetProperty("maxImagePixels").GetInt64());
    }

    [Fact]
    public async Task EveryHopSpeaksTlsWhenCertificatesAreConfigured()
    {
        var (ca, cert, key) = CreateCertificates();
        string[] tls = ["--tls-cert", cert, "--tls-key", key];
        var vision = Serve("vision", tls);
        var qformer = Serve("qformer", tls);
        var decoder = Serve("decoder", tls);
        var gateway = Serve("gateway", [.. tls, "--tls-ca", ca, "--vision", vision.Address, "--qformer", qformer.Address, "--decoder", decoder.Address]);

        using var trusted = GrpcChannel.ForAddress($"https://{gateway.Address}", new GrpcChannelOptions { HttpHandler = TrustingOnly(ca) });
        var answer = await MeshClients.AskAsync(new Blip2.Blip2Client(trusted), MeshClients.Request(Image, "Question: what color is the background? Answer:"));
        Assert.Null(answer.Error);
        Assert.Equal("red", answer.Text);

        // Cleartext is refused on a TLS port, and a stage will not talk to a client that speaks cleartext.
        using var plain = GrpcChannel.ForAddress($"http://{vision.Address}");
        Assert.Throws<RpcException>(() => new Health.HealthClient(plain).Check(new HealthCheckRequest(), deadline: DateTime.UtcNow.AddSeconds(5)));

        // A gateway that does not trust the stages' CA cannot use them.
        var (otherCa, _, _) = CreateCertificates();
        var distrustful = Serve("gateway", [.. tls, "--tls-ca", otherCa, "--vision", vision.Address, "--qformer", qformer.Address, "--decoder", decoder.Address]);
        using var toDistrustful = GrpcChannel.ForAddress($"https://{distrustful.Address}", new GrpcChannelOptions { HttpHandler = TrustingOnly(ca) });
        var refused = await MeshClients.AskAsync(new Blip2.Blip2Client(toDistrustful), MeshClients.Request(File.ReadAllBytes(Path.Combine(Fixtures.Demo, "samples", "sample001.png"))), TimeSpan.FromSeconds(30));
        Assert.Equal(StatusCode.Unavailable, refused.Error?.StatusCode);
        Assert.Contains("vision", refused.Error!.Status.Detail);
    }

    private static SocketsHttpHandler TrustingOnly(string caPath)
    {
        var ca = X509Certificate2.CreateFromPem(File.ReadAllText(caPath));
        return new SocketsHttpHandler
        {
            SslOptions = new SslClientAuthenticationOptions
            {
                RemoteCertificateValidationCallback = (_, certificate, _, _) =>
                {
                    using var chain = new X509Chain();
                    chain.ChainPolicy.TrustMode = X509ChainTrustMode.CustomRootTrust;
                    chain.ChainPolicy.CustomTrustStore.Add(ca);
                    chain.ChainPolicy.RevocationMode = X509RevocationMode.NoCheck;
                    return certificate is not null && chain.Build(X509CertificateLoader.LoadCertificate(certificate.GetRawCertData()));
                },
            },
        };
    }

    /// <summary>A CA and a loopback server certificate it signed, as PEM files.</summary>
    private (string Ca, string Certificate, string Key) CreateCertificates()
    {
        var name = Guid.NewGuid().ToString("N")[..8];
        // One clock reading, and a CA that outlives its leaf: certificate times are whole seconds, so a leaf made a
        // moment later with the same lifetime could end after its issuer and be refused.
        var now = DateTimeOffset.UtcNow;
        using var caKey = ECDsa.Create(ECCurve.NamedCurves.nistP256);
        var caRequest = new CertificateRequest($"CN=blip2mesh test CA {name}", caKey, HashAlgorithmName.SHA256);
        caRequest.CertificateExtensions.Add(new X509BasicConstraintsExtension(true, false, 0, true));
        caRequest.CertificateExtensions.Add(new X509KeyUsageExtension(X509KeyUsageFlags.KeyCertSign, true));
        using var caCert = caRequest.CreateSelfSigned(now.AddDays(-2), now.AddDays(2));

        using var serverKey = ECDsa.Create(ECCurve.NamedCurves.nistP256);
        var request = new CertificateRequest("CN=localhost", serverKey, HashAlgorithmName.SHA256);
        var san = new SubjectAlternativeNameBuilder();
        san.AddIpAddress(System.Net.IPAddress.Loopback);
        san.AddDnsName("localhost");
        request.CertificateExtensions.Add(san.Build());
        request.CertificateExtensions.Add(new X509EnhancedKeyUsageExtension([new Oid("1.3.6.1.5.5.7.3.1")], false));
        using var server = request.Create(caCert, now.AddDays(-1), now.AddDays(1), [1, 2, 3, 4]);

        var ca = Path.Combine(_dir, $"ca-{name}.pem");
        var cert = Path.Combine(_dir, $"server-{name}.pem");
        var key = Path.Combine(_dir, $"server-{name}.key");
        File.WriteAllText(ca, caCert.ExportCertificatePem());
        File.WriteAllText(cert, server.ExportCertificatePem());
        File.WriteAllText(key, serverKey.ExportPkcs8PrivateKeyPem());
        return (ca, cert, key);
    }
}
