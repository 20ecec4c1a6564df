using System.Text.Json;
using Xunit;

namespace Gpt.CSharp.Tests;

/// <summary>Classification fine-tuning through the façade and the CLI, the way an application and a user would.</summary>
public class ClassifierTests
{
    /// <summary>A small language model to start from, saved once per test.</summary>
    private static string LanguageModel(TempFolder folder)
    {
        var path = folder.Combine("lm");
        using var model = GptModel.Create(GptConfiguration.Gpt2Small with { Layers = 1, EmbeddingDim = 16, Heads = 2, ContextLength = 48 }, seed: 3);
        model.Save(path);
        return path;
    }

    [Fact]
    public async Task FineTuneOnTheBuiltInMessagesThenClassify()
    {
        using var folder = new TempFolder();
        var options = new ClassifierTrainingOptions(LanguageModel(folder))
        {
            MaxSteps = 4, EvalInterval = 2, EvalBatches = 1, LearningRate = 1e-3, OutputDirectory = folder.Path, Name = "c",
        };
        Assert.Equal((8, 5, 5e-5, true, "last-block"), (new ClassifierTrainingOptions("m").BatchSize, new ClassifierTrainingOptions("m").Epochs,
            new ClassifierTrainingOptions("m").LearningRate, new ClassifierTrainingOptions("m").DecayAll, new ClassifierTrainingOptions("m").Trainable));
        var reports = new Reports();
        var result = await TextClassifier.FineTuneAsync(options, reports);
        Assert.Equal(4, result.Training.Steps);
        Assert.Equal(["ham", "spam"], result.Labels);
        Assert.Equal((168, 24, 48), (result.TrainExamples, result.ValidationExamples, result.TestExamples));
        Assert.NotNull(result.TestAccuracy);
        var started = reports.Of(TrainingEventKind.Started).Single();
        Assert.True(started.TrainableParameterCount < started.ParameterCount, "the last block, the final norm and the head train");
        Assert.All(reports.Of(TrainingEventKind.Evaluation), e => Assert.NotNull(e.ValidationAccuracy));
        Assert.True(File.Exists(folder.Combine("c", "accuracy.png")));

        using var classifier = TextClassifier.Load(result.Training.ModelDirectory!);
        Assert.Equal(["ham", "spam"], classifier.Labels);
        Assert.Equal(ClassifierPooling.LastToken, classifier.Pooling);
        var predictions = classifier.ClassifyBatch(["WINNER! Claim your prize", "See you at the harbor"]);
        Assert.Equal(2, predictions.Count);
        Assert.All(predictions, p => Assert.Equal(1.0, p.Probabilities.Values.Sum(), 5));
        var alone = classifier.Classify("WINNER! Claim your prize");
        Assert.Equal(predictions[0].Label, alone.Label);
        Assert.All(predictions[0].Logits.Zip(alone.Logits), pair => Assert.Equal(pair.First, pair.Second, 5)); // padding changes nothing

        var again = ClassifierTrainingOptions.FromCheckpoint(result.Training.RunDirectory);
        Assert.Equal((options.Model, options.Trainable, options.MaxSteps), (again.Model, again.Trainable, again.MaxSteps));
    }

    [Fact]
    public void BadInputIsAClearGptException()
    {
        using var folder = new TempFolder();
        var csv = folder.Combine("texts.csv");
        File.WriteAllText(csv, "Label,Text\nham,hello\nspam,win\neggs,what\n");
        var bad = new ClassifierTrainingOptions(LanguageModel(folder)) { Train = csv, Labels = ["ham", "spam"], OutputDirectory = folder.Path };
        var unknown = Assert.Throws<GptException>(() => TextClassifier.FineTune(bad));
        Assert.Contains("texts.csv' line 4: unknown label 'eggs', expected one of ham, spam", unknown.Message);
        Assert.Contains("--data", Assert.Throws<GptException>(() => (bad with { Data = csv }).Validate()).Message);
        Assert.Contains("expected last-block, last-N", Assert.Throws<GptException>(() => (bad with { Trainable = "middle" }).Validate()).Message);
        // With LoRA the adapters and the head train: another trainable set would be ignored, so it is refused.
        Assert.Contains("--trainable all does not apply with LoRA",
            Assert.Throws<GptException>(() => (bad with { Trainable = "all", LoraRank = 2 }).Validate()).Message);
        (bad with { LoraRank = 2 }).Validate();
        var (code, _, error) = Cli.Run(null, "finetune", "classify", "--model", Fixtures.TinyGpt2, "--lora-rank", "2", "--trainable", "head",
            "--out", folder.Path, "--max-steps", "1");
        Assert.Equal(1, code);
        Assert.Contains("--trainable head does not apply with LoRA (--lora-rank)", error);
        Assert.Contains("is a text classifier", Assert.Throws<GptException>(() => GptModel.Load(Fixtures.Classifier)).Message);
    }

    [Fact]
    public void CliFineTunesAndClassifies()
    {
        using var folder = new TempFolder();
        var (code, output, error) = Cli.Run(null, "finetune", "classify", "--model", LanguageModel(folder), "--max-steps", "3",
            "--eval-interval", "3", "--eval-batches", "1", "--out", folder.Path, "--name", "c", "--format", "json");
        Assert.True(code == 0, error);
        var events = output.Split('\n', StringSplitOptions.RemoveEmptyEntries).Select(l => JsonDocument.Parse(l).RootElement).ToList();
        var started = events[0];
        Assert.True(started.GetProperty("trainable_parameters").GetInt64() < started.GetProperty("parameters").GetInt64());
        var evaluation = events.First(e => e.GetProperty("event").GetString() == "evaluation");
        Assert.InRange(evaluation.GetProperty("val_accuracy").GetDouble(), 0, 1);
        var finished = events[^1];
        Assert.InRange(finished.GetProperty("test_accuracy").GetDouble(), 0, 1);
        Assert.Equal(48, finished.GetProperty("test_examples").GetInt32());

        (code, output, error) = Cli.Run(null, "classify", "--model", folder.Combine("c", "model"), "--text", "Win a prize", "--text", "hello", "--format", "json");
        Assert.True(code == 0, error);
        var lines = output.Split('\n', StringSplitOptions.RemoveEmptyEntries).Select(l => JsonDocument.Parse(l).RootElement).ToList();
        Assert.Equal(2, lines.Count);
        Assert.Equal("Win a prize", lines[0].GetProperty("text").GetString());
        Assert.Contains(lines[0].GetProperty("label").GetString(), new[] { "ham", "spam" });
        Assert.Equal(2, lines[0].GetProperty("logits").GetArrayLength());
        // --dtype: the same texts through the decoder with half-precision copies of the body; the façade the same way
        double[] Logits(JsonElement line) => line.GetProperty("logits").EnumerateArray().Select(l => l.GetDouble()).ToArray();
        foreach (var (dtype, tolerance) in new[] { ("f16", 5e-3), ("bf16", 5e-2) })
        {
            (code, output, error) = Cli.Run(null, "classify", "--model", folder.Combine("c", "model"), "--text", "Win a prize", "--text", "hello",
                "--dtype", dtype, "--format", "json");
            Assert.True(code == 0, error);
            var half = output.Split('\n', StringSplitOptions.RemoveEmptyEntries).Select(l => JsonDocument.Parse(l).RootElement).ToList();
            Assert.Equal(2, half.Count);
            for (var i = 0; i < 2; i++)
            {
                Assert.Equal(lines[i].GetProperty("text").GetString(), half[i].GetProperty("text").GetString());
                var differences = Logits(lines[i]).Zip(Logits(half[i]), (a, b) => Math.Abs(a - b)).ToArray();
                Assert.True(differences.Max() < tolerance, $"{dtype}: logits differ by {differences.Max()}");
            }
        }
        using (var classifier = TextClassifier.Load(folder.Combine("c", "model")))
        {
            var texts = new[] { "Win a prize", "hello" };
            var asTrained = classifier.ClassifyBatch(texts);
            var bfloat = classifier.ClassifyBatch(texts, dtype: Dtype.BFloat16);
            Assert.Equal(bfloat.Select(p => p.Logits), classifier.ClassifyBatch(texts, dtype: Dtype.BFloat16).Select(p => p.Logits)); // the kept copy
            for (var i = 0; i < 2; i++)
            {
                Assert.Equal(Logits(lines[i]), asTrained[i].Logits);
                Assert.All(asTrained[i].Logits.Zip(bfloat[i].Logits), pair => Assert.True(Math.Abs(pair.First - pair.Second) < 5e-2));
            }
        }
        (code, _, error) = Cli.Run(null, "classify", "--model", folder.Combine("c", "model"), "--text", "hi", "--dtype", "f8");
        Assert.Equal(2, code); // a usage error
        Assert.Contains("f8", error);

        (code, _, error) = Cli.Run("{\"text\": \"hi\"}\n{\"txt\": 1}\n", "classify", "--model", folder.Combine("c", "model"));
        Assert.Equal(1, code);
        Assert.Contains("standard input line 2", error);
        (code, _, error) = Cli.Run(null, "finetune", "classify", "--out", folder.Path);
        Assert.Equal(1, code);
        Assert.Contains("--model is required", error);
    }
}
