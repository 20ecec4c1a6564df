/// Helpers for the model tests: tensor comparisons, tiny configurations, seeded inputs.
module Gpt.Tests.ModelTestUtil

open Expecto
open TorchSharp
open Gpt.Model
open Gpt.Weights
open Gpt.Kernels

/// Largest absolute elementwise difference.
let maxAbsDifference (a: torch.Tensor) (b: torch.Tensor) =
    use difference = (a - b).abs().max()
    difference.to_type(torch.ScalarType.Float64).item<float> ()

/// Expects equal shapes and every element within `tolerance`.
let expectClose (tolerance: float) (actual: torch.Tensor) (expected: torch.Tensor) (message: string) =
    Expect.equal actual.shape expected.shape (sprintf "%s: shape" message)
    let difference = maxAbsDifference actual expected
    Expect.isLessThanOrEqual difference tolerance (sprintf "%s: max |difference| %g exceeds %g" message difference tolerance)

/// Expects the very same values.
let expectEqual (actual: torch.Tensor) (expected: torch.Tensor) (message: string) =
    Expect.equal actual.shape expected.shape (sprintf "%s: shape" message)
    Expect.isTrue (actual.allclose(expected, rtol = 0.0, atol = 0.0)) (sprintf "%s: values differ (max %g)" message (maxAbsDifference actual expected))

/// The float32 values of a tensor, flattened.
let floats (t: torch.Tensor) = t.contiguous().data<float32>().ToArray()

/// The int64 values of a tensor, flattened.
let longs (t: torch.Tensor) = t.contiguous().data<int64>().ToArray()

/// A generator of our own, so tests run in parallel without the global seed.
let generator (seed: int) = new torch.Generator(uint64 seed, torch.CPU)

/// Standard-normal values of a given shape from a seed.
let randn (seed: int) (shape: int64 list) =
    use g = generator seed
    torch.randn(Array.ofList shape, generator = g)

/// Token ids (batch, length) below vocabSize from a seed.
let randomIds (seed: int) (vocabSize: int) (batch: int) (length: int) =
    use g = generator seed
    torch.randint(int64 vocabSize, [| int64 batch; int64 length |], dtype = torch.int64, generator = g)

/// A small GPT-2 for fast tests: 97 tokens, 12 positions, 16 dims, 4 heads, 2 layers, no dropout.
let tinyConfig =
    { VocabSize = 97
      ContextLength = 12
      EmbeddingDim = 16
      Heads = 4
      Layers = 2
      DropRate = 0.0
      QkvBias = true
      TiedHead = true
      LayerNormEpsilon = 1e-5 }

/// The book's six 3-dimensional token vectors for "Your journey starts with one step" (ch. 3).
let bookInputs () =
    torch.tensor(
        [| 0.43f; 0.15f; 0.89f // Your
           0.55f; 0.87f; 0.66f // journey
           0.57f; 0.85f; 0.64f // starts
           0.22f; 0.58f; 0.33f // with
           0.77f; 0.25f; 0.10f // one
           0.05f; 0.80f; 0.55f |] // step
    ).view(6L, 3L)

/// Runs f without recording gradients.
let noGrad (f: unit -> 'T) =
    use _ = torch.no_grad ()
    f ()

/// Copies a tensor into a parameter without recording gradients.
let assign (parameter: torch.Tensor) (value: torch.Tensor) =
    use _ = torch.no_grad ()
    parameter.copy_ value |> ignore
