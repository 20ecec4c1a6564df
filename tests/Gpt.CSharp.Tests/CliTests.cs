using Gpt.Cli;
using Xunit;

namespace Gpt.CSharp.Tests;

/// <summary>Runs the <c>gpt</c> command line in-process, as a script would.</summary>
internal static class Cli
{
    public static (int ExitCode, string Output, string Error) Run(string? input, params string[] args)
    {
        var output = new StringWriter();
        var error = new StringWriter();
        var code = CliApp.Run(args, new StringReader(input ?? ""), output, error, inputRedirected: input is not null);
        return (code, output.ToString(), error.ToString());
    }
}

public class TokenizeCliTests
{
    [Fact]
    public void PrintsTheBookIds()
    {
        var (code, output, _) = Cli.Run(null, "tokenize", "--text", "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace.");
        Assert.Equal(0, code);
        Assert.Equal("[15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812, 2114, 286, 617, 34680, 27271, 13]", output.Trim());
    }

    [Fact]
    public void ReadsStandardInput()
    {
        var (code, output, _) = Cli.Run("Akwirw ier", "tokenize");
        Assert.Equal(0, code);
        Assert.Equal("[33901, 86, 343, 86, 220, 959]", output.Trim());
    }

    [Fact]
    public void JsonlBatchModeAgreesWithTheReferenceFixture()
    {
        var root = AppContext.BaseDirectory;
        while (!File.Exists(Path.Combine(root, "Gpt.sln"))) root = Path.GetDirectoryName(root)!;
        var lines = File.ReadAllLines(Path.Combine(root, "tests", "fixtures", "bpe", "hard_strings.jsonl"))
            .Select(l => System.Text.Json.JsonDocument.Parse(l).RootElement)
            .Where(e => !e.TryGetProperty("utf16", out _)) // lone surrogates cannot travel as JSON text on stdin
            .ToList();
        var input = string.Join("\n", lines.Select(e => e.GetProperty("text").GetRawText()));
        var (code, output, error) = Cli.Run(input, "tokenize", "--jsonl");
        Assert.True(code == 0, error);
        var outLines = output.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.Equal(lines.Count, outLines.Length);
        for (var i = 0; i < lines.Count; i++)
        {
            var expected = "[" + string.Join(", ", lines[i].GetProperty("ids").EnumerateArray().Select(x => x.GetInt32())) + "]";
            Assert.Equal(expected, outLines[i].Trim());
        }
    }

    [Fact]
    public void DecodesIdsBack()
    {
        var (code, output, _) = Cli.Run(null, "tokenize", "--decode", "--text", "[33901, 86, 343, 86, 220, 959]");
        Assert.Equal(0, code);
        Assert.Equal("Akwirw ier", output.TrimEnd('\n'));
        var (code2, output2, _) = Cli.Run("[15496, 11]\n[50256]\n", "tokenize", "--decode", "--jsonl");
        Assert.Equal(0, code2);
        Assert.Equal(new[] { "\"Hello,\"", "\"<|endoftext|>\"" }, output2.Split('\n', StringSplitOptions.RemoveEmptyEntries));
    }

    [Theory]
    [InlineData("33901,86,343,86,220,959")]
    [InlineData("33901, 86, 343, 86, 220, 959")]
    [InlineData("[33901, 86, 343, 86, 220, 959]")]
    public void DecodesIdsWrittenAsForIds(string ids)
    {
        var (code, output, error) = Cli.Run(null, "tokenize", "--decode", "--text", ids);
        Assert.True(code == 0, error);
        Assert.Equal("Akwirw ier", output.TrimEnd('\n'));
        var (piped, pipedOutput, pipedError) = Cli.Run(ids + "\n", "tokenize", "--decode");
        Assert.True(piped == 0, pipedError);
        Assert.Equal("Akwirw ier", pipedOutput.TrimEnd('\n'));
        var (lines, linesOutput, linesError) = Cli.Run(ids + "\n[15496, 11]\n", "tokenize", "--decode", "--jsonl");
        Assert.True(lines == 0, linesError);
        Assert.Equal(new[] { "\"Akwirw ier\"", "\"Hello,\"" }, linesOutput.Split('\n', StringSplitOptions.RemoveEmptyEntries));
    }

    [Fact]
    public void BadIdsToDecodeSayWhatWasExpectedAndFound()
    {
        var (code, _, error) = Cli.Run(null, "tokenize", "--decode", "--text", "1, x, 3");
        Assert.Equal(1, code);
        Assert.Equal("gpt: error: --decode input: expected token ids such as 15496,11 or [15496, 11], found 'x' (item 2)", error.Trim());
        var (code2, _, error2) = Cli.Run("[1, 2.5]\n", "tokenize", "--decode", "--jsonl");
        Assert.Equal(1, code2);
        Assert.Contains("standard input line 1: expected token ids such as 15496,11 or [15496, 11], found '2.5' (item 2)", error2);
        foreach (var internals in new[] { "System.", "Path: $", "LineNumber", "BytePositionInLine" }) Assert.DoesNotContain(internals, error + error2);
    }

    [Fact]
    public void BadInputIsAClearErrorWithExitCode1()
    {
        var (code, _, error) = Cli.Run(null, "tokenize", "--decode", "--text", "[1, \"x\"]");
        Assert.Equal(1, code);
        Assert.Contains("expected token ids such as 15496,11 or [15496, 11], found '\"x\"' (item 2)", error);
        var (code2, _, error2) = Cli.Run("not json\n", "tokenize", "--jsonl");
        Assert.Equal(1, code2);
        Assert.Contains("standard input line 1", error2);
        var (code3, _, error3) = Cli.Run(null, "tokenize");
        Assert.Equal(1, code3);
        Assert.Contains("pass --text", error3);
    }

    [Fact]
    public void SimpleTokenizerAndHelp()
    {
        var (code, output, _) = Cli.Run(null, "tokenize", "--tokenizer", "simple", "--text", "the harbor clock");
        Assert.Equal(0, code);
        Assert.StartsWith("[", output.Trim());
        var (helpCode, help, _) = Cli.Run(null, "tokenize", "--help");
        Assert.Equal(0, helpCode);
        foreach (var option in new[] { "--text", "--decode", "--jsonl", "--tokenizer", "--vocabulary" }) Assert.Contains(option, help);
        var (usageCode, _, usage) = Cli.Run(null, "tokenize", "--tokenizer", "bert");
        Assert.NotEqual(0, usageCode);
        Assert.Contains("bert", usage);
    }
}

public class TrainCliTests
{
    private static string[] Tiny(string output, params string[] more) =>
    [
        "train", "--layers", "1", "--emb-dim", "16", "--heads", "2", "--context-length", "16", "--batch-size", "2",
        "--max-steps", "3", "--eval-interval", "2", "--eval-batches", "1", "--sample-tokens", "4", "--out", output, .. more,
    ];

    [Fact]
    public void TrainWritesARunWhoseModelGenerateLoads()
    {
        using var folder = new TempFolder();
        var (code, output, error) = Cli.Run(null, Tiny(folder.Path, "--name", "tiny"));
        Assert.True(code == 0, error);
        Assert.Contains("training", output);
        Assert.Contains("step     3/3", output);
        Assert.Contains("checkpoint:", output);
        Assert.Contains("done after 3 steps", output);
        var model = folder.Combine("tiny", "model");
        Assert.Contains($"model: {model}", output);
        foreach (var file in new[] { "metrics.jsonl", "loss.png", "checkpoints/step-00000003/checkpoint.json", "model/config.json" })
            Assert.True(File.Exists(folder.Combine("tiny", file)), file);

        var (generateCode, text, generateError) = Cli.Run(null, "generate", "--model", model, "--prompt", "Every effort", "--max-new-tokens", "3", "--no-eos");
        Assert.True(generateCode == 0, generateError);
        Assert.StartsWith("Every effort", text);

        // --resume reuses the run's options; --max-steps extends it.
        var (resumeCode, resumed, resumeError) = Cli.Run(null, "train", "--resume", folder.Combine("tiny"), "--max-steps", "4");
        Assert.True(resumeCode == 0, resumeError);
        Assert.Contains("resuming at step 3", resumed);
        Assert.Contains("done after 4 steps", resumed);
    }

    [Fact]
    public void JsonFormatWritesOneEventPerLine()
    {
        using var folder = new TempFolder();
        var (code, output, error) = Cli.Run(null, Tiny(folder.Path, "--name", "json", "--format", "json", "--qkv-bias", "false", "--tied-head", "false", "--init", "torch"));
        Assert.True(code == 0, error);
        var events = output.Split('\n', StringSplitOptions.RemoveEmptyEntries).Select(l => System.Text.Json.JsonDocument.Parse(l).RootElement).ToList();
        Assert.Equal("started", events[0].GetProperty("event").GetString());
        Assert.Equal([1, 2, 3], events.Where(e => e.GetProperty("event").GetString() == "step").Select(e => e.GetProperty("step").GetInt32()));
        Assert.Contains(events, e => e.GetProperty("event").GetString() == "evaluation" && e.GetProperty("val_loss").GetDouble() > 0);
        var finished = events[^1];
        var started = events[0];
        Assert.Equal("started", started.GetProperty("event").GetString());
        Assert.Equal(started.GetProperty("parameters").GetInt64(), started.GetProperty("trainable_parameters").GetInt64());
        Assert.Equal("finished", finished.GetProperty("event").GetString());
        Assert.Equal(3, finished.GetProperty("steps").GetInt32());
        Assert.Equal(folder.Combine("json", "model"), finished.GetProperty("model").GetString());
        using var model = GptModel.Load(folder.Combine("json", "model"));
        Assert.Equal((false, false, 1, 16), (model.Configuration.QkvBias, model.Configuration.TiedHead, model.Configuration.Layers, model.Configuration.ContextLength));
    }

    [Fact]
    public void BadOptionsAreClearErrorsWithExitCode1()
    {
        using var folder = new TempFolder();
        void Fails(string expected, params string[] args)
        {
            var (code, _, error) = Cli.Run(null, args);
            Assert.True(code == 1, $"exit code {code} for {string.Join(' ', args)}: {error}");
            Assert.Contains(expected, error);
            Assert.StartsWith("gpt: error:", error);
        }
        Fails("missing.txt' does not exist", Tiny(folder.Path, "--data", folder.Combine("missing.txt")));
        var shortText = folder.Combine("short.txt");
        File.WriteAllText(shortText, "Too short to train on.");
        Fails("at least 161 are needed for context length 16", Tiny(folder.Path, "--data", shortText));
        Directory.CreateDirectory(folder.Combine("empty"));
        Fails("no complete checkpoint", "train", "--resume", folder.Combine("empty"));
        Fails("do not go together", "train", "--resume", folder.Combine("empty"), "--init-from", folder.Combine("empty"));
        Fails("epochs must be positive", Tiny(folder.Path, "--epochs", "0"));
        Fails("embedding dimension 16 is not divisible by 3 heads", "train", "--emb-dim", "16", "--heads", "3", "--out", folder.Path);
        Fails("--init-from brings its own model: embedding dimension (the model has 32, asked for 16)", Tiny(folder.Path, "--init-from", Fixtures.TinyGpt2));
        Fails("model directory", "train", "--init-from", folder.Combine("no-model"), "--out", folder.Path);
        Fails("--init does not apply", "train", "--init-from", folder.Combine("no-model"), "--init", "torch");
    }

    [Fact]
    public void ResumeTakesTheRunsOwnOptionsAndRefusesChanges()
    {
        using var folder = new TempFolder();
        var run = folder.Combine("r");
        var (code, _, error) = Cli.Run(null, Tiny(folder.Path, "--name", "r", "--format", "json"));
        Assert.True(code == 0, error);
        void Fails(string expected, params string[] args)
        {
            var (failed, _, message) = Cli.Run(null, args);
            Assert.True(failed == 1, $"exit code {failed} for {string.Join(' ', args)}: {message}");
            Assert.Contains(expected, message);
        }
        Fails("--resume brings its own model: layers (the run has 1, asked for 2) cannot change it", "train", "--resume", run, "--layers", "2");
        Fails("was trained with context length 16, this run asks for 8", "train", "--resume", run, "--context-length", "8");
        Fails("--out and --name cannot move it", "train", "--resume", run, "--name", "elsewhere");
        // Options equal to the run's own are accepted: the same shape, context length, folder.
        (code, _, error) = Cli.Run(null, "train", "--resume", run, "--layers", "1", "--context-length", "16", "--out", folder.Path,
            "--name", "r", "--max-steps", "4", "--format", "json");
        Assert.True(code == 0, error);
    }

    [Fact]
    public void HelpNamesEveryOption()
    {
        var (code, help, _) = Cli.Run(null, "train", "--help");
        Assert.Equal(0, code);
        foreach (var option in new[] { "--data", "--config", "--context-length", "--emb-dim", "--heads", "--layers", "--drop-rate", "--qkv-bias",
                     "--tied-head", "--batch-size", "--epochs", "--max-steps", "--lr", "--min-lr", "--warmup-steps", "--weight-decay", "--grad-clip",
                     "--eval-interval", "--seed", "--out", "--resume", "--init", "--init-from", "--decay-all", "--grad-accumulation", "--keep-last", "--name", "--format" })
            Assert.Contains(option, help);
    }
}
