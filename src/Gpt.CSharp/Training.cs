using Gpt.Model;
using Gpt.Training;
using FCheckpoint = Gpt.Training.Checkpoint;
using FCorpus = Gpt.Text.Corpus;
using FGptModel = Gpt.Model.GptModel;
using FTrainer = Gpt.Training.Trainer;
using FTrainerOptions = Gpt.Training.TrainerOptions;
using FTrainingData = Gpt.Training.TrainingDataModule;
using FTrainingResult = Gpt.Training.TrainingResult;

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
    /// run in the same process.</remarks>
    public static Task<TrainingResult> TrainAsync(TrainingOptions options, IProgress<TrainingProgress>? progress = null,
        CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(options);
        var completion = new TaskCompletionSource<TrainingResult>(TaskCreationOptions.RunContinuationsAsynchronously);
        var thread = new Thread(() =>
        {
            try
            {
                completion.SetResult(Train(options, progress, cancellationToken));
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
    public static int TokensNeeded(int contextLength, double trainRatio)
    {
        var window = contextLength + 1;
        var n = (int)Math.Ceiling(window / Math.Min(trainRatio, 1 - trainRatio));
        while (n > window && Fits(n - 1)) n--;
        while (!Fits(n)) n++;
        return n;

        bool Fits(int count)
        {
            var train = (int)(trainRatio * count);
            return train >= window && count - train >= window;
        }
    }

    /// <summary>Trains on the calling thread, which is busy until the run ends: what <see cref="TrainAsync"/> does on a
    /// thread of its own. For a program's main thread, which has nothing else to do (the <c>gpt</c> command line): on
    /// Linux, glibc serves the main thread from its main heap, where freed blocks are kept for reuse; another thread
    /// gets a heap of its own, which glibc unmaps as it empties, so the same step page-faults several times as much
    /// (measured: 19,000 against 113,000 page faults per step of the default run; setting MALLOC_ARENA_MAX=1 in the
    /// environment also avoids it). Never call it from a thread-pool thread inside async code.</summary>
    /// <inheritdoc cref="TrainAsync" path="/param"/>
    /// <inheritdoc cref="TrainAsync" path="/exception"/>
    /// <inheritdoc cref="TrainAsync" path="/remarks"/>
    public static TrainingResult Train(TrainingOptions options, IProgress<TrainingProgress>? progress = null,
        CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(options);
        GptRuntime.TuneNativeAllocator();
        return Run(options, progress, cancellationToken);
    }

    private static TrainingResult Run(TrainingOptions options, IProgress<TrainingProgress>? progress, CancellationToken token)
    {
        if (options.ResumeFrom is not null && options.InitFrom is not null)
            throw new GptException("resume a run or start one from a model, not both: --resume continues a run with its own model, --init-from starts a new run");
        if (!(options.TrainRatio > 0 && options.TrainRatio < 1))
            throw new GptException($"the training ratio must be between 0 and 1 (exclusive), found {options.TrainRatio}");
        if (options.Name is { } name && (name.Length == 0 || name.IndexOfAny(System.IO.Path.GetInvalidFileNameChars()) >= 0 || name is "." or ".."))
            throw new GptException($"the run name '{name}' is not a valid folder name");
        if (options.OutputDirectory is null) throw new GptException("the output directory is not set");

        var tokenizer = Tokenizer.Gpt2.Inner;
        string runDirectory;
        string? resumeFrom = null;
        FGptModel model;
        if (options.ResumeFrom is { } resume)
        {
            resumeFrom = FCheckpoint.resolve(resume);
            runDirectory = TrainingOptions.RunDirectoryOf(resumeFrom);
            model = FCheckpoint.loadGpt(resumeFrom);
        }
        else
        {
            runDirectory = System.IO.Path.GetFullPath(System.IO.Path.Combine(options.OutputDirectory, options.Name ?? DefaultName(options.OutputDirectory)));
            var checkpoints = System.IO.Path.Combine(runDirectory, "checkpoints");
            if (FCheckpoint.list(checkpoints).Length > 0)
                throw new GptException($"'{runDirectory}' already holds a run: resume it (--resume {runDirectory}) or choose another name");
            model = options.InitFrom is { } init ? ModelSource.load(init)
                : options.Initialization == ModelInitialization.TorchDefaults ? FGptModel.WithTorchDefaults(options.Model.ToFSharp(), options.Seed)
                : new FGptModel(options.Model.ToFSharp(), Options.Some<long>(options.Seed));
        }
        try
        {
            var config = model.Config;
            var contextLength = options.ContextLength ?? config.ContextLength;
            if (contextLength < 1 || contextLength > config.ContextLength)
                throw new GptException($"the training context length {contextLength} must be between 1 and the model's context length {config.ContextLength}");
            if (config.VocabSize < tokenizer.VocabularySize)
                throw new GptException($"the model's vocabulary has {config.VocabSize} tokens; GPT-2's tokenizer needs {tokenizer.VocabularySize}");
            var documents = options.Data is null ? [FCorpus.builtIn.Value] : FCorpus.load(options.Data);
            var source = options.Data ?? "the built-in story";
            var needed = TokensNeeded(contextLength, options.TrainRatio);
            var advice = $"at least {needed} are needed for context length {contextLength} with a {options.TrainRatio.ToString("P0", System.Globalization.CultureInfo.InvariantCulture)} " +
                         $"training split ({contextLength + 1} tokens in each split): use more text or a shorter context length";
            if (documents.All(d => d.Text.Length == 0)) throw new GptException($"the text is empty ({source}): {advice}");
            var ids = FCorpus.encode(tokenizer, 0, documents);
            if (ids.Length < needed) throw new GptException($"the text is too short ({source}): it has {ids.Length} tokens, {advice}");
            var data = FTrainingData.forGpt(config, tokenizer, options.TrainRatio, ids);
            var minimum = options.MinLearningRate ?? options.LearningRate / 10;
            var trainerOptions = new FTrainerOptions(
                epochs: options.Epochs, maxSteps: Options.Some(options.MaxSteps), batchSize: options.BatchSize,
                contextLength: contextLength, stride: options.Stride ?? contextLength, learningRate: options.LearningRate,
                initialLearningRate: options.InitialLearningRate ?? minimum, minLearningRate: minimum,
                warmupSteps: options.WarmupSteps, weightDecay: options.WeightDecay, decayAll: options.DecayAll,
                beta1: options.Beta1, beta2: options.Beta2, gradientClip: Options.Some(options.GradientClip),
                gradientAccumulation: options.GradientAccumulation, evalInterval: options.EvalInterval,
                evalBatches: options.EvalBatches, seed: options.Seed, outputDirectory: Options.SomeObject(runDirectory),
                checkpointInterval: options.CheckpointInterval, keepLast: options.KeepLast,
                samplePrompt: Options.SomeObject(options.SamplePrompt), sampleTokens: options.SampleTokens);
            TrainerOptionsModule.validate(trainerOptions);
            if (resumeFrom is null) RunFile.Write(runDirectory, options, options.InitFrom);

            var reporter = new Reporter(progress, options.Epochs, model.ParameterCount, runDirectory);
            var result = FTrainer.train(trainerOptions, model, data, Options.SomeObject(resumeFrom),
                Microsoft.FSharp.Core.FuncConvert.FromAction<TrainingEvent>(reporter.On), token);

            string? modelDirectory = null;
            if (result.Steps > 0)
            {
                modelDirectory = System.IO.Path.Combine(runDirectory, ModelFolder);
                model.eval();
                Pretrained.save(modelDirectory, model);
                reporter.Report(TrainingEventKind.ModelSaved, modelDirectory);
            }
            return Result(result, reporter, runDirectory, modelDirectory);
        }
        finally
        {
            model.Dispose();
        }
    }

    private static TrainingResult Result(FTrainingResult r, Reporter reporter, string runDirectory, string? modelDirectory)
    {
        var evaluations = r.Evaluations;
        var last = evaluations.Length > 0 ? evaluations[^1] : null;
        return new TrainingResult(
            r.Steps, r.TotalSteps, r.TokensSeen, r.Cancelled,
            FirstEvaluatedTrainLoss: evaluations.Length > 0 ? evaluations[0].TrainLoss : double.NaN,
            TrainLoss: last?.TrainLoss ?? double.NaN,
            ValidationLoss: last?.ValidationLoss ?? double.NaN,
            BestValidationLoss: Options.ToNullable(r.BestValidationLoss),
            LastStepLoss: r.LastTrainLoss,
            RunDirectory: runDirectory,
            ModelDirectory: modelDirectory,
            CheckpointDirectory: Options.ToObject(r.Checkpoint),
            Elapsed: reporter.Latest.Elapsed);
    }

    /// <summary>run-yyyyMMdd-HHmmss, with -2, -3, ... when that folder exists.</summary>
    private static string DefaultName(string outputDirectory)
    {
        var stem = $"run-{DateTime.Now:yyyyMMdd-HHmmss}";
        var name = stem;
        for (var i = 2; Directory.Exists(System.IO.Path.Combine(outputDirectory, name)); i++) name = $"{stem}-{i}";
        return name;
    }

    /// <summary>Turns the core's events into <see cref="TrainingProgress"/> reports, carrying the latest values
    /// from one report to the next.</summary>
    private sealed class Reporter(IProgress<TrainingProgress>? progress, int epochs, long parameterCount, string runDirectory)
    {
        public TrainingProgress Latest { get; private set; } =
            new() { Kind = TrainingEventKind.Started, Epochs = epochs, ParameterCount = parameterCount, Epoch = 1 };

        public void On(TrainingEvent e)
        {
            switch (e)
            {
                case TrainingEvent.Started started:
                    var plan = started.Item;
                    var tokens = plan.StartStep * plan.TokensPerStep;
                    Latest = Latest with { Step = plan.StartStep, TotalSteps = plan.TotalSteps, ParameterCount = plan.ParameterCount, TokensSeen = tokens };
                    Latest = Latest with { Kind = TrainingEventKind.Started };
                    progress?.Report(Latest with { Path = runDirectory });
                    break;
                case TrainingEvent.Stepped stepped:
                    var p = stepped.Item;
                    Latest = Latest with
                    {
                        Step = p.Step, TotalSteps = p.TotalSteps, Epoch = p.Epoch, Epochs = p.Epochs, TrainLoss = p.TrainLoss,
                        LearningRate = p.LearningRate, GradientNorm = Options.ToNullable(p.GradientNorm), TokensSeen = p.TokensSeen,
                        TokensPerSecond = p.TokensPerSecond, Elapsed = p.Elapsed, Remaining = p.Remaining,
                    };
                    Emit(TrainingEventKind.Step);
                    break;
                case TrainingEvent.Evaluated evaluated:
                    var record = evaluated.Item;
                    Latest = Latest with
                    {
                        EvaluatedTrainLoss = Finite(record.TrainLoss), ValidationLoss = Finite(record.ValidationLoss),
                        Elapsed = TimeSpan.FromSeconds(record.ElapsedSeconds),
                    };
                    Emit(TrainingEventKind.Evaluation);
                    break;
                case TrainingEvent.EpochEnded ended:
                    progress?.Report(Latest with { Kind = TrainingEventKind.EpochEnd, Epoch = ended.epoch, Sample = Options.ToObject(ended.sample) });
                    break;
                case TrainingEvent.CheckpointSaved saved:
                    Report(TrainingEventKind.Checkpoint, saved.directory);
                    break;
            }
        }

        public void Report(TrainingEventKind kind, string path) => progress?.Report(Latest with { Kind = kind, Path = path });

        private void Emit(TrainingEventKind kind)
        {
            Latest = Latest with { Kind = kind };
            progress?.Report(Latest);
        }

        private static double? Finite(double value) => double.IsFinite(value) ? value : null;
    }
}
