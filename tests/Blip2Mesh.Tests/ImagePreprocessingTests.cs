using System.Buffers.Binary;
using System.IO.Compression;
using System.Text;
using System.Text.Json;
using Blip2Mesh.Model.Checkpoint;
using Blip2Mesh.Model.Imaging;
using SkiaSharp;
using Xunit.Abstractions;

namespace Blip2Mesh.Tests;

public sealed class ImagePreprocessingTests(ITestOutputHelper output)
{
    private static readonly string FixtureDir = Path.Combine(RepoRoot(), "tests", "fixtures", "blip2-tiny-a");

    private static string RepoRoot()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
            if (File.Exists(Path.Combine(dir.FullName, "Blip2Mesh.sln"))) return dir.FullName;
        throw new DirectoryNotFoundException("Blip2Mesh.sln not found above the test binaries");
    }

    private static string ImageFile(int index)
    {
        using var references = JsonDocument.Parse(File.ReadAllText(Path.Combine(FixtureDir, "references.json")));
        var file = references.RootElement.GetProperty("images")[index].GetProperty("file").GetString()!;
        return Path.Combine(FixtureDir, file);
    }

    private static float[] ReferencePixelValues(int index)
    {
        using var references = SafetensorsFile.Open(Path.Combine(FixtureDir, "references.safetensors"));
        Assert.Equal([1L, 3, 224, 224], references[$"img{index}/pixel_values"].Shape);
        return references.ReadFloat32($"img{index}/pixel_values");
    }

    private static ImagePreprocessor FixturePreprocessor() =>
        new(PreprocessorConfig.Load(Path.Combine(FixtureDir, "preprocessor_config.json")));

    public static TheoryData<int> FixtureImages => new() { 0, 1, 2, 3, 4, 5, 6, 7 };

    [Theory]
    [MemberData(nameof(FixtureImages))]
    public void PixelValuesMatchTransformers(int index)
    {
        var preprocessor = FixturePreprocessor();
        var image = preprocessor.ToModelSize(File.ReadAllBytes(ImageFile(index)));
        var actual = preprocessor.ToPixelValues(image);
        var expected = ReferencePixelValues(index);

        Assert.Equal(expected.Length, actual.Length);
        var maxDiff = expected.Zip(actual, (e, a) => Math.Abs(e - a)).Max();
        output.WriteLine($"img{index} ({Path.GetFileName(ImageFile(index))}): max |diff| = {maxDiff:G9}");
        Assert.True(maxDiff <= 1e-5f, $"img{index}: max |diff| {maxDiff} > 1e-5");
    }

    /// <summary>Recovers the resized uint8 pixels (HWC) from the reference pixel values, so resizing can be checked byte for byte.</summary>
    private static byte[] ReferenceBytes(int index, ImagePreprocessor preprocessor)
    {
        var values = ReferencePixelValues(index);
        const int plane = 224 * 224;
        var bytes = new byte[3 * plane];
        for (var c = 0; c < 3; c++)
            for (var i = 0; i < plane; i++)
                bytes[3 * i + c] = (byte)Math.Round((values[c * plane + i] * preprocessor.Std[c] + preprocessor.Mean[c]) * 255);
        return bytes;
    }

    [Fact]
    public void ResizeToTheSameSizeIsANoOp()
    {
        var image = ImageDecoder.Decode(File.ReadAllBytes(ImageFile(1)));
        var resized = PillowResize.Resize(image, 224, 224, PillowFilter.Bicubic);
        Assert.Equal(image.Pixels, resized.Pixels);
        Assert.Equal(ReferenceBytes(1, FixturePreprocessor()), resized.Pixels);
    }

    [Theory]
    [InlineData(7)] // 16x12 -> 224x224: upscaling both ways
    [InlineData(0)] // 640x480 -> 224x224: downscaling both ways
    [InlineData(2)] // 100x300 -> 224x224: upscaling horizontally, downscaling vertically
    public void BicubicResizeIsByteExact(int index)
    {
        var image = ImageDecoder.Decode(File.ReadAllBytes(ImageFile(index)));
        var resized = PillowResize.Resize(image, 224, 224, PillowFilter.Bicubic);
        Assert.Equal(ReferenceBytes(index, FixturePreprocessor()), resized.Pixels);
    }

    [Fact]
    public void ResizeOfAConstantImageStaysConstant()
    {
        // Every filter's fixed-point weights sum to one within rounding, so a flat image stays flat in both directions.
        var image = new RgbImage(7, 5, Enumerable.Repeat((byte)200, 7 * 5 * 3).ToArray());
        foreach (var filter in Enum.GetValues<PillowFilter>())
        {
            Assert.All(PillowResize.Resize(image, 19, 3, filter).Pixels, p => Assert.Equal(200, p));
            Assert.All(PillowResize.Resize(image, 3, 11, filter).Pixels, p => Assert.Equal(200, p));
        }
    }

    [Fact]
    public void UnsupportedResampleIsRefused()
    {
        var error = Assert.Throws<NotSupportedException>(() => new ImagePreprocessor(new PreprocessorConfig { Resample = 0 }));
        Assert.Contains("resample 0", error.Message);
    }

    [Fact]
    public void ConfigLoadsFixtureAndDefaults()
    {
        var config = PreprocessorConfig.Load(Path.Combine(FixtureDir, "preprocessor_config.json"));
        Assert.Equal((224, 224, 3), (config.Height, config.Width, config.Resample));
        Assert.Equal(0.00392156862745098, config.RescaleFactor);
        Assert.Equal([0.26862954, 0.26130258, 0.27577711], config.ImageStd);

        var defaults = PreprocessorConfig.Parse("{}");
        Assert.Equal((384, 384, 3), (defaults.Height, defaults.Width, defaults.Resample));
        Assert.True(defaults.DoConvertRgb && defaults.DoResize && defaults.DoRescale && defaults.DoNormalize);
        Assert.Equal(1 / 255.0, defaults.RescaleFactor);
        Assert.Equal(PreprocessorConfig.OpenAiClipMean, defaults.ImageMean);
        Assert.Equal(PreprocessorConfig.OpenAiClipStd, defaults.ImageStd);

        var square = PreprocessorConfig.Parse("""{"size": 32, "do_normalize": false}""");
        Assert.Equal((32, 32, false), (square.Height, square.Width, square.DoNormalize));

        var demo = PreprocessorConfig.Load(Path.Combine(RepoRoot(), "models", "blip2-demo", "preprocessor_config.json"));
        Assert.Equal(config, demo with { ImageMean = config.ImageMean, ImageStd = config.ImageStd });
    }

    [Fact]
    public void PixelValuesAreBitExactWhereNoResizeHappens()
    {
        // img1 is already 224x224, so this isolates rescale/normalize: NumPy rescales uint8 * float64 and casts to
        // float32 before normalizing in float32. Rescaling in float32 instead is off by up to 4.8e-7, which the
        // 1e-5 tolerance above would not notice.
        var preprocessor = FixturePreprocessor();
        var actual = preprocessor.ToPixelValues(preprocessor.ToModelSize(File.ReadAllBytes(ImageFile(1))));
        Assert.Equal(ReferencePixelValues(1), actual);
    }

    // ---- formats ----

    /// <summary>A small opaque test pattern, RGBA8888 unpremultiplied.</summary>
    private static byte[] Pattern(int width, int height, bool varyAlpha)
    {
        var rgba = new byte[width * height * 4];
        for (var y = 0; y < height; y++)
            for (var x = 0; x < width; x++)
            {
                var p = (y * width + x) * 4;
                rgba[p] = (byte)(x * 37 + y * 11);
                rgba[p + 1] = (byte)(x * 5 + y * 71);
                rgba[p + 2] = (byte)(x * y * 13 + 7);
                rgba[p + 3] = varyAlpha ? (byte)(1 + (x * 29 + y * 17) % 255) : (byte)255;
            }
        return rgba;
    }

    private static byte[] DropAlpha(byte[] rgba) =>
        Enumerable.Range(0, rgba.Length / 4).SelectMany(i => new[] { rgba[4 * i], rgba[4 * i + 1], rgba[4 * i + 2] }).ToArray();

    private static unsafe byte[] SkiaEncode(byte[] rgba, int width, int height, Func<SKPixmap, SKData?> encode)
    {
        fixed (byte* p = rgba)
        {
            using var pixmap = new SKPixmap(new SKImageInfo(width, height, SKColorType.Rgba8888, SKAlphaType.Unpremul), (IntPtr)p);
            using var data = encode(pixmap) ?? throw new InvalidOperationException("Skia could not encode the test image");
            return data.ToArray();
        }
    }

    [Fact]
    public void DecodesLosslessWebp()
    {
        var rgba = Pattern(9, 6, varyAlpha: false);
        var webp = SkiaEncode(rgba, 9, 6, p => p.Encode(new SKWebpEncoderOptions(SKWebpEncoderCompression.Lossless, 100)));
        Assert.Equal("RIFF", Encoding.ASCII.GetString(webp, 0, 4));
        var image = ImageDecoder.Decode(webp);
        Assert.Equal((9, 6), (image.Width, image.Height));
        Assert.Equal(DropAlpha(rgba), image.Pixels);
    }

    [Fact]
    public void PngAlphaIsDroppedNotComposited()
    {
        var rgba = Pattern(5, 4, varyAlpha: true);
        var png = SkiaEncode(rgba, 5, 4, p => p.Encode(SKPngEncoderOptions.Default));
        Assert.Equal(DropAlpha(rgba), ImageDecoder.Decode(png).Pixels);
    }

    [Fact]
    public void DecodesGifFirstFrame()
    {
        // 2x2 GIF89a, global palette red/green/blue/white, pixels 0 1 / 2 3, LZW (min code size 2):
        // clear(4) 0 1 2 in 3 bits, then 3 and end(5) in 4 bits once the table reaches 8 entries.
        byte[] gif =
        [
            .. "GIF89a"u8, 2, 0, 2, 0, 0x81, 0, 0,
            0xFF, 0, 0, 0, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
            0x2C, 0, 0, 0, 0, 2, 0, 2, 0, 0,
            2, 3, 0x44, 0x34, 0x05, 0,
            0x3B,
        ];
        var image = ImageDecoder.Decode(gif);
        Assert.Equal((2, 2), (image.Width, image.Height));
        Assert.Equal([0xFF, 0, 0, 0, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF], image.Pixels);
    }

    [Fact]
    public void GifTransparentPixelsKeepTheirPaletteColour()
    {
        // The 2x2 GIF above with a graphic control extension making palette index 0 (red) transparent: PIL's
        // convert("RGB") of the palette image ignores transparency, so the pixel stays red.
        byte[] gif =
        [
            .. "GIF89a"u8, 2, 0, 2, 0, 0x81, 0, 0,
            0xFF, 0, 0, 0, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
            0x21, 0xF9, 4, 1, 0, 0, 0, 0,
            0x2C, 0, 0, 0, 0, 2, 0, 2, 0, 0,
            2, 3, 0x44, 0x34, 0x05, 0,
            0x3B,
        ];
        Assert.Equal([0xFF, 0, 0, 0, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF], ImageDecoder.Decode(gif).Pixels);
    }

    [Fact]
    public void DecodesBmp()
    {
        // 3x2 24-bit bottom-up BMP: rows of 9 bytes padded to 12, pixels stored B, G, R.
        byte[] top = [10, 20, 30, 40, 50, 60, 70, 80, 90];
        byte[] bottom = [1, 2, 3, 4, 5, 6, 7, 8, 9];
        var bmp = new byte[54 + 2 * 12];
        "BM"u8.CopyTo(bmp);
        BinaryPrimitives.WriteInt32LittleEndian(bmp.AsSpan(2), bmp.Length);
        BinaryPrimitives.WriteInt32LittleEndian(bmp.AsSpan(10), 54); // pixel data offset
        BinaryPrimitives.WriteInt32LittleEndian(bmp.AsSpan(14), 40); // BITMAPINFOHEADER
        BinaryPrimitives.WriteInt32LittleEndian(bmp.AsSpan(18), 3);
        BinaryPrimitives.WriteInt32LittleEndian(bmp.AsSpan(22), 2);
        BinaryPrimitives.WriteInt16LittleEndian(bmp.AsSpan(26), 1); // planes
        BinaryPrimitives.WriteInt16LittleEndian(bmp.AsSpan(28), 24); // bits per pixel
        BinaryPrimitives.WriteInt32LittleEndian(bmp.AsSpan(34), 2 * 12);
        bottom.CopyTo(bmp, 54);
        top.CopyTo(bmp, 54 + 12);

        var image = ImageDecoder.Decode(bmp);
        Assert.Equal((3, 2), (image.Width, image.Height));
        Assert.Equal([30, 20, 10, 60, 50, 40, 90, 80, 70, 3, 2, 1, 6, 5, 4, 9, 8, 7], image.Pixels);
    }

    // ---- bad input ----

    private static void AssertRefused(byte[] bytes, string messagePart)
    {
        var error = Assert.Throws<InvalidImageException>(() => ImageDecoder.Decode(bytes));
        Assert.Contains(messagePart, error.Message);
    }

    [Fact]
    public void EmptyInputIsRefused() => AssertRefused([], "image is empty");

    [Fact]
    public void RandomBytesAreRefused()
    {
        var random = new byte[4096];
        new Random(1234).NextBytes(random);
        AssertRefused(random, "not a supported image");
        AssertRefused("not an image at all"u8.ToArray(), "not a supported image");
        AssertRefused([0, 0, 1, 1, 0, 0, 0, 0], "not a supported image"); // Skia would sniff this as WBMP
    }

    [Theory]
    [InlineData(0)] // PNG
    [InlineData(2)] // JPEG
    [InlineData(6)] // JPEG
    public void TruncatedImageIsRefused(int index)
    {
        var bytes = File.ReadAllBytes(ImageFile(index));
        AssertRefused(bytes[..(bytes.Length / 2)], "image is truncated");
        AssertRefused(bytes[..30], "image is truncated"); // cut inside the header
    }

    [Fact]
    public void DecompressionBombIsRefusedFromTheHeader()
    {
        var png = TestImages.BombPng(50000, 50000);

        var error = Assert.Throws<InvalidImageException>(() => ImageDecoder.Decode(png));
        Assert.Equal($"image: image of 50000x50000 pixels exceeds the limit of {ImageDecoder.DefaultMaxPixels} pixels", error.Message);

        var small = File.ReadAllBytes(ImageFile(7));
        Assert.Equal("image: image of 16x12 pixels exceeds the limit of 100 pixels",
            Assert.Throws<InvalidImageException>(() => ImageDecoder.Decode(small, maxPixels: 100)).Message);
    }
}
