using System.Text.Json;

namespace Blip2Mesh.Model.Imaging;

/// <summary>
/// The <c>BlipImageProcessor</c> settings of a preprocessor_config.json. Keys the file omits take the defaults of
/// transformers' <c>BlipImageProcessor.__init__</c>.
/// </summary>
public sealed record PreprocessorConfig
{
    /// <summary>OPENAI_CLIP_MEAN of transformers' image_utils.</summary>
    public static readonly double[] OpenAiClipMean = [0.48145466, 0.4578275, 0.40821073];
    /// <summary>OPENAI_CLIP_STD of transformers' image_utils.</summary>
    public static readonly double[] OpenAiClipStd = [0.26862954, 0.26130258, 0.27577711];

    public bool DoConvertRgb { get; init; } = true;
    public bool DoResize { get; init; } = true;
    public bool DoRescale { get; init; } = true;
    public bool DoNormalize { get; init; } = true;
    public int Height { get; init; } = 384;
    public int Width { get; init; } = 384;
    /// <summary>PIL resampling number (1 LANCZOS, 2 BILINEAR, 3 BICUBIC, ...).</summary>
    public int Resample { get; init; } = 3;
    public double RescaleFactor { get; init; } = 1 / 255.0;
    public IReadOnlyList<double> ImageMean { get; init; } = OpenAiClipMean;
    public IReadOnlyList<double> ImageStd { get; init; } = OpenAiClipStd;

    public static PreprocessorConfig Load(string path)
    {
        try
        {
            return Parse(File.ReadAllText(path));
        }
        catch (Exception e) when (e is JsonException or InvalidDataException)
        {
            throw new InvalidDataException($"{path}: {e.Message}", e);
        }
    }

    public static PreprocessorConfig Parse(string json)
    {
        using var document = JsonDocument.Parse(json);
        var root = document.RootElement;
        if (root.ValueKind != JsonValueKind.Object) throw new InvalidDataException("preprocessor config is not a JSON object");

        var config = new PreprocessorConfig();
        if (root.TryGetProperty("do_convert_rgb", out var v)) config = config with { DoConvertRgb = v.GetBoolean() };
        if (root.TryGetProperty("do_resize", out v)) config = config with { DoResize = v.GetBoolean() };
        if (root.TryGetProperty("do_rescale", out v)) config = config with { DoRescale = v.GetBoolean() };
        if (root.TryGetProperty("do_normalize", out v)) config = config with { DoNormalize = v.GetBoolean() };
        if (root.TryGetProperty("resample", out v)) config = config with { Resample = v.GetInt32() };
        if (root.TryGetProperty("rescale_factor", out v)) config = config with { RescaleFactor = v.GetDouble() };
        if (root.TryGetProperty("image_mean", out v)) config = config with { ImageMean = Channels(v, "image_mean") };
        if (root.TryGetProperty("image_std", out v)) config = config with { ImageStd = Channels(v, "image_std") };
        if (root.TryGetProperty("size", out v))
        {
            // get_size_dict(size, default_to_square=True): a bare number means a square.
            if (v.ValueKind == JsonValueKind.Number)
                config = config with { Height = v.GetInt32(), Width = v.GetInt32() };
            else if (v.ValueKind == JsonValueKind.Object && v.TryGetProperty("height", out var h) && v.TryGetProperty("width", out var w))
                config = config with { Height = h.GetInt32(), Width = w.GetInt32() };
            else
                throw new InvalidDataException($"size must be a number or {{\"height\", \"width\"}}, got {v.GetRawText()}");
        }
        if (config.Height <= 0 || config.Width <= 0)
            throw new InvalidDataException($"size {config.Width}x{config.Height} must be positive");
        return config;
    }

    private static double[] Channels(JsonElement element, string key)
    {
        // The model takes RGB, so a per-channel list must have exactly three entries.
        if (element.ValueKind != JsonValueKind.Array || element.GetArrayLength() != 3)
            throw new InvalidDataException($"{key} must be a list of 3 numbers, got {element.GetRawText()}");
        return element.EnumerateArray().Select(e => e.GetDouble()).ToArray();
    }
}
