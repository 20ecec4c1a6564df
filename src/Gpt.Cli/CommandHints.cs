namespace Gpt.Cli;

/// <summary>Command lines the CLI prints for people to run next (<c>try: gpt generate --model …</c>, <c>resume with:
/// …</c>), written so that they run as printed: <c>gpt …</c> when this process is the <c>gpt</c> found on the PATH (the
/// installed tool, a published folder on the PATH); <c>dotnet run --project src/Gpt.Cli --</c> from a build of this
/// repository; the program's own path when it is a <c>gpt</c> elsewhere; <c>dotnet gpt</c> as a local tool; else
/// <c>dotnet path/to/gpt.dll</c>.</summary>
internal static class CommandHints
{
    /// <summary>What starts a gpt command line the way this process was started.</summary>
    public static string Prefix { get; } = PrefixFor(
        Environment.ProcessPath, typeof(CommandHints).Assembly.Location, Environment.CurrentDirectory,
        Environment.GetEnvironmentVariable("PATH"), NuGetPackagesFolder());

    /// <summary>A gpt command line: the prefix, then <paramref name="arguments"/> (quoted already where needed).</summary>
    public static string Gpt(string arguments) => $"{Prefix} {arguments}";

    /// <summary>The prefix for a process (<paramref name="processPath"/>: the executable the OS started) running
    /// <paramref name="assemblyPath"/> (gpt.dll) in <paramref name="currentDirectory"/>, with a PATH variable and the
    /// NuGet packages folder (where local tools live).</summary>
    internal static string PrefixFor(string? processPath, string assemblyPath, string currentDirectory, string? pathVariable, string? nugetPackages)
    {
        var isGpt = processPath is not null && Path.GetFileNameWithoutExtension(processPath) == "gpt";
        if (isGpt && FindOnPath(pathVariable) is { } found && SameFile(found, processPath!)) return "gpt";
        if (ProjectBuild(assemblyPath) is var (project, configuration))
        {
            var configurationOption = configuration.Equals("Debug", StringComparison.OrdinalIgnoreCase) ? "" : $" -c {Quote(configuration)}";
            return $"dotnet run --project {Quote(Display(project, currentDirectory))}{configurationOption} --";
        }
        if (isGpt) return Quote(Display(processPath!, currentDirectory, executable: true));
        if (nugetPackages is not null && IsUnder(assemblyPath, nugetPackages)) return "dotnet gpt";
        return $"dotnet {Quote(Display(assemblyPath, currentDirectory))}";
    }

    /// <summary>A word for a POSIX shell (or cmd on Windows): as it is when it needs no quotes, else quoted.</summary>
    public static string Quote(string word)
    {
        if (word.Length > 0 && word.All(c => char.IsAsciiLetterOrDigit(c) || "_-./:=@%+,~".Contains(c))) return word;
        return OperatingSystem.IsWindows() ? $"\"{word}\"" : "'" + word.Replace("'", "'\\''") + "'";
    }

    /// <summary>The project folder and configuration of a build output (PROJECT/bin/CONFIGURATION/TFM[/RID]/gpt.dll)
    /// of this repository's src/Gpt.Cli; null for anything else.</summary>
    private static (string Project, string Configuration)? ProjectBuild(string assemblyPath)
    {
        var directory = Path.GetDirectoryName(Path.GetFullPath(assemblyPath));
        string? below = null;
        while (directory is not null && Path.GetFileName(directory) != "bin")
        {
            below = directory;
            directory = Path.GetDirectoryName(directory);
        }
        if (directory is null || below is null) return null;
        var project = Path.GetDirectoryName(directory);
        if (project is null || !File.Exists(Path.Combine(project, "Gpt.Cli.csproj"))) return null;
        // The folder just under bin/ on the way up is the configuration.
        return (project, Path.GetFileName(below));
    }

    /// <summary>A path as short as it can be and still run: relative when it lies under the current directory (with ./
    /// for an executable, which a shell would otherwise look up on the PATH), else absolute.</summary>
    private static string Display(string path, string currentDirectory, bool executable = false)
    {
        var full = Path.GetFullPath(path);
        if (!IsUnder(full, currentDirectory)) return full;
        var relative = Path.GetRelativePath(currentDirectory, full);
        return executable && !relative.Contains(Path.DirectorySeparatorChar) ? "." + Path.DirectorySeparatorChar + relative : relative;
    }

    private static bool IsUnder(string path, string directory)
    {
        var root = Path.TrimEndingDirectorySeparator(Path.GetFullPath(directory)) + Path.DirectorySeparatorChar;
        return Path.GetFullPath(path).StartsWith(root, OperatingSystem.IsWindows() ? StringComparison.OrdinalIgnoreCase : StringComparison.Ordinal);
    }

    /// <summary>The gpt a shell would run: the first gpt (gpt.exe on Windows) in the PATH's folders.</summary>
    private static string? FindOnPath(string? pathVariable)
    {
        if (string.IsNullOrEmpty(pathVariable)) return null;
        var name = OperatingSystem.IsWindows() ? "gpt.exe" : "gpt";
        foreach (var folder in pathVariable.Split(Path.PathSeparator, StringSplitOptions.RemoveEmptyEntries))
        {
            var candidate = Path.Combine(folder.Trim('"'), name);
            if (File.Exists(candidate)) return candidate;
        }
        return null;
    }

    private static bool SameFile(string a, string b) => string.Equals(Resolve(a), Resolve(b),
        OperatingSystem.IsWindows() ? StringComparison.OrdinalIgnoreCase : StringComparison.Ordinal);

    private static string Resolve(string path)
    {
        var full = Path.GetFullPath(path);
        try
        {
            return new FileInfo(full).ResolveLinkTarget(returnFinalTarget: true)?.FullName ?? full;
        }
        catch (IOException)
        {
            return full;
        }
    }

    private static string? NuGetPackagesFolder() =>
        Environment.GetEnvironmentVariable("NUGET_PACKAGES") is { Length: > 0 } packages ? packages
        : Environment.GetFolderPath(Environment.SpecialFolder.UserProfile) is { Length: > 0 } home ? Path.Combine(home, ".nuget", "packages")
        : null;
}
