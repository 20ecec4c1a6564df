module Gpt.Tests.CorpusTests

open System.IO
open System.Text
open Expecto
open Gpt.Text
open Gpt.Tests.TestUtil

[<Tests>]
let tests =
    testList "corpus" [
        testCase "the built-in story is about 20,000 characters" <| fun () ->
            let story = Corpus.builtIn.Value
            Expect.isGreaterThanOrEqual story.Text.Length 19000 "long enough"
            Expect.isLessThanOrEqual story.Text.Length 23000 "short enough"
            Expect.stringStarts story.Text "The Harbor Clock of Saltmere" "title"

        testCase "file, folder and glob" <| fun () ->
            use dir = new TempDir()
            Directory.CreateDirectory(dir.File "sub") |> ignore
            File.WriteAllText(dir.File "a.txt", "alpha")
            File.WriteAllText(dir.File "b.md", "beta")
            File.WriteAllText(dir.File "sub/c.txt", "gamma")
            Expect.equal (Corpus.load (dir.File "a.txt") |> Array.map (fun d -> d.Text)) [| "alpha" |] "file"
            Expect.equal (Corpus.load dir.Path |> Array.map (fun d -> d.Text)) [| "alpha"; "beta"; "gamma" |] "folder, recursive, sorted"
            Expect.equal (Corpus.load (dir.File "*.txt") |> Array.map (fun d -> d.Text)) [| "alpha" |] "glob"
            Expect.equal (Corpus.load (dir.File "**/*.txt") |> Array.map (fun d -> d.Text)) [| "alpha"; "gamma" |] "recursive glob"
            throwsGpt [ "matches no files" ] (fun () -> Corpus.load (dir.File "*.csv") |> ignore) "empty glob"
            throwsGpt [ "does not exist" ] (fun () -> Corpus.load (dir.File "missing.txt") |> ignore) "missing file"

        testCase "invalid UTF-8 names the file and the byte offset" <| fun () ->
            use dir = new TempDir()
            let path = dir.File "bad.txt"
            File.WriteAllBytes(path, Array.append (Encoding.UTF8.GetBytes "héllo ") [| 0xC3uy; 0x28uy; 0x41uy |])
            throwsGpt [ path; "byte offset 7"; "0xC3" ] (fun () -> Corpus.readFile path |> ignore) "invalid byte"

        testCase "a byte-order mark is skipped" <| fun () ->
            use dir = new TempDir()
            let path = dir.File "bom.txt"
            File.WriteAllBytes(path, Array.append [| 0xEFuy; 0xBBuy; 0xBFuy |] (Encoding.UTF8.GetBytes "x"))
            Expect.equal (Corpus.readFile path).Text "x" "no BOM in the text"

        testCase "too-short and empty texts say how many tokens are needed" <| fun () ->
            let tokenizer = Tokenizers.gpt2 ()
            let doc text = { Corpus.Source = "t.txt"; Corpus.Text = text }
            throwsGpt [ "too short"; "has 2 tokens"; "at least 257" ] (fun () -> Corpus.encode tokenizer 256 [ doc "Hello world" ] |> ignore) "short"
            throwsGpt [ "empty"; "at least 5" ] (fun () -> Corpus.encode tokenizer 4 [ doc "" ] |> ignore) "empty"

        testCase "documents are joined by <|endoftext|>" <| fun () ->
            let tokenizer = Tokenizers.gpt2 ()
            let doc text = { Corpus.Source = "t"; Corpus.Text = text }
            Expect.equal (Corpus.encode tokenizer 2 [ doc "Hello"; doc " world" ]) [| 15496; 50256; 995 |] "joined"
    ]
