using TorchSharp;
using FDataset = Gpt.Text.Dataset;

namespace Gpt;

/// <summary>One training example: input ids and target ids (the input shifted by one token).</summary>
/// <param name="Input">Input token ids.</param>
/// <param name="Target">Target token ids.</param>
public sealed record TrainingExample(int[] Input, int[] Target);

/// <summary>A batch of examples as tensors of shape [batch, length] (int64). Dispose it to free native memory.</summary>
public sealed class TrainingBatch : IDisposable
{
    internal TrainingBatch(torch.Tensor inputs, torch.Tensor targets) { Inputs = inputs; Targets = targets; }

    /// <summary>Input ids, [batch, length].</summary>
    public torch.Tensor Inputs { get; }

    /// <summary>Target ids, [batch, length].</summary>
    public torch.Tensor Targets { get; }

    /// <inheritdoc />
    public void Dispose() { Inputs.Dispose(); Targets.Dispose(); }
}

/// <summary>Sliding windows over a token stream (book chapter 2): window i starts at token i × stride.</summary>
public sealed class TextDataset
{
    internal FDataset.SlidingWindows Windows { get; }

    /// <summary>Windows of <paramref name="contextLength"/> tokens every <paramref name="stride"/> tokens.</summary>
    /// <exception cref="GptException">Non-positive sizes, or too few tokens for one window.</exception>
    public TextDataset(int[] ids, int contextLength, int stride)
    {
        ArgumentNullException.ThrowIfNull(ids);
        Windows = FDataset.create(ids, contextLength, stride);
    }

    /// <summary>Tokenizes a text and builds the windows.</summary>
    public static TextDataset FromText(string text, Tokenizer tokenizer, int contextLength, int stride)
    {
        ArgumentNullException.ThrowIfNull(text);
        ArgumentNullException.ThrowIfNull(tokenizer);
        return new TextDataset(Corpus.Encode(tokenizer, contextLength, [new TextDocument("text", text)]), contextLength, stride);
    }

    /// <summary>Number of windows.</summary>
    public int Count => FDataset.count(Windows);

    /// <summary>Window <paramref name="index"/>.</summary>
    public TrainingExample this[int index]
    {
        get
        {
            var (input, target) = FDataset.item(Windows, index);
            return new TrainingExample(input, target);
        }
    }

    /// <summary>Batches of one epoch, in an order that depends only on (<paramref name="seed"/>, <paramref name="epoch"/>).</summary>
    public IEnumerable<TrainingBatch> Batches(int batchSize, bool shuffle = true, bool dropLast = true, int seed = 123, int epoch = 0)
    {
        var options = new FDataset.LoaderOptions(batchSize, shuffle, dropLast, seed);
        foreach (var indices in FDataset.batchIndices(Count, options, epoch))
        {
            var (inputs, targets) = FDataset.toTensors(Windows, indices);
            yield return new TrainingBatch(inputs, targets);
        }
    }
}

/// <summary>Token plus positional embeddings (book chapter 2): ids [batch, length] → vectors [batch, length, dim].</summary>
public sealed class TokenEmbedding : IDisposable
{
    private readonly Gpt.Model.TokenAndPositionEmbedding _inner;

    /// <summary>Randomly initialised embedding tables.</summary>
    public TokenEmbedding(int vocabularySize, int contextLength, int embeddingDim) =>
        _inner = new Gpt.Model.TokenAndPositionEmbedding(vocabularySize, contextLength, embeddingDim);

    /// <summary>Embeds token ids.</summary>
    /// <exception cref="GptException">Wrong shape, sequence longer than the context, or an id outside the vocabulary.</exception>
    public torch.Tensor Forward(torch.Tensor ids) => _inner.forward(ids ?? throw new ArgumentNullException(nameof(ids)));

    /// <inheritdoc />
    public void Dispose() => _inner.Dispose();
}
