using Gpt.Plot;
using Gpt.Training;

namespace Gpt;

/// <summary>What a <see cref="TrainingProgress"/> report is about.</summary>
public enum TrainingEventKind
{
    /// <summary>The run is about to take its first step: <see cref="TrainingProgress.TotalSteps"/>,
    /// <see cref="TrainingProgress.ParameterCount"/>, the start step and the run directory
    /// (<see cref="TrainingProgress.Path"/>) are known.</summary>
    Started,
    /// <summary>An optimizer step finished.</summary>
    Step,
    /// <summary>The training and validation losses were measured (eval mode, a few batches of each split).</summary>
    Evaluation,
    /// <summary>An epoch ended; <see cref="TrainingProgress.Sample"/> holds the sample text when a prompt is set.</summary>
    EpochEnd,
    /// <summary>A checkpoint was written to <see cref="TrainingProgress.Path"/>.</summary>
    Checkpoint,
    /// <summary>The final model was written to <see cref="TrainingProgress.Path"/> (Hugging Face layout).</summary>
    ModelSaved,
}

/// <summary>A report on a training run, made on the training thread (a <see cref="Progress{T}"/> passes it on to the
/// context it was created on).</summary>
public sealed record TrainingProgress
{
    /// <summary>What happened.</summary>
    public required TrainingEventKind Kind { get; init; }
    /// <summary>Optimizer steps done (counting those before a resume).</summary>
    public int Step { get; init; }
    /// <summary>Optimizer steps the run will make in all.</summary>
    public int TotalSteps { get; init; }
    /// <summary>The epoch in progress (or just ended), counting from 1.</summary>
    public int Epoch { get; init; }
    /// <summary>Epochs the run will make (the last may be cut short by a step limit).</summary>
    public int Epochs { get; init; }
    /// <summary>Mean loss of the last step's batches, in training mode (with dropout); NaN before the first step.</summary>
    public double TrainLoss { get; init; } = double.NaN;
    /// <summary>The latest evaluation's training-split loss (eval mode); null before the first evaluation.</summary>
    public double? EvaluatedTrainLoss { get; init; }
    /// <summary>The latest evaluation's validation loss; null before the first evaluation.</summary>
    public double? ValidationLoss { get; init; }
    /// <summary>Learning rate of the last step.</summary>
    public double LearningRate { get; init; }
    /// <summary>Global gradient norm of the last step, before clipping (null without clipping).</summary>
    public double? GradientNorm { get; init; }
    /// <summary>Training tokens read so far.</summary>
    public long TokensSeen { get; init; }
    /// <summary>Training throughput of this session, evaluation and samples included.</summary>
    public double TokensPerSecond { get; init; }
    /// <summary>Training time so far, across resumed sessions.</summary>
    public TimeSpan Elapsed { get; init; }
    /// <summary>Estimated time to the last step, from this session's pace; null before the first step.</summary>
    public TimeSpan? Remaining { get; init; }
    /// <summary>Parameters of the model (in <see cref="TrainingEventKind.Started"/> and later reports).</summary>
    public long ParameterCount { get; init; }
    /// <summary>Parameters the run trains (the others are frozen); all of them in pretraining.</summary>
    public long TrainableParameterCount { get; init; }
    /// <summary>The latest evaluation's accuracy on the training and validation batches, for runs whose objective
    /// has right answers (classification); null otherwise.</summary>
    public double? TrainAccuracy { get; init; }
    /// <inheritdoc cref="TrainAccuracy"/>
    public double? ValidationAccuracy { get; init; }
    /// <summary>The prompt and its greedy continuation, at <see cref="TrainingEventKind.EpochEnd"/>.</summary>
    public string? Sample { get; init; }
    /// <summary>The run directory at <see cref="TrainingEventKind.Started"/>; the checkpoint or model directory
    /// written at <see cref="TrainingEventKind.Checkpoint"/> and <see cref="TrainingEventKind.ModelSaved"/>.</summary>
    public string? Path { get; init; }
}

/// <summary>How a training run ended.</summary>
/// <param name="Steps">Optimizer steps done (counting those before a resume).</param>
/// <param name="TotalSteps">Steps the run was planned for.</param>
/// <param name="TokensSeen">Training tokens read.</param>
/// <param name="Cancelled">True when the run stopped early on the cancellation token (a checkpoint was written).</param>
/// <param name="FirstEvaluatedTrainLoss">This session's first evaluation of the training split (after its first step).</param>
/// <param name="TrainLoss">The last evaluation's training-split loss (eval mode); NaN when there was none.</param>
/// <param name="ValidationLoss">The last evaluation's validation loss; NaN when there was none.</param>
/// <param name="BestValidationLoss">The lowest validation loss of the whole run, when any.</param>
/// <param name="LastStepLoss">Mean loss of the last step's batches, in training mode; NaN when no step ran.</param>
/// <param name="RunDirectory">The run's folder: checkpoints/, metrics.jsonl, loss.png, model/, run.json.</param>
/// <param name="ModelDirectory">The final model in the Hugging Face layout (null when no step ran).</param>
/// <param name="CheckpointDirectory">The last checkpoint written, when any.</param>
/// <param name="Elapsed">Training time, across resumed sessions.</param>
public sealed record TrainingResult(
    int Steps, int TotalSteps, long TokensSeen, bool Cancelled, double FirstEvaluatedTrainLoss, double TrainLoss,
    double ValidationLoss, double? BestValidationLoss, double LastStepLoss, string RunDirectory, string? ModelDirectory,
    string? CheckpointDirectory, TimeSpan Elapsed);

/// <summary>
/// Pretraining (book chapter 5 with appendix D): AdamW with weight decay, linear warmup then cosine decay, gradient
/// clipping and accumulation, evaluation every N steps, a sample at every epoch end, checkpoints that lose nothing
/// (keep the last K and the best), <c>metrics.jsonl</c> and <c>loss.png</c>, and the final model in the Hugging Face
/// layout, all under <c>runs/NAME/</c>.
/// </summary>
public static class Trainer
{
    /// <summary>The name of the final model's folder in a run directory.</summary>
    public const string ModelFolder = "model";

    /// <summary>Trains on a dedicated thread (TorchSharp's dispose scopes are per thread) and completes when the run
    /// ends. Cancelling <paramref name="cancellationToken"/> stops the run after the current step, writes a
    /// checkpoint and the model, and completes with <see cref="TrainingResult.Cancelled"/> set: cancellation is an
    /// ordinary way to stop, not an exception.</summary>
    /// <param name="options">What to train and how.</param>
    /// <param name="progress">Receives a report after every step, evaluation, epoch end and checkpoint, on the
    /// training thread (keep the handler short).</param>
    /// <param name="cancellationToken">Stops the run, keeping its work.</param>
    /// <exception cref="GptException">Through the task: bad options, missing or too-short data (the message says how
    /// many tokens are needed), a resume path without a checkpoint, an incompatible checkpoint.</exception>
    /// <remarks>Dropout draws from torch's global generator, which the run seeds and checkpoints: a run is reproducible
    /// (and a resume continues it exactly) when no other code draws from that generator meanwhile, such as a second
    /// run in the same process. A thread of its own gets glibc heaps that are unmapped as they empty: call
    /// <see cref="GptRuntime.TuneNativeAllocator"/> once at start-up (or set MALLOC_ARENA_MAX=1) for the speed of
    /// <see cref="Train(TrainingOptions, IProgress{TrainingProgress}?, CancellationToken)"/> on a program's main thread.</remarks>
    public static Task<TrainingResult> TrainAsync(TrainingOptions options, IProgress<TrainingProgress>? progress = null,
        CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(options);
        return OnThreadOfItsOwn(() => Train(options, progress, cancellationToken));
    }

    /// <summary>Continues training <paramref name="model"/>, in memory, on a thread of its own: the model is trained in
    /// place (its weights are the run's last when the task completes) and stays the caller's to dispose; the run still
    /// writes its folder (checkpoints, metrics, the final model) as <see cref="TrainAsync(TrainingOptions, IProgress{TrainingProgress}?, CancellationToken)"/>
    /// does. Do not use the model elsewhere until the task completes.</summary>
    /// <param name="model">The model to train (its shape is the run's: <see cref="TrainingOptions.Model"/>, when set,
    /// must be the same).</param>
    /// <param name="options">What to train and how; not with <see cref="TrainingOptions.InitFrom"/>,
    /// <see cref="RunSettings.ResumeFrom"/> or LoRA.</param>
    /// <param name="progress">As for the other overload.</param>
    /// <param name="cancellationToken">Stops the run, keeping its work.</param>
    public static Task<TrainingResult> TrainAsync(GptModel model, TrainingOptions options, IProgress<TrainingProgress>? progress = null,
        CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(options);
        return OnThreadOfItsOwn(() => Train(model, options, progress, cancellationToken));
    }

    /// <summary>Runs a training run on a dedicated thread (TorchSharp's dispose scopes are per thread).</summary>
    internal static Task<T> OnThreadOfItsOwn<T>(Func<T> run)
    {
        var completion = new TaskCompletionSource<T>(TaskCreationOptions.RunContinuationsAsynchronously);
        var thread = new Thread(() =>
        {
            try
            {
                completion.SetResult(run());
            }
            catch (Exception e)
            {
                completion.SetException(e);
            }
        })
        {
            IsBackground = true,
            Name = "gpt-train",
        };
        thread.Start();
        return completion.Task;
    }

    /// <summary>The smallest number of tokens that gives both splits one window of <paramref name="contextLength"/>
    /// tokens (plus the one target token after it).</summary>
    public static int TokensNeeded(int contextLength, double trainRatio) => Run.tokensNeeded(contextLength, trainRatio);

    /// <summary>Trains on the calling thread, which is busy until the run ends: what <see cref="TrainAsync(TrainingOptions, IProgress{TrainingProgress}?, CancellationToken)"/> does on a
    /// thread of its own. For a program's main thread, which has nothing else to do (the <c>gpt</c> command line): on
    /// Linux, glibc serves the main thread from its main heap, where freed blocks are kept for reuse; another thread
    /// gets a heap of its own, which glibc unmaps as it empties, so the same step page-faults several times as much
    /// (measured: 19,000 against 113,000 page faults per step of the default run). Never call it from a thread-pool
    /// thread inside async code.</summary>
    /// <inheritdoc cref="TrainAsync(TrainingOptions, IProgress{TrainingProgress}?, CancellationToken)" path="/param"/>
    /// <inheritdoc cref="TrainAsync(TrainingOptions, IProgress{TrainingProgress}?, CancellationToken)" path="/exception"/>
    /// <inheritdoc cref="TrainAsync(TrainingOptions, IProgress{TrainingProgress}?, CancellationToken)" path="/remarks"/>
    public static TrainingResult Train(TrainingOptions options, IProgress<TrainingProgress>? progress = null,
        CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(options);
        return Facade.Guard(() => ToResult(Run.pretrain(options.ToFSharp(), Reporter(progress), cancellationToken)));
    }

    /// <summary>Continues training <paramref name="model"/>, in memory, on the calling thread (see
    /// <see cref="TrainAsync(GptModel, TrainingOptions, IProgress{TrainingProgress}?, CancellationToken)"/>).</summary>
    /// <exception cref="GptException">As for the other overload; also a model with another shape than
    /// <see cref="TrainingOptions.Model"/>, and InitFrom, ResumeFrom or LoRA given with it.</exception>
    public static TrainingResult Train(GptModel model, TrainingOptions options, IProgress<TrainingProgress>? progress = null,
        CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(options);
        if (options.Texts is { } texts && texts.Any(t => t is null)) throw new ArgumentNullException(nameof(options), "TrainingOptions.Texts holds a null text");
        return ToResult(Run.pretrain(options.ToFSharp(model), Reporter(progress), cancellationToken));
    }

    /// <summary>The core's run reports as <see cref="TrainingProgress"/>, with the run's plots (loss.png, and
    /// accuracy.png for classification) redrawn at every checkpoint.</summary>
    internal static Microsoft.FSharp.Core.FSharpFunc<RunProgress, Microsoft.FSharp.Core.Unit> Reporter(IProgress<TrainingProgress>? progress)
    {
        var next = Microsoft.FSharp.Core.FuncConvert.FromAction<RunProgress>(p => progress?.Report(ToProgress(p)));
        return Microsoft.FSharp.Core.FuncConvert.FromAction<RunProgress>(p => Plots.follow(next, p));
    }

    internal static TrainingProgress ToProgress(RunProgress p) => new()
    {
        Kind = p.Kind.Tag switch
        {
            RunEventKind.Tags.Started => TrainingEventKind.Started, RunEventKind.Tags.Step => TrainingEventKind.Step,
            RunEventKind.Tags.Evaluation => TrainingEventKind.Evaluation, RunEventKind.Tags.EpochEnd => TrainingEventKind.EpochEnd,
            RunEventKind.Tags.Checkpoint => TrainingEventKind.Checkpoint, _ => TrainingEventKind.ModelSaved,
        },
        Step = p.Step, TotalSteps = p.TotalSteps, Epoch = p.Epoch, Epochs = p.Epochs, TrainLoss = p.TrainLoss,
        EvaluatedTrainLoss = Options.ToNullable(p.EvaluatedTrainLoss), ValidationLoss = Options.ToNullable(p.ValidationLoss),
        TrainAccuracy = Options.ToNullable(p.TrainAccuracy), ValidationAccuracy = Options.ToNullable(p.ValidationAccuracy),
        LearningRate = p.LearningRate, GradientNorm = Options.ToNullable(p.GradientNorm), TokensSeen = p.TokensSeen,
        TokensPerSecond = p.TokensPerSecond, Elapsed = p.Elapsed, Remaining = Options.ToNullable(p.Remaining),
        ParameterCount = p.ParameterCount, TrainableParameterCount = p.TrainableParameterCount,
        Sample = Options.ToObject(p.Sample), Path = Options.ToObject(p.Path),
    };

    internal static TrainingResult ToResult(RunResult r) => new(
        r.Steps, r.TotalSteps, r.TokensSeen, r.Cancelled, r.FirstEvaluatedTrainLoss, r.TrainLoss, r.ValidationLoss,
        Options.ToNullable(r.BestValidationLoss), r.LastStepLoss, r.RunDirectory, Options.ToObject(r.ModelDirectory),
        Options.ToObject(r.CheckpointDirectory), r.Elapsed);
}
