using Blip2Mesh.ServiceDefaults;
using Grpc.Health.V1;
using Microsoft.Extensions.Hosting.Internal;
using Microsoft.Extensions.Logging.Abstractions;

namespace Blip2Mesh.Tests;

/// <summary>A service reports NOT_SERVING while its model loads, SERVING once loaded, NOT_SERVING again when stopping.</summary>
public sealed class HealthTests
{
    private static async Task<HealthCheckResponse.Types.ServingStatus> Status(ServiceHealth health, string service = "") =>
        (await health.Impl.Check(new HealthCheckRequest { Service = service }, null!)).Status;

    [Fact]
    public async Task HealthFollowsTheModelsLoadingAndTheHostsStopping()
    {
        var health = new ServiceHealth("blip2mesh.test.v1.Stage");
        var lifetime = new ApplicationLifetime(NullLogger<ApplicationLifetime>.Instance);
        using var loading = new SemaphoreSlim(0);
        using var model = new LoadedModel<object>(() => { loading.Wait(); return new object(); }, health, lifetime, NullLogger<LoadedModel<object>>.Instance);
        await model.StartAsync(CancellationToken.None);

        Assert.Equal(HealthCheckResponse.Types.ServingStatus.NotServing, await Status(health));
        Assert.Equal(HealthCheckResponse.Types.ServingStatus.NotServing, await Status(health, "blip2mesh.test.v1.Stage"));
        var early = Assert.Throws<Blip2Mesh.Model.Errors.ServingException>(() => model.Value);
        Assert.Equal(Grpc.Core.StatusCode.Unavailable, ServingErrors.Code(early.Kind));

        loading.Release();
        // The model is usable first, then advertised: the loading task ends once it is advertised.
        await model.ExecuteTask!;
        Assert.Same(await model.Ready, model.Value);
        Assert.Equal(HealthCheckResponse.Types.ServingStatus.Serving, await Status(health));
        Assert.Equal(HealthCheckResponse.Types.ServingStatus.Serving, await Status(health, "blip2mesh.test.v1.Stage"));
        Assert.True(health.IsServing, "/readyz reads this");

        lifetime.StopApplication();
        Assert.Equal(HealthCheckResponse.Types.ServingStatus.NotServing, await Status(health));
        Assert.Equal(HealthCheckResponse.Types.ServingStatus.NotServing, await Status(health, "blip2mesh.test.v1.Stage"));
    }

    [Fact]
    public async Task AModelThatFinishesLoadingAfterTheHostBeganStoppingIsNeverAdvertised()
    {
        var health = new ServiceHealth("blip2mesh.test.v1.Stage");
        var lifetime = new ApplicationLifetime(NullLogger<ApplicationLifetime>.Instance);
        using var loading = new SemaphoreSlim(0);
        using var model = new LoadedModel<object>(() => { loading.Wait(); return new object(); }, health, lifetime, NullLogger<LoadedModel<object>>.Instance);
        await model.StartAsync(CancellationToken.None);

        lifetime.StopApplication();
        loading.Release();
        await model.ExecuteTask!;
        Assert.Equal(HealthCheckResponse.Types.ServingStatus.NotServing, await Status(health));
        Assert.Equal(HealthCheckResponse.Types.ServingStatus.NotServing, await Status(health, "blip2mesh.test.v1.Stage"));
    }
}
