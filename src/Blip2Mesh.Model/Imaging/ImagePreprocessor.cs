namespace Blip2Mesh.Model.Imaging;

/// <summary>
/// What transformers 4.33 <c>BlipImageProcessor</c> does to one image: PIL convert("RGB"), PIL resize, rescale, normalize,
/// channels first. Images are always converted to RGB because the vision model takes exactly three channels.
/// </summary>
public sealed class ImagePreprocessor
{
    private readonly PreprocessorConfig _config;
    private readonly PillowFilter _filter;
    private readonly long _maxPixels;

    /// <summary>Per-channel mean as the float32 NumPy array HF's normalize() subtracts.</summary>
    public float[] Mean { get; }
    /// <summary>Per-channel std as the float32 NumPy array HF's normalize() divides by.</summary>
    public float[] Std { get; }
    /// <summary>Factor HF's rescale() multiplies the uint8 pixels by, in float64, before casting to float32.</summary>
    public double RescaleFactor => _config.RescaleFactor;
    public bool DoRescale => _config.DoRescale;
    public bool DoNormalize => _config.DoNormalize;
    /// <summary>Height of <see cref="ToModelSize"/>'s output when resizing is on.</summary>
    public int Height => _config.Height;
    /// <summary>Width of <see cref="ToModelSize"/>'s output when resizing is on.</summary>
    public int Width => _config.Width;

    public ImagePreprocessor(PreprocessorConfig config, long maxPixels = ImageDecoder.DefaultMaxPixels)
    {
        _config = config;
        // Fail at load time rather than on the first request.
        _filter = PillowResize.FilterFromPil(config.Resample);
        _maxPixels = maxPixels;
        Mean = config.ImageMean.Select(m => (float)m).ToArray();
        Std = config.ImageStd.Select(s => (float)s).ToArray();
    }

    /// <summary>Largest buffer the resampler's first (horizontal) pass may need: output width × source rows × 3 bytes.</summary>
    public long MaxResampleBufferBytes { get; init; } = 64L << 20;

    /// <summary>
    /// Checks an encoded image from its header alone and says how many bytes of memory turning it into the model's
    /// input takes at most (the decoded RGBA and RGB pixels, and the resampler's buffer), so a caller can budget the
    /// work before doing any of it.
    /// </summary>
    /// <exception cref="InvalidImageException">the bytes are not a usable image, or it is too large or too thin to resize.</exception>
    public long WorkBytes(ReadOnlySpan<byte> encoded)
    {
        var (width, height) = ImageDecoder.ReadSize(encoded, _maxPixels);
        var resample = _config.DoResize && width != _config.Width ? 3L * _config.Width * height : 0;
        if (resample > MaxResampleBufferBytes)
            throw new InvalidImageException(
                $"image of {width}x{height} pixels is too tall for its width to resize: it would need a {Bytes.Format(resample)} buffer " +
                $"(the limit is {Bytes.Format(MaxResampleBufferBytes)}); crop or pad it closer to square");
        return 7L * width * height + resample;
    }

    /// <summary>Decodes an encoded image and resizes it to the model's input size; stops early when <paramref name="cancellation"/> fires.</summary>
    /// <exception cref="InvalidImageException">the bytes are not a usable image.</exception>
    public RgbImage ToModelSize(ReadOnlySpan<byte> encoded, CancellationToken cancellation = default)
    {
        var image = ImageDecoder.Decode(encoded, _maxPixels);
        cancellation.ThrowIfCancellationRequested();
        return _config.DoResize ? PillowResize.Resize(image, _config.Width, _config.Height, _filter, cancellation) : image;
    }

    /// <summary>CHW float32 pixel values [3, height, width], as HF computes them.</summary>
    public float[] ToPixelValues(RgbImage image)
    {
        var plane = image.Width * image.Height;
        var values = new float[3 * plane];
        var pixels = image.Pixels;
        for (var c = 0; c < 3; c++)
        {
            for (var i = 0; i < plane; i++)
            {
                var v = pixels[3 * i + c];
                // NumPy: uint8 * Python float is float64, then astype(float32); normalize() then works in float32.
                var x = _config.DoRescale ? (float)(v * _config.RescaleFactor) : v;
                if (_config.DoNormalize) x = (x - Mean[c]) / Std[c];
                values[c * plane + i] = x;
            }
        }
        return values;
    }
}
