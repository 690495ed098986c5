using System.Globalization;

namespace Blip2Mesh.Cli;

/// <summary>A usage error: printed with the command's usage, exit code 2.</summary>
public sealed class UsageException(string message) : Exception(message);

/// <summary>--help or -h among a command's options: its usage is printed, exit code 0.</summary>
public sealed class HelpRequestedException() : Exception("help requested");

/// <summary>
/// Minimal GNU-style argument reader: "--name value", "--name=value", boolean "--flag", and positionals.
/// Every option a command reads is consumed; anything left over is reported as unknown. --help or -h where an
/// option may stand (not as another option's value) asks for the command's usage.
/// </summary>
public sealed class Args
{
    private readonly Dictionary<string, string?> _options = new(StringComparer.Ordinal);
    private readonly List<string> _positionals = [];

    public Args(IEnumerable<string> args, IReadOnlySet<string> flags)
    {
        using var e = args.GetEnumerator();
        while (e.MoveNext())
        {
            var arg = e.Current;
            if (arg is "--help" or "-h") throw new HelpRequestedException();
            if (!arg.StartsWith("--", StringComparison.Ordinal) || arg == "--")
            {
                _positionals.Add(arg);
                continue;
            }
            var name = arg[2..];
            string? value = null;
            var eq = name.IndexOf('=');
            if (eq >= 0) (name, value) = (name[..eq], name[(eq + 1)..]);
            else if (!flags.Contains(name))
            {
                if (!e.MoveNext()) throw new UsageException($"--{name} needs a value");
                value = e.Current;
            }
            _options[name] = value;
        }
    }

    public IReadOnlyList<string> Positionals => _positionals;

    public bool Flag(string name) => _options.Remove(name);

    public string? Optional(string name) => _options.Remove(name, out var value) ? value ?? "" : null;

    public string Required(string name) => Optional(name) ?? throw new UsageException($"--{name} is required");

    public int? Int(string name) => Parse(name, s => int.Parse(s, CultureInfo.InvariantCulture));
    public long? Long(string name) => Parse(name, s => long.Parse(s, CultureInfo.InvariantCulture));
    public float? Float(string name) => Parse(name, s => float.Parse(s, CultureInfo.InvariantCulture));

    private T? Parse<T>(string name, Func<string, T> parse) where T : struct
    {
        var text = Optional(name);
        if (text is null) return null;
        try { return parse(text); }
        catch (FormatException) { throw new UsageException($"--{name}: '{text}' is not a valid {typeof(T).Name.ToLowerInvariant()}"); }
        catch (OverflowException) { throw new UsageException($"--{name}: '{text}' is out of range"); }
    }

    /// <summary>Fails on options nobody read (typos), so they are never silently ignored.</summary>
    public void EnsureAllUsed()
    {
        if (_options.Count > 0) throw new UsageException($"unknown option(s): {string.Join(", ", _options.Keys.Select(k => "--" + k))}");
    }
}
