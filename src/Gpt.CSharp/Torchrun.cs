using Gpt.Training;
using FTorchrun = Gpt.Training.Torchrun;
using FTorchrunOptions = Gpt.Training.TorchrunOptions;

namespace Gpt;

/// <summary>How the model is spread over torchrun's processes.</summary>
public enum ShardingStrategy
{
    /// <summary>DistributedDataParallel: every process holds the whole model; gradients are averaged.</summary>
    Ddp,
    /// <summary>FullyShardedDataParallel: every process holds a shard of each block's parameters, gradients and optimizer
    /// state (models that do not fit one device; PyTorch 2.1 or later).</summary>
    Fsdp,
}

/// <summary>Where and how torchrun trains a run (<c>gpt train --engine torchrun</c>). The batch size of the
/// <see cref="TrainingOptions"/> stays the global batch: each of the <see cref="ProcessesPerNode"/> ×
/// <see cref="Nodes"/> processes takes its equal share of every batch, so the run trains the model an in-process run
/// trains from the same data order.</summary>
public sealed record TorchrunSettings
{
    private static readonly FTorchrunOptions D = TorchrunOptionsModule.defaults;

    /// <summary>Processes on this machine: one per GPU, or CPU processes.</summary>
    public int ProcessesPerNode { get; init; } = D.ProcessesPerNode;

    /// <summary>Machines in the job.</summary>
    public int Nodes { get; init; } = D.Nodes;

    /// <summary>This machine's index, from 0 (node 0 hosts the rendezvous).</summary>
    public int NodeRank { get; init; } = D.NodeRank;

    /// <summary>Node 0's address; needed with more than one node. Null on one node: it rendezvous on its own.</summary>
    public string? MasterAddress { get; init; }

    /// <summary>Node 0's rendezvous port (null: 29500).</summary>
    public int? MasterPort { get; init; }

    /// <summary>DDP (the default) or FSDP.</summary>
    public ShardingStrategy Strategy { get; init; } = ShardingStrategy.Ddp;

    /// <summary><c>auto</c> (NCCL when PyTorch sees CUDA GPUs, else gloo), <c>nccl</c> or <c>gloo</c> (CPU).</summary>
    public string Backend { get; init; } = D.Backend;

    /// <summary>The Python interpreter that has PyTorch and numpy (its <c>-m torch.distributed.run</c> is
    /// torchrun).</summary>
    public string Python { get; init; } = D.Python;

    internal FTorchrunOptions ToFSharp() => new(
        ProcessesPerNode, Nodes, NodeRank, Options.SomeObject(MasterAddress), Options.Some(MasterPort),
        Strategy == ShardingStrategy.Fsdp ? Training.ShardingStrategy.Fsdp : Training.ShardingStrategy.Ddp,
        Backend ?? throw new ArgumentNullException(nameof(Backend)), Python ?? throw new ArgumentNullException(nameof(Python)),
        D.ShardTokens);
}

/// <summary>A run prepared for torchrun and the command that launches it on this node.</summary>
/// <param name="RunDirectory">The run's folder: checkpoints/, metrics.jsonl and model/ appear there.</param>
/// <param name="Folder">The prepared files (<c>RUN/torchrun</c>): options.json, token shards, order.bin, init/, train.py.</param>
/// <param name="Program">The launcher: the Python interpreter.</param>
/// <param name="Arguments">Its arguments: <c>-m torch.distributed.run … train.py --options options.json</c>.</param>
/// <param name="CommandLine">The same as a shell command line, to run on each node (Slurm, by hand).</param>
/// <param name="TotalSteps">Optimizer steps the run will have made at its end.</param>
public sealed record TorchrunCommand(
    string RunDirectory, string Folder, string Program, IReadOnlyList<string> Arguments, string CommandLine, int TotalSteps);

/// <summary>
/// Training past one machine: the run is handed to PyTorch's torchrun (DDP or FSDP, NCCL on GPUs, gloo on CPUs) and
/// taken back. <see cref="Prepare"/> writes what the Python side reads (the text as token shards, the batch order,
/// the model in the Hugging Face layout, the options as JSON, the script); <see cref="Train"/> also launches torchrun
/// on this node and reports its progress like <see cref="Trainer.Train(TrainingOptions, IProgress{TrainingProgress}?, CancellationToken)"/>. The run folder is the one an in-process
/// run makes: <see cref="GptModel.Load(string)"/> reads its model, <see cref="TrainingOptions.FromCheckpoint"/> resumes it
/// in process or with torchrun again.
/// </summary>
/// <remarks>Dropout cannot draw the same masks in PyTorch's processes as in this process: with a drop rate of 0 both
/// engines train the same model (the test checks per-step losses and logits within 1e-4).</remarks>
public static class Torchrun
{
    /// <summary>Prepares the run without launching anything: for a cluster scheduler, run
    /// <see cref="TorchrunCommand.CommandLine"/> on every node (with that node's rank). Needs no Python; when the
    /// interpreter is there, it is asked whether its torchrun needs a workaround (PyTorch 1.13 on Python 3.11).</summary>
    /// <exception cref="GptException">Bad options, a global batch that the processes cannot share evenly, missing or too
    /// short data, an incompatible checkpoint to resume.</exception>
    public static TorchrunCommand Prepare(TrainingOptions options, TorchrunSettings settings)
    {
        ArgumentNullException.ThrowIfNull(options);
        ArgumentNullException.ThrowIfNull(settings);
        var torchrun = settings.ToFSharp();
        var run = FTorchrun.prepare(options.ToFSharp(), torchrun);
        // When this machine has the interpreter, the command carries what its torchrun needs (PyTorch 1.13 on Python
        // 3.11); without it (a login node), the plain command.
        var (program, arguments) = FTorchrun.commandFor(run, FTorchrun.tryCheckPython(torchrun), false).ToValueTuple();
        return new TorchrunCommand(run.RunDirectory, run.Folder, program, arguments.ToArray(),
            FTorchrun.commandLine(program, arguments), run.TotalSteps);
    }

    /// <summary>Trains with torchrun on this node and returns when the run ends. Cancelling
    /// <paramref name="cancellationToken"/> asks every process to stop after its current step; they write a checkpoint
    /// and the model so far, and the result has <see cref="TrainingResult.Cancelled"/> set.</summary>
    /// <param name="options">What to train and how, as for <see cref="Trainer.Train(TrainingOptions, IProgress{TrainingProgress}?, CancellationToken)"/>.</param>
    /// <param name="settings">The processes, nodes, strategy and Python.</param>
    /// <param name="progress">Receives the run's reports, as from <see cref="Trainer.Train(TrainingOptions, IProgress{TrainingProgress}?, CancellationToken)"/>.</param>
    /// <param name="log">Receives torchrun's and the workers' other output, line by line (warnings, errors).</param>
    /// <param name="cancellationToken">Stops the run, keeping its work.</param>
    /// <exception cref="GptException">What <see cref="Prepare"/> refuses; a missing Python, PyTorch, torchrun or numpy
    /// (the message names what to install); torchrun failing (with its last lines).</exception>
    public static TrainingResult Train(TrainingOptions options, TorchrunSettings settings, IProgress<TrainingProgress>? progress = null,
        Action<string>? log = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(options);
        ArgumentNullException.ThrowIfNull(settings);
        var logLine = Microsoft.FSharp.Core.FuncConvert.FromAction<string>(line => log?.Invoke(line));
        return Trainer.ToResult(FTorchrun.train(options.ToFSharp(), settings.ToFSharp(), Trainer.Reporter(progress), logLine,
            cancellationToken));
    }

    /// <summary><see cref="Train"/> on a thread of its own.</summary>
    /// <inheritdoc cref="Train" path="/param"/>
    /// <inheritdoc cref="Train" path="/exception"/>
    public static Task<TrainingResult> TrainAsync(TrainingOptions options, TorchrunSettings settings,
        IProgress<TrainingProgress>? progress = null, Action<string>? log = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(options);
        ArgumentNullException.ThrowIfNull(settings);
        return Trainer.OnThreadOfItsOwn(() => Train(options, settings, progress, log, cancellationToken));
    }
}
