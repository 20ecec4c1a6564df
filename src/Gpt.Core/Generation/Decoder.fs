namespace Gpt.Generation

// The decoder reads weights and writes activations through native pointers.
#nowarn "9"

open System
open System.Numerics
open System.Runtime.InteropServices
open System.Threading
open System.Runtime.Intrinsics
open System.Runtime.Intrinsics.X86
open TorchSharp
open Microsoft.FSharp.NativeInterop
open Gpt
open Gpt.Kernels
open Gpt.Model

// GPT-2 inference made for one token at a time (and for short prompts and small batches), next to the model's
// TorchSharp path rather than instead of it: the same maths as Block.forwardCached, but each block is a handful of
// calls into our own kernels over weights that stay where they are, instead of ~50 tensor operations, each a trip
// into libtorch with tensors made and freed. Generating a token reads every weight once (gpt2-small: 497 MB in
// float32, 248 MB in float16), so the speed is that of memory: the products are matrix-vector kernels (MatVec) whose
// output rows are shared over every core, and the weights can be kept in 16-bit types, halving what is read. The
// autograd path, and so training, does not go through here.

/// Native memory owned by the decoder (its KV cache and scratch rows), 64-byte aligned, freed on Dispose or, failing
/// that, by the finaliser.
[<Sealed; AllowNullLiteral>]
type internal NativeBuffer(bytes: int64) =
    let mutable address =
        if bytes <= 0L then 0n
        else NativePtr.toNativeInt (NativePtr.ofVoidPtr<byte> (NativeMemory.AlignedAlloc(unativeint bytes, 64un)))

    member _.Address = address
    member _.Bytes = bytes

    member private _.Free() =
        let current = Interlocked.Exchange(&address, 0n)
        if current <> 0n then NativeMemory.AlignedFree(NativePtr.toVoidPtr (NativePtr.ofNativeInt<byte> current))

    override this.Finalize() = this.Free()

    interface IDisposable with
        member this.Dispose() =
            this.Free()
            GC.SuppressFinalize this

/// A linear map as the decoder reads it: the weight matrix and a float32 bias (0n: none).
type DecoderLinear = { Matrix: WeightMatrix; Bias: nativeint }

/// LayerNorm's float32 scale and shift [C] and its epsilon.
type DecoderNorm = { Scale: nativeint; Shift: nativeint; Epsilon: float32 }

/// One transformer block as the decoder reads it.
type DecoderBlock =
    { AttentionNorm: DecoderNorm
      Qkv: DecoderLinear
      Projection: DecoderLinear
      MlpNorm: DecoderNorm
      Expand: DecoderLinear
      Project: DecoderLinear }

/// Element-wise pieces of the decoder, on float32 rows at native addresses.
module internal Rows =
    let inline at (address: nativeint) (index: int) = NativePtr.get (NativePtr.ofNativeInt<float32> address) index
    let inline put (address: nativeint) (index: int) (value: float32) = NativePtr.set (NativePtr.ofNativeInt<float32> address) index value
    let inline offset (address: nativeint) (floats: int) = address + nativeint floats * 4n

    /// LayerNorm of one row of `width` values: mean 0, biased variance 1, then scale and shift; as libtorch, in float32
    /// with the two sums taken in float64 (within rounding of libtorch's result). In vectors: 25 of them a token
    /// (gpt2-small) took ~100 µs a token one value at a time, 1–2 % of a step.
    let layerNorm (norm: DecoderNorm) (width: int) (source: nativeint) (target: nativeint) =
        let lanes = Vector<float32>.Count
        let inline load (address: nativeint) (k: int) = NativePtr.read (NativePtr.ofNativeInt<Vector<float32>> (offset address k))
        let mutable wide = Vector<float>.Zero
        let mutable k = 0
        while k + lanes <= width do
            let mutable low = Vector<float>.Zero
            let mutable high = Vector<float>.Zero
            Vector.Widen(load source k, &low, &high)
            wide <- wide + low + high
            k <- k + lanes
        let mutable sum = Vector.Sum wide
        while k < width do
            sum <- sum + float (at source k)
            k <- k + 1
        let mean = sum / float width
        let centre = Vector<float>(mean)
        wide <- Vector<float>.Zero
        k <- 0
        while k + lanes <= width do
            let mutable low = Vector<float>.Zero
            let mutable high = Vector<float>.Zero
            Vector.Widen(load source k, &low, &high)
            let low, high = low - centre, high - centre
            wide <- wide + low * low + high * high
            k <- k + lanes
        let mutable squares = Vector.Sum wide
        while k < width do
            let d = float (at source k) - mean
            squares <- squares + d * d
            k <- k + 1
        let inverse = float32 (1.0 / Math.Sqrt(squares / float width + float norm.Epsilon))
        let mean = float32 mean
        let inverses, means = Vector<float32>(inverse), Vector<float32>(mean)
        k <- 0
        while k + lanes <= width do
            let value = (load source k - means) * inverses * load norm.Scale k + load norm.Shift k
            NativePtr.write (NativePtr.ofNativeInt<Vector<float32>> (offset target k)) value
            k <- k + lanes
        while k < width do
            put target k ((at source k - mean) * inverse * at norm.Scale k + at norm.Shift k)
            k <- k + 1

    let inline private load8 (address: nativeint) (k: int) = Vector256.Load(NativePtr.ofNativeInt<float32> (offset address k))

    /// Σ a[k] · b[k] over `length` floats: 8 at a time, two sums of fused multiply-adds.
    let dot (a: nativeint) (b: nativeint) (length: int) =
        let mutable s0 = Vector256<float32>.Zero
        let mutable s1 = Vector256<float32>.Zero
        let mutable k = 0
        while k + 16 <= length do
            s0 <- Vector256.FusedMultiplyAdd(load8 a k, load8 b k, s0)
            s1 <- Vector256.FusedMultiplyAdd(load8 a (k + 8), load8 b (k + 8), s1)
            k <- k + 16
        if k + 8 <= length then
            s0 <- Vector256.FusedMultiplyAdd(load8 a k, load8 b k, s0)
            k <- k + 8
        let mutable total = Vector256.Sum(s0 + s1)
        while k < length do
            total <- total + at a k * at b k
            k <- k + 1
        total

    /// target[k] += scale · source[k] over `length` floats.
    let addScaled (target: nativeint) (scale: float32) (source: nativeint) (length: int) =
        let factor = Vector256.Create scale
        let mutable k = 0
        while k + 8 <= length do
            Vector256.Store(Vector256.FusedMultiplyAdd(factor, load8 source k, load8 target k), NativePtr.ofNativeInt<float32> (offset target k))
            k <- k + 8
        while k < length do
            put target k (at target k + scale * at source k)
            k <- k + 1

/// Attention of a chunk of new tokens, one (sequence, head) pair per chunk of parallel work: each new query attends
/// to every cached position up to its own (the new keys and values are in the cache already). Speculative
/// (ParallelJob): a pair's outputs are computed into scratch, then committed.
[<Sealed>]
type internal AttentionJob() =
    inherit ParallelJob()
    [<ThreadStatic; DefaultValue>]
    static val mutable private scores: float32[]
    let mutable qkv = 0n
    let mutable output = 0n
    let mutable keys = 0n
    let mutable values = 0n
    let mutable fresh = 0
    let mutable start = 0
    let mutable heads = 0
    let mutable headDim = 0
    let mutable contextLength = 0

    /// The next chunk of attention: rows b·fresh + i of `qkvRows` (B·fresh, 3C) and `outputRows` (B·fresh, C) are new
    /// token i of sequence b, at position start + i; the cache buffers are (B, nh, positions, hs).
    member _.Set(qkvRows: nativeint, outputRows: nativeint, keyCache: nativeint, valueCache: nativeint, freshTokens: int,
                 firstPosition: int, headCount: int, headSize: int, positions: int) =
        qkv <- qkvRows
        output <- outputRows
        keys <- keyCache
        values <- valueCache
        fresh <- freshTokens
        start <- firstPosition
        heads <- headCount
        headDim <- headSize
        contextLength <- positions

    override _.Speculative = true
    override _.ScratchBytes = fresh * headDim * 4

    override _.Compute(chunk: int, scratch: nativeint, pool: WorkerPool, generation: int) =
        // copies of the parameters, checked below, then used alone
        let qkv, keys, values, fresh, start, heads, headDim, contextLength = qkv, keys, values, fresh, start, heads, headDim, contextLength
        if not (isNull pool) && not (pool.IsCurrent generation) then false
        else
            let embedding = heads * headDim
            let sequence, head = chunk / heads, chunk % heads
            let pairOffset = ((sequence * heads + head) * contextLength) * headDim // (B, nh, positions, hs)
            let keys = Rows.offset keys pairOffset
            let values = Rows.offset values pairOffset
            let scale = 1.0f / MathF.Sqrt(float32 headDim)
            if isNull AttentionJob.scores || AttentionJob.scores.Length < contextLength + 8 then
                AttentionJob.scores <- Array.zeroCreate (contextLength + 8)
            let scores = AttentionJob.scores
            // The pair's cached keys and values, asked for all at once: the weights streamed through the caches since
            // the last token, so they come from memory, and two short streams per head left the hardware
            // prefetchers little time to start (attention of a float32 gpt2-small token: ~270 -> ~220 µs).
            if Sse.IsSupported then
                let bytes = nativeint (start + fresh) * nativeint headDim * 4n
                let mutable line = 0n
                while line < bytes do
                    Sse.Prefetch0(NativePtr.toVoidPtr (NativePtr.ofNativeInt<byte> (keys + line)))
                    Sse.Prefetch0(NativePtr.toVoidPtr (NativePtr.ofNativeInt<byte> (values + line)))
                    line <- line + 64n
            for i in 0 .. fresh - 1 do
                let query = Rows.offset qkv ((sequence * fresh + i) * 3 * embedding + head * headDim)
                let result = Rows.offset scratch (i * headDim)
                let visible = start + i + 1 // positions 0 .. start + i
                let mutable largest = Single.NegativeInfinity
                for j in 0 .. visible - 1 do
                    let s = Rows.dot query (Rows.offset keys (j * headDim)) headDim * scale
                    scores[j] <- s
                    if s > largest then largest <- s
                // exponentials 8 at a time; the last group padded with -infinity (e^-inf = 0), so that a score's
                // exponential does not depend on how many positions follow it
                let padded = (visible + 7) &&& ~~~7
                for j in visible .. padded - 1 do
                    scores[j] <- Single.NegativeInfinity
                let shift = Vector256.Create largest
                let mutable sums = Vector256<float32>.Zero
                let mutable j = 0
                while j < padded do
                    let e = Vector256.Exp(Vector256.Create(scores, j) - shift)
                    e.CopyTo(scores, j)
                    sums <- sums + e
                    j <- j + 8
                let total = Vector256.Sum sums
                for k in 0 .. headDim - 1 do
                    Rows.put result k 0.0f
                let inverse = 1.0f / total
                for j in 0 .. visible - 1 do
                    Rows.addScaled result (scores[j] * inverse) (Rows.offset values (j * headDim)) headDim
            true

    override _.Commit(chunk: int, scratch: nativeint) =
        let embedding = heads * headDim
        let sequence, head = chunk / heads, chunk % heads
        for i in 0 .. fresh - 1 do
            let target = Rows.offset output ((sequence * fresh + i) * embedding + head * headDim)
            Buffer.MemoryCopy(NativePtr.toVoidPtr (NativePtr.ofNativeInt<byte> (Rows.offset scratch (i * headDim))),
                              NativePtr.toVoidPtr (NativePtr.ofNativeInt<byte> target), int64 headDim * 4L, int64 headDim * 4L)

/// The weights of a GPT model laid out for the decoder: float32 weights are read where the model keeps them (views
/// that share its memory); float16 and bfloat16 are copies made once, with any low-rank adapter merged in first.
/// Vectors (biases, LayerNorm, position embeddings) stay float32. Owns tensor handles: dispose it (or leave it to
/// the finaliser).
[<Sealed>]
type DecoderWeights
    internal
    (
        config: GptConfig,
        dtype: Dtype,
        blocks: DecoderBlock[],
        tokenEmbedding: WeightMatrix,
        positionEmbedding: nativeint,
        finalNorm: DecoderNorm,
        head: WeightMatrix,
        owned: torch.Tensor[]
    ) =
    let mutable disposed = false

    member _.Config = config
    member _.Dtype = dtype
    member internal _.Blocks = blocks
    member internal _.TokenEmbedding = tokenEmbedding
    member internal _.PositionEmbedding = positionEmbedding
    member internal _.FinalNorm = finalNorm
    member internal _.Head = head
    member internal _.IsDisposed = disposed

    /// Bytes of weights one token's step reads: every matrix once (the embedding row and vectors are negligible).
    member _.BytesPerToken =
        let size (m: WeightMatrix) = int64 m.Rows * int64 m.RowBytes
        (blocks |> Array.sumBy (fun b -> size b.Qkv.Matrix + size b.Projection.Matrix + size b.Expand.Matrix + size b.Project.Matrix))
        + size head

    /// Bytes of weights held in copies of our own (0 for float32 views).
    member val CopiedBytes =
        if dtype = Dtype.Float32 then 0L
        else owned |> Array.sumBy (fun t -> if t.dtype = torch.float32 then 0L else t.numel () * int64 t.ElementSize)

    interface IDisposable with
        member _.Dispose() =
            if not disposed then
                disposed <- true
                // A worker that lost its core may still be reading these weights for a decoder's speculative product.
                if WorkerPool.Shared.IsValueCreated then WorkerPool.Shared.Value.WaitIdle()
                for tensor in owned do
                    tensor.Dispose()

/// Building DecoderWeights.
[<RequireQualifiedAccess>]
module DecoderWeights =
    /// Whether the model's own weights can be read as they are (float32, on the CPU, no low-rank adapter): the live
    /// float32 decoder needs it. Otherwise generation takes the TorchSharp path (or a copy: `create`).
    let canView (p: GptParams) =
        let linears = p.Blocks |> Array.collect (fun b -> [| b.Attention.Qkv; b.Attention.Projection; b.Mlp.Expand; b.Mlp.Project |])
        let cpuFloat (t: torch.Tensor) = isNull t || (t.device_type = DeviceType.CPU && t.dtype = torch.float32)
        linears |> Array.forall (fun l -> l.Adapter.IsNone && cpuFloat l.Weight && cpuFloat l.Bias)
        && p.Head.Adapter.IsNone && isNull p.Head.Bias
        && cpuFloat p.TokenEmbedding && cpuFloat p.PositionEmbedding && cpuFloat p.Head.Weight

    /// The decoder's weights in `dtype` from a model's parameters: float32 tensors that are contiguous CPU float32
    /// already are shared (no copy), everything else is converted. A low-rank adapter is merged into its matrix
    /// (W + scale · B A) before conversion, so the copy includes it. float16 refuses weights beyond its range (±65,504)
    /// instead of turning them into infinities. Runs without gradients; the parameters are not changed.
    let create (config: GptConfig) (p: GptParams) (dtype: Dtype) : DecoderWeights =
        GptConfig.validate config
        Errors.require (p.Blocks.Length = config.Layers) "the parameters have %d blocks, the configuration %d" p.Blocks.Length config.Layers
        use _ = torch.no_grad ()
        use scope = torch.NewDisposeScope()
        let owned = ResizeArray<torch.Tensor>()
        let keep (tensor: torch.Tensor) =
            owned.Add(tensor.DetachFromDisposeScope())
            TensorMemory.address tensor
        let embedding = int64 config.EmbeddingDim
        let expectShape (name: string) (expected: int64[]) (t: torch.Tensor) =
            if t.shape <> expected then
                Errors.fail "%s has shape %s, expected %s" name (Errors.shapeText t.shape) (Errors.shapeText expected)
        let vector (name: string) (length: int64) (t: torch.Tensor) =
            if isNull t then 0n
            else
                expectShape name [| length |] t
                keep (t.detach().cpu().to_type(torch.float32).contiguous())
        let table: Collections.Generic.Dictionary<nativeint, WeightMatrix> = Collections.Generic.Dictionary()
        let matrix (name: string) (rows: int64) (columns: int64) (weight: torch.Tensor) (adapter: LowRank option) =
            expectShape name [| rows; columns |] weight
            let source = TensorMemory.address weight
            match adapter, table.TryGetValue source with
            | None, (true, known) -> known // the tied head: one copy serves the embedding and the head
            | _ ->
                let merged =
                    match adapter with
                    | None -> weight.detach().cpu()
                    | Some lora ->
                        let product = torch.matmul(lora.B.detach().cpu().to_type(torch.float32), lora.A.detach().cpu().to_type(torch.float32))
                        weight.detach().cpu().to_type(torch.float32).add(product, alpha = lora.Scale.ToScalar())
                let converted =
                    match dtype with
                    | Dtype.Float32 when merged.dtype = torch.float32 && merged.is_contiguous () -> merged
                    | _ ->
                        let target = torch.empty(merged.shape, dtype = (match dtype with
                                                                        | Dtype.Float32 -> torch.float32
                                                                        | Dtype.Float16 -> torch.float16
                                                                        | Dtype.BFloat16 -> torch.bfloat16))
                        NativeAllocator.adviseHugePages target |> ignore // read once per token: fewer TLB misses, quicker first touch
                        if dtype = Dtype.Float16 then
                            let largest = merged.abs().max().to_type(torch.float64).item<float> ()
                            if not (Double.IsFinite largest) || largest > 65504.0 then
                                Errors.fail "%s holds %g, outside float16's range (±65,504): use bf16 or f32" name largest
                        target.copy_(merged)
                let result = { Address = keep converted; Rows = int rows; Columns = int columns; Dtype = dtype }
                if adapter.IsNone then table[source] <- result
                result
        let linear (name: string) (outputs: int64) (inputs: int64) (p: LinearParams) =
            { Matrix = matrix (name + ".weight") outputs inputs p.Weight p.Adapter
              Bias = vector (name + ".bias") outputs p.Bias }
        let norm (name: string) (p: NormParams) =
            { Scale = vector (name + ".weight") embedding p.Scale
              Shift = vector (name + ".bias") embedding p.Shift
              Epsilon = float32 p.Epsilon }
        let vocabulary = int64 config.VocabSize
        let tokenEmbedding = matrix "wte.weight" vocabulary embedding p.TokenEmbedding None
        let positions = p.PositionEmbedding
        expectShape "wpe.weight" [| int64 config.ContextLength; embedding |] positions
        let positionEmbedding = keep (positions.detach().cpu().to_type(torch.float32).contiguous())
        let blocks =
            p.Blocks
            |> Array.mapi (fun i b ->
                let name = sprintf "h.%d" i
                { AttentionNorm = norm (name + ".ln_1") b.AttentionNorm
                  Qkv = linear (name + ".attn.c_attn") (3L * embedding) embedding b.Attention.Qkv
                  Projection = linear (name + ".attn.c_proj") embedding embedding b.Attention.Projection
                  MlpNorm = norm (name + ".ln_2") b.MlpNorm
                  Expand = linear (name + ".mlp.c_fc") (4L * embedding) embedding b.Mlp.Expand
                  Project = linear (name + ".mlp.c_proj") embedding (4L * embedding) b.Mlp.Project })
        let finalNorm = norm "ln_f" p.FinalNorm
        Errors.require (isNull p.Head.Bias) "the decoder's head has no bias, but lm_head has one"
        let head = matrix "lm_head.weight" vocabulary embedding p.Head.Weight p.Head.Adapter
        new DecoderWeights(config, dtype, blocks, tokenEmbedding, positionEmbedding, finalNorm, head, owned.ToArray())

    /// The decoder's weights of a GptModel (float32 views when `dtype` is Float32 and canView holds, else copies).
    let ofModel (model: GptModel) (dtype: Dtype) : DecoderWeights =
        if isNull (box model) then nullArg "model"
        use scope = torch.NewDisposeScope() // model.Params makes tensor handles
        create model.Config model.Params dtype

/// Whether a decoder's steps run on the worker pool or on the calling thread alone, chosen by measuring both. Why: a
/// token's step reads every weight once, and on this project's machine one core alone reads ~20 GB/s, near the
/// memory's limit; a second thread adds bandwidth only while it has a core to itself. When other processes keep the
/// cores busy (a shared machine), the two threads keep waiting for each other and a step took 1.3–1.5 times as long
/// as on one thread. So each kind of step (one token per sequence, or a prompt) is timed both ways (the pool first),
/// the faster way is used, and the other way is tried again now and then. Results do not depend on the way (each output row is the
/// same dot product either way). Kept per model shape, dtype, batch size and kind, for the whole process.
[<Sealed>]
type internal Parallelism() =
    static let known = Collections.Concurrent.ConcurrentDictionary<struct (int * int * int * int * Dtype * int * bool), Parallelism>()
    static let mutable parallelTotal = 0L
    static let mutable serialTotal = 0L
    let mutable parallelSeconds = nan
    let mutable serialSeconds = nan
    let mutable calls = 0
    let mutable parallelSamples = 0
    let mutable serialSamples = 0

    /// Whether the next step should run on the pool. The pool is left only on clear evidence (one thread alone 15 %
    /// faster), and then tried again every 8th step; while on the pool, one thread alone is tried every 16th step
    /// while the two are within 25 % of each other, every 256th when the pool is clearly faster (on an idle machine
    /// one thread alone took ~1.5 times as long: each try cost ~3 % of the steps at every 16th, 0.8 % at every 64th;
    /// a lasting load then shows within ~2.5 s of gpt2-small steps). Why the margin and
    /// the quick return: while a process warms up, the JIT compiles on one of this machine's two cores, and a few
    /// pool steps of 20–25 ms among ones of 6 ms (bfloat16 gpt2-small) made the pool look as slow as one thread; a
    /// whole 64-token generation then ran 22–34 of its steps alone, at ~9 ms each, and a benchmark's first runs were
    /// 25–40 % slower than its last.
    member _.UseParallel() =
        calls <- calls + 1
        // The pool first, twice (its first step is cold: JIT, first touches); one thread alone first at the 16th
        // step. Why not alone at once: a prompt is one step per generation, and a short run of generations (a
        // benchmark's warm-up and 3 runs) then ran every other prompt alone (~40 ms instead of ~20 for 8 tokens).
        if parallelSamples < 2 then true
        elif Double.IsNaN serialSeconds then calls % 16 <> 0
        elif serialSeconds < 0.85 * parallelSeconds then calls % 8 = 0
        else
            let ratio = max parallelSeconds serialSeconds / min parallelSeconds serialSeconds
            calls % (if ratio > 1.25 then 256 else 16) <> 0

    /// A step's time (seconds per token row), folded into the running average of its way. A step faster than the
    /// average replaces it (a step is never faster than its way can go: a faster one shows the way is faster now,
    /// so one retry of a way that looked slow corrects it); a slower one counts at most 1.5 times the average: one
    /// step delayed by another process (a worker losing its core for a millisecond) then moves the average by at
    /// most an eighth, and only steps slow again and again (lasting load) turn the choice.
    member _.Record(onPool: bool, seconds: float) =
        if onPool then Threading.Interlocked.Increment(&parallelTotal) |> ignore
        else Threading.Interlocked.Increment(&serialTotal) |> ignore
        let fold (average: float) (samples: int) =
            if samples < 2 || seconds < average then seconds // the first, cold sample is replaced by the second
            else 0.75 * average + 0.25 * min seconds (1.5 * average)
        if onPool then
            parallelSeconds <- fold parallelSeconds parallelSamples
            parallelSamples <- parallelSamples + 1
        else
            serialSeconds <- fold serialSeconds serialSamples
            serialSamples <- serialSamples + 1

    /// Seconds per token row on the pool and alone (NaN: not measured yet).
    member _.Seconds = parallelSeconds, serialSeconds

    /// Steps run so far in this process on the pool, and alone.
    static member Totals = struct (Threading.Volatile.Read(&parallelTotal), Threading.Volatile.Read(&serialTotal))

    static member For(config: GptConfig, dtype: Dtype, batchSize: int, prompt: bool) =
        known.GetOrAdd(struct (config.EmbeddingDim, config.Layers, config.VocabSize, config.ContextLength, dtype, batchSize, prompt), fun _ -> Parallelism())

/// What a decoder step writes.
[<RequireQualifiedAccess>]
type internal DecoderOutput =
    /// Logits of every new token.
    | AllLogits
    /// Logits of each sequence's last new token.
    | LastLogits
    /// The final LayerNorm's output for each sequence's last new token.
    | LastHidden

/// The decoding state of one batch of sequences: a float32 KV cache (B, nh, Capacity, hs) per layer, and scratch
/// rows for up to 64 new tokens at a time (longer prompts go through in chunks of 64, which only re-reads the
/// weights once per 64 tokens). The cache starts with room for 128 positions and doubles as needed, up to the
/// context length. Why not the whole context at once: gpt2-small's 1,024 positions take 75 MB (gpt2-xl's 629 MB) per
/// sequence, and a short generation touched only the first pages of each head's rows: ~1,400 fresh pages, each a
/// page fault (~8 µs on this project's machine), ~2 % of a 64-token generation. Stepping allocates nothing except
/// when the cache grows. Owns native memory: dispose it.
[<Sealed>]
type DecoderState(weights: DecoderWeights, batchSize: int, pool: WorkerPool, path: MatVecPath) =
    do
        if isNull (box weights) then nullArg "weights"
        if batchSize < 1 then Errors.fail "batch size must be positive, found %d" batchSize
        if isNull pool then nullArg "pool"
        if not (MatVec.supported path) then Errors.fail "the %A path needs instructions this processor lacks" path
    let config = weights.Config
    let mutable weights = weights
    let embedding = config.EmbeddingDim
    let heads = config.Heads
    let headDim = embedding / heads
    /// Activation rows per chunk: 64 tokens, or one per sequence when the batch is larger.
    let maxRows = max batchSize 64
    let floatBytes (count: int64) = count * 4L
    /// Positions the cache holds room for.
    let mutable capacity = min config.ContextLength 128
    let cacheBuffers (positions: int) =
        Array.init config.Layers (fun _ -> new NativeBuffer(floatBytes (int64 batchSize * int64 positions * int64 embedding)))
    let mutable keys = cacheBuffers capacity
    let mutable values = cacheBuffers capacity
    let residual = new NativeBuffer(floatBytes (int64 maxRows * int64 embedding))
    let normed = new NativeBuffer(floatBytes (int64 maxRows * int64 embedding))
    let qkv = new NativeBuffer(floatBytes (int64 maxRows * 3L * int64 embedding))
    let attended = new NativeBuffer(floatBytes (int64 maxRows * int64 embedding))
    let hidden = new NativeBuffer(floatBytes (int64 maxRows * 4L * int64 embedding))
    let lastRows = new NativeBuffer(floatBytes (int64 batchSize * int64 embedding))
    let product = MatVecJob(path, true)
    let attention = AttentionJob()
    /// The pool of the step being run: `pool`, or `alone` (no workers: everything on the calling thread).
    let alone = new WorkerPool(0)
    let mutable current = pool
    let mutable parallelSteps = 0
    let mutable serialSteps = 0
    let mutable length = 0
    let mutable disposed = false

    let multiply (linear: DecoderLinear) (input: nativeint) (rows: int) (output: nativeint) (epilogue: Epilogue) =
        product.Set(linear.Matrix, linear.Bias, input, linear.Matrix.Columns, rows, output, linear.Matrix.Rows, epilogue)
        current.Run(product, product.Chunks)

    /// Embeddings of tokens ids[b·count + from + i] for i < fresh, at positions start + i, into residual rows b·fresh + i.
    let embed (ids: int[]) (count: int) (from: int) (fresh: int) (start: int) =
        let table = weights.TokenEmbedding
        for b in 0 .. batchSize - 1 do
            for i in 0 .. fresh - 1 do
                let id = ids[b * count + from + i]
                let target = Rows.offset residual.Address ((b * fresh + i) * embedding)
                let tokenRow = table.Address + nativeint id * table.RowBytes
                let positionRow = Rows.offset weights.PositionEmbedding ((start + i) * embedding)
                for k in 0 .. embedding - 1 do
                    Rows.put target k (Scalar.element table.Dtype tokenRow k + Rows.at positionRow k)

    let normalise (norm: DecoderNorm) (rows: int) =
        for row in 0 .. rows - 1 do
            Rows.layerNorm norm embedding (Rows.offset residual.Address (row * embedding)) (Rows.offset normed.Address (row * embedding))

    /// One block over rows = B · fresh new tokens starting at position `start`.
    let block (layer: int) (fresh: int) (start: int) =
        let p = weights.Blocks[layer]
        let rows = batchSize * fresh
        normalise p.AttentionNorm rows
        multiply p.Qkv normed.Address rows qkv.Address Epilogue.Store
        // the new keys and values into the cache, here rather than in the parallel attention (whose chunks may run twice)
        for b in 0 .. batchSize - 1 do
            for i in 0 .. fresh - 1 do
                let row = Rows.offset qkv.Address ((b * fresh + i) * 3 * embedding)
                for head in 0 .. heads - 1 do
                    let slot = ((b * heads + head) * capacity + start + i) * headDim
                    let bytes = int64 headDim * 4L
                    Buffer.MemoryCopy(NativePtr.toVoidPtr (NativePtr.ofNativeInt<byte> (Rows.offset row (embedding + head * headDim))),
                                      NativePtr.toVoidPtr (NativePtr.ofNativeInt<byte> (Rows.offset keys[layer].Address slot)), bytes, bytes)
                    Buffer.MemoryCopy(NativePtr.toVoidPtr (NativePtr.ofNativeInt<byte> (Rows.offset row (2 * embedding + head * headDim))),
                                      NativePtr.toVoidPtr (NativePtr.ofNativeInt<byte> (Rows.offset values[layer].Address slot)), bytes, bytes)
        attention.Set(qkv.Address, attended.Address, keys[layer].Address, values[layer].Address, fresh, start, heads, headDim, capacity)
        current.Run(attention, batchSize * heads)
        multiply p.Projection attended.Address rows residual.Address Epilogue.Add
        normalise p.MlpNorm rows
        multiply p.Expand normed.Address rows hidden.Address Epilogue.Gelu
        multiply p.Project hidden.Address rows residual.Address Epilogue.Add

    /// Room for `needed` positions: a larger cache (doubled, or `needed`, at most the context length) with the cached
    /// positions copied over.
    let ensureCapacity (needed: int) =
        if needed > capacity then
            let larger = min config.ContextLength (max needed (2 * capacity))
            let grow (old: NativeBuffer[]) =
                let fresh = cacheBuffers larger
                let bytes = int64 length * int64 headDim * 4L
                for layer in 0 .. config.Layers - 1 do
                    for pair in 0 .. batchSize * heads - 1 do
                        Buffer.MemoryCopy(NativePtr.toVoidPtr (NativePtr.ofNativeInt<byte> (Rows.offset old[layer].Address (pair * capacity * headDim))),
                                          NativePtr.toVoidPtr (NativePtr.ofNativeInt<byte> (Rows.offset fresh[layer].Address (pair * larger * headDim))),
                                          bytes, bytes)
                fresh
            let newKeys, newValues = grow keys, grow values
            pool.WaitIdle() // a worker that lost its core may still be reading the old buffers
            for buffer in Array.append keys values do
                (buffer :> IDisposable).Dispose()
            keys <- newKeys
            values <- newValues
            capacity <- larger

    member _.Weights = weights
    member _.BatchSize = batchSize
    /// Positions the KV cache has room for now (it grows as needed, up to the context length).
    member _.Capacity = capacity
    /// Tokens cached per sequence: the position the next token takes.
    member _.Length = length
    /// Forgets the cached tokens (the memory is kept and overwritten).
    member _.Reset() = length <- 0
    /// Steps run so far on the worker pool, and on the calling thread alone (Parallelism).
    member _.Steps = struct (parallelSteps, serialSteps)

    /// Feeds `count` new tokens per sequence and finishes with the head (logits) or the final LayerNorm alone
    /// (hidden states).
    member private _.Run(ids: int[], count: int, output: nativeint, finish: DecoderOutput) =
        if disposed || weights.IsDisposed then raise (ObjectDisposedException "DecoderState")
        if isNull ids then nullArg "ids"
        Errors.require (count >= 1) "at least one new token per sequence, found %d" count
        Errors.require (ids.Length = batchSize * count) "expected %d ids (%d sequences × %d), found %d" (batchSize * count) batchSize count ids.Length
        Errors.require (length + count <= config.ContextLength)
            "the cache holds %d tokens; %d more would exceed the context length %d" length count config.ContextLength
        for id in ids do
            if id < 0 || id >= config.VocabSize then
                Errors.fail "token id %d is outside the model's vocabulary (0..%d)" id (config.VocabSize - 1)
        ensureCapacity (length + count)
        let perChunk = max 1 (maxRows / batchSize)
        let vocabulary = config.VocabSize
        let way = Parallelism.For(config, weights.Dtype, batchSize, count > 1)
        let onPool = pool.Workers > 0 && way.UseParallel()
        current <- if onPool then pool else alone
        if onPool then parallelSteps <- parallelSteps + 1 else serialSteps <- serialSteps + 1
        let clock = Diagnostics.Stopwatch.StartNew()
        let mutable from = 0
        while from < count do
            let fresh = min perChunk (count - from)
            let start = length + from
            embed ids count from fresh start
            for layer in 0 .. config.Layers - 1 do
                block layer fresh start
            let rows = batchSize * fresh
            match finish with
            | DecoderOutput.AllLogits ->
                normalise weights.FinalNorm rows
                for b in 0 .. batchSize - 1 do
                    let target = Rows.offset output ((b * count + from) * vocabulary)
                    product.Set(weights.Head, 0n, Rows.offset normed.Address (b * fresh * embedding), embedding, fresh, target, vocabulary, Epilogue.Store)
                    current.Run(product, product.Chunks)
            | DecoderOutput.LastLogits
            | DecoderOutput.LastHidden when from + fresh = count ->
                let target = if finish = DecoderOutput.LastHidden then output else lastRows.Address
                for b in 0 .. batchSize - 1 do
                    let last = Rows.offset residual.Address ((b * fresh + fresh - 1) * embedding)
                    Rows.layerNorm weights.FinalNorm embedding last (Rows.offset target (b * embedding))
                if finish = DecoderOutput.LastLogits then
                    product.Set(weights.Head, 0n, lastRows.Address, embedding, batchSize, output, vocabulary, Epilogue.Store)
                    current.Run(product, product.Chunks)
            | _ -> ()
            from <- from + fresh
        length <- length + count
        way.Record(onPool, clock.Elapsed.TotalSeconds / float (batchSize * count))

    /// Feeds `count` new tokens per sequence (ids row-major [B, count], each in the vocabulary) at positions
    /// Length .. Length + count - 1, appending their keys and values to the cache, and writes float32 logits to
    /// `output`: [B, count, vocab] when allPositions, else [B, vocab] for each sequence's last new token (what
    /// generation needs: the head, a quarter of gpt2-small's weights, then runs once per sequence).
    member this.Forward(ids: int[], count: int, output: nativeint, allPositions: bool) =
        this.Run(ids, count, output, (if allPositions then DecoderOutput.AllLogits else DecoderOutput.LastLogits))

    /// Serves `other` weights of the same configuration from now on, with the cache emptied: the cache and scratch
    /// memory depend only on the configuration and the batch size, so a state (its pages already in memory) can serve
    /// the next generation, over the same weights or fresh views of them.
    member internal _.Rebind(other: DecoderWeights) =
        if disposed then raise (ObjectDisposedException "DecoderState")
        if isNull (box other) then nullArg "other"
        if other.IsDisposed then raise (ObjectDisposedException "DecoderWeights")
        Errors.require (other.Config = config) "a decoder state can only serve weights of its own configuration"
        weights <- other
        length <- 0

    /// As Forward, but writes each sequence's last new token's hidden state after the final LayerNorm (float32
    /// [B, C]) instead of logits: the head is not read (a classifier puts its own head on it).
    member this.Hidden(ids: int[], count: int, output: nativeint) =
        this.Run(ids, count, output, DecoderOutput.LastHidden)

    interface IDisposable with
        member _.Dispose() =
            if not disposed then
                disposed <- true
                pool.WaitIdle() // a worker that lost its core may still be reading these buffers
                for buffer in Array.concat [ keys; values; [| residual; normed; qkv; attended; hidden; lastRows |] ] do
                    (buffer :> IDisposable).Dispose()

    new(weights: DecoderWeights, batchSize: int) = new DecoderState(weights, batchSize, WorkerPool.Shared.Value, MatVec.best)

/// Logits through the decoder as TorchSharp tensors, for the ILanguageModel adapters.
[<RequireQualifiedAccess>]
module Decoder =
    /// ids [B, T] int64 or int32 as a row-major int array.
    let internal idArray (ids: torch.Tensor) =
        use flat = ids.to_type(torch.int64).contiguous()
        flat.data<int64>().ToArray() |> Array.map int

    /// Logits of new tokens ids [B, T] at positions state.Length.. (appended to the state's cache): [B, T, vocab]
    /// when allPositions, else [B, vocab] for each sequence's last new token. float32, on the CPU.
    let logits (state: DecoderState) (ids: torch.Tensor) (allPositions: bool) : torch.Tensor =
        Errors.require (ids.dim () = 2L) "token ids must have shape [batch, length], found %s" (Errors.shapeText ids.shape)
        Errors.require (ids.shape[0] = int64 state.BatchSize)
            "the cache was made for batch size %d, the input has batch size %d" state.BatchSize ids.shape[0]
        let batch, count = int ids.shape[0], int ids.shape[1]
        let vocabulary = int64 state.Weights.Config.VocabSize
        let shape = if allPositions then [| int64 batch; int64 count; vocabulary |] else [| int64 batch; vocabulary |]
        let output = torch.empty(shape, dtype = torch.float32)
        state.Forward(idArray ids, count, TensorMemory.address output, allPositions)
        output

    /// Decoder steps run so far in this process on the worker pool, and on the calling thread alone (the decoder
    /// measures both and takes the faster: see Parallelism).
    let stepCounts () : struct (int64 * int64) = Parallelism.Totals

    /// Logits [B, T, vocab] of ids [B, T] at positions 0..T-1, recomputed through a temporary state.
    let recompute (weights: DecoderWeights) (ids: torch.Tensor) : torch.Tensor =
        Errors.require (ids.dim () = 2L) "token ids must have shape [batch, length], found %s" (Errors.shapeText ids.shape)
        use state = new DecoderState(weights, int ids.shape[0])
        logits state ids true
