using System.Diagnostics;
using System.Text.Json;
using Xunit;

namespace Gpt.CSharp.Tests;

/// <summary>Device selection through the C# API, every command that builds or runs a model, and the MSBuild switch to
/// TorchSharp-cuda (issue 14).</summary>
public class DeviceTests
{
    [Fact]
    public void TheApiResolvesDevicesAndRefusesCudaOnThisBuild()
    {
        Assert.Equal("cpu", GptRuntime.TorchBackend);
        Assert.False(GptRuntime.CudaAvailable);
        Assert.Equal("cpu", GptRuntime.ResolveDevice("cpu"));
        Assert.Equal("cpu", GptRuntime.ResolveDevice("auto"));
        var cuda = Assert.Throws<GptException>(() => GptRuntime.ResolveDevice("cuda"));
        Assert.Contains("CUDA was asked for (device cuda) but this build uses TorchSharp-cpu", cuda.Message);
        Assert.Contains("-p:TorchBackend=cuda", cuda.Message);
        var bad = Assert.Throws<GptException>(() => GptRuntime.ResolveDevice("cuda:x"));
        Assert.Equal("device 'cuda:x': expected a GPU number after 'cuda:', such as cuda:0, found 'x'", bad.Message);

        using var model = GptModel.Create(GptConfiguration.Gpt2Small with { Layers = 1, EmbeddingDim = 16, Heads = 2, ContextLength = 16 }, 1);
        Assert.Equal("cpu", model.Device);
        var before = model.Generate([1, 2, 3], new GenerationSettings { MaxNewTokens = 4, EndOfTextId = null }).NewIds;
        Assert.Same(model, model.ToDevice("auto"));
        Assert.Equal(before, model.Generate([1, 2, 3], new GenerationSettings { MaxNewTokens = 4, EndOfTextId = null }).NewIds);
        Assert.Throws<GptException>(() => model.ToDevice("cuda:1"));
        Assert.Equal("cpu", model.Device);

        Assert.Equal("cpu", new TrainingOptions().Device);
        var run = Assert.Throws<GptException>(() => (new TrainingOptions() with { Device = "cuda" }).Validate());
        Assert.Contains("this build uses TorchSharp-cpu", run.Message);
        Assert.Throws<GptException>(() => (new TrainingOptions() with { Device = "gpu0" }).Validate());
    }

    [Fact]
    public void EveryCommandThatBuildsOrRunsAModelTakesDevice()
    {
        string[][] commands =
        [
            ["train"], ["finetune", "classify"], ["finetune", "instruct"], ["generate"], ["respond"], ["classify"], ["logits"], ["info"],
            ["bench", "train"], ["bench", "generate"],
        ];
        foreach (var command in commands)
        {
            var (code, help, _) = Cli.Run(null, [.. command, "--help"]);
            Assert.True(code == 0, string.Join(' ', command));
            Assert.Contains("--device", help);
            Assert.Contains("cuda:N", help);
        }
    }

    [Fact]
    public void TheCliRunsOnTheCpuAndRefusesCudaClearly()
    {
        var model = Fixtures.TinyGpt2;
        var (code, output, error) = Cli.Run(null, "generate", "--model", model, "--ids", "1,2,3", "--max-new-tokens", "3", "--device", "auto", "--format", "json");
        Assert.True(code == 0, error);
        Assert.Equal(6, JsonDocument.Parse(output).RootElement.GetProperty("ids").GetArrayLength());
        (code, output, error) = Cli.Run(null, "info", "--model", model, "--device", "cpu", "--format", "json");
        Assert.True(code == 0, error);
        Assert.Equal("cpu", JsonDocument.Parse(output).RootElement.GetProperty("device").GetString());
        (code, output, error) = Cli.Run(null, "logits", "--model", model, "--ids", "1,2", "--device", "cpu");
        Assert.True(code == 0, error);

        foreach (var args in new[]
                 {
                     new[] { "generate", "--model", model, "--ids", "1,2" }, ["info", "--model", model], ["logits", "--model", model, "--ids", "1"],
                     ["respond", "--model", model, "--instruction", "x"], ["classify", "--model", Fixtures.Classifier, "--text", "x"],
                 })
        {
            (code, _, error) = Cli.Run(null, [.. args, "--device", "cuda"]);
            Assert.Equal(1, code);
            Assert.Contains("gpt: error: CUDA was asked for (device cuda) but this build uses TorchSharp-cpu", error);
            Assert.DoesNotContain("   at ", error); // no stack trace
        }
        (code, _, error) = Cli.Run(null, "generate", "--model", model, "--ids", "1,2", "--device", "cuda:x");
        Assert.Equal(2, code); // a usage error: no device at all
        Assert.Contains("Run 'gpt generate --help' for usage.", error);
        Assert.Contains("device 'cuda:x': expected a GPU number after 'cuda:', such as cuda:0, found 'x'", error);

        using var folder = new TempFolder();
        (code, _, error) = Cli.Run(null, "train", "--layers", "1", "--emb-dim", "16", "--heads", "2", "--context-length", "16",
            "--max-steps", "1", "--out", folder.Path, "--name", "gpu", "--device", "cuda:0");
        Assert.Equal(1, code);
        Assert.Contains("CUDA was asked for (device cuda:0)", error);
        Assert.False(Directory.Exists(folder.Combine("gpu")));
    }

    /// <summary>-p:TorchBackend=cuda swaps TorchSharp-cpu (and its libtorch-cpu-* packages) for TorchSharp-cuda-linux
    /// and compiles with TORCH_CUDA. Only the switch: TorchSharp-cuda-* cannot be restored here.</summary>
    [Fact]
    public void TheCudaBuildSwitchSelectsTorchSharpCuda()
    {
        string MsBuild(params string[] args)
        {
            var start = new ProcessStartInfo("dotnet", ["msbuild", Path.Combine(Fixtures.Root, "src", "Gpt.Core", "Gpt.Core.fsproj"), "-nologo", .. args])
            {
                RedirectStandardOutput = true, RedirectStandardError = true, WorkingDirectory = Fixtures.Root,
            };
            using var process = Process.Start(start)!;
            var error = process.StandardError.ReadToEndAsync();
            var output = process.StandardOutput.ReadToEnd();
            process.WaitForExit();
            return output + error.Result;
        }
        var cuda = MsBuild("-t:PaketRestore", "-t:GptSelectTorchBackend", "-p:TorchBackend=cuda", "-getItem:PackageReference", "-getProperty:DefineConstants");
        Assert.Contains("\"Identity\": \"TorchSharp-cuda-linux\"", cuda);
        Assert.DoesNotContain("\"Identity\": \"TorchSharp-cpu\"", cuda);
        Assert.DoesNotContain("\"Identity\": \"libtorch-cpu", cuda);
        Assert.Contains("TORCH_CUDA", cuda);
        var cpu = MsBuild("-t:PaketRestore", "-t:GptSelectTorchBackend", "-getItem:PackageReference", "-getProperty:DefineConstants");
        Assert.Contains("\"Identity\": \"TorchSharp-cpu\"", cpu);
        Assert.DoesNotContain("TorchSharp-cuda", cpu);
        Assert.DoesNotContain("TORCH_CUDA", cpu);
        Assert.Contains("TorchBackend must be cpu (TorchSharp-cpu, the default) or cuda", MsBuild("-t:GptCheckTorchBackend", "-p:TorchBackend=rocm"));
    }
}
