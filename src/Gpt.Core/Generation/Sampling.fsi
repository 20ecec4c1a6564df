namespace Gpt.Generation

/// Choosing the next token from logits (book ch. 5 and beyond). Every function is pure over a logits tensor of
/// shape [B, V] (one row per sequence) or [V], and returns new tensors; nothing here touches the global random
/// generator: sampling draws from the torch.Generator it is given.
///
/// The order of the filters is temperature, top-k, top-p, then the draw. Temperature 0 means greedy (argmax),
/// which every filter would keep anyway.
[<RequireQualifiedAccess>]
module Sampling =

    /// Raises a GptException unless temperature ≥ 0 (finite), top-k ≥ 1 and top-p in (0, 1].
    val validate:
      temperature: float -> topK: int option -> topP: float option -> unit

    /// logits / temperature: below 1 sharpens the distribution, above 1 flattens it. Temperature must be > 0
    /// (temperature 0 is greedy decoding: see `nextToken`).
    val scaleTemperature:
      temperature: float ->
        logits: TorchSharp.torch.Tensor -> TorchSharp.torch.Tensor

    /// Keeps the k largest logits of each row and sets the others to -infinity. Exactly k survive, even with ties
    /// (the book's threshold test keeps every tie of the k-th value); a k at or above the vocabulary size
    /// keeps everything.
    val keepTopK:
      k: int -> logits: TorchSharp.torch.Tensor -> TorchSharp.torch.Tensor

    /// Nucleus filtering: keeps, in each row, the smallest set of most likely tokens whose probabilities reach p
    /// (at least one token) and sets the others to -infinity. A token is kept when the probability of the tokens
    /// strictly more likely than it is still below p. p = 1 keeps everything.
    val keepTopP:
      p: float -> logits: TorchSharp.torch.Tensor -> TorchSharp.torch.Tensor

    /// Greedy decoding: the id of the largest logit, shape [B, 1] for [B, V] (or [1] for [V]).
    val greedy: logits: TorchSharp.torch.Tensor -> TorchSharp.torch.Tensor

    /// Temperature, top-k and top-p applied in that order (temperature > 0): the logits the draw is made from.
    val filter:
      temperature: float ->
        topK: int option ->
        topP: float option ->
        logits: TorchSharp.torch.Tensor -> TorchSharp.torch.Tensor

    /// The next token ids, shape [B, 1] for logits [B, V] (or [1] for [V]): greedy when temperature = 0,
    /// otherwise a draw from softmax(filter ...) with the given generator, so that the same generator state gives
    /// the same token and concurrent generations do not disturb each other.
    val nextToken:
      temperature: float ->
        topK: int option ->
        topP: float option ->
        generator: TorchSharp.torch.Generator ->
        logits: TorchSharp.torch.Tensor -> TorchSharp.torch.Tensor
