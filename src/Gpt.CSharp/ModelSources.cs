using Gpt.Model;
using Gpt.Weights;
using Microsoft.FSharp.Core;

namespace Gpt;

/// <summary>Progress of a model download: <see cref="FileName"/>'s <see cref="BytesReceived"/> of
/// <see cref="TotalBytes"/> (when the server said); <see cref="Completed"/> once the file is checked and in the cache.</summary>
public sealed record ModelDownloadProgress(string FileName, long BytesReceived, long? TotalBytes, bool Completed);

/// <summary>How <see cref="GptModel.Load(string, ModelLoadOptions)"/> loads a model.</summary>
public sealed record ModelLoadOptions
{
    /// <summary>Load weights that hold NaN or infinities. By default that is a <see cref="GptException"/> naming the
    /// tensors (one NaN in a weight matrix quietly changes every output).</summary>
    public bool AllowNonFinite { get; init; }

    /// <summary>The configuration of a state dict file that carries none (the book's <c>.pth</c>); null: a
    /// <c>config.json</c> beside it, else the shapes.</summary>
    public GptConfiguration? Configuration { get; init; }

    /// <summary>Receives download progress (from the downloading thread).</summary>
    public IProgress<ModelDownloadProgress>? Progress { get; init; }

    /// <summary>Stops a download; what was received is kept and resumed next time.</summary>
    public CancellationToken CancellationToken { get; init; }
}

/// <summary>Where models come from: local folders and files, and Hugging Face ids.</summary>
public sealed partial class GptModel
{
    /// <summary>Loads a model from wherever it is: a folder in the Hugging Face layout or OpenAI's checkpoint folder
    /// (<c>hparams.json</c>, <c>model.ckpt.index</c>); a PyTorch state dict file (the book's <c>model.pth</c> or
    /// <c>model_and_optimizer.pth</c>, or Hugging Face names with a <c>config.json</c> beside it); or a Hugging Face id
    /// (<c>gpt2</c>, <c>openai-community/gpt2-medium</c>, <c>user/name@revision</c>) from the cache
    /// (<c>HF_HOME</c>), downloaded into it when missing (<c>HF_ENDPOINT</c>, <c>HF_TOKEN</c>; never with
    /// <c>HF_HUB_OFFLINE=1</c>).</summary>
    /// <param name="source">A path or a Hugging Face id.</param>
    /// <param name="progress">Receives download progress (from the downloading thread).</param>
    /// <param name="cancellationToken">Stops a download; what was received is kept and resumed next time.</param>
    /// <exception cref="GptException">Missing or bad files, an unknown id, a failed or corrupted download.</exception>
    public static GptModel Load(string source, IProgress<ModelDownloadProgress>? progress, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(source);
        return Load(source, new ModelLoadOptions { Progress = progress, CancellationToken = cancellationToken });
    }

    /// <summary>Loads a model from any source the other overloads take, with the options given (for example
    /// <c>new ModelLoadOptions { AllowNonFinite = true }</c> to inspect a model whose weights hold NaN). Names, dtypes
    /// and shapes are checked against the configuration before the model is built.</summary>
    /// <exception cref="GptException">Missing or bad files, non-finite weights (unless allowed), an unknown id, a
    /// failed download; any other failure (a file system or native error) as the inner exception of one.</exception>
    public static GptModel Load(string source, ModelLoadOptions options)
    {
        ArgumentNullException.ThrowIfNull(source);
        ArgumentNullException.ThrowIfNull(options);
        return Facade.Guard(() => new GptModel(ModelSource.loadWith(Options(options), source)));
    }

    /// <summary>Loads a state dict file that carries no configuration (the book's <c>.pth</c>) with this one's sizes and
    /// heads; whether there is a QKV bias and whether the head is tied follow the file.</summary>
    /// <exception cref="GptException">The file does not fit the configuration, or has its own (a folder, a hub id).</exception>
    public static GptModel Load(string source, GptConfiguration configuration, IProgress<ModelDownloadProgress>? progress = null,
        CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(source);
        ArgumentNullException.ThrowIfNull(configuration);
        return Load(source, new ModelLoadOptions { Configuration = configuration, Progress = progress, CancellationToken = cancellationToken });
    }

    /// <summary>A pretrained model by Hugging Face id, e.g. <c>GptModel.FromPretrained("gpt2")</c>: a local folder of that
    /// name first, then the Hugging Face cache, then a download into it. Takes every other source
    /// <see cref="Load(string, IProgress{ModelDownloadProgress}?, CancellationToken)"/> takes.</summary>
    /// <exception cref="GptException">An unknown id (404), no access (401/403: set <c>HF_TOKEN</c>), offline and not
    /// cached, a failed or corrupted download.</exception>
    public static GptModel FromPretrained(string id, IProgress<ModelDownloadProgress>? progress = null, CancellationToken cancellationToken = default) =>
        Load(id ?? throw new ArgumentNullException(nameof(id)), progress, cancellationToken);

    /// <summary>The local path of a source: the folder or file itself, or the cache's snapshot folder of a Hugging Face
    /// id (downloaded first when needed).</summary>
    /// <exception cref="GptException">As <see cref="FromPretrained"/>.</exception>
    public static string Locate(string source, IProgress<ModelDownloadProgress>? progress = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(source);
        return Facade.Guard(() => ModelSource.locate(Options(progress, null, cancellationToken, false), source));
    }

    /// <summary>What a source names, without reading weights or going online: <c>hugging-face-folder</c>,
    /// <c>openai-checkpoint</c>, <c>pytorch-state-dict</c>, <c>safetensors-file</c> or <c>hugging-face-hub</c>.</summary>
    /// <exception cref="GptException">A path that does not exist and is no id.</exception>
    public static string SourceKind(string source) =>
        ModelSource.kindName(ModelSource.classify(source ?? throw new ArgumentNullException(nameof(source))));

    /// <summary>Reads a configuration file: a Hugging Face <c>config.json</c> or the book's <c>GPT_CONFIG</c> as JSON
    /// (<c>vocab_size</c>, <c>context_length</c>, <c>emb_dim</c>, <c>n_heads</c>, <c>n_layers</c>, ...).</summary>
    /// <exception cref="GptException">Missing file, bad JSON, missing or invalid sizes.</exception>
    public static GptConfiguration ReadConfiguration(string path)
    {
        ArgumentNullException.ThrowIfNull(path);
        return Facade.Guard(() => GptConfiguration.From(ModelSource.readConfigFile(path)));
    }

    /// <summary>The F# core's options for these (also for <see cref="Adapter"/>'s base models).</summary>
    internal static ModelSourceOptions Options(ModelLoadOptions options) =>
        Options(options.Progress, options.Configuration, options.CancellationToken, options.AllowNonFinite);

    private static ModelSourceOptions Options(IProgress<ModelDownloadProgress>? progress, GptConfiguration? configuration,
        CancellationToken cancellationToken, bool allowNonFinite)
    {
        var defaults = ModelSource.defaults();
        var report = FuncConvert.FromAction<DownloadProgress>(p =>
            progress?.Report(new ModelDownloadProgress(p.FileName, p.BytesReceived, p.TotalBytes is { } t ? t.Value : (long?)null, p.Completed)));
        return new ModelSourceOptions(defaults.Hub, report,
            configuration is null ? FSharpOption<GptConfig>.None : FSharpOption<GptConfig>.Some(configuration.ToFSharp()), cancellationToken,
            allowNonFinite);
    }
}
