using System.Globalization;
using System.Runtime.InteropServices;

namespace Blip2Mesh.Model.Runtime;

/// <summary>
/// Drops pages of memory-mapped files from this process's resident set (Linux: madvise DONTNEED). The kernel's page
/// cache keeps them and a later read faults them back in, so this only ever costs a re-read; elsewhere it does nothing.
/// </summary>
public static class MappedPages
{
    private const int MadviseDontNeed = 4;

    /// <summary>Releases the pages that hold [<paramref name="address"/>, + <paramref name="length"/>).</summary>
    public static void Release(IntPtr address, long length)
    {
        if (!OperatingSystem.IsLinux() || length <= 0) return;
        var page = Environment.SystemPageSize;
        var start = (long)address / page * page;
        _ = Madvise((IntPtr)start, (UIntPtr)(ulong)((long)address + length - start), MadviseDontNeed); // advisory: a failure only costs memory
    }

    /// <summary>
    /// Runs <paramref name="map"/>, then releases every page of the mappings of files under <paramref name="folder"/>
    /// that appeared while it ran (ONNX Runtime maps external data itself, private and writable though it never writes).
    /// Only new ones: a mapping from before may be unmapped by another thread meanwhile and its addresses reused, and
    /// dropping those would zero someone's memory. A mapping with pages written since (copied on write: "Anonymous"
    /// in smaps) is left alone too: dropping those would lose the writes.
    /// </summary>
    public static T ReleaseNewMappingsUnder<T>(string folder, Func<T> map)
    {
        var before = MappingsUnder(folder).Select(m => m.Start).ToHashSet();
        var result = map();
        foreach (var mapping in MappingsUnder(folder).Where(m => !before.Contains(m.Start) && m.AnonymousKilobytes == 0).ToList())
            Release((IntPtr)mapping.Start, mapping.End - mapping.Start);
        return result;
    }

    /// <summary>One mapping of a file, from /proc/self/smaps: its address range and how much of it is resident, and written.</summary>
    public readonly record struct FileMapping(long Start, long End, long ResidentKilobytes, long AnonymousKilobytes);

    /// <summary>This process's mappings of files under <paramref name="folder"/> (none outside Linux).</summary>
    public static IEnumerable<FileMapping> MappingsUnder(string folder)
    {
        if (!OperatingSystem.IsLinux()) yield break;
        var prefix = Path.TrimEndingDirectorySeparator(Path.GetFullPath(folder)) + "/";
        long start = 0, end = 0, resident = 0;
        var inFolder = false;
        foreach (var line in File.ReadLines("/proc/self/smaps"))
        {
            var first = line.AsSpan(0, Math.Max(0, line.IndexOf(' ')));
            var dash = first.IndexOf('-');
            if (dash > 0 && !first.EndsWith(":")) // a mapping's header: "start-end perms offset dev inode path"
            {
                var path = line.IndexOf('/');
                inFolder = path >= 0 && line.AsSpan(path).StartsWith(prefix, StringComparison.Ordinal);
                start = long.Parse(first[..dash], NumberStyles.HexNumber, CultureInfo.InvariantCulture);
                end = long.Parse(first[(dash + 1)..], NumberStyles.HexNumber, CultureInfo.InvariantCulture);
            }
            else if (inFolder && line.StartsWith("Rss:", StringComparison.Ordinal)) resident = Kilobytes(line);
            else if (inFolder && line.StartsWith("Anonymous:", StringComparison.Ordinal)) yield return new FileMapping(start, end, resident, Kilobytes(line));
        }
    }

    /// <summary>The value of a "Name:   123 kB" smaps line.</summary>
    private static long Kilobytes(string smapsLine) =>
        long.Parse(smapsLine.AsSpan(smapsLine.IndexOf(':') + 1).Trim().TrimEnd("kB").Trim(), CultureInfo.InvariantCulture);

    [DllImport("libc", EntryPoint = "madvise")]
    private static extern int Madvise(IntPtr address, UIntPtr length, int advice);
}
