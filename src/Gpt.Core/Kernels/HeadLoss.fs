namespace Gpt.Kernels

open System
open System.Collections.Generic
open TorchSharp
open Gpt

/// The output head and the next-token cross-entropy fused, a few hundred rows at a time.
///
/// Why: the plain path materialises logits [B·T, vocab] and, for training, three more tensors of that size (the
/// log-softmax kept for backward, the gradient of the loss with respect to it, the gradient of the logits). With
/// GPT-2's 50,257-token vocabulary that is 411 MB each for a batch of 8 × 256, four times a step. Fused, each chunk of
/// rows goes through head → log-softmax → loss → softmax minus one-hot → both gradient products while its logits are
/// still in cache, in one chunk buffer reused from chunk to chunk.
/// The chunk's logits are computed transposed, (vocab, rows) = weight · hiddenᵀ: with the vocabulary as the long side
/// of the product's output MKL ran these shapes 5–15% faster here (gpt2-small, 256 rows: 0.40 s against 0.42 s for
/// the whole head with both gradients; preset A's 2048 rows: 1.15 s against 1.30 s), and the weight's gradient
/// (vocab, C) += P (vocab, rows) · hidden (rows, C) then needs no transposed operand.
/// The gradients are computed in the forward pass (the loss is the end of the graph, so backward only scales them
/// by the incoming gradient): the same matrix products as the plain path, no recomputation. The weight's gradient is
/// added to weight.grad directly (see Function).
[<RequireQualifiedAccess>]
module HeadLoss =
    /// Largest logits chunk, in bytes (64 MB: 333 rows of GPT-2's vocabulary).
    let chunkBytes = 64L * 1024L * 1024L

    /// Rows per chunk for a vocabulary: as many as fit chunkBytes of float32 logits, spread evenly over the chunks.
    let chunkRows (rows: int64) (vocabSize: int64) =
        let most = max 1L (chunkBytes / (vocabSize * 4L))
        let chunks = (rows + most - 1L) / most
        (rows + chunks - 1L) / chunks

    /// The target that counts for nothing (PyTorch's cross_entropy ignore_index): padding and masked prompt tokens in
    /// instruction fine-tuning.
    let ignoreIndex = -100L

    /// Mean cross-entropy of (hidden · weightᵀ) against targets, and, when asked, its gradients with respect to
    /// hidden and weight. hidden (N, C), weight (V, C), targets (N) int64; rows whose target is ignoreIndex count for
    /// nothing (the mean is over the others; NaN when every row is ignored, as PyTorch's). Runs without autograd.
    let compute (hidden: torch.Tensor) (weight: torch.Tensor) (targets: torch.Tensor) (gradients: bool) =
        use _ = torch.no_grad ()
        let rows = hidden.shape[0]
        let vocab = weight.shape[0]
        let chunk = chunkRows rows vocab
        use kept = targets.ne(ignoreIndex.ToScalar()) // (N)
        let counted = (use n = kept.sum() in n.item<int64> ())
        let ignoring = counted < rows
        // Ignored rows gather a valid id (0) and are then multiplied out of the loss and the gradients.
        use safeTargets = if ignoring then targets.masked_fill(kept.logical_not(), (0L).ToScalar()) else targets.alias ()
        use keptValues: torch.Tensor = if ignoring then kept.to_type(hidden.dtype).unsqueeze(0L) else null // (1, N)
        let scale = float32 (1.0 / float (max counted 1L))
        let gradHidden = if gradients then torch.empty_like hidden else null
        // A fresh vocab × C buffer every training step: huge pages make its first touch cheap.
        let gradWeight = if gradients then NativeAllocator.emptyLike weight else null
        use buffer = torch.empty([| vocab; chunk |], dtype = hidden.dtype, device = hidden.device) // (V, chunk)
        NativeAllocator.adviseHugePages buffer |> ignore
        let mutable lossSum = 0.0
        let mutable start = 0L
        while start < rows do
            use scope = torch.NewDisposeScope()
            let count = min chunk (rows - start)
            let h = hidden.narrow(0L, start, count) // (R, C)
            let t = safeTargets.narrow(0L, start, count).unsqueeze(0L) // (1, R)
            let keep: torch.Tensor = if ignoring then keptValues.narrow(1L, start, count) else null // (1, R)
            let logits = buffer.narrow(1L, 0L, count).addmm_(weight, h.t(), beta = 0.0f, alpha = 1.0f) // (V, R)
            // The softmax in place, without logsumexp (which makes a temporary the size of the chunk): shift by the
            // column maximum, pick the targets' shifted logits, exponentiate, sum; loss = log(sum) - shifted target.
            let shifted = logits.sub_(logits.amax([| 0L |], keepdim = true)) // (V, R)
            let picked = shifted.gather(0L, t) // (1, R)
            let exponentials = shifted.exp_ () // (V, R), in place
            let sums = exponentials.sum(0L, keepdim = true) // (1, R)
            let losses = sums.log().sub_(picked) // (1, R)
            lossSum <- lossSum + float ((if ignoring then losses.mul_(keep) else losses).sum().item<float32> ())
            if gradients then
                // d loss / d logits = (softmax - one_hot(target)) / N, and 0 for ignored rows
                let probabilities = exponentials.div_(sums) // (V, R), in place
                let minusOne = torch.ones([| 1L; count |], dtype = probabilities.dtype).neg_ ()
                probabilities.scatter_add_(0L, t, minusOne) |> ignore
                if ignoring then probabilities.mul_(keep) |> ignore
                gradHidden.narrow(0L, start, count).addmm_(probabilities.t(), weight, beta = 0.0f, alpha = scale) |> ignore
                // The first chunk overwrites the uninitialised buffer (beta 0 ignores it), later chunks add.
                gradWeight.addmm_(probabilities, h, beta = (if start = 0L then 0.0f else 1.0f), alpha = scale) |> ignore
            start <- start + count
        (if counted = 0L then nan else lossSum / float counted), gradHidden, gradWeight

    /// The loss as a 0-dimensional tensor of the hidden states' type.
    let private scalar (dtype: torch.ScalarType) (value: float) =
        use single = torch.tensor(float32 value)
        single.to_type(dtype)

    /// The autograd node: forward returns the loss and keeps the two gradients; backward scales them by the incoming
    /// gradient, returns the one for the hidden states and adds the one for the weight to weight.grad itself.
    /// Why not return it: autograd would copy it (our handle still refers to it) before adding it in, a second
    /// vocab × C buffer (154 MB for gpt2-small) alive at the start of backward. The weight is a leaf (the head's or
    /// the token embedding's parameter), so this is what autograd's accumulation would do; only torch.autograd.grad
    /// with respect to that weight does not see this gradient.
    type private Function() =
        inherit torch.autograd.SingleTensorFunction<Function>()
        override _.Name = "FusedHeadCrossEntropy"

        override _.forward(context, inputs) =
            let hidden = inputs[0] :?> torch.Tensor
            let weight = inputs[1] :?> torch.Tensor
            let targets = inputs[2] :?> torch.Tensor
            let loss, gradHidden, gradWeight = compute hidden weight targets true
            context.save_for_backward(List [ gradHidden; gradWeight; weight ])
            scalar hidden.dtype loss

        override _.backward(context, gradOutput) =
            let saved = context.get_saved_variables ()
            let gradHidden, gradWeight, weight = saved[0], saved[1], saved[2]
            let scale = gradOutput.item<float32> ()
            let scaled (gradient: torch.Tensor) = if scale = 1.0f then gradient else gradient.mul(gradOutput)
            // A weight computed from others (a head with a LoRA adapter merged in) passes its gradient back through
            // autograd; a parameter gets it added to its .grad here.
            let weightGradient =
                if weight.requires_grad && not weight.is_leaf then scaled gradWeight
                else
                    if weight.requires_grad then
                        use existing = weight.grad
                        if isNull existing then weight.grad <- scaled gradWeight
                        else existing.add_(gradWeight, alpha = scale) |> ignore
                    null
            // A loss that is not scaled (the usual case) passes the gradient on as it is: no copy.
            List [ scaled gradHidden; weightGradient; null ]

    /// Mean next-token cross-entropy of the logits hidden · weightᵀ against targets, without materialising the
    /// logits. hidden (N, C) float, weight (V, C) (the head's, or the tied token embedding), targets (N) int64 ->
    /// a scalar. Differentiable with respect to hidden and weight when autograd is on and either needs a gradient.
    let crossEntropy (hidden: torch.Tensor) (weight: torch.Tensor) (targets: torch.Tensor) : torch.Tensor =
        if hidden.dim () <> 2L || weight.dim () <> 2L || hidden.shape[1] <> weight.shape[1] then
            Errors.fail "fused head loss: hidden states %s and head weight %s do not fit (expected [N, C] and [vocab, C])"
                (Errors.shapeText hidden.shape) (Errors.shapeText weight.shape)
        if targets.dim () <> 1L || targets.shape[0] <> hidden.shape[0] then
            Errors.fail "fused head loss: targets must have shape [%d], found %s" hidden.shape[0] (Errors.shapeText targets.shape)
        if torch.is_grad_enabled () && (hidden.requires_grad || weight.requires_grad) then
            torch.autograd.SingleTensorFunction<Function>.apply(hidden, weight, targets)
        else
            let loss, _, _ = compute hidden weight targets false
            scalar hidden.dtype loss
