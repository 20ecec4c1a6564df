namespace Gpt.Model

open TorchSharp
open TorchSharp.Modules
open type TorchSharp.torch.nn
open Gpt

/// Checks on token-id inputs shared by every model: shape [B, T], T within the context, ids within the vocabulary.
[<RequireQualifiedAccess>]
module TokenIds =
    let check (vocabSize: int) (contextLength: int) (ids: torch.Tensor) =
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
        TokenIds.check vocabSize contextLength ids
        use positions = torch.arange(ids.shape[1], device = ids.device)
        use tokens = wte.forward ids // (B, T, C)
        use places = wpe.forward positions // (T, C), broadcast over B
        tokens + places
