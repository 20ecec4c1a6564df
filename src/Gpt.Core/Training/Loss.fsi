namespace Gpt.Training

/// The training objective (book ch. 5): next-token cross-entropy, its perplexity, its mean over a loader,
/// and the train/validation split of a token stream.
[<RequireQualifiedAccess>]
module Loss =

    /// Mean cross-entropy of logits [B, T, V] against target ids [B, T]: the batch is flattened to
    /// [B*T, V] vs [B*T], as the book's calc_loss_batch does, so every position weighs the same.
    val crossEntropy:
      logits: TorchSharp.torch.Tensor ->
        targets: TorchSharp.torch.Tensor -> TorchSharp.torch.Tensor

    /// The loss of one batch through a model (ids → logits): the book's calc_loss_batch. A GptModel computes it
    /// with its head fused into the loss (GptModel.Loss: same value, no [B, T, V] logits in memory).
    val batch:
      model: TorchSharp.torch.nn.Module<TorchSharp.torch.Tensor,
                                        TorchSharp.torch.Tensor> ->
        inputs: TorchSharp.torch.Tensor ->
        targets: TorchSharp.torch.Tensor -> TorchSharp.torch.Tensor

    /// exp(loss): the number of equally likely tokens the model hesitates between.
    val perplexity: loss: float -> float

    /// Mean batch loss over a loader, under no_grad: the book's calc_loss_loader. Reads at most `limit` batches
    /// when given (the first ones); NaN for a loader with no batches, as in the book. The model's train/eval mode
    /// is left as it is: evaluation code puts the model in eval mode around this call. Disposes every batch.
    val loader:
      model: TorchSharp.torch.nn.Module<TorchSharp.torch.Tensor,
                                        TorchSharp.torch.Tensor> ->
        limit: int option ->
        batches: (TorchSharp.torch.Tensor * TorchSharp.torch.Tensor) seq ->
        float

    /// Splits a token stream by position: the first `trainRatio` of it for training, the rest for validation
    /// (the book splits 90/10 this way; no shuffling, so validation text is text the model never saw).
    val split: trainRatio: float -> ids: int array -> int array * int array

    /// The book's default split: 90% training, 10% validation.
    val defaultTrainRatio: float
