namespace Gpt.Model

/// The shape of a GPT-2 model (book ch. 4, `GPT_CONFIG_124M`).
type GptConfig =
    {
      /// Number of token ids the model knows (50,257 for GPT-2's BPE vocabulary).
      VocabSize: int

      /// Longest input the model accepts: the number of learned positions (1,024 for GPT-2).
      ContextLength: int

      /// Width of every token vector in the residual stream (768 for gpt2-small).
      EmbeddingDim: int

      /// Number of attention heads; EmbeddingDim must be a multiple of it (each head has EmbeddingDim / Heads).
      Heads: int

      /// Number of transformer blocks.
      Layers: int

      /// Dropout probability on embeddings, attention weights and residual branches, in [0, 1).
      /// Only active in training mode.
      DropRate: float

      /// Whether the query/key/value projection has a bias (the released GPT-2 has one; the book starts without).
      QkvBias: bool

      /// Whether the output head reuses the token embedding matrix (weight tying, as in the released GPT-2).
      TiedHead: bool

      /// The epsilon LayerNorm adds to the variance before the square root (1e-5 in GPT-2).
      LayerNormEpsilon: float
    }

/// Presets, validation and sizes of GPT-2 configurations.
[<RequireQualifiedAccess>]
module GptConfig =

    /// The released GPT-2 124M: 50,257 tokens, 1,024 positions, 768 dims, 12 heads, 12 layers, dropout 0.1,
    /// QKV bias, head tied to the token embedding.
    val gpt2Small: GptConfig

    /// GPT-2 355M: 1,024 dims, 16 heads, 24 layers.
    val gpt2Medium: GptConfig

    /// GPT-2 774M: 1,280 dims, 20 heads, 36 layers.
    val gpt2Large: GptConfig

    /// GPT-2 1558M: 1,600 dims, 25 heads, 48 layers.
    val gpt2Xl: GptConfig

    /// The preset names `byName` accepts, in size order.
    val presetNames: string list

    /// A preset by name: "gpt2-small" | "gpt2-medium" | "gpt2-large" | "gpt2-xl" (case-insensitive).
    val byName: name: string -> GptConfig

    /// Upper bounds validate enforces, far above any real GPT-2-class model and far below what would make a
    /// corrupt or hostile config.json allocate without end: vocabulary and context at most 2^20 (1,048,576),
    /// embedding dimension at most 2^16 (65,536), at most 1,024 layers.
    val maxVocabSize: int

    val maxContextLength: int

    val maxEmbeddingDim: int

    val maxLayers: int

    /// Raises a GptException naming the first thing wrong with the configuration (sizes positive and within the
    /// limits above, heads dividing the embedding dimension, dropout in [0, 1), a finite positive epsilon).
    val validate: config: GptConfig -> unit

    /// The fields two configurations disagree on, as "layers (the run has 4, asked for 2)" for owner "the run".
    val differences:
      owner: string -> have: GptConfig -> asked: GptConfig -> string list

    /// Parameters of one transformer block: two LayerNorms, attention (fused q|k|v and output projection)
    /// and the 4x feed-forward network.
    val blockParameterCount: config: GptConfig -> int64

    /// Number of trainable parameters, computed from the shapes without building the model.
    /// A tied head adds nothing: it reuses the token embedding matrix.
    val parameterCount: config: GptConfig -> int64

    /// Bytes the parameters take in float32 (4 bytes each).
    val memoryBytes: config: GptConfig -> int64

    /// Parameter memory in float32 in mebibytes, as the book prints it ("621.83 MB").
    val memoryMegabytes: config: GptConfig -> float

/// The token that ends a text: generation stops there unless told otherwise.
[<RequireQualifiedAccess>]
module EndOfText =

    /// GPT-2's &lt;|endoftext|&gt;, 50256.
    val gpt2: int

    /// The end-of-text token of a model with `vocabSize` tokens whose configuration names `configured` (config.json's
    /// eos_token_id): that one when it is inside the vocabulary, else GPT-2's 50256 when the vocabulary has it, else
    /// none (a small custom vocabulary has no end-of-text token unless its configuration names one).
    val resolve: configured: int option -> vocabSize: int -> int option

/// The one place that checks model inputs: token ids (as a tensor or as arrays) and vector sequences.
[<RequireQualifiedAccess>]
module Inputs =

    /// Fails unless every id of a sequence is in [0, vocabSize); `what` names the sequence ("prompt 2").
    val checkIdArray:
      vocabSize: int -> what: string -> ids: int array -> unit

    /// Fails unless ids is a non-empty [batch, length] integer tensor with length ≤ contextLength and every id in
    /// [0, vocabSize).
    val checkIds:
      vocabSize: int ->
        contextLength: int -> ids: TorchSharp.torch.Tensor -> unit

    /// The tensor itself when it is on `like`'s device, else a copy there (inputs built on the CPU for a model on a GPU).
    val onDeviceOf:
      like: TorchSharp.torch.Tensor -> tensor: TorchSharp.torch.Tensor -> TorchSharp.torch.Tensor

    /// Fails unless x is (B, T, dim) with T within the context length; `what` names the layer.
    val checkVectors:
      what: string ->
        dim: int -> contextLength: int -> x: TorchSharp.torch.Tensor -> unit
