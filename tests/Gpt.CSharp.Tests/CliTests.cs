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

    [Fact]
    public void BadInputIsAClearErrorWithExitCode1()
    {
        var (code, _, error) = Cli.Run(null, "tokenize", "--decode", "--text", "[1, \"x\"]");
        Assert.Equal(1, code);
        Assert.Contains("expected a JSON array of token ids", error);
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
