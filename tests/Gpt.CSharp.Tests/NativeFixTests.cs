using System.Diagnostics;
using System.Runtime.InteropServices;
using Xunit;

namespace Gpt.CSharp.Tests;

/// <summary>The libstdc++ fix at run time (Gpt.NativeLibraries): an application whose output holds TorchSharp's own,
/// unpatched libLibTorchSharp.so, as one built without this repository's MSBuild step has, still creates tensors.</summary>
public class NativeFixTests
{
    private const string Version = "GLIBCXX_3.4.32";

    /// <summary>A copy of the built gpt (hard links: the natives are 1.3 GB) whose libLibTorchSharp.so is TorchSharp's
    /// original from the NuGet cache.</summary>
    private static string UnpatchedApplication(Fixtures.TempDir temp)
    {
        var configuration = new DirectoryInfo(AppContext.BaseDirectory).Parent!.Name; // bin/<configuration>/net10.0/
        var built = Path.Combine(Fixtures.Root, "src", "Gpt.Cli", "bin", configuration, "net10.0");
        var app = temp.File("app");
        Run("cp", ["-al", built, app], null);
        var packages = Environment.GetEnvironmentVariable("NUGET_PACKAGES") is { Length: > 0 } p
            ? p : Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".nuget", "packages");
        var original = Path.Combine(packages, "torchsharp", "0.107.0", "runtimes", "linux-x64", "native", "libLibTorchSharp.so");
        Assert.True(File.Exists(original), $"TorchSharp's native library is not in the NuGet cache at {original}");
        var copy = Path.Combine(app, "runtimes", "linux-x64", "native", "libLibTorchSharp.so");
        File.Delete(copy); // only this folder's link: the build output keeps its patched file
        File.Copy(original, copy);
        return app;
    }

    private static (int ExitCode, string Output) Run(string file, string[] args, Dictionary<string, string>? environment)
    {
        var start = new ProcessStartInfo(file, args) { RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (var (key, value) in environment ?? []) start.Environment[key] = value;
        using var process = Process.Start(start)!;
        var stderr = process.StandardError.ReadToEndAsync();
        var stdout = process.StandardOutput.ReadToEnd();
        process.WaitForExit();
        return (process.ExitCode, stdout + stderr.Result);
    }

    private static bool HostHasVersion() => Fixtures.HostLibstdcxxHas(Version);

    private static string[] InitArgs(string app, string output) =>
        [Path.Combine(app, "gpt.dll"), "init", "--layers", "1", "--emb-dim", "64", "--heads", "2", "--context-length", "32", "--out", output];

    [Fact]
    public void AnApplicationWithTheOriginalLibraryCreatesTensors()
    {
        if (!OperatingSystem.IsLinux() || RuntimeInformation.ProcessArchitecture != Architecture.X64) return;
        using var temp = new Fixtures.TempDir();
        var app = UnpatchedApplication(temp);
        var cache = temp.File("cache");

        var (code, output) = Run("dotnet", InitArgs(app, temp.File("model")), new() { ["XDG_CACHE_HOME"] = cache });

        Assert.True(code == 0, output);
        Assert.True(File.Exists(Path.Combine(temp.File("model"), "model.safetensors")), output);
        var copies = Directory.Exists(cache) ? Directory.GetFiles(cache, "libLibTorchSharp.so", SearchOption.AllDirectories) : [];
        if (HostHasVersion()) Assert.Empty(copies); // nothing to fix: nothing written
        else Assert.Equal(Path.Combine(cache, "gpt-dotnet", "native"), Path.GetDirectoryName(Path.GetDirectoryName(Assert.Single(copies))));
        // TorchSharp's fallback (copying every native library next to TorchSharp.dll) never ran.
        Assert.False(Directory.Exists(Path.Combine(app, "cpu")), "TorchSharp consolidated its natives into the application folder");
    }

    [Fact]
    public void AnUnwritableCacheIsAClearError()
    {
        if (!OperatingSystem.IsLinux() || RuntimeInformation.ProcessArchitecture != Architecture.X64 || HostHasVersion()) return;
        using var temp = new Fixtures.TempDir();
        var app = UnpatchedApplication(temp);
        File.WriteAllText(temp.File("not-a-folder"), "");

        var (code, output) = Run("dotnet", InitArgs(app, temp.File("model")),
            new() { ["XDG_CACHE_HOME"] = Path.Combine(temp.File("not-a-folder"), "cache") });

        Assert.Equal(1, code);
        Assert.Contains($"gpt: error: TorchSharp's native library '{Path.Combine(app, "runtimes", "linux-x64", "native", "libLibTorchSharp.so")}' needs {Version}", output);
        Assert.Contains("Set XDG_CACHE_HOME to a writable folder", output);
    }
}
