using Gpt.FineTuning;
using Gpt.Model;
using Gpt.Training;
using Gpt.Weights;
using Microsoft.FSharp.Collections;
using FClassification = Gpt.FineTuning.Classification;
using FOptions = Gpt.FineTuning.ClassificationOptions;

namespace Gpt;

/// <summary>Which position's hidden state a classifier classifies.</summary>
public enum ClassifierPooling
{
    /// <summary>The last real token of each text (Hugging Face's choice): padding changes nothing.</summary>
    LastToken,
    /// <summary>The last position of the padded batch (the book's <c>model(x)[:, -1, :]</c>).</summary>
    LastPosition,
}

/// <summary>
/// Everything that shapes classification fine-tuning (book chapter 6): where to start, the labelled texts, which
/// parameters train, and the run settings. The defaults are the book's: AdamW at 5e-5 with weight decay 0.1, 5 epochs,
/// batch 8, the last transformer block, the final LayerNorm and the head trained, the built-in messages split 70/10/20
/// when no data is given. Every <c>gpt finetune classify</c> option has a property here.
/// </summary>
public sealed record ClassifierTrainingOptions : RunSettings
{
    /// <summary>Fine-tuning that starts from <paramref name="model"/>: a language model (a folder, a file, a Hugging
    /// Face id) gets a new head; a saved classifier keeps its own.</summary>
    public ClassifierTrainingOptions(string model) : base(TrainingSettingsModule.bookFineTuning(5))
    {
        ArgumentNullException.ThrowIfNull(model);
        Model = model;
    }

    private ClassifierTrainingOptions(TrainingSettings settings, string model) : base(settings) => Model = model;

    /// <summary>The model fine-tuning starts from.</summary>
    public string Model { get; init; }

    /// <summary>The training texts: CSV or TSV with a header, JSON Lines, or the SMS Spam Collection as downloaded.
    /// Null (and <see cref="Data"/> null): the built-in messages.</summary>
    public string? Train { get; init; }

    /// <summary>The validation texts (with <see cref="Train"/>).</summary>
    public string? Validation { get; init; }

    /// <summary>The test texts (with <see cref="Train"/>), measured once at the end.</summary>
    public string? Test { get; init; }

    /// <summary>One file split into training, validation and test texts (seeded shuffle), instead of
    /// <see cref="Train"/>.</summary>
    public string? Data { get; init; }

    /// <summary>Share of <see cref="Data"/> for training (the book's 0.7).</summary>
    public double TrainFraction { get; init; } = 0.7;

    /// <summary>Share of <see cref="Data"/> for validation (the book's 0.1); the rest is the test split.</summary>
    public double ValidationFraction { get; init; } = 0.1;

    /// <summary>The text column of CSV and TSV files (JSON Lines: the key).</summary>
    public string TextColumn { get; init; } = ClassificationData.defaultTextColumn;

    /// <summary>The label column of CSV and TSV files (JSON Lines: the key).</summary>
    public string LabelColumn { get; init; } = ClassificationData.defaultLabelColumn;

    /// <summary>The labels in id order (null: in order of first appearance in the training texts).</summary>
    public IReadOnlyList<string>? Labels { get; init; }

    /// <summary>Undersample every label to the count of the rarest (the book's balanced data set).</summary>
    public bool Balance { get; init; }

    /// <summary>Which position is classified (null: a saved classifier's own, <see cref="ClassifierPooling.LastToken"/>
    /// for a new head).</summary>
    public ClassifierPooling? Pooling { get; init; }

    /// <summary>Which parameters train: <c>last-block</c> (the book), <c>last-N</c>, <c>head</c> or <c>all</c>.</summary>
    public string Trainable { get; init; } = "last-block";

    /// <summary>Pad and truncate every text to this many tokens (null: each batch padded to its longest).</summary>
    public int? MaxLength { get; init; }

    /// <summary>Dropout during fine-tuning (the book's 0).</summary>
    public double DropRate { get; init; }

    /// <summary>Shuffle the training texts every epoch (false: file order).</summary>
    public bool Shuffle { get; init; } = true;

    /// <summary>The options a classification run was trained with, read back from its folder or a checkpoint, with
    /// <see cref="RunSettings.ResumeFrom"/> set to <paramref name="path"/>.</summary>
    /// <exception cref="GptException">No complete checkpoint, or not a classification run.</exception>
    public static ClassifierTrainingOptions FromCheckpoint(string path)
    {
        ArgumentNullException.ThrowIfNull(path);
        return Facade.Guard(() => From(FClassification.fromCheckpoint(path)));
    }

    /// <summary>Checks the options that need no file (the run checks the rest when it starts).</summary>
    /// <exception cref="GptException">With a message naming the bad option.</exception>
    public void Validate() => ClassificationOptionsModule.validate(ToFSharp());

    internal FOptions ToFSharp() => new(
        Model, Options.SomeObject(Train), Options.SomeObject(Validation), Options.SomeObject(Test), Options.SomeObject(Data),
        new Tuple<double, double>(TrainFraction, ValidationFraction), TextColumn, LabelColumn,
        Labels is null ? null : Microsoft.FSharp.Core.FSharpOption<FSharpList<string>>.Some(ListModule.OfSeq(Labels)),
        Balance, Pooling is { } p ? Microsoft.FSharp.Core.FSharpOption<Gpt.Model.Pooling>.Some(p == ClassifierPooling.LastPosition ? Gpt.Model.Pooling.LastPosition : Gpt.Model.Pooling.LastToken) : null,
        TrainableSet.Parse(Trainable), Options.Some(MaxLength), DropRate, Shuffle, ToSettings());

    internal static ClassifierTrainingOptions From(FOptions o) => new(o.Training, o.Model)
    {
        Train = Options.ToObject(o.Train), Validation = Options.ToObject(o.Validation), Test = Options.ToObject(o.Test),
        Data = Options.ToObject(o.Data), TrainFraction = o.Split.Item1, ValidationFraction = o.Split.Item2,
        TextColumn = o.TextColumn, LabelColumn = o.LabelColumn, Labels = Options.ToObject(o.Labels)?.ToArray(),
        Balance = o.Balance, Pooling = Options.ToObject(o.Pooling) is { } p ? TextClassifier.ToPooling(p) : null,
        Trainable = o.Trainable.Name, MaxLength = Options.ToNullable(o.MaxLength), DropRate = o.DropRate, Shuffle = o.Shuffle,
    };
}

/// <summary>How classification fine-tuning ended.</summary>
/// <param name="Training">The run: steps, losses, folders (the classifier is in <see cref="TrainingResult.ModelDirectory"/>).</param>
/// <param name="Labels">The labels in id order.</param>
/// <param name="TestAccuracy">Accuracy on the whole test split (null when there is none).</param>
/// <param name="TestLoss">Mean cross-entropy on the test split (null when there is none).</param>
/// <param name="TrainExamples">Training texts.</param>
/// <param name="ValidationExamples">Validation texts.</param>
/// <param name="TestExamples">Test texts.</param>
/// <param name="TruncatedTexts">Texts longer than the maximum length, cut to it.</param>
public sealed record ClassificationResult(
    TrainingResult Training, IReadOnlyList<string> Labels, double? TestAccuracy, double? TestLoss, int TrainExamples,
    int ValidationExamples, int TestExamples, int TruncatedTexts);

/// <summary>One text classified.</summary>
/// <param name="Text">The text.</param>
/// <param name="Label">The most likely label.</param>
/// <param name="LabelId">Its id.</param>
/// <param name="Probabilities">Every label's probability (softmax of the logits).</param>
/// <param name="Logits">The logits in label id order.</param>
public sealed record ClassPrediction(string Text, string Label, int LabelId, IReadOnlyDictionary<string, double> Probabilities, IReadOnlyList<double> Logits);

/// <summary>A GPT-2 text classifier (book chapter 6) in Hugging Face's GPT2ForSequenceClassification layout. Owns
/// native memory: dispose it.</summary>
public sealed class TextClassifier : IDisposable
{
    internal GptClassifier Inner { get; }

    private TextClassifier(GptClassifier inner) => Inner = inner;

    internal static TextClassifier Wrap(GptClassifier inner) => new(inner);

    /// <summary>Loads a classifier folder (<c>config.json</c> + <c>model.safetensors</c>).</summary>
    /// <exception cref="GptException">Missing or bad files, or a folder that holds a language model.</exception>
    public static TextClassifier Load(string directory) => Load(directory, new ModelLoadOptions());

    /// <summary>Loads a classifier folder with options (<see cref="ModelLoadOptions.AllowNonFinite"/>; the others do not
    /// apply to a classifier folder).</summary>
    /// <exception cref="GptException">Missing or bad files, non-finite weights (unless allowed), a language model's
    /// folder; any other failure as the inner exception of one.</exception>
    public static TextClassifier Load(string directory, ModelLoadOptions options)
    {
        ArgumentNullException.ThrowIfNull(directory);
        ArgumentNullException.ThrowIfNull(options);
        var load = new Gpt.Weights.LoadOptions(options.AllowNonFinite);
        return Facade.Guard(() => new TextClassifier(ClassifierFiles.loadFrom(load, null, directory)));
    }

    /// <summary>Saves in the same layout, atomically.</summary>
    public void Save(string directory)
    {
        ArgumentNullException.ThrowIfNull(directory);
        Facade.Guard(() => ClassifierFiles.save(directory, Inner));
    }

    /// <summary>The labels in id order.</summary>
    public IReadOnlyList<string> Labels => Inner.Labels;

    /// <summary>The body's shape.</summary>
    public GptConfiguration Configuration => GptConfiguration.From(Inner.Config.Body);

    /// <summary>Which position is classified.</summary>
    public ClassifierPooling Pooling => ToPooling(Inner.Config.Pooling);

    /// <summary>Number of parameters.</summary>
    public long ParameterCount => Inner.ParameterCount;

    /// <summary>Where the parameters are: <c>cpu</c>, or <c>cuda:N</c>.</summary>
    public string Device => Gpt.Model.DeviceModule.describe(Inner.parameters().First().device);

    /// <summary>Moves the classifier to a device (<c>cpu</c>, <c>cuda</c>, <c>cuda:N</c>, <c>auto</c>) and returns
    /// it.</summary>
    /// <exception cref="GptException">An unknown device, or CUDA where there is none.</exception>
    public TextClassifier ToDevice(string device)
    {
        ArgumentNullException.ThrowIfNull(device);
        Gpt.Model.DeviceModule.place(Gpt.Model.DeviceModule.parse(device), Inner);
        return this;
    }

    /// <summary>Classifies a text (GPT-2's tokenizer unless another is given), the body's weights read in
    /// <paramref name="dtype"/> (see <see cref="ClassifyBatch"/>).</summary>
    /// <exception cref="GptException">An empty text.</exception>
    public ClassPrediction Classify(string text, Tokenizer? tokenizer = null, Dtype dtype = Dtype.Float32) =>
        ClassifyBatch([text ?? throw new ArgumentNullException(nameof(text))], tokenizer, dtype)[0];

    private readonly Dictionary<Dtype, Gpt.FineTuning.ClassifierDecoder> _decoders = [];

    /// <summary>Classifies several texts. <paramref name="dtype"/> as in generation: <see cref="Dtype.Float32"/> reads
    /// the classifier's own weights through the CPU decoder where it can (CPU, float32, no adapters), else runs through
    /// TorchSharp on the classifier's device; <see cref="Dtype.Float16"/> and <see cref="Dtype.BFloat16"/> use a
    /// half-precision copy of the body made on first use and kept with the classifier (the façade never changes a
    /// loaded classifier's weights), on the CPU.</summary>
    /// <exception cref="GptException">An empty text; float16 for weights beyond its range.</exception>
    public IReadOnlyList<ClassPrediction> ClassifyBatch(IEnumerable<string> texts, Tokenizer? tokenizer = null, Dtype dtype = Dtype.Float32)
    {
        ArgumentNullException.ThrowIfNull(texts);
        var all = texts.Select(t => t ?? throw new ArgumentNullException(nameof(texts))).ToArray();
        var tok = (tokenizer ?? Tokenizer.Gpt2).Inner;
        var predictions = Facade.Guard(() =>
        {
            if (dtype == Dtype.Float32) return FClassification.classifyAs(dtype.ToCore(), Inner, tok, all);
            Gpt.FineTuning.ClassifierDecoder decoder;
            lock (_decoders)
            {
                if (!_decoders.TryGetValue(dtype, out decoder!))
                    _decoders[dtype] = decoder = FClassification.decoder(dtype.ToCore(), Inner);
            }
            return FClassification.classifyWith(decoder, tok, all);
        });
        return predictions.Select(p => new ClassPrediction(p.Text, p.Label, p.LabelId,
            Inner.Labels.Zip(p.Probabilities).ToDictionary(x => x.First, x => x.Second), p.Logits)).ToArray();
    }

    /// <summary>Fine-tunes a classifier on a thread of its own (see <see cref="Trainer.TrainAsync(TrainingOptions, IProgress{TrainingProgress}?, CancellationToken)"/>): cancelling stops
    /// after the current step with a checkpoint and the classifier so far.</summary>
    /// <exception cref="GptException">Through the task: bad options, unreadable texts (naming file and line), an
    /// unknown label, a model that cannot be loaded, an incompatible checkpoint.</exception>
    public static Task<ClassificationResult> FineTuneAsync(ClassifierTrainingOptions options, IProgress<TrainingProgress>? progress = null,
        CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(options);
        return Trainer.OnThreadOfItsOwn(() => FineTune(options, progress, cancellationToken));
    }

    /// <summary>Fine-tunes a classifier on the calling thread (see <see cref="Trainer.Train(TrainingOptions, IProgress{TrainingProgress}?, CancellationToken)"/>).</summary>
    public static ClassificationResult FineTune(ClassifierTrainingOptions options, IProgress<TrainingProgress>? progress = null,
        CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(options);
        var r = Facade.Guard(() => FClassification.fineTune(options.ToFSharp(), Trainer.Reporter(progress), cancellationToken));
        return new ClassificationResult(Trainer.ToResult(r.Run), r.Labels, Options.ToNullable(r.TestAccuracy), Options.ToNullable(r.TestLoss),
            r.TrainExamples, r.ValidationExamples, r.TestExamples, r.TruncatedTexts);
    }

    internal static ClassifierPooling ToPooling(Gpt.Model.Pooling pooling) =>
        pooling.IsLastPosition ? ClassifierPooling.LastPosition : ClassifierPooling.LastToken;

    /// <inheritdoc />
    public void Dispose()
    {
        lock (_decoders)
        {
            foreach (var decoder in _decoders.Values) ((IDisposable)decoder).Dispose();
            _decoders.Clear();
        }
        Inner.Dispose();
    }
}
