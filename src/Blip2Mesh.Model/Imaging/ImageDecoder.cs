using SkiaSharp;

namespace Blip2Mesh.Model.Imaging;

/// <summary>
/// Decodes PNG, JPEG, WebP, GIF (first frame) and BMP into the RGB pixels Pillow's <c>Image.open(...).convert("RGB")</c> gives.
/// </summary>
public static class ImageDecoder
{
    /// <summary>Pillow's <c>Image.MAX_IMAGE_PIXELS</c> (1024*1024*1024 / 4 / 3), the size at which it starts warning about decompression bombs.</summary>
    public const long DefaultMaxPixels = 89_478_485;

    private static readonly SKEncodedImageFormat[] Supported =
        [SKEncodedImageFormat.Png, SKEncodedImageFormat.Jpeg, SKEncodedImageFormat.Webp, SKEncodedImageFormat.Gif, SKEncodedImageFormat.Bmp];

    /// <exception cref="InvalidImageException">empty, unsupported, corrupt or truncated input, or more than <paramref name="maxPixels"/> pixels.</exception>
    public static RgbImage Decode(ReadOnlySpan<byte> encoded, long maxPixels = DefaultMaxPixels)
    {
        if (encoded.IsEmpty) throw new InvalidImageException("image is empty");
        using var data = SKData.CreateCopy(encoded);
        using var codec = SKCodec.Create(data);
        // Skia also sniffs formats (WBMP, ICO, ...) that are too loosely identified to accept from untrusted bytes.
        if (codec is null || Array.IndexOf(Supported, codec.EncodedFormat) < 0)
            throw new InvalidImageException("bytes are not a supported image (PNG, JPEG, WebP, GIF, BMP)");

        // The codec has only parsed the header here, so the bomb check costs no decoding.
        var (width, height) = (codec.Info.Width, codec.Info.Height);
        if ((long)width * height > maxPixels)
            throw new InvalidImageException($"image of {width}x{height} pixels exceeds the limit of {maxPixels} pixels");

        // Unpremul keeps colour values of transparent pixels (Pillow drops alpha without compositing), and a null
        // colour space disables Skia's ICC/gAMA conversion, which Pillow does not do either.
        var info = new SKImageInfo(width, height, SKColorType.Rgba8888, SKAlphaType.Unpremul);
        var rgba = new byte[info.BytesSize64];
        var result = codec.GetPixels(info, rgba);
        switch (result)
        {
            case SKCodecResult.Success:
                break;
            // Skia fills the missing rows and reports it; Pillow refuses truncated files by default, and so do we.
            case SKCodecResult.IncompleteInput:
                throw new InvalidImageException("image is truncated");
            default:
                throw new InvalidImageException($"image data is corrupt ({codec.EncodedFormat} decoder: {result})");
        }

        var rgb = new byte[3L * width * height];
        for (long p = 0, q = 0; q < rgb.LongLength; p += 4, q += 3)
        {
            rgb[q] = rgba[p];
            rgb[q + 1] = rgba[p + 1];
            rgb[q + 2] = rgba[p + 2];
        }
        return new RgbImage(width, height, rgb);
    }
}
