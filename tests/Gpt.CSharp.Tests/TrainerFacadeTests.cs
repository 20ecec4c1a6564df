using System.Collections.Concurrent;
using Xunit;

namespace Gpt.CSharp.Tests;

/// <summary>A fresh temporary folder, deleted on dispose.</summary>
internal sealed class TempFolder : IDisposable
{
    public string Path { get; } = System.IO.Path.Combine(System.IO.Path.GetTempPath(), "gpt-cs-tests-" + Guid.NewGuid().ToString("N"));
    public TempFolder() => Directory.CreateDirectory(Path);
    public string Combine(params string[] parts) => System.IO.Path.Combine([Path, .. parts]);
    public void Dispose()
    {
        try { Directory.Delete(Path, recursive: true); } catch (IOException) { }
    }
}

/// <summary>Collects reports synchronously, on the thread that makes them (unlike <see cref="Progress{T}"/>).</summary>
internal sealed class Reports(Action<TrainingProgress>? then = null) : IProgress<TrainingProgress>
{
    public ConcurrentQueue<TrainingProgress> All { get; } = new();
    public ConcurrentQueue<int> Threads { get; } = new();

    public void Report(TrainingProgress value)
    {
        All.Enqueue(value);
        Threads.Enqueue(Environment.CurrentManagedThreadId);
        then?.Invoke(value);
    }

    public TrainingProgress[] Of(TrainingEventKind kind) => All.Where(r => r.Kind == kind).ToArray();
}

public class TrainerFacadeTests
{
    /// <summary>A one-layer, 16-dimension GPT-2 on the built-in story: a step takes a fraction of a second.</summary>
    internal static TrainingOptions Tiny(string output, string name) => new()
    {
        Model = TrainingOptions.DefaultModel with { Layers = 1, EmbeddingDim = 16, Heads = 2, ContextLength = 16 },
        BatchSize = 2, MaxSteps = 4, EvalInterval = 2, EvalBatches = 1, SampleTokens = 4, WarmupSteps = 1,
        OutputDirectory = output, Name = name, CheckpointInterval = 0,
    };

    [Fact]
    public async Task ATinyRunReportsProgressOnItsOwnThreadAndWritesTheRun()
    {
        using var folder = new TempFolder();
        var reports = new Reports();
        var result = await Trainer.TrainAsync(Tiny(folder.Path, "tiny"), reports);

        Assert.False(result.Cancelled);
        Assert.Equal(4, result.Steps);
        Assert.Equal(4, result.TotalSteps);
        Assert.Equal(4L * 2 * 16, result.TokensSeen);
        Assert.Equal(folder.Combine("tiny"), result.RunDirectory);
        Assert.True(double.IsFinite(result.TrainLoss) && double.IsFinite(result.ValidationLoss) && double.IsFinite(result.LastStepLoss));
        Assert.InRange(result.FirstEvaluatedTrainLoss, 9.0, 12.0); // about ln(50257) = 10.8 for a fresh model

        var all = reports.All.ToArray();
        Assert.Equal(TrainingEventKind.Started, all[0].Kind);
        Assert.Equal(result.RunDirectory, all[0].Path);
        Assert.Equal(4, all[0].TotalSteps);
        Assert.True(all[0].ParameterCount > 0);
        Assert.Equal([1, 2, 3, 4], reports.Of(TrainingEventKind.Step).Select(r => r.Step));
        Assert.Equal([1, 2, 4], reports.Of(TrainingEventKind.Evaluation).Select(r => r.Step));
        var last = reports.Of(TrainingEventKind.Step)[^1];
        Assert.Equal(result.TokensSeen, last.TokensSeen);
        Assert.True(last.TokensPerSecond > 0);
        Assert.Equal(TimeSpan.Zero, last.Remaining);
        Assert.NotNull(last.ValidationLoss);
        Assert.Single(reports.Of(TrainingEventKind.Checkpoint));
        Assert.Equal(TrainingEventKind.ModelSaved, all[^1].Kind);
        Assert.DoesNotContain(Environment.CurrentManagedThreadId, reports.Threads);
        Assert.Single(reports.Threads.Distinct());

        foreach (var file in new[] { "metrics.jsonl", "loss.png", "run.json", "model/config.json", "model/model.safetensors" })
            Assert.True(File.Exists(folder.Combine("tiny", file)), file);
        Assert.Equal(result.CheckpointDirectory, folder.Combine("tiny", "checkpoints", "step-00000004"));
        using var model = GptModel.Load(result.ModelDirectory!);
        Assert.Equal(Tiny("", "").Model, model.Configuration);
    }

    [Fact]
    public async Task CancellationWritesACheckpointAndTheResumeEqualsAStraightRun()
    {
        using var folder = new TempFolder();
        using var cancellation = new CancellationTokenSource();
        var reports = new Reports(r => { if (r is { Kind: TrainingEventKind.Step, Step: 2 }) cancellation.Cancel(); });
        var stopped = await Trainer.TrainAsync(Tiny(folder.Path, "resumed"), reports, cancellation.Token);
        Assert.True(stopped.Cancelled);
        Assert.Equal(2, stopped.Steps);
        Assert.Equal(folder.Combine("resumed", "checkpoints", "step-00000002"), stopped.CheckpointDirectory);
        Assert.True(File.Exists(folder.Combine("resumed", "model", "model.safetensors")), "the model so far");

        var again = TrainingOptions.FromCheckpoint(folder.Combine("resumed"));
        Assert.Equal(Tiny(folder.Path, "resumed").Model, again.Model);
        Assert.Equal(4, again.MaxSteps);
        Assert.Equal(folder.Combine("resumed"), again.ResumeFrom);
        var resumed = await Trainer.TrainAsync(again);
        Assert.Equal(4, resumed.Steps);
        Assert.False(resumed.Cancelled);

        var straight = await Trainer.TrainAsync(Tiny(folder.Path, "straight"));
        using var a = GptModel.Load(resumed.ModelDirectory!);
        using var b = GptModel.Load(straight.ModelDirectory!);
        int[] ids = [464, 1110, 286, 262, 2068];
        Assert.Equal(b.Logits([ids])[0][^1], a.Logits([ids])[0][^1]); // bit for bit, dropout 0.1 included
        Assert.Equal(straight.TrainLoss, resumed.TrainLoss);
    }

    [Fact]
    public async Task BadInputIsAClearGptException()
    {
        using var folder = new TempFolder();
        var tiny = Tiny(folder.Path, "bad");

        var missing = await Assert.ThrowsAsync<GptException>(() => Trainer.TrainAsync(tiny with { Data = folder.Combine("nope.txt") }));
        Assert.Contains("nope.txt", missing.Message);

        var shortText = folder.Combine("short.txt");
        File.WriteAllText(shortText, "Every effort moves you forward, one small step at a time.");
        var tooShort = await Assert.ThrowsAsync<GptException>(() => Trainer.TrainAsync(tiny with { Data = shortText }));
        Assert.Contains($"at least {Trainer.TokensNeeded(16, 0.9)} are needed for context length 16", tooShort.Message);

        Directory.CreateDirectory(folder.Combine("empty"));
        var noCheckpoint = await Assert.ThrowsAsync<GptException>(() => Trainer.TrainAsync(tiny with { ResumeFrom = folder.Combine("empty") }));
        Assert.Contains("no complete checkpoint", noCheckpoint.Message);

        var smallVocabulary = await Assert.ThrowsAsync<GptException>(() => Trainer.TrainAsync(tiny with { Model = tiny.Model! with { VocabularySize = 100 } }));
        Assert.Contains("GPT-2's tokenizer needs 50257", smallVocabulary.Message);

        var batch = await Assert.ThrowsAsync<GptException>(() => Trainer.TrainAsync(tiny with { BatchSize = 0 }));
        Assert.Contains("batch size must be positive", batch.Message);
        Assert.False(Directory.Exists(folder.Combine("bad", "checkpoints")), "nothing trained");
    }

    [Fact]
    public async Task AModelAndTextsInMemoryTrainWithoutFiles()
    {
        using var folder = new TempFolder();
        var story = Corpus.BuiltInStory.Text;
        string[] texts = [story[..1500], story[1500..3000]];
        using var model = GptModel.Create(TrainingOptions.DefaultModel with { Layers = 1, EmbeddingDim = 16, Heads = 2, ContextLength = 16, DropRate = 0 }, 3);
        var before = model.Logits([[1, 2, 3]])[0][2];
        var options = Tiny(folder.Path, "memory") with { Model = null, Texts = texts, MaxSteps = 2 };
        var result = await Trainer.TrainAsync(model, options);
        Assert.Equal(2, result.Steps);
        var after = model.Logits([[1, 2, 3]])[0][2]; // trained in place, and still the caller's
        Assert.NotEqual(before, after);
        using (var saved = GptModel.Load(result.ModelDirectory!)) Assert.Equal(after, saved.Logits([[1, 2, 3]])[0][2]);
        var runJson = File.ReadAllText(Path.Combine(result.RunDirectory, "run.json"));
        Assert.Contains("\"data\": \"(in memory)\"", runJson);
        Assert.Contains("\"init_from\": \"(in memory)\"", runJson);

        // A resume needs the texts again.
        var resumed = TrainingOptions.FromCheckpoint(result.RunDirectory) with { MaxSteps = 3 };
        Assert.Null(resumed.Texts);
        var error = await Assert.ThrowsAsync<GptException>(() => Trainer.TrainAsync(resumed));
        Assert.Contains("was trained on texts given in memory, which are not on disk: give the same texts again", error.Message);
        Assert.Equal(3, (await Trainer.TrainAsync(resumed with { Texts = texts })).Steps);

        // What does not go together.
        error = await Assert.ThrowsAsync<GptException>(() => Trainer.TrainAsync(model, options with { InitFrom = "gpt2", Name = "x" }));
        Assert.Contains("either from a source (InitFrom: gpt2) or from memory (InitModel), not both", error.Message);
        error = await Assert.ThrowsAsync<GptException>(() => Trainer.TrainAsync(options with { Data = "story.txt", Name = "y" }));
        Assert.Contains("either from files (Data: story.txt) or from memory (Texts), not both", error.Message);
        Assert.Throws<ArgumentNullException>(() => Trainer.Train(model, options with { Texts = ["a", null!] }));
    }

    [Fact]
    public void PresetsMatchTheBookAndTheDefaultRun()
    {
        var book = TrainingOptions.Book;
        Assert.Equal(162_419_712, book.Model!.ParameterCount); // the book's 163,009,536 at 1,024 positions, less 768 x 768
        Assert.Equal((2, 10, 4e-4, 4e-4, 0, 0.1, true, (double?)null), (book.BatchSize, book.Epochs, book.LearningRate, book.MinLearningRate, book.WarmupSteps, book.WeightDecay, book.DecayAll, book.GradientClip));
        Assert.Equal(ModelInitialization.TorchDefaults, book.Initialization);
        Assert.Equal(16_055_040, TrainingOptions.DefaultModel.ParameterCount);
        var defaults = new TrainingOptions();
        Assert.Null(defaults.Model); // null: the default model
        Assert.Null(defaults.Data);
        Assert.Equal("runs", defaults.OutputDirectory);
    }

    [Fact]
    public void TokensNeededGivesBothSplitsOneWindow()
    {
        Assert.Equal(161, Trainer.TokensNeeded(16, 0.9)); // 144 + 17
        foreach (var (context, ratio) in new[] { (16, 0.9), (128, 0.9), (256, 0.5), (7, 0.75) })
        {
            var n = Trainer.TokensNeeded(context, ratio);
            Assert.True((int)(ratio * n) >= context + 1 && n - (int)(ratio * n) >= context + 1, $"{context} {ratio}: {n}");
            var m = n - 1;
            Assert.False((int)(ratio * m) >= context + 1 && m - (int)(ratio * m) >= context + 1, $"{context} {ratio}: {m} suffices");
        }
    }
}
