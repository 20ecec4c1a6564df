using System.Diagnostics;
using Gpt.Cli;
using Xunit;

namespace Gpt.CSharp.Tests;

/// <summary>The command lines the CLI prints (<c>try: …</c>, <c>resume with: …</c>) run as printed, however gpt was
/// started (issue 14).</summary>
public class CommandHintTests
{
    private static string Touch(string path)
    {
        Directory.CreateDirectory(Path.GetDirectoryName(path)!);
        File.WriteAllText(path, "");
        return path;
    }

    [Fact]
    public void TheInstalledToolOnThePathIsJustGpt()
    {
        using var temp = new Fixtures.TempDir();
        var shim = Touch(temp.File("tools/gpt"));
        var dll = Touch(temp.File("tools/.store/gpt.cli/0.1.0/gpt.dll"));
        Assert.Equal("gpt", CommandHints.PrefixFor(shim, dll, temp.Path, $"/usr/bin{Path.PathSeparator}{temp.File("tools")}", null));
        // The same program when the PATH finds another gpt first, or none: its own path.
        var other = Touch(temp.File("other/gpt"));
        Assert.Equal(shim, CommandHints.PrefixFor(shim, dll, "/", $"{temp.File("other")}{Path.PathSeparator}{temp.File("tools")}", null));
        Assert.Equal(shim, CommandHints.PrefixFor(shim, dll, "/", "/usr/bin", null));
        Assert.Equal("gpt", CommandHints.PrefixFor(other, dll, "/", temp.File("other"), null));
        // Under the current folder: relative, with ./ when it is in that folder itself.
        Assert.Equal(Path.Combine("tools", "gpt"), CommandHints.PrefixFor(shim, dll, temp.Path, null, null));
        Assert.Equal("./gpt", CommandHints.PrefixFor(shim, dll, temp.File("tools"), null, null));
    }

    [Fact]
    public void ABuildOfThisRepositoryIsDotnetRun()
    {
        using var temp = new Fixtures.TempDir();
        Touch(temp.File("src/Gpt.Cli/Gpt.Cli.csproj"));
        var debug = Touch(temp.File("src/Gpt.Cli/bin/Debug/net10.0/gpt"));
        var debugDll = Touch(temp.File("src/Gpt.Cli/bin/Debug/net10.0/gpt.dll"));
        var releaseDll = Touch(temp.File("src/Gpt.Cli/bin/Release/net10.0/linux-x64/gpt.dll"));
        Assert.Equal("dotnet run --project src/Gpt.Cli --", CommandHints.PrefixFor(debug, debugDll, temp.Path, "/usr/bin", null));
        Assert.Equal("dotnet run --project src/Gpt.Cli -c Release --", CommandHints.PrefixFor("/usr/bin/dotnet", releaseDll, temp.Path, null, null));
        Assert.Equal($"dotnet run --project {temp.File("src/Gpt.Cli")} --", CommandHints.PrefixFor(debug, debugDll, "/", null, null));
        // The build's apphost on the PATH is that gpt.
        Assert.Equal("gpt", CommandHints.PrefixFor(debug, debugDll, temp.Path, temp.File("src/Gpt.Cli/bin/Debug/net10.0"), null));
    }

    [Fact]
    public void ElsewhereItIsDotnetAndTheAssemblyOrALocalTool()
    {
        using var temp = new Fixtures.TempDir();
        var dll = Touch(temp.File("published app/gpt.dll"));
        Assert.Equal($"dotnet '{dll}'", CommandHints.PrefixFor("/usr/share/dotnet/dotnet", dll, "/", "/usr/bin", null));
        Assert.Equal("dotnet 'published app/gpt.dll'", CommandHints.PrefixFor("/usr/share/dotnet/dotnet", dll, temp.Path, "/usr/bin", null));
        var tool = Touch(temp.File("packages/gpt.cli.linux-x64/0.1.0/tools/net10.0/linux-x64/gpt.dll"));
        Assert.Equal("dotnet gpt", CommandHints.PrefixFor("/usr/share/dotnet/dotnet", tool, "/", null, temp.File("packages")));
        Assert.Equal("'it'\\''s'", CommandHints.Quote("it's"));
        Assert.Equal("runs/a/model", CommandHints.Quote("runs/a/model"));
        Assert.Equal("'runs/my run/model'", CommandHints.Quote("runs/my run/model"));
    }

    /// <summary>The real thing: the built gpt trains a tiny model and prints a hint, which a shell then runs as printed:
    /// started as the gpt on the PATH, as a gpt off the PATH, and as `dotnet gpt.dll`.</summary>
    [Fact]
    public void TheHintsRunAsPrinted()
    {
        var bin = Path.GetDirectoryName(typeof(CliApp).Assembly.Location)!;
        var apphost = Path.Combine(bin, "gpt");
        Assert.True(File.Exists(apphost), apphost);
        using var temp = new Fixtures.TempDir();
        var path = Environment.GetEnvironmentVariable("PATH") ?? "";
        var starts = new (string Name, string File, string[] Args, string Path, string Expected)[]
        {
            ("on-path", apphost, [], $"{bin}{System.IO.Path.PathSeparator}{path}", "try: gpt generate --model "),
            ("off-path", apphost, [], path, $"try: {apphost} generate --model "),
            ("dotnet", "dotnet", [Path.Combine(bin, "gpt.dll")], path, $"try: dotnet {Path.Combine(bin, "gpt.dll")} generate --model "),
        };
        foreach (var (name, file, args, searchPath, expected) in starts)
        {
            var (code, output) = Run(file, [.. args, "train", "--layers", "1", "--emb-dim", "16", "--heads", "2", "--context-length", "16",
                "--batch-size", "2", "--max-steps", "1", "--eval-batches", "1", "--sample-tokens", "2", "--out", temp.Path, "--name", name], temp.Path, searchPath);
            Assert.True(code == 0, output);
            var hint = output.Split('\n').Single(line => line.StartsWith("try: ", StringComparison.Ordinal));
            Assert.StartsWith(expected, hint);
            Assert.EndsWith("--prompt \"Every effort moves you\"", hint);
            var (ran, text) = Run("/bin/sh", ["-c", hint["try: ".Length..].Replace("--prompt", "--max-new-tokens 3 --prompt")], temp.Path, searchPath);
            Assert.True(ran == 0, $"{hint}\n{text}");
            Assert.StartsWith("Every effort moves you", text);
        }
    }

    private static (int ExitCode, string Output) Run(string file, string[] args, string directory, string searchPath)
    {
        var start = new ProcessStartInfo(file, args) { RedirectStandardOutput = true, RedirectStandardError = true, WorkingDirectory = directory };
        start.Environment["PATH"] = searchPath;
        start.Environment["CI"] = "1";
        using var process = Process.Start(start)!;
        var error = process.StandardError.ReadToEndAsync();
        var output = process.StandardOutput.ReadToEnd();
        process.WaitForExit();
        return (process.ExitCode, output + error.Result);
    }
}
