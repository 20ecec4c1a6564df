using System.Globalization;
using System.Text.Json.Nodes;
using Spectre.Console;
using Spectre.Console.Rendering;

namespace Gpt.Cli;

/// <summary>How a training run ended, as the displays show it: the run's result, what the kind of run adds (JSON fields
/// of the "finished" event and summary lines), and the command that uses the model it wrote.</summary>
internal sealed record RunOutcome(TrainingResult Result, JsonObject Json, IReadOnlyList<string> Lines, Func<string, string?> Try);

/// <summary>What every training command shares: Ctrl+C and SIGTERM, the live display on a terminal, plain lines in
/// logs, one JSON object per event for scripts.</summary>
internal static class RunDisplay
{
    private static readonly CultureInfo Invariant = CultureInfo.InvariantCulture;

    internal static string? NullIfEmpty(string? text) => string.IsNullOrEmpty(text) ? null : text;

    /// <summary>Runs a training run with Ctrl+C (and SIGTERM) wired to cancellation and the chosen display: on the
    /// process's main thread (glibc's main heap: a fraction of the page faults a thread of its own would cost, see
    /// Trainer.Train); the display, when it has a loop, on another. <paramref name="resume"/> is the command (after
    /// gpt) that continues a stopped run.</summary>
    internal static int Run(CliContext context, bool json, int evalInterval, string resume,
        Func<IProgress<TrainingProgress>, CancellationToken, RunOutcome> train)
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
                : new PlainDisplay(context.Output, evalInterval);
            var displaying = Task.Factory.StartNew(display.Run, TaskCreationOptions.LongRunning);
            RunOutcome outcome;
            try
            {
                outcome = train(display, cancellation.Token);
            }
            finally
            {
                display.Complete();
                displaying.Wait();
            }
            display.Finished(outcome);
            var result = outcome.Result;
            if (!result.Cancelled) return 0;
            context.Error.WriteLine($"gpt: cancelled at step {result.Steps} of {result.TotalSteps}; " +
                                    (result.CheckpointDirectory is { } checkpoint ? $"checkpoint written to {checkpoint}; " : "") +
                                    $"resume with: {CommandHints.Gpt($"{resume} --resume {CommandHints.Quote(result.RunDirectory)}")}");
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
        void Finished(RunOutcome outcome);
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

        public void Finished(RunOutcome outcome)
        {
            output.WriteLine(Summary(outcome.Result));
            foreach (var line in outcome.Lines) output.WriteLine(line);
            if (outcome.Result.ModelDirectory is { } model && outcome.Try(model) is { } hint) output.WriteLine($"try: {hint}");
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

        public void Finished(RunOutcome outcome)
        {
            var r = outcome.Result;
            var json = new JsonObject
            {
            ["event"] = "finished", ["cancelled"] = r.Cancelled, ["steps"] = r.Steps, ["total_steps"] = r.TotalSteps,
            ["tokens"] = r.TokensSeen, ["first_train_loss"] = Number(r.FirstEvaluatedTrainLoss), ["train_loss"] = Number(r.TrainLoss),
            ["val_loss"] = Number(r.ValidationLoss), ["best_val_loss"] = Number(r.BestValidationLoss),
            ["elapsed_s"] = Math.Round(r.Elapsed.TotalSeconds, 3), ["run"] = r.RunDirectory, ["model"] = r.ModelDirectory,
            ["checkpoint"] = r.CheckpointDirectory, ["parameters"] = _latest?.ParameterCount,
            ["trainable_parameters"] = _latest?.TrainableParameterCount,
            };
            foreach (var (key, value) in outcome.Json) json[key] = value?.DeepClone();
            output.WriteLine(json.ToJsonString(Json.Options));
        }
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

        public void Finished(RunOutcome outcome)
        {
            var result = outcome.Result;
            _console.MarkupLine($"[bold]{Markup.Escape(Summary(result))}[/]");
            foreach (var line in outcome.Lines) _console.MarkupLine(Markup.Escape(line));
            _console.MarkupLine($"run: {Markup.Escape(result.RunDirectory)} (metrics.jsonl, loss.png, checkpoints/)");
            if (result.ModelDirectory is { } model)
            {
                _console.MarkupLine($"model: {Markup.Escape(model)}");
                // Written as it is, not through Spectre, which would wrap it at the terminal's width (inside a quoted
                // prompt, say) and break the command for copying.
                if (outcome.Try(model) is { } hint) Console.Out.WriteLine($"try: {hint}");
            }
        }
    }
}
