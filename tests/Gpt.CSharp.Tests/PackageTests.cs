using System.Diagnostics;
using System.Text.RegularExpressions;
using Xunit;
using Xunit.Abstractions;

namespace Gpt.CSharp.Tests;

/// <summary>A test that runs only when GPT_PACKAGE_TESTS=1: packing and restoring the packages takes minutes and
/// downloads TorchSharp's natives (1.6 GB) into an empty NuGet cache. `dotnet fsi build.fsx -t PackageTest` sets
/// it.</summary>
public sealed class PackageFactAttribute : FactAttribute
{
    public PackageFactAttribute()
    {
        if (Environment.GetEnvironmentVariable("GPT_PACKAGE_TESTS") != "1")
            Skip = "packs the packages and restores 1.6 GB into an empty NuGet cache: set GPT_PACKAGE_TESTS=1 (or run dotnet fsi build.fsx -t PackageTest)";
    }
}

/// <summary>The packages as an application gets them (issue 14's acceptance programs): packed, then used from a
/// feed of those packages alone with an empty NuGet package cache, dependencies from NuGet. The C# sample
/// (samples/csharp), the F# Interactive sample (samples/fsharp) and the installed gpt tool must create tensors on
/// this machine, whose libstdc++ lacks what TorchSharp's library asks for.</summary>
public class PackageTests(ITestOutputHelper log)
{
    private static readonly string Samples = Path.Combine(Fixtures.Root, "samples");

    /// <summary>The one version of the three packages, as Directory.Build.props sets it.</summary>
    private static string Version =>
        Regex.Match(File.ReadAllText(Path.Combine(Fixtures.Root, "Directory.Build.props")), "<Version>([^<]+)</Version>").Groups[1].Value;

    private (int ExitCode, string Output) Run(string file, IEnumerable<string> args, string workingDirectory, Dictionary<string, string> environment)
    {
        var start = new ProcessStartInfo(file, args)
        {
            RedirectStandardOutput = true, RedirectStandardError = true, WorkingDirectory = workingDirectory,
        };
        foreach (var (key, value) in environment) start.Environment[key] = value;
        var clock = Stopwatch.StartNew();
        using var process = Process.Start(start)!;
        var stderr = process.StandardError.ReadToEndAsync();
        var stdout = process.StandardOutput.ReadToEnd();
        process.WaitForExit();
        log.WriteLine($"{clock.Elapsed.TotalSeconds,6:0.0} s  {Path.GetFileName(file)} {string.Join(' ', args)}");
        return (process.ExitCode, stdout + stderr.Result);
    }

    /// <summary>LICENSE (MIT) and the packages' metadata say the same: the licence expression, the copyright line, and
    /// LICENSE packed beside README.md.</summary>
    [Fact]
    public void TheLicenceAndThePackageMetadataAgree()
    {
        var props = File.ReadAllText(Path.Combine(Fixtures.Root, "Directory.Build.props"));
        var licence = File.ReadAllLines(Path.Combine(Fixtures.Root, "LICENSE"));
        Assert.Equal("MIT License", licence[0]);
        Assert.Equal("MIT", Regex.Match(props, "<PackageLicenseExpression>([^<]+)<").Groups[1].Value);
        var copyright = Regex.Match(props, "<Copyright>([^<]+)<").Groups[1].Value;
        Assert.Contains(copyright, licence);
        Assert.Equal("Copyright (c) 2026 Gpt contributors", copyright);
        Assert.Contains("<None Include=\"$(MSBuildThisFileDirectory)LICENSE\" Pack=\"true\" PackagePath=\"/\"", props);
        Assert.DoesNotContain("<PackageLicenseFile>", props); // one licence statement: the expression (LICENSE travels as a file)
    }

    [PackageFact]
    public void TheSamplesAndTheToolRunFromThePackagesAlone()
    {
        using var temp = new Fixtures.TempDir();
        var version = Version;
        Directory.CreateDirectory(temp.File("home"));
        var environment = new Dictionary<string, string>
        {
            ["NUGET_PACKAGES"] = temp.File("nuget-packages"), // empty: everything comes from the feeds below
            // A fresh home too: NuGet's HTTP cache and F# Interactive's cache of #r "nuget:" resolutions live there
            // (the latter would otherwise answer with the paths of an earlier run).
            ["HOME"] = temp.File("home"),
            ["XDG_CACHE_HOME"] = temp.File("cache"),           // where the run-time libstdc++ fix writes its copy
            ["DOTNET_CLI_TELEMETRY_OPTOUT"] = "1", ["DOTNET_NOLOGO"] = "1",
        };

        // 1. The packages: those `build.fsx -t Pack` made (GPT_PACKAGE_SOURCE), or packed here.
        var feed = Environment.GetEnvironmentVariable("GPT_PACKAGE_SOURCE") is { Length: > 0 } source
            ? Path.GetFullPath(source, Fixtures.Root)
            : temp.File("feed");
        if (feed == temp.File("feed"))
        {
            var (packed, packOutput) = Run("dotnet", ["pack", "Gpt.sln", "-c", "Release", $"-p:PackageOutputPath={feed}/"], Fixtures.Root, []);
            Assert.True(packed == 0, packOutput);
        }
        foreach (var package in new[] { "Gpt.Core", "Gpt.Plot", "Gpt.CSharp", "Gpt.Cli", "Gpt.Cli.linux-x64" })
            Assert.True(File.Exists(Path.Combine(feed, $"{package}.{version}.nupkg")), $"{package}.{version}.nupkg is not in {feed}");
        foreach (var package in new[] { "Gpt.Core", "Gpt.Plot", "Gpt.CSharp" })
            Assert.True(File.Exists(Path.Combine(feed, $"{package}.{version}.snupkg")), $"{package}.{version}.snupkg is not in {feed}");
        foreach (var package in new[] { "Gpt.Core", "Gpt.Plot", "Gpt.CSharp", "Gpt.Cli.linux-x64" })
        {
            using var archive = System.IO.Compression.ZipFile.OpenRead(Path.Combine(feed, $"{package}.{version}.nupkg"));
            Assert.Contains(archive.Entries, e => e.FullName == "LICENSE");
            using var nuspec = new StreamReader(archive.Entries.Single(e => e.FullName.EndsWith(".nuspec", StringComparison.Ordinal)).Open());
            var text = nuspec.ReadToEnd();
            Assert.Contains("<license type=\"expression\">MIT</license>", text);
            Assert.Contains("<copyright>Copyright (c) 2026 Gpt contributors</copyright>", text);
        }

        // The feed of these packages, then NuGet for their dependencies (TorchSharp-cpu, FSharp.Core, ...).
        var config = temp.File("nuget.config");
        File.WriteAllText(config, $"""
            <?xml version="1.0" encoding="utf-8"?>
            <configuration>
              <packageSources>
                <clear />
                <add key="gpt-local" value="{feed}" />
                <add key="nuget.org" value="https://api.nuget.org/v3/index.json" protocolVersion="3" />
              </packageSources>
            </configuration>
            """);

        // 2. The C# application (a PackageReference to Gpt.CSharp), built outside the repository's build settings.
        var (csharp, csharpOutput) = Run("dotnet",
            ["run", "--project", Path.Combine(Samples, "csharp"), "--artifacts-path", temp.File("csharp"),
             $"-p:RestoreConfigFile={config}", "-p:CreateHardLinksForCopyLocalIfPossible=true"],
            Fixtures.Root, environment);
        Assert.True(csharp == 0, csharpOutput);
        Assert.Contains("ok 3268608 5", csharpOutput);

        // 3. The F# script (#r "nuget: Gpt.Core, <version>"): F# Interactive runs no MSBuild step, so only the run-time
        // fix in Gpt.Core lets TorchSharp load here. F# Interactive reads the nuget.config beside the script.
        var script = File.ReadAllText(Path.Combine(Samples, "fsharp", "sample.fsx"));
        Assert.Contains($"#r \"nuget: Gpt.Core, {version}\"", script); // the sample follows the version in Directory.Build.props
        Directory.CreateDirectory(temp.File("fsharp"));
        File.WriteAllText(Path.Combine(temp.File("fsharp"), "sample.fsx"), script);
        File.Copy(config, Path.Combine(temp.File("fsharp"), "nuget.config"));
        var (fsharp, fsharpOutput) = Run("dotnet", ["fsi", "sample.fsx"], temp.File("fsharp"), environment);
        Assert.True(fsharp == 0, fsharpOutput);
        Assert.Contains("ok 3268608 [|1L; 3L; 50257L|]", fsharpOutput);
        // TorchSharp's own fallback (copying the natives into the NuGet cache) never ran.
        Assert.Empty(Directory.GetDirectories(temp.File("nuget-packages"), "cpu", SearchOption.AllDirectories));

        // 4. The gpt tool: the RID-specific package carries TorchSharp's library unpatched; the run-time fix loads it.
        var tools = temp.File("tools");
        var (installed, installOutput) = Run("dotnet",
            ["tool", "install", "Gpt.Cli", "--version", version, "--tool-path", tools, "--add-source", feed, "--configfile", config],
            temp.Path, environment);
        Assert.True(installed == 0, installOutput);
        var gpt = Path.Combine(tools, OperatingSystem.IsWindows() ? "gpt.exe" : "gpt");
        var (tokenized, tokens) = Run(gpt, ["tokenize", "--text", "hi"], temp.Path, environment);
        Assert.True(tokenized == 0, tokens);
        Assert.Equal("[5303]", tokens.Trim());
        var (initialised, initOutput) = Run(gpt,
            ["init", "--layers", "1", "--emb-dim", "64", "--heads", "2", "--context-length", "32", "--out", temp.File("model")],
            temp.Path, environment);
        Assert.True(initialised == 0, initOutput);
        Assert.Contains("parameters: 3268608", initOutput);
        Assert.True(File.Exists(Path.Combine(temp.File("model"), "model.safetensors")), initOutput);
        var (generated, generateOutput) = Run(gpt,
            ["generate", "--model", temp.File("model"), "--prompt", "Hello", "--max-new-tokens", "3", "--format", "json"],
            temp.Path, environment);
        Assert.True(generated == 0, generateOutput);

        // Where libstdc++ is too old (this project's machines), the run-time fix wrote its weak-flagged copy once.
        if (!Fixtures.HostLibstdcxxHas("GLIBCXX_3.4.32"))
            Assert.Single(Directory.GetFiles(temp.File("cache"), "libLibTorchSharp.so", SearchOption.AllDirectories));
    }
}
