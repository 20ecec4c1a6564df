namespace Gpt.Generation

open System
open TorchSharp
open Gpt

/// Choosing the next token from logits (book ch. 5 and beyond). Every function is pure over a logits tensor of
/// shape [B, V] (one row per sequence) or [V], and returns new tensors; nothing here touches the global random
/// generator: sampling draws from the torch.Generator it is given.
///
/// The order of the filters is temperature, top-k, top-p, then the draw. Temperature 0 means greedy (argmax),
/// which every filter would keep anyway.
[<RequireQualifiedAccess>]
module Sampling =
    /// Raises a GptException unless temperature ≥ 0 (finite), top-k ≥ 1 and top-p in (0, 1].
    let validate (temperature: float) (topK: int option) (topP: float option) =
        if Double.IsNaN temperature || Double.IsInfinity temperature || temperature < 0.0 then
            Errors.fail "temperature must be a finite number >= 0 (0 = greedy), found %g" temperature
        match topK with
        | Some k when k < 1 -> Errors.fail "top-k must keep at least 1 token, found %d" k
        | _ -> ()
        match topP with
        | Some p when Double.IsNaN p || p <= 0.0 || p > 1.0 -> Errors.fail "top-p must be in (0, 1], found %g" p
        | _ -> ()

    let private vocabularyOf (logits: torch.Tensor) =
        if logits.dim () <> 1L && logits.dim () <> 2L then
            Errors.fail "logits must have shape [batch, vocabulary] or [vocabulary], found %s" (Errors.shapeText logits.shape)
        logits.shape[int (logits.dim ()) - 1]

    /// logits / temperature: below 1 sharpens the distribution, above 1 flattens it. Temperature must be > 0
    /// (temperature 0 is greedy decoding: see `nextToken`). Any positive temperature works: a tiny one gives the
    /// greedy choice (ties shared), not NaN.
    let scaleTemperature (temperature: float) (logits: torch.Tensor) : torch.Tensor =
        if not (temperature > 0.0) || Double.IsInfinity temperature then
            Errors.fail "temperature scaling needs a finite temperature > 0, found %g (use greedy decoding for 0)" temperature
        let scaled = logits / temperature
        // A tiny temperature overflows float32 (1e-300 even rounds to 0 in it): the largest logits become +inf and
        // softmax gives NaN. Shifted by each row's maximum first, in float64, the maximum becomes 0 and the others
        // large negative numbers or -inf: a one-hot distribution. Ordinary temperatures keep the plain division.
        let overflowed =
            use top = scaled.max()
            use top64 = top.to_type(torch.float64)
            let value = top64.item<float> ()
            Double.IsNaN value || Double.IsPositiveInfinity value
        if not overflowed then scaled
        else
            scaled.Dispose()
            use scope = torch.NewDisposeScope()
            let wide = logits.to_type(torch.float64)
            let struct (rowMaximum, _) = wide.max(-1L, keepdim = true)
            let shifted = ((wide - rowMaximum) / temperature).to_type(logits.dtype)
            shifted.MoveToOuterDisposeScope()

    /// Keeps the k largest logits of each row and sets the others to -infinity. Exactly k survive, even with ties
    /// (the book's threshold test keeps every tie of the k-th value); a k at or above the vocabulary size
    /// keeps everything.
    let keepTopK (k: int) (logits: torch.Tensor) : torch.Tensor =
        validate 1.0 (Some k) None
        let vocabulary = vocabularyOf logits
        if int64 k >= vocabulary then logits.clone ()
        else
            use scope = torch.NewDisposeScope()
            let struct (values, indices) = logits.topk(k, dim = -1)
            let filtered = torch.full_like(logits, Double.NegativeInfinity).scatter_(-1L, indices, values)
            filtered.MoveToOuterDisposeScope()

    /// Nucleus filtering: keeps, in each row, the smallest set of most likely tokens whose probabilities reach p
    /// (at least one token) and sets the others to -infinity. A token is kept when the probability of the tokens
    /// strictly more likely than it is still below p. p = 1 keeps everything.
    let keepTopP (p: float) (logits: torch.Tensor) : torch.Tensor =
        validate 1.0 None (Some p)
        vocabularyOf logits |> ignore
        if p >= 1.0 then logits.clone ()
        else
            use scope = torch.NewDisposeScope()
            let probabilities = logits.softmax(-1L, torch.float64)
            let struct (sorted, order) = probabilities.sort(-1L, descending = true)
            let before = sorted.cumsum(-1L) - sorted // mass of the tokens ranked above each one
            let dropSorted = before.ge(torch.tensor p)
            // Back from rank order to vocabulary order.
            let drop = torch.zeros_like(dropSorted).scatter_(-1L, order, dropSorted)
            let filtered = logits.masked_fill(drop, Double.NegativeInfinity)
            filtered.MoveToOuterDisposeScope()

    /// Greedy decoding: the id of the largest logit, shape [B, 1] for [B, V] (or [1] for [V]).
    let greedy (logits: torch.Tensor) : torch.Tensor =
        vocabularyOf logits |> ignore
        logits.argmax(-1L, keepdim = true)

    /// Temperature, top-k and top-p applied in that order (temperature > 0): the logits the draw is made from.
    let filter (temperature: float) (topK: int option) (topP: float option) (logits: torch.Tensor) : torch.Tensor =
        validate temperature topK topP
        use scope = torch.NewDisposeScope()
        let scaled = scaleTemperature temperature logits
        let afterK = match topK with Some k -> keepTopK k scaled | None -> scaled
        let afterP = match topP with Some p -> keepTopP p afterK | None -> afterK
        afterP.MoveToOuterDisposeScope()

    /// The next token ids, shape [B, 1] for logits [B, V] (or [1] for [V]): greedy when temperature = 0,
    /// otherwise a draw from softmax(filter ...) with the given generator, so that the same generator state gives
    /// the same token and concurrent generations do not disturb each other.
    let nextToken
        (temperature: float)
        (topK: int option)
        (topP: float option)
        (generator: torch.Generator)
        (logits: torch.Tensor)
        : torch.Tensor =
        validate temperature topK topP
        if temperature = 0.0 then greedy logits
        else
            use scope = torch.NewDisposeScope()
            let probabilities = (filter temperature topK topP logits).softmax(-1L)
            let ids = torch.multinomial(probabilities, 1L, generator = generator)
            ids.MoveToOuterDisposeScope()
