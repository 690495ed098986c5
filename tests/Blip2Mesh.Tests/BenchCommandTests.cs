using System.Text.Json;

namespace Blip2Mesh.Tests;

/// <summary>`blip2mesh bench` writes a well-formed report. Benchmarks are commands, not timed tests: no speed is asserted.</summary>
public sealed class BenchCommandTests
{
    [Fact]
    public void InProcessBenchWritesASaneReport()
    {
        var report = Path.Combine(Path.GetTempPath(), $"blip2mesh-bench-{Guid.NewGuid():N}.json");
        try
        {
            var result = CliProcess.Run("bench", "--model", Fixtures.Demo, "--in-process", "--concurrency", "1,2", "--requests", "4",
                "--max-new-tokens", "5", "--out", report);
            Assert.True(result.ExitCode == 0, result.Stderr);
            Assert.Contains("tok/s", result.Stdout);
            Assert.Contains("ms/image", result.Stdout);
            Assert.Contains("ms/token", result.Stdout);

            using var json = JsonDocument.Parse(File.ReadAllBytes(report));
            var root = json.RootElement;
            var runs = root.GetProperty("runs").EnumerateArray().ToList();
            Assert.Equal([1, 2], runs.Select(r => r.GetProperty("concurrency").GetInt32()));
            foreach (var run in runs)
            {
                Assert.Equal("in-process", run.GetProperty("mode").GetString());
                Assert.Equal(4, run.GetProperty("requests").GetInt32());
                Assert.Equal(0, run.GetProperty("errors").GetInt32());
                var tokens = run.GetProperty("generated_tokens").GetInt32();
                Assert.InRange(tokens, 4, 4 * 5);
                Assert.True(run.GetProperty("requests_per_s").GetDouble() > 0);
                Assert.True(run.GetProperty("tokens_per_s").GetDouble() > 0);
                var latency = run.GetProperty("latency_ms");
                var (p50, p95, p99) = (latency.GetProperty("p50").GetDouble(), latency.GetProperty("p95").GetDouble(), latency.GetProperty("p99").GetDouble());
                Assert.True(0 < p50 && p50 <= p95 && p95 <= p99, $"latency {p50} {p95} {p99}");
                var ttft = run.GetProperty("ttft_ms");
                Assert.True(0 < ttft.GetProperty("p50").GetDouble() && ttft.GetProperty("p50").GetDouble() <= ttft.GetProperty("p95").GetDouble());
                Assert.True(ttft.GetProperty("p95").GetDouble() <= p99);
            }
            Assert.True(root.GetProperty("peak_rss_mb").GetProperty("bench").GetDouble() > 0);
            Assert.True(root.GetProperty("vision_qformer_ms_per_image").GetDouble() > 0);
            Assert.True(root.GetProperty("decoder_ms_per_token_c1").GetDouble() > 0);
            Assert.False(string.IsNullOrWhiteSpace(root.GetProperty("machine").GetString()));
            Assert.Equal(Path.GetFullPath(Fixtures.Demo), root.GetProperty("model").GetString());
        }
        finally
        {
            File.Delete(report);
        }
    }

    [Fact]
    public void BenchNeedsExactlyOneTarget()
    {
        var result = CliProcess.Run("bench", "--model", Fixtures.Demo, "--in-process", "--addr", "127.0.0.1:1");
        Assert.Equal(2, result.ExitCode);
        Assert.Contains("exactly one of", result.Stderr);
    }
}
