using System.CommandLine;

namespace Gpt.Cli;

/// <summary><c>gpt train</c>: pretrain a model (book chapter 5), the project's main job.</summary>
internal static class TrainCommand
{
    public static Command Create(CliContext context)
    {
        var defaults = new TrainingOptions();
        var run = new RunSettingsOptions(defaults, "Windows", "lr / 10 (equal to --lr with --warmup-steps 0: a constant rate)");
        var data = new Option<string?>("--data") { Description = "Text to train on: a file, a folder (every file, recursively) or a glob such as 'data/*.txt'. Default: the built-in story." };
        var config = new ConfigOptions(TrainingOptions.DefaultModel, "a small GPT-2 (4 layers, 256 dims, 4 heads, context 128, dropout 0.1, no QKV bias, tied head)");
        var samplePrompt = new Option<string>("--sample-prompt") { Description = "Prompt of the sample shown at every epoch end; empty for none.", DefaultValueFactory = _ => defaults.SamplePrompt ?? "" };
        var sampleTokens = new Option<int>("--sample-tokens") { Description = "Tokens of each sample.", DefaultValueFactory = _ => defaults.SampleTokens };
        var init = new Option<string>("--init") { Description = "How a fresh model's weights are drawn: gpt2 (N(0, 0.02), GPT-2's) or torch (PyTorch's layer defaults, as the book's model has).", DefaultValueFactory = _ => "gpt2" };
        init.AcceptOnlyFromAmong("gpt2", "torch");
        var initFrom = new Option<string?>("--init-from") { Description = "Continue pretraining a model: a folder in the Hugging Face layout, a .pth file, OpenAI's checkpoint folder or a Hugging Face id." };
        var resume = run.Resume;
        var torchrun = new TorchrunCliOptions();

        var command = new Command("train",
            "Pretrain a GPT model (book chapter 5). With no options: a small GPT-2 on the built-in story, a few minutes on two " +
            "CPU cores. Writes OUT/NAME/: checkpoints/, metrics.jsonl, loss.png and the final model in the Hugging Face layout " +
            "(model/, for gpt generate --model). Ctrl+C writes a checkpoint and stops; --resume continues.")
        {
            data, samplePrompt, sampleTokens, init, initFrom,
        };
        run.AddTo(command);
        config.AddTo(command);
        torchrun.AddTo(command);

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
            options = run.Apply(parse, options) with
            {
                Data = Given(data) ? parse.GetValue(data) : options.Data,
                SamplePrompt = Given(samplePrompt) ? RunDisplay.NullIfEmpty(parse.GetValue(samplePrompt)) : options.SamplePrompt,
                SampleTokens = Given(sampleTokens) ? parse.GetValue(sampleTokens) : options.SampleTokens,
            };
            string Try(string model) => CommandHints.Gpt($"generate --model {CommandHints.Quote(model)} --prompt \"Every effort moves you\"");
            if (torchrun.Read(parse) is { } settings)
            {
                if (parse.GetValue(torchrun.DryRun))
                    return TorchrunCliOptions.PrintDryRun(context, run.Json(parse), settings, Torchrun.Prepare(options, settings));
                return RunDisplay.Run(context, run.Json(parse), options.EvalInterval, TorchrunCliOptions.ResumeCommand(settings), (progress, token) =>
                    new RunOutcome(Torchrun.Train(options, settings, progress, context.Error.WriteLine, token), [], [], Try));
            }
            return RunDisplay.Run(context, run.Json(parse), options.EvalInterval, "train", (progress, token) =>
                new RunOutcome(Trainer.Train(options, progress, token), [], [], Try));
        }));
        return command;
    }
}
