namespace Gpt.Model

open Gpt

/// The shape of a GPT-2 model (book ch. 4, `GPT_CONFIG_124M`).
type GptConfig =
    { /// Number of token ids the model knows (50,257 for GPT-2's BPE vocabulary).
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
      LayerNormEpsilon: float }

/// Presets, validation and sizes of GPT-2 configurations.
[<RequireQualifiedAccess>]
module GptConfig =
    /// The released GPT-2 124M: 50,257 tokens, 1,024 positions, 768 dims, 12 heads, 12 layers, dropout 0.1,
    /// QKV bias, head tied to the token embedding.
    let gpt2Small =
        { VocabSize = 50257
          ContextLength = 1024
          EmbeddingDim = 768
          Heads = 12
          Layers = 12
          DropRate = 0.1
          QkvBias = true
          TiedHead = true
          LayerNormEpsilon = 1e-5 }

    /// GPT-2 355M: 1,024 dims, 16 heads, 24 layers.
    let gpt2Medium = { gpt2Small with EmbeddingDim = 1024; Heads = 16; Layers = 24 }

    /// GPT-2 774M: 1,280 dims, 20 heads, 36 layers.
    let gpt2Large = { gpt2Small with EmbeddingDim = 1280; Heads = 20; Layers = 36 }

    /// GPT-2 1558M: 1,600 dims, 25 heads, 48 layers.
    let gpt2Xl = { gpt2Small with EmbeddingDim = 1600; Heads = 25; Layers = 48 }

    /// The preset names `byName` accepts, in size order.
    let presetNames = [ "gpt2-small"; "gpt2-medium"; "gpt2-large"; "gpt2-xl" ]

    /// A preset by name: "gpt2-small" | "gpt2-medium" | "gpt2-large" | "gpt2-xl" (case-insensitive).
    let byName (name: string) =
        match (if isNull name then "" else name.Trim().ToLowerInvariant()) with
        | "gpt2-small" -> gpt2Small
        | "gpt2-medium" -> gpt2Medium
        | "gpt2-large" -> gpt2Large
        | "gpt2-xl" -> gpt2Xl
        | _ -> Errors.fail "unknown model configuration '%s': expected one of %s" name (String.concat ", " presetNames)

    // Limits against corrupt or hostile configurations (a config.json with n_layer 1,000,000 exhausted memory in
    // native code before any check); a real model is far inside them.
    let maxVocabSize = 1 <<< 20
    let maxContextLength = 1 <<< 20
    let maxEmbeddingDim = 1 <<< 16
    let maxLayers = 1024

    /// Raises a GptException naming the first thing wrong with the configuration.
    let validate (config: GptConfig) =
        let positive (value: int) (what: string) = Errors.require (value > 0) "%s must be positive, found %d" what value
        positive config.VocabSize "vocabulary size"
        positive config.ContextLength "context length"
        positive config.EmbeddingDim "embedding dimension"
        positive config.Heads "number of heads"
        positive config.Layers "number of layers"
        let atMost (value: int) (limit: int) (what: string) =
            Errors.require (value <= limit) "%s %d exceeds this library's limit of %d" what value limit
        atMost config.VocabSize maxVocabSize "vocabulary size"
        atMost config.ContextLength maxContextLength "context length"
        atMost config.EmbeddingDim maxEmbeddingDim "embedding dimension"
        atMost config.Layers maxLayers "number of layers"
        Errors.require (config.EmbeddingDim % config.Heads = 0)
            "embedding dimension %d is not divisible by %d heads" config.EmbeddingDim config.Heads
        Errors.require (config.DropRate >= 0.0 && config.DropRate < 1.0)
            "dropout rate must be in [0, 1), found %g" config.DropRate
        Errors.require (config.LayerNormEpsilon > 0.0 && not (System.Double.IsInfinity config.LayerNormEpsilon))
            "layer norm epsilon must be positive, found %g" config.LayerNormEpsilon

    /// The fields two configurations disagree on, as "layers (the run has 4, asked for 2)" for owner "the run".
    let differences (owner: string) (have: GptConfig) (asked: GptConfig) : string list =
        let field name (value: GptConfig -> obj) =
            if value have <> value asked then Some(sprintf "%s (%s has %O, asked for %O)" name owner (value have) (value asked)) else None
        [ field "vocabulary size" (fun c -> box c.VocabSize); field "context length" (fun c -> box c.ContextLength)
          field "embedding dimension" (fun c -> box c.EmbeddingDim); field "heads" (fun c -> box c.Heads)
          field "layers" (fun c -> box c.Layers); field "dropout rate" (fun c -> box c.DropRate)
          field "QKV bias" (fun c -> box c.QkvBias); field "tied head" (fun c -> box c.TiedHead)
          field "layer norm epsilon" (fun c -> box c.LayerNormEpsilon) ]
        |> List.choose id

    /// Parameters of one transformer block: two LayerNorms, attention (fused q|k|v and output projection)
    /// and the 4x feed-forward network.
    let blockParameterCount (config: GptConfig) =
        let d = int64 config.EmbeddingDim
        let layerNorms = 2L * (2L * d) // ln_1, ln_2: scale and shift
        let qkv = d * 3L * d + (if config.QkvBias then 3L * d else 0L)
        let attentionOut = d * d + d
        let feedForward = (d * 4L * d + 4L * d) + (4L * d * d + d)
        layerNorms + qkv + attentionOut + feedForward

    /// Number of trainable parameters, computed from the shapes without building the model.
    /// A tied head adds nothing: it reuses the token embedding matrix.
    let parameterCount (config: GptConfig) =
        validate config
        let d = int64 config.EmbeddingDim
        let embeddings = int64 config.VocabSize * d + int64 config.ContextLength * d
        let finalNorm = 2L * d
        let head = if config.TiedHead then 0L else int64 config.VocabSize * d
        embeddings + int64 config.Layers * blockParameterCount config + finalNorm + head

    /// Bytes the parameters take in float32 (4 bytes each).
    let memoryBytes (config: GptConfig) = parameterCount config * 4L

    /// Parameter memory in float32 in mebibytes, as the book prints it ("621.83 MB").
    let memoryMegabytes (config: GptConfig) = float (memoryBytes config) / (1024.0 * 1024.0)

[<RequireQualifiedAccess>]
module EndOfText =
    let gpt2 = 50256

    let resolve (configured: int option) (vocabSize: int) =
        let inside id = id >= 0 && id < vocabSize
        match configured with
        | Some id when inside id -> Some id
        | _ when inside gpt2 -> Some gpt2
        | _ -> None

/// The one place that checks model inputs: token ids (as a tensor or as arrays) and vector sequences.
[<RequireQualifiedAccess>]
module Inputs =
    open TorchSharp

    /// Fails unless every id of a sequence is in [0, vocabSize); `what` names the sequence ("prompt 2").
    let checkIdArray (vocabSize: int) (what: string) (ids: int[]) =
        for id in ids do
            if id < 0 || id >= vocabSize then
                Errors.fail "%s: token id %d is outside the model's vocabulary (0..%d)" what id (vocabSize - 1)

    /// Fails unless ids is a non-empty [batch, length] integer tensor with length ≤ contextLength and every id in
    /// [0, vocabSize).
    let checkIds (vocabSize: int) (contextLength: int) (ids: torch.Tensor) =
        if ids.dim () <> 2L then
            Errors.fail "token ids must have shape [batch, length], found %s" (Errors.shapeText ids.shape)
        if ids.dtype <> torch.int64 && ids.dtype <> torch.int32 then
            Errors.fail "token ids must be integers (int64 or int32), found %O" ids.dtype
        let length = ids.shape[1]
        if length > int64 contextLength then
            Errors.fail "sequence length %d exceeds the model's context length %d" length contextLength
        if length = 0L || ids.shape[0] = 0L then
            Errors.fail "token ids are empty: shape %s" (Errors.shapeText ids.shape)
        // Every intermediate disposed: this runs outside any dispose scope for each generated token.
        use minimum = ids.min()
        use maximum = ids.max()
        use lowest = minimum.to_type(torch.int64)
        use highest = maximum.to_type(torch.int64)
        let low = lowest.item<int64> ()
        let high = highest.item<int64> ()
        if low < 0L || high >= int64 vocabSize then
            let bad = if low < 0L then low else high
            Errors.fail "token id %d is outside the vocabulary (0..%d)" bad (vocabSize - 1)

    let onDeviceOf (like: torch.Tensor) (tensor: torch.Tensor) =
        if tensor.device_type = like.device_type && tensor.device_index = like.device_index then tensor
        else tensor.``to``(like.device)

    /// Fails unless x is (B, T, dim) with T within the context length; `what` names the layer.
    let checkVectors (what: string) (dim: int) (contextLength: int) (x: torch.Tensor) =
        if x.dim () <> 3L || x.shape[2] <> int64 dim then
            Errors.fail "%s input must have shape [batch, length, %d], found %s" what dim (Errors.shapeText x.shape)
        if x.shape[1] > int64 contextLength then
            Errors.fail "sequence length %d exceeds the %s context length %d" x.shape[1] what contextLength
