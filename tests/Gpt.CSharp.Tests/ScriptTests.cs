using System.Diagnostics;
using Xunit;

namespace Gpt.CSharp.Tests;

/// <summary>The F# Interactive chapter scripts run against the built CLI output (this project references it, so it
/// is built before these tests run) and print the book's results.</summary>
public class ScriptTests
{
    /// <summary>Runs a script of scripts/; no script may print a compiler warning (FS0524 and the like).</summary>
    private static (int ExitCode, string Output) RunScript(string name)
    {
        var (code, output) = RunFsi(Path.Combine(Fixtures.Root, "scripts", name), Fixtures.Root);
        Assert.DoesNotContain("warning FS", output);
        return (code, output);
    }

    private static (int ExitCode, string Output) RunFsi(string script, string workingDirectory)
    {
        var start = new ProcessStartInfo("dotnet", ["fsi", script])
        {
            RedirectStandardOutput = true, RedirectStandardError = true, WorkingDirectory = workingDirectory,
        };
        using var process = Process.Start(start)!;
        var stderr = process.StandardError.ReadToEndAsync();
        var stdout = process.StandardOutput.ReadToEnd();
        process.WaitForExit();
        return (process.ExitCode, stdout + stderr.Result);
    }

    /// <summary>A copy of scripts/check-build.fsx and load.fsx in a folder laid out like the repository, with a script
    /// that loads them as the chapters do and uses the library.</summary>
    private static string CopyOfTheLoader(Fixtures.TempDir temp)
    {
        var scripts = Directory.CreateDirectory(temp.File("scripts")).FullName;
        foreach (var name in new[] { "check-build.fsx", "load.fsx" })
            File.Copy(Path.Combine(Fixtures.Root, "scripts", name), Path.Combine(scripts, name));
        var script = Path.Combine(scripts, "uses-the-library.fsx");
        File.WriteAllText(script, "#load \"check-build.fsx\"\n#load \"load.fsx\"\nprintfn \"gpt2-small: %d parameters\" (Gpt.Model.GptConfig.parameterCount Gpt.Model.GptConfig.gpt2Small)\n");
        return script;
    }

    [Fact]
    public void WithoutABuildTheScriptsSayBuildFirst()
    {
        using var temp = new Fixtures.TempDir();
        var (code, output) = RunFsi(CopyOfTheLoader(temp), temp.Path);
        Assert.Equal(1, code);
        Assert.Contains("The Gpt library is not built", output);
        Assert.Contains(Path.Combine("src", "Gpt.Cli", "bin", "Release", "net10.0"), output);
        Assert.Contains("Build first: dotnet build src/Gpt.Cli", output);
        Assert.DoesNotContain("FS0078", output);
    }

    [Fact]
    public void WithoutADebugBuildTheScriptsUseTheReleaseBuild()
    {
        using var temp = new Fixtures.TempDir();
        var script = CopyOfTheLoader(temp);
        // The Debug output this test runs against, standing in for a Release build (a link: the folder is ~1.3 GB).
        var built = Path.GetDirectoryName(typeof(Gpt.Cli.CliApp).Assembly.Location)!;
        Directory.CreateDirectory(temp.File(Path.Combine("src", "Gpt.Cli", "bin", "Release")));
        Directory.CreateSymbolicLink(temp.File(Path.Combine("src", "Gpt.Cli", "bin", "Release", "net10.0")), built);
        var (code, output) = RunFsi(script, temp.Path);
        Assert.True(code == 0, output);
        Assert.Contains("gpt2-small: 124439808 parameters", output);
        Assert.DoesNotContain("warning FS", output);
    }

    [Fact]
    public void Chapter2Script()
    {
        var (code, output) = RunScript("ch02-text.fsx");
        Assert.True(code == 0, output);
        Assert.Contains("[|33901; 86; 343; 86; 220; 959|]", output);
        Assert.Contains("input embeddings: [|8L; 4L; 256L|]", output);
    }

    [Fact]
    public void Chapters3And4Script()
    {
        var (code, output) = RunScript("ch03-04-model.fsx");
        Assert.True(code == 0, output);
        Assert.Contains("0.4419", output);
        Assert.Contains("163009536 parameters (621.83 MB)", output);
        Assert.Contains("logits: [|2L; 4L; 50257L|]", output);
    }

    [Fact]
    public void Chapter5Script()
    {
        var (code, output) = RunScript("ch05-pretraining.fsx");
        Assert.True(code == 0, output);
        Assert.Contains("ln(vocabulary) = 10.8249", output);
        Assert.Contains("40 steps, 5120 tokens seen; wrote checkpoints, loss.png, metrics.jsonl, model, run.json", output);
        Assert.Contains("reloaded model gives the same logits: true; the checkpoint too: true", output);
    }

    [Fact]
    public void Chapter6Script()
    {
        var (code, output) = RunScript("ch06-classification.fsx");
        Assert.True(code == 0, output);
        Assert.Contains("240 messages", output);
        Assert.Contains("split: 168 training, 24 validation, 48 test", output);
        Assert.Contains("wrote accuracy.png, checkpoints, loss.png, metrics.jsonl, model, run.json", output);
        Assert.Contains("fine-tuned: You have won a free cruise", output);
    }

    [Fact]
    public void Chapter7Script()
    {
        var (code, output) = RunScript("ch07-instructions.fsx");
        Assert.True(code == 0, output);
        Assert.Contains("1100 entries, e.g.:", output);
        Assert.Contains("### Response:", output);
        Assert.Contains("-100 targets per row: [|2L; 1L; 0L|]", output);
        Assert.Contains("wrote checkpoints, loss.png, metrics.jsonl, model, run.json, run.lock, test-responses.json", output);
        Assert.Contains("on 55 test entries", output);
    }

    [Fact]
    public void AppendixEScript()
    {
        var (code, output) = RunScript("appendix-e-lora.fsx");
        Assert.True(code == 0, output);
        Assert.Contains("gpt2-small, rank 16: 2359296 trainable LoRA parameters", output);
        Assert.Contains("8 adapters attached; logits unchanged: true", output);
        Assert.Contains("training 33024 of 6878336 parameters", output);
        Assert.Contains("adapter: adapter_config.json, adapter_model.safetensors, classifier_config.json", output);
        Assert.DoesNotContain("the merged model agrees: false", output);
    }

    [Fact]
    public void AppendixAScript()
    {
        var clock = Stopwatch.StartNew();
        var (code, output) = RunScript("appendix-a-torchsharp.fsx");
        Assert.True(code == 0, output);
        Assert.Contains("dimensions: 0 1 2 3", output);
        Assert.Contains("matrix @ matrix.T = [|14L; 32L; 32L; 77L|]", output);
        Assert.Contains("autograd.grad: dL/dw1 = -0.0898, dL/db = -0.0817", output);
        Assert.Contains("loss.backward(): w1.grad = -0.0898, b.grad = -0.0817", output);
        Assert.Contains("NeuralNetwork(50, 3): 2213 trainable parameters", output);
        Assert.Contains("Epoch: 003/003 | Batch 001/002 | Train Loss:", output);
        Assert.Contains("training accuracy 1.0, test accuracy 1.0", output);
        Assert.Contains("reloaded model gives the same logits: true", output);
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(60), $"took {clock.Elapsed}");
    }

    [Fact]
    public void AppendixDScript()
    {
        var clock = Stopwatch.StartNew();
        var (code, output) = RunScript("appendix-d-training-loop.fsx");
        Assert.True(code == 0, output);
        Assert.Contains("18 batches per epoch, 2 epochs: 36 steps, 7 of them warmup", output);
        Assert.Contains("   7  0.010000            0.010000", output); // the peak, where the warmup ends
        Assert.Contains("largest difference over all 36 steps: 0", output);
        var norms = System.Text.RegularExpressions.Regex.Match(output, @"global gradient norm by hand ([0-9.]+), Optimizer.gradientNorm ([0-9.]+)");
        Assert.True(norms.Success, output);
        Assert.Equal(norms.Groups[1].Value, norms.Groups[2].Value);
        Assert.Contains($"clipped to max_norm 1.0: norm before {norms.Groups[1].Value}, after 1.0000", output);
        Assert.Contains("36 steps; rates: first 0.000100, peak 0.010000 at step 7, last 0.000039", output);
        Assert.Contains("the trainer's 8 rates equal Schedule.learningRate: true", output);
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(90), $"took {clock.Elapsed}");
    }
}
