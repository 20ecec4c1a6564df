/// Stand-ins for training tests: a bigram language model (any ids → logits module will do for the trainer) and
/// a character tokenizer over a small alphabet.
module Gpt.Tests.TrainingFixtures

open System
open TorchSharp
open TorchSharp.Modules
open type TorchSharp.torch.nn
open Gpt.Text
open Gpt.Training

/// ids [B, T] → logits [B, T, V] through an embedding, dropout and a linear head: next token from this token only.
type BigramModel(vocabSize: int, embeddingDim: int, dropRate: float) as this =
    inherit Module<torch.Tensor, torch.Tensor>("BigramModel")
    let wte = Embedding(int64 vocabSize, int64 embeddingDim)
    let drop = Dropout(dropRate)
    let head = Linear(int64 embeddingDim, int64 vocabSize)
    do this.RegisterComponents()

    member _.Head = head

    override _.forward(ids: torch.Tensor) =
        let x = wte.forward ids // (B, T, C)
        head.forward (drop.forward x) // (B, T, V)

/// A module holding the same embedding under two names, as tied weights do.
type TiedModel() as this =
    inherit torch.nn.Module<torch.Tensor, torch.Tensor>("TiedModel")
    let wte = torch.nn.Embedding(5L, 3L)
    let head = wte
    do this.RegisterComponents()
    override _.forward(ids: torch.Tensor) = torch.nn.functional.linear(wte.forward ids, head.weight)

/// One token per character of an alphabet.
type CharTokenizer(alphabet: string) =
    interface ITokenizer with
        member _.Name = "chars"
        member _.VocabularySize = alphabet.Length
        member _.EndOfTextId = None
        member _.Encode text = text |> Seq.map (fun c -> alphabet.IndexOf c) |> Seq.filter (fun i -> i >= 0) |> Array.ofSeq
        member _.Decode ids = String(ids |> Seq.map (fun i -> alphabet[i]) |> Array.ofSeq)
        member _.DecodeToUtf8 ids = Text.Encoding.UTF8.GetBytes(String(ids |> Seq.map (fun i -> alphabet[i]) |> Array.ofSeq))

let alphabet = "abcdefghijkl"
let charTokenizer = CharTokenizer(alphabet) :> ITokenizer

/// A token stream with some structure (so training makes progress) and some noise (so it does not finish).
let noisyIds (length: int) (seed: int) =
    let random = Random(seed)
    Array.init length (fun i -> if random.NextDouble() < 0.7 then i % alphabet.Length else random.Next alphabet.Length)

/// Small options for tests: nothing written, evaluation on 2 batches.
let tinyOptions =
    { TrainerOptions.defaults with
        Epochs = 3; BatchSize = 3; ContextLength = 8; Stride = 4; LearningRate = 1e-2
        InitialLearningRate = 1e-2; MinLearningRate = 1e-2; EvalInterval = 2; EvalBatches = 2; Seed = 7
        SamplePrompt = None; CheckpointInterval = 0 }

let trainingData (ids: int[]) =
    let train, validation = Loss.split Loss.defaultTrainRatio ids
    { Train = train; Validation = validation; Tokenizer = charTokenizer
      ModelConfiguration = sprintf """{"kind":"bigram","vocab_size":%d}""" alphabet.Length }

/// Whether two modules' state_dicts are bit-identical.
let sameWeights (a: torch.nn.Module) (b: torch.nn.Module) =
    let left = a.state_dict ()
    let right = b.state_dict ()
    left.Count = right.Count && left |> Seq.forall (fun kv -> kv.Value.Equals(right[kv.Key]))
