using Blip2Mesh.Model.Errors;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;

namespace Blip2Mesh.ServiceDefaults;

public static class LoadedModelRegistration
{
    /// <summary>
    /// Registers <see cref="LoadedModel{T}"/>: <paramref name="load"/> runs in the background once the host has started,
    /// given the host's <see cref="ServiceOptions"/> (model folder, execution device) and a logger for what loading decides.
    /// </summary>
    public static IServiceCollection AddLoadedModel<T>(this IServiceCollection services, Func<ServiceOptions, ILogger, T> load) where T : class
    {
        services.AddSingleton<Func<T>>(sp => () => load(sp.GetRequiredService<ServiceOptions>(), sp.GetRequiredService<ILogger<LoadedModel<T>>>()));
        services.AddSingleton<LoadedModel<T>>();
        services.AddHostedService(sp => sp.GetRequiredService<LoadedModel<T>>());
        return services;
    }
}

/// <summary>
/// Loads a service's model in the background once the host has started, so health answers NOT_SERVING while it
/// loads and SERVING after; turns NOT_SERVING again when the host begins to stop, so balancers drain it.
/// </summary>
public sealed class LoadedModel<T>(Func<T> load, ServiceHealth health, IHostApplicationLifetime lifetime, ILogger<LoadedModel<T>> logger, ServiceOptions? options = null)
    : BackgroundService where T : class
{
    private readonly TaskCompletionSource<T> _ready = new(TaskCreationOptions.RunContinuationsAsynchronously);

    /// <summary>The model, or unavailable while it is still loading (or failed to load).</summary>
    public T Value => _ready.Task.IsCompletedSuccessfully
        ? _ready.Task.Result
        : throw ServingException.Unavailable("the model is still loading");

    public Task<T> Ready => _ready.Task;

    protected override Task ExecuteAsync(CancellationToken stoppingToken)
    {
        lifetime.ApplicationStopping.Register(health.SetStopping);
        return Task.Run(Load, stoppingToken);
    }

    private void Load()
    {
        try
        {
            var started = System.Diagnostics.Stopwatch.StartNew();
            var model = load();
            _ready.SetResult(model);
            health.SetServing();
            if (options is not null) MeshTelemetry.ModelLoaded(options.Weights);
            if (options is null || options.Weights.IsExact) logger.LogInformation("model loaded in {Seconds:F1} s; serving", started.Elapsed.TotalSeconds);
            else logger.LogInformation("model loaded in {Seconds:F1} s with weights {Weights}; serving", started.Elapsed.TotalSeconds, options.Weights.Label);
        }
        catch (Exception e)
        {
            logger.LogCritical(e, "the model could not be loaded: {Message}", e.Message);
            _ready.SetException(e);
            lifetime.StopApplication();
        }
    }

    private int _disposed;

    /// <summary>Disposes the model once, though the container holds this both as itself and as a hosted service.</summary>
    public override void Dispose()
    {
        if (Interlocked.Exchange(ref _disposed, 1) == 1) return;
        if (_ready.Task.IsCompletedSuccessfully && _ready.Task.Result is IDisposable disposable) disposable.Dispose();
        base.Dispose();
    }
}
