module Gpt.Tests.ModelTests

open System
open Expecto
open FsCheck
open FsCheck.FSharp
open TorchSharp
open Gpt.Model
open Gpt.Weights
open Gpt.Kernels
open Gpt.Tests.TestUtil
open Gpt.Tests.ModelTestUtil

/// The book's gpt2-small variant without QKV bias and with a separate head (ch. 4).
let bookGpt2Small = { GptConfig.gpt2Small with QkvBias = false; TiedHead = false }

/// GPT-2's state_dict names for a model of `layers` blocks.
let gpt2Names (layers: int) (qkvBias: bool) (tied: bool) =
    set [
        "wte.weight"; "wpe.weight"; "ln_f.weight"; "ln_f.bias"
        if not tied then "lm_head.weight"
        for i in 0 .. layers - 1 do
            for suffix in [ "ln_1.weight"; "ln_1.bias"; "attn.c_attn.weight"; "attn.c_proj.weight"; "attn.c_proj.bias"
                            "ln_2.weight"; "ln_2.bias"; "mlp.c_fc.weight"; "mlp.c_fc.bias"; "mlp.c_proj.weight"; "mlp.c_proj.bias" ] do
                sprintf "h.%d.%s" i suffix
            if qkvBias then sprintf "h.%d.attn.c_attn.bias" i
    ]

let stateNames (model: GptModel) = model.state_dict().Keys |> Set.ofSeq

[<Tests>]
let configTests =
    testList "model: configuration" [
        testCase "gpt2-small is the released GPT-2 124M" <| fun () ->
            let c = GptConfig.byName "gpt2-small"
            Expect.equal (c.VocabSize, c.ContextLength, c.EmbeddingDim, c.Heads, c.Layers) (50257, 1024, 768, 12, 12) "sizes"
            Expect.equal (c.DropRate, c.QkvBias, c.TiedHead, c.LayerNormEpsilon) (0.1, true, true, 1e-5) "dropout, bias, tied head, eps"

        testCase "presets by name, case-insensitive; unknown names listed" <| fun () ->
            Expect.equal (GptConfig.byName "GPT2-Medium") GptConfig.gpt2Medium "medium"
            Expect.equal ((GptConfig.byName "gpt2-large").EmbeddingDim, (GptConfig.byName "gpt2-xl").Layers) (1280, 48) "large, xl"
            throwsGpt [ "unknown model configuration 'gpt2-huge'"; "gpt2-small, gpt2-medium, gpt2-large, gpt2-xl" ] (fun () -> GptConfig.byName "gpt2-huge" |> ignore) "unknown"

        testCase "the book's parameter counts and memory" <| fun () ->
            Expect.equal (GptConfig.parameterCount bookGpt2Small) 163_009_536L "no QKV bias, separate head"
            Expect.equal (Math.Round(GptConfig.memoryMegabytes bookGpt2Small, 2)) 621.83 "621.83 MB in float32"
            Expect.equal (GptConfig.memoryBytes bookGpt2Small) (4L * 163_009_536L) "bytes"
            Expect.equal (GptConfig.parameterCount { bookGpt2Small with TiedHead = true }) 124_412_160L "head tied"
            Expect.equal (GptConfig.parameterCount GptConfig.gpt2Small) 124_439_808L "released GPT-2: QKV bias, tied"

        testCase "the released sizes of medium, large and xl" <| fun () ->
            Expect.equal (GptConfig.parameterCount GptConfig.gpt2Medium) 354_823_168L "355M"
            Expect.equal (GptConfig.parameterCount GptConfig.gpt2Large) 774_030_080L "774M"
            Expect.equal (GptConfig.parameterCount GptConfig.gpt2Xl) 1_557_611_200L "1558M"

        testCase "invalid configurations fail with a message, also at construction" <| fun () ->
            let fails fragments config = throwsGpt fragments (fun () -> GptConfig.validate config) (sprintf "%A" fragments)
            fails [ "embedding dimension 770 is not divisible by 12 heads" ] { GptConfig.gpt2Small with EmbeddingDim = 770 }
            fails [ "vocabulary size must be positive, found 0" ] { tinyConfig with VocabSize = 0 }
            fails [ "context length must be positive, found -1" ] { tinyConfig with ContextLength = -1 }
            fails [ "embedding dimension must be positive, found 0" ] { tinyConfig with EmbeddingDim = 0 }
            fails [ "number of heads must be positive, found 0" ] { tinyConfig with Heads = 0 }
            fails [ "number of layers must be positive, found 0" ] { tinyConfig with Layers = 0 }
            fails [ "dropout rate must be in [0, 1), found 1" ] { tinyConfig with DropRate = 1.0 }
            fails [ "dropout rate must be in [0, 1), found -0.1" ] { tinyConfig with DropRate = -0.1 }
            fails [ "layer norm epsilon must be positive, found 0" ] { tinyConfig with LayerNormEpsilon = 0.0 }
            throwsGpt [ "embedding dimension 770 is not divisible by 12 heads" ] (fun () -> new GptModel({ tinyConfig with EmbeddingDim = 770; Heads = 12 }) |> ignore) "GptModel"
            throwsGpt [ "dropout rate must be in [0, 1), found 1.5" ] (fun () -> new CausalSelfAttention({ tinyConfig with DropRate = 1.5 }) |> ignore) "CausalSelfAttention"
    ]

[<Tests>]
let layerTests =
    testList "model: layers" [
        testCase "LayerNorm: the book's explicit formula = the fused kernel" <| fun () ->
            use norm = new LayerNorm(10)
            assign norm.Scale (randn 1 [ 10L ])
            assign norm.Shift (randn 2 [ 10L ])
            use x = randn 3 [ 2L; 4L; 10L ]
            expectClose 1e-5 (norm.forward x) (norm.ForwardExplicit x) "fast vs explicit"
            expectClose 1e-5 (Book.layerNorm 1e-5 norm.Scale norm.Shift x) (Norm.apply norm.Params x) "functions"

        testCase "LayerNorm: mean 0 and biased variance 1 per row; GPT-2 names" <| fun () ->
            use norm = new LayerNorm(5)
            use x = randn 123 [ 2L; 5L ]
            use y = norm.forward x
            expectClose 1e-6 (y.mean([| -1L |])) (torch.zeros 2L) "mean"
            expectClose 1e-4 (y.var(-1L, unbiased = false)) (torch.ones 2L) "variance"
            Expect.equal (norm.state_dict().Keys |> Seq.sort |> List.ofSeq) [ "bias"; "weight" ] "shift is bias, scale is weight"
            Expect.equal norm.Epsilon 1e-5 "eps"

        testCase "GELU: the book's tanh formula = the fast kernel; the exact erf GELU differs" <| fun () ->
            use x = torch.linspace(-6.0, 6.0, 1001L)
            expectClose 1e-6 (Book.gelu x) (Gelu.apply x) "book vs fast"
            use exact = torch.nn.functional.gelu x
            Expect.isGreaterThan (maxAbsDifference (Gelu.apply x) exact) 1e-4 "tanh approximation is not the erf GELU"

        testCase "FeedForward: 4x expansion with GPT-2 names, shape kept (book: [2, 3, 768])" <| fun () ->
            use feedForward = new FeedForward(768)
            use x = torch.rand(2L, 3L, 768L)
            use y = feedForward.forward x
            Expect.equal y.shape [| 2L; 3L; 768L |] "shape"
            let shapes = feedForward.state_dict () |> Seq.map (fun kv -> kv.Key, List.ofArray kv.Value.shape) |> Map.ofSeq
            Expect.equal shapes (Map.ofList [ "c_fc.weight", [ 3072L; 768L ]; "c_fc.bias", [ 3072L ]; "c_proj.weight", [ 768L; 3072L ]; "c_proj.bias", [ 768L ] ]) "parameters"
    ]

[<Tests>]
let structureTests =
    testList "model: structure and parameters" [
        testCase "state_dict keys are GPT-2's; a tied head has no lm_head; no c_attn.bias without QKV bias" <| fun () ->
            for qkvBias in [ true; false ] do
                for tied in [ true; false ] do
                    use model = new GptModel({ tinyConfig with QkvBias = qkvBias; TiedHead = tied }, 1L)
                    Expect.equal (stateNames model) (gpt2Names 2 qkvBias tied) (sprintf "bias %b, tied %b" qkvBias tied)
                    Expect.equal model.Head.IsSome (not tied) "Head"

        testCase "parameters() yields each tensor once, also when the head is tied" <| fun () ->
            use model = new GptModel(tinyConfig, 1L)
            let parameters = model.parameters () |> List.ofSeq
            let handles = parameters |> List.map (fun p -> p.Handle) |> List.distinct
            Expect.equal handles.Length parameters.Length "no tensor twice"
            Expect.equal parameters.Length (model.state_dict().Count) "every parameter once"
            Expect.equal model.ParameterCount (GptConfig.parameterCount tinyConfig) "count"

        testCase "blocks use our LayerNorm (not TorchSharp's, which has the same keys)" <| fun () ->
            use model = new GptModel(tinyConfig, 1L)
            Expect.equal (model.Blocks[0].AttentionNorm.GetType()) typeof<Gpt.Model.LayerNorm> "ln_1"
            Expect.equal (model.FinalNorm.GetType()) typeof<Gpt.Model.LayerNorm> "ln_f"

        testCase "ParameterCount = parameters() = GptConfig.parameterCount on a 5M-parameter configuration" <| fun () ->
            let sizable = { VocabSize = 8000; ContextLength = 256; EmbeddingDim = 256; Heads = 8; Layers = 4; DropRate = 0.1; QkvBias = true; TiedHead = true; LayerNormEpsilon = 1e-5 }
            for config in [ sizable; { sizable with QkvBias = false; TiedHead = false } ] do
                use model = new GptModel(config, 1L)
                let counted = model.parameters () |> Seq.sumBy (fun p -> p.numel ())
                Expect.equal model.ParameterCount counted "ParameterCount = parameters()"
                Expect.equal counted (GptConfig.parameterCount config) (sprintf "formula for bias %b tied %b" config.QkvBias config.TiedHead)

        testCase "GPT-2 initialisation: N(0, 0.02), residual projections N(0, 0.02/sqrt(2L)), biases 0, LayerNorm 1/0" <| fun () ->
            let config = { tinyConfig with VocabSize = 4000; EmbeddingDim = 64; Layers = 4; ContextLength = 64 }
            use model = new GptModel(config, 3L)
            let state = model.state_dict ()
            let std (name: string) = state[name].std().item<float32> () |> float
            Expect.floatClose { absolute = 1e-3; relative = 0.0 } (std "wte.weight") 0.02 "wte"
            Expect.floatClose { absolute = 1e-3; relative = 0.0 } (std "h.1.attn.c_attn.weight") 0.02 "c_attn"
            Expect.floatClose { absolute = 1e-3; relative = 0.0 } (std "h.2.mlp.c_fc.weight") 0.02 "c_fc"
            let residual = 0.02 / sqrt 8.0
            Expect.floatClose { absolute = 5e-4; relative = 0.0 } (std "h.0.attn.c_proj.weight") residual "attn.c_proj"
            Expect.floatClose { absolute = 5e-4; relative = 0.0 } (std "h.3.mlp.c_proj.weight") residual "mlp.c_proj"
            for KeyValue(name, tensor) in state do
                if name.EndsWith ".bias" then
                    Expect.isTrue (tensor.abs().max().item<float32> () = 0.0f) (sprintf "%s is zero" name)
                if name.Contains "ln_" && name.EndsWith ".weight" then
                    Expect.isTrue (tensor.eq(torch.tensor 1.0f).all().item<bool> ()) (sprintf "%s is ones" name)

        testCase "the same seed gives the same weights, whatever the global generator did in between" <| fun () ->
            use first = new GptModel(tinyConfig, 42L)
            torch.rand(100L) |> ignore
            use second = new GptModel(tinyConfig, 42L)
            use other = new GptModel(tinyConfig, 43L)
            for KeyValue(name, tensor) in first.state_dict () do
                expectEqual (second.state_dict()[name]) tensor name
            Expect.isGreaterThan (maxAbsDifference (other.state_dict()["wte.weight"]) (first.state_dict()["wte.weight"])) 0.0 "another seed differs"
    ]

[<Tests>]
let behaviourTests =
    testList "model: forward, dropout, validation" [
        testCase "logits have shape [B, T, vocab]; int32 ids work too" <| fun () ->
            use model = new GptModel(tinyConfig, 1L)
            use ids = randomIds 1 97 3 5
            use logits = model.forward ids
            Expect.equal logits.shape [| 3L; 5L; 97L |] "[3, 5, 97]"
            Expect.equal logits.dtype torch.float32 "float32"
            use ids32 = ids.``to``(torch.int32)
            expectEqual (model.forward ids32) logits "int32 ids"

        testCase "dropout only in training mode; eval under no_grad is deterministic and ignores dropout" <| fun () ->
            use noisy = new GptModel({ tinyConfig with DropRate = 0.5 }, 5L)
            use clean = new GptModel({ tinyConfig with DropRate = 0.0 }, 5L)
            use ids = randomIds 2 97 2 8
            noisy.train ()
            let trainingDiffers = [ 1..3 ] |> List.exists (fun _ -> maxAbsDifference (noisy.forward ids) (noisy.forward ids) > 0.0)
            Expect.isTrue trainingDiffers "training mode: two passes differ"
            noisy.eval ()
            clean.eval ()
            use _ = torch.no_grad ()
            use first = noisy.forward ids
            use second = noisy.forward ids
            expectEqual second first "eval: deterministic"
            expectEqual (clean.forward ids) first "eval: same as the model without dropout"
            Expect.isFalse first.requires_grad "no graph under no_grad"

        testCase "backward reaches every parameter; the tied head's gradient lands in wte" <| fun () ->
            for tied in [ true; false ] do
                use model = new GptModel({ tinyConfig with TiedHead = tied; DropRate = 0.1 }, 4L)
                model.train ()
                use ids = randomIds 8 97 2 12
                use targets = randomIds 9 97 2 12
                use logits = model.forward ids
                use loss = torch.nn.functional.cross_entropy(logits.flatten(0L, 1L), targets.flatten())
                loss.backward ()
                for struct (name, parameter) in model.named_parameters () do
                    Expect.isFalse (isNull parameter.grad) (sprintf "%s has a gradient (tied %b)" name tied)
                    Expect.isGreaterThan (parameter.grad.abs().sum().item<float32> ()) 0.0f (sprintf "%s gradient is nonzero (tied %b)" name tied)

        testCase "inputs longer than the context or outside the vocabulary fail with a message" <| fun () ->
            use model = new GptModel(tinyConfig, 1L)
            throwsGpt [ "sequence length 13 exceeds the model's context length 12" ] (fun () -> model.forward (torch.zeros([| 1L; 13L |], dtype = torch.int64)) |> ignore) "too long"
            throwsGpt [ "token id 97 is outside the vocabulary (0..96)" ] (fun () -> model.forward (torch.tensor([| 1L; 97L |]).view(1L, 2L)) |> ignore) "too large"
            throwsGpt [ "token id -1 is outside the vocabulary (0..96)" ] (fun () -> model.forward (torch.tensor([| -1L; 3L |]).view(1L, 2L)) |> ignore) "negative"
            throwsGpt [ "token ids must have shape [batch, length], found [4]" ] (fun () -> model.forward (torch.zeros([| 4L |], dtype = torch.int64)) |> ignore) "1-d"
    ]

[<Tests>]
let cacheTests =
    testList "model: KV cache" [
        testCase "cached forward in chunks of 3, 1, 4, 2, 1, 1 = uncached forward (1e-5), then token by token after Reset" <| fun () ->
            use model = new GptModel({ tinyConfig with Layers = 3 }, 7L)
            model.eval ()
            use ids = randomIds 3 97 2 12
            use full = noGrad (fun () -> model.forward ids)
            use cache = model.CreateCache 2
            let run (chunks: int list) =
                cache.Reset()
                Expect.equal cache.Length 0 "empty after Reset"
                let mutable past = 0
                for chunk in chunks do
                    use piece = ids.narrow(1L, int64 past, int64 chunk)
                    use logits = model.ForwardCached(piece, cache)
                    use expected = full.narrow(1L, int64 past, int64 chunk)
                    expectClose 1e-5 logits expected (sprintf "chunks %A, tokens %d..%d" chunks past (past + chunk - 1))
                    past <- past + chunk
                    Expect.equal cache.Length past "Length advances"
            run [ 3; 1; 4; 2; 1; 1 ]
            run (List.replicate 12 1)
            run [ 12 ]

        testCase "the cache refuses overflow, another batch size, and a disposed cache" <| fun () ->
            use model = new GptModel(tinyConfig, 7L)
            use cache = model.CreateCache 1
            use ids = randomIds 4 97 1 12
            model.ForwardCached(ids, cache) |> ignore
            throwsGpt [ "the cache holds 12 tokens; 1 more would exceed the context length 12" ] (fun () -> model.ForwardCached(ids.narrow(1L, 0L, 1L), cache) |> ignore) "overflow"
            cache.Reset()
            throwsGpt [ "the cache was made for batch size 1, the input has batch size 2" ] (fun () -> model.ForwardCached(randomIds 5 97 2 3, cache) |> ignore) "batch"
            use other = new GptModel({ tinyConfig with Heads = 2 }, 7L)
            use otherCache = other.CreateCache 1
            throwsGpt [ "the cache was made for another model (2 layers of [1, 2, 12, 8] buffers), this model needs 2 layers of [1, 4, 12, 4]" ]
                (fun () -> model.ForwardCached(ids, otherCache) |> ignore) "another model"
            (cache :> IDisposable).Dispose()
            Expect.throwsT<ObjectDisposedException> (fun () -> model.ForwardCached(ids, cache) |> ignore) "disposed"
    ]

[<Tests>]
let generationTests =
    testList "model: generateTextSimple" [
        testCase "appends maxNewTokens argmax tokens, cropping the context, and restores the training mode" <| fun () ->
            use model = new GptModel({ tinyConfig with DropRate = 0.3 }, 9L)
            model.train ()
            use prompt = randomIds 6 97 2 10
            use generated = Gpt.Generation.Generator.generateTextSimple model prompt 5 12 // 10 + 5 > 12: the last steps crop
            Expect.isTrue model.training "training mode restored"
            Expect.equal generated.shape [| 2L; 15L |] "[2, 15]"
            expectEqual (generated.narrow(1L, 0L, 10L)) prompt "prompt kept"
            model.eval ()
            use _ = torch.no_grad ()
            // The last token was predicted from the 12 tokens before it.
            use window = generated.narrow(1L, 2L, 12L)
            use expected = (model.forward window).select(1L, -1L).argmax(-1L)
            expectEqual (generated.select(1L, -1L)) expected "last token = argmax over the cropped window"

        testCase "zero new tokens returns a copy; bad arguments fail" <| fun () ->
            use model = new GptModel(tinyConfig, 9L)
            use prompt = randomIds 7 97 1 4
            use same = Gpt.Generation.Generator.generateTextSimple model prompt 0 12
            expectEqual same prompt "copy"
            throwsGpt [ "the generation context length must be in 1..12 (the model's), found 13" ] (fun () -> Gpt.Generation.Generator.generateTextSimple model prompt 1 13 |> ignore) "context"
            throwsGpt [ "the number of new tokens must not be negative, found -1" ] (fun () -> Gpt.Generation.Generator.generateTextSimple model prompt -1 12 |> ignore) "negative"
    ]

/// Small configurations with every switch.
let smallConfigs =
    gen {
        let! heads = Gen.choose (1, 4)
        let! headDim = Gen.choose (1, 4)
        let! vocab = Gen.choose (1, 60)
        let! context = Gen.choose (1, 10)
        let! layers = Gen.choose (1, 3)
        let! qkvBias = Gen.elements [ true; false ]
        let! tied = Gen.elements [ true; false ]
        return
            { VocabSize = vocab; ContextLength = context; EmbeddingDim = heads * headDim; Heads = heads; Layers = layers
              DropRate = 0.0; QkvBias = qkvBias; TiedHead = tied; LayerNormEpsilon = 1e-5 }
    }

[<Tests>]
let propertyTests =
    testList "model: properties" [
        testPropertyWithConfig { propertyConfig with maxTest = 40 } "output shape [B, T, vocab] and parameter count for generated small configurations"
        <| Prop.forAll (Arb.fromGen (Gen.zip3 smallConfigs (Gen.choose (1, 3)) (Gen.choose (0, 100000)))) (fun (config, batch, seed) ->
            use model = new GptModel(config, int64 seed)
            let length = 1 + seed % config.ContextLength
            use ids = randomIds seed config.VocabSize batch length
            use logits = model.forward ids
            Expect.equal logits.shape [| int64 batch; int64 length; int64 config.VocabSize |] "[B, T, vocab]"
            Expect.equal model.ParameterCount (GptConfig.parameterCount config) "ParameterCount = formula")

        testPropertyWithConfig { propertyConfig with maxTest = 40 } "causality: changing the token at t + k never changes the logits at positions <= t"
        <| Prop.forAll (Arb.fromGen (Gen.zip3 smallConfigs (Gen.choose (0, 100000)) (Gen.choose (0, 1000)))) (fun (config, seed, pick) ->
            let config = { config with VocabSize = max 2 config.VocabSize; ContextLength = max 2 config.ContextLength }
            use model = new GptModel(config, int64 seed)
            model.eval ()
            let length = config.ContextLength
            let t = pick % (length - 1)
            let later = t + 1 + (pick / length) % (length - 1 - t) // in t + 1 .. length - 1
            use ids = randomIds seed config.VocabSize 1 length
            use changed = ids.clone ()
            let current = changed[0L, int64 later].item<int64> ()
            changed[0L, int64 later] <- torch.tensor((current + 1L) % int64 config.VocabSize)
            use _ = torch.no_grad ()
            use before = model.forward ids
            use after = model.forward changed
            expectEqual (after.narrow(1L, 0L, int64 t + 1L)) (before.narrow(1L, 0L, int64 t + 1L)) (sprintf "positions 0..%d after changing %d" t later))

        testPropertyWithConfig { propertyConfig with maxTest = 30 } "cached forward over random chunks = uncached forward"
        <| Prop.forAll (Arb.fromGen (Gen.zip3 smallConfigs (Gen.choose (0, 100000)) (Gen.listOfLength 10 (Gen.choose (1, 4))))) (fun (config, seed, sizes) ->
            use model = new GptModel(config, int64 seed)
            model.eval ()
            let length = config.ContextLength
            use ids = randomIds seed config.VocabSize 2 length
            use full = noGrad (fun () -> model.forward ids)
            use cache = model.CreateCache 2
            let mutable past = 0
            for size in sizes do
                let chunk = min size (length - past)
                if chunk > 0 then
                    use logits = model.ForwardCached(ids.narrow(1L, int64 past, int64 chunk), cache)
                    expectClose 1e-5 logits (full.narrow(1L, int64 past, int64 chunk)) (sprintf "tokens %d..%d" past (past + chunk - 1))
                    past <- past + chunk)
    ]
