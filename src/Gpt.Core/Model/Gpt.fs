namespace Gpt.Model

open System
open TorchSharp
open type TorchSharp.torch.nn
open Gpt

// TorchSharp.Modules is deliberately not opened here: it has its own LayerNorm, which would shadow ours.

/// A pre-LayerNorm transformer block (book ch. 4, GPT-2): normalise, attend, add back; normalise, feed forward, add
/// back. Dropout on each branch before the residual addition, in training mode only. x (B, T, C) -> (B, T, C)
type TransformerBlock(config: GptConfig) as this =
    inherit Module<torch.Tensor, torch.Tensor>("TransformerBlock")
    let ln_1 = new LayerNorm(config.EmbeddingDim, config.LayerNormEpsilon)
    let attn = new CausalSelfAttention(config)
    let ln_2 = new LayerNorm(config.EmbeddingDim, config.LayerNormEpsilon)
    let mlp = new FeedForward(config.EmbeddingDim)
    let drop_shortcut = Dropout(config.DropRate)
    do this.RegisterComponents()

    /// The LayerNorm before attention, state_dict key `ln_1`.
    member _.AttentionNorm = ln_1
    /// The attention, state_dict key `attn`.
    member _.Attention = attn
    /// The LayerNorm before the feed-forward network, state_dict key `ln_2`.
    member _.FeedForwardNorm = ln_2
    /// The feed-forward network, state_dict key `mlp`.
    member _.FeedForward = mlp

    override _.forward(x: torch.Tensor) =
        use scope = torch.NewDisposeScope()
        let x = x + drop_shortcut.forward (attn.forward (ln_1.forward x)) // (B, T, C)
        let x = x + drop_shortcut.forward (mlp.forward (ln_2.forward x))
        x.MoveToOuterDisposeScope()

    /// The block for new tokens at positions past .. past + Tnew - 1, attention through the layer's cache buffers.
    member _.ForwardCached(x: torch.Tensor, keyCache: torch.Tensor, valueCache: torch.Tensor, past: int) =
        use scope = torch.NewDisposeScope()
        let x = x + drop_shortcut.forward (attn.ForwardCached(ln_1.forward x, keyCache, valueCache, past)) // (B, Tnew, C)
        let x = x + drop_shortcut.forward (mlp.forward (ln_2.forward x))
        x.MoveToOuterDisposeScope()

/// The keys and values of the tokens seen so far, for generation: one preallocated (B, nh, ContextLength, hs) buffer
/// pair per layer, written in place, so each new token costs attention over the cached keys instead of a forward pass
/// over the whole prefix. Created by GptModel.CreateCache; owns native memory (dispose it).
type KvCache internal (keys: torch.Tensor[], values: torch.Tensor[], batchSize: int, contextLength: int) =
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
        let normal (std: float) (tensor: torch.Tensor) = tensor.normal_(0.0, std, generator) |> ignore
        for struct (name, m) in model.named_modules () do
            match m with
            | :? Modules.Linear as linear ->
                normal (if name.EndsWith "c_proj" then residualStd else 0.02) linear.weight
                if not (isNull linear.bias) then linear.bias.zero_ () |> ignore
            | :? Modules.Embedding as embedding -> normal 0.02 embedding.weight
            | :? LayerNorm as norm ->
                norm.Scale.fill_ 1.0 |> ignore
                norm.Shift.zero_ () |> ignore
            | _ -> ()

/// GPT-2 (book ch. 4, nanoGPT's GPT): token and position embeddings, `Layers` transformer blocks, a final LayerNorm
/// and the output head. State_dict keys are GPT-2's (`wte`, `wpe`, `h.{i}...`, `ln_f`, and `lm_head` only when the
/// head is not tied). ids (B, T) int64 -> logits (B, T, vocab) float32.
/// Weights are initialised from `seed` with a private generator; without a seed, from the global torch generator.
type GptModel internal (config: GptConfig, seed: int64 option, initialise: bool) as this =
    inherit Module<torch.Tensor, torch.Tensor>("GptModel")
    // Before the base constructor's first native call: lets TorchSharp load where libstdc++ is older (NativeLibraries).
    static do NativeLibraries.install ()
    do GptConfig.validate config
    let wte = Embedding(int64 config.VocabSize, int64 config.EmbeddingDim)
    let wpe = Embedding(int64 config.ContextLength, int64 config.EmbeddingDim)
    let drop = Dropout(config.DropRate)
    let h = ModuleList<TransformerBlock>([| for _ in 1 .. config.Layers -> new TransformerBlock(config) |])
    let ln_f = new LayerNorm(config.EmbeddingDim, config.LayerNormEpsilon)
    // A tied head has no parameter of its own (the field stays null and unregistered): it multiplies by wte's weight,
    // so parameters() yields that matrix once and an optimiser steps it once.
    let lm_head: Modules.Linear =
        if config.TiedHead then null else Linear(int64 config.EmbeddingDim, int64 config.VocabSize, hasBias = false)
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

    /// A model with PyTorch's default initialisation of each layer, as the book's GPTModel has (it applies none of
    /// its own): Linear weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)), embeddings N(0, 1), LayerNorm 1 and 0.
    /// Drawn from the global torch generator, seeded with `seed` first. Such large embeddings learn much faster than
    /// GPT-2's N(0, 0.02) at the book's small constant learning rate.
    static member WithTorchDefaults(config: GptConfig, seed: int64) =
        torch.manual_seed seed |> ignore
        new GptModel(config, None, false)

    member _.Config = config
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

    /// The output head's weight (vocab, C): the token embedding's when tied.
    member private _.HeadWeight = if isNull lm_head then wte.weight else lm_head.weight

    /// The output head: normalised hidden states (B, T, C) -> logits (B, T, vocab). Layers.linear: functional.linear,
    /// with a single token's product split over two threads (generation). Call inside a dispose scope (a tied head's
    /// weight read is a new handle).
    member private this.HeadLogits(normalised: torch.Tensor) = Layers.linear this.HeadWeight null normalised

    /// Embeddings, blocks and final norm: ids (B, T) -> the normalised last hidden states (B, T, C), what the head
    /// multiplies. `forward` is the head applied to these; `Loss` is LossOfHidden applied to these.
    member _.HiddenStates(ids: torch.Tensor) =
        TokenIds.check config.VocabSize config.ContextLength ids
        use scope = torch.NewDisposeScope()
        let positions = torch.arange(ids.shape[1], device = ids.device) // (T)
        // wte.forward, with a backward that adds into the table's gradient in place (TokenLookup).
        let tokens = TokenLookup.lookup wte.weight ids // (B, T, C)
        let mutable x = drop.forward (tokens + wpe.forward positions) // (B, T, C)
        for block in h do
            x <- block.forward x
        ln_f.forward(x).MoveToOuterDisposeScope()

    override this.forward(ids: torch.Tensor) =
        use scope = torch.NewDisposeScope()
        let normalised = this.HiddenStates ids // (B, T, C)
        this.HeadLogits(normalised).MoveToOuterDisposeScope() // (B, T, vocab)

    /// Mean next-token cross-entropy of the model's predictions for ids (B, T) against targets (B, T), equal to
    /// cross_entropy(forward ids, targets) but with the head and the softmax fused chunk by chunk (HeadLoss): the
    /// (B, T, vocab) logits are never materialised. Differentiable (call backward on the result).
    member this.Loss(ids: torch.Tensor, targets: torch.Tensor) =
        if targets.dim () <> 2L || ids.dim () <> 2L || targets.shape[0] <> ids.shape[0] || targets.shape[1] <> ids.shape[1] then
            Errors.fail "targets must have the shape of the inputs %s, found %s" (Errors.shapeText ids.shape) (Errors.shapeText targets.shape)
        use scope = torch.NewDisposeScope()
        let hidden = this.HiddenStates ids // (B, T, C)
        this.LossOfHidden(hidden, targets).MoveToOuterDisposeScope()

    /// The second half of Loss: the head and the cross-entropy, fused, over hidden states (B, T, C) from
    /// HiddenStates against targets (B, T). With autograd on, the head's gradients are computed here (HeadLoss).
    member this.LossOfHidden(hidden: torch.Tensor, targets: torch.Tensor) : torch.Tensor =
        if hidden.dim () <> 3L || hidden.shape[2] <> int64 config.EmbeddingDim || targets.dim () <> 2L
           || targets.shape[0] <> hidden.shape[0] || targets.shape[1] <> hidden.shape[1] then
            Errors.fail "hidden states %s and targets %s do not fit (expected [B, T, %d] and [B, T])"
                (Errors.shapeText hidden.shape) (Errors.shapeText targets.shape) config.EmbeddingDim
        use scope = torch.NewDisposeScope()
        let flat = hidden.reshape(-1L, int64 config.EmbeddingDim) // (B*T, C)
        let loss = HeadLoss.crossEntropy flat this.HeadWeight (targets.flatten().to_type(torch.int64)) // ()
        loss.MoveToOuterDisposeScope()

    /// An empty key/value cache for batches of `batchSize` sequences, on the model's device and dtype.
    member _.CreateCache(batchSize: int) =
        Errors.require (batchSize > 0) "batch size must be positive, found %d" batchSize
        let headDim = int64 (config.EmbeddingDim / config.Heads)
        let shape = [| int64 batchSize; int64 config.Heads; int64 config.ContextLength; headDim |]
        // Each read of an Embedding's weight makes a new tensor handle: read it once and dispose it.
        use weight = wte.weight
        let buffer _ = torch.empty(shape, dtype = weight.dtype, device = weight.device)
        new KvCache(Array.init config.Layers buffer, Array.init config.Layers buffer, batchSize, config.ContextLength)

    /// Logits for new tokens that continue the sequences in the cache: ids (B, Tnew) take positions
    /// cache.Length .. cache.Length + Tnew - 1, their keys and values are appended to the cache.
    /// Equal to the matching rows of `forward` over the whole sequence. Inference only: runs without gradients.
    member this.ForwardCached(ids: torch.Tensor, cache: KvCache) =
        TokenIds.check config.VocabSize config.ContextLength ids
        if cache.IsDisposed then raise (ObjectDisposedException "KvCache")
        let past = cache.Length
        let fresh = int ids.shape[1]
        let expected = [| int64 cache.BatchSize; int64 config.Heads; int64 config.ContextLength; int64 (config.EmbeddingDim / config.Heads) |]
        Errors.require (cache.Layers = config.Layers && (cache.Keys 0).shape = expected)
            "the cache was made for another model (%d layers of %s buffers), this model needs %d layers of %s"
            cache.Layers (Errors.shapeText (cache.Keys 0).shape) config.Layers (Errors.shapeText expected)
        Errors.require (ids.shape[0] = int64 cache.BatchSize)
            "the cache was made for batch size %d, the input has batch size %d" cache.BatchSize ids.shape[0]
        Errors.require (past + fresh <= config.ContextLength)
            "the cache holds %d tokens; %d more would exceed the context length %d" past fresh config.ContextLength
        use _ = torch.no_grad ()
        use scope = torch.NewDisposeScope()
        let positions = torch.arange(int64 past, int64 (past + fresh), device = ids.device) // (Tnew)
        let mutable x = drop.forward (wte.forward ids + wpe.forward positions) // (B, Tnew, C)
        for layer in 0 .. config.Layers - 1 do
            x <- h[layer].ForwardCached(x, cache.Keys layer, cache.Values layer, past)
        cache.Advance fresh
        this.HeadLogits(ln_f.forward x).MoveToOuterDisposeScope() // (B, Tnew, vocab)

/// Text generation with the model, the book's way.
[<AutoOpen>]
module GptGeneration =
    /// The book's greedy loop (ch. 4 `generate_text_simple`): crop to the last `contextLength` tokens, take the
    /// most likely next token (argmax of the last position's logits: the softmax would not change it), append;
    /// `maxNewTokens` times. ids (B, T) -> (B, T + maxNewTokens), a new tensor. Runs in eval mode without gradients
    /// and puts the model back in the mode it was in.
    let generateTextSimple (model: GptModel) (ids: torch.Tensor) (maxNewTokens: int) (contextLength: int) =
        Errors.require (maxNewTokens >= 0) "the number of new tokens must not be negative, found %d" maxNewTokens
        Errors.require (contextLength > 0 && contextLength <= model.Config.ContextLength)
            "the generation context length must be in 1..%d (the model's), found %d" model.Config.ContextLength contextLength
        let wasTraining = model.training
        model.eval ()
        try
            use _ = torch.no_grad ()
            let mutable current = ids.clone ()
            for _ in 1..maxNewTokens do
                use scope = torch.NewDisposeScope()
                let length = current.shape[1]
                let window = if length > int64 contextLength then current.narrow(1L, length - int64 contextLength, int64 contextLength) else current // (B, ≤ctx)
                let logits = model.forward window // (B, T, vocab)
                let next = logits.select(1L, -1L).argmax(-1L, keepdim = true).``to``(current.dtype) // (B, 1)
                let extended = torch.cat([| current; next |], 1L).MoveToOuterDisposeScope()
                current.Dispose()
                current <- extended
            current
        finally
            model.train wasTraining
