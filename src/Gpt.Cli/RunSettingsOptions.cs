using System.CommandLine;

namespace Gpt.Cli;

/// <summary>The options every training command has (<c>gpt train</c>, <c>gpt finetune classify</c>,
/// <c>gpt finetune instruct</c>): optimisation, evaluation, output and resume, with each command's own defaults.</summary>
internal sealed class RunSettingsOptions
{
    public RunSettingsOptions(RunSettings defaults, string examples, string minLearningRateDefault)
    {
        BatchSize = new("--batch-size") { Description = $"{examples} per batch.", DefaultValueFactory = _ => defaults.BatchSize };
        Epochs = new("--epochs") { Description = "Passes over the training data.", DefaultValueFactory = _ => defaults.Epochs };
        MaxSteps = new("--max-steps") { Description = "Stop after this many optimizer steps even if epochs remain." };
        LearningRate = new("--lr") { Description = "Peak learning rate (AdamW).", DefaultValueFactory = _ => defaults.LearningRate };
        MinLearningRate = new("--min-lr") { Description = $"Rate the cosine decay ends at. Default: {minLearningRateDefault}." };
        WarmupSteps = new("--warmup-steps") { Description = "Steps of linear warmup before the cosine decay.", DefaultValueFactory = _ => defaults.WarmupSteps };
        WeightDecay = new("--weight-decay") { Description = "AdamW weight decay.", DefaultValueFactory = _ => defaults.WeightDecay };
        DecayAll = new("--decay-all") { Description = "Decay every parameter (the book) instead of matrices only (nanoGPT).", DefaultValueFactory = _ => defaults.DecayAll };
        GradientClip = new("--grad-clip") { Description = "Clip the gradient norm to this value; 0 turns clipping off.", DefaultValueFactory = _ => defaults.GradientClip ?? 0 };
        GradientAccumulation = new("--grad-accumulation") { Description = "Batches per optimizer step (gradient accumulation).", DefaultValueFactory = _ => defaults.GradientAccumulation };
        EvalInterval = new("--eval-interval") { Description = "Evaluate the training and validation splits every this many steps.", DefaultValueFactory = _ => defaults.EvalInterval };
        EvalBatches = new("--eval-batches") { Description = "Batches of each split an evaluation reads.", DefaultValueFactory = _ => defaults.EvalBatches };
        Seed = new("--seed") { Description = "Seed for the initial weights, the data order and dropout.", DefaultValueFactory = _ => defaults.Seed };
        Output = new("--out") { Description = "Folder of runs: the run writes OUT/NAME/.", DefaultValueFactory = _ => defaults.OutputDirectory };
        Name = new("--name") { Description = "The run's name (its folder under --out). Default: run-yyyyMMdd-HHmmss." };
        Resume = new("--resume") { Description = "Resume a run from its latest checkpoint: the run's folder (runs/NAME) or a checkpoint. Its options are reused; options given here override them." };
        KeepLast = new("--keep-last") { Description = "Checkpoints kept besides the best by validation loss.", DefaultValueFactory = _ => defaults.KeepLast };
        CheckpointInterval = new("--checkpoint-interval") { Description = "Write a checkpoint every this many steps (0: only at the end and on Ctrl+C).", DefaultValueFactory = _ => defaults.CheckpointInterval };
        LoraRank = new("--lora-rank") { Description = "Train LoRA adapters of this rank on the frozen model (appendix E); the run writes adapter/ (PEFT's layout) beside the merged model/." };
        LoraAlpha = new("--lora-alpha") { Description = "LoRA alpha: updates are scaled by alpha / rank (PEFT's lora_alpha). Default: twice the rank." };
        LoraTargets = new("--lora-targets") { Description = "Comma-separated maps to adapt: c_attn, attn.c_proj, c_fc, mlp.c_proj, c_proj (both), lm_head. Default: every map of the blocks." };
        Device = Commands.DeviceOption();
        Format = Commands.FormatOption();
        Format.Description = "Output: text (a live display on a terminal, plain lines otherwise) or json (one JSON object per event, for scripts).";
    }

    public Option<int> BatchSize { get; }
    public Option<int> Epochs { get; }
    public Option<int?> MaxSteps { get; }
    public Option<double> LearningRate { get; }
    public Option<double?> MinLearningRate { get; }
    public Option<int> WarmupSteps { get; }
    public Option<double> WeightDecay { get; }
    public Option<bool> DecayAll { get; }
    public Option<double> GradientClip { get; }
    public Option<int> GradientAccumulation { get; }
    public Option<int> EvalInterval { get; }
    public Option<int> EvalBatches { get; }
    public Option<int> Seed { get; }
    public Option<string> Output { get; }
    public Option<string?> Name { get; }
    public Option<string?> Resume { get; }
    public Option<int> KeepLast { get; }
    public Option<int> CheckpointInterval { get; }
    public Option<int?> LoraRank { get; }
    public Option<double?> LoraAlpha { get; }
    public Option<string?> LoraTargets { get; }
    public Option<string> Format { get; }
    public Option<string> Device { get; }

    public void AddTo(Command command)
    {
        foreach (var option in new Option[]
                 {
                     BatchSize, Epochs, MaxSteps, LearningRate, MinLearningRate, WarmupSteps, WeightDecay, DecayAll, GradientClip,
                     GradientAccumulation, EvalInterval, EvalBatches, Seed, Output, Name, Resume, KeepLast, CheckpointInterval, LoraRank, LoraAlpha, LoraTargets, Device, Format,
                 })
            command.Add(option);
    }

    /// <summary>The options given on the command line applied over <paramref name="options"/> (defaults, or a resumed
    /// run's own).</summary>
    public T Apply<T>(ParseResult parse, T options) where T : RunSettings
    {
        bool Given(Option option) => parse.GetResult(option) is { Implicit: false };
        RunSettings settings = options;
        return (T)(settings with
        {
            BatchSize = Given(BatchSize) ? parse.GetValue(BatchSize) : options.BatchSize,
            Epochs = Given(Epochs) ? parse.GetValue(Epochs) : options.Epochs,
            MaxSteps = Given(MaxSteps) ? parse.GetValue(MaxSteps) : options.MaxSteps,
            LearningRate = Given(LearningRate) ? parse.GetValue(LearningRate) : options.LearningRate,
            MinLearningRate = Given(MinLearningRate) ? parse.GetValue(MinLearningRate) : options.MinLearningRate,
            WarmupSteps = Given(WarmupSteps) ? parse.GetValue(WarmupSteps) : options.WarmupSteps,
            WeightDecay = Given(WeightDecay) ? parse.GetValue(WeightDecay) : options.WeightDecay,
            DecayAll = Given(DecayAll) ? parse.GetValue(DecayAll) : options.DecayAll,
            GradientClip = Given(GradientClip) ? (parse.GetValue(GradientClip) is > 0 and var c ? c : null) : options.GradientClip,
            GradientAccumulation = Given(GradientAccumulation) ? parse.GetValue(GradientAccumulation) : options.GradientAccumulation,
            EvalInterval = Given(EvalInterval) ? parse.GetValue(EvalInterval) : options.EvalInterval,
            EvalBatches = Given(EvalBatches) ? parse.GetValue(EvalBatches) : options.EvalBatches,
            Seed = Given(Seed) ? parse.GetValue(Seed) : options.Seed,
            OutputDirectory = Given(Output) ? parse.GetValue(Output)! : options.OutputDirectory,
            Name = Given(Name) ? parse.GetValue(Name) : options.Name,
            KeepLast = Given(KeepLast) ? parse.GetValue(KeepLast) : options.KeepLast,
            CheckpointInterval = Given(CheckpointInterval) ? parse.GetValue(CheckpointInterval) : options.CheckpointInterval,
            LoraRank = Given(LoraRank) ? parse.GetValue(LoraRank) : options.LoraRank,
            LoraAlpha = Given(LoraAlpha) ? parse.GetValue(LoraAlpha) : options.LoraAlpha,
            LoraTargets = Given(LoraTargets)
                ? parse.GetValue(LoraTargets)!.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries)
                : options.LoraTargets,
            Device = parse.GetValue(Device)!,
        });
    }

    public bool Json(ParseResult parse) => parse.GetValue(Format) == "json";
}
