namespace Gpt.Model

// GPT-2 (book chapter 4, nanoGPT's model.py), top to bottom: the parameters as plain records, the maths as pure
// functions of (configuration, mode, parameters, input), then the TorchSharp Modules that own the parameters and
// their state_dict names (GPT-2's: `wte`, `wpe`, `h.{i}.ln_1`, `h.{i}.attn.c_attn`, `h.{i}.mlp.c_fc`, `ln_f`, ...).
// Every Module's forward is one call into these functions, so an F# user can compose the model from the functions
// without building objects, and the train/eval mode is an argument instead of hidden state.

open System
open TorchSharp
open TorchSharp.Modules
open Gpt
open Gpt.Kernels

type Tensor = torch.Tensor

/// Whether dropout is active: Train (dropout on) or Eval (off). Modules map their training flag to it.
[<RequireQualifiedAccess>]
type Mode =
    | Train
    | Eval

    /// The mode of a Module's training flag.
    static member Of(training: bool) = if training then Mode.Train else Mode.Eval

// ---- parameters ---------------------------------------------------------------------------------------------------

/// LayerNorm's learned scale and shift over the last axis, each [C].
type NormParams = { Scale: Tensor; Shift: Tensor; Epsilon: float }

/// A low-rank adapter on a linear map (LoRA, the book's appendix E): it adds Scale · B (A x), A [r, in], B [out, r].
type LowRank = { A: Tensor; B: Tensor; Scale: float }

/// A linear map y = x Wᵀ + b: weight [out, in], bias [out] or null, and an optional low-rank adapter.
type LinearParams = { Weight: Tensor; Bias: Tensor; Adapter: LowRank option }

/// Attention's fused query|key|value projection C -> 3C and its output projection C -> C.
type AttentionParams = { Qkv: LinearParams; Projection: LinearParams }

/// The feed-forward network: expand C -> 4C, GELU, project back 4C -> C.
type MlpParams = { Expand: LinearParams; Project: LinearParams }

/// One transformer block.
type BlockParams = { AttentionNorm: NormParams; Attention: AttentionParams; MlpNorm: NormParams; Mlp: MlpParams }

/// The whole model. Head is the output head [vocab, C], without a bias: its weight is the token embedding itself when
/// tied.
type GptParams =
    { TokenEmbedding: Tensor
      PositionEmbedding: Tensor
      Blocks: BlockParams[]
      FinalNorm: NormParams
      Head: LinearParams }

// ---- the maths ----------------------------------------------------------------------------------------------------

/// Dropout that follows the mode.
[<RequireQualifiedAccess>]
module Dropout =
    let rate (mode: Mode) (dropRate: float) = if mode = Mode.Train then dropRate else 0.0

    let apply (mode: Mode) (dropRate: float) (x: Tensor) =
        torch.nn.functional.dropout(x, dropRate, training = (mode = Mode.Train))

/// LayerNorm through libtorch's fused kernel: normalise the last axis to mean 0 and (biased, divide-by-n) variance 1,
/// then scale and shift. The book's explicit formula is Book.layerNorm.
[<RequireQualifiedAccess>]
module Norm =
    let apply (p: NormParams) (x: Tensor) =
        torch.nn.functional.layer_norm(x, [| x.shape[x.shape.Length - 1] |], p.Scale, p.Shift, p.Epsilon)

/// y = x Wᵀ + b (ParallelLinear: a single row, as in generation, is split over two threads), plus Scale · B (A x)
/// when the map has a low-rank adapter.
[<RequireQualifiedAccess>]
module Linear =
    let apply (p: LinearParams) (x: Tensor) =
        match p.Adapter with
        | None -> ParallelLinear.linear p.Weight p.Bias x
        | Some lora ->
            use scope = torch.NewDisposeScope()
            let down = torch.nn.functional.linear(x, lora.A) // (.., r)
            let up = torch.nn.functional.linear(down, lora.B) // (.., out)
            let y = ParallelLinear.linear p.Weight p.Bias x
            y.add_(up, alpha = lora.Scale.ToScalar()).MoveToOuterDisposeScope()

/// The tanh-approximate GELU GPT-2 was trained with; the exact erf GELU differs by up to 4e-4, enough to drift away
/// from the released weights. The book's explicit formula is Book.gelu.
[<RequireQualifiedAccess>]
module Gelu =
    let apply (x: Tensor) = torch.nn.functional.gelu(x, GELU.Approximate.tanh)

/// The feed-forward network. x (B, T, C) -> (B, T, C)
[<RequireQualifiedAccess>]
module Mlp =
    let apply (p: MlpParams) (x: Tensor) =
        use hidden = Linear.apply p.Expand x // (B, T, 4C)
        use activated = Gelu.apply hidden
        Linear.apply p.Project activated // (B, T, C)

/// Causal multi-head self-attention with the fused projection (nanoGPT's CausalSelfAttention) and libtorch's fused
/// scaled_dot_product_attention. The book's step-by-step variants are in BookAttention.fs.
[<RequireQualifiedAccess>]
module Attention =
    /// Queries, keys and values split into heads. x (B, T, C) -> 3 x (B, nh, T, hs)
    let heads (config: GptConfig) (p: AttentionParams) (x: Tensor) =
        let batch, length = x.shape[0], x.shape[1]
        let embeddingDim = int64 config.EmbeddingDim
        let headDim = embeddingDim / int64 config.Heads
        let parts = (Linear.apply p.Qkv x).split(embeddingDim, 2) // 3 x (B, T, C)
        let split (z: Tensor) = z.view(batch, length, int64 config.Heads, headDim).transpose(1L, 2L) // (B, nh, T, hs)
        split parts[0], split parts[1], split parts[2]

    /// Heads merged back and projected. y (B, nh, T, hs) -> (B, T, C)
    let merge (config: GptConfig) (p: AttentionParams) (y: Tensor) =
        let batch, length = y.shape[0], y.shape[2]
        Linear.apply p.Projection (y.transpose(1L, 2L).contiguous().view(batch, length, int64 config.EmbeddingDim))

    /// Every position attends to itself and the positions before it. x (B, T, C) -> (B, T, C)
    let forward (config: GptConfig) (mode: Mode) (p: AttentionParams) (x: Tensor) =
        Inputs.checkVectors "attention" config.EmbeddingDim config.ContextLength x
        use scope = torch.NewDisposeScope()
        let queries, keys, values = heads config p x
        let dropout = Dropout.rate mode config.DropRate
        let y = torch.nn.functional.scaled_dot_product_attention(queries, keys, values, p = dropout, is_casual = true) // (B, nh, T, hs)
        (merge config p y).MoveToOuterDisposeScope()

    /// Attention for new tokens at positions past .. past + Tnew - 1. Their keys and values are written in place into
    /// the preallocated cache buffers (B, nh, ContextLength, hs), which already hold positions 0 .. past - 1; the new
    /// queries then attend to all past + Tnew cached keys. x (B, Tnew, C) -> (B, Tnew, C)
    let forwardCached (config: GptConfig) (mode: Mode) (p: AttentionParams) (keyCache: Tensor) (valueCache: Tensor) (past: int) (x: Tensor) =
        Inputs.checkVectors "attention" config.EmbeddingDim config.ContextLength x
        use scope = torch.NewDisposeScope()
        let queries, keys, values = heads config p x
        let fresh = queries.shape[2]
        let total = int64 past + fresh
        if total > keyCache.shape[2] then
            Errors.fail "the key/value cache holds %d positions; %d cached plus %d new do not fit" keyCache.shape[2] past fresh
        keyCache.narrow(2L, int64 past, fresh).copy_(keys) |> ignore
        valueCache.narrow(2L, int64 past, fresh).copy_(values) |> ignore
        let allKeys = keyCache.narrow(2L, 0L, total) // (B, nh, past + Tnew, hs), a view: nothing is copied
        let allValues = valueCache.narrow(2L, 0L, total)
        let dropout = Dropout.rate mode config.DropRate
        let y =
            if fresh = 1L then // one new token sees every cached position: no mask
                torch.nn.functional.scaled_dot_product_attention(queries, allKeys, allValues, p = dropout)
            elif past = 0 then
                torch.nn.functional.scaled_dot_product_attention(queries, allKeys, allValues, p = dropout, is_casual = true)
            else
                // is_causal aligns its triangle with the top-left corner, which is wrong when the queries start at
                // position `past`: new token i may see keys 0 .. past + i, so shift the diagonal by `past`.
                let visible = torch.ones([| fresh; total |], dtype = torch.ScalarType.Bool, device = x.device).tril(int64 past)
                torch.nn.functional.scaled_dot_product_attention(queries, allKeys, allValues, attn_mask = visible, p = dropout)
        (merge config p y).MoveToOuterDisposeScope() // (B, Tnew, C)

/// A pre-LayerNorm transformer block: normalise, attend, add back; normalise, feed forward, add back. Dropout on each
/// branch before the residual addition. x (B, T, C) -> (B, T, C)
[<RequireQualifiedAccess>]
module Block =
    let private feedForward (config: GptConfig) (mode: Mode) (p: BlockParams) (x: Tensor) =
        x + (x |> Norm.apply p.MlpNorm |> Mlp.apply p.Mlp |> Dropout.apply mode config.DropRate)

    let forward (config: GptConfig) (mode: Mode) (p: BlockParams) (x: Tensor) =
        use scope = torch.NewDisposeScope()
        let x = x + (x |> Norm.apply p.AttentionNorm |> Attention.forward config mode p.Attention |> Dropout.apply mode config.DropRate)
        (feedForward config mode p x).MoveToOuterDisposeScope()

    /// The block for new tokens at positions past .. past + Tnew - 1, attention through the layer's cache buffers.
    let forwardCached (config: GptConfig) (mode: Mode) (p: BlockParams) (keyCache: Tensor) (valueCache: Tensor) (past: int) (x: Tensor) =
        use scope = torch.NewDisposeScope()
        let attend = Attention.forwardCached config mode p.Attention keyCache valueCache past
        let x = x + (x |> Norm.apply p.AttentionNorm |> attend |> Dropout.apply mode config.DropRate) // (B, Tnew, C)
        (feedForward config mode p x).MoveToOuterDisposeScope()

/// The keys and values of the tokens seen so far, for generation: one preallocated (B, nh, ContextLength, hs) buffer
/// pair per layer, written in place, so each new token costs attention over the cached keys instead of a forward pass
/// over the whole prefix. Created by Gpt.createCache (GptModel.CreateCache); owns native memory (dispose it).
type KvCache internal (keys: Tensor[], values: Tensor[], batchSize: int, contextLength: int) =
    let mutable length = 0
    let mutable disposed = false

    /// Tokens cached so far: the position the next token will take.
    member _.Length = length
    /// The batch size the buffers were made for.
    member _.BatchSize = batchSize
    /// The most tokens the cache can hold.
    member _.ContextLength = contextLength
    /// Forgets every cached token (the buffers are kept and overwritten).
    member _.Reset() = length <- 0

    member internal _.Layers = keys.Length
    member internal _.Keys(layer: int) = keys[layer]
    member internal _.Values(layer: int) = values[layer]
    member internal _.Advance(count: int) = length <- length + count
    member internal _.IsDisposed = disposed

    interface IDisposable with
        member _.Dispose() =
            if not disposed then
                disposed <- true
                for tensor in Array.append keys values do tensor.Dispose()

/// The whole model: embeddings, blocks, final norm, head.
[<RequireQualifiedAccess>]
module Gpt =
    /// Token plus position embeddings for tokens at positions start .. start + T - 1. ids (B, T) -> (B, T, C)
    let private embed (config: GptConfig) (mode: Mode) (p: GptParams) (start: int) (ids: Tensor) =
        // Ids made on the CPU follow the model to its device. The token lookup adds its gradient into the table's
        // gradient in place (TokenLookup); positions are a slice.
        let ids = Inputs.onDeviceOf p.TokenEmbedding ids
        let tokens = TokenLookup.lookup p.TokenEmbedding ids // (B, T, C)
        let positions = p.PositionEmbedding.narrow(0L, int64 start, ids.shape[1]) // (T, C), broadcast over B
        Dropout.apply mode config.DropRate (tokens + positions)

    /// Embeddings, blocks and final norm: ids (B, T) -> the normalised last hidden states (B, T, C), what the head
    /// multiplies.
    let hiddenStates (config: GptConfig) (mode: Mode) (p: GptParams) (ids: Tensor) =
        Inputs.checkIds config.VocabSize config.ContextLength ids
        use scope = torch.NewDisposeScope()
        let x = p.Blocks |> Array.fold (fun x block -> Block.forward config mode block x) (embed config mode p 0 ids)
        (Norm.apply p.FinalNorm x).MoveToOuterDisposeScope()

    /// The output head: normalised hidden states (B, T, C) -> logits (B, T, vocab).
    let head (p: GptParams) (hidden: Tensor) = Linear.apply p.Head hidden

    /// The head's weight with its adapter merged in (W + Scale · B A), for the fused loss; the weight itself without one.
    let private headWeight (p: GptParams) =
        match p.Head.Adapter with
        | None -> p.Head.Weight
        | Some lora -> torch.addmm(p.Head.Weight, lora.B, lora.A, beta = 1.0f, alpha = float32 lora.Scale)

    /// ids (B, T) -> logits (B, T, vocab).
    let logits (config: GptConfig) (mode: Mode) (p: GptParams) (ids: Tensor) =
        use hidden = hiddenStates config mode p ids
        head p hidden

    /// The mean next-token cross-entropy of hidden states (B, T, C) from hiddenStates against targets (B, T), with the
    /// head and the softmax fused chunk by chunk (HeadLoss): the (B, T, vocab) logits are never materialised. With
    /// autograd on, the head's gradients are computed here.
    let lossOfHidden (config: GptConfig) (p: GptParams) (hidden: Tensor) (targets: Tensor) =
        if hidden.dim () <> 3L || hidden.shape[2] <> int64 config.EmbeddingDim || targets.dim () <> 2L
           || targets.shape[0] <> hidden.shape[0] || targets.shape[1] <> hidden.shape[1] then
            Errors.fail "hidden states %s and targets %s do not fit (expected [B, T, %d] and [B, T])"
                (Errors.shapeText hidden.shape) (Errors.shapeText targets.shape) config.EmbeddingDim
        use scope = torch.NewDisposeScope()
        let flat = hidden.reshape(-1L, int64 config.EmbeddingDim) // (B*T, C)
        let targets = Inputs.onDeviceOf hidden targets
        (HeadLoss.crossEntropy flat (headWeight p) (targets.flatten().to_type(torch.int64))).MoveToOuterDisposeScope() // ()

    /// Mean next-token cross-entropy of the predictions for ids (B, T) against targets (B, T): equal to
    /// cross_entropy(logits ids, targets) without the logits in memory. Differentiable.
    let loss (config: GptConfig) (mode: Mode) (p: GptParams) (ids: Tensor) (targets: Tensor) =
        if targets.dim () <> 2L || ids.dim () <> 2L || targets.shape[0] <> ids.shape[0] || targets.shape[1] <> ids.shape[1] then
            Errors.fail "targets must have the shape of the inputs %s, found %s" (Errors.shapeText ids.shape) (Errors.shapeText targets.shape)
        use hidden = hiddenStates config mode p ids
        lossOfHidden config p hidden targets

    /// An empty key/value cache for batches of `batchSize` sequences, on the device and dtype of the parameters.
    let createCache (config: GptConfig) (p: GptParams) (batchSize: int) =
        Errors.require (batchSize > 0) "batch size must be positive, found %d" batchSize
        let headDim = int64 (config.EmbeddingDim / config.Heads)
        let shape = [| int64 batchSize; int64 config.Heads; int64 config.ContextLength; headDim |]
        // Owned by the cache, not by the caller's dispose scope.
        let buffer _ = torch.empty(shape, dtype = p.TokenEmbedding.dtype, device = p.TokenEmbedding.device).DetachFromDisposeScope()
        new KvCache(Array.init config.Layers buffer, Array.init config.Layers buffer, batchSize, config.ContextLength)

    let private checkCache (config: GptConfig) (cache: KvCache) (ids: Tensor) =
        if cache.IsDisposed then raise (ObjectDisposedException "KvCache")
        let expected = [| int64 cache.BatchSize; int64 config.Heads; int64 config.ContextLength; int64 (config.EmbeddingDim / config.Heads) |]
        Errors.require (cache.Layers = config.Layers && (cache.Keys 0).shape = expected)
            "the cache was made for another model (%d layers of %s buffers), this model needs %d layers of %s"
            cache.Layers (Errors.shapeText (cache.Keys 0).shape) config.Layers (Errors.shapeText expected)
        Errors.require (ids.shape[0] = int64 cache.BatchSize)
            "the cache was made for batch size %d, the input has batch size %d" cache.BatchSize ids.shape[0]
        Errors.require (cache.Length + int ids.shape[1] <= config.ContextLength)
            "the cache holds %d tokens; %d more would exceed the context length %d" cache.Length ids.shape[1] config.ContextLength

    /// Logits for new tokens that continue the sequences in the cache: ids (B, Tnew) take positions
    /// cache.Length .. cache.Length + Tnew - 1, their keys and values are appended to the cache. Equal to the matching
    /// rows of `logits` over the whole sequence. Inference only: runs without gradients.
    let logitsCached (config: GptConfig) (mode: Mode) (p: GptParams) (cache: KvCache) (ids: Tensor) =
        Inputs.checkIds config.VocabSize config.ContextLength ids
        checkCache config cache ids
        use _ = torch.no_grad ()
        use scope = torch.NewDisposeScope()
        let past = cache.Length
        let step (layer: int) x = Block.forwardCached config mode p.Blocks[layer] (cache.Keys layer) (cache.Values layer) past x
        let x = Seq.fold (fun x layer -> step layer x) (embed config mode p past ids) (seq { 0 .. config.Layers - 1 })
        cache.Advance(int ids.shape[1])
        (head p (Norm.apply p.FinalNorm x)).MoveToOuterDisposeScope() // (B, Tnew, vocab)

// ---- the Modules: owners of the parameters and their names ---------------------------------------------------------

/// Layer normalisation over the last axis with a learned scale (`weight`) and shift (`bias`), as GPT-2 names them.
type LayerNorm(embeddingDim: int, epsilon: float) as this =
    inherit torch.nn.Module<Tensor, Tensor>("LayerNorm")
    do
        Errors.require (embeddingDim > 0) "embedding dimension must be positive, found %d" embeddingDim
        Errors.require (epsilon > 0.0) "layer norm epsilon must be positive, found %g" epsilon
    let weight = new Parameter(torch.ones(int64 embeddingDim)) // scale, starts at 1
    let bias = new Parameter(torch.zeros(int64 embeddingDim)) // shift, starts at 0
    do this.RegisterComponents()

    new(embeddingDim: int) = new LayerNorm(embeddingDim, 1e-5)

    member _.Epsilon = epsilon
    /// The learned scale, state_dict key `weight` (the book's `scale`).
    member _.Scale = weight
    /// The learned shift, state_dict key `bias` (the book's `shift`).
    member _.Shift = bias
    member _.Params : NormParams = { Scale = weight; Shift = bias; Epsilon = epsilon }

    override this.forward(x: Tensor) = Norm.apply this.Params x

    /// The book's explicit formula with this module's parameters; equal to `forward` up to rounding.
    member _.ForwardExplicit(x: Tensor) = Book.layerNorm epsilon weight bias x

/// A low-rank adapter (LoRA, the book's appendix E) for a linear map in → out: `lora_A` [r, in] and `lora_B`
/// [out, r], PEFT's names; it adds (alpha / r) · B (A x). A starts Kaiming-uniform as the book's does (its bound
/// 1/sqrt(r): the book's A is [in, r], whose fan-in is r), B at zero, so a fresh adapter changes nothing. Drawn from
/// `seed` with a private generator (the global one is untouched).
type LoraAdapter(inFeatures: int, outFeatures: int, rank: int, alpha: float, seed: int64) as this =
    inherit torch.nn.Module<Tensor, Tensor>("LoraAdapter")
    do
        Errors.require (rank > 0) "the LoRA rank must be positive, found %d" rank
        Errors.require (alpha > 0.0 && Double.IsFinite alpha) "the LoRA alpha must be positive, found %g" alpha
    let lora_A =
        use generator = new torch.Generator(uint64 seed, torch.CPU)
        let bound = 1.0 / Math.Sqrt(float rank)
        new Parameter(torch.rand([| int64 rank; int64 inFeatures |], generator = generator).mul_((2.0 * bound).ToScalar()).sub_(bound.ToScalar()))
    let lora_B = new Parameter(torch.zeros(int64 outFeatures, int64 rank))
    do this.RegisterComponents()

    member _.Rank = rank
    member _.Alpha = alpha
    /// alpha / r: PEFT's scaling (the book's first edition multiplied by alpha alone).
    member _.Scale = alpha / float rank
    member _.A = lora_A
    member _.B = lora_B
    member _.Params : LowRank = { A = lora_A; B = lora_B; Scale = alpha / float rank }

    /// The adapter's own output, (alpha / r) · B (A x).
    override _.forward(x: Tensor) =
        use scope = torch.NewDisposeScope()
        (torch.nn.functional.linear(torch.nn.functional.linear(x, lora_A), lora_B) * (alpha / float rank)).MoveToOuterDisposeScope()

/// Parameters of a TorchSharp Linear layer (a bias-less one has a null bias) with the adapter its owner holds for it.
module internal LinearLayer =
    let paramsOf (layer: Modules.Linear) : LinearParams = { Weight = layer.weight; Bias = layer.bias; Adapter = None }

    let withAdapter (adapters: Map<string, LoraAdapter>) (name: string) (layer: Modules.Linear) : LinearParams =
        { paramsOf layer with Adapter = adapters |> Map.tryFind name |> Option.map _.Params }

/// A module that can hold low-rank adapters for its linear maps, registered as `<map>_lora` (its state_dict keys
/// `<map>_lora.lora_A`, `<map>_lora.lora_B`).
type IAdaptable =
    /// The maps this module owns, by name ("c_attn", "c_proj", ...), with their (in, out) sizes.
    abstract Maps: (string * int * int) list
    abstract Adapters: Map<string, LoraAdapter>
    abstract Attach: name: string * adapter: LoraAdapter -> unit

/// The position-wise feed-forward network: expand 4x, GELU, project back (book ch. 4, nanoGPT's MLP).
type FeedForward(embeddingDim: int) as this =
    inherit torch.nn.Module<Tensor, Tensor>("FeedForward")
    let c_fc = torch.nn.Linear(int64 embeddingDim, 4L * int64 embeddingDim)
    let c_proj = torch.nn.Linear(4L * int64 embeddingDim, int64 embeddingDim)
    do this.RegisterComponents()

    let mutable adapters: Map<string, LoraAdapter> = Map.empty

    /// The expansion C -> 4C, state_dict key `c_fc`.
    member _.Expand = c_fc
    /// The projection back 4C -> C, state_dict key `c_proj`.
    member _.Project = c_proj
    member _.Params : MlpParams =
        { Expand = LinearLayer.withAdapter adapters "c_fc" c_fc; Project = LinearLayer.withAdapter adapters "c_proj" c_proj }

    interface IAdaptable with
        member _.Maps = [ "c_fc", embeddingDim, 4 * embeddingDim; "c_proj", 4 * embeddingDim, embeddingDim ]
        member _.Adapters = adapters
        member this.Attach(name, adapter) =
            adapters <- adapters.Add(name, adapter)
            this.register_module(name + "_lora", adapter)

    override this.forward(x: Tensor) = Mlp.apply this.Params x

/// The attention GptModel runs: the fused q|k|v projection `c_attn` and the output projection `c_proj` under GPT-2's
/// names (Attention.forward). x (B, T, C) -> (B, T, C)
type CausalSelfAttention(config: GptConfig) as this =
    inherit torch.nn.Module<Tensor, Tensor>("CausalSelfAttention")
    do GptConfig.validate config
    let c_attn = torch.nn.Linear(int64 config.EmbeddingDim, 3L * int64 config.EmbeddingDim, hasBias = config.QkvBias)
    let c_proj = torch.nn.Linear(int64 config.EmbeddingDim, int64 config.EmbeddingDim)
    do this.RegisterComponents()

    let mutable adapters: Map<string, LoraAdapter> = Map.empty

    /// The fused query|key|value projection C -> 3C, state_dict key `c_attn`.
    member _.QkvProjection = c_attn
    /// The output projection C -> C, state_dict key `c_proj`.
    member _.OutputProjection = c_proj
    member _.Params : AttentionParams =
        { Qkv = LinearLayer.withAdapter adapters "c_attn" c_attn; Projection = LinearLayer.withAdapter adapters "c_proj" c_proj }

    interface IAdaptable with
        member _.Maps = [ "c_attn", config.EmbeddingDim, 3 * config.EmbeddingDim; "c_proj", config.EmbeddingDim, config.EmbeddingDim ]
        member _.Adapters = adapters
        member this.Attach(name, adapter) =
            adapters <- adapters.Add(name, adapter)
            this.register_module(name + "_lora", adapter)

    override this.forward(x: Tensor) = Attention.forward config (Mode.Of this.training) this.Params x

    /// Attention for new tokens at positions past .. past + Tnew - 1 through a layer's cache buffers
    /// (Attention.forwardCached). x (B, Tnew, C) -> (B, Tnew, C)
    member this.ForwardCached(x: Tensor, keyCache: Tensor, valueCache: Tensor, past: int) =
        Attention.forwardCached config (Mode.Of this.training) this.Params keyCache valueCache past x

/// A pre-LayerNorm transformer block (Block.forward). x (B, T, C) -> (B, T, C)
type TransformerBlock(config: GptConfig) as this =
    inherit torch.nn.Module<Tensor, Tensor>("TransformerBlock")
    let ln_1 = new LayerNorm(config.EmbeddingDim, config.LayerNormEpsilon)
    let attn = new CausalSelfAttention(config)
    let ln_2 = new LayerNorm(config.EmbeddingDim, config.LayerNormEpsilon)
    let mlp = new FeedForward(config.EmbeddingDim)
    do this.RegisterComponents()

    /// The LayerNorm before attention, state_dict key `ln_1`.
    member _.AttentionNorm = ln_1
    /// The attention, state_dict key `attn`.
    member _.Attention = attn
    /// The LayerNorm before the feed-forward network, state_dict key `ln_2`.
    member _.FeedForwardNorm = ln_2
    /// The feed-forward network, state_dict key `mlp`.
    member _.FeedForward = mlp
    member _.Params : BlockParams = { AttentionNorm = ln_1.Params; Attention = attn.Params; MlpNorm = ln_2.Params; Mlp = mlp.Params }

    override this.forward(x: Tensor) = Block.forward config (Mode.Of this.training) this.Params x

/// GPT-2 initialisation (nanoGPT's _init_weights).
module private Initialisation =
    /// Linear and embedding weights ~ N(0, 0.02); the residual projections (every `c_proj`) ~ N(0, 0.02 / sqrt(2 L)),
    /// because each block adds two of them to the residual stream and its variance would otherwise grow with depth;
    /// biases 0; LayerNorm scale 1 and shift 0. A generator of our own keeps the global torch seed untouched.
    let apply (layers: int) (generator: torch.Generator) (model: torch.nn.Module) =
        use _ = torch.no_grad ()
        let residualStd = 0.02 / Math.Sqrt(2.0 * float layers)
        // Tensor.normal_ rather than init.normal_: TorchSharp 0.107's init.normal_ does not honour its generator
        // (two generators with one seed gave different values).
        let normal (std: float) (tensor: Tensor) = tensor.normal_(0.0, std, generator) |> ignore
        for struct (name, m) in model.named_modules () do
            match m with
            | :? Modules.Linear as linear ->
                normal (if name.EndsWith "c_proj" then residualStd else 0.02) linear.weight
                if not (isNull linear.bias) then linear.bias.zero_ () |> ignore
            | :? Modules.Embedding as embedding ->
                use weight = embedding.weight
                normal 0.02 weight
            | :? LayerNorm as norm ->
                norm.Scale.fill_ 1.0 |> ignore
                norm.Shift.zero_ () |> ignore
            | _ -> ()

/// GPT-2 (book ch. 4, nanoGPT's GPT) as a Module: token and position embeddings `wte`, `wpe`, `Layers` blocks `h`, a
/// final LayerNorm `ln_f`, and `lm_head` only when the head is not tied. ids (B, T) int64 -> logits (B, T, vocab).
/// Weights are initialised from `seed` with a private generator; without a seed, from the global torch generator.
type GptModel internal (config: GptConfig, seed: int64 option, initialise: bool) as this =
    inherit torch.nn.Module<Tensor, Tensor>("GptModel")
    // Before the base constructor's first native call: lets TorchSharp load where libstdc++ is older (NativeLibraries).
    static do NativeLibraries.install ()
    do GptConfig.validate config
    let wte = torch.nn.Embedding(int64 config.VocabSize, int64 config.EmbeddingDim)
    let wpe = torch.nn.Embedding(int64 config.ContextLength, int64 config.EmbeddingDim)
    let h = new ModuleList<TransformerBlock>([| for _ in 1 .. config.Layers -> new TransformerBlock(config) |])
    let ln_f = new LayerNorm(config.EmbeddingDim, config.LayerNormEpsilon)
    // A tied head has no parameter of its own (the field stays null and unregistered): it multiplies by wte's weight,
    // so parameters() yields that matrix once and an optimiser steps it once.
    let lm_head: Modules.Linear =
        if config.TiedHead then null else torch.nn.Linear(int64 config.EmbeddingDim, int64 config.VocabSize, hasBias = false)
    let mutable headAdapters: Map<string, LoraAdapter> = Map.empty
    do
        this.RegisterComponents()
        // Skipped (internally) when every weight is about to be overwritten by a checkpoint: drawing 124M normals is
        // seconds of work.
        if initialise then
            let generator = seed |> Option.map (fun s -> new torch.Generator(uint64 s, torch.CPU))
            try Initialisation.apply config.Layers (Option.toObj generator) this
            finally generator |> Option.iter (fun g -> g.Dispose())

    /// A model with GPT-2's initialisation: from `seed` when given (the weights then depend on the seed alone, never
    /// on the global generator, so seeded models can be built in parallel), otherwise from the global torch generator.
    /// (TorchSharp's layer constructors still draw their own default initialisation from the global generator
    /// before ours overwrites it.)
    new(config: GptConfig, ?seed: int64) = new GptModel(config, seed, true)

    /// A model whose every weight is about to be overwritten (loading): no initialisation is drawn.
    static member internal Uninitialised(config: GptConfig) = new GptModel(config, None, false)

    /// A model with PyTorch's default initialisation of each layer, as the book's GPTModel has (it applies none of
    /// its own): Linear weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)), embeddings N(0, 1), LayerNorm 1 and 0.
    /// Drawn from the global torch generator, seeded with `seed` first. Such large embeddings learn much faster than
    /// GPT-2's N(0, 0.02) at the book's small constant learning rate.
    static member WithTorchDefaults(config: GptConfig, seed: int64) =
        torch.manual_seed seed |> ignore
        new GptModel(config, None, false)

    member _.Config = config
    /// config.json's eos_token_id in the folder this model was loaded from (None: a new model, or a configuration
    /// without one). Not part of the maths: it travels with the model so that generation and saving know it.
    member val ConfiguredEndOfTextId: int option = None with get, set
    /// The token generation stops at when told nothing else: ConfiguredEndOfTextId when inside the vocabulary, else
    /// GPT-2's 50256 when the vocabulary has it, else none (EndOfText.resolve).
    member this.DefaultEndOfTextId = EndOfText.resolve this.ConfiguredEndOfTextId config.VocabSize
    /// The token embedding (vocab, C), state_dict key `wte`; also the output head when tied.
    member _.TokenEmbedding = wte
    /// The position embedding (ContextLength, C), state_dict key `wpe`.
    member _.PositionEmbedding = wpe
    /// The transformer blocks, state_dict key `h`.
    member _.Blocks = h
    /// The final LayerNorm, state_dict key `ln_f`.
    member _.FinalNorm = ln_f
    /// The separate output head (vocab, C) when not tied, state_dict key `lm_head`; None when tied.
    member _.Head = Option.ofObj lm_head

    /// Number of trainable parameters (each tensor once: a tied head adds nothing).
    member _.ParameterCount = this.parameters () |> Seq.sumBy (fun p -> p.numel ())

    /// The parameters as a record for the functions of the Gpt module. Reading an embedding's weight makes a new
    /// tensor handle: call this inside a dispose scope.
    member _.Params : GptParams =
        let table = wte.weight
        { TokenEmbedding = table
          PositionEmbedding = wpe.weight
          Blocks = [| for block in h -> block.Params |]
          FinalNorm = ln_f.Params
          Head =
            if isNull lm_head then { Weight = table; Bias = null; Adapter = None }
            else LinearLayer.withAdapter headAdapters "lm_head" lm_head }

    /// A separate head can hold an adapter too (a tied head is the embedding table, which LoRA leaves alone).
    interface IAdaptable with
        member _.Maps = if isNull lm_head then [] else [ "lm_head", config.EmbeddingDim, config.VocabSize ]
        member _.Adapters = headAdapters
        member this.Attach(name, adapter) =
            headAdapters <- headAdapters.Add(name, adapter)
            this.register_module(name + "_lora", adapter)

    /// The mode of the Module's training flag.
    member _.Mode = Mode.Of this.training

    override this.forward(ids: Tensor) =
        use scope = torch.NewDisposeScope()
        (Gpt.logits config this.Mode this.Params ids).MoveToOuterDisposeScope() // (B, T, vocab)

    /// Mean next-token cross-entropy of the predictions for ids (B, T) against targets (B, T) (Gpt.loss: the head fused
    /// with the softmax, no logits in memory). Differentiable.
    member this.Loss(ids: Tensor, targets: Tensor) =
        use scope = torch.NewDisposeScope()
        (Gpt.loss config this.Mode this.Params ids targets).MoveToOuterDisposeScope()

    /// An empty key/value cache for batches of `batchSize` sequences, on the model's device and dtype.
    member this.CreateCache(batchSize: int) =
        use scope = torch.NewDisposeScope()
        Gpt.createCache config this.Params batchSize

    /// Logits for new tokens that continue the sequences in the cache (Gpt.logitsCached). Inference only.
    member this.ForwardCached(ids: Tensor, cache: KvCache) =
        use scope = torch.NewDisposeScope()
        (Gpt.logitsCached config this.Mode this.Params cache ids).MoveToOuterDisposeScope()
