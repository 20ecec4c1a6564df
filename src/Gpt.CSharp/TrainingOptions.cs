using Gpt.Training;
using Microsoft.FSharp.Collections;
using Microsoft.FSharp.Core;
using FInitialization = Gpt.Training.ModelInitialization;
using FRunOptions = Gpt.Training.RunOptions;

namespace Gpt;

/// <summary>
/// Everything that shapes a pretraining run: the data, the model, the optimisation, evaluation and output. The
/// defaults train <see cref="DefaultModel"/> (4 layers, 256 dimensions, context 128) on the built-in story for 20
/// epochs, a few minutes on two CPU cores; every <c>gpt train</c> option has a property here.
/// </summary>
/// <remarks>Text is encoded with GPT-2's tokenizer, so the model's vocabulary must hold its 50,257 tokens.</remarks>
public sealed record TrainingOptions : RunSettings
{
    /// <summary>The core's defaults, which every property starts from.</summary>
    private static readonly FRunOptions D = RunOptionsModule.defaults;

    /// <summary>The defaults: the default model on the built-in story, as <c>gpt train</c> with no options.</summary>
    public TrainingOptions() : base(D.Training) { }

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
    /// <c>data/*.txt</c>. Null: the built-in story (<see cref="Corpus.BuiltInStory"/>), or <see cref="Texts"/>.</summary>
    public string? Data { get; init; }

    /// <summary>The texts to train on, given in memory, each a document (joined by <c>&lt;|endoftext|&gt;</c>), instead
    /// of files (<see cref="Data"/>). The run's <c>run.json</c> records <c>"data": "(in memory)"</c> and their SHA-256:
    /// a resume (<see cref="FromCheckpoint"/>) needs the same texts again, and says so when they are missing or
    /// differ.</summary>
    public IReadOnlyList<string>? Texts { get; init; }

    /// <summary>Share of the tokens, from the start, used for training; the rest is the validation text (the book
    /// splits 90/10 by position).</summary>
    public double TrainRatio { get; init; } = D.TrainRatio;

    // ---- model ----

    /// <summary>The shape of a fresh model (null: <see cref="DefaultModel"/>). <see cref="InitFrom"/> and
    /// <see cref="RunSettings.ResumeFrom"/> bring their own model: a shape given with them must be that model's.</summary>
    public GptConfiguration? Model { get; init; }

    /// <summary>How a fresh model's weights are drawn (from <see cref="RunSettings.Seed"/>).</summary>
    public ModelInitialization Initialization { get; init; } = ModelInitialization.Gpt2;

    /// <summary>Continue pretraining a model (any source <see cref="GptModel.Load(string)"/> takes: a Hugging Face
    /// folder or id, OpenAI's checkpoint, a <c>.pth</c>) instead of starting from random weights.</summary>
    public string? InitFrom { get; init; }

    /// <summary>Tokens per training window. Null: the model's context length.</summary>
    public int? ContextLength { get; init; }

    /// <summary>Distance between the starts of consecutive windows. Null: the context length (no overlap, as in the
    /// book).</summary>
    public int? Stride { get; init; }

    // ---- samples ----

    /// <summary>Greedy continuation of this prompt at every epoch end (null: no samples).</summary>
    public string? SamplePrompt { get; init; } = Options.ToObject(D.SamplePrompt);

    /// <summary>Tokens of each sample.</summary>
    public int SampleTokens { get; init; } = D.SampleTokens;

    /// <summary>The options a run was trained with, read back from a run directory or a checkpoint, with
    /// <see cref="RunSettings.ResumeFrom"/> set to <paramref name="path"/>: <c>TrainingOptions.FromCheckpoint("runs/x") with {
    /// MaxSteps = 500 }</c> resumes run x and extends it.</summary>
    /// <exception cref="GptException">No complete checkpoint at <paramref name="path"/>, or an unreadable one.</exception>
    public static TrainingOptions FromCheckpoint(string path) =>
        From(RunOptionsModule.fromCheckpoint(path ?? throw new ArgumentNullException(nameof(path))));

    /// <summary>Checks the options that need no file (the run checks the rest when it starts).</summary>
    /// <exception cref="GptException">With a message naming the bad option.</exception>
    public void Validate() => RunOptionsModule.validate(ToFSharp());

    /// <summary>The core's options; <paramref name="model"/>: a model to continue training in memory.</summary>
    internal FRunOptions ToFSharp(GptModel? model = null) => new(
        Options.SomeObject(Data),
        Texts is null ? FSharpOption<FSharpList<string>>.None : FSharpOption<FSharpList<string>>.Some(ListModule.OfSeq(Texts)),
        TrainRatio, Options.SomeObject(Model?.ToFSharp()),
        Initialization == ModelInitialization.TorchDefaults ? FInitialization.TorchDefaults : FInitialization.Gpt2,
        Options.SomeObject(InitFrom), Options.SomeObject(model?.Inner), Options.Some(ContextLength), Options.Some(Stride),
        Options.SomeObject(SamplePrompt), SampleTokens, ToSettings());

    internal static TrainingOptions From(FRunOptions o) => new TrainingOptions(o.Training)
    {
        Data = Options.ToObject(o.Data), Texts = Options.ToObject(o.Texts)?.ToArray(), TrainRatio = o.TrainRatio,
        Model = Options.ToObject(o.Model) is { } model ? GptConfiguration.From(model) : null,
        Initialization = o.Initialization.IsTorchDefaults ? ModelInitialization.TorchDefaults : ModelInitialization.Gpt2,
        InitFrom = Options.ToObject(o.InitFrom), ContextLength = Options.ToNullable(o.ContextLength), Stride = Options.ToNullable(o.Stride),
        SamplePrompt = Options.ToObject(o.SamplePrompt), SampleTokens = o.SampleTokens,
    };

    private TrainingOptions(TrainingSettings settings) : base(settings) { }
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
