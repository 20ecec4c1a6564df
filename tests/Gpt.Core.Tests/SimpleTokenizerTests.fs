module Gpt.Tests.SimpleTokenizerTests

open Expecto
open Gpt.Text
open Gpt.Tests.TestUtil

let story = Corpus.builtIn.Value.Text

[<Tests>]
let tests =
    testList "simple tokenizer (book ch. 2)" [
        testCase "split keeps punctuation and drops whitespace" <| fun () ->
            let pieces = SimpleTokenizer.split "Hello, world. Is this-- a test?"
            Expect.equal pieces [| "Hello"; ","; "world"; "."; "Is"; "this"; "--"; "a"; "test"; "?" |] "book split"

        testCase "V1 round trip on a sentence of the corpus" <| fun () ->
            let vocabulary = SimpleTokenizer.vocabularyV1 story
            let text = "\"It is the harbor clock,\" said Ida."
            let ids = SimpleTokenizer.encodeV1 vocabulary text
            Expect.equal (SimpleTokenizer.decode vocabulary ids) "\" It is the harbor clock,\" said Ida." "decode re-attaches punctuation as the book does"
            Expect.isTrue (ids |> Array.forall (fun id -> id >= 0 && id < vocabulary.Size)) "ids in range"

        testCase "V1 names an unknown word" <| fun () ->
            let vocabulary = SimpleTokenizer.vocabularyV1 "the cat sat on the mat"
            throwsGpt [ "'dog'"; "not in the vocabulary" ] (fun () -> SimpleTokenizer.encodeV1 vocabulary "the dog" |> ignore) "unknown word"

        testCase "V2 maps unknown words to <|unk|> and knows <|endoftext|>" <| fun () ->
            let vocabulary = SimpleTokenizer.vocabularyV2 "the cat sat on the mat."
            let ids = SimpleTokenizer.encodeV2 vocabulary "the dog sat. <|endoftext|> on the mat."
            let decoded = SimpleTokenizer.decode vocabulary ids
            Expect.equal decoded "the <|unk|> sat. <|endoftext|> on the mat." "decoded"
            Expect.equal vocabulary.Tokens[vocabulary.Size - 2] "<|endoftext|>" "endoftext second to last"
            Expect.equal vocabulary.Tokens[vocabulary.Size - 1] "<|unk|>" "unk last"

        testCase "vocabulary is sorted and distinct" <| fun () ->
            let vocabulary = SimpleTokenizer.vocabularyV1 story
            Expect.equal vocabulary.Tokens (Array.sortWith (fun a b -> System.String.CompareOrdinal(a, b)) (Array.distinct vocabulary.Tokens)) "sorted distinct"
            Expect.isGreaterThan vocabulary.Size 800 "the story has a varied vocabulary"

        testCase "decode rejects ids outside the vocabulary" <| fun () ->
            let vocabulary = SimpleTokenizer.vocabularyV2 "a b c"
            throwsGpt [ "token id 99"; "outside the vocabulary" ] (fun () -> SimpleTokenizer.decode vocabulary [ 99 ] |> ignore) "bad id"

        testPropertyWithConfig propertyConfig "V2 encode then decode then encode is stable" <| fun (words: FsCheck.NonEmptyString list) ->
            let text = words |> List.map (fun w -> w.Get) |> String.concat " "
            let vocabulary = SimpleTokenizer.vocabularyV2 story
            let ids = SimpleTokenizer.encodeV2 vocabulary text
            let again = SimpleTokenizer.encodeV2 vocabulary (SimpleTokenizer.decode vocabulary ids)
            // Unknown words become <|unk|>, which re-encodes to itself.
            Expect.equal again ids "re-encoding the decoded text gives the same ids"
    ]
