using System.CommandLine;
using System.Text.Json.Nodes;

namespace Gpt.Cli;

/// <summary><c>gpt train --engine torchrun</c>: the options that hand a run to PyTorch's torchrun, and the dry run that
/// only prepares it and prints the command.</summary>
internal sealed class TorchrunCliOptions
{
    private static readonly TorchrunSettings Defaults = new();

    public Option<string> Engine { get; } = new("--engine")
    {
        Description = "dotnet (this process, TorchSharp) or torchrun (PyTorch's distributed training: DDP or FSDP over processes, GPUs " +
                      "and machines; needs Python with PyTorch). The run folder is the same either way.",
        DefaultValueFactory = _ => "dotnet",
    };
    public Option<int> ProcessesPerNode { get; } = new("--nproc-per-node") { Description = "torchrun: processes on this machine (one per GPU). --batch-size stays the global batch, shared evenly.", DefaultValueFactory = _ => Defaults.ProcessesPerNode };
    public Option<int> Nodes { get; } = new("--nnodes") { Description = "torchrun: machines in the job.", DefaultValueFactory = _ => Defaults.Nodes };
    public Option<int> NodeRank { get; } = new("--node-rank") { Description = "torchrun: this machine's index, from 0.", DefaultValueFactory = _ => Defaults.NodeRank };
    public Option<string?> MasterAddress { get; } = new("--master-addr") { Description = "torchrun: node 0's address (needed with --nnodes above 1)." };
    public Option<int?> MasterPort { get; } = new("--master-port") { Description = "torchrun: node 0's rendezvous port (default 29500)." };
    public Option<string> Strategy { get; } = new("--strategy") { Description = "torchrun: ddp (every process holds the model) or fsdp (sharded; PyTorch 2.1+).", DefaultValueFactory = _ => "ddp" };
    public Option<string> Backend { get; } = new("--backend") { Description = "torchrun: auto (nccl with CUDA GPUs, else gloo), nccl or gloo (CPU).", DefaultValueFactory = _ => Defaults.Backend };
    public Option<string> Python { get; } = new("--python")
    {
        Description = "torchrun: the Python that has PyTorch and numpy (default: $GPT_PYTHON, else python3 on the PATH).",
        DefaultValueFactory = _ => Environment.GetEnvironmentVariable("GPT_PYTHON") is { Length: > 0 } python ? python : Defaults.Python,
    };
    public Option<bool> DryRun { get; } = new("--dry-run") { Description = "torchrun: prepare the run folder and print the command for each node (Slurm, by hand) instead of launching it." };

    public TorchrunCliOptions()
    {
        Engine.AcceptOnlyFromAmong("dotnet", "torchrun");
        Strategy.AcceptOnlyFromAmong("ddp", "fsdp");
        Backend.AcceptOnlyFromAmong("auto", "nccl", "gloo");
    }

    private IEnumerable<Option> TorchrunOnly => [ProcessesPerNode, Nodes, NodeRank, MasterAddress, MasterPort, Strategy, Backend, Python, DryRun];

    public void AddTo(Command command)
    {
        command.Add(Engine);
        foreach (var option in TorchrunOnly) command.Add(option);
    }

    /// <summary>The torchrun settings, or null for the in-process engine (which refuses torchrun's options).</summary>
    public TorchrunSettings? Read(ParseResult parse)
    {
        if (parse.GetValue(Engine) != "torchrun")
        {
            var given = TorchrunOnly.FirstOrDefault(o => parse.GetResult(o) is { Implicit: false });
            if (given is not null) throw new GptException($"{given.Name} needs --engine torchrun");
            return null;
        }
        return new TorchrunSettings
        {
            ProcessesPerNode = parse.GetValue(ProcessesPerNode), Nodes = parse.GetValue(Nodes), NodeRank = parse.GetValue(NodeRank),
            MasterAddress = parse.GetValue(MasterAddress), MasterPort = parse.GetValue(MasterPort),
            Strategy = parse.GetValue(Strategy) == "fsdp" ? ShardingStrategy.Fsdp : ShardingStrategy.Ddp,
            Backend = parse.GetValue(Backend)!, Python = parse.GetValue(Python)!,
        };
    }

    /// <summary>The command that continues a stopped torchrun run, as the cancel message prints it.</summary>
    public static string ResumeCommand(TorchrunSettings settings) =>
        $"train --engine torchrun --nproc-per-node {settings.ProcessesPerNode}" +
        (settings.Nodes > 1 ? $" --nnodes {settings.Nodes} --node-rank {settings.NodeRank}" : "") +
        (settings.Nodes > 1 && settings.MasterAddress is { } address ? $" --master-addr {CommandHints.Quote(address)}" : "") +
        (settings.Python != Defaults.Python ? $" --python {CommandHints.Quote(settings.Python)}" : "");

    /// <summary>--dry-run: prepares the run and prints the command (JSON: one "prepared" object).</summary>
    public static int PrintDryRun(CliContext context, bool json, TorchrunSettings settings, TorchrunCommand prepared)
    {
        if (json)
        {
            var result = new JsonObject
            {
                ["event"] = "prepared", ["run"] = prepared.RunDirectory, ["folder"] = prepared.Folder, ["total_steps"] = prepared.TotalSteps,
                ["program"] = prepared.Program, ["arguments"] = new JsonArray(prepared.Arguments.Select(a => (JsonNode?)a).ToArray()),
                ["command"] = prepared.CommandLine,
            };
            context.Output.WriteLine(result.ToJsonString(Json.Options));
            return 0;
        }
        context.Output.WriteLine($"prepared {prepared.Folder} for {prepared.TotalSteps} steps ({settings.ProcessesPerNode * settings.Nodes} processes)");
        context.Output.WriteLine(settings.Nodes > 1
            ? $"run on every node, each with its own --node_rank (0 .. {settings.Nodes - 1}); this is node {settings.NodeRank}'s:"
            : "run:");
        context.Output.WriteLine($"  {prepared.CommandLine}");
        context.Output.WriteLine($"then: {CommandHints.Gpt($"generate --model {CommandHints.Quote(Path.Combine(prepared.RunDirectory, Trainer.ModelFolder))}")}, " +
                                 $"or {CommandHints.Gpt($"train --resume {CommandHints.Quote(prepared.RunDirectory)}")}");
        return 0;
    }
}
