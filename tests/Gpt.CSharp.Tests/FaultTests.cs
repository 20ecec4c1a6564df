using System.Diagnostics;
using System.Text;
using System.Text.Json;
using Gpt.Cli;
using Xunit;
using Xunit.Abstractions;

namespace Gpt.CSharp.Tests;

/// <summary>The <c>gpt</c> command started as a process, as a user starts it (the test project references the CLI).</summary>
internal static class GptProcess
{
    public static ProcessStartInfo Start(params string[] args) =>
        new("dotnet", [Path.Combine(AppContext.BaseDirectory, "gpt.dll"), .. args])
        {
            RedirectStandardOutput = true, RedirectStandardError = true, RedirectStandardInput = true, UseShellExecute = false,
            Environment = { ["CI"] = "1" },
        };

    /// <summary>Starts it with its output read in the background (the text so far in the returned builders).</summary>
    public static (Process Process, StringBuilder Output, StringBuilder Error) Launch(params string[] args)
    {
        var output = new StringBuilder();
        var error = new StringBuilder();
        var process = Process.Start(Start(args))!;
        process.OutputDataReceived += (_, e) => { lock (output) output.AppendLine(e.Data); };
        process.ErrorDataReceived += (_, e) => { lock (error) error.AppendLine(e.Data); };
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
        process.StandardInput.Close();
        return (process, output, error);
    }

    /// <summary>Runs to the end; the exit code, standard output and standard error.</summary>
    public static (int Code, string Output, string Error) Run(params string[] args)
    {
        using var process = Process.Start(Start(args))!;
        process.StandardInput.Close();
        var error = process.StandardError.ReadToEndAsync();
        var output = process.StandardOutput.ReadToEnd();
        process.WaitForExit();
        return (process.ExitCode, output, error.Result);
    }
}

/// <summary>Issue 16: kill -9 at random moments and resume; two writers of one run folder.</summary>
public class DurabilityTests(ITestOutputHelper log)
{
    private static string[] TinyRun(string output, string name, int steps) =>
    [
        "train", "--layers", "1", "--emb-dim", "16", "--heads", "2", "--context-length", "16", "--batch-size", "2",
        "--max-steps", steps.ToString(), "--eval-interval", "10", "--eval-batches", "1", "--sample-tokens", "0",
        "--checkpoint-interval", "2", "--keep-last", "2", "--out", output, "--name", name, "--format", "json",
    ];

    private static bool HasCheckpoint(string run) =>
        Directory.Exists(Path.Combine(run, "checkpoints"))
        && Directory.GetDirectories(Path.Combine(run, "checkpoints"), "step-*").Any(d => File.Exists(Path.Combine(d, "checkpoint.json")));

    /// <summary>Trains a tiny model straight, then the same run killed with SIGKILL at random moments (during steps,
    /// evaluations and checkpoint saves) and resumed each time: the final weights are bit for bit the straight run's.
    /// 3 kills over 30 steps by default (about 20 s on two busy cores); GPT_LONG_FAULT_TESTS=1 makes it 30 over 300.</summary>
    [Fact]
    public void KilledAtRandomMomentsAndResumedEqualsAStraightRun()
    {
        if (!OperatingSystem.IsLinux() && !OperatingSystem.IsMacOS()) return; // SIGKILL semantics
        var kills = Environment.GetEnvironmentVariable("GPT_LONG_FAULT_TESTS") == "1" ? 30 : 3;
        var steps = kills * 10;
        using var folder = new TempFolder();
        var clock = Stopwatch.StartNew();
        var (code, _, error) = GptProcess.Run(TinyRun(folder.Path, "straight", steps));
        Assert.True(code == 0, error);
        var straightSeconds = clock.Elapsed.TotalSeconds;

        var run = folder.Combine("killed");
        var random = new Random(16);
        var killed = 0;
        for (var attempt = 0; attempt < kills; attempt++)
        {
            var args = HasCheckpoint(run) ? new[] { "train", "--resume", run, "--format", "json" } : TinyRun(folder.Path, "killed", steps);
            var (process, _, processError) = GptProcess.Launch(args);
            using var _ = process;
            // Anywhere from start-up on, so that the kills spread over the run (start-up, steps, evaluations, saves).
            var delay = TimeSpan.FromSeconds(0.3 + random.NextDouble() * Math.Max(1.5, 4 * straightSeconds / kills));
            var wasKilled = false;
            if (!process.WaitForExit(delay))
            {
                process.Kill(); // SIGKILL: no handler runs, nothing is flushed
                wasKilled = true;
                killed++;
            }
            process.WaitForExit();
            if (!wasKilled) Assert.True(process.ExitCode == 0, $"attempt {attempt}: exit {process.ExitCode}: {processError}");
            log.WriteLine($"attempt {attempt}: after {delay.TotalSeconds:0.0} s, {(wasKilled ? "killed" : "finished")}; " +
                          $"checkpoints: {string.Join(", ", HasCheckpoint(run) ? Directory.GetDirectories(Path.Combine(run, "checkpoints")).Select(Path.GetFileName) : [])}");
        }
        var final = HasCheckpoint(run) ? new[] { "train", "--resume", run, "--format", "json" } : TinyRun(folder.Path, "killed", steps);
        (code, _, error) = GptProcess.Run(final);
        Assert.True(code == 0, error);
        log.WriteLine($"{killed} kills, {clock.Elapsed.TotalSeconds:0} s in all");

        var straight = File.ReadAllBytes(folder.Combine("straight", "model", "model.safetensors"));
        var resumed = File.ReadAllBytes(Path.Combine(run, "model", "model.safetensors"));
        Assert.True(straight.AsSpan().SequenceEqual(resumed), "the killed and resumed run's final weights equal the straight run's");
        Assert.Empty(Directory.GetDirectories(Path.Combine(run, "checkpoints"), ".tmp-*")); // unfinished saves tidied
    }

    /// <summary>Two resumes of one run at once: the second fails at once, naming the first's process id; once the
    /// first is gone (even killed), the folder can be taken again.</summary>
    [Fact]
    public void ASecondResumeOfARunFailsAtOnceNamingTheHolder()
    {
        using var folder = new TempFolder();
        var (code, _, error) = Cli.Run(null, TinyRun(folder.Path, "r", 2));
        Assert.True(code == 0, error);
        var run = folder.Combine("r");

        var (first, _, firstError) = GptProcess.Launch("train", "--resume", run, "--max-steps", "100000", "--format", "json");
        using var _ = first;
        try
        {
            var holder = Path.Combine(run, "run.lock.holder");
            var wait = Stopwatch.StartNew();
            while (!(File.Exists(holder) && File.ReadAllText(holder).Contains($"pid {first.Id} ")) && wait.Elapsed < TimeSpan.FromSeconds(60))
            {
                Assert.False(first.HasExited, $"the first resume ended early: {firstError}");
                Thread.Sleep(50);
            }
            Assert.True(File.Exists(holder), "the first resume holds the lock");

            var clock = Stopwatch.StartNew();
            var (secondCode, _, secondError) = GptProcess.Run("train", "--resume", run, "--max-steps", "100000", "--format", "json");
            log.WriteLine($"second resume refused after {clock.Elapsed.TotalSeconds:0.0} s: {secondError.Trim()}");
            Assert.Equal(1, secondCode);
            Assert.StartsWith("gpt: error: the run folder", secondError);
            Assert.Contains($"pid {first.Id} ", secondError);
            Assert.DoesNotContain("   at ", secondError);
            Assert.False(first.HasExited, "the first resume is undisturbed");
        }
        finally
        {
            if (!first.HasExited) first.Kill();
            first.WaitForExit();
        }
        // The kernel released the killed holder's lock: the folder can be taken again.
        using (Gpt.Training.RunLockModule.acquire(run)) { }
    }

    [Fact]
    public void AFolderInUseIsRefusedToAnyRunInProcessToo()
    {
        using var folder = new TempFolder();
        var (code, _, error) = Cli.Run(null, TinyRun(folder.Path, "held", 2));
        Assert.True(code == 0, error);
        using (Gpt.Training.RunLockModule.acquire(folder.Combine("held")))
        {
            var (resumeCode, _, resumeError) = Cli.Run(null, "train", "--resume", folder.Combine("held"), "--max-steps", "4");
            Assert.Equal(1, resumeCode);
            Assert.Contains($"pid {Environment.ProcessId} ", resumeError);
            Directory.CreateDirectory(folder.Combine("fresh"));
            using (Gpt.Training.RunLockModule.acquire(folder.Combine("fresh")))
            {
                var (freshCode, _, freshError) = Cli.Run(null, TinyRun(folder.Path, "fresh", 2));
                Assert.Equal(1, freshCode);
                Assert.Contains("is in use", freshError);
            }
        }
        (code, _, error) = Cli.Run(null, "train", "--resume", folder.Combine("held"), "--max-steps", "4");
        Assert.True(code == 0, error);
    }

    [Fact]
    public void ARefusedRunLeavesNothingBehind()
    {
        using var folder = new TempFolder();
        var shortText = folder.Combine("short.txt");
        File.WriteAllText(shortText, "Too short.");
        var (code, _, error) = Cli.Run(null, [.. TinyRun(folder.Path, "short", 2), "--data", shortText]);
        Assert.True(code == 1, error);
        Assert.Contains("too short", error);
        // Refused by the trainer itself (no step fits), after the model and the data were ready.
        (code, _, error) = Cli.Run(null, [.. TinyRun(folder.Path, "huge-batch", 2), "--grad-accumulation", "100000"]);
        Assert.True(code == 1, error);
        Assert.Contains("no optimizer step fits", error);
        Assert.Equal(["short.txt"], Directory.GetFileSystemEntries(folder.Path).Select(Path.GetFileName));
    }
}

/// <summary>Issue 16: one error path, limits, invalid UTF-8 everywhere, no bare NaN.</summary>
public class ErrorPathTests
{
    [Fact]
    public void UsageErrorsExit2WithOneLineAndWhereTheUsageIs()
    {
        foreach (var args in new[] { new[] { "train", "--bogus" }, ["generate", "--model", "m", "--max-new-tokens", "many"], ["nosuchcommand"], [] })
        {
            var (code, output, error) = Cli.Run(null, args);
            Assert.True(code == 2, $"exit {code} for '{string.Join(' ', args)}': {error}");
            Assert.StartsWith("gpt: error: ", error);
            Assert.Contains("--help' for usage", error);
            Assert.Equal("", output);
        }
    }

    [Fact]
    public void FileSystemAndNativeFailuresAreOneLineWithExit1()
    {
        using var folder = new TempFolder();
        // A folder that cannot be created (under /proc, even as root): an IOException or UnauthorizedAccessException below.
        var (code, _, error) = Cli.Run(null, "init", "--layers", "1", "--emb-dim", "8", "--heads", "2", "--context-length", "8",
            "--vocab-size", "10", "--out", "/proc/gpt-cannot-write-here/model");
        Assert.Equal(1, code);
        Assert.StartsWith("gpt: error: ", error);
        Assert.DoesNotContain("   at ", error);
        Assert.Single(error.Trim().Split('\n'));
        // A model too large for memory is refused before libtorch reserves it.
        (code, _, error) = Cli.Run(null, "init", "--config", "gpt2-xl", "--emb-dim", "16384", "--heads", "16", "--out", folder.Combine("huge"));
        Assert.Equal(1, code);
        Assert.Contains("more than the", error);
        Assert.False(Directory.Exists(folder.Combine("huge")));
        // Sizes past the limits.
        (code, _, error) = Cli.Run(null, "init", "--layers", "1000000", "--out", folder.Combine("deep"));
        Assert.Equal(1, code);
        Assert.Contains("number of layers 1000000 exceeds this library's limit of 1024", error);
    }

    [Fact]
    public void TheFacadeWrapsOtherFailuresInAGptExceptionWithTheInnerException()
    {
        using var model = GptModel.Create(GptConfiguration.Gpt2Small with { Layers = 1, EmbeddingDim = 8, Heads = 2, ContextLength = 8, VocabularySize = 10 }, 1);
        var e = Assert.Throws<GptException>(() => model.Save("/proc/gpt-cannot-write-here/model"));
        Assert.NotNull(e.InnerException);
        Assert.IsNotType<GptException>(e.InnerException);
        using var folder = new TempFolder();
        Directory.CreateDirectory(folder.Combine("zero"));
        File.CreateSymbolicLink(folder.Combine("zero", "config.json"), "/dev/zero");
        var zero = Assert.Throws<GptException>(() => GptModel.Load(folder.Combine("zero")));
        Assert.Contains("not a regular file", zero.Message);
    }

    [Fact]
    public void InvalidUtf8OnStandardInputIsRefusedWithItsOffsetLikeAFile()
    {
        var output = new StringWriter();
        var error = new StringWriter();
        using var input = new StrictInput(new MemoryStream([(byte)'a', (byte)'b', 0xFF, (byte)'c']));
        var code = CliApp.Run(["tokenize"], input, output, error, inputRedirected: true);
        Assert.Equal(1, code);
        Assert.Equal("gpt: error: standard input is not valid UTF-8 (byte 2)\n", error.ToString());
        // Valid UTF-8, a byte-order mark included, reads as before.
        using var valid = new StrictInput(new MemoryStream(Encoding.UTF8.GetBytes("Akwirw ier")));
        code = CliApp.Run(["tokenize"], valid, output, error, inputRedirected: true);
        Assert.Equal(0, code);
        Assert.Contains("[33901, 86, 343, 86, 220, 959]", output.ToString());
    }

    [Fact]
    public void InvalidUtf8InAnArgumentIsRefusedWithItsOffset()
    {
        if (!OperatingSystem.IsLinux()) return;
        var gpt = Path.Combine(AppContext.BaseDirectory, "gpt.dll");
        var start = new ProcessStartInfo("bash", ["-c", $"exec dotnet '{gpt}' tokenize --text \"$(printf 'ab\\xffcd')\""])
        {
            RedirectStandardError = true, RedirectStandardOutput = true, UseShellExecute = false,
        };
        using var process = Process.Start(start)!;
        var error = process.StandardError.ReadToEnd();
        process.WaitForExit();
        Assert.Equal(1, process.ExitCode);
        Assert.Contains("gpt: error: command-line argument 3", error);
        Assert.Contains("is not valid UTF-8 (byte 2)", error);
    }

    /// <summary>The tiny fixture with every value of ln_f.weight NaN: every logit is NaN.</summary>
    private static string NanModel(TempFolder folder)
    {
        var directory = folder.Combine("nan");
        Directory.CreateDirectory(directory);
        File.Copy(Path.Combine(Fixtures.TinyGpt2, "config.json"), Path.Combine(directory, "config.json"));
        var bytes = File.ReadAllBytes(Path.Combine(Fixtures.TinyGpt2, "model.safetensors"));
        var headerLength = (int)BitConverter.ToUInt64(bytes, 0);
        using var header = JsonDocument.Parse(bytes.AsMemory(8, headerLength));
        var offsets = header.RootElement.GetProperty("ln_f.weight").GetProperty("data_offsets");
        var (begin, end) = (offsets[0].GetInt32(), offsets[1].GetInt32());
        for (var at = 8 + headerLength + begin; at < 8 + headerLength + end; at += 4)
            BitConverter.TryWriteBytes(bytes.AsSpan(at, 4), float.NaN);
        File.WriteAllBytes(Path.Combine(directory, "model.safetensors"), bytes);
        return directory;
    }

    [Fact]
    public void NonFiniteWeightsAreRefusedByDefaultAndLogitsNeverPrintABareNaN()
    {
        using var folder = new TempFolder();
        var model = NanModel(folder);
        var (code, _, error) = Cli.Run(null, "logits", "--model", model, "--ids", "1,2");
        Assert.Equal(1, code);
        Assert.Contains("'ln_f.weight' (32 of 32)", error);
        Assert.Contains("--allow-nonfinite", error);
        (code, _, error) = Cli.Run(null, "info", "--model", model);
        Assert.Equal(1, code);

        var (jsonCode, json, jsonError) = Cli.Run(null, "logits", "--model", model, "--ids", "1,2", "--allow-nonfinite");
        Assert.True(jsonCode == 0, jsonError);
        Assert.DoesNotContain("NaN", json);
        using var document = JsonDocument.Parse(json); // valid JSON
        var first = document.RootElement.GetProperty("logits")[0][0];
        Assert.Equal(50257, first.GetArrayLength());
        Assert.All(first.EnumerateArray(), v => Assert.Equal(JsonValueKind.Null, v.ValueKind));

        var (textCode, text, textError) = Cli.Run(null, "logits", "--model", model, "--ids", "1,2", "--allow-nonfinite", "--format", "text");
        Assert.True(textCode == 0, textError);
        Assert.Contains("sequence 1, position 2 (id 2):", text);
        Assert.Contains("(50257 of 50257 not finite)", text);

        var e = Assert.Throws<GptException>(() => GptModel.Load(model));
        Assert.Contains("ln_f.weight", e.Message);
        using var allowed = GptModel.Load(model, new ModelLoadOptions { AllowNonFinite = true });
        Assert.Equal(2, allowed.Configuration.Layers);
    }

    /// <summary>A copy of a safetensors-holding folder with every value of the first tensor whose name contains
    /// <paramref name="part"/> set to NaN; returns the tensor's name.</summary>
    private static string PoisonTensor(string source, string target, string fileName, string part)
    {
        Directory.CreateDirectory(target);
        foreach (var file in Directory.GetFiles(source)) File.Copy(file, Path.Combine(target, Path.GetFileName(file)));
        var path = Path.Combine(target, fileName);
        var bytes = File.ReadAllBytes(path);
        var headerLength = (int)BitConverter.ToUInt64(bytes, 0);
        using var header = JsonDocument.Parse(bytes.AsMemory(8, headerLength));
        var tensor = header.RootElement.EnumerateObject().First(p => p.Name.Contains(part));
        var offsets = tensor.Value.GetProperty("data_offsets");
        for (var at = 8 + headerLength + offsets[0].GetInt32(); at < 8 + headerLength + offsets[1].GetInt32(); at += 4)
            BitConverter.TryWriteBytes(bytes.AsSpan(at, 4), float.NaN);
        File.WriteAllBytes(path, bytes);
        return tensor.Name;
    }

    [Fact]
    public void AllowNonFiniteReachesAnAdaptersBaseAndTheAdapterItself()
    {
        using var folder = new TempFolder();
        var result = Trainer.Train(new TrainingOptions
        {
            InitFrom = Fixtures.TinyGpt2, ContextLength = 16, MaxSteps = 1, BatchSize = 2, EvalInterval = 1, EvalBatches = 1,
            SamplePrompt = null, OutputDirectory = folder.Path, Name = "lora", LoraRank = 2, LoraTargets = ["c_attn"],
        });
        var adapter = Path.Combine(result.RunDirectory, "adapter");

        // A base whose weights hold NaN: refused through --adapter too, unless allowed.
        var nanBase = NanModel(folder);
        var (code, _, error) = Cli.Run(null, "logits", "--adapter", adapter, "--model", nanBase, "--ids", "1,2");
        Assert.Equal(1, code);
        Assert.Contains("'ln_f.weight' (32 of 32)", error);
        Assert.Contains("--allow-nonfinite", error);
        (code, _, error) = Cli.Run(null, "logits", "--adapter", adapter, "--model", nanBase, "--ids", "1,2", "--allow-nonfinite");
        Assert.True(code == 0, error);

        // An adapter whose own matrices hold NaN: the same rule.
        var poisoned = folder.Combine("poisoned");
        var name = PoisonTensor(adapter, poisoned, "adapter_model.safetensors", "lora_B");
        (code, _, error) = Cli.Run(null, "logits", "--adapter", poisoned, "--ids", "1,2");
        Assert.Equal(1, code);
        Assert.Contains($"'{name}'", error);
        Assert.Contains("--allow-nonfinite", error);
        (code, _, error) = Cli.Run(null, "logits", "--adapter", poisoned, "--ids", "1,2", "--allow-nonfinite");
        Assert.True(code == 0, error);
        var e = Assert.Throws<GptException>(() => Adapter.LoadModel(poisoned));
        Assert.Contains(name, e.Message);
        using var allowed = Adapter.LoadModel(poisoned, null, merge: false, new ModelLoadOptions { AllowNonFinite = true });
        Assert.Equal(2, allowed.Configuration.Layers);
        Assert.Throws<GptException>(() => InstructionModel.LoadWithAdapter(poisoned));
        using var instruction = InstructionModel.LoadWithAdapter(poisoned, null, PromptStyle.Alpaca, new ModelLoadOptions { AllowNonFinite = true });
    }

    [Fact]
    public void FileSystemFailuresOfTheFacadeAreGptExceptionsWithTheCauseInside()
    {
        using var folder = new TempFolder();
        var file = folder.Combine("a-file");
        File.WriteAllText(file, "not a folder");
        using var adapter = Adapter.Load(Path.Combine(Fixtures.Root, "tests", "fixtures", "lora", "adapter"));
        var save = Assert.Throws<GptException>(() => adapter.Save(Path.Combine(file, "adapter")));
        Assert.IsAssignableFrom<IOException>(save.InnerException);
        Assert.Throws<GptException>(() => Corpus.Load(Path.Combine(file, "*.txt")));
        Assert.Throws<GptException>(() => Adapter.LoadModel(file));
        Assert.Throws<GptException>(() => GptConfiguration.FromModelDirectory(file));
        Assert.Throws<GptException>(() => ClassifierTrainingOptions.FromCheckpoint(file));
        Assert.Throws<GptException>(() => InstructionTrainingOptions.FromCheckpoint(file));
    }

    [Fact]
    public void LogitsTextFormatShowsTheLargestLogits()
    {
        var (code, text, error) = Cli.Run(null, "logits", "--model", Fixtures.TinyGpt2, "--ids", "15496,11", "--format", "text");
        Assert.True(code == 0, error);
        var lines = text.Trim().Split('\n');
        Assert.Equal(2, lines.Length);
        Assert.StartsWith("sequence 1, position 1 (id 15496): ", lines[0]);
        Assert.Equal(5, lines[0].Split(": ", 2)[1].Split("  ").Length);
    }

    [Fact]
    public void AnyPositiveTemperatureWorksAndATinyOneIsGreedy()
    {
        string Generate(params string[] more)
        {
            var (code, output, error) = Cli.Run(null, ["generate", "--model", Fixtures.TinyGpt2, "--prompt", "Hello", "--max-new-tokens", "6",
                "--no-eos", "--format", "json", .. more]);
            Assert.True(code == 0, error);
            return JsonDocument.Parse(output).RootElement.GetProperty("ids").GetRawText();
        }
        var greedy = Generate();
        foreach (var temperature in new[] { "1e-300", "5e-324", "1e-45", "1e-30" })
            Assert.Equal(greedy, Generate("--temperature", temperature, "--seed", "3"));
        Generate("--temperature", "1e300", "--seed", "3"); // flat, but a valid distribution
    }
}
