using FCorpus = Gpt.Text.Corpus;

namespace Gpt;

/// <summary>One text and where it came from (a file path, or the built-in story).</summary>
/// <param name="Source">Where the text came from.</param>
/// <param name="Text">The text.</param>
public sealed record TextDocument(string Source, string Text);

/// <summary>Text to train on: the built-in story, or user text from a file, a folder or a glob.</summary>
public static class Corpus
{
    /// <summary>"The Harbor Clock of Saltmere": an original story of about 20,000 characters shipped with the
    /// library, so training needs no download.</summary>
    public static TextDocument BuiltInStory { get; } = ToDocument(FCorpus.builtIn.Value);

    /// <summary>Loads UTF-8 text from a file, every file of a folder (recursively), or a glob such as
    /// <c>data/*.txt</c> or <c>books/**/*.md</c>.</summary>
    /// <exception cref="GptException">Nothing matches, or a file is not valid UTF-8 (the message names the file and
    /// the byte offset).</exception>
    public static IReadOnlyList<TextDocument> Load(string path)
    {
        ArgumentNullException.ThrowIfNull(path);
        return Facade.Guard(() => FCorpus.load(path).Select(ToDocument).ToArray());
    }

    /// <summary>Token ids of documents joined by <c>&lt;|endoftext|&gt;</c>, checked to be long enough for one
    /// training window of <paramref name="contextLength"/> tokens.</summary>
    /// <exception cref="GptException">The text is empty or too short (the message says how many tokens are needed).</exception>
    public static int[] Encode(Tokenizer tokenizer, int contextLength, IEnumerable<TextDocument> documents)
    {
        ArgumentNullException.ThrowIfNull(tokenizer);
        ArgumentNullException.ThrowIfNull(documents);
        return Facade.Guard(() => FCorpus.encode(tokenizer.Inner, contextLength,
            documents.Select(d => new FCorpus.Document(d.Source, d.Text))));
    }

    private static TextDocument ToDocument(FCorpus.Document d) => new(d.Source, d.Text);
}
