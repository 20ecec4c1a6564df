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
    };

    private static JsonObject Machine()
    {
        var result = Benchmarks.Machine();
        return new JsonObject { ["matmul_gflops"] = result.MatmulGflops, ["bandwidth_gbps"] = result.BandwidthGbps };
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
