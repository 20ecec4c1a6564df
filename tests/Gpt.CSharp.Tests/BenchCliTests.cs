using System.Text.Json;
using Xunit;

namespace Gpt.CSharp.Tests;

/// <summary><c>gpt bench</c> with the smallest sizes: the JSON keys scripts rely on, and clear errors. No timing is checked.</summary>
public class BenchCliTests
{
    private static JsonElement Object(string line) => JsonDocument.Parse(line).RootElement;

    private static void HasNumbers(JsonElement result, params string[] keys)
    {
        foreach (var key in keys)
        {
            Assert.True(result.TryGetProperty(key, out var value), $"missing key '{key}' in {result}");
            Assert.Equal(JsonValueKind.Number, value.ValueKind);
        }
    }

    [Fact]
    public void TrainOneStepOfPresetAPrintsTheFigures()
    {
        var (code, output, error) = Cli.Run(null, "bench", "train", "--preset", "A", "--warmup", "0", "--steps", "1", "--format", "json");
        Assert.True(code == 0, error);
        var result = Object(output.Trim());
        Assert.Equal("train", result.GetProperty("part").GetString());
        HasNumbers(result, "tokens_per_s", "mfu", "peak_rss_mb", "matmul_gflops", "step_s", "flops_per_token", "page_faults_per_step");
        Assert.Equal(16_011_520, result.GetProperty("matrix_parameters").GetInt64());
        Assert.Equal(28_953_600, result.GetProperty("parameters").GetInt64());
        HasNumbers(result.GetProperty("breakdown_s"), "forward_and_loss", "body_forward", "head_and_loss_with_head_gradients", "backward", "optimizer");
        Assert.True(result.GetProperty("mfu").GetDouble() > 0);
        Assert.True(result.GetProperty("machine").TryGetProperty("torch_threads", out _));
    }

    [Fact]
    public void TrainWithLoraCountsTheAdaptersAndRankZeroTrainsEveryWeight()
    {
        // Preset A (C = 256, 4 layers), rank 4 on c_attn, attn.c_proj, c_fc, mlp.c_proj: 4 · 4 · (1024 + 512 + 1280 + 1280).
        var (code, output, error) = Cli.Run(null, "bench", "train", "--preset", "A", "--lora-rank", "4", "--warmup", "0", "--steps", "1", "--format", "json");
        Assert.True(code == 0, error);
        var adapted = Object(output.Trim());
        Assert.Equal(4, adapted.GetProperty("lora_rank").GetInt32());
        Assert.Equal(65_536, adapted.GetProperty("trainable_parameters").GetInt64());
        (code, output, error) = Cli.Run(null, "bench", "train", "--preset", "A", "--lora-rank", "0", "--warmup", "0", "--steps", "1", "--format", "json");
        Assert.True(code == 0, error);
        var full = Object(output.Trim());
        Assert.Equal(JsonValueKind.Null, full.GetProperty("lora_rank").ValueKind);
        Assert.Equal(28_953_600, full.GetProperty("trainable_parameters").GetInt64());
    }

    /// <summary>The gpt tool's runtime settings that generation's speed depends on (Gpt.Cli.csproj says why): no
    /// instrumented JIT tier, loops optimised at once. Read from the runtimeconfig.json the build writes beside gpt.dll
    /// (copied here with the referenced tool).</summary>
    [Fact]
    public void TheToolRunsWithoutInstrumentedTierAndWithLoopsOptimisedAtOnce()
    {
        var path = Path.Combine(AppContext.BaseDirectory, "gpt.runtimeconfig.json");
        Assert.True(File.Exists(path), $"missing {path}");
        var properties = Object(File.ReadAllText(path)).GetProperty("runtimeOptions").GetProperty("configProperties");
        Assert.False(properties.GetProperty("System.Runtime.TieredPGO").GetBoolean());
        Assert.False(properties.GetProperty("System.Runtime.TieredCompilation.QuickJitForLoops").GetBoolean());
    }

    [Fact]
    public void GenerateReportsTheMedianOfItsRuns()
    {
        var (code, output, error) = Cli.Run(null, "bench", "generate", "--model", Fixtures.TinyGpt2, "--new-tokens", "5", "--runs", "3",
            "--format", "json");
        Assert.True(code == 0, error);
        var result = Object(output.Trim());
        Assert.Equal("generate", result.GetProperty("part").GetString());
        HasNumbers(result, "tokens_per_s", "seconds", "first_token_s");
        Assert.Equal(3, result.GetProperty("runs").GetInt32());
        var runs = result.GetProperty("run_tokens_per_s").EnumerateArray().Select(r => r.GetDouble()).OrderBy(r => r).ToArray();
        Assert.Equal(3, runs.Length);
        Assert.Equal(runs[1], result.GetProperty("tokens_per_s").GetDouble(), 0.0001);
        Assert.True(result.GetProperty("kv_cache").GetBoolean());
        var (compareCode, compareOutput, compareError) = Cli.Run(null, "bench", "generate", "--model", Fixtures.TinyGpt2, "--new-tokens", "5",
            "--runs", "2", "--compare-kv-cache", "--format", "json");
        Assert.True(compareCode == 0, compareError);
        var compared = Object(compareOutput.Trim());
        HasNumbers(compared, "tokens_per_s", "no_cache_tokens_per_s", "kv_cache_speedup");
        Assert.Equal(2, compared.GetProperty("no_cache_run_tokens_per_s").GetArrayLength());
        // Every figure is printed rounded to 0.01, so the ratio of the printed speeds and the printed ratio differ by up to
        // half of that plus the speeds' own rounding: a digit-count comparison fails whenever the two sit either side of
        // a rounding boundary (0.85 against 0.8502 once did).
        Assert.Equal(compared.GetProperty("tokens_per_s").GetDouble() / compared.GetProperty("no_cache_tokens_per_s").GetDouble(),
            compared.GetProperty("kv_cache_speedup").GetDouble(), 0.011);
        var (halfCode, halfOutput, halfError) = Cli.Run(null, "bench", "generate", "--model", Fixtures.TinyGpt2, "--new-tokens", "5",
            "--runs", "1", "--dtype", "bf16", "--batch", "3", "--bandwidth-gbps", "20", "--format", "json");
        Assert.True(halfCode == 0, halfError);
        var half = Object(halfOutput.Trim());
        HasNumbers(half, "tokens_per_s", "decode_tokens_per_s", "first_token_s", "bandwidth_fraction", "ceiling_steps_per_s", "weight_bytes_per_step");
        Assert.Equal("bf16", half.GetProperty("dtype").GetString());
        Assert.Equal("decoder", half.GetProperty("path").GetString());
        Assert.Equal(3, half.GetProperty("batch").GetInt32());
        Assert.Equal(20, half.GetProperty("bandwidth_gbps").GetDouble());
        // tiny-gpt2: 2 layers of 12 · 32², and the 50,257 × 32 head, 2 bytes each
        Assert.Equal((12L * 32 * 32 * 2 + 50257L * 32) * 2, half.GetProperty("weight_bytes_per_step").GetInt64());
        var (torchCode, torchOutput, torchError) = Cli.Run(null, "bench", "generate", "--model", Fixtures.TinyGpt2, "--new-tokens", "3",
            "--runs", "1", "--torch", "--bandwidth-gbps", "20", "--format", "json");
        Assert.True(torchCode == 0, torchError);
        Assert.Equal("torch", Object(torchOutput.Trim()).GetProperty("path").GetString());
        var (mixCode, _, mixError) = Cli.Run(null, "bench", "generate", "--model", Fixtures.TinyGpt2, "--torch", "--dtype", "f16");
        Assert.Equal(1, mixCode);
        Assert.Contains("float32 weights only", mixError);
        var (badCode, _, badError) = Cli.Run(null, "bench", "generate", "--model", Fixtures.TinyGpt2, "--runs", "0");
        Assert.Equal(1, badCode);
        Assert.Contains("at least 1 run, found 0", badError);
    }

    [Fact]
    public void LeakAndAllPrintOneObjectPerPartThenTheGoals()
    {
        var (code, output, error) = Cli.Run(null, "bench", "leak", "--steps", "12", "--warmup", "2", "--format", "json");
        Assert.True(code == 0, error);
        var leak = Object(output.Trim());
        HasNumbers(leak, "rss_slope_pct", "rss_growth_pct", "live_tensors_growth", "rss_after_warmup_mb", "rss_at_slope_start_mb", "rss_end_mb");
        Assert.Equal(3, leak.GetProperty("slope_from_step").GetInt32()); // 12 / 4, past the warm-up of 2
        Assert.Equal(1, leak.GetProperty("generations").GetInt32());

        var (allCode, allOutput, allError) = Cli.Run(null, "bench", "all", "--quick", "--only", "machine,leak");
        Assert.True(allCode == 0, allError);
        var lines = allOutput.Split('\n', StringSplitOptions.RemoveEmptyEntries).Select(Object).ToList();
        Assert.Equal(new[] { "machine", "leak", "goals" }, lines.Select(l => l.GetProperty("part").GetString()).ToArray());
        HasNumbers(lines[0], "matmul_gflops", "bandwidth_gbps", "read_bandwidth_gbps");
        Assert.True(lines[0].GetProperty("read_bandwidth_gbps").GetDouble() > 0.1, "a read bandwidth was measured");
        var goals = lines[2].GetProperty("goals").EnumerateArray().Select(g => g.GetProperty("what").GetString()).ToList();
        Assert.Equal(new[] { "leak: RSS slope, step N to 4N (%)", "leak: live tensors growth" }, goals.ToArray());
        Assert.True(lines[2].GetProperty("quick").GetBoolean());
        // Hosted by the test runner, the parts run in this process.
        Assert.Equal("shared", lines[0].GetProperty("process").GetString());
    }

    [Fact]
    public async Task AllRunsEachPartInItsOwnProcessWhenItIsTheGptCommand()
    {
        // The built CLI (this project references it) started as a process, as a user would.
        var start = new System.Diagnostics.ProcessStartInfo("dotnet",
            [Path.Combine(AppContext.BaseDirectory, "gpt.dll"), "bench", "all", "--quick", "--only", "machine,tokenizer"])
        {
            RedirectStandardOutput = true, RedirectStandardError = true,
        };
        using var process = System.Diagnostics.Process.Start(start)!;
        var errorTask = process.StandardError.ReadToEndAsync();
        var output = await process.StandardOutput.ReadToEndAsync();
        await process.WaitForExitAsync();
        var error = await errorTask;
        Assert.True(process.ExitCode == 0, error);
        var lines = output.Split('\n', StringSplitOptions.RemoveEmptyEntries).Select(Object).ToList();
        Assert.Equal(new[] { "machine", "tokenizer", "goals" }, lines.Select(l => l.GetProperty("part").GetString()).ToArray());
        Assert.Equal("own", lines[0].GetProperty("process").GetString());
        Assert.Equal("own", lines[1].GetProperty("process").GetString());
        HasNumbers(lines[1], "mb_per_s");
        var goals = lines[2].GetProperty("goals").EnumerateArray().Select(g => g.GetProperty("what").GetString()).ToList();
        Assert.Equal(new[] { "tokenizer: MB/s" }, goals.ToArray());
    }

    [Fact]
    public void BadArgumentsAreClearErrors()
    {
        var (code, _, error) = Cli.Run(null, "bench", "train", "--preset", "C");
        Assert.Equal(1, code);
        Assert.Contains("unknown training benchmark preset 'C': expected A or B", error);
        var (leakCode, _, leakError) = Cli.Run(null, "bench", "leak", "--steps", "5", "--warmup", "5");
        Assert.Equal(1, leakCode);
        Assert.Contains("steps (5) must be more than the warm-up steps (5)", leakError);
        var (allCode, _, allError) = Cli.Run(null, "bench", "all", "--only", "train-C");
        Assert.Equal(1, allCode);
        Assert.Contains("unknown bench part 'train-C'", allError);
    }
}
