/// Small models that stand in for GPT-2 in the generation tests: a tiny transformer with absolute positions and an
/// honest KV cache (so cached and uncached generation can be compared, also past the context length), and a
/// scripted model whose next token follows a rule (for end-of-text, batching and streaming tests).
module Gpt.Tests.StandInModels

open System
open TorchSharp
open TorchSharp.Modules
open type TorchSharp.torch.nn
open Gpt
open Gpt.Generation

type Tensor = torch.Tensor

/// Keys and values of every layer, preallocated to the context length: (B, nh, contextLength, hs) per layer.
/// A step writes its new keys and values in place; nothing is copied per token.
type TinyCache(layers: int, batchSize: int, heads: int, contextLength: int, headSize: int) =
    let allocate () =
        Array.init layers (fun _ ->
            torch.zeros([| int64 batchSize; int64 heads; int64 contextLength; int64 headSize |]).DetachFromDisposeScope())
    let keys = allocate ()
    let values = allocate ()
    let mutable length = 0
    member _.BatchSize = batchSize
    member _.Length = length
    member _.Reset() = length <- 0
    member _.Keys(layer: int) = keys[layer]
    member _.Values(layer: int) = values[layer]
    member _.Advance(count: int) = length <- length + count
    interface IDisposable with
        member _.Dispose() =
            for tensor in Array.append keys values do
                tensor.Dispose()

/// Causal self-attention over (B, nh, Tq, hs) queries and (B, nh, Tk, hs) keys and values, where query i sits
/// at position offset + i and key j at position j.
let private attend (query: Tensor) (keys: Tensor) (values: Tensor) (offset: int64) =
    let queries = query.shape[2]
    let keyCount = keys.shape[2]
    use queryPositions = torch.arange(offset, offset + queries).view(queries, 1L)
    use keyPositions = torch.arange(keyCount).view(1L, keyCount)
    use future = keyPositions.gt queryPositions // (Tq, Tk)
    use scores = query.matmul(keys.transpose(-2L, -1L)) / Math.Sqrt(float query.shape[3]) // (B, nh, Tq, Tk)
    use masked = scores.masked_fill(future, Double.NegativeInfinity)
    use weights = masked.softmax(-1L)
    weights.matmul values // (B, nh, Tq, hs)

/// A pre-norm transformer block (attention + MLP) that can run with or without a cache.
type TinyBlock(dim: int, heads: int) as this =
    inherit Module<Tensor, Tensor>("TinyBlock")
    let ln_1 = LayerNorm([| int64 dim |])
    let c_attn = Linear(int64 dim, int64 (3 * dim))
    let c_proj = Linear(int64 dim, int64 dim)
    let ln_2 = LayerNorm([| int64 dim |])
    let c_fc = Linear(int64 dim, int64 (4 * dim))
    let mlp_proj = Linear(int64 (4 * dim), int64 dim)
    do this.RegisterComponents()

    /// x (B, T, C) at positions offset..offset+T-1; with a cache, this layer's keys and values are written at
    /// cache.Length.. and attention looks at everything cached before them.
    member _.Run(x: Tensor, cache: (TinyCache * int) option) : Tensor =
        use scope = torch.NewDisposeScope()
        let batch, length = x.shape[0], x.shape[1]
        let headSize = int64 (dim / heads)
        let split (t: Tensor) = t.view(batch, length, int64 heads, headSize).transpose(1L, 2L) // (B, nh, T, hs)
        let qkv = c_attn.forward (ln_1.forward x)
        let parts = qkv.chunk(3L, 2L)
        let q, k, v = split parts[0], split parts[1], split parts[2]
        let offset, keys, values =
            match cache with
            | None -> 0L, k, v
            | Some (cache, layer) ->
                let cached = int64 cache.Length
                cache.Keys(layer).narrow(2L, cached, length).copy_(k) |> ignore
                cache.Values(layer).narrow(2L, cached, length).copy_(v) |> ignore
                cached, cache.Keys(layer).narrow(2L, 0L, cached + length), cache.Values(layer).narrow(2L, 0L, cached + length)
        let y = (attend q keys values offset).transpose(1L, 2L).contiguous().view(batch, length, int64 dim)
        let x = x + c_proj.forward y
        let x = x + mlp_proj.forward (functional.gelu (c_fc.forward (ln_2.forward x)))
        x.MoveToOuterDisposeScope()

    override this.forward(x: Tensor) = this.Run(x, None)

/// A tiny GPT: token and absolute position embeddings, dropout, blocks, final norm, head. Parameters come from
/// its own seeded generator (not the global seed), so tests can build models in parallel.
type TinyModel(vocabSize: int, contextLength: int, dim: int, heads: int, layers: int, dropRate: float, seed: int64) as this =
    inherit Module<Tensor, Tensor>("TinyModel")
    let wte = Embedding(int64 vocabSize, int64 dim)
    let wpe = Embedding(int64 contextLength, int64 dim)
    let drop = Dropout(dropRate)
    let h = new ModuleList<TinyBlock>([| for _ in 1..layers -> new TinyBlock(dim, heads) |])
    let ln_f = LayerNorm([| int64 dim |])
    let lm_head = Linear(int64 dim, int64 vocabSize, hasBias = false)
    do
        this.RegisterComponents()
        use _ = torch.no_grad ()
        use generator = new torch.Generator(uint64 seed, torch.CPU)
        for struct (name, parameter) in this.named_parameters () do
            if not (name.StartsWith "ln_" || name.Contains ".ln_") then
                let scale =
                    if name.EndsWith "bias" then 0.1
                    elif name = "lm_head.weight" then 2.0 / Math.Sqrt(float dim)
                    elif parameter.dim () = 2L && not (name.StartsWith "w") then 1.0 / Math.Sqrt(float parameter.shape[1])
                    else 1.0
                use values = torch.randn(parameter.shape, generator = generator) * scale
                parameter.copy_ values |> ignore

    member _.VocabSize = vocabSize
    member _.ContextLength = contextLength

    member _.Run(ids: Tensor, cache: TinyCache option) : Tensor =
        use scope = torch.NewDisposeScope()
        let offset = match cache with Some cache -> int64 cache.Length | None -> 0L
        let length = ids.shape[1]
        if offset + length > int64 contextLength then
            Errors.fail "positions %d..%d exceed the context length %d" offset (offset + length - 1L) contextLength
        let positions = torch.arange(offset, offset + length)
        let mutable x = drop.forward (wte.forward ids + wpe.forward positions) // (B, T, C)
        for layer in 0 .. layers - 1 do
            x <- h[layer].Run(x, cache |> Option.map (fun cache -> cache, layer))
        cache |> Option.iter (fun cache -> cache.Advance(int length))
        let logits = lm_head.forward (ln_f.forward x) // (B, T, V)
        logits.MoveToOuterDisposeScope()

    override this.forward(ids: Tensor) = this.Run(ids, None)
    member _.CreateCache(batchSize: int) = new TinyCache(layers, batchSize, heads, contextLength, dim / heads)
    member this.ForwardCached(ids: Tensor, cache: TinyCache) = this.Run(ids, Some cache)

/// The tiny model behind ILanguageModel: the adapter GptModel will get has the same shape.
let tinyLanguageModel (model: TinyModel) : ILanguageModel =
    LanguageModel.ofModule model model.VocabSize model.ContextLength model.CreateCache model.ForwardCached
        (fun cache -> cache.Length) (fun cache -> cache.Reset())

/// A tiny model and its adapter.
let tiny vocabSize contextLength dim heads layers seed =
    let model = new TinyModel(vocabSize, contextLength, dim, heads, layers, 0.0, seed)
    model.eval ()
    model, tinyLanguageModel model

/// The scripted model's cache: only a length.
type ScriptedCache() =
    let mutable length = 0
    member _.Advance(count: int) = length <- length + count
    interface IKvCache with
        member _.Length = length
        member _.Reset() = length <- 0
        member _.Dispose() = ()

/// A model whose next token is `rule position token` (position counted from the start of the window, which is the
/// start of the sequence while it fits the context), with logit 10 for that token and 0 for the others. It records
/// how many tokens each call processed.
type ScriptedModel(vocabSize: int, contextLength: int, rule: int -> int -> int) =
    let fed = ResizeArray<int>()
    let mutable training = false

    let logits (ids: Tensor) (offset: int) =
        let batch, length = int ids.shape[0], int ids.shape[1]
        if offset + length > contextLength then
            Errors.fail "positions %d..%d exceed the context length %d" offset (offset + length - 1) contextLength
        lock fed (fun () -> fed.Add length)
        let tokens = ids.data<int64>().ToArray()
        let next = Array.init (batch * length) (fun i -> int64 (rule (offset + i % length) (int tokens[i])))
        use nextIds = torch.tensor(next, ReadOnlySpan<int64> [| int64 batch; int64 length; 1L |])
        use ten = torch.tensor(Array.create (batch * length) 10.0f, ReadOnlySpan<int64> [| int64 batch; int64 length; 1L |])
        torch.zeros([| int64 batch; int64 length; int64 vocabSize |]).scatter_(2L, nextIds, ten)

    /// Tokens processed by each call, in order.
    member _.Fed = List.ofSeq fed

    interface ILanguageModel with
        member _.VocabSize = vocabSize
        member _.ContextLength = contextLength
        member _.Device = torch.CPU
        member _.Training
            with get () = training
            and set value = training <- value
        member _.Logits ids = logits ids 0
        member _.CreateCache _ = new ScriptedCache() :> IKvCache
        member _.LogitsCached(ids, cache) =
            let result = logits ids cache.Length
            (cache :?> ScriptedCache).Advance(int ids.shape[1])
            result
