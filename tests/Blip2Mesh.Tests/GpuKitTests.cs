using System.Buffers.Binary;
using System.Diagnostics;
using System.Security.Cryptography;

namespace Blip2Mesh.Tests;

/// <summary>
/// The GPU kit's scripts on small inputs, no GPU and no published kit needed: the CUDA library finder on a fake
/// site-packages, packing into parts under a size limit and reassembling them (damaged and missing parts refused), and
/// the fat-binary pruner on a made-up ELF file. <c>make gpu-kit-check</c> checks a real kit end to end.
/// </summary>
public sealed class GpuKitTests : IDisposable
{
    private static readonly string Scripts = Path.Combine(Fixtures.RepoRoot, "scripts");
    private readonly string _dir = Directory.CreateTempSubdirectory("gpukit-test-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    // ---- scripts/cuda-libs.sh ---------------------------------------------------------------------------------------

    /// <summary>A site-packages folder with the CUDA 13 wheels' layout: nvidia/cu13/lib, nvidia/cudnn/lib, and an unrelated nccl.</summary>
    private string FakeSitePackages(string name, params string[] leaveOut)
    {
        var site = Path.Combine(_dir, name);
        foreach (var (folder, library) in new[]
                 {
                     ("cu13", "libcudart.so.13"), ("cu13", "libcublas.so.13"), ("cu13", "libcublasLt.so.13"), ("cu13", "libcurand.so.10"),
                     ("cudnn", "libcudnn.so.9"), ("nccl", "libnccl.so.2"),
                 })
        {
            if (leaveOut.Contains(library)) continue;
            var lib = Directory.CreateDirectory(Path.Combine(site, "nvidia", folder, "lib")).FullName;
            File.WriteAllBytes(Path.Combine(lib, library), []);
        }
        Directory.CreateDirectory(Path.Combine(site, "nvidia", "cudnn", "include"));
        return site;
    }

    [Fact]
    public void CudaLibsFindsTheWheelFoldersHoldingWhatTheProviderLoads()
    {
        var site = FakeSitePackages("site");
        var result = Run("bash", [Path.Combine(Scripts, "cuda-libs.sh"), site]);
        Assert.True(result.ExitCode == 0, result.Stderr);
        // Only the folders that hold a needed library, in the order of the list; nccl is not one.
        Assert.Equal($"{site}/nvidia/cu13/lib:{site}/nvidia/cudnn/lib", result.Stdout.Trim());
    }

    [Fact]
    public void CudaLibsSearchesEverySitePackagesOfPythonsNvidiaPackage()
    {
        // cuDNN in a second site-packages: nvidia is a namespace package, so Python's nvidia.__path__ lists both.
        var first = FakeSitePackages("first", "libcudnn.so.9");
        var second = Path.Combine(_dir, "second");
        var cudnn = Directory.CreateDirectory(Path.Combine(second, "nvidia", "cudnn", "lib")).FullName;
        File.WriteAllBytes(Path.Combine(cudnn, "libcudnn.so.9"), []);

        var result = Run("bash", [Path.Combine(Scripts, "cuda-libs.sh")], new() { ["PYTHONPATH"] = $"{first}:{second}" });
        Assert.True(result.ExitCode == 0, result.Stderr);
        var folders = result.Stdout.Trim().Split(':');
        Assert.Contains($"{first}/nvidia/cu13/lib", folders);
        Assert.Contains($"{second}/nvidia/cudnn/lib", folders);
        Assert.DoesNotContain($"{first}/nvidia/nccl/lib", folders);
    }

    [Fact]
    public void CudaLibsNamesTheLibraryItCannotFind()
    {
        var site = FakeSitePackages("site", "libcurand.so.10");
        var result = Run("bash", [Path.Combine(Scripts, "cuda-libs.sh"), site]);
        Assert.Equal(1, result.ExitCode);
        Assert.Equal("", result.Stdout);
        Assert.Contains("not found: libcurand.so.10", result.Stderr);
        Assert.Contains($"{site}/nvidia/*/lib", result.Stderr);
    }

    // ---- scripts/gpu-kit.sh pack / verify / assemble -----------------------------------------------------------------

    private const int PartBytes = 64 * 1024;

    /// <summary>A folder of 200 KB of random bytes (xz cannot shrink them) and a small text file, packed into parts of 64 KiB.</summary>
    private (string Folder, string Parts) PackedFolder()
    {
        var folder = Directory.CreateDirectory(Path.Combine(_dir, "src", "kit")).FullName;
        File.WriteAllBytes(Path.Combine(folder, "random.bin"), RandomNumberGenerator.GetBytes(200_000));
        Directory.CreateDirectory(Path.Combine(folder, "sub"));
        File.WriteAllText(Path.Combine(folder, "sub", "note.txt"), "kept as it was\n");
        var parts = Path.Combine(_dir, "parts");
        var result = GpuKit(["pack", folder, parts]);
        Assert.True(result.ExitCode == 0, result.Stderr);
        return (folder, parts);
    }

    private static string[] PartFiles(string parts) =>
        Directory.GetFiles(parts, "blip2mesh-gpu-kit.tar.xz.part-*").Order(StringComparer.Ordinal).ToArray();

    [Fact]
    public void PackSplitsIntoPartsUnderTheLimitWithTheirChecksums()
    {
        var (_, parts) = PackedFolder();
        var files = PartFiles(parts);
        Assert.True(files.Length >= 4, $"{files.Length} part(s) for 200 KB in 64 KiB parts");
        Assert.All(files, f => Assert.True(new FileInfo(f).Length <= PartBytes, $"{f}: {new FileInfo(f).Length} bytes"));
        var sums = File.ReadAllLines(Path.Combine(parts, "SHA256SUMS"));
        Assert.Equal(files.Select(Path.GetFileName), sums.Select(line => line.Split("  ")[1]));
        foreach (var (file, line) in files.Zip(sums))
            Assert.Equal(Convert.ToHexStringLower(SHA256.HashData(File.ReadAllBytes(file))), line.Split("  ")[0]);
    }

    [Fact]
    public void AssembleRestoresTheFolderFromItsParts()
    {
        var (folder, parts) = PackedFolder();
        var dest = Path.Combine(_dir, "dest");
        var result = GpuKit(["assemble", parts, dest]);
        Assert.True(result.ExitCode == 0, result.Stderr);
        Assert.Equal(File.ReadAllBytes(Path.Combine(folder, "random.bin")), File.ReadAllBytes(Path.Combine(dest, "kit", "random.bin")));
        Assert.Equal("kept as it was\n", File.ReadAllText(Path.Combine(dest, "kit", "sub", "note.txt")));
        // The parts' list, copied last, marks a finished reassembly.
        Assert.Equal(File.ReadAllText(Path.Combine(parts, "SHA256SUMS")), File.ReadAllText(Path.Combine(dest, "SHA256SUMS")));
    }

    [Fact]
    public void VerifyListsThePartsNotHereYetAndAssembleRefusesToStartWithout()
    {
        var (_, parts) = PackedFolder();
        var second = PartFiles(parts)[1];
        File.Delete(second);

        var verify = GpuKit(["verify", parts]);
        Assert.Equal(0, verify.ExitCode);
        Assert.Contains($"{Path.GetFileName(second)}: not here yet", verify.Stdout);
        Assert.Contains($"{Path.GetFileName(PartFiles(parts)[0])}: {new FileInfo(PartFiles(parts)[0]).Length} bytes", verify.Stdout);

        var dest = Path.Combine(_dir, "dest");
        var assemble = GpuKit(["assemble", parts, dest]);
        Assert.Equal(1, assemble.ExitCode);
        Assert.Contains($"missing in {parts}: {Path.GetFileName(second)}", assemble.Stderr);
        Assert.False(File.Exists(Path.Combine(dest, "SHA256SUMS")));
    }

    [Fact]
    public void ADamagedPartIsNamedAndNothingIsUnpacked()
    {
        var (_, parts) = PackedFolder();
        var last = PartFiles(parts)[^1];
        var bytes = File.ReadAllBytes(last);
        bytes[bytes.Length / 2] ^= 0x01;
        File.WriteAllBytes(last, bytes);

        var dest = Path.Combine(_dir, "dest");
        var result = GpuKit(["assemble", parts, dest]);
        Assert.Equal(1, result.ExitCode);
        Assert.Contains($"{Path.GetFileName(last)}: {bytes.Length} bytes, checksum differs", result.Stdout);
        Assert.False(Directory.Exists(Path.Combine(dest, "kit")));
    }

    [Fact]
    public void APartOverTheLimitIsRefused()
    {
        var (_, parts) = PackedFolder();
        var result = GpuKit(["verify", parts, "--all"], partBytes: PartBytes / 2);
        Assert.Equal(1, result.ExitCode);
        Assert.Contains($"{Path.GetFileName(PartFiles(parts)[0])}: {PartBytes} bytes, over the limit of {PartBytes / 2} bytes", result.Stdout);
    }

    // ---- scripts/fatbin-prune.py ------------------------------------------------------------------------------------

    private sealed record Entry(uint Arch, byte[] Payload);

    /// <summary>One fat binary: its 16-byte header, then each entry's 64-byte header and payload.</summary>
    private static byte[] FatBinary(params Entry[] entries)
    {
        var body = entries.SelectMany(EntryBytes).ToArray();
        var blob = new byte[16 + body.Length];
        BinaryPrimitives.WriteUInt32LittleEndian(blob, 0xBA55ED50);
        BinaryPrimitives.WriteUInt16LittleEndian(blob.AsSpan(4), 1);
        BinaryPrimitives.WriteUInt16LittleEndian(blob.AsSpan(6), 16);
        BinaryPrimitives.WriteUInt64LittleEndian(blob.AsSpan(8), (ulong)body.Length);
        body.CopyTo(blob, 16);
        return blob;
    }

    private static byte[] EntryBytes(Entry entry)
    {
        var bytes = new byte[64 + entry.Payload.Length];
        BinaryPrimitives.WriteUInt16LittleEndian(bytes, 2);                                     // kind: ELF (machine code)
        BinaryPrimitives.WriteUInt16LittleEndian(bytes.AsSpan(2), 0x101);
        BinaryPrimitives.WriteUInt32LittleEndian(bytes.AsSpan(4), 64);                          // header size
        BinaryPrimitives.WriteUInt64LittleEndian(bytes.AsSpan(8), (ulong)entry.Payload.Length);
        BinaryPrimitives.WriteUInt32LittleEndian(bytes.AsSpan(28), entry.Arch);
        entry.Payload.CopyTo(bytes, 64);
        return bytes;
    }

    private static Entry Code(uint arch, int length) => new(arch, Enumerable.Repeat((byte)arch, length).ToArray());

    /// <summary>An ELF64 file: header, code bytes, the .nv_fatbin section, .shstrtab, section headers; and where the section starts.</summary>
    private static (byte[] File, int Section) Elf(byte[] fatbin)
    {
        var text = Enumerable.Range(0, 40).Select(i => (byte)(0xC0 + i)).ToArray();
        var names = "\0.shstrtab\0.nv_fatbin\0"u8.ToArray();
        int section = 64 + text.Length, namesAt = section + fatbin.Length, headersAt = namesAt + names.Length;
        var file = new byte[headersAt + 3 * 64];
        file[0] = 0x7F; "ELF"u8.CopyTo(file.AsSpan(1));
        file[4] = 2; file[5] = 1; file[6] = 1;                                                  // 64-bit, little-endian, version 1
        BinaryPrimitives.WriteUInt64LittleEndian(file.AsSpan(0x28), (ulong)headersAt);
        BinaryPrimitives.WriteUInt16LittleEndian(file.AsSpan(0x3A), 64);
        BinaryPrimitives.WriteUInt16LittleEndian(file.AsSpan(0x3C), 3);
        BinaryPrimitives.WriteUInt16LittleEndian(file.AsSpan(0x3E), 1);                         // .shstrtab is section 1
        text.CopyTo(file, 64);
        fatbin.CopyTo(file, section);
        names.CopyTo(file, namesAt);
        void Header(int index, uint name, int offset, int size)
        {
            var header = file.AsSpan(headersAt + index * 64);
            BinaryPrimitives.WriteUInt32LittleEndian(header, name);
            BinaryPrimitives.WriteUInt32LittleEndian(header[4..], index == 1 ? 3u : 1u);        // STRTAB, PROGBITS
            BinaryPrimitives.WriteUInt64LittleEndian(header[24..], (ulong)offset);
            BinaryPrimitives.WriteUInt64LittleEndian(header[32..], (ulong)size);
        }
        Header(1, 1, namesAt, names.Length);
        Header(2, 11, section, fatbin.Length);
        return (file, section);
    }

    [Fact]
    public void FatbinPruneKeepsOneArchitecturesEntriesAndLeavesTheRestOfTheFileAsItWas()
    {
        Entry sm80 = Code(80, 24), sm90 = Code(90, 32), sm90a = Code(90, 16), sm120 = Code(120, 16), sm75 = Code(75, 8), sm86 = Code(86, 8);
        byte[] first = FatBinary(sm80, sm90, sm120, sm90a), second = FatBinary(sm75), third = FatBinary(sm86, sm90);
        // Fat binaries are 8-byte aligned: zero words may sit between them.
        var (original, section) = Elf([.. first, .. second, .. new byte[8], .. third]);
        var path = Path.Combine(_dir, "libprovider.so");
        File.WriteAllBytes(path, original);

        var result = Run("python3", [Path.Combine(Scripts, "fatbin-prune.py"), "--arch", "90", path]);
        Assert.True(result.ExitCode == 0, result.Stderr);
        Assert.Contains("kept 3 sm_90 entries, dropped 3 of other architectures", result.Stdout);
        Assert.Contains("1 without sm_90 left whole", result.Stdout);

        var pruned = File.ReadAllBytes(path);
        Assert.Equal(original.Length, pruned.Length);
        // Outside the section nothing changed.
        Assert.Equal(original[..section], pruned[..section]);
        var sectionEnd = section + first.Length + second.Length + 8 + third.Length;
        Assert.Equal(original[sectionEnd..], pruned[sectionEnd..]);
        // Each fat binary holds its sm_90 entries, byte for byte and in order, its size says so, and zeros follow.
        byte[][] expected = [FatBinary(sm90, sm90a), second, new byte[8], FatBinary(sm90)];
        var at = section;
        foreach (var (blob, before) in expected.Zip(new[] { first, second, new byte[8], third }))
        {
            Assert.Equal(blob, pruned[at..(at + blob.Length)]);
            Assert.All(pruned[(at + blob.Length)..(at + before.Length)], b => Assert.Equal(0, b));
            at += before.Length;
        }

        // Pruning again changes nothing.
        var again = Run("python3", [Path.Combine(Scripts, "fatbin-prune.py"), "--arch", "90", path]);
        Assert.True(again.ExitCode == 0, again.Stderr);
        Assert.Equal(pruned, File.ReadAllBytes(path));
    }

    [Fact]
    public void FatbinPruneLeavesAFileWithoutThatArchitectureAlone()
    {
        var (original, _) = Elf(FatBinary(Code(80, 8), Code(86, 8)));
        var path = Path.Combine(_dir, "libprovider.so");
        File.WriteAllBytes(path, original);

        var result = Run("python3", [Path.Combine(Scripts, "fatbin-prune.py"), "--arch", "90", path]);
        Assert.Equal(1, result.ExitCode);
        Assert.Contains("no code for sm_90", result.Stderr);
        Assert.Equal(original, File.ReadAllBytes(path));
    }

    // ---- processes --------------------------------------------------------------------------------------------------

    private static ProcessResult GpuKit(string[] args, int partBytes = PartBytes) =>
        Run("bash", [Path.Combine(Scripts, "gpu-kit.sh"), .. args], new() { ["PART_BYTES"] = partBytes.ToString() });

    private static ProcessResult Run(string program, string[] args, Dictionary<string, string>? environment = null) =>
        TestProcess.Run(program, args, TimeSpan.FromMinutes(1), environment);
}
