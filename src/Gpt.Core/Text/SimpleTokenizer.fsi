namespace Gpt.Text

/// The book's word-level tokenizers (chapter 2): a vocabulary built from a text, split on whitespace and
/// punctuation. V1 rejects words it has not seen; V2 maps them to &lt;|unk|&gt; and knows &lt;|endoftext|&gt;.
[<RequireQualifiedAccess>]
module SimpleTokenizer =

    /// The token for words outside the vocabulary (V2).
    [<Literal>]
    val Unknown: string = "<|unk|>"

    /// The token that separates unrelated texts (V2).
    [<Literal>]
    val EndOfText: string = "<|endoftext|>"

    /// Splits a text as the book does: on whitespace, on `,.:;?_!"()'` and on `--`, keeping the punctuation as
    /// tokens and dropping whitespace.
    val split: text: string -> string array

    /// A vocabulary: the sorted distinct tokens of a text, numbered from 0.
    type Vocabulary =
        {
          Tokens: string array
          Ids: System.Collections.Generic.IReadOnlyDictionary<string,int>
        }

        member Size: int

    /// Builds a vocabulary from a text, with the given special tokens appended after the sorted words.
    val buildVocabulary:
      specialTokens: string seq -> text: string -> Vocabulary

    /// The V1 vocabulary: only the words of the text.
    val vocabularyV1: text: string -> Vocabulary

    /// The V2 vocabulary: the words of the text, then &lt;|endoftext|&gt; and &lt;|unk|&gt; (the book's order).
    val vocabularyV2: text: string -> Vocabulary

    /// V1 encoding: every word must be in the vocabulary.
    val encodeV1: vocabulary: Vocabulary -> text: string -> int array

    /// V2 encoding: words outside the vocabulary become &lt;|unk|&gt;; &lt;|endoftext|&gt; is a token of its own.
    val encodeV2: vocabulary: Vocabulary -> text: string -> int array

    /// Decoding: tokens joined by spaces, then the space before punctuation removed (the book's rule).
    val decode: vocabulary: Vocabulary -> ids: int seq -> string
