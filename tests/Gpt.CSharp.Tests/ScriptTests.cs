using System.Diagnostics;
using Xunit;

namespace Gpt.CSharp.Tests;

/// <summary>The F# Interactive chapter scripts run against the built CLI output (this project references it, so it
/// is built before these tests run) and print the book's results.</summary>
public class ScriptTests
{
    private static (int ExitCode, string Output) RunScript(string name)
    {
        var start = new ProcessStartInfo("dotnet", ["fsi", Path.Combine(Fixtures.Root, "scripts", name)])
        {
            RedirectStandardOutput = true, RedirectStandardError = true, WorkingDirectory = Fixtures.Root,
        };
        using var process = Process.Start(start)!;
        var stderr = process.StandardError.ReadToEndAsync();
        var stdout = process.StandardOutput.ReadToEnd();
        process.WaitForExit();
        return (process.ExitCode, stdout + stderr.Result);
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
}
