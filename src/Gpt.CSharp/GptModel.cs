using Gpt.Model;
using Gpt.Weights;
using Microsoft.FSharp.Core;
using TorchSharp;
using FGptModel = Gpt.Model.GptModel;

namespace Gpt;

/// <summary>The shape of a GPT model. Presets: <see cref="Gpt2Small"/> (124M), <see cref="Gpt2Medium"/> (355M),
/// <see cref="Gpt2Large"/> (774M), <see cref="Gpt2Xl"/> (1558M); or any custom size.</summary>
public sealed record GptConfiguration
{
    /// <summary>Number of token ids (50,257 for GPT-2's BPE).</summary>
    public int VocabularySize { get; init; } = 50257;
    /// <summary>Longest input: the number of learned positions.</summary>
    public int ContextLength { get; init; } = 1024;
    /// <summary>Width of the residual stream.</summary>
    public int EmbeddingDim { get; init; } = 768;
    /// <summary>Attention heads; must divide <see cref="EmbeddingDim"/>.</summary>
    public int Heads { get; init; } = 12;
    /// <summary>Transformer blocks.</summary>
    public int Layers { get; init; } = 12;
    /// <summary>Dropout probability in [0, 1), active only in training.</summary>
    public double DropRate { get; init; } = 0.1;
    /// <summary>Bias on the query/key/value projection (the released GPT-2 has one).</summary>
    public bool QkvBias { get; init; } = true;
    /// <summary>Output head tied to the token embedding (as the released GPT-2).</summary>
    public bool TiedHead { get; init; } = true;
    /// <summary>LayerNorm epsilon.</summary>
    public double LayerNormEpsilon { get; init; } = 1e-5;

    /// <summary>The released GPT-2 124M.</summary>
    public static GptConfiguration Gpt2Small { get; } = From(GptConfigModule.gpt2Small);
    /// <summary>GPT-2 355M.</summary>
    public static GptConfiguration Gpt2Medium { get; } = From(GptConfigModule.gpt2Medium);
    /// <summary>GPT-2 774M.</summary>
    public static GptConfiguration Gpt2Large { get; } = From(GptConfigModule.gpt2Large);
    /// <summary>GPT-2 1558M.</summary>
    public static GptConfiguration Gpt2Xl { get; } = From(GptConfigModule.gpt2Xl);

    /// <summary>A preset by name: gpt2-small, gpt2-medium, gpt2-large or gpt2-xl.</summary>
    /// <exception cref="GptException">Unknown name.</exception>
    public static GptConfiguration FromPreset(string name) => From(GptConfigModule.byName(name ?? throw new ArgumentNullException(nameof(name))));

    /// <summary>The configuration of a model folder in the Hugging Face layout (its <c>config.json</c>).</summary>
    /// <exception cref="GptException">Missing or bad <c>config.json</c>.</exception>
    public static GptConfiguration FromModelDirectory(string directory)
    {
        ArgumentNullException.ThrowIfNull(directory);
        return Facade.Guard(() => From(Pretrained.readConfig(System.IO.Path.Combine(directory, Pretrained.configFileName))));
    }

    /// <summary>Number of parameters a model of this shape has.</summary>
    public long ParameterCount => GptConfigModule.parameterCount(ToFSharp());

    /// <summary>Memory of the parameters in float32, in bytes.</summary>
    public long MemoryBytes => GptConfigModule.memoryBytes(ToFSharp());

    /// <summary>Checks the configuration.</summary>
    /// <exception cref="GptException">With a message naming the bad value.</exception>
    public void Validate() => GptConfigModule.validate(ToFSharp());

    internal GptConfig ToFSharp() => new(VocabularySize, ContextLength, EmbeddingDim, Heads, Layers, DropRate, QkvBias, TiedHead, LayerNormEpsilon);

    internal static GptConfiguration From(GptConfig c) => new()
    {
        VocabularySize = c.VocabSize, ContextLength = c.ContextLength, EmbeddingDim = c.EmbeddingDim, Heads = c.Heads,
        Layers = c.Layers, DropRate = c.DropRate, QkvBias = c.QkvBias, TiedHead = c.TiedHead, LayerNormEpsilon = c.LayerNormEpsilon,
    };
}

/// <summary>A GPT-2 model. Owns native memory: dispose it.</summary>
public sealed partial class GptModel : IDisposable
{
    internal FGptModel Inner { get; }

    internal GptModel(FGptModel inner) => Inner = inner;

    /// <summary>A freshly initialised model (GPT-2 initialisation; the same seed gives the same weights).</summary>
    /// <exception cref="GptException">The configuration is invalid.</exception>
    public static GptModel Create(GptConfiguration configuration, long? seed = null)
    {
        ArgumentNullException.ThrowIfNull(configuration);
        return Facade.Guard(() =>
        {
            var config = configuration.ToFSharp();
            GptConfigModule.validate(config);
            // Before libtorch reserves memory it may not have: a model larger than memory is killed, not refused.
            ModelMemory.require("model configuration", config);
            return new GptModel(new FGptModel(config, seed is { } s ? FSharpOption<long>.Some(s) : FSharpOption<long>.None));
        });
    }

    /// <summary>Loads a model: a folder in the Hugging Face GPT-2 layout (<c>config.json</c> + <c>model.safetensors</c>),
    /// OpenAI's checkpoint folder, a <c>.pth</c> state dict or a Hugging Face id (see
    /// <see cref="Load(string, IProgress{ModelDownloadProgress}?, CancellationToken)"/>).</summary>
    /// <exception cref="GptException">Missing or bad files, with the file, tensor, expected and found shapes.</exception>
    public static GptModel Load(string source) => Load(source, (IProgress<ModelDownloadProgress>?)null);

    /// <summary>Saves in the Hugging Face GPT-2 layout, atomically (what was there is replaced only when all is written).</summary>
    public void Save(string directory)
    {
        ArgumentNullException.ThrowIfNull(directory);
        Facade.Guard(() => Pretrained.save(directory, Inner));
    }

    /// <summary>The model's shape.</summary>
    public GptConfiguration Configuration => GptConfiguration.From(Inner.Config);

    /// <summary>Number of parameters.</summary>
    public long ParameterCount => Inner.ParameterCount;

    /// <summary>Where the parameters are: <c>cpu</c>, or <c>cuda:N</c>. Generation, logits and training run there
    /// (inputs follow the model).</summary>
    public string Device => Gpt.Model.DeviceModule.describe(Inner.parameters().First().device);

    /// <summary>Moves the model to a device and returns it: <c>cpu</c>, <c>cuda</c>, <c>cuda:N</c> or <c>auto</c>
    /// (CUDA when torch sees a device, else the CPU).</summary>
    /// <exception cref="GptException">An unknown device, or CUDA where there is none (this build uses TorchSharp-cpu:
    /// the message says how to make a CUDA build).</exception>
    public GptModel ToDevice(string device)
    {
        ArgumentNullException.ThrowIfNull(device);
        Gpt.Model.DeviceModule.place(Gpt.Model.DeviceModule.parse(device), Inner);
        lock (Inner)
        {
            _languageModel = null; // its cached device
            _float16Model = null;  // copies made for the old device
            _bfloat16Model = null;
        }
        return this;
    }

    /// <summary>Logits [batch, length, vocabulary] for token ids [batch, length], in evaluation mode without gradients.</summary>
    public torch.Tensor Logits(torch.Tensor ids)
    {
        ArgumentNullException.ThrowIfNull(ids);
        using var _ = torch.no_grad();
        Inner.eval();
        return Inner.forward(ids);
    }

    /// <summary>Logits for sequences of equal length, as nested arrays [batch][position][vocabulary].</summary>
    public float[][][] Logits(IReadOnlyList<int[]> sequences)
    {
        ArgumentNullException.ThrowIfNull(sequences);
        if (sequences.Count == 0) throw new GptException("no sequences given: expected at least one sequence of token ids");
        var length = sequences[0].Length;
        var bad = sequences.FirstOrDefault(s => s.Length != length);
        if (bad is not null)
            throw new GptException($"sequences must have equal lengths: the first has {length} tokens, another has {bad.Length}");
        return Facade.Guard(() =>
        {
            using var scope = torch.NewDisposeScope();
            using var ids = torch.tensor(sequences.SelectMany(s => s.Select(i => (long)i)).ToArray()).view(sequences.Count, length);
            using var logits = Logits(ids);
            var vocabulary = (int)logits.shape[2];
            var flat = logits.cpu().contiguous().data<float>().ToArray(); // from the model's device
            return Enumerable.Range(0, sequences.Count).Select(b =>
                Enumerable.Range(0, length).Select(t => flat.AsSpan((b * length + t) * vocabulary, vocabulary).ToArray()).ToArray()).ToArray();
        });
    }

    /// <summary>The book's greedy generation: the prompt cropped to the context length, then the most likely token
    /// appended <paramref name="maxNewTokens"/> times. Returns the prompt ids followed by the new ids.</summary>
    public int[] GenerateGreedy(IReadOnlyList<int> promptIds, int maxNewTokens)
    {
        ArgumentNullException.ThrowIfNull(promptIds);
        if (promptIds.Count == 0) throw new GptException("the prompt is empty: expected at least one token id");
        if (maxNewTokens < 0) throw new GptException($"max new tokens must be zero or more, found {maxNewTokens}");
        using var scope = torch.NewDisposeScope();
        using var ids = torch.tensor(promptIds.Select(i => (long)i).ToArray()).view(1, promptIds.Count);
        using var output = Gpt.Generation.Generator.generateTextSimple(Inner, ids, maxNewTokens, Inner.Config.ContextLength);
        return output.data<long>().ToArray().Select(i => (int)i).ToArray();
    }

    /// <inheritdoc />
    public void Dispose() => Inner.Dispose();
}
