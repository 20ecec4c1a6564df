namespace Gpt.Model

// The book's chapters 2 to 4 one step at a time, kept as real, tested code next to the fast path of Gpt.fs: the
// explicit LayerNorm and GELU formulas, token + position embeddings, and the attention variants of chapter 3. Every
// attention variant computes the same thing as the next one given the same weights (the tests copy weights between
// them); the last one, MultiHeadAttention, is what Attention.forward in Gpt.fs computes with libtorch's fused kernel.

open System
open TorchSharp
open TorchSharp.Modules
open type TorchSharp.torch.nn
open Gpt

/// The book's layer formulas, written out (Gpt.fs runs libtorch's fused kernels for the same maths).
[<RequireQualifiedAccess>]
module Book =
    /// The book's LayerNorm, written out: normalise the last axis to mean 0 and variance 1 (the biased variance,
    /// dividing by n as GPT-2 does, not n - 1), then scale and shift. x [.., C], scale [C], shift [C].
    let layerNorm (epsilon: float) (scale: torch.Tensor) (shift: torch.Tensor) (x: torch.Tensor) =
        use scope = torch.NewDisposeScope()
        let mean = x.mean([| -1L |], keepdim = true)
        let variance = x.var(-1L, unbiased = false, keepdim = true)
        let normalised = (x - mean) / torch.sqrt(variance + epsilon)
        (scale * normalised + shift).MoveToOuterDisposeScope()

    /// The book's GELU, the tanh approximation GPT-2 was trained with:
    /// 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
    /// The exact erf GELU differs by up to 4e-4, enough to drift away from the released weights.
    let gelu (x: torch.Tensor) =
        use scope = torch.NewDisposeScope()
        let inner = (x + x * x * x * 0.044715) * Math.Sqrt(2.0 / Math.PI)
        (x * 0.5 * (torch.tanh inner + 1.0)).MoveToOuterDisposeScope()

/// Token plus positional embeddings (book ch. 2): ids [B, T] → vectors [B, T, embeddingDim].
type TokenAndPositionEmbedding(vocabSize: int, contextLength: int, embeddingDim: int) as this =
    inherit Module<torch.Tensor, torch.Tensor>("TokenAndPositionEmbedding")
    do
        Errors.require (vocabSize > 0) "vocabulary size must be positive, found %d" vocabSize
        Errors.require (contextLength > 0) "context length must be positive, found %d" contextLength
        Errors.require (embeddingDim > 0) "embedding dimension must be positive, found %d" embeddingDim
    let wte = Embedding(int64 vocabSize, int64 embeddingDim)
    let wpe = Embedding(int64 contextLength, int64 embeddingDim)
    do this.RegisterComponents()

    member _.TokenEmbedding = wte
    member _.PositionEmbedding = wpe

    override _.forward(ids: torch.Tensor) =
        Inputs.checkIds vocabSize contextLength ids
        use positions = torch.arange(ids.shape[1], device = ids.device)
        use tokens = wte.forward ids // (B, T, C)
        use places = wpe.forward positions // (T, C), broadcast over B
        tokens + places

/// The attention maths shared by the explicit variants.
[<RequireQualifiedAccess>]
module AttentionMath =
    /// True above the diagonal: the later positions a query must not see (the book's `triu(ones, diagonal=1)`).
    let causalMask (length: int64) (device: torch.Device) =
        use ones = torch.ones([| length; length |], dtype = torch.ScalarType.Bool, device = device)
        ones.triu(1L)

    /// Causal attention weights softmax(q kᵀ / sqrt(hs)) with the future set to -inf before the softmax, so each row
    /// sums to 1 and is exactly 0 above the diagonal. q, k (.., T, hs) -> (.., T, T)
    let causalWeights (queries: torch.Tensor) (keys: torch.Tensor) =
        use scope = torch.NewDisposeScope()
        let length = queries.shape[queries.shape.Length - 2]
        let headSize = keys.shape[keys.shape.Length - 1]
        let scores = queries.matmul(keys.transpose(-2L, -1L)) // (.., T, T)
        let masked = scores.masked_fill(causalMask length queries.device, Double.NegativeInfinity)
        // Dividing by sqrt(hs) keeps the scores' variance near 1, so the softmax does not saturate.
        (masked / Math.Sqrt(float headSize)).softmax(-1L).MoveToOuterDisposeScope()

/// Book §3.3: self-attention without trainable weights, on one sequence of vectors x (T, d).
[<RequireQualifiedAccess>]
module SimplifiedAttention =
    /// Attention weights softmax(x xᵀ): row i says how much token i attends to each token. (T, d) -> (T, T)
    let weights (inputs: torch.Tensor) =
        use scores = inputs.matmul(inputs.transpose(-2L, -1L)) // (T, T) dot products
        scores.softmax(-1L)

    /// Context vectors: each token's attention-weighted sum of all input vectors. (T, d) -> (T, d)
    let context (inputs: torch.Tensor) =
        use attention = weights inputs
        attention.matmul inputs

/// Book §3.4.1: self-attention with trainable query, key and value matrices held as raw parameters (x W, W is
/// (dIn, dOut)), initialised uniformly in [0, 1) like the book's `torch.rand`. No mask: every token sees every token.
/// x (T, dIn) or (B, T, dIn) -> (.., T, dOut)
type SelfAttentionV1(inputDim: int, outputDim: int, ?generator: torch.Generator) as this =
    inherit Module<torch.Tensor, torch.Tensor>("SelfAttentionV1")
    let uniform () =
        Parameter(torch.rand([| int64 inputDim; int64 outputDim |], generator = Option.toObj generator))
    let W_query = uniform ()
    let W_key = uniform ()
    let W_value = uniform ()
    do this.RegisterComponents()

    /// Query matrix (dIn, dOut), state_dict key `W_query`.
    member _.Query = W_query
    /// Key matrix (dIn, dOut), state_dict key `W_key`.
    member _.Key = W_key
    /// Value matrix (dIn, dOut), state_dict key `W_value`.
    member _.Value = W_value

    override _.forward(x: torch.Tensor) =
        use scope = torch.NewDisposeScope()
        let queries = x.matmul W_query // (T, dOut)
        let keys = x.matmul W_key
        let values = x.matmul W_value
        let scores = queries.matmul(keys.transpose(-2L, -1L)) // (T, T)
        let weights = (scores / Math.Sqrt(float outputDim)).softmax(-1L)
        weights.matmul(values).MoveToOuterDisposeScope() // (T, dOut)

/// Book §3.4.2: the same with nn.Linear layers (weight (dOut, dIn), so x Wᵀ; better initialisation, optional bias).
/// x (T, dIn) or (B, T, dIn) -> (.., T, dOut)
type SelfAttentionV2(inputDim: int, outputDim: int, ?qkvBias: bool) as this =
    inherit Module<torch.Tensor, torch.Tensor>("SelfAttentionV2")
    let bias = defaultArg qkvBias false
    let W_query = Linear(int64 inputDim, int64 outputDim, hasBias = bias)
    let W_key = Linear(int64 inputDim, int64 outputDim, hasBias = bias)
    let W_value = Linear(int64 inputDim, int64 outputDim, hasBias = bias)
    do this.RegisterComponents()

    member _.Query = W_query
    member _.Key = W_key
    member _.Value = W_value

    override _.forward(x: torch.Tensor) =
        use scope = torch.NewDisposeScope()
        let queries = W_query.forward x // (T, dOut)
        let keys = W_key.forward x
        let values = W_value.forward x
        let scores = queries.matmul(keys.transpose(-2L, -1L)) // (T, T)
        let weights = (scores / Math.Sqrt(float outputDim)).softmax(-1L)
        weights.matmul(values).MoveToOuterDisposeScope() // (T, dOut)

/// Book §3.5: causal attention on a batch: a token attends only to itself and earlier tokens, and dropout (training
/// mode only) zeroes random attention weights. x (B, T, dIn) -> (B, T, dOut)
type CausalAttention(inputDim: int, outputDim: int, contextLength: int, dropRate: float, ?qkvBias: bool) as this =
    inherit Module<torch.Tensor, torch.Tensor>("CausalAttention")
    do
        Errors.require (dropRate >= 0.0 && dropRate < 1.0) "dropout rate must be in [0, 1), found %g" dropRate
        Errors.require (contextLength > 0) "context length must be positive, found %d" contextLength
    let bias = defaultArg qkvBias false
    let W_query = Linear(int64 inputDim, int64 outputDim, hasBias = bias)
    let W_key = Linear(int64 inputDim, int64 outputDim, hasBias = bias)
    let W_value = Linear(int64 inputDim, int64 outputDim, hasBias = bias)
    let dropout = Dropout(dropRate)
    do this.RegisterComponents()

    member _.Query = W_query
    member _.Key = W_key
    member _.Value = W_value

    /// The causal attention weights before dropout. x (B, T, dIn) -> (B, T, T)
    member _.AttentionWeights(x: torch.Tensor) =
        Inputs.checkVectors "causal attention" inputDim contextLength x
        use queries = W_query.forward x // (B, T, dOut)
        use keys = W_key.forward x
        AttentionMath.causalWeights queries keys

    override this.forward(x: torch.Tensor) =
        use scope = torch.NewDisposeScope()
        let weights = dropout.forward (this.AttentionWeights x) // (B, T, T)
        weights.matmul(W_value.forward x).MoveToOuterDisposeScope() // (B, T, dOut)

/// Book §3.6.1: multi-head attention as a list of independent causal heads whose outputs are concatenated.
/// Each head produces outputDim values, so x (B, T, dIn) -> (B, T, heads * outputDim).
type MultiHeadAttentionWrapper
    (inputDim: int, outputDim: int, contextLength: int, dropRate: float, numHeads: int, ?qkvBias: bool) as this =
    inherit Module<torch.Tensor, torch.Tensor>("MultiHeadAttentionWrapper")
    do Errors.require (numHeads > 0) "number of heads must be positive, found %d" numHeads
    let heads =
        ModuleList<CausalAttention>(
            [| for _ in 1..numHeads -> new CausalAttention(inputDim, outputDim, contextLength, dropRate, defaultArg qkvBias false) |]
        )
    do this.RegisterComponents()

    member _.Heads = heads

    override _.forward(x: torch.Tensor) =
        use scope = torch.NewDisposeScope()
        torch.cat([| for head in heads -> head.forward x |], -1L).MoveToOuterDisposeScope() // (B, T, heads * dOut)

/// Book §3.6.2: efficient multi-head attention: one projection per query/key/value (or one fused projection for all
/// three) split into heads of outputDim / heads, attention per head in one batched product, heads merged and mixed by
/// an output projection. x (B, T, dIn) -> (B, T, dOut)
type MultiHeadAttention
    (inputDim: int, outputDim: int, contextLength: int, dropRate: float, numHeads: int, ?qkvBias: bool, ?fusedQkv: bool) as this =
    inherit Module<torch.Tensor, torch.Tensor>("MultiHeadAttention")
    do
        Errors.require (numHeads > 0) "number of heads must be positive, found %d" numHeads
        Errors.require (outputDim % numHeads = 0) "output dimension %d is not divisible by %d heads" outputDim numHeads
        Errors.require (dropRate >= 0.0 && dropRate < 1.0) "dropout rate must be in [0, 1), found %g" dropRate
    let bias = defaultArg qkvBias false
    let fused = defaultArg fusedQkv false
    let headDim = int64 (outputDim / numHeads)
    let projection () = Linear(int64 inputDim, int64 outputDim, hasBias = bias)
    // Either three projections or one fused (dIn -> 3 dOut, q|k|v): the unused fields stay null and are not registered.
    let W_query: Linear = if fused then null else projection ()
    let W_key: Linear = if fused then null else projection ()
    let W_value: Linear = if fused then null else projection ()
    let qkv: Linear = if fused then Linear(int64 inputDim, 3L * int64 outputDim, hasBias = bias) else null
    let out_proj = Linear(int64 outputDim, int64 outputDim)
    let dropout = Dropout(dropRate)
    do this.RegisterComponents()

    member _.IsFused = fused
    /// Separate projections (null when fused).
    member _.Query = W_query
    member _.Key = W_key
    member _.Value = W_value
    /// The fused q|k|v projection (null when not fused).
    member _.Qkv = qkv
    member _.OutputProjection = out_proj

    /// Queries, keys and values split into heads. x (B, T, dIn) -> 3 x (B, nh, T, hs)
    member private _.Heads(x: torch.Tensor) =
        Inputs.checkVectors "multi-head attention" inputDim contextLength x
        let batch, length = x.shape[0], x.shape[1]
        let split (z: torch.Tensor) = z.view(batch, length, int64 numHeads, headDim).transpose(1L, 2L) // (B, nh, T, hs)
        if fused then
            let parts = qkv.forward(x).split(int64 outputDim, 2) // 3 x (B, T, dOut)
            split parts[0], split parts[1], split parts[2]
        else
            split (W_query.forward x), split (W_key.forward x), split (W_value.forward x)

    /// The causal attention weights of every head before dropout. x (B, T, dIn) -> (B, nh, T, T)
    member this.AttentionWeights(x: torch.Tensor) =
        use scope = torch.NewDisposeScope()
        let queries, keys, _ = this.Heads x
        (AttentionMath.causalWeights queries keys).MoveToOuterDisposeScope()

    override this.forward(x: torch.Tensor) =
        use scope = torch.NewDisposeScope()
        let batch, length = x.shape[0], x.shape[1]
        let queries, keys, values = this.Heads x
        let weights = dropout.forward (AttentionMath.causalWeights queries keys) // (B, nh, T, T)
        let context = weights.matmul(values).transpose(1L, 2L).contiguous().view(batch, length, int64 outputDim) // (B, T, dOut)
        out_proj.forward(context).MoveToOuterDisposeScope()

