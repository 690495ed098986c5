namespace Blip2Mesh.Model.Imaging;

/// <summary>An 8-bit RGB image, pixels row-major in HWC order (R, G, B per pixel), like a PIL "RGB" image.</summary>
public sealed class RgbImage
{
    public int Width { get; }
    public int Height { get; }
    public byte[] Pixels { get; }

    public RgbImage(int width, int height, byte[] pixels)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(width);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(height);
        if (pixels.LongLength != 3L * width * height)
            throw new ArgumentException($"{width}x{height} RGB image needs {3L * width * height} bytes, got {pixels.LongLength}", nameof(pixels));
        Width = width;
        Height = height;
        Pixels = pixels;
    }
}
