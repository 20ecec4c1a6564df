module Gpt.Tests.EmbeddingTests

open Expecto
open FsCheck
open FsCheck.FSharp
open TorchSharp
open Gpt.Model
open Gpt.Weights
open Gpt.Kernels
open Gpt.Tests.TestUtil

[<Tests>]
let tests =
    testList "token and positional embeddings" [
        testCase "the book's shapes: batch 8 x length 4, dim 256" <| fun () ->
            use embedding = new TokenAndPositionEmbedding(50257, 4, 256)
            use ids = torch.randint(50257L, [| 8L; 4L |], dtype = torch.int64)
            use output = embedding.forward ids
            Expect.equal output.shape [| 8L; 4L; 256L |] "[8, 4, 256]"

        testCase "output is token vector plus position vector" <| fun () ->
            use embedding = new TokenAndPositionEmbedding(10, 3, 5)
            use ids = torch.tensor([| 7L; 7L; 2L |]).view(1L, 3L)
            use output = embedding.forward ids
            use expected = embedding.TokenEmbedding.weight.[7L] + embedding.PositionEmbedding.weight.[1L]
            Expect.isTrue (torch.allclose(output.[0L, 1L], expected)) "row 1 = wte[7] + wpe[1]"

        testCase "state dict keys are GPT-2 names" <| fun () ->
            use embedding = new TokenAndPositionEmbedding(10, 3, 5)
            let keys = embedding.state_dict().Keys |> Seq.sort |> List.ofSeq
            Expect.equal keys [ "wpe.weight"; "wte.weight" ] "wte and wpe"

        testCase "inputs longer than the context or outside the vocabulary" <| fun () ->
            use embedding = new TokenAndPositionEmbedding(10, 3, 5)
            throwsGpt [ "sequence length 4 exceeds the model's context length 3" ] (fun () -> embedding.forward(torch.zeros([| 1L; 4L |], dtype = torch.int64)) |> ignore) "too long"
            throwsGpt [ "token id 10 is outside the vocabulary (0..9)" ] (fun () -> embedding.forward(torch.tensor([| 10L; 10L |]).view(1L, 2L)) |> ignore) "bad id"

        testPropertyWithConfig { propertyConfig with maxTest = 40 } "shape for arbitrary batch, length and dim" <| Prop.forAll (Arb.fromGen (Gen.zip3 (Gen.choose (1, 6)) (Gen.choose (1, 12)) (Gen.choose (1, 24)))) (fun (batch, length, dim) ->
            use embedding = new TokenAndPositionEmbedding(100, 12, dim)
            use ids = torch.randint(100L, [| int64 batch; int64 length |], dtype = torch.int64)
            use output = embedding.forward ids
            Expect.equal output.shape [| int64 batch; int64 length; int64 dim |] "[B, T, C]")
    ]
