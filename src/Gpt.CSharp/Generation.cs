using System.Runtime.CompilerServices;
using Gpt.Generation;
using Microsoft.FSharp.Core;

namespace Gpt;

/// <summary>The type a model's weights are read in for generation. Products are summed in float32 whatever the type.</summary>
public enum Dtype
{
    /// <summary>Single precision, as trained: the model's own weights, no copy.</summary>
    Float32,
    /// <summary>IEEE half precision (11 significant bits, range ±65,504): a copy, half the bytes to read per token.</summary>
    Float16,
    /// <summary>bfloat16 (8 significant bits, float32's range): a copy, half the bytes to read per token.</summary>
    BFloat16,
}

internal static class DtypeExtensions
{
    /// <summary>The core's dtype.</summary>
    internal static Gpt.Kernels.Dtype ToCore(this Dtype dtype) => dtype switch
    {
        Dtype.Float16 => Gpt.Kernels.Dtype.Float16,
        Dtype.BFloat16 => Gpt.Kernels.Dtype.BFloat16,
        _ => Gpt.Kernels.Dtype.Float32,
    };
}

/// <summary>How to generate: decoding strategy, stopping and reproducibility. Defaults: 50 new tokens, greedy,
/// stop at the model's end-of-text token (<see cref="GptModel.EndOfTextId"/>: GPT-2's <c>&lt;|endoftext|&gt;</c>,
/// 50256, for GPT-2's vocabulary), KV cache on.</summary>
public sealed record GenerationSettings
{
    private readonly int? _endOfTextId;

    /// <summary>Number of tokens to generate at most.</summary>
    public int MaxNewTokens { get; init; } = 50;
    /// <summary>Softmax temperature; 0 means greedy (always the most likely token).</summary>
    public double Temperature { get; init; }
    /// <summary>Sample only from the k most likely tokens (null: no limit).</summary>
    public int? TopK { get; init; }
    /// <summary>Nucleus sampling: only from the smallest set of tokens whose probability reaches p (null: off).</summary>
    public double? TopP { get; init; }
    /// <summary>Seed for sampling: the same seed gives the same text (null: a random seed).</summary>
    public long? Seed { get; init; }
    /// <summary>Stop when this token is generated; null: never stop early. When not set
    /// (<see cref="UsesModelEndOfText"/>), generation stops at the model's own end-of-text token,
    /// <see cref="GptModel.EndOfTextId"/>: the <c>eos_token_id</c> of the <c>config.json</c> it was loaded from, else
    /// 50256 when its vocabulary has it, else none. Reading it then gives null.</summary>
    public int? EndOfTextId
    {
        get => _endOfTextId;
        init
        {
            _endOfTextId = value;
            UsesModelEndOfText = false;
        }
    }

    /// <summary>True while <see cref="EndOfTextId"/> has not been set: generation stops at the model's own end-of-text
    /// token (<see cref="GptModel.EndOfTextId"/>).</summary>
    public bool UsesModelEndOfText { get; private init; } = true;
    /// <summary>Reuse cached keys and values between steps (same result, much faster).</summary>
    public bool UseKvCache { get; init; } = true;
    /// <summary>The type the weights are read in: <see cref="Dtype.Float32"/> (default) reads the model's own weights;
    /// <see cref="Dtype.Float16"/> and <see cref="Dtype.BFloat16"/> use a copy made on first use and kept with the model
    /// (half the bytes per token: faster, logits within ~1e-3 of float32's for float16).</summary>
    public Dtype Dtype { get; init; } = Dtype.Float32;

    /// <summary>The core's options for generating with <paramref name="model"/> (whose end-of-text token applies when
    /// <see cref="EndOfTextId"/> was not set).</summary>
    internal GenerationOptions ToFSharp(Gpt.Model.GptModel model) => new(
        MaxNewTokens, Temperature,
        TopK is { } k ? FSharpOption<int>.Some(k) : FSharpOption<int>.None,
        TopP is { } p ? FSharpOption<double>.Some(p) : FSharpOption<double>.None,
        Seed is { } s ? FSharpOption<long>.Some(s) : FSharpOption<long>.None,
        UsesModelEndOfText ? model.DefaultEndOfTextId : EndOfTextId is { } e ? FSharpOption<int>.Some(e) : FSharpOption<int>.None,
        UseKvCache);
}

/// <summary>One generated continuation.</summary>
/// <param name="PromptIds">The prompt's token ids (as given, before cropping to the context).</param>
/// <param name="NewIds">The generated ids (the end-of-text token is not included).</param>
/// <param name="Text">The generated text (without the prompt).</param>
/// <param name="StoppedAtEndOfText">True when generation ended at the end-of-text token, false at the token limit.</param>
public sealed record GenerationResult(int[] PromptIds, int[] NewIds, string Text, bool StoppedAtEndOfText)
{
    /// <summary>Prompt ids followed by the new ids.</summary>
    public int[] AllIds => [.. PromptIds, .. NewIds];
}

public sealed partial class GptModel
{
    /// <summary>The token generation stops at unless <see cref="GenerationSettings.EndOfTextId"/> says otherwise: the
    /// <c>eos_token_id</c> of the <c>config.json</c> the model was loaded from when it is inside the vocabulary, else
    /// GPT-2's 50256 when the vocabulary has it, else null (never stop early).</summary>
    public int? EndOfTextId => Gpt.Options.ToNullable(Inner.DefaultEndOfTextId);

    private ILanguageModel? _languageModel;
    private ILanguageModel? _float16Model;
    private ILanguageModel? _bfloat16Model;

    /// <summary>The language model for the settings' dtype. Half-precision copies are made on first use and kept: the
    /// façade never changes a loaded model's weights, so they cannot go stale.</summary>
    private ILanguageModel LanguageModelFor(GenerationSettings? settings)
    {
        lock (Inner)
        {
            return (settings?.Dtype ?? Dtype.Float32) switch
            {
                Dtype.Float16 => _float16Model ??= Gpt.Generation.LanguageModel.ofGptIn(Dtype.Float16.ToCore(), Inner),
                Dtype.BFloat16 => _bfloat16Model ??= Gpt.Generation.LanguageModel.ofGptIn(Dtype.BFloat16.ToCore(), Inner),
                _ => _languageModel ??= Gpt.Generation.LanguageModel.ofGpt(Inner),
            };
        }
    }

    /// <summary>Generates continuations of token-id prompts (of any lengths; each stops on its own).</summary>
    /// <exception cref="GptException">Bad settings, an empty prompt or an id outside the vocabulary.</exception>
    public IReadOnlyList<GenerationResult> Generate(IEnumerable<IReadOnlyList<int>> promptIds, GenerationSettings? settings = null, Tokenizer? tokenizer = null)
    {
        ArgumentNullException.ThrowIfNull(promptIds);
        var prompts = promptIds.Select(p => (p ?? throw new ArgumentNullException(nameof(promptIds))).ToArray()).ToArray();
        var completions = Facade.Guard(() => Generator.generate(LanguageModelFor(settings), (settings ?? new GenerationSettings()).ToFSharp(Inner), prompts));
        var tok = tokenizer ?? Tokenizer.Gpt2;
        return prompts.Zip(completions, (prompt, c) =>
            new GenerationResult(prompt, c.Tokens, tok.Decode(c.Tokens), c.StopReason.IsEndOfText)).ToArray();
    }

    /// <summary>Generates a continuation of a token-id prompt.</summary>
    public GenerationResult Generate(IReadOnlyList<int> promptIds, GenerationSettings? settings = null, Tokenizer? tokenizer = null) =>
        Generate([promptIds ?? throw new ArgumentNullException(nameof(promptIds))], settings, tokenizer)[0];

    /// <summary>Generates a continuation of a text prompt (GPT-2 tokenizer unless another is given).</summary>
    public GenerationResult Generate(string prompt, GenerationSettings? settings = null, Tokenizer? tokenizer = null)
    {
        ArgumentNullException.ThrowIfNull(prompt);
        var tok = tokenizer ?? Tokenizer.Gpt2;
        return Generate(tok.Encode(prompt), settings, tok);
    }

    /// <summary>Generates continuations of several text prompts; each stops on its own.</summary>
    public IReadOnlyList<GenerationResult> Generate(IEnumerable<string> prompts, GenerationSettings? settings = null, Tokenizer? tokenizer = null)
    {
        ArgumentNullException.ThrowIfNull(prompts);
        var tok = tokenizer ?? Tokenizer.Gpt2;
        return Generate(prompts.Select(p => (IReadOnlyList<int>)tok.Encode(p ?? throw new ArgumentNullException(nameof(prompts)))), settings, tok);
    }

    /// <summary>Streams the continuation of a text prompt: each piece is yielded as soon as it forms valid UTF-8
    /// (never half a character); the pieces concatenate to the generated text.</summary>
    /// <remarks>
    /// <para>The computation (the prompt's encoding, each step of the model) runs on the thread pool, never on the
    /// caller's <see cref="SynchronizationContext"/>: a UI thread stays free, and only the loop body of the caller's
    /// <c>await foreach</c> runs on its context.</para>
    /// <para>Cancellation follows the .NET convention for async streams: cancelling
    /// <paramref name="cancellationToken"/> (or the one given through <c>WithCancellation</c>) stops before the next
    /// step and throws <see cref="OperationCanceledException"/> from the <c>await foreach</c>; the pieces received
    /// until then are the text generated so far, and the model is ready for the next call. (Training differs on
    /// purpose: a cancelled run keeps its work in a checkpoint, so it ends normally with
    /// <see cref="TrainingResult.Cancelled"/> set.)</para>
    /// </remarks>
    /// <exception cref="OperationCanceledException">The token was cancelled.</exception>
    /// <exception cref="GptException">Bad settings or ids outside the vocabulary.</exception>
    public async IAsyncEnumerable<string> StreamAsync(string prompt, GenerationSettings? settings = null, Tokenizer? tokenizer = null,
        [EnumeratorCancellation] CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(prompt);
        var options = (settings ?? new GenerationSettings()).ToFSharp(Inner);
        var inner = (tokenizer ?? Tokenizer.Gpt2).Inner;
        var language = LanguageModelFor(settings);
        // Each step opens and closes its own dispose and no-grad scopes, so moving between pool threads between steps
        // is safe.
        IEnumerator<string>? enumerator = null;
        try
        {
            while (true)
            {
                cancellationToken.ThrowIfCancellationRequested();
                var more = await Task.Run(() =>
                {
                    enumerator ??= Generator.streamText(language, inner, options, prompt).GetEnumerator();
                    return enumerator.MoveNext();
                }, cancellationToken).ConfigureAwait(false);
                if (!more) yield break;
                yield return enumerator!.Current;
            }
        }
        finally
        {
            enumerator?.Dispose();
        }
    }

    /// <summary>Streams the continuation synchronously, calling <paramref name="onPiece"/> for each piece; returns the
    /// whole text. Cancelling throws <see cref="OperationCanceledException"/> before the next step, as
    /// <see cref="StreamAsync"/> does.</summary>
    public string Stream(string prompt, Action<string> onPiece, GenerationSettings? settings = null, Tokenizer? tokenizer = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(prompt);
        ArgumentNullException.ThrowIfNull(onPiece);
        var text = new System.Text.StringBuilder();
        foreach (var piece in Generator.streamText(LanguageModelFor(settings), (tokenizer ?? Tokenizer.Gpt2).Inner, (settings ?? new GenerationSettings()).ToFSharp(Inner), prompt))
        {
            cancellationToken.ThrowIfCancellationRequested();
            onPiece(piece);
            text.Append(piece);
        }
        return text.ToString();
    }
}
