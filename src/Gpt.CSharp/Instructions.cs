using System.Runtime.CompilerServices;
using Gpt.FineTuning;
using Gpt.Training;
using FInstruction = Gpt.FineTuning.Instruction;
using FOptions = Gpt.FineTuning.InstructionOptions;

namespace Gpt;

/// <summary>How an instruction is turned into a prompt.</summary>
public enum PromptStyle
{
    /// <summary>The book's (Stanford Alpaca's): "Below is an instruction ...", "### Instruction:", "### Input:" when
    /// there is an input, "### Response:".</summary>
    Alpaca,
    /// <summary>Phi-3's (the book's exercise 7.1): "&lt;|user|&gt;", then "&lt;|assistant|&gt;:".</summary>
    Phi3,
}

/// <summary>One instruction with an optional input and, for training and scoring, the expected output.</summary>
/// <param name="Instruction">What to do.</param>
/// <param name="Input">What to do it with (empty: none).</param>
/// <param name="Output">The expected response (empty when unknown).</param>
public sealed record InstructionEntry(string Instruction, string Input = "", string Output = "")
{
    internal Gpt.FineTuning.InstructionEntry ToFSharp(string where = "entry") =>
        new(Instruction ?? throw new ArgumentNullException(nameof(Instruction)), Input ?? "", Output ?? "", where);
}

/// <summary>
/// Everything that shapes instruction fine-tuning (book chapter 7): the model, the entries, the prompt style, the
/// collation and the run settings. The defaults are the book's: every parameter trained, AdamW at 5e-5 with weight decay
/// 0.1, 2 epochs, batch 8, the alpaca prompt, the built-in instructions split 85/10/5 when no data is given. Every
/// <c>gpt finetune instruct</c> option has a property here.
/// </summary>
public sealed record InstructionTrainingOptions : RunSettings
{
    /// <summary>Fine-tuning of <paramref name="model"/> (a folder, a file, a Hugging Face id).</summary>
    public InstructionTrainingOptions(string model) : base(TrainingSettingsModule.bookFineTuning(2))
    {
        ArgumentNullException.ThrowIfNull(model);
        Model = model;
    }

    private InstructionTrainingOptions(TrainingSettings settings, string model) : base(settings) => Model = model;

    /// <summary>The language model to fine-tune.</summary>
    public string Model { get; init; }

    /// <summary>The training entries: a JSON list (the book's instruction-data.json) or JSON Lines of
    /// <c>{"instruction", "input", "output"}</c>. Null (and <see cref="Data"/> null): the built-in instructions.</summary>
    public string? Train { get; init; }

    /// <summary>The validation entries (with <see cref="Train"/>).</summary>
    public string? Validation { get; init; }

    /// <summary>The test entries (with <see cref="Train"/>): answered after training into test-responses.json.</summary>
    public string? Test { get; init; }

    /// <summary>One file split into training, validation and test entries (seeded shuffle).</summary>
    public string? Data { get; init; }

    /// <summary>Share of <see cref="Data"/> for training (the book's 0.85).</summary>
    public double TrainFraction { get; init; } = 0.85;

    /// <summary>Share of <see cref="Data"/> for validation (the book's 0.1); the rest is the test split.</summary>
    public double ValidationFraction { get; init; } = 0.1;

    /// <summary>How entries become prompts.</summary>
    public PromptStyle PromptStyle { get; init; } = PromptStyle.Alpaca;

    /// <summary>Learn only the response: the prompt's targets are ignored too (the book's exercise 7.2).</summary>
    public bool MaskInstruction { get; init; }

    /// <summary>Cut collated batches to this many tokens (null: the model's context).</summary>
    public int? MaxLength { get; init; }

    /// <summary>Dropout during fine-tuning (the book's 0).</summary>
    public double DropRate { get; init; }

    /// <summary>Shuffle the training entries every epoch (false: file order).</summary>
    public bool Shuffle { get; init; } = true;

    /// <summary>The most tokens of each test response generated after training (the book's 256).</summary>
    public int ResponseTokens { get; init; } = 256;

    /// <summary>The options an instruction run was trained with, read back from its folder or a checkpoint, with
    /// <see cref="RunSettings.ResumeFrom"/> set to <paramref name="path"/>.</summary>
    public static InstructionTrainingOptions FromCheckpoint(string path)
    {
        ArgumentNullException.ThrowIfNull(path);
        return Facade.Guard(() => From(FInstruction.fromCheckpoint(path)));
    }

    /// <summary>Checks the options that need no file (the run checks the rest when it starts).</summary>
    public void Validate() => InstructionOptionsModule.validate(ToFSharp());

    internal FOptions ToFSharp() => new(
        Model, Options.SomeObject(Train), Options.SomeObject(Validation), Options.SomeObject(Test), Options.SomeObject(Data),
        new Tuple<double, double>(TrainFraction, ValidationFraction), InstructionModel.ToFSharp(PromptStyle), MaskInstruction,
        Options.Some(MaxLength), DropRate, Shuffle, ResponseTokens, ToSettings());

    internal static InstructionTrainingOptions From(FOptions o) => new(o.Training, o.Model)
    {
        Train = Options.ToObject(o.Train), Validation = Options.ToObject(o.Validation), Test = Options.ToObject(o.Test),
        Data = Options.ToObject(o.Data), TrainFraction = o.Split.Item1, ValidationFraction = o.Split.Item2,
        PromptStyle = o.PromptStyle.IsPhi3 ? PromptStyle.Phi3 : PromptStyle.Alpaca, MaskInstruction = o.MaskInstruction,
        MaxLength = Options.ToNullable(o.MaxLength), DropRate = o.DropRate, Shuffle = o.Shuffle, ResponseTokens = o.ResponseTokens,
    };
}

/// <summary>How instruction fine-tuning ended.</summary>
/// <param name="Training">The run (the model is in <see cref="TrainingResult.ModelDirectory"/>, the language-model
/// layout).</param>
/// <param name="ResponsesFile">test-responses.json: the test entries with "model_response" (null without test
/// entries).</param>
/// <param name="ExactMatch">Mean exact match of the test responses (normalised as SQuAD does).</param>
/// <param name="TokenF1">Mean token F1 of the test responses.</param>
/// <param name="TrainExamples">Training entries.</param>
/// <param name="ValidationExamples">Validation entries.</param>
/// <param name="TestExamples">Test entries.</param>
public sealed record InstructionResult(TrainingResult Training, string? ResponsesFile, double? ExactMatch, double? TokenF1,
    int TrainExamples, int ValidationExamples, int TestExamples);

/// <summary>A language model that answers instructions (book chapter 7): the prompt style's formatting, generation that
/// stops at end-of-text, the response extracted as the book does. Owns native memory: dispose it.</summary>
public sealed class InstructionModel : IDisposable
{
    private readonly GptModel _model;

    private InstructionModel(GptModel model, PromptStyle style)
    {
        _model = model;
        Style = style;
    }

    /// <summary>Loads a model (any source <see cref="GptModel.Load(string)"/> takes) to answer in a prompt style.</summary>
    public static InstructionModel Load(string source, PromptStyle style = PromptStyle.Alpaca) => new(GptModel.Load(source), style);

    /// <summary>Loads a base model with a LoRA adapter applied (<see cref="Adapter.LoadModel(string, string?, bool)"/>;
    /// <paramref name="baseModel"/> null: the adapter's own base).</summary>
    public static InstructionModel LoadWithAdapter(string adapterDirectory, string? baseModel = null, PromptStyle style = PromptStyle.Alpaca) =>
        new(Adapter.LoadModel(adapterDirectory, baseModel), style);

    /// <summary><see cref="LoadWithAdapter(string, string?, PromptStyle)"/> with the base loaded with
    /// <paramref name="options"/> (for example <see cref="ModelLoadOptions.AllowNonFinite"/>).</summary>
    public static InstructionModel LoadWithAdapter(string adapterDirectory, string? baseModel, PromptStyle style, ModelLoadOptions options) =>
        new(Adapter.LoadModel(adapterDirectory, baseModel, merge: false, options), style);

    /// <summary>Loads a model with options (for example <see cref="ModelLoadOptions.AllowNonFinite"/>) to answer in a
    /// prompt style.</summary>
    public static InstructionModel Load(string source, PromptStyle style, ModelLoadOptions options) => new(GptModel.Load(source, options), style);

    /// <summary>The prompt style.</summary>
    public PromptStyle Style { get; }

    /// <summary>The language model underneath.</summary>
    public GptModel Model => _model;

    /// <summary>The prompt an entry becomes.</summary>
    public string Prompt(InstructionEntry entry) =>
        InstructionData.prompt(ToFSharp(Style), (entry ?? throw new ArgumentNullException(nameof(entry))).ToFSharp());

    /// <summary>The response to an instruction (greedy and at most 256 tokens unless the settings say otherwise; stops at
    /// end-of-text).</summary>
    public string Respond(InstructionEntry entry, GenerationSettings? settings = null) =>
        // FInstruction.respond's steps (prompt, generation, extraction) through the model, so that the settings' dtype applies.
        InstructionData.response(ToFSharp(Style), _model.Generate(Prompt(entry ?? throw new ArgumentNullException(nameof(entry))), Settings(settings)).Text);

    /// <summary>The response computed on the thread pool (generation never runs on the caller's synchronisation
    /// context). Cancelling stops before the next token and throws <see cref="OperationCanceledException"/>, as
    /// <see cref="StreamAsync"/> does.</summary>
    /// <exception cref="OperationCanceledException">The token was cancelled.</exception>
    public Task<string> RespondAsync(InstructionEntry entry, GenerationSettings? settings = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(entry);
        var prompt = Prompt(entry);
        var style = ToFSharp(Style);
        // The pieces concatenate to the decoded tokens: the same response as Respond's (the settings' dtype applies).
        return Task.Run(() => InstructionData.response(style, _model.Stream(prompt, _ => { }, Settings(settings), null, cancellationToken)),
            cancellationToken);
    }

    /// <summary>The generated continuation of the prompt as it comes, piece by piece (the response marker is part of it:
    /// the whole text, trimmed after the marker, is <see cref="Respond"/>'s result). Computed on the thread pool, never
    /// on the caller's synchronisation context; cancelling throws <see cref="OperationCanceledException"/> from the
    /// <c>await foreach</c> (see <see cref="GptModel.StreamAsync"/>).</summary>
    /// <exception cref="OperationCanceledException">The token was cancelled.</exception>
    public async IAsyncEnumerable<string> StreamAsync(InstructionEntry entry, GenerationSettings? settings = null,
        [EnumeratorCancellation] CancellationToken cancellationToken = default)
    {
        await foreach (var piece in _model.StreamAsync(Prompt(entry), Settings(settings), null, cancellationToken).ConfigureAwait(false))
            yield return piece;
    }

    /// <summary>Fine-tunes a model on instructions on a thread of its own (see <see cref="Trainer.TrainAsync(TrainingOptions, IProgress{TrainingProgress}?, CancellationToken)"/>).</summary>
    public static Task<InstructionResult> FineTuneAsync(InstructionTrainingOptions options, IProgress<TrainingProgress>? progress = null,
        CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(options);
        return Trainer.OnThreadOfItsOwn(() => FineTune(options, progress, cancellationToken));
    }

    /// <summary>Fine-tunes a model on instructions on the calling thread (see <see cref="Trainer.Train(TrainingOptions, IProgress{TrainingProgress}?, CancellationToken)"/>).</summary>
    public static InstructionResult FineTune(InstructionTrainingOptions options, IProgress<TrainingProgress>? progress = null,
        CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(options);
        var r = Facade.Guard(() => FInstruction.fineTune(options.ToFSharp(), Trainer.Reporter(progress), cancellationToken));
        return new InstructionResult(Trainer.ToResult(r.Run), Options.ToObject(r.ResponsesFile), Options.ToNullable(r.ExactMatch),
            Options.ToNullable(r.TokenF1), r.TrainExamples, r.ValidationExamples, r.TestExamples);
    }

    private static GenerationSettings Settings(GenerationSettings? settings) => settings ?? new GenerationSettings { MaxNewTokens = 256 };

    internal static Gpt.FineTuning.PromptStyle ToFSharp(PromptStyle style) =>
        style == PromptStyle.Phi3 ? Gpt.FineTuning.PromptStyle.Phi3 : Gpt.FineTuning.PromptStyle.Alpaca;

    /// <inheritdoc />
    public void Dispose() => _model.Dispose();
}

/// <summary>Where a judge model is served (book section 7.8): Ollama (the book's) or an OpenAI-compatible endpoint.</summary>
/// <param name="Url">The server, such as http://localhost:11434.</param>
/// <param name="Api"><c>ollama</c> or <c>openai</c>.</param>
/// <param name="Model">The judge model (the book: llama3).</param>
/// <param name="ApiKey">A bearer token, when the server wants one.</param>
/// <param name="Attempts">Tries per response.</param>
public sealed record JudgeSettings(string Url, string Api = "ollama", string Model = "llama3", string? ApiKey = null, int Attempts = 3)
{
    internal Gpt.FineTuning.JudgeSettings ToFSharp() => new(
        Url ?? throw new ArgumentNullException(nameof(Url)), JudgeApi.Parse(Api), Model ?? "llama3", Options.SomeObject(ApiKey), Attempts,
        TimeSpan.FromMinutes(2));
}

/// <summary>A response with its scores.</summary>
public sealed record ScoredResponse(InstructionEntry Entry, string Response, double ExactMatch, double TokenF1, int? Score);

/// <summary>The scores of a set of responses.</summary>
public sealed record ResponseSummary(int Entries, double ExactMatch, double TokenF1, double? AverageScore, int Scored);

/// <summary>Scores responses: exact match and token F1, and a judge model's 0-100 when asked.</summary>
public static class ResponseScores
{
    /// <summary>Scores the entries of a responses file (test-responses.json, the book's
    /// instruction-data-with-response.json).</summary>
    /// <exception cref="GptException">A bad file, or an unreachable or failing judge.</exception>
    public static ResponseSummary Score(string responsesFile, JudgeSettings? judge = null, Action<ScoredResponse>? onScored = null,
        CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(responsesFile);
        var responses = Facade.Guard(() => InstructionData.readResponses(responsesFile));
        var report = Microsoft.FSharp.Core.FuncConvert.FromAction<Gpt.FineTuning.ScoredResponse>(s => onScored?.Invoke(new ScoredResponse(
            new InstructionEntry(s.Entry.Instruction, s.Entry.Input, s.Entry.Output), s.Response, s.ExactMatch, s.TokenF1, Options.ToNullable(s.Score))));
        var summary = Gpt.FineTuning.ResponseScores.evaluate(Options.SomeObject(judge?.ToFSharp()), responses, report, cancellationToken);
        return new ResponseSummary(summary.Entries, summary.ExactMatch, summary.TokenF1, Options.ToNullable(summary.AverageScore), summary.Scored);
    }
}
