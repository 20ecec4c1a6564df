using System.Text.Json;
using Xunit;

namespace Gpt.CSharp.Tests;

/// <summary>LoRA through the façade and the CLI: a run with adapters, the adapter folder, loading and merging.</summary>
public class LoraTests
{
    [Fact]
    public void TrainAdaptersThenLoadAndMergeThem()
    {
        using var folder = new TempFolder();
        var options = new TrainingOptions
        {
            InitFrom = Fixtures.TinyGpt2, ContextLength = 16, MaxSteps = 4, BatchSize = 2, EvalInterval = 2, EvalBatches = 1,
            LearningRate = 1e-2, SamplePrompt = null, OutputDirectory = folder.Path, Name = "lora",
            LoraRank = 4, LoraAlpha = 4, LoraTargets = ["c_attn", "c_fc"],
        };
        var reports = new Reports();
        var result = Trainer.Train(options, reports);
        Assert.Equal(4, result.Steps);
        var started = reports.Of(TrainingEventKind.Started).Single();
        // Two blocks of width 32: c_attn 4 × (32 + 96), c_fc 4 × (32 + 128).
        Assert.Equal(2 * (4 * (32 + 96) + 4 * (32 + 128)), started.TrainableParameterCount);
        Assert.Equal(started.TrainableParameterCount, Adapter.CountParameters(GptConfiguration.FromModelDirectory(Fixtures.TinyGpt2), 4, ["c_attn", "c_fc"]));

        var adapter = Path.Combine(result.RunDirectory, "adapter");
        using var info = Adapter.Load(adapter);
        Assert.Equal((4, 4.0, "CAUSAL_LM", false), (info.Rank, info.Alpha, info.TaskType, info.IsClassifier));
        Assert.Equal(["attn.c_attn", "mlp.c_fc"], info.Targets);
        Assert.Equal(Path.GetFullPath(Fixtures.TinyGpt2), info.BaseModel);

        var again = TrainingOptions.FromCheckpoint(result.RunDirectory);
        Assert.Equal((4, 4.0), (again.LoraRank, again.LoraAlpha));
        Assert.Equal(["attn.c_attn", "mlp.c_fc"], again.LoraTargets);

        int[][] ids = [[15496, 11, 314, 716]];
        using var saved = GptModel.Load(result.ModelDirectory!);
        using var withAdapter = Adapter.LoadModel(adapter);
        using var baseModel = GptModel.Load(Fixtures.TinyGpt2);
        var expected = saved.Logits(ids)[0][3];
        Assert.All(expected.Zip(withAdapter.Logits(ids)[0][3]), p => Assert.True(Math.Abs(p.First - p.Second) <= 1e-5, $"{p.First} vs {p.Second}"));
        Assert.NotEqual(expected, baseModel.Logits(ids)[0][3]);

        // The Adapter type: saved elsewhere, merged into a base in memory.
        info.Save(folder.Combine("copy"));
        using (var copy = Adapter.Load(folder.Combine("copy")))
        using (var mergedInMemory = copy.Merge(baseModel))
        {
            Assert.Equal(info.ParameterCount, copy.ParameterCount);
            Assert.All(expected.Zip(mergedInMemory.Logits(ids)[0][3]), p => Assert.True(Math.Abs(p.First - p.Second) <= 1e-5, $"{p.First} vs {p.Second}"));
        }
        using (var mergedOnLoad = Adapter.LoadModel(adapter, Fixtures.TinyGpt2, merge: true))
            Assert.All(expected.Zip(mergedOnLoad.Logits(ids)[0][3]), p => Assert.True(Math.Abs(p.First - p.Second) <= 1e-5, $"{p.First} vs {p.Second}"));

        var merged = folder.Combine("merged");
        Assert.False(Adapter.Merge(adapter, merged));
        using var mergedModel = GptModel.Load(merged);
        Assert.All(expected.Zip(mergedModel.Logits(ids)[0][3]), p => Assert.True(Math.Abs(p.First - p.Second) <= 1e-5, $"{p.First} vs {p.Second}"));

        // The CLI: generate with --adapter, gpt merge, and an alpha without a rank.
        var (code, output, _) = Cli.Run(null, "generate", "--adapter", adapter, "--ids", "15496,11", "--max-new-tokens", "3", "--format", "json");
        Assert.Equal(0, code);
        var (code2, output2, _) = Cli.Run(null, "generate", "--model", merged, "--ids", "15496,11", "--max-new-tokens", "3", "--format", "json");
        Assert.Equal(0, code2);
        Assert.Equal(JsonDocument.Parse(output).RootElement.GetProperty("ids").ToString(), JsonDocument.Parse(output2).RootElement.GetProperty("ids").ToString());
        var (code3, output3, _) = Cli.Run(null, "merge", "--adapter", adapter, "--out", folder.Combine("merged2"), "--format", "json");
        Assert.Equal(0, code3);
        Assert.Equal("language model", JsonDocument.Parse(output3).RootElement.GetProperty("kind").GetString());
        var (code4, _, error4) = Cli.Run(null, "train", "--init-from", Fixtures.TinyGpt2, "--lora-alpha", "8", "--out", folder.Path);
        Assert.NotEqual(0, code4);
        Assert.Contains("without a LoRA rank", error4);
        var (code5, _, error5) = Cli.Run(null, "train", "--lora-rank", "4", "--out", folder.Path);
        Assert.NotEqual(0, code5);
        Assert.Contains("--init-from", error5);
    }

    [Fact]
    public void AClassifierAdapterLoadsOnItsBase()
    {
        using var folder = new TempFolder();
        var options = new ClassifierTrainingOptions(Fixtures.TinyGpt2)
        {
            MaxSteps = 2, EvalInterval = 2, EvalBatches = 1, LearningRate = 1e-3, OutputDirectory = folder.Path, Name = "c", LoraRank = 2,
        };
        var result = TextClassifier.FineTune(options);
        var adapter = Path.Combine(result.Training.RunDirectory, "adapter");
        using (var info = Adapter.Load(adapter))
        {
            Assert.True(info.IsClassifier);
            Assert.Equal(["score"], info.ModulesToSave);
        }
        using var fromAdapter = Adapter.LoadClassifier(adapter);
        using var saved = TextClassifier.Load(result.Training.ModelDirectory!);
        var a = fromAdapter.Classify("WINNER! Claim your prize");
        var b = saved.Classify("WINNER! Claim your prize");
        Assert.Equal(a.Label, b.Label);
        Assert.All(a.Logits.Zip(b.Logits), p => Assert.True(Math.Abs(p.First - p.Second) <= 1e-5, $"{p.First} vs {p.Second}"));
        var (code, output, _) = Cli.Run(null, "classify", "--adapter", adapter, "--text", "WINNER! Claim your prize", "--format", "json");
        Assert.Equal(0, code);
        Assert.Equal(b.Label, JsonDocument.Parse(output).RootElement.GetProperty("label").GetString());
        Assert.True(Adapter.Merge(adapter, folder.Combine("merged")));
        using var merged = TextClassifier.Load(folder.Combine("merged"));
        Assert.Equal(b.Label, merged.Classify("WINNER! Claim your prize").Label);
    }
}
