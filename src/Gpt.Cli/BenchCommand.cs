using System.CommandLine;
using System.Text.Json.Nodes;
using Gpt.Bench;

namespace Gpt.Cli;

/// <summary><c>gpt bench</c>: the benchmark suite, each part with <c>--format json</c>; <c>gpt bench all</c> runs them all.</summary>
internal static class BenchCommand
{
    /// <summary>Parts added by later stages.</summary>
    internal static readonly List<Func<CliContext, Command>> Parts = [];

    /// <summary>A part of the suite: a command that measures one thing and returns it as a JSON object.</summary>
    internal sealed class BenchPart(string name, string description, Func<ParseResult, JsonObject> measure) : Command(name, description)
    {
        public Func<ParseResult, JsonObject> Measure { get; } = measure;
    }

    /// <summary>What <c>gpt bench all</c> runs, in order: a label, the part, its options, and smaller options for
    /// <c>--quick</c> (a smoke test of the suite; its figures are not comparable).</summary>
    internal static readonly (string Label, string Part, string[] Options, string[] QuickOptions)[] Plan =
    [
        ("machine", "machine", [], []),
        ("tokenizer", "tokenizer", [], ["--megabytes", "1"]),
        ("generate", "generate", [], ["--new-tokens", "4", "--runs", "1"]),
        ("generate-f16", "generate", ["--dtype", "f16"], ["--dtype", "f16", "--new-tokens", "4", "--runs", "1"]),
        ("generate-batch-8", "generate", ["--batch", "8"], ["--batch", "2", "--new-tokens", "4", "--runs", "1"]),
        ("generate-256", "generate", ["--new-tokens", "256", "--compare-kv-cache"], ["--new-tokens", "8", "--compare-kv-cache", "--runs", "1"]),
        ("train-A", "train", ["--preset", "A"], ["--preset", "A", "--warmup", "0", "--steps", "1"]),
        ("train-B", "train", ["--preset", "B"], ["--preset", "B", "--warmup", "0", "--steps", "1"]),
        ("leak", "leak", [], ["--steps", "20", "--warmup", "5"]),
        ("finetune-classify", "finetune-classify", [], ["--batch-size", "1", "--length", "8", "--warmup", "0", "--steps", "1"]),
    ];

    public static Command Create(CliContext context)
    {
        var command = new Command("bench", "Measure speed and memory against this machine's own limits (warm-up, median of several runs).");
        command.Add(Part(context, "machine", "fp32 matmul GFLOP/s through libtorch (1024³) and memory bandwidth (GB/s): the ceilings.",
            _ => Machine()));
        var megabytes = new Option<double>("--megabytes") { Description = "How much text to encode.", DefaultValueFactory = _ => 10 };
        var tokenizer = Part(context, "tokenizer", "GPT-2 tokenizer speed in MB/s on at least 10 MB of text.",
            parse => Tokenizer(parse.GetValue(megabytes)));
        tokenizer.Add(megabytes);
        command.Add(tokenizer);
        command.Add(GenerateCommand.Bench(context));
        command.Add(Train(context));
        command.Add(Leak(context));
        command.Add(FineTuneClassify(context));
        command.Add(Gguf(context));
        foreach (var part in Parts) command.Add(part(context));
        command.Add(All(context, command));
        return command;
    }

    internal static Option<string> FormatOption() => Commands.FormatOption();

    /// <summary>A bench part: runs <paramref name="measure"/> and prints its JSON object (or key: value lines).</summary>
    internal static Command Part(CliContext context, string name, string description, Func<ParseResult, JsonObject> measure)
    {
        var format = FormatOption();
        var command = new BenchPart(name, description, measure) { format };
        command.SetAction(parse => CliApp.Guard(context, () =>
        {
            Commands.Print(context, parse.GetValue(format)!, Measured(name, () => measure(parse)));
            return 0;
        }));
        return command;
    }

    /// <summary>Runs a measurement; its result with <c>"part"</c> first and the machine it ran on last, including how
    /// busy other processes kept the cores meanwhile.</summary>
    private static JsonObject Measured(string label, Func<JsonObject> measure)
    {
        var before = Measure.cpuSnapshot();
        var result = measure();
        var others = Measure.othersCpuPercent(before, Measure.cpuSnapshot());
        var labelled = Labelled(label, result);
        labelled["machine"]!["others_cpu_pct"] = others;
        return labelled;
    }

    private static JsonObject Labelled(string label, JsonObject result)
    {
        var labelled = new JsonObject { ["part"] = label };
        foreach (var (key, value) in result.ToList())
        {
            result.Remove(key);
            labelled[key] = value;
        }
        labelled["machine"] = Machine(Measure.machine());
        return labelled;
    }

    internal static JsonObject Machine(Measure.MachineInfo m) => new()
    {
        ["cpu"] = m.Cpu, ["logical_cores"] = m.LogicalCores, ["torch_threads"] = m.TorchThreads,
        ["memory_gib"] = m.MemoryGiB, ["os"] = m.Os, ["dotnet"] = m.Runtime, ["torchsharp"] = m.TorchSharp,
        ["load_average"] = m.LoadAverage, ["native_allocator_tuned"] = GptRuntime.NativeAllocatorTuned,
    };

    private static JsonObject Machine()
    {
        var result = MachineBench.machine();
        return new JsonObject
        {
            ["matmul_gflops"] = result.MatmulGflops, ["bandwidth_gbps"] = result.BandwidthGbps,
            ["read_bandwidth_gbps"] = result.ReadBandwidthGbps,
        };
    }

    private static JsonObject Tokenizer(double megabytes)
    {
        var result = MachineBench.tokenizer(megabytes, 3);
        return new JsonObject
        {
            ["mb_per_s"] = result.MbPerS, ["megabytes"] = result.Megabytes,
            ["tokens"] = result.Tokens, ["seconds"] = result.Seconds,
        };
    }

    private static Command Train(CliContext context)
    {
        var preset = new Option<string>("--preset")
        {
            Description = "A (256 dims, 4 layers, batch 8 × 256) or B (gpt2-small, 163M, batch 1 × 256).", DefaultValueFactory = _ => "A",
        };
        var warmup = new Option<int>("--warmup") { Description = "Untimed steps first.", DefaultValueFactory = _ => 2 };
        var steps = new Option<int>("--steps") { Description = "Timed steps (the median is reported).", DefaultValueFactory = _ => 5 };
        var loraRank = new Option<int?>("--lora-rank") { Description = "Train LoRA adapters of this rank (every map of the blocks) on the frozen model instead of every weight (0: every weight, as without it)." };
        var device = Commands.DeviceOption();
        var command = Part(context, "train",
            "Training speed: tokens/s, model FLOPs utilisation (MFU) against this machine's matmul speed, peak RSS, where a step's time goes.",
            parse =>
            {
                // 0 = every weight, as on gpt train.
                var lora = Gpt.Model.LoraSettingsModule.ofOptions(
                    parse.GetValue(loraRank) is { } rank ? Microsoft.FSharp.Core.FSharpOption<int>.Some(rank) : null, null, null);
                var r = TrainBench.run(TrainBench.preset(parse.GetValue(preset)!), lora, Gpt.Model.DeviceModule.parse(parse.GetValue(device)), parse.GetValue(warmup), parse.GetValue(steps), 123);
                var b = r.Breakdown;
                return new JsonObject
                {
                    ["tokens_per_s"] = Math.Round(r.TokensPerSecond, 1), ["mfu"] = Math.Round(r.Mfu, 4), ["peak_rss_mb"] = Math.Round(r.PeakRssMb),
                    ["preset"] = r.Preset, ["lora_rank"] = r.LoraRank is { } loraRankUsed ? loraRankUsed.Value : null,
                    ["trainable_parameters"] = r.TrainableParameters, ["batch_size"] = r.BatchSize, ["sequence_length"] = r.SequenceLength,
                    ["parameters"] = r.Parameters, ["matrix_parameters"] = r.MatrixParameters, ["flops_per_token"] = r.FlopsPerToken,
                    ["matmul_gflops"] = Math.Round(r.MatmulGflops, 1), ["step_s"] = Math.Round(r.StepSeconds, 4),
                    ["step_times_s"] = new JsonArray(r.StepTimes.Select(t => (JsonNode)Math.Round(t, 4)).ToArray()),
                    ["breakdown_s"] = new JsonObject
                    {
                        ["zero_grad"] = Math.Round(b.ZeroGrad, 4), ["forward_and_loss"] = Math.Round(b.Forward, 4),
                        ["body_forward"] = Math.Round(b.Body, 4), ["head_and_loss_with_head_gradients"] = Math.Round(b.HeadAndLoss, 4),
                        ["backward"] = Math.Round(b.Backward, 4), ["optimizer"] = Math.Round(b.Optimizer, 4),
                    },
                    ["tensors_per_step"] = Math.Round(r.TensorsPerStep, 1), ["page_faults_per_step"] = Math.Round(r.PageFaultsPerStep),
                    ["warmup_steps"] = r.WarmupSteps, ["timed_steps"] = r.TimedSteps,
                    ["first_loss"] = Math.Round(r.FirstLoss, 4), ["last_loss"] = Math.Round(r.LastLoss, 4), ["device"] = r.Device,
                };
            });
        command.Add(preset);
        command.Add(loraRank);
        command.Add(device);
        command.Add(warmup);
        command.Add(steps);
        return command;
    }

    private static Command FineTuneClassify(CliContext context)
    {
        var trainable = new Option<string>("--trainable") { Description = "What trains: last-block (the book), last-N, head or all.", DefaultValueFactory = _ => "last-block" };
        var batchSize = new Option<int>("--batch-size") { Description = "Texts per batch.", DefaultValueFactory = _ => 8 };
        var length = new Option<int>("--length") { Description = "Tokens per text.", DefaultValueFactory = _ => 128 };
        var warmup = new Option<int>("--warmup") { Description = "Untimed steps first.", DefaultValueFactory = _ => 2 };
        var steps = new Option<int>("--steps") { Description = "Timed steps (the median is reported).", DefaultValueFactory = _ => 5 };
        var command = Part(context, "finetune-classify",
            "Classification fine-tuning speed (book chapter 6): a gpt2-small classifier, batches of 8 x 128 tokens, the last block trained: tokens/s, peak RSS.",
            parse =>
            {
                var r = FineTuneBench.classify(parse.GetValue(trainable)!, parse.GetValue(batchSize), parse.GetValue(length), parse.GetValue(warmup), parse.GetValue(steps), 123);
                return new JsonObject
                {
                    ["tokens_per_s"] = Math.Round(r.TokensPerSecond, 1), ["peak_rss_mb"] = Math.Round(r.PeakRssMb), ["step_s"] = Math.Round(r.StepSeconds, 4),
                    ["trainable"] = r.Trainable, ["parameters"] = r.Parameters, ["trainable_parameters"] = r.TrainableParameters,
                    ["batch_size"] = r.BatchSize, ["sequence_length"] = r.SequenceLength,
                    ["step_times_s"] = new JsonArray(r.StepTimes.Select(t => (JsonNode)Math.Round(t, 4)).ToArray()),
                    ["warmup_steps"] = r.WarmupSteps, ["timed_steps"] = r.TimedSteps,
                };
            });
        command.Add(trainable);
        command.Add(batchSize);
        command.Add(length);
        command.Add(warmup);
        command.Add(steps);
        return command;
    }

    /// <summary><c>gpt bench gguf</c>: the model <c>gpt bench generate</c> runs, as a GGUF file for llama.cpp (issue 18's
    /// side-by-side comparison, bench/compare-llama.sh).</summary>
    private static Command Gguf(CliContext context)
    {
        var modelPath = new Option<string?>("--model") { Description = "Model source (default: the freshly initialised gpt2-small gpt bench generate runs, seed 1, tied head)." };
        var output = new Option<string>("--out") { Description = "GGUF file to write (written under a temporary name, then renamed).", Required = true };
        var dtype = new Option<string>("--dtype") { Description = "Matrices in f32 or f16 (vectors are always f32).", DefaultValueFactory = _ => "f32" };
        var command = Part(context, "gguf",
            "Write a model as GGUF v3 for llama.cpp's gpt2 architecture (GPT-2 tokenizer, bos/eos 50256), to compare generation speed with llama.cpp.",
            parse =>
            {
                var matrixType = parse.GetValue(dtype) switch
                {
                    "f32" => GgufMatrixType.F32,
                    "f16" => GgufMatrixType.F16,
                    var other => throw new GptException($"--dtype: expected f32 or f16, found '{other}'"),
                };
                var path = parse.GetValue(modelPath);
                using var model = GenerationBench.loadModel(path is null ? null : Microsoft.FSharp.Core.FSharpOption<string>.Some(path));
                var file = Path.GetFullPath(parse.GetValue(output)!);
                var tensors = Bench.Gguf.write(model, matrixType, path ?? "gpt2-small (random weights)", file);
                return new JsonObject
                {
                    ["path"] = file, ["dtype"] = matrixType.Name, ["tensors"] = tensors, ["bytes"] = new FileInfo(file).Length,
                    ["model"] = path ?? "gpt2-small (random weights)", ["parameters"] = model.ParameterCount,
                };
            });
        command.Add(modelPath);
        command.Add(output);
        command.Add(dtype);
        return command;
    }

    private static Command Leak(CliContext context)
    {
        var steps = new Option<int>("--steps") { Description = "Training steps of the small model (the slope is measured from a quarter of them to the end: 500 -> 2,000 by default, past the allocator's settling).", DefaultValueFactory = _ => 2000 };
        var warmup = new Option<int>("--warmup") { Description = "Steps before the first measurement.", DefaultValueFactory = _ => 50 };
        var command = Part(context, "leak",
            "Live tensors and resident memory over many training steps of a small model, with KV-cache generation and evaluation in between. " +
            "rss_slope_pct: resident memory growth from step N = steps/4 to step 4N (a leak keeps growing; the allocator's one-time " +
            "settling after the warm-up, which rss_growth_pct includes, does not).",
            parse =>
            {
                var r = LeakBench.run(parse.GetValue(steps), parse.GetValue(warmup), 123);
                return new JsonObject
                {
                    ["rss_slope_pct"] = Math.Round(r.RssSlopePct, 2), ["rss_growth_pct"] = Math.Round(r.RssGrowthPct, 2),
                    ["live_tensors_growth"] = r.LiveTensorsGrowth, ["slope_from_step"] = r.SlopeStartStep,
                    ["rss_at_slope_start_mb"] = Math.Round(r.RssAtSlopeStartMb, 1),
                    ["steps"] = r.Steps, ["warmup_steps"] = r.WarmupSteps,
                    ["rss_after_warmup_mb"] = Math.Round(r.RssAfterWarmupMb, 1), ["rss_end_mb"] = Math.Round(r.RssEndMb, 1),
                    ["live_tensors_after_warmup"] = r.LiveTensorsAfterWarmup, ["live_tensors_end"] = r.LiveTensorsEnd,
                    ["live_tensors_max"] = r.LiveTensorsMax, ["generations"] = r.Generations, ["evaluations"] = r.Evaluations,
                    ["seconds"] = Math.Round(r.Seconds, 2),
                };
            });
        command.Add(steps);
        command.Add(warmup);
        return command;
    }

    private static Command All(CliContext context, Command bench)
    {
        var quick = new Option<bool>("--quick") { Description = "Tiny sizes: a smoke test of the suite (figures not comparable)." };
        var only = new Option<string?>("--only")
        {
            Description = "Comma-separated labels to run: " + string.Join(", ", Plan.Select(p => p.Label)) + " (default: all).",
        };
        var inProcess = new Option<bool>("--in-process")
        {
            Description = "Run every part in this process (by default each runs in a fresh gpt process, so that no part inherits "
                + "another's memory or allocator state).",
        };
        var format = Commands.FormatOption("json");
        var command = new Command("all", "Every part of the suite in turn, one JSON object per part, then the goals met or not.")
        {
            quick, only, inProcess, format,
        };
        command.SetAction(parse => CliApp.Guard(context, () =>
        {
            var labels = parse.GetValue(only)?.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
            var unknown = labels?.Where(l => Plan.All(p => p.Label != l)).ToList() ?? [];
            if (unknown.Count > 0)
                throw new GptException($"unknown bench part '{unknown[0]}': expected one of {string.Join(", ", Plan.Select(p => p.Label))}");
            // A fresh process per part where this process is the gpt command itself (not a host such as a test runner).
            var self = parse.GetValue(inProcess) ? null : SelfCommand();
            var results = new Dictionary<string, JsonObject>();
            foreach (var (label, partName, options, quickOptions) in Plan)
            {
                if (labels is not null && !labels.Contains(label)) continue;
                var partOptions = parse.GetValue(quick) ? quickOptions : options;
                JsonObject result;
                if (self is { } command)
                {
                    result = RunChild(command.File, [.. command.Prefix, "bench", partName, .. partOptions, "--format", "json"], label);
                    result["part"] = label;
                    result["process"] = "own";
                }
                else
                {
                    var part = bench.Subcommands.OfType<BenchPart>().Single(c => c.Name == partName);
                    result = Measured(label, () => part.Measure(part.Parse(partOptions)));
                    result["process"] = "shared";
                }
                results[label] = result;
                Commands.Print(context, parse.GetValue(format)!, result);
                context.Output.Flush();
            }
            Commands.Print(context, parse.GetValue(format)!, Goals(results, parse.GetValue(quick)));
            return 0;
        }));
        return command;
    }

    /// <summary>How to start this gpt command again: the apphost, or <c>dotnet gpt.dll</c>; null when this process is
    /// something else hosting the CLI (a test runner).</summary>
    internal static (string File, string[] Prefix)? SelfCommand()
    {
        var processPath = Environment.ProcessPath;
        var entry = System.Reflection.Assembly.GetEntryAssembly();
        if (processPath is null || entry is null || entry.GetName().Name != "gpt" || string.IsNullOrEmpty(entry.Location)) return null;
        return Path.GetFileNameWithoutExtension(processPath) == "dotnet" ? (processPath, [entry.Location]) : (processPath, []);
    }

    /// <summary>Runs one part in a child process and returns its JSON object (the last line it printed).</summary>
    private static JsonObject RunChild(string file, IEnumerable<string> arguments, string label)
    {
        var start = new System.Diagnostics.ProcessStartInfo(file)
        {
            RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false,
        };
        foreach (var argument in arguments) start.ArgumentList.Add(argument);
        using var process = System.Diagnostics.Process.Start(start)
            ?? throw new GptException($"bench part '{label}': could not start {file}");
        var error = process.StandardError.ReadToEndAsync();
        var output = process.StandardOutput.ReadToEnd();
        process.WaitForExit();
        var lines = output.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        if (process.ExitCode != 0 || lines.Length == 0)
            throw new GptException($"bench part '{label}' failed (exit code {process.ExitCode}): {error.Result.Trim()}");
        return JsonNode.Parse(lines[^1]) as JsonObject
            ?? throw new GptException($"bench part '{label}' printed no JSON object: {lines[^1]}");
    }

    /// <summary>The goals of the benchmark issue against the figures measured (only those whose parts ran).</summary>
    internal static JsonObject Goals(IReadOnlyDictionary<string, JsonObject> results, bool quick)
    {
        var goals = new JsonArray();
        double? Figure(string label, string key) =>
            !results.TryGetValue(label, out var result) || result[key] is not JsonValue value ? null
            : value.TryGetValue(out double real) ? real
            : value.TryGetValue(out long integer) ? integer
            : value.TryGetValue(out int small) ? small
            : null;
        void Goal(string what, double? figure, string goal, Func<double, bool> met)
        {
            if (figure is { } f) goals.Add(new JsonObject { ["what"] = what, ["figure"] = Math.Round(f, 4), ["goal"] = goal, ["met"] = met(f) });
        }
        // "GB" as 10^9 bytes; peak_rss_mb is in MiB (2^20 bytes).
        const double gigabyteInMib = 1e9 / 1048576;
        Goal("train A: MFU", Figure("train-A", "mfu"), ">= 0.50", f => f >= 0.50);
        Goal("train B: MFU", Figure("train-B", "mfu"), ">= 0.55", f => f >= 0.55);
        Goal("train A: peak RSS (MiB)", Figure("train-A", "peak_rss_mb"), "<= 2289 (2.4 GB)", f => f <= 2.4 * gigabyteInMib);
        Goal("train B: peak RSS (MiB)", Figure("train-B", "peak_rss_mb"), "<= 3242 (3.4 GB)", f => f <= 3.4 * gigabyteInMib);
        Goal("generate gpt2-small, KV cache, 64 new tokens: tokens/s", Figure("generate", "tokens_per_s"), ">= 20", f => f >= 20);
        Goal("generate f32: decoding at this fraction of the memory-bandwidth ceiling", Figure("generate", "bandwidth_fraction"), ">= 0.85", f => f >= 0.85);
        // llama.cpp (LLamaSharp 0.30.0, CPU) on a GGUF of the same weights, this machine, 2026-12-01 (issue 18)
        Goal("generate f16: tokens/s", Figure("generate-f16", "tokens_per_s"), ">= 55.6 (llama.cpp F16 as measured when issue 18 was filed; today side by side: bench/compare-llama.sh)", f => f >= 55.6);
        Goal("generate 256 new tokens: KV cache speed-up", Figure("generate-256", "kv_cache_speedup"), ">= 10", f => f >= 10);
        Goal("tokenizer: MB/s", Figure("tokenizer", "mb_per_s"), ">= 15", f => f >= 15);
        Goal("leak: RSS slope, step N to 4N (%)", Figure("leak", "rss_slope_pct"), "< 1", f => f < 1);
        Goal("leak: live tensors growth", Figure("leak", "live_tensors_growth"), "<= 0", f => f <= 0);
        return new JsonObject { ["part"] = "goals", ["quick"] = quick, ["goals"] = goals };
    }
}
