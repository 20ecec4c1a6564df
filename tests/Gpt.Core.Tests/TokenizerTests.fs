module Gpt.Tests.TokenizerTests

open System
open System.IO
open System.Text
open System.Text.Json
open Expecto
open FsCheck
open FsCheck.FSharp
open Gpt.Text
open Gpt.Tests.TestUtil

let gpt2 = Tokenizers.gpt2 ()

/// Strings of valid Unicode scalars from every plane (no lone surrogates), with whitespace and apostrophes
/// weighted up because that is where pre-tokenizers go wrong.
let validText =
    let scalar =
        Gen.frequency [
            5, Gen.elements [ ' '; ' '; '\n'; '\t'; '\''; 's'; 'a'; 'Z'; '1'; '.'; '!' ] |> Gen.map string
            3, Gen.choose (0x20, 0x7E) |> Gen.map (char >> string)
            2, Gen.choose (0xA0, 0xD7FF) |> Gen.map (char >> string)
            1, Gen.choose (0xE000, 0xFFFC) |> Gen.map (char >> string) // not U+FFFD: the stream test treats it as a broken decode
            2, Gen.choose (0x10000, 0x10FFFF) |> Gen.map Char.ConvertFromUtf32
        ]
    Gen.listOf scalar |> Gen.map (String.concat "") |> Arb.fromGen

[<Tests>]
let tests =
    testList "GPT-2 byte-pair encoding" [
        testCase "the book's sentence with <|endoftext|>" <| fun () ->
            let ids = gpt2.Encode "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace."
            Expect.equal ids [| 15496; 11; 466; 345; 588; 8887; 30; 220; 50256; 554; 262; 4252; 18250; 8812; 2114; 286; 617; 34680; 27271; 13 |] "book ids"

        testCase "the book's unknown word" <| fun () ->
            Expect.equal (gpt2.Encode "Akwirw ier") [| 33901; 86; 343; 86; 220; 959 |] "book ids"
            Expect.equal (gpt2.Decode [ 33901; 86; 343; 86; 220; 959 ]) "Akwirw ier" "decoded"

        testCase "a letter outside the Basic Multilingual Plane counts as a letter" <| fun () ->
            Expect.equal (gpt2.Encode "𝐀's") [| 47728; 238; 222; 338 |] "OpenAI's ids for 𝐀's"
            Expect.equal (Gpt2PreTokenizer.splitToStrings "𝐀's") [| "𝐀"; "'s" |] "pieces"

        testCase "pre-tokenizer follows GPT-2's whitespace rules" <| fun () ->
            Expect.equal (Gpt2PreTokenizer.splitToStrings "a   b") [| "a"; "  "; " b" |] "space runs leave one space to the next word"
            Expect.equal (Gpt2PreTokenizer.splitToStrings "a\tb") [| "a"; "\t"; "b" |] "a single tab"
            Expect.equal (Gpt2PreTokenizer.splitToStrings "end  ") [| "end"; "  " |] "trailing spaces"
            Expect.equal (Gpt2PreTokenizer.splitToStrings "I'll don't 'S") [| "I"; "'ll"; " don"; "'t"; " '"; "S" |] "contractions are lower-case only"
            Expect.equal (Gpt2PreTokenizer.splitToStrings "x 123 !!") [| "x"; " 123"; " !!" |] "numbers and punctuation take a leading space"

        testCase "vocabulary size and end of text" <| fun () ->
            Expect.equal gpt2.VocabularySize 50257 "50,257 tokens"
            Expect.equal gpt2.EndOfTextId (Some 50256) "<|endoftext|> = 50256"
            Expect.equal (gpt2.Encode "<|endoftext|>") [| 50256 |] "special token alone"

        testCase "decode rejects ids outside the vocabulary" <| fun () ->
            throwsGpt [ "token id 50257"; "0..50256" ] (fun () -> gpt2.Decode [ 50257 ] |> ignore) "too large"
            throwsGpt [ "token id -1" ] (fun () -> gpt2.Decode [ -1 ] |> ignore) "negative"

        testCase "token ids as people write them: 1,2,3 or a JSON array" <| fun () ->
            for text in [ "15496,11,50256"; " 15496, 11 ,50256\n"; "[15496, 11, 50256]"; "[15496,11,50256]"; " [ 15496 , 11, 50256 ] " ] do
                Expect.equal (TokenIds.parse "ids" text) [| 15496; 11; 50256 |] text
            Expect.equal (TokenIds.parse "ids" "[]") [||] "the empty JSON array"
            Expect.equal (TokenIds.parse "ids" "-1") [| -1 |] "the tokenizer or the model checks the range"

        testCase "bad token ids name what was expected and what was found" <| fun () ->
            let expected = "expected token ids such as 15496,11 or [15496, 11]"
            throwsGpt [ "--decode input: "; expected; "found 'x' (item 2)" ] (fun () -> TokenIds.parse "--decode input" "1,x,3" |> ignore) "not a number"
            throwsGpt [ expected; "found '2.5' (item 2)" ] (fun () -> TokenIds.parse "ids" "[1, 2.5]" |> ignore) "a fraction"
            throwsGpt [ expected; "found nothing" ] (fun () -> TokenIds.parse "ids" "  " |> ignore) "empty"
            throwsGpt [ expected; "found an empty item (number 2 of 3) in '1,,3'" ] (fun () -> TokenIds.parse "ids" "1,,3" |> ignore) "two commas"
            throwsGpt [ expected; "a bracket not closed" ] (fun () -> TokenIds.parse "ids" "[1, 2" |> ignore) "open bracket"
            throwsGpt [ expected; "found 99999999999 (item 1), which is not a 32-bit integer" ] (fun () -> TokenIds.parse "ids" "99999999999" |> ignore) "too large"
            throwsGpt [ expected; "found '\"a\"' (item 1)" ] (fun () -> TokenIds.parse "ids" "[\"a\"]" |> ignore) "a JSON string"
            for text in [ "1,x"; "[1, 2.5]"; "99999999999" ] do
                let message = try TokenIds.parse "ids" text |> ignore; "" with :? Gpt.GptException as e -> e.Message
                Expect.isFalse (message.Contains "System." || message.Contains "Path: $" || message.Contains "LineNumber") (sprintf "no .NET internals: %s" message)

        testCase "agrees with the reference encoder on the hard strings we keep" <| fun () ->
            let path = fixture "bpe/hard_strings.jsonl"
            let lines = File.ReadAllLines path |> Array.filter (fun l -> l.Trim() <> "")
            Expect.isGreaterThanOrEqual lines.Length 80 "at least 80 hard strings"
            let failures =
                [ for line in lines do
                      use document = JsonDocument.Parse line
                      // Lone surrogates cannot be read as a .NET string by System.Text.Json: those lines carry
                      // the UTF-16 code units as well.
                      let text =
                          match document.RootElement.TryGetProperty "utf16" with
                          | true, units -> String [| for u in units.EnumerateArray() -> char (u.GetInt32()) |]
                          | _ -> document.RootElement.GetProperty("text").GetString()
                      let expected = [| for id in document.RootElement.GetProperty("ids").EnumerateArray() -> id.GetInt32() |]
                      let actual = gpt2.Encode text
                      if actual <> expected then
                          yield sprintf "%A: expected %A, got %A" (if text.Length > 60 then text.Substring(0, 60) + "..." else text) expected actual ]
            Expect.isTrue failures.IsEmpty (sprintf "%d hard strings differ from the reference:\n%s" failures.Length (String.concat "\n" failures))

        testPropertyWithConfig propertyConfig "decode(encode(s)) = s for valid strings" <| Prop.forAll validText (fun text ->
            Expect.equal (gpt2.Decode(gpt2.Encode text)) text "round trip")

        testPropertyWithConfig propertyConfig "pre-tokenizer pieces cover the text exactly" <| Prop.forAll validText (fun text ->
            Expect.equal (String.concat "" (Gpt2PreTokenizer.splitToStrings text)) text "concatenation of pieces")

        testPropertyWithConfig propertyConfig "stream decoding never emits half a character" <| Prop.forAll validText (fun text ->
            let decoder = Tokenizers.StreamDecoder gpt2
            let pieces = [ for id in gpt2.Encode text -> decoder.Push id ] @ [ decoder.Flush() ]
            for piece in pieces do
                Expect.isFalse (piece |> Seq.exists (fun c -> c = '\uFFFD')) "no replacement characters in valid text"
            Expect.equal (String.concat "" pieces) text "pieces concatenate to the text")

        testCase "complete UTF-8 prefix" <| fun () ->
            let bytes = Encoding.UTF8.GetBytes "a€"
            Expect.equal (Tokenizers.StreamDecoder.CompletePrefix bytes[.. 1]) 1 "cut before an incomplete 3-byte sequence"
            Expect.equal (Tokenizers.StreamDecoder.CompletePrefix bytes) 4 "complete"

        testCase "tokenizer by name" <| fun () ->
            Expect.equal (Tokenizers.byName "gpt2" "").Name "gpt2" "gpt2"
            Expect.equal (Tokenizers.byName "simple" "a b").Name "simple" "simple"
            throwsGpt [ "unknown tokenizer 'bert'"; "'gpt2' or 'simple'" ] (fun () -> Tokenizers.byName "bert" "" |> ignore) "unknown name"
    ]

[<Tests>]
let parallelTests =
    testList "GPT-2 byte-pair encoding of long texts" [
        testCase "parallel chunks give the same ids as one pass" <| fun () ->
            // Whitespace runs, newlines before letters and spaces, and non-BMP letters around every cut.
            let unit = "line one\n\n\"Quoted\"\n  indented 𝐀's\n\tTab\nx" + String.replicate 50 " word" + "\n \n"
            let text = String.replicate (Gpt2Tokenizer.ParallelThreshold / unit.Length + 50) unit
            let sequential =
                Gpt2Tokenizer.Chunks text
                |> Array.collect (fun (start, length) -> gpt2.Encode(text.Substring(start, length)))
            let whole = gpt2.Encode text
            Expect.isGreaterThan (Gpt2Tokenizer.Chunks text).Length 2 "several chunks"
            Expect.equal whole sequential "chunked encoding equals chunk-by-chunk encoding"
            // And chunk-by-chunk equals one unchunked pass over a shorter prefix (below the parallel threshold).
            let prefixLength = fst (Gpt2Tokenizer.Chunks text).[2]
            Expect.isLessThan prefixLength Gpt2Tokenizer.ParallelThreshold "the prefix is encoded in one pass"
            let prefix = text.Substring(0, prefixLength)
            Expect.equal (gpt2.Encode prefix) whole[.. (gpt2.Encode prefix).Length - 1] "cuts do not change ids"
    ]
