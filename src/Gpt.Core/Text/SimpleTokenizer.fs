namespace Gpt.Text

open System
open System.Collections.Generic
open System.Text.RegularExpressions
open Gpt

/// The book's word-level tokenizers (chapter 2): a vocabulary built from a text, split on whitespace and
/// punctuation. V1 rejects words it has not seen; V2 maps them to &lt;|unk|&gt; and knows &lt;|endoftext|&gt;.
[<RequireQualifiedAccess>]
module SimpleTokenizer =
    /// The token for words outside the vocabulary (V2).
    [<Literal>]
    let Unknown = "<|unk|>"

    /// The token that separates unrelated texts (V2).
    [<Literal>]
    let EndOfText = "<|endoftext|>"

    let private splitter = Regex("""([,.:;?_!"()']|--|\s)""", RegexOptions.Compiled)
    let private punctuationAfterSpace = Regex("""\s+([,.:;?_!"()'])""", RegexOptions.Compiled)

    /// Splits a text as the book does: on whitespace, on `,.:;?_!"()'` and on `--`, keeping the punctuation as
    /// tokens and dropping whitespace.
    let split (text: string) : string[] =
        splitter.Split text
        |> Array.map (fun piece -> piece.Trim())
        |> Array.filter (fun piece -> piece <> "")

    /// A vocabulary: the sorted distinct tokens of a text, numbered from 0.
    type Vocabulary =
        { Tokens: string[]
          Ids: IReadOnlyDictionary<string, int> }
        member this.Size = this.Tokens.Length

    /// Builds a vocabulary from a text, with the given special tokens appended after the sorted words.
    let buildVocabulary (specialTokens: string seq) (text: string) : Vocabulary =
        let words = split text |> Array.distinct |> Array.sortWith (fun a b -> String.CompareOrdinal(a, b))
        let specials = specialTokens |> Seq.filter (fun s -> not (Array.contains s words)) |> Array.ofSeq
        let tokens = Array.append words specials
        let ids = Dictionary<string, int>(StringComparer.Ordinal)
        tokens |> Array.iteri (fun i token -> ids[token] <- i)
        { Tokens = tokens; Ids = ids }

    /// The V1 vocabulary: only the words of the text.
    let vocabularyV1 (text: string) = buildVocabulary [] text

    /// The V2 vocabulary: the words of the text, then &lt;|endoftext|&gt; and &lt;|unk|&gt; (the book's order).
    let vocabularyV2 (text: string) = buildVocabulary [ EndOfText; Unknown ] text

    let private idOf (vocabulary: Vocabulary) (token: string) =
        match vocabulary.Ids.TryGetValue token with
        | true, id -> id
        | _ -> -1

    /// V1 encoding: every word must be in the vocabulary.
    let encodeV1 (vocabulary: Vocabulary) (text: string) : int[] =
        split text
        |> Array.map (fun token ->
            match idOf vocabulary token with
            | -1 -> Errors.fail "word '%s' is not in the vocabulary (%d tokens); use the V2 tokenizer to map unknown words to %s" token vocabulary.Size Unknown
            | id -> id)

    /// V2 encoding: words outside the vocabulary become &lt;|unk|&gt;; &lt;|endoftext|&gt; is a token of its own.
    let encodeV2 (vocabulary: Vocabulary) (text: string) : int[] =
        let unknown = idOf vocabulary Unknown
        Errors.require (unknown >= 0) "the vocabulary has no %s token; build it with vocabularyV2" Unknown
        // <|endoftext|> would otherwise be split into '<', '|', ... by the punctuation rule.
        let pieces = text.Split(EndOfText)
        [| for index in 0 .. pieces.Length - 1 do
               if index > 0 then
                   yield idOf vocabulary EndOfText
               for token in split pieces[index] do
                   match idOf vocabulary token with
                   | -1 -> yield unknown
                   | id -> yield id |]

    /// Decoding: tokens joined by spaces, then the space before punctuation removed (the book's rule).
    let decode (vocabulary: Vocabulary) (ids: int seq) : string =
        let tokens =
            ids
            |> Seq.map (fun id ->
                if id < 0 || id >= vocabulary.Size then
                    Errors.fail "token id %d is outside the vocabulary (0..%d)" id (vocabulary.Size - 1)
                vocabulary.Tokens[id])
        punctuationAfterSpace.Replace(String.Join(" ", tokens), "$1")
