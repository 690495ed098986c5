namespace Blip2Mesh.Model.Imaging;

/// <summary>PIL resampling filters by their <c>Image.Resampling</c> number (the <c>resample</c> key of preprocessor_config.json).</summary>
public enum PillowFilter
{
    Lanczos = 1,
    Bilinear = 2,
    Bicubic = 3,
}

/// <summary>
/// Port of Pillow 9.4's <c>ImagingResample</c> for 8-bit images (src/libImaging/Resample.c), bit-exact: the same
/// double-precision coefficients, the same 22-bit fixed-point rounding and the same horizontal-then-vertical pass order.
/// It is what <c>PIL.Image.resize(size, resample)</c> does for an RGB image with no box and no reducing_gap.
/// </summary>
public static class PillowResize
{
    // 32 bits of accumulator minus 8 bits of pixel value minus 2 bits of headroom for the negative filter lobes.
    private const int PrecisionBits = 32 - 8 - 2;

    public static PillowFilter FilterFromPil(int resample) => resample switch
    {
        1 => PillowFilter.Lanczos,
        2 => PillowFilter.Bilinear,
        3 => PillowFilter.Bicubic,
        _ => throw new NotSupportedException(
            $"resample {resample} is not supported; use 1 (LANCZOS), 2 (BILINEAR) or 3 (BICUBIC)"),
    };

    public static RgbImage Resize(RgbImage image, int width, int height, PillowFilter filter, CancellationToken cancellation = default)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(width);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(height);
        // PIL returns a copy when the size is unchanged; the image is never mutated, so the same object will do.
        if (width == image.Width && height == image.Height) return image;

        var (horizontalBounds, horizontalWeights, horizontalKSize) = Coefficients(image.Width, width, filter);
        var (verticalBounds, verticalWeights, verticalKSize) = Coefficients(image.Height, height, filter);

        var current = image;
        if (width != image.Width)
        {
            // Only the source rows the vertical pass reads are resampled horizontally.
            var firstRow = verticalBounds[0];
            var lastRow = verticalBounds[2 * height - 2] + verticalBounds[2 * height - 1];
            for (var y = 0; y < height; y++) verticalBounds[2 * y] -= firstRow;
            current = Horizontal(image, firstRow, lastRow - firstRow, width, horizontalBounds, horizontalWeights, horizontalKSize, cancellation);
        }
        cancellation.ThrowIfCancellationRequested();
        if (height != image.Height)
            current = Vertical(current, height, verticalBounds, verticalWeights, verticalKSize);
        return current;
    }

    private static double Weight(PillowFilter filter, double x) => filter switch
    {
        PillowFilter.Bicubic => Bicubic(x),
        PillowFilter.Bilinear => Bilinear(x),
        PillowFilter.Lanczos => Lanczos(x),
        _ => throw new ArgumentOutOfRangeException(nameof(filter)),
    };

    private static double Support(PillowFilter filter) => filter switch
    {
        PillowFilter.Bicubic => 2.0,
        PillowFilter.Bilinear => 1.0,
        PillowFilter.Lanczos => 3.0,
        _ => throw new ArgumentOutOfRangeException(nameof(filter)),
    };

    // The filter formulas keep Pillow's operation order so the doubles round identically.
    private static double Bicubic(double x)
    {
        const double a = -0.5;
        if (x < 0.0) x = -x;
        if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
        if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
        return 0.0;
    }

    private static double Bilinear(double x)
    {
        if (x < 0.0) x = -x;
        if (x < 1.0) return 1.0 - x;
        return 0.0;
    }

    private static double Sinc(double x)
    {
        if (x == 0.0) return 1.0;
        x *= Math.PI;
        return Math.Sin(x) / x;
    }

    private static double Lanczos(double x) => -3.0 <= x && x < 3.0 ? Sinc(x) * Sinc(x / 3) : 0.0;

    /// <summary>
    /// precompute_coeffs + normalize_coeffs_8bpc: for each output pixel, the first source pixel, the number of source
    /// pixels, and <c>ksize</c> fixed-point weights.
    /// </summary>
    private static (int[] Bounds, int[] Weights, int KSize) Coefficients(int inSize, int outSize, PillowFilter filter)
    {
        // Pillow computes in1 - in0 in float; for the whole-image box both are integers, so it is exact.
        var scale = (double)inSize / outSize;
        var filterScale = Math.Max(scale, 1.0);
        var support = Support(filter) * filterScale;
        var ksize = (int)Math.Ceiling(support) * 2 + 1;

        var bounds = new int[outSize * 2];
        var weights = new int[outSize * ksize];
        var k = new double[ksize];
        for (var xx = 0; xx < outSize; xx++)
        {
            var center = (xx + 0.5) * scale;
            var ss = 1.0 / filterScale;
            // C's (int) cast truncates towards zero, as does C#'s.
            var xmin = Math.Max((int)(center - support + 0.5), 0);
            var xmax = Math.Min((int)(center + support + 0.5), inSize) - xmin;
            var ww = 0.0;
            for (var x = 0; x < xmax; x++)
            {
                var w = Weight(filter, (x + xmin - center + 0.5) * ss);
                k[x] = w;
                ww += w;
            }
            for (var x = 0; x < xmax; x++)
            {
                if (ww != 0.0) k[x] /= ww;
                // Round half away from zero, then truncate, as normalize_coeffs_8bpc does.
                weights[xx * ksize + x] = k[x] < 0
                    ? (int)(-0.5 + k[x] * (1 << PrecisionBits))
                    : (int)(0.5 + k[x] * (1 << PrecisionBits));
            }
            bounds[2 * xx] = xmin;
            bounds[2 * xx + 1] = xmax;
        }
        return (bounds, weights, ksize);
    }

    private static byte Clip8(int accumulator) => (byte)Math.Clamp(accumulator >> PrecisionBits, 0, 255);

    private static RgbImage Horizontal(RgbImage src, int firstRow, int rows, int width, int[] bounds, int[] weights, int ksize, CancellationToken cancellation)
    {
        var input = src.Pixels;
        var output = new byte[3L * width * rows];
        for (var yy = 0; yy < rows; yy++)
        {
            // A tall image takes seconds here; nobody waiting for it any more stops it.
            if ((yy & 1023) == 0) cancellation.ThrowIfCancellationRequested();
            var inRow = (yy + firstRow) * src.Width * 3;
            for (var xx = 0; xx < width; xx++)
            {
                var xmin = bounds[2 * xx];
                var xmax = bounds[2 * xx + 1];
                var kOffset = xx * ksize;
                // Starting at one half in fixed point makes the final shift round to nearest.
                int s0 = 1 << (PrecisionBits - 1), s1 = s0, s2 = s0;
                for (var x = 0; x < xmax; x++)
                {
                    var w = weights[kOffset + x];
                    var p = inRow + (x + xmin) * 3;
                    s0 += input[p] * w;
                    s1 += input[p + 1] * w;
                    s2 += input[p + 2] * w;
                }
                var o = ((long)yy * width + xx) * 3;
                output[o] = Clip8(s0);
                output[o + 1] = Clip8(s1);
                output[o + 2] = Clip8(s2);
            }
        }
        return new RgbImage(width, rows, output);
    }

    private static RgbImage Vertical(RgbImage src, int height, int[] bounds, int[] weights, int ksize)
    {
        var input = src.Pixels;
        var rowBytes = src.Width * 3;
        var output = new byte[rowBytes * height];
        for (var yy = 0; yy < height; yy++)
        {
            var ymin = bounds[2 * yy];
            var ymax = bounds[2 * yy + 1];
            var kOffset = yy * ksize;
            for (var c = 0; c < rowBytes; c++)
            {
                var s = 1 << (PrecisionBits - 1);
                for (var y = 0; y < ymax; y++)
                    s += input[(y + ymin) * rowBytes + c] * weights[kOffset + y];
                output[yy * rowBytes + c] = Clip8(s);
            }
        }
        return new RgbImage(src.Width, height, output);
    }
}
