namespace Gpt.Training

open System
open TorchSharp
open Gpt

/// The training objective (book ch. 5): next-token cross-entropy, its perplexity, its mean over a loader,
/// and the train/validation split of a token stream.
[<RequireQualifiedAccess>]
module Loss =
    /// Mean cross-entropy of logits [B, T, V] against target ids [B, T]: the batch is flattened to
    /// [B*T, V] vs [B*T], as the book's calc_loss_batch does, so every position weighs the same.
    let crossEntropy (logits: torch.Tensor) (targets: torch.Tensor) : torch.Tensor =
        if logits.dim () <> 3L then
            Errors.fail "logits must have shape [batch, length, vocabulary], found %s" (Errors.shapeText logits.shape)
        if targets.dim () <> 2L || targets.shape[0] <> logits.shape[0] || targets.shape[1] <> logits.shape[1] then
            Errors.fail "targets must have shape [%d, %d] to match logits %s, found %s"
                logits.shape[0] logits.shape[1] (Errors.shapeText logits.shape) (Errors.shapeText targets.shape)
        use flatLogits = logits.flatten(0, 1) // (B*T, V)
        use flatTargets = targets.flatten().to_type(torch.int64) // (B*T)
        torch.nn.functional.cross_entropy(flatLogits, flatTargets)

    /// The loss of one batch through a model (ids → logits): the book's calc_loss_batch. A GptModel computes it
    /// with its head fused into the loss (GptModel.Loss: same value, no [B, T, V] logits in memory).
    let batch (model: torch.nn.Module<torch.Tensor, torch.Tensor>) (inputs: torch.Tensor) (targets: torch.Tensor) =
        match model with
        | :? Gpt.Model.GptModel as gpt -> gpt.Loss(inputs, targets)
        | _ ->
            use logits = model.forward inputs // (B, T, V)
            crossEntropy logits targets

    /// exp(loss): the number of equally likely tokens the model hesitates between.
    let perplexity (loss: float) = Math.Exp loss

    /// Mean batch loss over a loader, under no_grad: the book's calc_loss_loader. Reads at most `limit` batches
    /// when given (the first ones); NaN for a loader with no batches, as in the book. The model's train/eval mode
    /// is left as it is: evaluation code puts the model in eval mode around this call. Disposes every batch.
    let loader (model: torch.nn.Module<torch.Tensor, torch.Tensor>) (limit: int option) (batches: seq<torch.Tensor * torch.Tensor>) : float =
        limit |> Option.iter (fun n -> Errors.require (n > 0) "the batch limit must be positive, found %d" n)
        use _ = torch.no_grad ()
        let mutable total = 0.0
        let mutable count = 0
        use enumerator = batches.GetEnumerator()
        while (limit.IsNone || count < limit.Value) && enumerator.MoveNext() do
            let inputs, targets = enumerator.Current
            use _ = inputs
            use _ = targets
            use scope = torch.NewDisposeScope()
            let loss = batch model inputs targets
            total <- total + float (loss.item<float32> ())
            count <- count + 1
        if count = 0 then nan else total / float count

    /// Splits a token stream by position: the first `trainRatio` of it for training, the rest for validation
    /// (the book splits 90/10 this way; no shuffling, so validation text is text the model never saw).
    let split (trainRatio: float) (ids: int[]) : int[] * int[] =
        Errors.require (trainRatio > 0.0 && trainRatio < 1.0) "the training ratio must be between 0 and 1 (exclusive), found %g" trainRatio
        let cut = int (trainRatio * float ids.Length)
        ids[.. cut - 1], ids[cut ..]

    /// The book's default split: 90% training, 10% validation.
    let defaultTrainRatio = 0.9
