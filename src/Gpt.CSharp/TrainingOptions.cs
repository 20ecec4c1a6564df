using Gpt.Training;
using FInitialization = Gpt.Training.ModelInitialization;
using FRunOptions = Gpt.Training.RunOptions;

namespace Gpt;

/// <summary>
/// Everything that shapes a pretraining run: the data, the model, the optimisation, evaluation and output. The
/// defaults train <see cref="DefaultModel"/> (4 layers, 256 dimensions, context 128) on the built-in story for 20
/// epochs, a few minutes on two CPU cores; every <c>gpt train</c> option has a property here.
/// </summary>
/// <remarks>Text is encoded with GPT-2's tokenizer, so the model's vocabulary must hold its 50,257 tokens.</remarks>
public sealed record TrainingOptions
{
    /// <summary>The core's defaults, which every property starts from.</summary>
    private static readonly FRunOptions D = RunOptionsModule.defaults;

    /// <summary>The model <c>gpt train</c> trains by default: GPT-2's vocabulary and layout, 4 layers of 256
    /// dimensions with 4 heads, 128 positions, dropout 0.1, no QKV bias, head tied to the token embedding
    /// (about 16 million parameters, 80% of them the embedding).</summary>
    public static GptConfiguration DefaultModel { get; } = GptConfiguration.From(RunOptionsModule.defaultModel);

    /// <summary>The book's chapter 5 run: gpt2-small with 256 positions, no QKV bias, dropout 0.1 and a separate output
    /// head (the book's GPTModel does not tie it: 162M parameters) and PyTorch's default initialisation (the book
    /// applies none of its own; with GPT-2's, this run stalls near a loss of 5); AdamW with a
    /// constant learning rate of 4e-4 and weight decay 0.1 on every parameter; batch 2; 10 epochs; evaluation every 5
    /// steps on 5 batches; no warmup, no clipping; seed 123; the sample "Every effort moves you" at every epoch end.</summary>
    public static TrainingOptions Book { get; } = From(RunOptionsModule.book);

    // ---- data ----

    /// <summary>The text to train on: a file, a folder (every file, recursively) or a glob such as
    /// <c>data/*.txt</c>. Null: the built-in story (<see cref="Corpus.BuiltInStory"/>).</summary>
    public string? Data { get; init; }

    /// <summary>Share of the tokens, from the start, used for training; the rest is the validation text (the book
    /// splits 90/10 by position).</summary>
    public double TrainRatio { get; init; } = D.TrainRatio;

    // ---- model ----

    /// <summary>The shape of a fresh model (null: <see cref="DefaultModel"/>). <see cref="InitFrom"/> and
    /// <see cref="ResumeFrom"/> bring their own model: a shape given with them must be that model's.</summary>
    public GptConfiguration? Model { get; init; }

    /// <summary>How a fresh model's weights are drawn (from <see cref="Seed"/>).</summary>
    public ModelInitialization Initialization { get; init; } = ModelInitialization.Gpt2;

    /// <summary>Continue pretraining a model (any source <see cref="GptModel.Load(string)"/> takes: a Hugging Face
    /// folder or id, OpenAI's checkpoint, a <c>.pth</c>) instead of starting from random weights.</summary>
    public string? InitFrom { get; init; }

    /// <summary>Resume a run: its directory (<c>runs/NAME</c>), its <c>checkpoints</c> folder or one checkpoint. The
    /// model, the optimizer state, the data position and the random state come from the latest checkpoint, and the
    /// run continues in its own directory: N steps, a resume and N more give the same weights as 2N steps straight
    /// when the other options are the run's own (<see cref="FromCheckpoint"/> reads them back).</summary>
    public string? ResumeFrom { get; init; }

    /// <summary>Tokens per training window. Null: the model's context length.</summary>
    public int? ContextLength { get; init; }

    /// <summary>Distance between the starts of consecutive windows. Null: the context length (no overlap, as in the
    /// book).</summary>
    public int? Stride { get; init; }

    // ---- optimisation ----

    /// <summary>Windows per batch.</summary>
    public int BatchSize { get; init; } = D.BatchSize;

    /// <summary>Passes over the training text.</summary>
    public int Epochs { get; init; } = D.Epochs;

    /// <summary>Stop after this many optimizer steps even if epochs remain (null: no limit).</summary>
    public int? MaxSteps { get; init; }

    /// <summary>Peak learning rate of AdamW.</summary>
    public double LearningRate { get; init; } = D.LearningRate;

    /// <summary>Rate the cosine decay ends at, on the last step. Null: a tenth of <see cref="LearningRate"/>. Equal to
    /// <see cref="LearningRate"/> (and no warmup): a constant rate, as in the book's chapter 5.</summary>
    public double? MinLearningRate { get; init; }

    /// <summary>Rate at the first warmup step, rising linearly to <see cref="LearningRate"/>. Null: the minimum
    /// rate.</summary>
    public double? InitialLearningRate { get; init; }

    /// <summary>Steps of linear warmup before the cosine decay (appendix D).</summary>
    public int WarmupSteps { get; init; } = D.WarmupSteps;

    /// <summary>AdamW's decoupled weight decay.</summary>
    public double WeightDecay { get; init; } = D.WeightDecay;

    /// <summary>Decay every parameter, as the book (PyTorch's AdamW) does, instead of only the matrices (nanoGPT:
    /// no decay of biases, LayerNorm parameters).</summary>
    public bool DecayAll { get; init; }

    /// <summary>AdamW's β1.</summary>
    public double Beta1 { get; init; } = D.Beta1;

    /// <summary>AdamW's β2.</summary>
    public double Beta2 { get; init; } = D.Beta2;

    /// <summary>Clip the global gradient norm to this value before each step (null: no clipping).</summary>
    public double? GradientClip { get; init; } = Options.ToNullable(D.GradientClip);

    /// <summary>Batches whose gradients make one optimizer step (an effective batch of BatchSize × this).</summary>
    public int GradientAccumulation { get; init; } = D.GradientAccumulation;

    // ---- evaluation, samples, output ----

    /// <summary>Evaluate the training and validation loss every this many steps (and after the first and the
    /// last).</summary>
    public int EvalInterval { get; init; } = D.EvalInterval;

    /// <summary>Batches of each split an evaluation reads.</summary>
    public int EvalBatches { get; init; } = D.EvalBatches;

    /// <summary>Greedy continuation of this prompt at every epoch end (null: no samples).</summary>
    public string? SamplePrompt { get; init; } = Options.ToObject(D.SamplePrompt);

    /// <summary>Tokens of each sample.</summary>
    public int SampleTokens { get; init; } = D.SampleTokens;

    /// <summary>Seeds the data order and the dropout draws: the same seed gives the same run on the CPU.</summary>
    public int Seed { get; init; } = D.Seed;

    /// <summary>Folder of runs: a run writes <c>OutputDirectory/Name/</c>.</summary>
    public string OutputDirectory { get; init; } = D.OutputDirectory;

    /// <summary>The run's name, its folder under <see cref="OutputDirectory"/>. Null: <c>run-yyyyMMdd-HHmmss</c>.</summary>
    public string? Name { get; init; }

    /// <summary>Checkpoints kept besides the best by validation loss.</summary>
    public int KeepLast { get; init; } = D.KeepLast;

    /// <summary>Write a checkpoint every this many steps (0: only at the end and on cancellation).</summary>
    public int CheckpointInterval { get; init; } = D.CheckpointInterval;

    /// <summary>The options a run was trained with, read back from a run directory or a checkpoint, with
    /// <see cref="ResumeFrom"/> set to <paramref name="path"/>: <c>TrainingOptions.FromCheckpoint("runs/x") with {
    /// MaxSteps = 500 }</c> resumes run x and extends it.</summary>
    /// <exception cref="GptException">No complete checkpoint at <paramref name="path"/>, or an unreadable one.</exception>
    public static TrainingOptions FromCheckpoint(string path) =>
        From(RunOptionsModule.fromCheckpoint(path ?? throw new ArgumentNullException(nameof(path))));

    /// <summary>Checks the options that need no file (the run checks the rest when it starts).</summary>
    /// <exception cref="GptException">With a message naming the bad option.</exception>
    public void Validate() => RunOptionsModule.validate(ToFSharp());

    internal FRunOptions ToFSharp() => new(
        Options.SomeObject(Data), TrainRatio, Options.SomeObject(Model?.ToFSharp()),
        Initialization == ModelInitialization.TorchDefaults ? FInitialization.TorchDefaults : FInitialization.Gpt2,
        Options.SomeObject(InitFrom), Options.SomeObject(ResumeFrom), Options.Some(ContextLength), Options.Some(Stride),
        BatchSize, Epochs, Options.Some(MaxSteps), LearningRate, Options.Some(MinLearningRate), Options.Some(InitialLearningRate),
        WarmupSteps, WeightDecay, DecayAll, Beta1, Beta2, Options.Some(GradientClip), GradientAccumulation, EvalInterval,
        EvalBatches, Options.SomeObject(SamplePrompt), SampleTokens, Seed, OutputDirectory, Options.SomeObject(Name), KeepLast,
        CheckpointInterval);

    internal static TrainingOptions From(FRunOptions o) => new()
    {
        Data = Options.ToObject(o.Data), TrainRatio = o.TrainRatio,
        Model = Options.ToObject(o.Model) is { } model ? GptConfiguration.From(model) : null,
        Initialization = o.Initialization.IsTorchDefaults ? ModelInitialization.TorchDefaults : ModelInitialization.Gpt2,
        InitFrom = Options.ToObject(o.InitFrom), ResumeFrom = Options.ToObject(o.ResumeFrom),
        ContextLength = Options.ToNullable(o.ContextLength), Stride = Options.ToNullable(o.Stride), BatchSize = o.BatchSize,
        Epochs = o.Epochs, MaxSteps = Options.ToNullable(o.MaxSteps), LearningRate = o.LearningRate,
        MinLearningRate = Options.ToNullable(o.MinLearningRate), InitialLearningRate = Options.ToNullable(o.InitialLearningRate),
        WarmupSteps = o.WarmupSteps, WeightDecay = o.WeightDecay, DecayAll = o.DecayAll, Beta1 = o.Beta1, Beta2 = o.Beta2,
        GradientClip = Options.ToNullable(o.GradientClip), GradientAccumulation = o.GradientAccumulation,
        EvalInterval = o.EvalInterval, EvalBatches = o.EvalBatches, SamplePrompt = Options.ToObject(o.SamplePrompt),
        SampleTokens = o.SampleTokens, Seed = o.Seed, OutputDirectory = o.OutputDirectory, Name = Options.ToObject(o.Name),
        KeepLast = o.KeepLast, CheckpointInterval = o.CheckpointInterval,
    };
}

/// <summary>How a fresh model's weights are drawn.</summary>
public enum ModelInitialization
{
    /// <summary>GPT-2's (nanoGPT's): weights N(0, 0.02), residual projections N(0, 0.02 / sqrt(2 × layers)), biases 0.</summary>
    Gpt2,
    /// <summary>PyTorch's default for each layer, which the book's GPTModel keeps: Linear U(±1/sqrt(fan_in)),
    /// embeddings N(0, 1).</summary>
    TorchDefaults,
}
