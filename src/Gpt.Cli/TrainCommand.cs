using System.CommandLine;
using System.Globalization;
using System.Text.Json.Nodes;
using Spectre.Console;
using Spectre.Console.Rendering;

namespace Gpt.Cli;

/// <summary><c>gpt train</c>: pretrain a model (book chapter 5), the project's main job.</summary>
internal static class TrainCommand
{
    private static readonly CultureInfo Invariant = CultureInfo.InvariantCulture;

    public static Command Create(CliContext context)
    {
        var defaults = new TrainingOptions();
        var data = new Option<string?>("--data") { Description = "Text to train on: a file, a folder (every file, recursively) or a glob such as 'data/*.txt'. Default: the built-in story." };
        var config = new ConfigOptions(TrainingOptions.DefaultModel, "a small GPT-2 (4 layers, 256 dims, 4 heads, context 128, dropout 0.1, no QKV bias, tied head)");
        var batchSize = new Option<int>("--batch-size") { Description = "Windows per batch.", DefaultValueFactory = _ => defaults.BatchSize };
        var epochs = new Option<int>("--epochs") { Description = "Passes over the training text.", DefaultValueFactory = _ => defaults.Epochs };
        var maxSteps = new Option<int?>("--max-steps") { Description = "Stop after this many optimizer steps even if epochs remain." };
        var lr = new Option<double>("--lr") { Description = "Peak learning rate (AdamW).", DefaultValueFactory = _ => defaults.LearningRate };
        var minLr = new Option<double?>("--min-lr") { Description = "Rate the cosine decay ends at. Default: lr / 10. Equal to --lr with --warmup-steps 0: a constant rate." };
        var warmup = new Option<int>("--warmup-steps") { Description = "Steps of linear warmup before the cosine decay.", DefaultValueFactory = _ => defaults.WarmupSteps };
        var weightDecay = new Option<double>("--weight-decay") { Description = "AdamW weight decay.", DefaultValueFactory = _ => defaults.WeightDecay };
        var decayAll = new Option<bool>("--decay-all") { Description = "Decay every parameter (the book) instead of matrices only (nanoGPT)." };
        var gradClip = new Option<double>("--grad-clip") { Description = "Clip the gradient norm to this value; 0 turns clipping off.", DefaultValueFactory = _ => defaults.GradientClip ?? 0 };
        var accumulation = new Option<int>("--grad-accumulation") { Description = "Batches per optimizer step (gradient accumulation).", DefaultValueFactory = _ => defaults.GradientAccumulation };
        var evalInterval = new Option<int>("--eval-interval") { Description = "Evaluate training and validation loss every this many steps.", DefaultValueFactory = _ => defaults.EvalInterval };
        var evalBatches = new Option<int>("--eval-batches") { Description = "Batches of each split an evaluation reads.", DefaultValueFactory = _ => defaults.EvalBatches };
        var samplePrompt = new Option<string>("--sample-prompt") { Description = "Prompt of the sample shown at every epoch end; empty for none.", DefaultValueFactory = _ => defaults.SamplePrompt ?? "" };
        var sampleTokens = new Option<int>("--sample-tokens") { Description = "Tokens of each sample.", DefaultValueFactory = _ => defaults.SampleTokens };
        var seed = new Option<int>("--seed") { Description = "Seed for the initial weights, the data order and dropout.", DefaultValueFactory = _ => defaults.Seed };
        var output = new Option<string>("--out") { Description = "Folder of runs: the run writes OUT/NAME/.", DefaultValueFactory = _ => defaults.OutputDirectory };
        var name = new Option<string?>("--name") { Description = "The run's name (its folder under --out). Default: run-yyyyMMdd-HHmmss." };
        var resume = new Option<string?>("--resume") { Description = "Resume a run from its latest checkpoint: the run's folder (runs/NAME) or a checkpoint. Its options are reused; options given here override them." };
        var init = new Option<string>("--init") { Description = "How a fresh model's weights are drawn: gpt2 (N(0, 0.02), GPT-2's) or torch (PyTorch's layer defaults, as the book's model has).", DefaultValueFactory = _ => "gpt2" };
        init.AcceptOnlyFromAmong("gpt2", "torch");
        var initFrom = new Option<string?>("--init-from") { Description = "Continue pretraining a model in the Hugging Face layout (config.json + model.safetensors)." };
        var keepLast = new Option<int>("--keep-last") { Description = "Checkpoints kept besides the best by validation loss.", DefaultValueFactory = _ => defaults.KeepLast };
        var checkpointInterval = new Option<int>("--checkpoint-interval") { Description = "Write a checkpoint every this many steps (0: only at the end and on Ctrl+C).", DefaultValueFactory = _ => defaults.CheckpointInterval };
        var format = Commands.FormatOption();
        format.Description = "Output: text (a live display on a terminal, plain lines otherwise) or json (one JSON object per event, for scripts).";

        var command = new Command("train",
            "Pretrain a GPT model (book chapter 5). With no options: a small GPT-2 on the built-in story, a few minutes on two " +
            "CPU cores. Writes OUT/NAME/: checkpoints/, metrics.jsonl, loss.png and the final model in the Hugging Face layout " +
            "(model/, for gpt generate --model). Ctrl+C writes a checkpoint and stops; --resume continues.")
        {
            data, batchSize, epochs, maxSteps, lr, minLr, warmup, weightDecay, decayAll, gradClip, accumulation, evalInterval,
            evalBatches, samplePrompt, sampleTokens, seed, output, name, resume, init, initFrom, keepLast, checkpointInterval, format,
        };
        config.AddTo(command);

        command.SetAction(parse => CliApp.Guard(context, () =>
        {
            bool Given(Option option) => parse.GetResult(option) is { Implicit: false };
            var resumePath = parse.GetValue(resume);
            var initPath = parse.GetValue(initFrom);
            // The shape options change the model a run starts from; with --resume or --init-from they may only repeat
            // what that model is (the core refuses a change). --context-length with them is the training window.
            var shapeGiven = config.Given(parse, resumePath is null && initPath is null ? [] : [config.ContextLength]).Count > 0;
            // A run's options come from its checkpoint (unless --init-from is given too, which the core refuses).
            var options = resumePath is not null && initPath is null ? TrainingOptions.FromCheckpoint(resumePath)
                : new TrainingOptions { InitFrom = initPath, ResumeFrom = resumePath };
            options = options with
            {
                Initialization = Given(init) ? (parse.GetValue(init) == "torch" ? ModelInitialization.TorchDefaults : ModelInitialization.Gpt2)
                    : options.Initialization,
            };
            options.Validate();
            // A hub id is fetched here, where its download can be shown; the run then records the local path.
            if (resumePath is null && options.InitFrom is { } source) options = options with { InitFrom = GptModel.Locate(source, DownloadProgressBar.For(context), context.Cancellation) };
            var basis = resumePath is not null ? options.Model
                : options.InitFrom is { } local && shapeGiven && File.Exists(Path.Combine(local, "config.json")) ? GptConfiguration.FromModelDirectory(local) : null;
            options = options with
            {
                Model = shapeGiven ? config.Read(parse, basis) : options.Model,
                ContextLength = (resumePath is not null || initPath is not null) && Given(config.ContextLength)
                    ? parse.GetValue(config.ContextLength) : options.ContextLength,
            };
            options = options with
            {
                Data = Given(data) ? parse.GetValue(data) : options.Data,
                BatchSize = Given(batchSize) ? parse.GetValue(batchSize) : options.BatchSize,
                Epochs = Given(epochs) ? parse.GetValue(epochs) : options.Epochs,
                MaxSteps = Given(maxSteps) ? parse.GetValue(maxSteps) : options.MaxSteps,
                LearningRate = Given(lr) ? parse.GetValue(lr) : options.LearningRate,
                MinLearningRate = Given(minLr) ? parse.GetValue(minLr) : options.MinLearningRate,
                WarmupSteps = Given(warmup) ? parse.GetValue(warmup) : options.WarmupSteps,
                WeightDecay = Given(weightDecay) ? parse.GetValue(weightDecay) : options.WeightDecay,
                DecayAll = Given(decayAll) ? parse.GetValue(decayAll) : options.DecayAll,
                GradientClip = Given(gradClip) ? (parse.GetValue(gradClip) is > 0 and var c ? c : null) : options.GradientClip,
                GradientAccumulation = Given(accumulation) ? parse.GetValue(accumulation) : options.GradientAccumulation,
                EvalInterval = Given(evalInterval) ? parse.GetValue(evalInterval) : options.EvalInterval,
                EvalBatches = Given(evalBatches) ? parse.GetValue(evalBatches) : options.EvalBatches,
                SamplePrompt = Given(samplePrompt) ? NullIfEmpty(parse.GetValue(samplePrompt)) : options.SamplePrompt,
                SampleTokens = Given(sampleTokens) ? parse.GetValue(sampleTokens) : options.SampleTokens,
                Seed = Given(seed) ? parse.GetValue(seed) : options.Seed,
                OutputDirectory = Given(output) ? parse.GetValue(output)! : options.OutputDirectory,
                Name = Given(name) ? parse.GetValue(name) : options.Name,
                KeepLast = Given(keepLast) ? parse.GetValue(keepLast) : options.KeepLast,
                CheckpointInterval = Given(checkpointInterval) ? parse.GetValue(checkpointInterval) : options.CheckpointInterval,
            };
            return Train(context, options, parse.GetValue(format) == "json");
        }));
        return command;
    }

    private static string? NullIfEmpty(string? text) => string.IsNullOrEmpty(text) ? null : text;

    /// <summary>Runs the training with Ctrl+C wired to cancellation and the chosen display.</summary>
    private static int Train(CliContext context, TrainingOptions options, bool json)
    {
        using var cancellation = CancellationTokenSource.CreateLinkedTokenSource(context.Cancellation);
        void OnCancelKey(object? sender, ConsoleCancelEventArgs e)
        {
            if (cancellation.IsCancellationRequested) return; // a second Ctrl+C ends the process at once
            e.Cancel = true;
            cancellation.Cancel();
        }
        Console.CancelKeyPress += OnCancelKey;
        // A polite kill (SIGTERM, as CI runners and container stops send) also stops after the step with a checkpoint.
        using var terminate = OperatingSystem.IsWindows() ? null : System.Runtime.InteropServices.PosixSignalRegistration.Create(
            System.Runtime.InteropServices.PosixSignal.SIGTERM, signal =>
            {
                if (cancellation.IsCancellationRequested) return;
                signal.Cancel = true;
                cancellation.Cancel();
            });
        try
        {
            IDisplay display = json ? new JsonDisplay(context.Output)
                : IsInteractive(context) ? new LiveDisplay(cancellation.Token)
                : new PlainDisplay(context.Output, options.EvalInterval);
            // The training runs here, on the process's main thread (glibc's main heap: a fraction of the page faults a
            // thread of its own would cost, see Trainer.Train); the display, when it has a loop, on another.
            var displaying = Task.Factory.StartNew(display.Run, TaskCreationOptions.LongRunning);
            TrainingResult result;
            try
            {
                result = Trainer.Train(options, display, cancellation.Token);
            }
            finally
            {
                display.Complete();
                displaying.Wait();
            }
            display.Finished(result);
            if (!result.Cancelled) return 0;
            context.Error.WriteLine($"gpt: cancelled at step {result.Steps} of {result.TotalSteps}; " +
                                    (result.CheckpointDirectory is { } checkpoint ? $"checkpoint written to {checkpoint}; " : "") +
                                    $"resume with: gpt train --resume {result.RunDirectory}");
            return 130;
        }
        finally
        {
            Console.CancelKeyPress -= OnCancelKey;
        }
    }

    /// <summary>A live display needs the process's own terminal: not redirected, not CI, not a test's writer.</summary>
    private static bool IsInteractive(CliContext context) =>
        ReferenceEquals(context.Output, Console.Out) && !Console.IsOutputRedirected
        && string.IsNullOrEmpty(Environment.GetEnvironmentVariable("CI"))
        && Environment.GetEnvironmentVariable("TERM") is not (null or "" or "dumb");

    // ---- displays -----------------------------------------------------------------------------------------------

    private interface IDisplay : IProgress<TrainingProgress>
    {
        /// <summary>Runs on a thread of its own until <see cref="Complete"/>.</summary>
        void Run();
        /// <summary>The training is over (finished, cancelled or failed).</summary>
        void Complete();
        void Finished(TrainingResult result);
    }

    internal static string Duration(TimeSpan span) =>
        span.TotalHours >= 1 ? $"{(int)span.TotalHours}h{span.Minutes:00}m"
        : span.TotalMinutes >= 1 ? $"{(int)span.TotalMinutes}m{span.Seconds:00}s"
        : $"{span.TotalSeconds:0.0}s";

    private static string Loss(double? loss) => loss is { } l && double.IsFinite(l) ? l.ToString("0.000", Invariant) : "-";

    private static string Summary(TrainingResult r) =>
        $"{(r.Cancelled ? "stopped" : "done")} after {r.Steps} steps in {Duration(r.Elapsed)}: training loss {Loss(r.FirstEvaluatedTrainLoss)} -> {Loss(r.TrainLoss)}, " +
        $"validation loss {Loss(r.ValidationLoss)} (best {Loss(r.BestValidationLoss)})";

    private static string Header(TrainingProgress p) =>
        $"training {(p.TrainableParameterCount == p.ParameterCount ? "" : $"{p.TrainableParameterCount.ToString("N0", Invariant)} of ")}" +
        $"{p.ParameterCount.ToString("N0", Invariant)} parameters for {p.TotalSteps} steps ({p.Epochs} epochs)" +
        (p.Step > 0 ? $", resuming at step {p.Step}" : "") + $" -> {p.Path}";

    private static string StepLine(TrainingProgress p) => string.Create(Invariant,
        $"step {p.Step,5}/{p.TotalSteps}  epoch {p.Epoch,3}/{p.Epochs}  loss {Loss(p.TrainLoss)}  val {Loss(p.ValidationLoss)}  " +
        $"lr {p.LearningRate:0.0e+0}  {p.TokensPerSecond,6:0} tok/s  ETA {(p.Remaining is { } r ? Duration(r) : "-")}");

    /// <summary>Plain lines, for logs, pipes and CI: a line per evaluation (and at most every 10 s between), the
    /// samples and the checkpoints.</summary>
    private sealed class PlainDisplay(TextWriter output, int evalInterval) : IDisplay
    {
        private readonly object _gate = new();
        private DateTime _lastLine = DateTime.MinValue;

        public void Report(TrainingProgress p)
        {
            lock (_gate)
            {
                switch (p.Kind)
                {
                    case TrainingEventKind.Started:
                        output.WriteLine(Header(p));
                        _lastLine = DateTime.UtcNow;
                        break;
                    // Steps that an evaluation line follows (the first, every evalInterval-th, the last) get none.
                    case TrainingEventKind.Step when DateTime.UtcNow - _lastLine > TimeSpan.FromSeconds(10)
                                                     && p.Step != 1 && p.Step % evalInterval != 0 && p.Step != p.TotalSteps:
                    case TrainingEventKind.Evaluation:
                        output.WriteLine(StepLine(p));
                        _lastLine = DateTime.UtcNow;
                        break;
                    case TrainingEventKind.EpochEnd when p.Sample is { } sample:
                        output.WriteLine($"sample after epoch {p.Epoch}: {OneLine(sample)}");
                        break;
                    case TrainingEventKind.Checkpoint:
                        output.WriteLine($"checkpoint: {p.Path}");
                        break;
                    case TrainingEventKind.ModelSaved:
                        output.WriteLine($"model: {p.Path}");
                        break;
                }
                output.Flush();
            }
        }

        public void Run() { }

        public void Complete() { }

        public void Finished(TrainingResult result)
        {
            output.WriteLine(Summary(result));
            if (result.ModelDirectory is { } model)
                output.WriteLine($"try: gpt generate --model {model} --prompt \"Every effort moves you\"");
        }
    }

    internal static string OneLine(string text) => text.ReplaceLineEndings(" ");

    /// <summary>One JSON object per event: {"event": "step", "step": 12, ...}, then {"event": "finished", ...}.</summary>
    private sealed class JsonDisplay(TextWriter output) : IDisplay
    {
        private readonly object _gate = new();
        private TrainingProgress? _latest;

        public void Report(TrainingProgress p)
        {
            var json = new JsonObject
            {
                ["event"] = p.Kind switch
                {
                    TrainingEventKind.Started => "started", TrainingEventKind.Step => "step", TrainingEventKind.Evaluation => "evaluation",
                    TrainingEventKind.EpochEnd => "epoch_end", TrainingEventKind.Checkpoint => "checkpoint", _ => "model",
                },
                ["step"] = p.Step, ["total_steps"] = p.TotalSteps, ["epoch"] = p.Epoch, ["epochs"] = p.Epochs,
                ["loss"] = Number(p.TrainLoss), ["train_loss"] = Number(p.EvaluatedTrainLoss), ["val_loss"] = Number(p.ValidationLoss),
                ["lr"] = p.LearningRate, ["tokens"] = p.TokensSeen, ["tokens_per_s"] = Math.Round(p.TokensPerSecond, 1),
                ["elapsed_s"] = Math.Round(p.Elapsed.TotalSeconds, 3), ["eta_s"] = p.Remaining is { } r ? Math.Round(r.TotalSeconds, 1) : null,
            };
            if (p.Kind == TrainingEventKind.Started)
            {
                json["parameters"] = p.ParameterCount;
                json["trainable_parameters"] = p.TrainableParameterCount;
            }
            if (p.TrainAccuracy is { } trainAccuracy) json["train_accuracy"] = trainAccuracy;
            if (p.ValidationAccuracy is { } validationAccuracy) json["val_accuracy"] = validationAccuracy;
            _latest = p;
            if (p.Sample is not null) json["sample"] = p.Sample;
            if (p.Path is not null) json["path"] = p.Path;
            lock (_gate)
            {
                output.WriteLine(json.ToJsonString(Json.Options));
                output.Flush();
            }
        }

        private static JsonNode? Number(double? value) => value is { } v && double.IsFinite(v) ? JsonValue.Create(v) : null;

        public void Run() { }

        public void Complete() { }

        public void Finished(TrainingResult r) => output.WriteLine(new JsonObject
        {
            ["event"] = "finished", ["cancelled"] = r.Cancelled, ["steps"] = r.Steps, ["total_steps"] = r.TotalSteps,
            ["tokens"] = r.TokensSeen, ["first_train_loss"] = Number(r.FirstEvaluatedTrainLoss), ["train_loss"] = Number(r.TrainLoss),
            ["val_loss"] = Number(r.ValidationLoss), ["best_val_loss"] = Number(r.BestValidationLoss),
            ["elapsed_s"] = Math.Round(r.Elapsed.TotalSeconds, 3), ["run"] = r.RunDirectory, ["model"] = r.ModelDirectory,
            ["checkpoint"] = r.CheckpointDirectory, ["parameters"] = _latest?.ParameterCount,
            ["trainable_parameters"] = _latest?.TrainableParameterCount,
        }.ToJsonString(Json.Options));
    }

    /// <summary>A live Spectre.Console view on the terminal: progress, losses, speed, ETA, recent evaluations and the
    /// latest sample, redrawn four times a second.</summary>
    private sealed class LiveDisplay(CancellationToken cancellation) : IDisplay
    {
        private readonly IAnsiConsole _console = AnsiConsole.Create(new AnsiConsoleSettings
        {
            Ansi = AnsiSupport.Detect, ColorSystem = ColorSystemSupport.Detect, Interactive = InteractionSupport.Yes,
            Out = new AnsiConsoleOutput(Console.Out),
        });
        private readonly object _gate = new();
        private readonly List<TrainingProgress> _evaluations = [];
        private readonly List<string> _checkpoints = [];
        private TrainingProgress? _latest;
        private string? _header;
        private string? _sample;
        private int _sampleEpoch;

        public void Report(TrainingProgress p)
        {
            lock (_gate)
            {
                switch (p.Kind)
                {
                    case TrainingEventKind.Started: _header = Header(p); break;
                    case TrainingEventKind.Evaluation: _evaluations.Add(p); break;
                    case TrainingEventKind.EpochEnd when p.Sample is not null: _sample = p.Sample; _sampleEpoch = p.Epoch; break;
                    case TrainingEventKind.Checkpoint: _checkpoints.Add(p.Path!); break;
                }
                if (p.Kind is TrainingEventKind.Step or TrainingEventKind.Evaluation) _latest = p;
            }
        }

        private readonly ManualResetEventSlim _done = new();

        public void Run()
        {
            _console.Live(View()).AutoClear(false).Overflow(VerticalOverflow.Ellipsis).Start(live =>
            {
                while (!_done.Wait(250))
                    live.UpdateTarget(View());
                live.UpdateTarget(View());
            });
        }

        public void Complete() => _done.Set();

        private IRenderable View()
        {
            lock (_gate)
            {
                var rows = new List<IRenderable> { new Markup($"[bold]gpt train[/] {Markup.Escape(_header ?? "preparing data and model...")}") };
                if (_latest is { } p)
                {
                    var fraction = p.TotalSteps > 0 ? (double)p.Step / p.TotalSteps : 0;
                    var width = 30;
                    var filled = (int)Math.Round(fraction * width);
                    var stats = new Grid().AddColumns(2);
                    stats.AddRow(new Markup("[grey]progress[/]"), new Markup($"[green]{new string('━', filled)}[/][grey]{new string('━', width - filled)}[/] {fraction:P0}"));
                    stats.AddRow("step", $"{p.Step} / {p.TotalSteps}");
                    stats.AddRow("epoch", $"{p.Epoch} / {p.Epochs}");
                    stats.AddRow("loss", $"{Loss(p.TrainLoss)} (step)   {Loss(p.EvaluatedTrainLoss)} (eval)");
                    stats.AddRow("val loss", Loss(p.ValidationLoss));
                    stats.AddRow("lr", p.LearningRate.ToString("0.00e+0", Invariant));
                    stats.AddRow("tokens", $"{p.TokensSeen.ToString("N0", Invariant)}  ({p.TokensPerSecond.ToString("N0", Invariant)} tok/s)");
                    stats.AddRow("elapsed", Duration(p.Elapsed));
                    stats.AddRow("ETA", p.Remaining is { } r ? Duration(r) : "-");
                    rows.Add(stats);
                }
                if (_evaluations.Count > 0)
                {
                    var table = new Table().Border(TableBorder.Simple).AddColumns("step", "epoch", "train", "val", "tok/s");
                    foreach (var e in _evaluations.TakeLast(5))
                        table.AddRow(e.Step.ToString(Invariant), e.Epoch.ToString(Invariant), Loss(e.EvaluatedTrainLoss), Loss(e.ValidationLoss), e.TokensPerSecond.ToString("N0", Invariant));
                    rows.Add(table);
                }
                if (_sample is not null)
                    rows.Add(new Panel(new Spectre.Console.Text(OneLine(_sample))).Header($"sample after epoch {_sampleEpoch}").Expand());
                if (_checkpoints.Count > 0) rows.Add(new Markup($"[grey]checkpoint: {Markup.Escape(_checkpoints[^1])}[/]"));
                if (cancellation.IsCancellationRequested)
                    rows.Add(new Markup("[yellow]stopping after this step: writing a checkpoint... (Ctrl+C again to quit at once)[/]"));
                return new Rows(rows);
            }
        }

        public void Finished(TrainingResult result)
        {
            _console.MarkupLine($"[bold]{Markup.Escape(Summary(result))}[/]");
            _console.MarkupLine($"run: {Markup.Escape(result.RunDirectory)} (metrics.jsonl, loss.png, checkpoints/)");
            if (result.ModelDirectory is { } model)
                _console.MarkupLine($"model: {Markup.Escape(model)}\ntry: [blue]gpt generate --model {Markup.Escape(model)} --prompt \"Every effort moves you\"[/]");
        }
    }
}
