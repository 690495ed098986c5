using System.Buffers.Binary;
using System.IO.Compression;
using System.Text;

namespace Blip2Mesh.Tests;

/// <summary>Hand-made image bytes for the bad-input tests.</summary>
public static class TestImages
{
    /// <summary>
    /// A well-formed PNG whose header claims width × height RGB pixels, with only one row of data: decoding it
    /// fully would allocate gigabytes, so it must be refused from the header (a decompression bomb).
    /// </summary>
    public static byte[] BombPng(int width, int height)
    {
        var ihdr = new byte[13];
        BinaryPrimitives.WriteInt32BigEndian(ihdr, width);
        BinaryPrimitives.WriteInt32BigEndian(ihdr.AsSpan(4), height);
        ihdr[8] = 8; // bit depth
        ihdr[9] = 2; // colour type RGB
        using var idat = new MemoryStream();
        using (var zlib = new ZLibStream(idat, CompressionLevel.SmallestSize, leaveOpen: true))
            zlib.Write(new byte[1 + 3 * width]); // one filtered row of zeros; the rest would follow
        return [0x89, .. "PNG\r\n\x1a\n"u8, .. PngChunk("IHDR", ihdr), .. PngChunk("IDAT", idat.ToArray()), .. PngChunk("IEND", [])];
    }

    /// <summary>A complete, valid black RGB PNG of width × height: small to send, slow and large to decode.</summary>
    public static byte[] BlackPng(int width, int height)
    {
        var ihdr = new byte[13];
        BinaryPrimitives.WriteInt32BigEndian(ihdr, width);
        BinaryPrimitives.WriteInt32BigEndian(ihdr.AsSpan(4), height);
        ihdr[8] = 8;
        ihdr[9] = 2;
        using var idat = new MemoryStream();
        using (var zlib = new ZLibStream(idat, CompressionLevel.Fastest, leaveOpen: true))
        {
            var row = new byte[1 + 3 * width];
            for (var y = 0; y < height; y++) zlib.Write(row);
        }
        return [0x89, .. "PNG\r\n\x1a\n"u8, .. PngChunk("IHDR", ihdr), .. PngChunk("IDAT", idat.ToArray()), .. PngChunk("IEND", [])];
    }

    private static byte[] PngChunk(string type, byte[] data)
    {
        var chunk = new byte[12 + data.Length];
        BinaryPrimitives.WriteInt32BigEndian(chunk, data.Length);
        Encoding.ASCII.GetBytes(type).CopyTo(chunk, 4);
        data.CopyTo(chunk, 8);
        BinaryPrimitives.WriteUInt32BigEndian(chunk.AsSpan(8 + data.Length), Crc32(chunk.AsSpan(4, 4 + data.Length)));
        return chunk;
    }

    private static uint Crc32(ReadOnlySpan<byte> bytes)
    {
        var crc = 0xFFFFFFFFu;
        foreach (var b in bytes)
        {
            crc ^= b;
            for (var i = 0; i < 8; i++) crc = (crc & 1) != 0 ? (crc >> 1) ^ 0xEDB88320u : crc >> 1;
        }
        return ~crc;
    }
}
