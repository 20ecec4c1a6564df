using Gpt.Model;
using Gpt.Weights;
using Microsoft.FSharp.Collections;
using Microsoft.FSharp.Core;

namespace Gpt;

/// <summary>What an adapter folder's <c>adapter_config.json</c> says (Hugging Face PEFT's LoRA layout).</summary>
/// <param name="Rank">r, the rank of each update B·A.</param>
/// <param name="Alpha">PEFT's <c>lora_alpha</c>: updates are scaled by Alpha / Rank.</param>
/// <param name="Targets">The adapted maps, in canonical names (<c>attn.c_attn</c>, <c>attn.c_proj</c>,
/// <c>mlp.c_fc</c>, <c>mlp.c_proj</c>, <c>lm_head</c>).</param>
/// <param name="BaseModel">The base model it adapts (<c>base_model_name_or_path</c>), or null.</param>
/// <param name="TaskType">PEFT's task type: <c>CAUSAL_LM</c> (a language model) or <c>SEQ_CLS</c> (a classifier).</param>
/// <param name="ModulesToSave">Modules stored in full beside the adapters (a classifier's <c>score</c>).</param>
public sealed record AdapterInfo(int Rank, double Alpha, IReadOnlyList<string> Targets, string? BaseModel, string TaskType,
    IReadOnlyList<string> ModulesToSave)
{
    /// <summary>Whether the adapter belongs to a classifier.</summary>
    public bool IsClassifier => TaskType == "SEQ_CLS";
}

/// <summary>LoRA adapters (the book's appendix E) in Hugging Face PEFT's layout: a folder with
/// <c>adapter_config.json</c> and <c>adapter_model.safetensors</c>, as <c>gpt train</c> / <c>gpt finetune</c> with
/// <see cref="RunSettings.LoraRank"/> write to <c>runs/NAME/adapter</c>. A base model plus an adapter is a model: load
/// it merged, or write the merged weights as a plain model folder.</summary>
public static class LoraAdapters
{
    /// <summary>Reads an adapter folder's configuration.</summary>
    /// <exception cref="GptException">A missing or malformed <c>adapter_config.json</c>, or an adapter that is not LoRA.</exception>
    public static AdapterInfo ReadInfo(string directory)
    {
        ArgumentNullException.ThrowIfNull(directory);
        var config = AdapterFiles.readConfig(Path.Combine(directory, AdapterFiles.configFileName));
        return new AdapterInfo(config.Settings.Rank, config.Settings.Alpha, config.Settings.Targets.ToArray(),
            Options.ToObject(config.BaseModel), config.TaskType, config.ModulesToSave.ToArray());
    }

    /// <summary>A language model with an adapter merged into it. <paramref name="baseModel"/>: any model source
    /// <see cref="GptModel.Load(string)"/> takes; null: the adapter's own <c>base_model_name_or_path</c>.</summary>
    public static GptModel LoadModel(string adapterDirectory, string? baseModel = null)
    {
        ArgumentNullException.ThrowIfNull(adapterDirectory);
        return new GptModel(AdapterFiles.loadMerged(Options.SomeObject(baseModel), adapterDirectory));
    }

    /// <summary>A classifier with an adapter merged into it: the base is a saved classifier, or a language model
    /// (the labels then come from the adapter's <c>classifier_config.json</c>).</summary>
    public static TextClassifier LoadClassifier(string adapterDirectory, string? baseModel = null)
    {
        ArgumentNullException.ThrowIfNull(adapterDirectory);
        return TextClassifier.Wrap(AdapterFiles.loadClassifier(Options.SomeObject(baseModel), adapterDirectory));
    }

    /// <summary>Writes the base with the adapter merged in as a plain model folder (a classifier's when the adapter
    /// is one), atomically. Returns true when it wrote a classifier.</summary>
    public static bool Merge(string adapterDirectory, string outputDirectory, string? baseModel = null)
    {
        ArgumentNullException.ThrowIfNull(adapterDirectory);
        ArgumentNullException.ThrowIfNull(outputDirectory);
        return AdapterFiles.merge(Options.SomeObject(baseModel), adapterDirectory, outputDirectory);
    }

    /// <summary>The trainable parameters LoRA adds to a model of this shape: rank × (in + out) for every adapted map
    /// (<paramref name="targets"/> null: every map of the blocks).</summary>
    public static long ParameterCount(GptConfiguration configuration, int rank, IReadOnlyList<string>? targets = null)
    {
        ArgumentNullException.ThrowIfNull(configuration);
        var settings = LoraSettingsModule.create(rank, FSharpOption<double>.None,
            targets is null ? FSharpOption<FSharpList<string>>.None : FSharpOption<FSharpList<string>>.Some(ListModule.OfSeq(targets)));
        return LoraSettingsModule.parameterCount(settings, configuration.ToFSharp());
    }
}
