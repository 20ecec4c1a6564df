using System.Globalization;
using System.Text.Json;
using Xunit;

namespace Gpt.CSharp.Tests;

public class ModelCliTests
{
    [Fact]
    public void LogitsThroughTheCliMatchTheReference()
    {
        var reference = Fixtures.Load(Fixtures.TinyGpt2);
        var (code, output, error) = Cli.Run(null, "logits", "--model", Fixtures.TinyGpt2,
            "--ids", string.Join(",", reference.InputIds[0]), "--ids", string.Join(",", reference.InputIds[1]));
        Assert.True(code == 0, error);
        using var json = JsonDocument.Parse(output);
        var logits = json.RootElement.GetProperty("logits");
        Assert.Equal(2, logits.GetArrayLength());
        Assert.Equal(8, logits[0].GetArrayLength());
        Assert.Equal(50257, logits[0][0].GetArrayLength());
        for (var i = 0; i < reference.LogitsFirst.Length; i++)
            Assert.True(Math.Abs(logits[0][0][i].GetDouble() - reference.LogitsFirst[i]) < 1e-4);
        var sum = logits.EnumerateArray().SelectMany(b => b.EnumerateArray()).SelectMany(t => t.EnumerateArray()).Sum(v => v.GetDouble());
        Assert.True(Math.Abs(sum - reference.LogitsSum) < 1e-2, $"sum {sum} vs {reference.LogitsSum}");
    }

    [Theory]
    [InlineData(false, "f32")]
    [InlineData(true, "f32")]
    [InlineData(false, "f16")]
    [InlineData(true, "bf16")]
    public void GreedyGenerationThroughTheCliMatchesTheReferenceExactly(bool noCache, string dtype)
    {
        // f16 and bf16 give the same 29 greedy ids on this fixture (its smallest top-2 margin is 0.0039; see README)
        var reference = Fixtures.Load(Fixtures.TinyGpt2);
        var args = new List<string> { "generate", "--model", Fixtures.TinyGpt2, "--ids", string.Join(",", reference.GreedyPrompt),
            "--max-new-tokens", (reference.GreedyIds.Length - reference.GreedyPrompt.Length).ToString(CultureInfo.InvariantCulture), "--no-eos",
            "--format", "json", "--dtype", dtype };
        if (noCache) args.Add("--no-kv-cache");
        var (code, output, error) = Cli.Run(null, args.ToArray());
        Assert.True(code == 0, error);
        using var json = JsonDocument.Parse(output);
        Assert.Equal(reference.GreedyIds, json.RootElement.GetProperty("ids").EnumerateArray().Select(x => x.GetInt32()));
        Assert.Equal("max_new_tokens", json.RootElement.GetProperty("stop_reason").GetString());
    }

    [Fact]
    public void InitThenInfoReportsTheReleasedGpt2ParameterCount()
    {
        using var dir = new Fixtures.TempDir();
        var path = dir.File("small");
        var (code, _, error) = Cli.Run(null, "init", "--config", "gpt2-small", "--out", path, "--seed", "1");
        Assert.True(code == 0, error);
        var (infoCode, info, infoError) = Cli.Run(null, "info", "--model", path, "--format", "json");
        Assert.True(infoCode == 0, infoError);
        using var json = JsonDocument.Parse(info);
        Assert.Equal(124_439_808, json.RootElement.GetProperty("parameters").GetInt64());
        Assert.Equal(12, json.RootElement.GetProperty("config").GetProperty("n_layers").GetInt32());
    }

    [Fact]
    public void CustomSizesAndSeveralPrompts()
    {
        using var dir = new Fixtures.TempDir();
        var path = dir.File("tiny");
        var (code, output, error) = Cli.Run(null, "init", "--config", "gpt2-small", "--layers", "2", "--emb-dim", "32", "--heads", "4",
            "--context-length", "32", "--qkv-bias", "false", "--tied-head", "false", "--out", path, "--format", "json");
        Assert.True(code == 0, error);
        using (var json = JsonDocument.Parse(output))
        {
            Assert.False(json.RootElement.GetProperty("config").GetProperty("tied_head").GetBoolean());
        }
        var (genCode, lines, genError) = Cli.Run(null, "generate", "--model", path, "--prompt", "Hello", "--prompt", "The harbor clock stopped",
            "--max-new-tokens", "4", "--temperature", "0.8", "--top-k", "50", "--top-p", "0.9", "--seed", "3", "--format", "json");
        Assert.True(genCode == 0, genError);
        var objects = lines.Split('\n', StringSplitOptions.RemoveEmptyEntries).Select(l => JsonDocument.Parse(l)).ToList();
        Assert.Equal(2, objects.Count);
        Assert.StartsWith("The harbor clock stopped", objects[1].RootElement.GetProperty("text").GetString());
        var (streamCode, streamed, _) = Cli.Run(null, "generate", "--model", path, "--prompt", "Hello", "--max-new-tokens", "4", "--seed", "3", "--temperature", "1");
        Assert.Equal(0, streamCode);
        Assert.StartsWith("Hello", streamed);
    }

    [Fact]
    public void BadInputsGiveExitCode1AndAMessage()
    {
        var (code, _, error) = Cli.Run(null, "info", "--model", "/no/such/model");
        Assert.Equal(1, code);
        Assert.Contains("/no/such/model", error);
        var (code2, _, error2) = Cli.Run(null, "logits", "--model", Fixtures.TinyGpt2, "--ids", "1,x,3");
        Assert.Equal(1, code2);
        Assert.Contains("'x'", error2);
        var (code3, _, error3) = Cli.Run(null, "generate", "--model", Fixtures.TinyGpt2);
        Assert.Equal(1, code3);
        Assert.Contains("no prompt", error3);
        var (code4, _, error4) = Cli.Run(null, "init", "--out", "/tmp/x", "--emb-dim", "770");
        Assert.Equal(1, code4);
        Assert.Contains("770", error4);
    }
}
