/// The byte-pair merge of long pieces: the queue merge (n log n) against the scan merge (quadratic) and against
/// Microsoft.ML.Tokenizers' tiktoken merger, which encoded every piece before. Correctness only: the speed is measured
/// by hand (`gpt bench tokenizer`, a long word through `gpt tokenize`), never asserted here.
module Gpt.Tests.TokenizerMergeTests

open System
open System.Collections.Generic
open System.Text
open Expecto
open FsCheck
open FsCheck.FSharp
open Microsoft.ML.Tokenizers
open Gpt.Text
open Gpt.Tests.TestUtil

let private gpt2 = Tokenizers.gpt2 ()
let private merger = Gpt2Tokenizer.Instance.Merger

/// The merger the tokenizer used before (GPT-2's ranks from the same package, quadratic in a piece's length).
let private tiktoken = lazy (TiktokenTokenizer.CreateForModel "gpt2")

/// One piece merged by the old path: no pre-tokenisation, no normalisation, just the merge.
let private tiktokenMerge (piece: string) = tiktoken.Value.EncodeToIds(piece, false, false) |> Seq.toArray

/// The old tokenizer, end to end: our pre-tokenizer (the same pieces as before), each piece through tiktoken's merge.
let private tiktokenEncode (text: string) =
    let text = Gpt2Tokenizer.ReplaceLoneSurrogates text
    [| for piece in Gpt2PreTokenizer.splitToStrings text do
           if piece.Length > 0 then yield! tiktokenMerge piece |]

let private queueWith (merger: BytePairMerger) (bytes: byte[]) =
    let ids = ResizeArray()
    merger.MergeByQueue(ReadOnlySpan bytes, ids)
    ids.ToArray()

let private scanWith (merger: BytePairMerger) (bytes: byte[]) =
    let ids = ResizeArray()
    merger.MergeByScan(ReadOnlySpan bytes, ids)
    ids.ToArray()

let private byQueue = queueWith merger
let private byScan = scanWith merger

/// Alphabets that stress merging: one letter (long runs of one token), two, DNA, digits, mixed-case letters,
/// 2-byte Cyrillic, 3-byte CJK and 4-byte letters (a byte-level merge sees their UTF-8 bytes), and punctuation.
let private alphabets =
    [| "a"; "ab"; "ACGT"; "0123456789"; "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"; "абвгдеёжзийклмнопрстуфхцчшщъыьэюя"
       "的一是不了人我在有他这中大来上国个到说们"; "𝐀𝐁𝐂𝐃𝐄"; "-=_*#~." |]
    |> Array.map (fun alphabet -> [| for rune in alphabet.EnumerateRunes() -> rune.ToString() |])

/// A random word of `length` scalars drawn from one alphabet, seeded.
let private randomWord (random: Random) (alphabet: string[]) (length: int) =
    let builder = StringBuilder()
    for _ in 1 .. length do
        builder.Append(alphabet[random.Next alphabet.Length]) |> ignore
    builder.ToString()

let private wordGen =
    gen {
        let! alphabet = Gen.elements alphabets
        let! length = Gen.choose (0, 600)
        let! seed = Gen.choose (0, Int32.MaxValue)
        return randomWord (Random seed) alphabet length
    }

/// Pairs of bytes (x, y) that are adjacent inside no GPT-2 token: no token can span a boundary between them, so
/// no merge crosses it, and a word cut there encodes as its parts do. This gives an exact reference for a word far
/// too long for a quadratic merge.
let private barrierPairs (letters: string) =
    let inside = HashSet<struct (byte * byte)>()
    for id in 0 .. merger.TokenCount - 1 do
        let bytes = Gpt2Tokenizer.Instance.TokenBytes id
        for i in 1 .. bytes.Length - 1 do
            inside.Add(struct (bytes[i - 1], bytes[i])) |> ignore
    [| for x in letters do
           for y in letters do
               if not (inside.Contains(struct (byte x, byte y))) then yield x, y |]

/// A made-up vocabulary over "abcd": the 256 bytes, then random concatenations of tokens in shuffled order, so that a
/// token often ranks below one of its parts (GPT-2 has such tokens too, " the" = " " + "the", but its merge order
/// seems never to reach them: this is what makes the queue's heap of lower pairs do work).
let private shuffledVocabulary (seed: int) =
    let random = Random seed
    let tokens = ResizeArray<byte[]>([ for b in 0 .. 255 -> [| byte b |] ])
    let known = HashSet<string>([ for b in 0 .. 255 -> string (char b) ])
    let pool = ResizeArray<byte[]>([ for c in "abcd" -> [| byte c |] ])
    let made = ResizeArray<byte[]>()
    while made.Count < 150 do
        let joined = Array.append pool[random.Next pool.Count] pool[random.Next pool.Count]
        if joined.Length <= 8 && known.Add(Encoding.Latin1.GetString joined) then
            made.Add joined
            pool.Add joined
    tokens.AddRange(made |> Seq.sortBy (fun _ -> random.Next()))
    BytePairMerger(tokens.ToArray())

[<Tests>]
let tests =
    testList "GPT-2 byte-pair merge of long pieces" [
        testCase "a merge that makes a lower pair merges it next, as the rule says" <| fun () ->
            // 256 = "bcb", 257 = "bc": merging the first "bc" of "bcbc" makes the pair ("bc", "b") = "bcb", which ranks
            // below the second "bc" and so comes first.
            let merger = BytePairMerger(Array.append [| for b in 0 .. 255 -> [| byte b |] |] [| "bcb"B; "bc"B |])
            Expect.equal (queueWith merger "bcbc"B) [| 256; int 'c'B |] "queue"
            Expect.equal (scanWith merger "bcbc"B) [| 256; int 'c'B |] "scan"

        testCase "in a vocabulary of shuffled ranks the queue merge gives the scan merge's ids" <| fun () ->
            for seed in 1 .. 5 do
                let merger = shuffledVocabulary seed
                let random = Random seed
                for _ in 1 .. 100 do
                    let bytes = [| for _ in 1 .. random.Next(0, 400) -> "abcd"B[random.Next 4] |]
                    Expect.equal (queueWith merger bytes) (scanWith merger bytes) (sprintf "vocabulary %d, %s" seed (Encoding.ASCII.GetString bytes))

        testPropertyWithConfig propertyConfig "the queue merge gives the scan merge's ids" <| Prop.forAll (Arb.fromGen wordGen) (fun word ->
            let bytes = Encoding.UTF8.GetBytes word
            Expect.equal (byQueue bytes) (byScan bytes) (sprintf "%d bytes" bytes.Length))

        testPropertyWithConfig propertyConfig "whole texts give the ids of the tiktoken merger they used before" <| Prop.forAll TokenizerTests.validText (fun text ->
            Expect.equal (gpt2.Encode text) (tiktokenEncode text) "ids")

        testCase "long words of every alphabet give the ids of the tiktoken merger" <| fun () ->
            let random = Random 16
            for alphabet in alphabets do
                for length in [ 129; 1000; 6000 ] do
                    let word = randomWord random alphabet length
                    let bytes = Encoding.UTF8.GetBytes word
                    let expected = tiktokenMerge word
                    Expect.equal (byQueue bytes) expected (sprintf "queue, %d scalars of %s" length alphabet[0])
                    Expect.equal (byScan bytes) expected (sprintf "scan, %d scalars of %s" length alphabet[0])
                    // A text that is this one word goes through the queue (more than ScanLimit bytes) as one piece.
                    if Gpt2PreTokenizer.splitToStrings word = [| word |] then
                        Expect.equal (gpt2.Encode word) expected (sprintf "Encode, %d scalars of %s" length alphabet[0])

        testCase "a 300 KB word of mixed letters gives the ids of its barrier-cut parts" <| fun () ->
            let letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
            let barriers = barrierPairs letters
            Expect.isGreaterThan barriers.Length 20 "some letter pairs are inside no token"
            let random = Random 300
            let alphabet = [| for c in letters -> string c |]
            // Parts of 1 to 3,000 random letters, each ending with x and followed by a part starting with y for a
            // barrier pair (x, y): the parts meet only at barriers.
            let parts = ResizeArray<string>()
            let mutable total = 0
            let mutable startWith = None
            while total < 300_000 do
                let x, y = barriers[random.Next barriers.Length]
                let middle = randomWord random alphabet (random.Next(0, 3000))
                let part = (match startWith with Some (c: char) -> string c | None -> "") + middle + string x
                parts.Add part
                total <- total + part.Length
                startWith <- Some y
            parts.Add(string startWith.Value)
            let word = String.concat "" parts
            Expect.equal (Gpt2PreTokenizer.splitToStrings word).Length 1 "one piece"
            let expected = parts |> Seq.collect tiktokenMerge |> Array.ofSeq
            Expect.equal (gpt2.Encode word) expected "the whole word equals its parts merged one by one (by tiktoken)"

        testCase "a long word of one letter, one of DNA, one of digits: queue and scan agree" <| fun () ->
            let random = Random 7
            for alphabet in [ [| "a" |]; [| "A"; "C"; "G"; "T" |]; [| for d in "0123456789" -> string d |] ] do
                let word = randomWord random alphabet 20_000
                let bytes = Encoding.UTF8.GetBytes word
                Expect.equal (byQueue bytes) (byScan bytes) (sprintf "20,000 of %s" alphabet[0])

        testCase "a 1 MB word decodes back to itself (the parallel path: one chunk that cannot be cut)" <| fun () ->
            let word = randomWord (Random 1) [| for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" -> string c |] 1_000_000
            Expect.isGreaterThan word.Length Gpt2Tokenizer.ParallelThreshold "above the parallel threshold"
            let ids = gpt2.Encode word
            Expect.equal (gpt2.Decode ids) word "round trip"
            Expect.isTrue (ids |> Array.forall (fun id -> id >= 0 && id < 50256)) "ids in the vocabulary"

        testCase "a lone surrogate is U+FFFD in a short piece, a long piece and a long text alike" <| fun () ->
            let long = String('x', 5000)
            for text, what in [ "a\uD800b", "short"; long + "\uDC00" + long, "a long word"; "\uD83D" + long, "leading high surrogate"
                                String.replicate 30_000 "word \uDFFF " , "parallel path" ] do
                let replaced = text.Replace('\uD800', '\uFFFD').Replace('\uDC00', '\uFFFD').Replace('\uD83D', '\uFFFD').Replace('\uDFFF', '\uFFFD')
                Expect.equal (gpt2.Encode text) (gpt2.Encode replaced) what
                Expect.equal (gpt2.Encode text) (tiktokenEncode text) (what + ": as the tiktoken path")
            // A valid pair stays one character.
            Expect.equal (gpt2.Decode(gpt2.Encode "𝐀")) "𝐀" "a surrogate pair is not replaced"

        testCase "the piece cache never changes ids, also when it is emptied" <| fun () ->
            // 120,000 different short words: more than the cache holds, so it is emptied on the way.
            let random = Random 5
            let alphabet = [| for c in "abcdefghijklmnopqrstuvwxyz" -> string c |]
            let words = [| for _ in 1 .. 120_000 -> " " + randomWord random alphabet (random.Next(6, 14)) |]
            let text = String.concat "" words
            let first = gpt2.Encode text
            let second = gpt2.Encode text
            Expect.equal second first "twice the same"
            let sample = words[.. 2000]
            Expect.equal (gpt2.Encode(String.concat "" sample)) (tiktokenEncode (String.concat "" sample)) "as the tiktoken path"
    ]
