namespace Gpt.Model

/// The book's layer formulas, written out (Gpt.fs runs libtorch's fused kernels for the same maths).
[<RequireQualifiedAccess>]
module Book =

    /// The book's LayerNorm, written out: normalise the last axis to mean 0 and variance 1 (the biased variance,
    /// dividing by n as GPT-2 does, not n - 1), then scale and shift. x [.., C], scale [C], shift [C].
    val layerNorm:
      epsilon: float ->
        scale: TorchSharp.torch.Tensor ->
        shift: TorchSharp.torch.Tensor ->
        x: TorchSharp.torch.Tensor -> TorchSharp.torch.Tensor

    /// The book's GELU, the tanh approximation GPT-2 was trained with:
    /// 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
    /// The exact erf GELU differs by up to 4e-4, enough to drift away from the released weights.
    val gelu: x: TorchSharp.torch.Tensor -> TorchSharp.torch.Tensor

/// Token plus positional embeddings (book ch. 2): ids [B, T] → vectors [B, T, embeddingDim].
type TokenAndPositionEmbedding =
    inherit TorchSharp.torch.nn.Module<TorchSharp.torch.Tensor,
                                       TorchSharp.torch.Tensor>

    new: vocabSize: int * contextLength: int * embeddingDim: int ->
           TokenAndPositionEmbedding

    override
      forward: ids: TorchSharp.torch.Tensor -> TorchSharp.torch.Tensor

    member PositionEmbedding: TorchSharp.Modules.Embedding

    member TokenEmbedding: TorchSharp.Modules.Embedding

/// The attention maths shared by the explicit variants.
[<RequireQualifiedAccess>]
module AttentionMath =

    /// True above the diagonal: the later positions a query must not see (the book's `triu(ones, diagonal=1)`).
    val causalMask:
      length: int64 ->
        device: TorchSharp.torch.Device -> TorchSharp.torch.Tensor

    /// Causal attention weights softmax(q kᵀ / sqrt(hs)) with the future set to -inf before the softmax, so each row
    /// sums to 1 and is exactly 0 above the diagonal. q, k (.., T, hs) -> (.., T, T)
    val causalWeights:
      queries: TorchSharp.torch.Tensor ->
        keys: TorchSharp.torch.Tensor -> TorchSharp.torch.Tensor

/// Book §3.3: self-attention without trainable weights, on one sequence of vectors x (T, d).
[<RequireQualifiedAccess>]
module SimplifiedAttention =

    /// Attention weights softmax(x xᵀ): row i says how much token i attends to each token. (T, d) -> (T, T)
    val weights: inputs: TorchSharp.torch.Tensor -> TorchSharp.torch.Tensor

    /// Context vectors: each token's attention-weighted sum of all input vectors. (T, d) -> (T, d)
    val context: inputs: TorchSharp.torch.Tensor -> TorchSharp.torch.Tensor

/// Book §3.4.1: self-attention with trainable query, key and value matrices held as raw parameters (x W, W is
/// (dIn, dOut)), initialised uniformly in [0, 1) like the book's `torch.rand`. No mask: every token sees every token.
/// x (T, dIn) or (B, T, dIn) -> (.., T, dOut)
type SelfAttentionV1 =
    inherit TorchSharp.torch.nn.Module<TorchSharp.torch.Tensor,
                                       TorchSharp.torch.Tensor>

    new: inputDim: int * outputDim: int *
         ?generator: TorchSharp.torch.Generator -> SelfAttentionV1

    override forward: x: TorchSharp.torch.Tensor -> TorchSharp.torch.Tensor

    /// Key matrix (dIn, dOut), state_dict key `W_key`.
    member Key: TorchSharp.Modules.Parameter

    /// Query matrix (dIn, dOut), state_dict key `W_query`.
    member Query: TorchSharp.Modules.Parameter

    /// Value matrix (dIn, dOut), state_dict key `W_value`.
    member Value: TorchSharp.Modules.Parameter

/// Book §3.4.2: the same with nn.Linear layers (weight (dOut, dIn), so x Wᵀ; better initialisation, optional bias).
/// x (T, dIn) or (B, T, dIn) -> (.., T, dOut)
type SelfAttentionV2 =
    inherit TorchSharp.torch.nn.Module<TorchSharp.torch.Tensor,
                                       TorchSharp.torch.Tensor>

    new: inputDim: int * outputDim: int * ?qkvBias: bool -> SelfAttentionV2

    override forward: x: TorchSharp.torch.Tensor -> TorchSharp.torch.Tensor

    member Key: TorchSharp.Modules.Linear

    member Query: TorchSharp.Modules.Linear

    member Value: TorchSharp.Modules.Linear

/// Book §3.5: causal attention on a batch: a token attends only to itself and earlier tokens, and dropout (training
/// mode only) zeroes random attention weights. x (B, T, dIn) -> (B, T, dOut)
type CausalAttention =
    inherit TorchSharp.torch.nn.Module<TorchSharp.torch.Tensor,
                                       TorchSharp.torch.Tensor>

    new: inputDim: int * outputDim: int * contextLength: int *
         dropRate: float * ?qkvBias: bool -> CausalAttention

    /// The causal attention weights before dropout. x (B, T, dIn) -> (B, T, T)
    member
      AttentionWeights: x: TorchSharp.torch.Tensor ->
                          TorchSharp.torch.Tensor

    override forward: x: TorchSharp.torch.Tensor -> TorchSharp.torch.Tensor

    member Key: TorchSharp.Modules.Linear

    member Query: TorchSharp.Modules.Linear

    member Value: TorchSharp.Modules.Linear

/// Book §3.6.1: multi-head attention as a list of independent causal heads whose outputs are concatenated.
/// Each head produces outputDim values, so x (B, T, dIn) -> (B, T, heads * outputDim).
type MultiHeadAttentionWrapper =
    inherit TorchSharp.torch.nn.Module<TorchSharp.torch.Tensor,
                                       TorchSharp.torch.Tensor>

    new: inputDim: int * outputDim: int * contextLength: int *
         dropRate: float * numHeads: int * ?qkvBias: bool ->
           MultiHeadAttentionWrapper

    override forward: x: TorchSharp.torch.Tensor -> TorchSharp.torch.Tensor

    member Heads: TorchSharp.Modules.ModuleList<CausalAttention>

/// Book §3.6.2: efficient multi-head attention: one projection per query/key/value (or one fused projection for all
/// three) split into heads of outputDim / heads, attention per head in one batched product, heads merged and mixed by
/// an output projection. x (B, T, dIn) -> (B, T, dOut)
type MultiHeadAttention =
    inherit TorchSharp.torch.nn.Module<TorchSharp.torch.Tensor,
                                       TorchSharp.torch.Tensor>

    new: inputDim: int * outputDim: int * contextLength: int *
         dropRate: float * numHeads: int * ?qkvBias: bool * ?fusedQkv: bool ->
           MultiHeadAttention

    /// The causal attention weights of every head before dropout. x (B, T, dIn) -> (B, nh, T, T)
    member
      AttentionWeights: x: TorchSharp.torch.Tensor ->
                          TorchSharp.torch.Tensor

    /// Queries, keys and values split into heads. x (B, T, dIn) -> 3 x (B, nh, T, hs)
    member
      private Heads: x: TorchSharp.torch.Tensor ->
                       TorchSharp.torch.Tensor * TorchSharp.torch.Tensor *
                       TorchSharp.torch.Tensor

    override forward: x: TorchSharp.torch.Tensor -> TorchSharp.torch.Tensor

    member IsFused: bool

    member Key: TorchSharp.Modules.Linear

    member OutputProjection: TorchSharp.Modules.Linear

    /// The fused q|k|v projection (null when not fused).
    member Qkv: TorchSharp.Modules.Linear

    /// Separate projections (null when fused).
    member Query: TorchSharp.Modules.Linear

    member Value: TorchSharp.Modules.Linear
