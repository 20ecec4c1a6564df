/// The one-token decode path: the SIMD matrix-vector kernel against torch's matmul and against the portable kernel,
/// the worker pool, and the decoder against the TorchSharp model in every dtype (golden fixture, recomputation, KV
/// cache, low-rank adapters). No timings: speed is `gpt bench generate`'s business.
module Gpt.Tests.DecoderTests

#nowarn "9" "51"

open System
open System.Threading
open Expecto
open FsCheck
open FsCheck.FSharp
open TorchSharp
open Microsoft.FSharp.NativeInterop
open Gpt
open Gpt.Kernels
open Gpt.Model
open Gpt.Generation
open Gpt.Tests.TestUtil
open Gpt.Tests.ModelTestUtil

let private torchType (dtype: Dtype) =
    match dtype with
    | Dtype.Float32 -> torch.float32
    | Dtype.Float16 -> torch.float16
    | Dtype.BFloat16 -> torch.bfloat16

let private paths = [ MatVecPath.Avx512; MatVecPath.Avx2; MatVecPath.Portable ] |> List.filter MatVec.supported

let private epilogues = [ Epilogue.Store; Epilogue.Add; Epilogue.Gelu ]

/// The product through a kernel: W (rows, columns) in its dtype, bias (rows) or null, x (tokens, columns) float32,
/// y starting from `initial` (tokens, rows). Returns y.
let private kernelProduct (pool: WorkerPool) (path: MatVecPath) (weights: torch.Tensor) (bias: torch.Tensor) (x: torch.Tensor) (initial: torch.Tensor) (epilogue: Epilogue) =
    let y = initial.clone ()
    let biasAddress = if isNull bias then 0n else TensorMemory.address bias
    MatVec.multiply pool path (TensorMemory.matrix weights) biasAddress (TensorMemory.address x) (int x.shape[0]) (TensorMemory.address y) epilogue
    y

/// The same product in float64 through torch: x Wᵀ + b, then the epilogue.
/// Every operand, and the additions' alpha, is held to the end: TorchSharp 0.107 passes a temporary's raw handle to
/// libtorch, and a finaliser running during the call can free it (`a + b` makes a temporary Scalar alpha: once here,
/// "Expected false to be true" from c10's Scalar::toDouble, in one CI run of many).
let private torchProduct (weights: torch.Tensor) (bias: torch.Tensor) (x: torch.Tensor) (initial: torch.Tensor) (epilogue: Epilogue) =
    use one = (1.0).ToScalar()
    use w = weights.to_type(torch.float64)
    use x64 = x.to_type(torch.float64)
    use wt = w.t ()
    use product = torch.matmul(x64, wt)
    use bias64 = if isNull bias then null else bias.to_type(torch.float64)
    use initial64 = initial.to_type(torch.float64)
    use z = if isNull bias then product.clone () else product.add(bias64, one)
    let result =
        match epilogue with
        | Epilogue.Store -> z.clone ()
        | Epilogue.Add -> z.add(initial64, one)
        | Epilogue.Gelu -> torch.nn.functional.gelu(z, Modules.GELU.Approximate.tanh)
    result.to_type(torch.float32)

type private ProductCase =
    { Rows: int
      Columns: int
      Tokens: int
      Dtype: Dtype
      Bias: bool
      Seed: int }

let private productCases =
    gen {
        let! rows = Gen.choose (1, 70)
        // widths below, at and between multiples of the vector width (8), and GPT-2-like ones
        let! columns = Gen.oneof [ Gen.choose (1, 40); Gen.choose (41, 300); Gen.elements [ 64; 768; 777 ] ]
        let! tokens = Gen.oneof [ Gen.constant 1; Gen.choose (1, 11) ]
        let! dtype = Gen.elements Dtype.all
        let! bias = Gen.elements [ true; false ]
        let! seed = Gen.choose (0, 1_000_000)
        return { Rows = rows; Columns = columns; Tokens = tokens; Dtype = dtype; Bias = bias; Seed = seed }
    }
    |> Arb.fromGen

/// Random inputs of a case: weights in the case's dtype, float32 bias, input and initial output.
let private inputsOf (case: ProductCase) =
    use w32 = randn case.Seed [ int64 case.Rows; int64 case.Columns ]
    let weights = (w32 * 0.2).to_type(torchType case.Dtype).contiguous()
    let bias = if case.Bias then randn (case.Seed + 1) [ int64 case.Rows ] else null
    let x = randn (case.Seed + 2) [ int64 case.Tokens; int64 case.Columns ]
    let initial = randn (case.Seed + 3) [ int64 case.Tokens; int64 case.Rows ]
    weights, bias, x, initial

let private describe (case: ProductCase) (path: MatVecPath) (epilogue: Epilogue) =
    sprintf "%A %s [%d, %d] × %d tokens, bias %b, %A" path case.Dtype.Name case.Rows case.Columns case.Tokens case.Bias epilogue

/// Pinned arrays of 16-bit patterns as a [count, 40] matrix: row i holds pattern i in column i mod 40 (every lane
/// of the vector blocks and of the scalar tail), zeros elsewhere; x = all ones, so each output is exactly the widened
/// pattern.
let private widened (pool: WorkerPool) (path: MatVecPath) (dtype: Dtype) (patterns: uint16[]) (tokens: int) =
    let columns = 40
    let weights = GC.AllocateArray<uint16>(patterns.Length * columns, pinned = true)
    patterns |> Array.iteri (fun i p -> weights[i * columns + i % columns] <- p)
    let x = GC.AllocateArray<float32>(tokens * columns, pinned = true)
    Array.fill x 0 x.Length 1.0f
    let y = GC.AllocateArray<float32>(tokens * patterns.Length, pinned = true)
    let address (array: 'T[]) = NativePtr.toNativeInt (&&array[0])
    let matrix = { Address = address weights; Rows = patterns.Length; Columns = columns; Dtype = dtype }
    MatVec.multiply pool path matrix 0n (address x) tokens (address y) Epilogue.Store
    GC.KeepAlive weights
    GC.KeepAlive x
    y

[<Tests>]
let kernelTests =
    testList "decoder: matrix-vector kernel" [
        testPropertyWithConfig { propertyConfig with maxTest = 150 } "the kernel equals torch's matmul (float64) for every dtype, path and epilogue"
        <| Prop.forAll productCases (fun case ->
            let weights, bias, x, initial = inputsOf case
            use weights = weights
            use bias = bias
            use x = x
            use initial = initial
            let pool = WorkerPool.Shared.Value
            for path in paths do
                for epilogue in epilogues do
                    use expected = torchProduct weights bias x initial epilogue
                    use actual = kernelProduct pool path weights bias x initial epilogue
                    // float32 accumulation over `columns` terms of size ~0.2: well inside 1e-4 · sqrt(columns)
                    let tolerance = 2e-5 * Math.Sqrt(float case.Columns) + 1e-6
                    expectClose tolerance actual expected (describe case path epilogue))

        testPropertyWithConfig { propertyConfig with maxTest = 100 } "the portable kernel equals the AVX2 kernel (within float32 rounding)"
        <| Prop.forAll productCases (fun case ->
            if MatVec.supported MatVecPath.Avx2 then
                let weights, bias, x, initial = inputsOf case
                use weights = weights
                use bias = bias
                use x = x
                use initial = initial
                for epilogue in epilogues do
                    use simd = kernelProduct null MatVecPath.Avx2 weights bias x initial epilogue
                    use portable = kernelProduct null MatVecPath.Portable weights bias x initial epilogue
                    expectClose (1e-5 * Math.Sqrt(float case.Columns) + 1e-6) portable simd (describe case MatVecPath.Portable epilogue))

        testCase "results do not depend on the pool: one thread, the shared pool, three workers" <| fun () ->
            let case = { Rows = 1000; Columns = 200; Tokens = 3; Dtype = Dtype.Float16; Bias = true; Seed = 7 }
            let weights, bias, x, initial = inputsOf case
            use weights = weights
            use bias = bias
            use x = x
            use initial = initial
            use alone = kernelProduct null MatVec.best weights bias x initial Epilogue.Gelu
            use shared = kernelProduct WorkerPool.Shared.Value MatVec.best weights bias x initial Epilogue.Gelu
            let three = new WorkerPool(3)
            use more = kernelProduct three MatVec.best weights bias x initial Epilogue.Gelu
            expectEqual shared alone "shared pool"
            expectEqual more alone "three workers"

        testCase "every finite float16 and bfloat16 value widens exactly in every lane (both paths; 1, 4 and 8 tokens)" <| fun () ->
            let all = [| 0us .. UInt16.MaxValue |]
            let halves = all |> Array.filter (fun bits -> (bits &&& 0x7C00us) <> 0x7C00us) // exponent 31: infinity, NaN
            let bfloats = all |> Array.filter (fun bits -> (bits &&& 0x7F80us) <> 0x7F80us) // exponent 255
            for path in paths do
                for tokens in [ 1; 4; 8 ] do
                    for dtype, patterns, expected in
                        [ Dtype.Float16, halves, (fun (b: uint16) -> float32 (BitConverter.UInt16BitsToHalf b))
                          Dtype.BFloat16, bfloats, (fun (b: uint16) -> BitConverter.Int32BitsToSingle(int b <<< 16)) ] do
                        let y = widened WorkerPool.Shared.Value path dtype patterns tokens
                        for t in 0 .. tokens - 1 do
                            for i in 0 .. patterns.Length - 1 do
                                let actual, wanted = y[t * patterns.Length + i], expected patterns[i]
                                // compared as numbers: the sum starts at +0, so a -0 weight gives +0
                                if actual <> wanted then
                                    failtestf "%A %s pattern 0x%04x (token %d): %g, expected %g" path dtype.Name patterns[i] t actual wanted

        testCase "dtype names" <| fun () ->
            Expect.equal (Dtype.parse "f32", Dtype.parse " FP16 ", Dtype.parse "bf16", Dtype.parse "half") (Dtype.Float32, Dtype.Float16, Dtype.BFloat16, Dtype.Float16) "parse"
            Expect.equal (Dtype.all |> List.map (fun d -> d.Name)) [ "f32"; "f16"; "bf16" ] "names"
            throwsGpt [ "unknown dtype 'int8'"; "f32, f16 or bf16" ] (fun () -> Dtype.parse "int8" |> ignore) "int8"
    ]

/// A job that counts how often each chunk ran.
type private CountingJob(chunks: int, failAt: int) =
    inherit ParallelJob()
    let counts = Array.zeroCreate<int> chunks
    member _.Counts = counts
    override _.Execute(chunk: int) =
        Interlocked.Increment(&counts[chunk]) |> ignore
        if chunk = failAt then failwith "chunk failed on purpose"

/// A speculative job whose chunks add their number to a shared total in Commit; Compute sleeps now and then on a
/// worker thread, as a worker that lost its core would, so that the caller takes chunks over.
type private SlowSpeculativeJob(chunks: int) =
    inherit ParallelJob()
    let commits = Array.zeroCreate<int> chunks
    let mutable total = 0L
    member _.Commits = commits
    member _.Total = total
    override _.Speculative = true
    override _.ScratchBytes = 8
    override _.Compute(chunk: int, scratch: nativeint, pool: WorkerPool, generation: int) =
        if not (isNull pool) && not (pool.IsCurrent generation) then false
        else
            if chunk % 7 = 3 && Thread.CurrentThread.Name <> null && Thread.CurrentThread.Name.StartsWith "gpt-decode" then Thread.Sleep 2
            NativePtr.write (NativePtr.ofNativeInt<int64> scratch) (int64 chunk)
            true
    override _.Commit(chunk: int, scratch: nativeint) =
        Interlocked.Increment(&commits[chunk]) |> ignore
        Interlocked.Add(&total, NativePtr.read (NativePtr.ofNativeInt<int64> scratch)) |> ignore

[<Tests>]
let poolTests =
    testList "decoder: worker pool" [
        testCase "a decoder leaves the pool only when one thread is clearly faster, and comes back within 8 steps" <| fun () ->
            let way = Parallelism()
            /// `steps` steps with the pool taking `pool` seconds and one thread `alone`; how many ran alone.
            let run (steps: int) (pool: float) (alone: float) =
                let mutable serial = 0
                for _ in 1 .. steps do
                    let onPool = way.UseParallel()
                    way.Record(onPool, if onPool then pool else alone)
                    if not onPool then serial <- serial + 1
                serial
            // an idle machine: the pool 6 ms, one thread 9 ms: alone only to check, at most every 16th step
            Expect.isLessThanOrEqual (run 256 0.006 0.009) 8 "idle machine: steps alone of 256"
            // a few slow pool steps while the JIT works on the other core, then the pool is fast again
            run 4 0.025 0.009 |> ignore
            Expect.isLessThanOrEqual (run 64 0.006 0.009) 8 "after a stretch of slow pool steps: steps alone of the next 64"
            // one thread only a little faster: the pool stays
            Expect.isLessThanOrEqual (run 128 0.0100 0.0095) 16 "one thread 5 % faster: steps alone of 128"
            // a loaded machine: the pool 1.4 times slower than one thread: alone, the pool tried every 8th step
            let alone = run 128 0.014 0.010
            Expect.isGreaterThanOrEqual alone 100 "loaded machine: steps alone of 128"
            Expect.isLessThanOrEqual alone 120 "loaded machine: the pool still tried"
            // the load goes away: back on the pool
            run 8 0.006 0.010 |> ignore
            Expect.isLessThanOrEqual (run 64 0.006 0.010) 4 "load gone: steps alone of the next 64"

        testCase "every chunk runs exactly once, also with several callers at once" <| fun () ->
            for workers in [ 0; 1; 3 ] do
                let pool = new WorkerPool(workers)
                let callers =
                    Array.init 4 (fun caller ->
                        Tasks.Task.Run(fun () ->
                            for run in 1 .. 300 do
                                let chunks = 1 + (run * 7 + caller) % 40
                                let job = CountingJob(chunks, -1)
                                pool.Run(job, chunks)
                                if job.Counts |> Array.exists (fun c -> c <> 1) then
                                    failwithf "%d workers, caller %d, run %d: counts %A" workers caller run job.Counts))
                Tasks.Task.WaitAll callers

        testCase "speculative chunks commit exactly once, also when a worker stalls and the caller takes over" <| fun () ->
            let pool = new WorkerPool(2)
            for run in 1 .. 200 do
                let chunks = 1 + run % 37
                let job = SlowSpeculativeJob(chunks)
                pool.Run(job, chunks)
                if job.Commits |> Array.exists (fun c -> c <> 1) then failwithf "run %d: commits %A" run job.Commits
                Expect.equal job.Total (int64 (chunks * (chunks - 1) / 2)) (sprintf "run %d: every chunk's result once" run)
            pool.WaitIdle()

        testCase "a failing chunk fails the run after the others have finished" <| fun () ->
            let pool = new WorkerPool(1)
            let job = CountingJob(50, 17)
            let error = Expect.throwsC (fun () -> pool.Run(job, 50)) id
            Expect.stringContains (error.ToString()) "chunk failed on purpose" "the chunk's exception"
            Expect.equal job.Counts (Array.create 50 1) "every chunk ran once"
            let again = CountingJob(50, -1)
            pool.Run(again, 50)
            Expect.equal again.Counts (Array.create 50 1) "the pool still works"
    ]

// ---------------------------------------------------------------------------------------------------------------
// The decoder against the TorchSharp model

/// A copy of a model with every weight rounded to `dtype` and back (the reference for a decoder in that dtype: the
/// same weights, float32 arithmetic). Vectors too: the decoder keeps those float32, but rounding them as well only
/// makes the reference less exact, so they are left alone here.
let private roundedCopy (model: GptModel) (dtype: Dtype) =
    let copy = new GptModel(model.Config, 0L)
    use _ = torch.no_grad ()
    copy.load_state_dict(model.state_dict ()) |> ignore
    copy.eval ()
    for struct (name, parameter) in copy.named_parameters () do
        if parameter.dim () = 2L && name <> "wpe.weight" then
            use rounded = parameter.to_type(torchType dtype).to_type(torch.float32)
            parameter.copy_ rounded |> ignore
    copy

type private ModelCase =
    { Context: int
      Heads: int
      HeadSize: int
      Layers: int
      Vocabulary: int
      Batch: int
      Length: int
      QkvBias: bool
      Tied: bool
      Seed: int }

let private modelCases =
    gen {
        let! context = Gen.oneof [ Gen.choose (1, 12); Gen.choose (60, 140) ] // past the decoder's 64-token chunks
        let! heads = Gen.choose (1, 3)
        let! headSize = Gen.elements [ 1; 3; 8; 11 ]
        let! layers = Gen.choose (1, 2)
        let! vocabulary = Gen.choose (2, 90)
        let! batch = Gen.choose (1, 3)
        let! length = Gen.choose (1, context)
        let! seed = Gen.choose (0, 1_000_000)
        return
            { Context = context; Heads = heads; HeadSize = headSize; Layers = layers; Vocabulary = vocabulary; Batch = batch
              Length = length; QkvBias = seed % 2 = 0; Tied = seed % 3 <> 0; Seed = seed }
    }
    |> Arb.fromGen

let private configOf (case: ModelCase) =
    { tinyConfig with
        VocabSize = case.Vocabulary; ContextLength = case.Context; EmbeddingDim = case.Heads * case.HeadSize
        Heads = case.Heads; Layers = case.Layers; QkvBias = case.QkvBias; TiedHead = case.Tied }

let private greedy (maxNewTokens: int) = { GenerationOptions.defaults with MaxNewTokens = maxNewTokens; EndOfTextId = None }

/// Teacher-forced, as the generation tests do: a cached and an uncached window over one model follow the same random
/// continuation; their next-token logits agree within `tolerance` at every step (also once the window slides).
let private expectWindowsAgree (language: ILanguageModel) (batch: int[][]) (steps: int) (tolerance: float32) (random: Random) (label: string) =
    use withCache = new ContextWindow(language, batch, true)
    use without = new ContextWindow(language, batch, false)
    for step in 0 .. steps do
        use a = withCache.NextLogits()
        use b = without.NextLogits()
        let difference = (a - b).abs().max().item<float32> ()
        Expect.isLessThan difference tolerance (sprintf "%s: step %d (length %d)" label step withCache.Length)
        let next = [| for _ in batch -> random.Next language.VocabSize |]
        withCache.Append next
        without.Append next

[<Tests>]
let decoderTests =
    testList "decoder: against the TorchSharp model" [
        testPropertyWithConfig { propertyConfig with maxTest = 40 } "float32: the decoder's logits equal the model's within 1e-4, in one pass and token by token"
        <| Prop.forAll modelCases (fun case ->
            use model = new GptModel(configOf case, int64 case.Seed)
            model.eval ()
            use ids = randomIds (case.Seed + 1) case.Vocabulary case.Batch case.Length
            use _ = torch.no_grad ()
            use expected = model.forward ids
            use weights = DecoderWeights.ofModel model Dtype.Float32
            Expect.equal weights.CopiedBytes 0L "float32 weights are read where they are"
            use recomputed = Decoder.recompute weights ids
            expectClose 1e-4 recomputed expected "all positions at once"
            // token by token through the cache: each step's logits are the matching position's
            use state = new DecoderState(weights, case.Batch)
            for position in 0 .. case.Length - 1 do
                use one = ids.narrow(1L, int64 position, 1L)
                use next = Decoder.logits state one false
                use wanted = expected.select(1L, int64 position)
                expectClose 1e-4 next wanted (sprintf "position %d through the cache" position)
            Expect.equal state.Length case.Length "cached positions")

        testPropertyWithConfig { propertyConfig with maxTest = 30 } "every dtype: cached and recomputed generation agree (greedy ids, logits within 1e-4), also past the context"
        <| Prop.forAll modelCases (fun case ->
            let config = { configOf case with ContextLength = min case.Context 20 }
            use model = new GptModel(config, int64 case.Seed)
            model.eval ()
            let random = Random case.Seed
            let prompts = [ for length in [ 1; 1 + case.Seed % config.ContextLength; config.ContextLength + 2 ] -> Array.init length (fun _ -> random.Next config.VocabSize) ]
            for dtype in Dtype.all do
                let language = LanguageModel.ofGptIn dtype model
                let steps = config.ContextLength + 3
                let cached = Generator.generate language (greedy steps) prompts
                let uncached = Generator.generate language { greedy steps with UseKvCache = false } prompts
                Expect.equal cached uncached (sprintf "%s: greedy with and without the cache" dtype.Name)
                let batch = [| for _ in 1 .. case.Batch -> Array.init 2 (fun _ -> random.Next config.VocabSize) |]
                expectWindowsAgree language batch steps 1e-4f random dtype.Name)

        testPropertyWithConfig { propertyConfig with maxTest = 25 } "f16 and bf16: the decoder equals float32 torch on the rounded weights within 1e-4"
        <| Prop.forAll modelCases (fun case ->
            use model = new GptModel(configOf case, int64 case.Seed)
            model.eval ()
            use ids = randomIds (case.Seed + 1) case.Vocabulary case.Batch case.Length
            use _ = torch.no_grad ()
            for dtype in [ Dtype.Float16; Dtype.BFloat16 ] do
                use rounded = roundedCopy model dtype
                use expected = rounded.forward ids
                use weights = DecoderWeights.ofModel model dtype
                use actual = Decoder.recompute weights ids
                expectClose 1e-4 actual expected dtype.Name)

        testCase "a batch wider than a chunk (66 sequences) and a prompt longer than one (130 tokens)" <| fun () ->
            use model = new GptModel({ tinyConfig with ContextLength = 140 }, 3L)
            model.eval ()
            use _ = torch.no_grad ()
            for batch, length in [ 66, 3; 2, 130 ] do
                use ids = randomIds 4 tinyConfig.VocabSize batch length
                use expected = model.forward ids
                use weights = DecoderWeights.ofModel model Dtype.Float32
                use actual = Decoder.recompute weights ids
                expectClose 1e-4 actual expected (sprintf "%d × %d" batch length)

        testCase "the KV cache grows as positions come (128, then doubled, at most the context) and keeps what it held" <| fun () ->
            let config = { tinyConfig with ContextLength = 300 }
            use model = new GptModel(config, 11L)
            model.eval ()
            use _ = torch.no_grad ()
            use ids = randomIds 12 config.VocabSize 2 300
            use expected = model.forward ids
            use weights = DecoderWeights.ofModel model Dtype.Float32
            use state = new DecoderState(weights, 2)
            Expect.equal state.Capacity 128 "room for 128 positions at first"
            // a prompt of 100, token by token to 140 (growing to 256 at position 128), then 160 at once (to 300)
            let feed (from: int) (count: int) =
                use chunk = ids.narrow(1L, int64 from, int64 count)
                use logits = Decoder.logits state chunk true
                use wanted = expected.narrow(1L, int64 from, int64 count)
                expectClose 1e-4 logits wanted (sprintf "positions %d..%d" from (from + count - 1))
            feed 0 100
            Expect.equal state.Capacity 128 "100 positions fit"
            for position in 100 .. 139 do
                feed position 1
            Expect.equal state.Capacity 256 "doubled once past 128"
            feed 140 160
            Expect.equal state.Capacity 300 "at most the context length"
            Expect.equal state.Length 300 "every position cached"
            throwsGpt [ "context length 300" ] (fun () -> feed 299 1) "past the context"

        testCase "a language model's next cache reuses the last one's state (same results, also after the weights change)" <| fun () ->
            use model = new GptModel(tinyConfig, 13L)
            model.eval ()
            let prompts = [ [| 1; 2; 3 |]; [| 4; 5; 6 |] ]
            for language in [ LanguageModel.ofGpt model; LanguageModel.ofGptIn Dtype.BFloat16 model ] do
                let first = Generator.generate language (greedy 12) prompts
                // a cache given back is handed out again, emptied
                let state () =
                    use cache = language.CreateCache 2
                    let field = cache.GetType().GetProperty("State", Reflection.BindingFlags.Instance ||| Reflection.BindingFlags.Public ||| Reflection.BindingFlags.NonPublic)
                    field.GetValue cache
                let a = state ()
                Expect.isTrue (obj.ReferenceEquals(a, state ())) "the same state serves the next cache"
                Expect.equal (Generator.generate language (greedy 12) prompts) first "the same ids from a reused state"
                Expect.equal (Generator.generate language (greedy 12) [ [| 7; 8 |] ]) (Generator.generate language (greedy 12) [ [| 7; 8 |] ]) "another batch size"
            // ofGpt reads the model's weights afresh for each cache: a reused state sees them changed
            let language = LanguageModel.ofGpt model
            Generator.generate language (greedy 12) prompts |> ignore
            (
                use _ = torch.no_grad ()
                for p in model.parameters () do
                    p.mul_(torch.tensor(1.5f)) |> ignore
            )
            let fresh = Generator.generate (LanguageModel.ofGpt model) (greedy 12) prompts
            Expect.equal (Generator.generate language (greedy 12) prompts) fresh "the changed weights through a reused state"
            use changed = model.forward (torch.tensor([| 1L; 2L; 3L |]).view(1L, 3L))
            use torchIds = changed.select(1L, -1L).argmax(-1L)
            Expect.equal fresh[0].Tokens[0] (int (torchIds.item<int64> ())) "the changed model's first greedy id"

        testCase "ofGpt decodes through views of the model's weights and leaves no tensor behind" <| fun () ->
            use model = new GptModel(tinyConfig, 5L)
            let language = LanguageModel.ofGpt model
            use cache = language.CreateCache 1
            Expect.equal (cache.GetType().Name) "DecoderCache" "the decoder's cache"
            let live () = DisposeScopeManager.Statistics.ThreadTotalLiveCount
            let before = live ()
            for _ in 1 .. 3 do
                Generator.generate language (greedy 20) [ [| 1; 2; 3 |]; [| 4; 5; 6 |] ] |> ignore
            Expect.equal (live ()) before "live tensors after three generations"

        testCase "a model in training mode is refused at a cached decoder step, not silently run without dropout" <| fun () ->
            use model = new GptModel(tinyConfig, 5L)
            let language = LanguageModel.ofGpt model
            use cache = language.CreateCache 1
            model.train ()
            use ids = torch.tensor([| 1L; 2L |]).view(1L, 2L)
            throwsGpt [ "no dropout"; "eval()" ] (fun () -> language.LogitsCached(ids, cache).Dispose()) "training mode"
            model.eval ()
            use logits = language.LogitsCached(ids, cache)
            Expect.equal logits.shape [| 1L; 2L; int64 tinyConfig.VocabSize |] "in evaluation mode"

        testCase "low-rank adapters: ofGpt falls back to TorchSharp; a decoder copy merges them (every dtype)" <| fun () ->
            use model = new GptModel(tinyConfig, 8L)
            model.eval ()
            use _ = torch.no_grad ()
            use scope = torch.NewDisposeScope()
            let p = model.Params
            let rank = 3L
            let adapt (seed: int) (linear: LinearParams) =
                let outputs, inputs = linear.Weight.shape[0], linear.Weight.shape[1]
                { linear with Adapter = Some { A = randn seed [ rank; inputs ]; B = randn (seed + 1) [ outputs; rank ] * 0.1; Scale = 0.5 } }
            let adapted =
                { p with
                    Blocks = p.Blocks |> Array.mapi (fun i b ->
                        { b with
                            Attention = { b.Attention with Qkv = adapt (10 * i) b.Attention.Qkv }
                            Mlp = { b.Mlp with Project = adapt (10 * i + 5) b.Mlp.Project } }) }
            Expect.isFalse (DecoderWeights.canView adapted) "adapted weights cannot be read as they are"
            Expect.isTrue (DecoderWeights.canView p) "plain weights can"
            use ids = randomIds 9 tinyConfig.VocabSize 2 7
            use expected = Gpt.logits tinyConfig Mode.Eval adapted ids
            use plain = Gpt.logits tinyConfig Mode.Eval p ids
            Expect.isGreaterThan (maxAbsDifference expected plain) 1e-3 "the adapters change the logits"
            for dtype, tolerance in [ Dtype.Float32, 1e-4; Dtype.Float16, 5e-3; Dtype.BFloat16, 3e-2 ] do
                use weights = DecoderWeights.create tinyConfig adapted dtype
                Expect.isGreaterThan weights.CopiedBytes (if dtype = Dtype.Float32 then -1L else 0L) "copied"
                use actual = Decoder.recompute weights ids
                expectClose tolerance actual expected (sprintf "%s with merged adapters" dtype.Name)

        testCase "float16 refuses weights beyond its range instead of making infinities" <| fun () ->
            use model = new GptModel(tinyConfig, 5L)
            (
                use _ = torch.no_grad ()
                model.Blocks[1].FeedForward.Expand.weight[3L, 4L] <- torch.tensor(1e5f)
            )
            throwsGpt [ "h.1.mlp.c_fc.weight"; "100000"; "float16's range"; "bf16" ] (fun () -> LanguageModel.ofGptIn Dtype.Float16 model |> ignore) "f16"
            let bf16 = LanguageModel.ofGptIn Dtype.BFloat16 model
            Expect.equal bf16.VocabSize tinyConfig.VocabSize "bf16 takes it"

        testCase "a half-precision decoder has no training mode" <| fun () ->
            use model = new GptModel(tinyConfig, 5L)
            let language = LanguageModel.ofGptIn Dtype.Float16 model
            Expect.isFalse language.Training "evaluation"
            language.Training <- false
            throwsGpt [ "f16"; "no training mode" ] (fun () -> language.Training <- true) "training"
    ]

/// Logits of the golden fixture's inputs through a language model's recomputation.
let private fixtureLogits (language: ILanguageModel) (ids: torch.Tensor) = language.Logits ids

[<Tests>]
let goldenTests =
    testList "decoder: the golden fixture (tiny-gpt2, independent PyTorch reference)" [
        testCase "f32: logits within 1e-4 and the greedy ids exactly, cached and recomputed" <| fun () ->
            use model = Gpt.Weights.Pretrained.load (fixture "tiny-gpt2")
            let reference = Gpt.Weights.Safetensors.read (fixture "tiny-gpt2/reference.safetensors")
            try
                let expected = longs reference["greedy_ids"] |> Array.map int
                let prompt = expected[.. 4]
                for label, language in [ "ofGpt", LanguageModel.ofGpt model; "ofGptIn f32", LanguageModel.ofGptIn Dtype.Float32 model ] do
                    for useCache in [ true; false ] do
                        let options = { greedy (expected.Length - prompt.Length) with UseKvCache = useCache }
                        let completion = (Generator.generate language options [ prompt ])[0]
                        Expect.equal (Array.append prompt completion.Tokens) expected (sprintf "%s greedy ids (cache %b)" label useCache)
                use weights = DecoderWeights.ofModel model Dtype.Float32
                use logits = Decoder.recompute weights reference["input_ids"]
                expectClose 1e-4 logits reference["logits"] "decoder logits"
            finally
                for KeyValue(_, t) in reference do t.Dispose()

        // Measured (see README, Performance): f16 max |Δlogit| 4.2e-4, bf16 3.4e-3 against the float32 reference; every
        // greedy id agrees in both. The bounds leave room for rounding differences between machines.
        testCase "f16 and bf16: logits close to the float32 reference, greedy ids identical" <| fun () ->
            use model = Gpt.Weights.Pretrained.load (fixture "tiny-gpt2")
            let reference = Gpt.Weights.Safetensors.read (fixture "tiny-gpt2/reference.safetensors")
            try
                let expected = longs reference["greedy_ids"] |> Array.map int
                let prompt = expected[.. 4]
                for dtype, bound in [ Dtype.Float16, 2e-3; Dtype.BFloat16, 1.5e-2 ] do
                    let language = LanguageModel.ofGptIn dtype model
                    use logits = fixtureLogits language reference["input_ids"]
                    let difference = maxAbsDifference logits reference["logits"]
                    stdout.WriteLine(sprintf "golden tiny-gpt2 %s: max |logits - reference| = %.3g" dtype.Name difference)
                    Expect.isLessThanOrEqual difference bound (sprintf "%s logits" dtype.Name)
                    let completion = (Generator.generate language (greedy (expected.Length - prompt.Length)) [ prompt ])[0]
                    let ids = Array.append prompt completion.Tokens
                    let agreeing = Array.zip ids expected |> Array.filter (fun (a, b) -> a = b) |> Array.length
                    stdout.WriteLine(sprintf "golden tiny-gpt2 %s: greedy ids agree %d/%d" dtype.Name agreeing expected.Length)
                    Expect.equal ids expected (sprintf "%s greedy ids" dtype.Name)
            finally
                for KeyValue(_, t) in reference do t.Dispose()
    ]
