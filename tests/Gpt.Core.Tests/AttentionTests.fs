module Gpt.Tests.AttentionTests

open Expecto
open FsCheck
open FsCheck.FSharp
open TorchSharp
open Gpt.Model
open Gpt.Weights
open Gpt.Kernels
open Gpt.Tests.TestUtil
open Gpt.Tests.ModelTestUtil

/// The book's printed results are rounded to 4 decimals.
let bookTolerance = 1e-4

let table (rows: float32 list list) =
    use flat = torch.tensor(rows |> List.concat |> Array.ofList)
    flat.view(int64 rows.Length, int64 rows.Head.Length)

/// Stacks q, k, v weights (or biases) of separate projections into one fused q|k|v tensor.
let fuse (query: torch.Tensor) (key: torch.Tensor) (value: torch.Tensor) = torch.cat([| query; key; value |], 0L)

/// A multi-head attention with the same weights as a causal self-attention of `config`.
let copyIntoSelfAttention (source: MultiHeadAttention) (target: CausalSelfAttention) =
    assign target.QkvProjection.weight (fuse source.Query.weight source.Key.weight source.Value.weight)
    assign target.QkvProjection.bias (fuse source.Query.bias source.Key.bias source.Value.bias)
    assign target.OutputProjection.weight source.OutputProjection.weight
    assign target.OutputProjection.bias source.OutputProjection.bias

[<Tests>]
let bookNumbers =
    testList "attention: the book's numbers" [
        testCase "simplified self-attention: weights and context vector for 'journey'" <| fun () ->
            use inputs = bookInputs ()
            use weights = SimplifiedAttention.weights inputs
            use expectedWeights = torch.tensor([| 0.1385f; 0.2379f; 0.2333f; 0.1240f; 0.1082f; 0.1581f |])
            expectClose bookTolerance weights[1L] expectedWeights "attention weights of query 'journey'"
            use context = SimplifiedAttention.context inputs
            use journey = torch.tensor([| 0.4419f; 0.6515f; 0.5683f |])
            expectClose bookTolerance context[1L] journey "context vector of 'journey'"

        testCase "simplified self-attention: all six context vectors" <| fun () ->
            use inputs = bookInputs ()
            use context = SimplifiedAttention.context inputs
            use expected =
                table [ [ 0.4421f; 0.5931f; 0.5790f ]
                        [ 0.4419f; 0.6515f; 0.5683f ]
                        [ 0.4431f; 0.6496f; 0.5671f ]
                        [ 0.4304f; 0.6298f; 0.5510f ]
                        [ 0.4671f; 0.5910f; 0.5266f ]
                        [ 0.4177f; 0.6503f; 0.5645f ] ]
            expectClose bookTolerance context expected "context vectors"

        testCase "SelfAttentionV1 with the book's seed 123 (a private generator: same stream as manual_seed)" <| fun () ->
            use g = generator 123
            use attention = new SelfAttentionV1(3, 2, g)
            use inputs = bookInputs ()
            use output = attention.forward inputs
            use expected =
                table [ [ 0.2996f; 0.8053f ]
                        [ 0.3061f; 0.8210f ]
                        [ 0.3058f; 0.8203f ]
                        [ 0.2948f; 0.7939f ]
                        [ 0.2927f; 0.7891f ]
                        [ 0.2990f; 0.8040f ] ]
            expectClose bookTolerance output expected "sa_v1(inputs)"

        // These build nn.Linear layers, whose default initialisation draws from the global generator.
        testSequenced <| testList "global seed" [
            testCase "SelfAttentionV2 with torch.manual_seed(789)" <| fun () ->
                torch.manual_seed 789L |> ignore
                use attention = new SelfAttentionV2(3, 2)
                use inputs = bookInputs ()
                use output = attention.forward inputs
                use expected =
                    table [ [ -0.0739f; 0.0713f ]
                            [ -0.0748f; 0.0703f ]
                            [ -0.0749f; 0.0702f ]
                            [ -0.0760f; 0.0685f ]
                            [ -0.0763f; 0.0679f ]
                            [ -0.0754f; 0.0693f ] ]
                expectClose bookTolerance output expected "sa_v2(inputs)"

            testCase "CausalAttention with torch.manual_seed(123) on a batch of two" <| fun () ->
                torch.manual_seed 123L |> ignore
                use attention = new CausalAttention(3, 2, 6, 0.0)
                use inputs = bookInputs ()
                use batch = torch.stack([| inputs; inputs |])
                use output = attention.forward batch
                use expected =
                    table [ [ -0.4519f; 0.2216f ]
                            [ -0.5874f; 0.0058f ]
                            [ -0.6300f; -0.0632f ]
                            [ -0.5675f; -0.0843f ]
                            [ -0.5526f; -0.0981f ]
                            [ -0.5299f; -0.1081f ] ]
                Expect.equal output.shape [| 2L; 6L; 2L |] "[2, 6, 2]"
                expectClose bookTolerance output[0L] expected "first sequence"
                expectClose bookTolerance output[1L] expected "second sequence"

            testCase "MultiHeadAttentionWrapper with torch.manual_seed(123), 2 heads" <| fun () ->
                torch.manual_seed 123L |> ignore
                use attention = new MultiHeadAttentionWrapper(3, 2, 6, 0.0, 2)
                use inputs = bookInputs ()
                use batch = torch.stack([| inputs; inputs |])
                use output = attention.forward batch
                use expected =
                    table [ [ -0.4519f; 0.2216f; 0.4772f; 0.1063f ]
                            [ -0.5874f; 0.0058f; 0.5891f; 0.3257f ]
                            [ -0.6300f; -0.0632f; 0.6202f; 0.3860f ]
                            [ -0.5675f; -0.0843f; 0.5478f; 0.3589f ]
                            [ -0.5526f; -0.0981f; 0.5321f; 0.3428f ]
                            [ -0.5299f; -0.1081f; 0.5077f; 0.3493f ] ]
                Expect.equal output.shape [| 2L; 6L; 4L |] "[2, 6, 4]"
                expectClose bookTolerance output[0L] expected "first sequence"

            testCase "MultiHeadAttention with torch.manual_seed(123), 2 heads" <| fun () ->
                torch.manual_seed 123L |> ignore
                use attention = new MultiHeadAttention(3, 2, 6, 0.0, 2)
                use inputs = bookInputs ()
                use batch = torch.stack([| inputs; inputs |])
                use output = attention.forward batch
                use expected =
                    table [ [ 0.3190f; 0.4858f ]
                            [ 0.2943f; 0.3897f ]
                            [ 0.2856f; 0.3593f ]
                            [ 0.2693f; 0.3873f ]
                            [ 0.2639f; 0.3928f ]
                            [ 0.2575f; 0.4028f ] ]
                expectClose bookTolerance output[0L] expected "first sequence"
        ]
    ]

[<Tests>]
let agreement =
    testList "attention: every variant agrees given the same weights" [
        testCase "SelfAttentionV1 (x W) = SelfAttentionV2 (Linear, x Wᵀ)" <| fun () ->
            use second = new SelfAttentionV2(3, 2)
            use first = new SelfAttentionV1(3, 2)
            assign first.Query (second.Query.weight.t ())
            assign first.Key (second.Key.weight.t ())
            assign first.Value (second.Value.weight.t ())
            use inputs = bookInputs ()
            expectClose 1e-6 (first.forward inputs) (second.forward inputs) "v1 vs v2"

        testCase "CausalAttention row t = SelfAttentionV2 over tokens 0..t" <| fun () ->
            use unmasked = new SelfAttentionV2(3, 2, true)
            use causal = new CausalAttention(3, 2, 6, 0.0, true)
            for source, target in [ unmasked.Query, causal.Query; unmasked.Key, causal.Key; unmasked.Value, causal.Value ] do
                assign target.weight source.weight
                assign target.bias source.bias
            use inputs = bookInputs ()
            use output = causal.forward (inputs.unsqueeze 0L) // (1, 6, 2)
            for t in 0L .. 5L do
                use prefix = unmasked.forward (inputs.narrow(0L, 0L, t + 1L)) // (t + 1, 2)
                expectClose 1e-6 output[0L, t] prefix[t] (sprintf "row %d" t)

        testCase "MultiHeadAttentionWrapper = MultiHeadAttention with heads stacked and an identity output projection" <| fun () ->
            let inputDim, headDim, heads, length = 5, 3, 4, 7
            use wrapper = new MultiHeadAttentionWrapper(inputDim, headDim, length, 0.0, heads, true)
            use efficient = new MultiHeadAttention(inputDim, headDim * heads, length, 0.0, heads, true)
            let stack (pick: CausalAttention -> Modules.Linear) (part: Modules.Linear -> torch.Tensor) =
                torch.cat([| for head in wrapper.Heads -> part (pick head) |], 0L)
            for pick, target in [ (fun (h: CausalAttention) -> h.Query), efficient.Query; (fun (h: CausalAttention) -> h.Key), efficient.Key; (fun (h: CausalAttention) -> h.Value), efficient.Value ] do
                assign target.weight (stack pick (fun (l: Modules.Linear) -> l.weight))
                assign target.bias (stack pick (fun (l: Modules.Linear) -> l.bias))
            assign efficient.OutputProjection.weight (torch.eye(int64 (headDim * heads)))
            assign efficient.OutputProjection.bias (torch.zeros(int64 (headDim * heads)))
            use x = randn 1 [ 2L; int64 length; int64 inputDim ]
            expectClose 1e-6 (efficient.forward x) (wrapper.forward x) "wrapper vs efficient"

        testCase "MultiHeadAttention: separate q, k, v projections = one fused projection" <| fun () ->
            use separate = new MultiHeadAttention(8, 8, 10, 0.0, 2, true)
            use fused = new MultiHeadAttention(8, 8, 10, 0.0, 2, true, true)
            Expect.isTrue fused.IsFused "fused"
            assign fused.Qkv.weight (fuse separate.Query.weight separate.Key.weight separate.Value.weight)
            assign fused.Qkv.bias (fuse separate.Query.bias separate.Key.bias separate.Value.bias)
            assign fused.OutputProjection.weight separate.OutputProjection.weight
            assign fused.OutputProjection.bias separate.OutputProjection.bias
            let keys = fused.state_dict().Keys |> Seq.sort |> List.ofSeq
            Expect.equal keys [ "out_proj.bias"; "out_proj.weight"; "qkv.bias"; "qkv.weight" ] "fused has no W_query/W_key/W_value"
            use x = randn 2 [ 3L; 10L; 8L ]
            expectClose 1e-6 (fused.forward x) (separate.forward x) "separate vs fused"

        testCase "MultiHeadAttention = CausalSelfAttention (scaled_dot_product_attention)" <| fun () ->
            let config = { tinyConfig with EmbeddingDim = 24; Heads = 3; ContextLength = 9 }
            use explicitAttention = new MultiHeadAttention(24, 24, 9, 0.0, 3, true)
            use fast = new CausalSelfAttention(config)
            copyIntoSelfAttention explicitAttention fast
            fast.eval ()
            use x = randn 3 [ 2L; 9L; 24L ]
            expectClose 1e-5 (fast.forward x) (explicitAttention.forward x) "explicit vs sdpa"

        testCase "CausalSelfAttention with a KV cache, chunks of 2, 1, 3, 1 tokens = without" <| fun () ->
            let config = { tinyConfig with EmbeddingDim = 12; Heads = 3; ContextLength = 8 }
            use attention = new CausalSelfAttention(config)
            attention.eval ()
            use x = randn 4 [ 2L; 7L; 12L ]
            use full = attention.forward x
            use keys = torch.zeros([| 2L; 3L; 8L; 4L |])
            use values = torch.zeros([| 2L; 3L; 8L; 4L |])
            let mutable past = 0
            for chunk in [ 2; 1; 3; 1 ] do
                use piece = x.narrow(1L, int64 past, int64 chunk)
                use output = attention.ForwardCached(piece, keys, values, past)
                use expected = full.narrow(1L, int64 past, int64 chunk)
                expectClose 1e-5 output expected (sprintf "tokens %d..%d" past (past + chunk - 1))
                past <- past + chunk

        testCase "dropout on attention weights only in training mode" <| fun () ->
            use attention = new CausalAttention(4, 4, 6, 0.5)
            use x = randn 5 [ 1L; 6L; 4L ]
            attention.eval ()
            expectEqual (attention.forward x) (attention.forward x) "eval is deterministic"
            attention.train ()
            let differs = [ 1..5 ] |> List.exists (fun _ -> maxAbsDifference (attention.forward x) (attention.forward x) > 0.0)
            Expect.isTrue differs "training mode drops random weights"

        testCase "invalid sizes fail with a message" <| fun () ->
            throwsGpt [ "output dimension 10 is not divisible by 3 heads" ] (fun () -> new MultiHeadAttention(4, 10, 6, 0.0, 3) |> ignore) "heads"
            throwsGpt [ "dropout rate must be in [0, 1), found 1" ] (fun () -> new CausalAttention(4, 4, 6, 1.0) |> ignore) "dropout"
            use attention = new CausalAttention(4, 4, 6, 0.0)
            throwsGpt [ "sequence length 7 exceeds the causal attention context length 6" ] (fun () -> attention.forward (torch.zeros(1L, 7L, 4L)) |> ignore) "too long"
            throwsGpt [ "input must have shape [batch, length, 4], found [1, 3, 5]" ] (fun () -> attention.forward (torch.zeros(1L, 3L, 5L)) |> ignore) "width"
    ]

/// Small attention sizes and a seed for the inputs.
let sizes =
    gen {
        let! batch = Gen.choose (1, 3)
        let! length = Gen.choose (1, 10)
        let! heads = Gen.choose (1, 4)
        let! headDim = Gen.choose (1, 5)
        let! seed = Gen.choose (0, 100000)
        return batch, length, heads, headDim, seed
    }
    |> Arb.fromGen

[<Tests>]
let properties =
    testList "attention: properties" [
        testPropertyWithConfig { propertyConfig with maxTest = 60 } "attention rows sum to 1 and are zero above the diagonal"
        <| Prop.forAll sizes (fun (batch, length, heads, headDim, seed) ->
            let width = heads * headDim
            use attention = new MultiHeadAttention(width, width, 10, 0.0, heads)
            use x = randn seed [ int64 batch; int64 length; int64 width ]
            use scaled = x * 3.0
            use weights = attention.AttentionWeights scaled // (B, nh, T, T)
            Expect.equal weights.shape [| int64 batch; int64 heads; int64 length; int64 length |] "(B, nh, T, T)"
            use rowSums = weights.sum(-1L)
            expectClose 1e-5 rowSums (torch.ones_like rowSums) "row sums"
            use above = torch.ones([| int64 length; int64 length |], dtype = torch.ScalarType.Bool).triu(1L)
            use future = weights.masked_select(above.expand_as weights)
            Expect.isTrue (future.numel () = 0L || future.abs().max().item<float32> () = 0.0f) "exactly zero above the diagonal")

        testPropertyWithConfig { propertyConfig with maxTest = 60 } "causality: changing the input at t + k never changes outputs at positions <= t"
        <| Prop.forAll (Arb.fromGen (Gen.zip (sizes.Generator) (Gen.choose (0, 1000)))) (fun ((batch, length, heads, headDim, seed), pick) ->
            let config = { tinyConfig with EmbeddingDim = heads * headDim; Heads = heads; ContextLength = 10 }
            use attention = new CausalSelfAttention(config)
            attention.eval ()
            let t = pick % length
            let later = t + 1 + (pick / length) % (length - t) // in t + 1 .. length (length means "no change")
            use x = randn seed [ int64 batch; int64 length; int64 config.EmbeddingDim ]
            use changed = x.clone ()
            if later < length then
                use noise = randn (seed + 1) [ int64 batch; int64 config.EmbeddingDim ]
                changed[torch.TensorIndex.Colon, torch.TensorIndex.Single(int64 later)] <- noise
            use before = attention.forward x
            use after = attention.forward changed
            expectEqual (after.narrow(1L, 0L, int64 t + 1L)) (before.narrow(1L, 0L, int64 t + 1L)) (sprintf "positions 0..%d after changing %d" t later))
    ]
