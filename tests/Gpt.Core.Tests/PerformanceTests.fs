/// Correctness of what the speed work changed or added: the FLOP count behind MFU, the fused head + cross-entropy,
/// the sliced AdamW step, and tensors that must not outlive their use (KV cache, training step). No timings.
module Gpt.Tests.PerformanceTests

open Expecto
open TorchSharp
open Gpt
open Gpt.Bench
open Gpt.Model
open Gpt.Weights
open Gpt.Kernels
open Gpt.Training
open Gpt.Tests.ModelTestUtil

let private liveTensors () = DisposeScopeManager.Statistics.ThreadTotalLiveCount

/// Parameters of a built model that enter matrix products: every Linear weight, plus the token embedding when it
/// doubles as the head.
let private countedMatrixParameters (model: GptModel) =
    let linear =
        model.named_modules ()
        |> Seq.sumBy (fun struct (_, m) ->
            match m with
            | :? Modules.Linear as l -> l.weight.numel ()
            | _ -> 0L)
    let tied = if model.Config.TiedHead then int64 model.Config.VocabSize * int64 model.Config.EmbeddingDim else 0L
    linear + tied

[<Tests>]
let flopTests =
    testList "bench FLOP count" [
        testCase "presets A and B: parameters and matrix parameters" <| fun () ->
            let a, b = TrainBench.presetA, TrainBench.presetB
            // A: 4 blocks of 12·256² = 3,145,728, head 50,257·256 = 12,865,792.
            Expect.equal (TrainBench.matrixParameterCount a.Config) 16_011_520L "A matrix parameters"
            // B: 12 blocks of 12·768² = 84,934,656, head 50,257·768 = 38,597,376.
            Expect.equal (TrainBench.matrixParameterCount b.Config) 123_532_032L "B matrix parameters"
            Expect.equal (GptConfig.parameterCount a.Config) 28_953_600L "A parameters"
            Expect.equal (GptConfig.parameterCount b.Config) 163_009_536L "B parameters (gpt2-small, no QKV bias, separate head: 163M)"
            Expect.equal (a.BatchSize, a.SequenceLength, b.BatchSize, b.SequenceLength) (8, 256, 1, 256) "batches"

        testCase "FLOPs per token = 6N + 12·layers·T·d, and MFU" <| fun () ->
            Expect.equal (TrainBench.flopsPerToken TrainBench.presetA.Config 256) (6.0 * 16_011_520.0 + 12.0 * 4.0 * 256.0 * 256.0) "A"
            Expect.equal (TrainBench.flopsPerToken TrainBench.presetB.Config 256) 769_503_744.0 "B"
            // 1,000 tokens/s of A need 99.2 GFLOP/s: half of a 198.4 GFLOP/s machine.
            Expect.floatClose Accuracy.high (TrainBench.mfu TrainBench.presetA.Config 256 1000.0 198.429696) 0.5 "MFU"

        testCase "the formula counts the Linear weights and the head of a built model" <| fun () ->
            for config in [ tinyConfig; { tinyConfig with TiedHead = false; QkvBias = false; Layers = 3 } ] do
                use model = new GptModel(config, 1L)
                Expect.equal (TrainBench.matrixParameterCount config) (countedMatrixParameters model) (sprintf "tied %b" config.TiedHead)
                Expect.equal (GptConfig.parameterCount config) model.ParameterCount "all parameters"

        testCase "unknown presets are refused" <| fun () ->
            TestUtil.throwsGpt [ "unknown training benchmark preset 'C'"; "A or B" ] (fun () -> TrainBench.preset "C" |> ignore) "C"
            Expect.equal (TrainBench.preset " b ").Name "B" "case and spaces"
    ]

/// Gradients of every parameter by name (cloned).
let private gradients (model: GptModel) =
    [ for struct (name, p) in model.named_parameters () do
          use grad = p.grad
          if not (isNull grad) then name, grad.clone () ]

[<Tests>]
let headLossTests =
    testList "fused head loss" [
        testCase "targets of -100 count for nothing, as PyTorch's ignore_index: value and gradients" <| fun () ->
            use plain = new GptModel(tinyConfig, 9L)
            use fused = new GptModel(tinyConfig, 9L)
            use ids = randomIds 3 tinyConfig.VocabSize 2 8
            use drawn = randomIds 4 tinyConfig.VocabSize 2 8
            // The instruction-tuning pattern: padding and prompt targets masked.
            use targets = drawn.clone()
            (use prompt = targets[0L].narrow(0L, 0L, 5L) in prompt.fill_((-100L).ToScalar()) |> ignore)
            (use padding = targets[1L].narrow(0L, 7L, 1L) in padding.fill_((-100L).ToScalar()) |> ignore)
            use logits = plain.forward ids
            use expected = Loss.crossEntropy logits targets
            expected.backward ()
            use loss = fused.Loss(ids, targets)
            loss.backward ()
            expectClose 1e-5 loss expected "loss over the kept targets"
            let actual = gradients fused |> Map.ofList
            for name, grad in gradients plain do
                expectClose 1e-5 actual[name] grad (sprintf "gradient of %s" name)
            use allIgnored = torch.full([| 2L; 8L |], (-100L).ToScalar(), dtype = torch.int64)
            use nothing = (use _ = torch.no_grad () in fused.Loss(ids, allIgnored))
            Expect.isTrue (System.Double.IsNaN(nothing.item<float32> () |> float)) "every target ignored: NaN, as PyTorch"

        testCase "GptModel.Loss equals cross-entropy of the logits, value and gradients (tied and separate head)" <| fun () ->
            for config in [ tinyConfig; { tinyConfig with TiedHead = false } ] do
                use plain = new GptModel(config, 7L)
                use fused = new GptModel(config, 7L)
                use ids = randomIds 1 config.VocabSize 3 10
                use targets = randomIds 2 config.VocabSize 3 10
                use logits = plain.forward ids
                use expected = Loss.crossEntropy logits targets
                expected.backward ()
                use loss = fused.Loss(ids, targets)
                loss.backward ()
                expectClose 1e-5 loss expected (sprintf "loss, tied %b" config.TiedHead)
                let expectedGradients = gradients plain
                let actualGradients = gradients fused
                Expect.equal (List.map fst actualGradients) (List.map fst expectedGradients) "the same parameters get gradients"
                for (name, actual), (_, wanted) in List.zip actualGradients expectedGradients do
                    expectClose 1e-5 actual wanted (sprintf "gradient of %s, tied %b" name config.TiedHead)

        testCase "several chunks over GPT-2's vocabulary: value, gradients, scaled backward, no-grad path" <| fun () ->
            let rows, dim, vocab = 400L, 8L, 50257L
            Expect.isGreaterThan ((rows + HeadLoss.chunkRows rows vocab - 1L) / HeadLoss.chunkRows rows vocab) 1L "more than one chunk"
            use hidden = (randn 3 [ rows; dim ]).requires_grad_ true
            use weight = (randn 4 [ vocab; dim ] * 0.5).requires_grad_ true
            use targets = torch.randint(vocab, [| rows |], dtype = torch.int64, generator = generator 5)
            use reference = torch.nn.functional.cross_entropy(hidden.mm(weight.t()), targets)
            let referenceGradients = torch.autograd.grad([| reference |], [| hidden; weight |])
            use referenceHidden = referenceGradients[0]
            use referenceWeight = referenceGradients[1]
            use loss = HeadLoss.crossEntropy hidden weight targets
            expectClose 1e-5 loss reference "loss"
            use half = loss * 0.5 // as gradient accumulation scales a loss
            half.backward ()
            use gradHidden = hidden.grad
            use gradWeight = weight.grad
            expectClose 1e-6 (gradHidden * 2.0) referenceHidden "hidden gradient"
            expectClose 1e-6 (gradWeight * 2.0) referenceWeight "weight gradient"
            use _ = torch.no_grad ()
            use evaluated = HeadLoss.crossEntropy hidden weight targets
            Expect.isFalse evaluated.requires_grad "no graph under no_grad"
            expectClose 1e-5 evaluated reference "no-grad value"

        testCase "the weight gradient accumulates over backward calls, as autograd's would" <| fun () ->
            use hidden = (randn 12 [ 6L; 4L ]).requires_grad_ true
            use weight = (randn 13 [ 9L; 4L ]).requires_grad_ true
            use targets = torch.tensor([| 0L; 8L; 3L; 3L; 1L; 5L |])
            use reference = torch.nn.functional.cross_entropy(hidden.mm(weight.t()), targets)
            let referenceGradients = torch.autograd.grad([| reference |], [| weight |])
            use referenceWeight = referenceGradients[0]
            for _ in 1 .. 3 do
                use loss = HeadLoss.crossEntropy hidden weight targets
                loss.backward ()
            use accumulated = weight.grad
            expectClose 1e-6 accumulated (referenceWeight * 3.0) "three backward calls add up"

        testCase "Loss.batch takes the fused path for a GptModel; shape errors are clear" <| fun () ->
            use model = new GptModel(tinyConfig, 3L)
            model.eval ()
            use ids = randomIds 6 97 2 5
            use targets = randomIds 7 97 2 5
            use batch = Loss.batch model ids targets
            use logits = model.forward ids
            use expected = Loss.crossEntropy logits targets
            expectClose 1e-5 batch expected "Loss.batch"
            TestUtil.throwsGpt [ "targets must have the shape of the inputs [2, 5], found [2, 4]" ]
                (fun () -> model.Loss(ids, targets.narrow(1L, 0L, 4L)) |> ignore) "shape"
    ]

[<Tests>]
let tokenLookupTests =
    testList "token lookup" [
        testCase "rows and gradients equal autograd's lookup, with repeated ids, int32 ids and accumulation" <| fun () ->
            for dtype in [ torch.int64; torch.int32 ] do
                use weight = (randn 21 [ 11L; 6L ]).requires_grad_ true
                use reference = (randn 21 [ 11L; 6L ]).requires_grad_ true
                // Repeated ids (3 and 7) must add their rows' gradients.
                use ids = torch.tensor([| 3L; 7L; 3L; 0L; 7L; 10L |]).view(2L, 3L).to_type(dtype)
                use upstream = randn 22 [ 2L; 3L; 6L ]
                for pass in 1 .. 2 do // the second pass adds into the existing gradient
                    use rows = TokenLookup.lookup weight ids
                    use expected = reference.index_select(0L, ids.flatten()).view(2L, 3L, 6L) // autograd's own backward
                    expectClose 0.0 rows expected (sprintf "rows, %O, pass %d" dtype pass)
                    use product = (rows * upstream).sum()
                    product.backward ()
                    use expectedProduct = (expected * upstream).sum()
                    expectedProduct.backward ()
                    use grad = weight.grad
                    use expectedGrad = reference.grad
                    expectClose 1e-6 grad expectedGrad (sprintf "gradient, %O, pass %d" dtype pass)
                use _ = torch.no_grad ()
                use plain = TokenLookup.lookup weight ids
                Expect.isFalse plain.requires_grad "no graph under no_grad"

        testCase "GptModel's table and head gradients equal those of the same model spelled with autograd's layers" <| fun () ->
            // The reference runs the model's own blocks, but the token lookup through autograd's index_select and the
            // head through matmul and cross_entropy on a clone of the table: neither of our backward functions is on
            // the reference side.
            for config in [ tinyConfig; { tinyConfig with TiedHead = false } ] do
                use model = new GptModel(config, 9L)
                model.eval ()
                use ids = randomIds 31 config.VocabSize 2 7
                use targets = randomIds 32 config.VocabSize 2 7
                use loss = model.Loss(ids, targets)
                loss.backward ()
                use table = model.TokenEmbedding.weight
                use tableGrad = table.grad
                use actualTable = tableGrad.clone ()
                let actualHead = model.Head |> Option.map (fun head -> using head.weight.grad (fun g -> g.clone ()))
                use clone = table.detach().clone().requires_grad_ true
                // Tied: the head is the table itself.
                let headClone =
                    match model.Head with
                    | Some head -> head.weight.detach().clone().requires_grad_ true
                    | None -> clone
                use scope = torch.NewDisposeScope()
                let positions = model.PositionEmbedding.forward (torch.arange(7L))
                let mutable x = clone.index_select(0L, ids.flatten()).view(2L, 7L, -1L) + positions
                for block in model.Blocks do
                    x <- block.forward x
                let logits = model.FinalNorm.forward(x).matmul(headClone.t())
                let reference = torch.nn.functional.cross_entropy(logits.view(-1L, int64 config.VocabSize), targets.flatten())
                expectClose 1e-5 loss reference (sprintf "loss, tied %b" config.TiedHead)
                reference.backward ()
                expectClose 1e-6 actualTable clone.grad (sprintf "table gradient, tied %b" config.TiedHead)
                match actualHead with
                | Some head ->
                    expectClose 1e-6 head headClone.grad "separate head gradient"
                    head.Dispose()
                | None -> ()
    ]

[<Tests>]
let optimizerTests =
    testList "sliced AdamW" [
        testCase "NamedAdamW.Step gives TorchSharp's AdamW results to the bit, also for parameters above one slice" <| fun () ->
            // wte is 9,000 × 256 = 2,304,000 values: more than one slice of NamedAdamW.SliceElements.
            let config = { tinyConfig with VocabSize = 9000; EmbeddingDim = 256; Layers = 1 }
            Expect.isGreaterThan (9000L * 256L) NamedAdamW.SliceElements "a parameter spans two slices"
            use sliced = new GptModel(config, 11L)
            use reference = new GptModel(config, 11L)
            use slicedOptimizer = Optimizer.adamW Optimizer.defaults sliced
            use referenceOptimizer = Optimizer.adamW Optimizer.defaults reference
            for step in 1 .. 3 do
                for model, optimizer in [ sliced, slicedOptimizer; reference, referenceOptimizer ] do
                    use scope = torch.NewDisposeScope()
                    optimizer.ZeroGrad()
                    let loss = model.Loss(randomIds step 9000 2 8, randomIds (step + 10) 9000 2 8)
                    loss.backward ()
                slicedOptimizer.Step()
                referenceOptimizer.AdamW.step () |> ignore // TorchSharp's own step
                for struct (name, p) in sliced.named_parameters () do
                    expectEqual p (reference.state_dict().[name]) (sprintf "step %d: %s" step name)
            let steps = Optimizer.stepCounts slicedOptimizer |> Array.map snd |> Array.distinct
            Expect.equal steps [| 3L |] "step counts"
    ]

[<Tests>]
let zeroGradTests =
    testList "zero_grad" [
        testCase "gradients of 32 MB or more are dropped, smaller ones zeroed in place" <| fun () ->
            // wte and the head: 33,000 × 256 float32 = 33.8 MB each; everything else is far smaller.
            let config = { tinyConfig with VocabSize = 33000; EmbeddingDim = 256; Layers = 1; TiedHead = false }
            use model = new GptModel(config, 2L)
            use optimizer = Optimizer.adamW Optimizer.defaults model
            for _ in 1 .. 2 do
                optimizer.ZeroGrad()
                use loss = model.Loss(randomIds 3 33000 1 4, randomIds 4 33000 1 4)
                loss.backward ()
                optimizer.Step()
            optimizer.ZeroGrad()
            for struct (name, p) in model.named_parameters () do
                use grad = p.grad
                if p.numel () * 4L >= int64 NativeAllocator.mmapThresholdBytes then
                    Expect.isTrue (isNull grad) (sprintf "%s: dropped" name)
                else
                    Expect.isFalse (isNull grad) (sprintf "%s: kept" name)
                    Expect.equal (grad.abs().sum().item<float32> ()) 0.0f (sprintf "%s: zeroed" name)
            Expect.isTrue (model.named_parameters () |> Seq.exists (fun struct (_, p) -> p.numel () * 4L >= 33_554_432L)) "some are large"
    ]

[<Tests>]
let splitLinearTests =
    testList "one-token linear on two threads" [
        testCase "equals functional.linear for one row (with and without bias), leaves no live tensor, keeps autograd" <| fun () ->
            use weight = randn 41 [ 601L; 500L ] // 300,500 values: above the split threshold; odd rows split unevenly
            use bias = randn 42 [ 601L ]
            use x = randn 43 [ 1L; 1L; 500L ]
            use _ = torch.no_grad ()
            for b in [ bias; null ] do
                use expected = torch.nn.functional.linear(x, weight, b)
                let before = liveTensors ()
                (use once = ParallelLinear.linear weight b x in ())
                Expect.equal (liveTensors ()) before "no tensor handle left behind by the pool threads"
                use actual = ParallelLinear.linear weight b x
                Expect.equal actual.shape [| 1L; 1L; 601L |] "shape (1, 1, out)"
                expectClose 1e-6 actual expected (sprintf "values, bias %b" (not (isNull b)))
            // Several rows and small weights take functional.linear itself.
            use rows = randn 44 [ 2L; 3L; 500L ]
            expectClose 0.0 (ParallelLinear.linear weight bias rows) (torch.nn.functional.linear(rows, weight, bias)) "several rows"

        testCase "with autograd on and a weight that needs a gradient, the plain path keeps the graph" <| fun () ->
            use weight = (randn 45 [ 600L; 500L ]).requires_grad_ true
            use x = randn 46 [ 1L; 500L ]
            use y = ParallelLinear.linear weight null x
            Expect.isTrue y.requires_grad "part of the graph"
            use total = y.sum ()
            total.backward ()
            use grad = weight.grad
            Expect.isFalse (isNull grad) "the weight gets a gradient"
    ]

[<Tests>]
let allocatorTests =
    testList "native allocator" [
        testCase "huge-page advice applies to large contiguous CPU tensors only and leaves their values alone" <| fun () ->
            use large = torch.arange(3_000_000L, dtype = torch.float32) // 12 MB
            let advised = NativeAllocator.adviseHugePages large
            if System.OperatingSystem.IsLinux() then Expect.isTrue advised "a 12 MB tensor is advised on Linux"
            use expected = torch.arange(3_000_000L, dtype = torch.float32)
            expectEqual large expected "values unchanged"
            use small = torch.ones(1000L)
            Expect.isFalse (NativeAllocator.adviseHugePages small) "below one huge page"
            use strided = large.view(1000L, 3000L).t()
            Expect.isFalse (NativeAllocator.adviseHugePages strided) "not contiguous"
            use fresh = NativeAllocator.emptyLike (large.view(1000L, 3000L))
            Expect.equal fresh.shape [| 1000L; 3000L |] "emptyLike keeps the shape"
            Expect.equal fresh.dtype torch.float32 "and the type"
    ]

[<Tests>]
let leakTests =
    testList "no leaked tensors" [
        // GptModel.CreateCache read wte.weight (a new handle each time) twice per buffer and never disposed them: 8 live
        // tensors per cache of a 2-layer model; TokenIds.check left ids.min() and ids.max() alive at each forward.
        testCase "CreateCache, cached forward and dispose leave no live tensor behind" <| fun () ->
            use model = new GptModel(tinyConfig, 5L)
            model.eval ()
            use ids = randomIds 8 97 2 4
            let before = liveTensors ()
            for _ in 1 .. 3 do
                use cache = model.CreateCache 2
                use logits = model.ForwardCached(ids, cache)
                use first = ids.narrow(1L, 0L, 1L)
                use next = model.ForwardCached(first, cache)
                ()
            Expect.equal (liveTensors ()) before "live tensors after three caches"

        testCase "a training step through the fused loss and the sliced optimizer leaves no live tensor behind" <| fun () ->
            use model = new GptModel({ tinyConfig with DropRate = 0.1; TiedHead = false }, 6L)
            use optimizer = Optimizer.adamW Optimizer.defaults model
            use ids = randomIds 9 97 2 6
            use targets = randomIds 10 97 2 6
            let step () =
                use scope = torch.NewDisposeScope()
                optimizer.ZeroGrad()
                let loss = Loss.batch model ids targets
                loss.backward ()
                optimizer.Step()
            step () // the first step creates the gradients and the optimizer state
            let before = liveTensors ()
            for _ in 1 .. 3 do
                step ()
            Expect.equal (liveTensors ()) before "live tensors after three more steps"
    ]
