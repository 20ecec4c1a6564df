using System.CommandLine;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace Gpt.Cli;

/// <summary><c>gpt bench</c>: the benchmark suite, each part with <c>--format json</c>.</summary>
internal static class BenchCommand
{
    /// <summary>Parts added by later stages (train, generate, leak).</summary>
    internal static readonly List<Func<CliContext, Command>> Parts = [];

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
        foreach (var part in Parts) command.Add(part(context));
        return command;
    }

    internal static Option<string> FormatOption() => Commands.FormatOption();

    /// <summary>A bench part: runs <paramref name="measure"/> and prints its JSON object (or key: value lines).</summary>
    internal static Command Part(CliContext context, string name, string description, Func<ParseResult, JsonObject> measure)
    {
        var format = FormatOption();
        var command = new Command(name, description) { format };
        command.SetAction(parse => CliApp.Guard(context, () =>
        {
            var result = measure(parse);
            result["machine"] = Machine(Benchmarks.Describe());
            Commands.Print(context, parse.GetValue(format)!, result);
            return 0;
        }));
        return command;
    }

    internal static JsonObject Machine(MachineDescription m) => new()
    {
        ["cpu"] = m.Cpu, ["logical_cores"] = m.LogicalCores, ["torch_threads"] = m.TorchThreads,
        ["memory_gib"] = m.MemoryGiB, ["os"] = m.Os, ["dotnet"] = m.Runtime, ["torchsharp"] = m.TorchSharp,
        ["load_average"] = m.LoadAverage, ["native_allocator_tuned"] = GptRuntime.NativeAllocatorTuned,
    };

    private static JsonObject Machine()
    {
        var result = Benchmarks.Machine();
        return new JsonObject { ["matmul_gflops"] = result.MatmulGflops, ["bandwidth_gbps"] = result.BandwidthGbps };
    }

    private static Command Train(CliContext context)
    {
        var preset = new Option<string>("--preset") { Description = "A (256 dims, 4 layers, batch 8 × 256) or B (gpt2-small, 163M, batch 1 × 256).", DefaultValueFactory = _ => "A" };
        var warmup = new Option<int>("--warmup") { Description = "Untimed steps first.", DefaultValueFactory = _ => 2 };
        var steps = new Option<int>("--steps") { Description = "Timed steps (the median is reported).", DefaultValueFactory = _ => 5 };
        var command = Part(context, "train", "Training speed: tokens/s, model FLOPs utilisation (MFU) against this machine's matmul speed, peak RSS.",
            parse =>
            {
                var r = Benchmarks.Train(parse.GetValue(preset)!, parse.GetValue(warmup), parse.GetValue(steps));
                var b = r.Breakdown;
                return new JsonObject
                {
                    ["tokens_per_s"] = Math.Round(r.TokensPerSecond, 1), ["mfu"] = Math.Round(r.Mfu, 4), ["peak_rss_mb"] = Math.Round(r.PeakRssMb),
                    ["preset"] = r.Preset, ["batch_size"] = r.BatchSize, ["sequence_length"] = r.SequenceLength,
                    ["parameters"] = r.Parameters, ["matrix_parameters"] = r.MatrixParameters, ["flops_per_token"] = r.FlopsPerToken,
                    ["matmul_gflops"] = Math.Round(r.MatmulGflops, 1), ["step_s"] = Math.Round(r.StepSeconds, 4),
                    ["step_times_s"] = new JsonArray(r.StepTimes.Select(t => (JsonNode)Math.Round(t, 4)).ToArray()),
                    ["breakdown_s"] = new JsonObject
                    {
                        ["zero_grad"] = Math.Round(b.ZeroGradSeconds, 4), ["forward"] = Math.Round(b.ForwardSeconds, 4),
                        ["backward"] = Math.Round(b.BackwardSeconds, 4),
                        ["optimizer"] = Math.Round(b.OptimizerSeconds, 4),
                    },
                    ["tensors_per_step"] = r.TensorsPerStep, ["page_faults_per_step"] = r.PageFaultsPerStep,
                    ["warmup_steps"] = r.WarmupSteps, ["timed_steps"] = r.TimedSteps,
                    ["first_loss"] = Math.Round(r.FirstLoss, 4), ["last_loss"] = Math.Round(r.LastLoss, 4),
                };
            });
        command.Add(preset);
        command.Add(warmup);
        command.Add(steps);
        return command;
    }

    private static JsonObject Tokenizer(double megabytes)
    {
        var result = Benchmarks.Tokenizer(megabytes);
        return new JsonObject
        {
            ["mb_per_s"] = result.MegabytesPerSecond, ["megabytes"] = result.Megabytes,
            ["tokens"] = result.Tokens, ["seconds"] = result.Seconds,
        };
    }
}
