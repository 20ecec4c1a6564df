module Gpt.Tests.DatasetTests

open Expecto
open FsCheck
open FsCheck.FSharp
open TorchSharp
open Gpt.Text
open Gpt.Tests.TestUtil

let windowsArb =
    gen {
        let! length = Gen.choose (1, 40)
        let! stride = Gen.choose (1, 12)
        let! count = Gen.choose (length + 1, 200)
        let! ids = Gen.arrayOfLength count (Gen.choose (0, 50256))
        return ids, length, stride
    }
    |> Arb.fromGen

[<Tests>]
let tests =
    testList "sliding-window dataset" [
        testCase "the book's first windows on the story" <| fun () ->
            let ids = Corpus.encode (Tokenizers.gpt2 ()) 4 [ Corpus.builtIn.Value ]
            let windows = Dataset.create ids 4 1
            let input, target = Dataset.item windows 0
            Expect.equal input ids[0..3] "first input"
            Expect.equal target ids[1..4] "first target"
            let input2, _ = Dataset.item windows 1
            Expect.equal input2 ids[1..4] "stride 1"
            Expect.isGreaterThan ids.Length 4000 "the story has thousands of tokens"

        testPropertyWithConfig propertyConfig "window count and shifted targets" <| Prop.forAll windowsArb (fun (ids, length, stride) ->
            let windows = Dataset.create ids length stride
            let n = Dataset.count windows
            // Python's range(0, len - length, stride)
            let expected = List.length [ 0 .. stride .. ids.Length - length - 1 ]
            Expect.equal n expected "count = len(range(0, N - L, stride))"
            for i in 0 .. n - 1 do
                let input, target = Dataset.item windows i
                Expect.equal input.Length length "input length"
                Expect.equal target.[.. length - 2] input.[1..] "target is the input shifted by one"
                Expect.equal target.[length - 1] ids.[i * stride + length] "last target is the next token")

        testPropertyWithConfig propertyConfig "batches are a deterministic partition" <| Prop.forAll (Arb.fromGen (Gen.zip3 (Gen.choose (0, 60)) (Gen.choose (1, 9)) (Gen.elements [ true; false ]))) (fun (count, batch, dropLast) ->
            let options = { Dataset.defaultLoader with BatchSize = batch; DropLast = dropLast; Seed = 7 }
            let batches = Dataset.batchIndices count options 3
            Expect.equal batches (Dataset.batchIndices count options 3) "same seed and epoch, same batches"
            let all = Array.concat batches
            Expect.equal (Array.length (Array.distinct all)) all.Length "no window twice"
            if dropLast then
                Expect.equal all.Length (count / batch * batch) "incomplete batch dropped"
                Expect.isTrue (batches |> Array.forall (fun b -> b.Length = batch)) "full batches"
            else
                Expect.equal (Array.sort all) (Array.init count id) "every window once")

        testCase "different epochs shuffle differently; no shuffle keeps the order" <| fun () ->
            let options = { Dataset.defaultLoader with BatchSize = 4 }
            Expect.notEqual (Dataset.batchIndices 100 options 0) (Dataset.batchIndices 100 options 1) "epochs differ"
            // Pinned values: the order must not depend on the process (a resumed run continues in a new one).
            Expect.equal (Dataset.batchIndices 8 { options with DropLast = false } 2) [| [| 0; 6; 3; 2 |]; [| 7; 5; 4; 1 |] |] "the same order in every process"
            Expect.equal (Dataset.batchIndices 10 { options with Shuffle = false; DropLast = false } 0) [| [| 0; 1; 2; 3 |]; [| 4; 5; 6; 7 |]; [| 8; 9 |] |] "in order"

        testCase "tensors of a batch" <| fun () ->
            let ids = Array.init 50 id
            let windows = Dataset.create ids 4 4
            let inputs, targets = Dataset.toTensors windows [| 0; 2 |]
            use inputs = inputs
            use targets = targets
            Expect.equal inputs.shape [| 2L; 4L |] "shape"
            Expect.equal (inputs.data<int64>().ToArray()) [| 0L; 1L; 2L; 3L; 8L; 9L; 10L; 11L |] "inputs"
            Expect.equal (targets.data<int64>().ToArray()) [| 1L; 2L; 3L; 4L; 9L; 10L; 11L; 12L |] "targets"

        testCase "bad parameters" <| fun () ->
            throwsGpt [ "stride must be positive" ] (fun () -> Dataset.create [| 1; 2; 3 |] 1 0 |> ignore) "stride"
            throwsGpt [ "has 3 tokens"; "at least 4" ] (fun () -> Dataset.create [| 1; 2; 3 |] 3 1 |> ignore) "too short"
    ]
