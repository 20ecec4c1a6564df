using System.Diagnostics;
using System.Text.Json;
using Xunit;

namespace Gpt.CSharp.Tests;

/// <summary>A test that needs a Python with PyTorch (gloo) and numpy: <c>$GPT_TEST_PYTHON</c>, else
/// <c>/usr/bin/python3</c> (Debian's python3-torch). Skipped, with the reason, where it cannot import them (CI does not
/// install PyTorch); <c>GPT_TORCHRUN_TESTS=0</c> skips it anyway.</summary>
public sealed class TorchFactAttribute : FactAttribute
{
    public static string Python => Environment.GetEnvironmentVariable("GPT_TEST_PYTHON") is { Length: > 0 } python ? python : "/usr/bin/python3";

    private static readonly Lazy<string?> Missing = new(() =>
    {
        if (Environment.GetEnvironmentVariable("GPT_TORCHRUN_TESTS") == "0") return "GPT_TORCHRUN_TESTS=0";
        if (Path.IsPathRooted(Python) && !File.Exists(Python)) return $"no {Python}: torchrun tests need Python with PyTorch (apt-get install python3-torch)";
        try
        {
            using var probe = Process.Start(new ProcessStartInfo(Python, ["-c", "import torch, numpy, torch.distributed.run"])
            {
                RedirectStandardOutput = true, RedirectStandardError = true,
            })!;
            var error = probe.StandardError.ReadToEndAsync();
            if (!probe.WaitForExit(120_000)) { probe.Kill(); return $"{Python} took over 2 minutes to import torch"; }
            return probe.ExitCode == 0 ? null
                : $"{Python} cannot import torch and numpy (apt-get install python3-torch, or set GPT_TEST_PYTHON): {error.Result.Trim().Split('\n')[^1]}";
        }
        catch (System.ComponentModel.Win32Exception e)
        {
            return $"{Python} cannot be started: {e.Message}";
        }
    });

    public TorchFactAttribute()
    {
        if (Missing.Value is { } reason) Skip = reason;
    }
}

/// <summary><c>gpt train --engine torchrun</c> (issue 17): the same run with two torchrun processes (gloo on the CPU,
/// loopback) as in one gpt process, per-step losses and logits within 1e-4, and gpt resuming the torchrun run; the dry
/// run and the errors, which need no Python.</summary>
public class TorchrunTests
{
    /// <summary>About 1,500 characters of the built-in story: 4 batches of 4 windows of 16 tokens an epoch, so that a
    /// few steps cross epochs (each with its own shuffle) and end epochs with samples.</summary>
    private static string ShortStory(TempFolder folder)
    {
        var path = folder.Combine("story.txt");
        File.WriteAllText(path, Corpus.BuiltInStory.Text[..1500]);
        return path;
    }

    /// <summary>A tiny GPT-2 (2 layers of 32, context 16) with dropout 0: PyTorch's processes and libtorch in gpt cannot
    /// draw the same dropout masks, so only without dropout do both engines compute the same run.</summary>
    private static string[] Run(TempFolder folder, string data, string name, params string[] more)
    {
        string[] options =
        [
            "--data", data, "--layers", "2", "--emb-dim", "32", "--heads", "2", "--context-length", "16", "--drop-rate", "0",
            "--batch-size", "4", "--grad-accumulation", "2", "--max-steps", "8", "--lr", "5e-3", "--warmup-steps", "2",
            "--eval-interval", "3", "--eval-batches", "2", "--checkpoint-interval", "4", "--sample-tokens", "6", "--seed", "5",
            "--out", folder.Path, "--name", name, "--format", "json",
        ];
        // An option in `more` replaces the one above (every option above takes one value).
        var kept = options.Chunk(2).Where(pair => !more.Contains(pair[0])).SelectMany(pair => pair);
        return ["train", .. kept, .. more];
    }

    private static string[] Torchrun(params string[] more) => ["--engine", "torchrun", "--nproc-per-node", "2", "--python", TorchFactAttribute.Python, .. more];

    private static List<JsonElement> Events(string output) =>
        output.Split('\n', StringSplitOptions.RemoveEmptyEntries).Select(line => JsonDocument.Parse(line).RootElement).ToList();

    private static double[] StepLosses(IEnumerable<JsonElement> events) =>
        events.Where(e => e.GetProperty("event").GetString() == "step").Select(e => e.GetProperty("loss").GetDouble()).ToArray();

    private static float[] Logits(string model)
    {
        using var gpt = GptModel.Load(model);
        return gpt.Logits([[15496, 11, 995, 318, 262], [464, 3290, 1110, 13, 50256]]).SelectMany(s => s.SelectMany(p => p)).ToArray();
    }

    private static void Close(double[] expected, double[] actual, double tolerance, string what)
    {
        Assert.Equal(expected.Length, actual.Length);
        var worst = expected.Zip(actual, (e, a) => Math.Abs(e - a)).Max();
        Assert.True(worst <= tolerance, $"{what}: largest difference {worst:g3} > {tolerance:g3}\nexpected {string.Join(", ", expected)}\nfound    {string.Join(", ", actual)}");
    }

    /// <summary>Both engines stop a diverging run at its first non-finite loss, before that step's update, with the
    /// same message.</summary>
    [TorchFact]
    public void BothEnginesStopADivergingRunAtItsFirstNonFiniteLoss()
    {
        using var folder = new TempFolder();
        var story = ShortStory(folder);
        string[] diverging = ["--lr", "1e37", "--min-lr", "1e37", "--warmup-steps", "0", "--max-steps", "40"];
        var (code, _, error) = Cli.Run(null, Run(folder, story, "one", diverging));
        Assert.Equal(1, code);
        Assert.Contains("the training loss is", error);
        Assert.Contains("this step was not applied", error);
        (code, _, error) = Cli.Run(null, [.. Run(folder, story, "two", diverging), .. Torchrun()]);
        Assert.NotEqual(0, code);
        Assert.Contains("the training loss is", error);
        Assert.Contains("this step was not applied", error);
    }

    [TorchFact]
    public void TwoProcessesTrainWhatOneProcessTrainsAndGptResumesTheirRun()
    {
        using var folder = new TempFolder();
        var story = ShortStory(folder);
        var (code, output, error) = Cli.Run(null, Run(folder, story, "single"));
        Assert.True(code == 0, error);
        var single = Events(output);
        (code, output, error) = Cli.Run(null, [.. Run(folder, story, "multi"), .. Torchrun()]);
        Assert.True(code == 0, error);
        var multi = Events(output);

        // The same 8 steps of 2 micro-batches of the global batch of 4 (2 rows in each process), over 4 epochs.
        var expected = StepLosses(single);
        Assert.Equal(8, expected.Length);
        Close(expected, StepLosses(multi), 1e-4, "per-step losses");
        Assert.True(expected[^1] < expected[0] - 0.5, $"the run learns: {expected[0]} -> {expected[^1]}");
        string[] Kinds(List<JsonElement> events) => events.Select(e => e.GetProperty("event").GetString()!).ToArray();
        Assert.Equal(Kinds(single), Kinds(multi)); // started, steps, evaluations, epoch ends, checkpoints, model, finished
        string?[] Samples(List<JsonElement> events) =>
            events.Where(e => e.GetProperty("event").GetString() == "epoch_end").Select(e => e.GetProperty("sample").GetString()).ToArray();
        Assert.Equal(4, Samples(single).Length);
        Assert.Equal(Samples(single), Samples(multi)); // greedy, decoded by gpt from the ids train.py sends

        // metrics.jsonl in our schema, the same evaluations; checkpoints and model/ where gpt writes them.
        double[] Evaluations(string run) => File.ReadAllLines(folder.Combine(run, "metrics.jsonl"))
            .Select(l => JsonDocument.Parse(l).RootElement)
            .SelectMany(r => new[] { r.GetProperty("step").GetDouble(), r.GetProperty("train_loss").GetDouble(), r.GetProperty("val_loss").GetDouble(), r.GetProperty("lr").GetDouble() })
            .ToArray();
        Close(Evaluations("single"), Evaluations("multi"), 1e-4, "metrics.jsonl (step, train_loss, val_loss, lr)");
        foreach (var file in new[] { "run.json", "loss.png", "checkpoints/step-00000004/checkpoint.json", "checkpoints/step-00000008/optimizer.safetensors", "model/config.json" })
            Assert.True(File.Exists(folder.Combine("multi", file)), file);

        // Data-parallel averaging equals the large batch: the models agree.
        var reference = Logits(folder.Combine("single", "model")).Select(x => (double)x).ToArray();
        Close(reference, Logits(folder.Combine("multi", "model")).Select(x => (double)x).ToArray(), 1e-4, "final logits");
        var (generateCode, text, generateError) = Cli.Run(null, "generate", "--model", folder.Combine("multi", "model"), "--prompt", "The harbor", "--max-new-tokens", "4");
        Assert.True(generateCode == 0, generateError);
        Assert.StartsWith("The harbor", text);

        // gpt resumes the torchrun run in its own process from the torchrun checkpoint at step 4: model, AdamW moments,
        // data position; steps 5 to 8 are the single run's.
        (code, output, error) = Cli.Run(null, "train", "--resume", folder.Combine("multi", "checkpoints", "step-00000004"), "--format", "json");
        Assert.True(code == 0, error);
        var resumed = Events(output);
        Assert.Equal(4, resumed[0].GetProperty("step").GetInt32());
        Close(expected[4..], StepLosses(resumed), 1e-4, "steps 5-8 resumed by gpt");
        Close(reference, Logits(folder.Combine("multi", "model")).Select(x => (double)x).ToArray(), 1e-4, "final logits after the resume");
    }

    [TorchFact]
    public void CancellingStopsEveryProcessAfterItsStepWithACheckpointThatGptContinues()
    {
        using var folder = new TempFolder();
        var options = new TrainingOptions
        {
            Data = ShortStory(folder), Model = TrainingOptions.DefaultModel with { Layers = 1, EmbeddingDim = 16, Heads = 2, ContextLength = 16, DropRate = 0.1 },
            BatchSize = 4, MaxSteps = 6, EvalInterval = 2, EvalBatches = 1, SampleTokens = 0, OutputDirectory = folder.Path, Name = "stopped",
        };
        using var cancel = new CancellationTokenSource();
        var reports = new Reports(p => { if (p.Kind == TrainingEventKind.Step) cancel.Cancel(); });
        var log = new List<string>();
        var result = Gpt.Torchrun.Train(options, new TorchrunSettings { ProcessesPerNode = 2, Python = TorchFactAttribute.Python }, reports,
            line => { lock (log) log.Add(line); }, cancel.Token);

        Assert.True(result.Cancelled, string.Join('\n', log));
        Assert.InRange(result.Steps, 1, 5);
        Assert.Equal(folder.Combine("stopped", "checkpoints", $"step-{result.Steps:00000000}"), result.CheckpointDirectory);
        Assert.Equal(folder.Combine("stopped", "model"), result.ModelDirectory);
        Assert.Contains(reports.All, p => p.Kind == TrainingEventKind.ModelSaved);
        Assert.True(File.Exists(folder.Combine("stopped", "torchrun", "STOP")), "gpt asked the processes to stop");

        // The run continues in gpt's own process (dropout 0.1: torchrun's and gpt's masks differ, the run goes on).
        var resumed = Trainer.Train(TrainingOptions.FromCheckpoint(result.RunDirectory));
        Assert.False(resumed.Cancelled);
        Assert.Equal(6, resumed.Steps);
        var evaluated = File.ReadAllLines(folder.Combine("stopped", "metrics.jsonl"))
            .Select(l => JsonDocument.Parse(l).RootElement.GetProperty("step").GetInt32()).ToArray();
        Assert.Equal(1, evaluated[0]); // torchrun's first evaluation, kept
        Assert.Equal(6, evaluated[^1]); // gpt's last
        Assert.Equal(evaluated.Order().Distinct(), evaluated); // one log, in step order
    }

    [Fact]
    public void DryRunPreparesTheRunAndPrintsTheCommandForEachNode()
    {
        using var folder = new TempFolder();
        var story = ShortStory(folder);
        var (code, output, error) = Cli.Run(null, [.. Run(folder, story, "prepared"), "--engine", "torchrun", "--nproc-per-node", "2", "--python", "/opt/py/bin/python", "--dry-run"]);
        Assert.True(code == 0, error);
        var prepared = JsonDocument.Parse(output).RootElement;
        var torchrunFolder = folder.Combine("prepared", "torchrun");
        Assert.Equal("prepared", prepared.GetProperty("event").GetString());
        Assert.Equal(8, prepared.GetProperty("total_steps").GetInt32());
        Assert.Equal(
            $"/opt/py/bin/python -m torch.distributed.run --nproc_per_node 2 --standalone {torchrunFolder}/train.py --options {torchrunFolder}/options.json",
            prepared.GetProperty("command").GetString());
        foreach (var file in new[] { "options.json", "train-00000.bin", "val-00000.bin", "order.bin", "init/model.safetensors", "train.py", "gpt_run.py" })
            Assert.True(File.Exists(Path.Combine(torchrunFolder, file)), file);
        Assert.True(File.Exists(folder.Combine("prepared", "run.json")));
        Assert.False(Directory.Exists(folder.Combine("prepared", "checkpoints")), "nothing trained");

        (code, output, error) = Cli.Run(null, [.. Run(folder, story, "cluster", "--format", "text"), "--engine", "torchrun", "--nproc-per-node", "2",
            "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.1.2.3", "--master-port", "29400", "--dry-run"]);
        Assert.True(code == 0, error);
        Assert.Contains("for 8 steps (4 processes)", output);
        Assert.Contains("each with its own --node_rank (0 .. 1); this is node 1's", output);
        Assert.Contains("-m torch.distributed.run --nproc_per_node 2 --nnodes 2 --node_rank 1 --master_addr 10.1.2.3 --master_port 29400 ", output);
    }

    [Fact]
    public void WhatTorchrunCannotTakeIsAClearError()
    {
        using var folder = new TempFolder();
        var story = ShortStory(folder);
        void Fails(string expected, params string[] args)
        {
            var (code, _, error) = Cli.Run(null, args);
            Assert.True(code == 1, $"exit code {code} for {string.Join(' ', args)}: {error}");
            Assert.Contains(expected, error);
        }
        Fails("the batch size 3 is the global batch and must be divisible by the 2 processes (2 per node x 1 nodes): 2 or 4 would do",
            [.. Run(folder, story, "odd", "--batch-size", "3"), "--engine", "torchrun", "--nproc-per-node", "2"]);
        Fails("Python '/no/such/python3' was not found: install Python 3 with PyTorch (pip install torch numpy",
            [.. Run(folder, story, "nopython"), "--engine", "torchrun", "--python", "/no/such/python3"]);
        Fails("--nproc-per-node needs --engine torchrun", [.. Run(folder, story, "plain"), "--nproc-per-node", "2"]);
        Fails("--nnodes 2 needs --master-addr", [.. Run(folder, story, "nomaster"), "--engine", "torchrun", "--nnodes", "2", "--dry-run"]);
        Fails("on node 1 run the command that --dry-run prints", [.. Run(folder, story, "node1"), "--engine", "torchrun", "--nnodes", "2",
            "--node-rank", "1", "--master-addr", "node0"]);
        Assert.False(Directory.Exists(folder.Combine("odd")), "nothing prepared for a refused run");
    }
}
