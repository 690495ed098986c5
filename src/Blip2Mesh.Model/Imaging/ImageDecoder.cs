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

    /// <summary>Width and height from the header alone, with every check <see cref="Decode"/> makes before decoding.</summary>
    /// <exception cref="InvalidImageException">empty, unsupported or truncated input, or more than <paramref name="maxPixels"/> pixels.</exception>
    public static (int Width, int Height) ReadSize(ReadOnlySpan<byte> encoded, long maxPixels = DefaultMaxPixels)
    {
        var bytes = encoded.ToArray();
        using var stream = new SKMemoryStream(bytes);
        using var codec = Open(bytes, stream, maxPixels);
        return (codec.Info.Width, codec.Info.Height);
    }

    /// <exception cref="InvalidImageException">empty, unsupported, corrupt or truncated input, or more than <paramref name="maxPixels"/> pixels.</exception>
    public static RgbImage Decode(ReadOnlySpan<byte> encoded, long maxPixels = DefaultMaxPixels)
    {
        var bytes = encoded.ToArray();
        ClearGifTransparency(bytes);
        using var stream = new SKMemoryStream(bytes);
        using var codec = Open(bytes, stream, maxPixels);
        var (width, height) = (codec.Info.Width, codec.Info.Height);

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

    /// <summary>A codec over the image's header; it has parsed nothing else yet, so the checks here cost no decoding.</summary>
    private static SKCodec Open(byte[] bytes, SKMemoryStream stream, long maxPixels)
    {
        if (bytes.Length == 0) throw new InvalidImageException("image is empty");
        var codec = SKCodec.Create(stream, out var opened);
        // Skia also answers IncompleteInput for any input too short to sniff, so only a known signature means "truncated".
        if (codec is null && opened == SKCodecResult.IncompleteInput && HasSupportedSignature(bytes))
            throw new InvalidImageException("image is truncated");
        // Skia also sniffs formats (WBMP, ICO, ...) that are too loosely identified to accept from untrusted bytes.
        if (codec is null || Array.IndexOf(Supported, codec.EncodedFormat) < 0)
        {
            codec?.Dispose();
            throw new InvalidImageException("bytes are not a supported image (PNG, JPEG, WebP, GIF, BMP)");
        }
        var (width, height) = (codec.Info.Width, codec.Info.Height);
        if ((long)width * height > maxPixels)
        {
            codec.Dispose();
            throw new InvalidImageException($"image of {width}x{height} pixels exceeds the limit of {maxPixels} pixels");
        }
        return codec;
    }

    /// <summary>
    /// Pillow decodes a GIF's first frame as a palette image and convert("RGB") maps transparent pixels to their palette
    /// colour, whereas Skia writes them as zero. Clearing the transparency flag of the graphic control extensions before
    /// the first image makes Skia map them through the palette too.
    /// </summary>
    private static void ClearGifTransparency(byte[] gif)
    {
        if (gif.Length < 13 || !gif.AsSpan().StartsWith("GIF8"u8)) return;
        var pos = 13;
        if ((gif[10] & 0x80) != 0) pos += 3 << ((gif[10] & 7) + 1); // global colour table
        // Extensions are 0x21, a label, then data sub-blocks ended by a zero length; 0x2C starts the first image.
        while (pos + 1 < gif.Length && gif[pos] == 0x21)
        {
            var label = gif[pos + 1];
            pos += 2;
            if (label == 0xF9 && pos + 1 < gif.Length && gif[pos] >= 4) gif[pos + 1] &= 0xFE;
            while (pos < gif.Length && gif[pos] != 0) pos += gif[pos] + 1;
            pos++;
        }
    }

    private static bool HasSupportedSignature(ReadOnlySpan<byte> bytes) =>
        bytes.StartsWith((ReadOnlySpan<byte>)[0x89, 0x50, 0x4E, 0x47])
        || bytes.StartsWith((ReadOnlySpan<byte>)[0xFF, 0xD8, 0xFF])
        || bytes.StartsWith("GIF8"u8)
        || bytes.StartsWith("BM"u8)
        || (bytes.StartsWith("RIFF"u8) && (bytes.Length < 12 || bytes[8..12].SequenceEqual("WEBP"u8)));
}
