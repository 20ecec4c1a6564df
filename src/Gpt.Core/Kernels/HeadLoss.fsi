namespace Gpt.Kernels

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
    val chunkBytes: int64

    /// Rows per chunk for a vocabulary: as many as fit chunkBytes of float32 logits, spread evenly over the chunks.
    val chunkRows: rows: int64 -> vocabSize: int64 -> int64

    /// The target that counts for nothing (PyTorch's cross_entropy ignore_index): padding and masked prompt tokens in
    /// instruction fine-tuning.
    val ignoreIndex: int64

    /// Mean cross-entropy of (hidden · weightᵀ) against targets, and, when asked, its gradients with respect to
    /// hidden and weight. hidden (N, C), weight (V, C), targets (N) int64; rows whose target is ignoreIndex count for
    /// nothing (the mean is over the others; NaN when every row is ignored, as PyTorch's). Runs without autograd.
    val compute:
      hidden: TorchSharp.torch.Tensor ->
        weight: TorchSharp.torch.Tensor ->
        targets: TorchSharp.torch.Tensor ->
        gradients: bool ->
        float * TorchSharp.torch.Tensor * TorchSharp.torch.Tensor

    /// The autograd node: forward returns the loss and keeps the two gradients; backward scales them by the incoming
    /// gradient, returns the one for the hidden states and adds the one for the weight to weight.grad itself.
    /// Why not return it: autograd would copy it (our handle still refers to it) before adding it in, a second
    /// vocab × C buffer (154 MB for gpt2-small) alive at the start of backward. The weight is a leaf (the head's or
    /// the token embedding's parameter), so this is what autograd's accumulation would do; only torch.autograd.grad
    /// with respect to that weight does not see this gradient.
    type private Function =
        inherit TorchSharp.torch.autograd.SingleTensorFunction<Function>

        new: unit -> Function

        override
          backward: context: TorchSharp.torch.autograd.AutogradContext *
                    gradOutput: TorchSharp.torch.Tensor ->
                      System.Collections.Generic.List<TorchSharp.torch.Tensor>

        override
          forward: context: TorchSharp.torch.autograd.AutogradContext *
                   inputs: obj array -> TorchSharp.torch.Tensor

        override Name: string

    /// Mean next-token cross-entropy of the logits hidden · weightᵀ against targets, without materialising the
    /// logits. hidden (N, C) float, weight (V, C) (the head's, or the tied token embedding), targets (N) int64 ->
    /// a scalar. Differentiable with respect to hidden and weight when autograd is on and either needs a gradient.
    val crossEntropy:
      hidden: TorchSharp.torch.Tensor ->
        weight: TorchSharp.torch.Tensor ->
        targets: TorchSharp.torch.Tensor -> TorchSharp.torch.Tensor
