using Gpt.Model;
using Gpt.Weights;
using Microsoft.FSharp.Collections;
using Microsoft.FSharp.Core;
using FAdapter = Gpt.Weights.Adapter;
using FAdapterModule = Gpt.Weights.AdapterModule;

namespace Gpt;

/// <summary>A LoRA adapter (the book's appendix E) in Hugging Face PEFT's layout: a folder with
/// <c>adapter_config.json</c> and <c>adapter_model.safetensors</c> (and, for a classifier, <c>classifier_config.json</c>),
/// as a run with <see cref="RunSettings.LoraRank"/> writes to <c>runs/NAME/adapter</c>. A base model plus an adapter is
/// a model: apply it (unmerged: W x + (alpha / r) · B A x) or merge it (W + (alpha / r) · B A). Owns native memory:
/// dispose it.</summary>
public sealed class Adapter : IDisposable
{
    private readonly FAdapter _inner;

    private Adapter(FAdapter inner) => _inner = inner;

    /// <summary>Reads an adapter folder, checking its tensors against its configuration.</summary>
    /// <exception cref="GptException">A missing folder or file, a configuration that is not LoRA, another rank in the
    /// file than in the configuration, tensors for maps the targets do not name.</exception>
    public static Adapter Load(string directory)
    {
        ArgumentNullException.ThrowIfNull(directory);
        return Facade.Guard(() => new Adapter(FAdapterModule.read(directory)));
    }

    /// <summary>Writes the adapter folder, each file under a temporary name and then renamed.</summary>
    public void Save(string directory)
    {
        ArgumentNullException.ThrowIfNull(directory);
        Facade.Guard(() => FAdapterModule.write(directory, _inner));
    }

    /// <summary>r, the rank of each update B·A.</summary>
    public int Rank => _inner.Settings.Rank;

    /// <summary>PEFT's <c>lora_alpha</c>: updates are scaled by Alpha / Rank.</summary>
    public double Alpha => _inner.Settings.Alpha;

    /// <summary>The adapted maps, in canonical names (<c>attn.c_attn</c>, <c>attn.c_proj</c>, <c>mlp.c_fc</c>,
    /// <c>mlp.c_proj</c>, <c>lm_head</c>).</summary>
    public IReadOnlyList<string> Targets => _inner.Settings.Targets.ToArray();

    /// <summary>The base model it adapts (<c>base_model_name_or_path</c>), or null.</summary>
    public string? BaseModel => Options.ToObject(_inner.Config.BaseModel);

    /// <summary>PEFT's task type: <c>CAUSAL_LM</c> (a language model) or <c>SEQ_CLS</c> (a classifier).</summary>
    public string TaskType => _inner.Config.TaskType;

    /// <summary>Modules stored in full beside the adapters (a classifier's <c>score</c>).</summary>
    public IReadOnlyList<string> ModulesToSave => _inner.Config.ModulesToSave.ToArray();

    /// <summary>Whether the adapter belongs to a classifier.</summary>
    public bool IsClassifier => _inner.IsClassifier;

    /// <summary>The numbers it holds: rank × (in + out) per adapted map, plus modules trained in full.</summary>
    public long ParameterCount => _inner.ParameterCount;

    /// <summary>A new model: <paramref name="baseModel"/> with this adapter merged into its weights (the base is left
    /// as it is).</summary>
    public GptModel Merge(GptModel baseModel)
    {
        ArgumentNullException.ThrowIfNull(baseModel);
        if (IsClassifier) throw new GptException("this adapter is a classifier's (task SEQ_CLS): load it with Adapter.LoadClassifier");
        return new GptModel(FAdapterModule.merge(_inner, baseModel.Inner));
    }

    /// <summary>A language model with an adapter: <paramref name="baseModel"/> (any source <see cref="GptModel.Load(string)"/>
    /// takes; null: the adapter's own <c>base_model_name_or_path</c>) with the adapter applied, unmerged, or merged
    /// into its weights (the same results, a little faster).</summary>
    public static GptModel LoadModel(string adapterDirectory, string? baseModel = null, bool merge = false) =>
        LoadModel(adapterDirectory, baseModel, merge, new ModelLoadOptions());

    /// <summary><see cref="LoadModel(string, string?, bool)"/> with the base model loaded with <paramref name="options"/>
    /// (<see cref="ModelLoadOptions.AllowNonFinite"/> also lets the adapter's own tensors hold NaN or infinities).</summary>
    public static GptModel LoadModel(string adapterDirectory, string? baseModel, bool merge, ModelLoadOptions options)
    {
        ArgumentNullException.ThrowIfNull(adapterDirectory);
        ArgumentNullException.ThrowIfNull(options);
        return Facade.Guard(() => new GptModel(AdapterLoading.modelWith(GptModel.Options(options), merge, Options.SomeObject(baseModel), adapterDirectory)));
    }

    /// <summary>A classifier with an adapter: the base is a saved classifier, or a language model (the labels then
    /// come from the adapter's <c>classifier_config.json</c>); unmerged or merged.</summary>
    public static TextClassifier LoadClassifier(string adapterDirectory, string? baseModel = null, bool merge = false) =>
        LoadClassifier(adapterDirectory, baseModel, merge, new ModelLoadOptions());

    /// <summary><see cref="LoadClassifier(string, string?, bool)"/> with the base loaded with <paramref name="options"/>
    /// (<see cref="ModelLoadOptions.AllowNonFinite"/> also lets the adapter's own tensors hold NaN or infinities).</summary>
    public static TextClassifier LoadClassifier(string adapterDirectory, string? baseModel, bool merge, ModelLoadOptions options)
    {
        ArgumentNullException.ThrowIfNull(adapterDirectory);
        ArgumentNullException.ThrowIfNull(options);
        return Facade.Guard(() => TextClassifier.Wrap(AdapterLoading.classifierWith(GptModel.Options(options), merge, Options.SomeObject(baseModel), adapterDirectory)));
    }

    /// <summary>Writes the base with the adapter merged in as a plain model folder (a classifier's when the adapter
    /// or the base is one), atomically. Returns true when it wrote a classifier.</summary>
    public static bool Merge(string adapterDirectory, string outputDirectory, string? baseModel = null)
    {
        ArgumentNullException.ThrowIfNull(adapterDirectory);
        ArgumentNullException.ThrowIfNull(outputDirectory);
        return Facade.Guard(() => AdapterLoading.merge(Options.SomeObject(baseModel), adapterDirectory, outputDirectory));
    }

    /// <summary>The trainable parameters LoRA adds to a model of this shape: rank × (in + out) for every adapted map
    /// (<paramref name="targets"/> null: every map of the blocks).</summary>
    public static long CountParameters(GptConfiguration configuration, int rank, IReadOnlyList<string>? targets = null)
    {
        ArgumentNullException.ThrowIfNull(configuration);
        var settings = LoraSettingsModule.create(rank, FSharpOption<double>.None,
            targets is null ? FSharpOption<FSharpList<string>>.None : FSharpOption<FSharpList<string>>.Some(ListModule.OfSeq(targets)));
        return LoraSettingsModule.parameterCount(settings, configuration.ToFSharp());
    }

    /// <inheritdoc />
    public void Dispose() => ((IDisposable)_inner).Dispose();
}
