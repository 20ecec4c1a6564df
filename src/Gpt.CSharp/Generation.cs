using System.Runtime.CompilerServices;
using Gpt.Generation;
using Microsoft.FSharp.Core;

namespace Gpt;

/// <summary>How to generate: decoding strategy, stopping and reproducibility. Defaults: 50 new tokens, greedy,
/// stop at <c>&lt;|endoftext|&gt;</c> (50256), KV cache on.</summary>
public sealed record GenerationSettings
{
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
    /// <summary>Stop when this token is generated (null: never stop early).</summary>
    public int? EndOfTextId { get; init; } = 50256;
    /// <summary>Reuse cached keys and values between steps (same result, much faster).</summary>
    public bool UseKvCache { get; init; } = true;

    internal GenerationOptions ToFSharp() => new(
        MaxNewTokens, Temperature,
        TopK is { } k ? FSharpOption<int>.Some(k) : FSharpOption<int>.None,
        TopP is { } p ? FSharpOption<double>.Some(p) : FSharpOption<double>.None,
        Seed is { } s ? FSharpOption<long>.Some(s) : FSharpOption<long>.None,
        EndOfTextId is { } e ? FSharpOption<int>.Some(e) : FSharpOption<int>.None,
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
    private ILanguageModel? _languageModel;
    private ILanguageModel LanguageModel => _languageModel ??= Gpt.Generation.LanguageModel.ofGpt(Inner);

    /// <summary>Generates continuations of token-id prompts (of any lengths; each stops on its own).</summary>
    /// <exception cref="GptException">Bad settings, an empty prompt or an id outside the vocabulary.</exception>
    public IReadOnlyList<GenerationResult> Generate(IEnumerable<IReadOnlyList<int>> promptIds, GenerationSettings? settings = null, Tokenizer? tokenizer = null)
    {
        ArgumentNullException.ThrowIfNull(promptIds);
        var prompts = promptIds.Select(p => (p ?? throw new ArgumentNullException(nameof(promptIds))).ToArray()).ToArray();
        var completions = Facade.Guard(() => Generator.generate(LanguageModel, (settings ?? new GenerationSettings()).ToFSharp(), prompts));
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
    public async IAsyncEnumerable<string> StreamAsync(string prompt, GenerationSettings? settings = null, Tokenizer? tokenizer = null,
        [EnumeratorCancellation] CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(prompt);
        var pieces = Generator.streamText(LanguageModel, (tokenizer ?? Tokenizer.Gpt2).Inner, (settings ?? new GenerationSettings()).ToFSharp(), prompt);
        // Each step opens and closes its own dispose and no-grad scopes, so moving between threads between steps is safe.
        using var enumerator = pieces.GetEnumerator();
        while (true)
        {
            cancellationToken.ThrowIfCancellationRequested();
            if (!enumerator.MoveNext()) yield break;
            yield return enumerator.Current;
            await Task.Yield();
        }
    }

    /// <summary>Streams the continuation synchronously, calling <paramref name="onPiece"/> for each piece; returns the whole text.</summary>
    public string Stream(string prompt, Action<string> onPiece, GenerationSettings? settings = null, Tokenizer? tokenizer = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(prompt);
        ArgumentNullException.ThrowIfNull(onPiece);
        var text = new System.Text.StringBuilder();
        foreach (var piece in Generator.streamText(LanguageModel, (tokenizer ?? Tokenizer.Gpt2).Inner, (settings ?? new GenerationSettings()).ToFSharp(), prompt))
        {
            cancellationToken.ThrowIfCancellationRequested();
            onPiece(piece);
            text.Append(piece);
        }
        return text.ToString();
    }
}
