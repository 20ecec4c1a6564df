using Gpt.Training;
using Microsoft.FSharp.Collections;
using Microsoft.FSharp.Core;

namespace Gpt;

/// <summary>
/// What every training run takes, whatever it trains (pretraining, classification or instruction fine-tuning): the
/// optimisation, evaluation and output. Each run's options derive from it with their own defaults.
/// </summary>
public abstract record RunSettings
{
    /// <summary>Starts from the core's defaults for a kind of run.</summary>
    private protected RunSettings(TrainingSettings defaults)
    {
        BatchSize = defaults.BatchSize; Epochs = defaults.Epochs; MaxSteps = Options.ToNullable(defaults.MaxSteps);
        LearningRate = defaults.LearningRate; MinLearningRate = Options.ToNullable(defaults.MinLearningRate);
        InitialLearningRate = Options.ToNullable(defaults.InitialLearningRate); WarmupSteps = defaults.WarmupSteps;
        WeightDecay = defaults.WeightDecay; DecayAll = defaults.DecayAll; Beta1 = defaults.Beta1; Beta2 = defaults.Beta2;
        GradientClip = Options.ToNullable(defaults.GradientClip); GradientAccumulation = defaults.GradientAccumulation;
        EvalInterval = defaults.EvalInterval; EvalBatches = defaults.EvalBatches; Seed = defaults.Seed;
        OutputDirectory = defaults.OutputDirectory; Name = Options.ToObject(defaults.Name); KeepLast = defaults.KeepLast;
        CheckpointInterval = defaults.CheckpointInterval; ResumeFrom = Options.ToObject(defaults.ResumeFrom);
        Device = Gpt.Model.DeviceModule.name(defaults.Device);
        if (Options.ToObject(defaults.Lora) is { } lora)
        {
            LoraRank = lora.Rank; LoraAlpha = lora.Alpha; LoraTargets = lora.Targets.ToArray();
        }
    }

    /// <summary>Examples (windows, texts) per batch.</summary>
    public int BatchSize { get; init; }

    /// <summary>Passes over the training data.</summary>
    public int Epochs { get; init; }

    /// <summary>Stop after this many optimizer steps even if epochs remain (null: no limit).</summary>
    public int? MaxSteps { get; init; }

    /// <summary>Peak learning rate of AdamW.</summary>
    public double LearningRate { get; init; }

    /// <summary>Rate the cosine decay ends at, on the last step. Null: pretraining decays to a tenth of
    /// <see cref="LearningRate"/>; fine-tuning keeps it constant.</summary>
    public double? MinLearningRate { get; init; }

    /// <summary>Rate at the first warmup step, rising linearly to <see cref="LearningRate"/>. Null: the minimum
    /// rate.</summary>
    public double? InitialLearningRate { get; init; }

    /// <summary>Steps of linear warmup before the cosine decay (appendix D).</summary>
    public int WarmupSteps { get; init; }

    /// <summary>AdamW's decoupled weight decay.</summary>
    public double WeightDecay { get; init; }

    /// <summary>Decay every parameter, as the book (PyTorch's AdamW) does, instead of only the matrices (nanoGPT:
    /// no decay of biases, LayerNorm parameters).</summary>
    public bool DecayAll { get; init; }

    /// <summary>AdamW's β1.</summary>
    public double Beta1 { get; init; }

    /// <summary>AdamW's β2.</summary>
    public double Beta2 { get; init; }

    /// <summary>Clip the global gradient norm to this value before each step (null: no clipping).</summary>
    public double? GradientClip { get; init; }

    /// <summary>Batches whose gradients make one optimizer step (an effective batch of BatchSize × this).</summary>
    public int GradientAccumulation { get; init; }

    /// <summary>Evaluate the training and validation splits every this many steps (and after the first and the
    /// last).</summary>
    public int EvalInterval { get; init; }

    /// <summary>Batches of each split an evaluation reads.</summary>
    public int EvalBatches { get; init; }

    /// <summary>Seeds the initial weights, the data order and the dropout draws: the same seed gives the same run on
    /// the CPU.</summary>
    public int Seed { get; init; }

    /// <summary>Folder of runs: a run writes <c>OutputDirectory/Name/</c>.</summary>
    public string OutputDirectory { get; init; }

    /// <summary>The run's name, its folder under <see cref="OutputDirectory"/>. Null: <c>run-yyyyMMdd-HHmmss</c>.</summary>
    public string? Name { get; init; }

    /// <summary>Checkpoints kept besides the best by validation loss.</summary>
    public int KeepLast { get; init; }

    /// <summary>Write a checkpoint every this many steps (0: only at the end and on cancellation).</summary>
    public int CheckpointInterval { get; init; }

    /// <summary>Resume a run: its directory (<c>runs/NAME</c>), its <c>checkpoints</c> folder or one checkpoint. The
    /// model, the optimizer state, the data position and the random state come from the latest checkpoint: N steps, a
    /// resume and N more give the same weights as 2N steps straight when the other options are the run's own (each
    /// kind of options has a <c>FromCheckpoint</c> that reads them back).</summary>
    public string? ResumeFrom { get; init; }

    /// <summary>Train LoRA adapters of this rank on the frozen model instead of its weights (the book's appendix E;
    /// null: no LoRA). The run writes the adapters in Hugging Face PEFT's layout (<c>adapter/</c>) beside the merged
    /// model (<c>model/</c>).</summary>
    public int? LoraRank { get; init; }

    /// <summary>LoRA's alpha: the update is scaled by alpha / rank (PEFT's <c>lora_alpha</c>; the printed book
    /// scales by its alpha alone, which is PEFT's alpha / rank). Null: twice the rank.</summary>
    public double? LoraAlpha { get; init; }

    /// <summary>The maps that get adapters: <c>c_attn</c>, <c>attn.c_proj</c>, <c>c_fc</c>, <c>mlp.c_proj</c>,
    /// <c>c_proj</c> (both projections), <c>lm_head</c> (an untied language-model head). Null: every map of the
    /// blocks.</summary>
    public IReadOnlyList<string>? LoraTargets { get; init; }

    /// <summary>Where the model, its batches and the optimizer state live: <c>cpu</c> (the default), <c>cuda</c>,
    /// <c>cuda:N</c>, or <c>auto</c> (CUDA when torch sees a device, else the CPU). A model given in memory is moved
    /// there. This build uses TorchSharp-cpu: asking for CUDA is a <see cref="GptException"/> that says how to make a
    /// CUDA build.</summary>
    public string Device { get; init; }

    internal TrainingSettings ToSettings() => new(
        BatchSize, Epochs, Options.Some(MaxSteps), LearningRate, Options.Some(MinLearningRate), Options.Some(InitialLearningRate),
        WarmupSteps, WeightDecay, DecayAll, Beta1, Beta2, Options.Some(GradientClip), GradientAccumulation, EvalInterval,
        EvalBatches, Seed, OutputDirectory, Options.SomeObject(Name), KeepLast, CheckpointInterval, Options.SomeObject(ResumeFrom),
        Gpt.Model.LoraSettingsModule.ofOptions(Options.Some(LoraRank), Options.Some(LoraAlpha),
            LoraTargets is null ? FSharpOption<FSharpList<string>>.None : FSharpOption<FSharpList<string>>.Some(ListModule.OfSeq(LoraTargets))),
        Gpt.Model.DeviceModule.parse(Device ?? throw new GptException("no device given: expected cpu, cuda, cuda:N (N a GPU number such as 0) or auto")));
}
