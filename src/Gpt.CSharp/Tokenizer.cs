using Gpt.Text;
using Microsoft.FSharp.Core;

namespace Gpt;

/// <summary>
/// A tokenizer: text to token ids and back. <see cref="Gpt2"/> is GPT-2's byte-pair encoding (50,257 tokens,
/// identical to OpenAI's encoder); <see cref="Simple"/> is the book's word-level tokenizer (chapter 2).
/// Instances are immutable and thread-safe.
/// </summary>
public sealed class Tokenizer
{
    internal ITokenizer Inner { get; }

    internal Tokenizer(ITokenizer inner) => Inner = inner;

    /// <summary>GPT-2's byte-pair encoding; <c>&lt;|endoftext|&gt;</c> is id 50256.</summary>
    public static Tokenizer Gpt2 { get; } = new(Tokenizers.gpt2());

    /// <summary>The book's word-level tokenizer (V2 rules) with a vocabulary built from <paramref name="vocabularyText"/>.</summary>
    /// <exception cref="ArgumentNullException">The text is null.</exception>
    public static Tokenizer Simple(string vocabularyText)
    {
        ArgumentNullException.ThrowIfNull(vocabularyText);
        return new(Tokenizers.simple(vocabularyText));
    }

    /// <summary>A tokenizer by name: <c>gpt2</c>, or <c>simple</c> with a vocabulary built from
    /// <paramref name="vocabularyText"/> (the built-in story when null).</summary>
    /// <exception cref="GptException">The name is not known.</exception>
    public static Tokenizer FromName(string name, string? vocabularyText = null)
    {
        ArgumentNullException.ThrowIfNull(name);
        return new(Tokenizers.byName(name, vocabularyText ?? Corpus.BuiltInStory.Text));
    }

    /// <summary>"gpt2" or "simple".</summary>
    public string Name => Inner.Name;

    /// <summary>Number of token ids; every id is in [0, VocabularySize).</summary>
    public int VocabularySize => Inner.VocabularySize;

    /// <summary>The id of <c>&lt;|endoftext|&gt;</c>, or null when the tokenizer has none.</summary>
    public int? EndOfTextId => FSharpOption<int>.get_IsSome(Inner.EndOfTextId) ? Inner.EndOfTextId.Value : null;

    /// <summary>Encodes text into token ids. Lone UTF-16 surrogates become U+FFFD.</summary>
    public int[] Encode(string text)
    {
        ArgumentNullException.ThrowIfNull(text);
        return Inner.Encode(text);
    }

    /// <summary>Token ids as people and scripts write them: <c>15496,11</c>, <c>15496, 11</c> or the JSON array
    /// <c>[15496, 11]</c>; <c>[]</c> is the empty list.</summary>
    /// <param name="text">The ids.</param>
    /// <param name="where">Names the input in the error message (an option, a line).</param>
    /// <exception cref="GptException">Not such a list: the message says what was expected and what was found.</exception>
    public static int[] ParseIds(string text, string where = "token ids")
    {
        ArgumentNullException.ThrowIfNull(text);
        return TokenIds.parse(where ?? "token ids", text);
    }

    /// <summary>Decodes token ids into text.</summary>
    /// <exception cref="GptException">An id is outside the vocabulary.</exception>
    public string Decode(IEnumerable<int> ids)
    {
        ArgumentNullException.ThrowIfNull(ids);
        return Inner.Decode(ids);
    }

    /// <summary>GPT-2's pre-tokenisation of a text (the pieces BPE runs on), for learning and debugging.</summary>
    public static IReadOnlyList<string> PreTokenize(string text)
    {
        ArgumentNullException.ThrowIfNull(text);
        return Gpt2PreTokenizer.splitToStrings(text);
    }

    /// <summary>A decoder for streaming: push ids one at a time, get text back as soon as it is valid UTF-8.</summary>
    public TextStreamDecoder CreateStreamDecoder() => new(new Tokenizers.StreamDecoder(Inner));
}

/// <summary>Turns a stream of token ids into text pieces, never half a character.</summary>
public sealed class TextStreamDecoder
{
    private readonly Tokenizers.StreamDecoder _inner;
    internal TextStreamDecoder(Tokenizers.StreamDecoder inner) => _inner = inner;

    /// <summary>Adds one id; returns the text that became complete (possibly empty).</summary>
    public string Push(int id) => _inner.Push(id);

    /// <summary>Returns whatever is left (an incomplete character becomes U+FFFD).</summary>
    public string Flush() => _inner.Flush();
}

/// <summary>The book's word-level tokenizer, version 1: every word must be in the vocabulary.</summary>
public sealed class SimpleTokenizerV1
{
    private readonly SimpleTokenizer.Vocabulary _vocabulary;

    /// <summary>Builds the vocabulary from a text (sorted distinct words and punctuation).</summary>
    public SimpleTokenizerV1(string vocabularyText)
    {
        ArgumentNullException.ThrowIfNull(vocabularyText);
        _vocabulary = SimpleTokenizer.vocabularyV1(vocabularyText);
    }

    /// <summary>The vocabulary, in id order.</summary>
    public IReadOnlyList<string> Vocabulary => _vocabulary.Tokens;

    /// <summary>Encodes text.</summary>
    /// <exception cref="GptException">A word is not in the vocabulary (the message names it).</exception>
    public int[] Encode(string text) => SimpleTokenizer.encodeV1(_vocabulary, text ?? throw new ArgumentNullException(nameof(text)));

    /// <summary>Decodes ids, re-attaching punctuation as the book does.</summary>
    public string Decode(IEnumerable<int> ids) => SimpleTokenizer.decode(_vocabulary, ids ?? throw new ArgumentNullException(nameof(ids)));

    /// <summary>The book's split: whitespace dropped, punctuation and <c>--</c> kept as tokens.</summary>
    public static IReadOnlyList<string> Split(string text) => SimpleTokenizer.split(text ?? throw new ArgumentNullException(nameof(text)));
}

/// <summary>The book's word-level tokenizer, version 2: unknown words become <c>&lt;|unk|&gt;</c>, and
/// <c>&lt;|endoftext|&gt;</c> separates texts.</summary>
public sealed class SimpleTokenizerV2
{
    private readonly SimpleTokenizer.Vocabulary _vocabulary;

    /// <summary>Builds the vocabulary from a text, then appends <c>&lt;|endoftext|&gt;</c> and <c>&lt;|unk|&gt;</c>.</summary>
    public SimpleTokenizerV2(string vocabularyText)
    {
        ArgumentNullException.ThrowIfNull(vocabularyText);
        _vocabulary = SimpleTokenizer.vocabularyV2(vocabularyText);
    }

    /// <summary>The vocabulary, in id order.</summary>
    public IReadOnlyList<string> Vocabulary => _vocabulary.Tokens;

    /// <summary>Encodes text; unknown words become <c>&lt;|unk|&gt;</c>.</summary>
    public int[] Encode(string text) => SimpleTokenizer.encodeV2(_vocabulary, text ?? throw new ArgumentNullException(nameof(text)));

    /// <summary>Decodes ids, re-attaching punctuation as the book does.</summary>
    public string Decode(IEnumerable<int> ids) => SimpleTokenizer.decode(_vocabulary, ids ?? throw new ArgumentNullException(nameof(ids)));
}
