namespace Gpt.Kernels

/// The token-embedding lookup for training, with a backward that adds straight into the table's gradient.
///
/// Why: autograd's embedding backward makes a zeroed vocab × C gradient every step (154 MB for GPT-2's 50,257 × 768
/// table) and then, when the table already has a gradient, adds it in and frees it. Here the step's rows are added
/// into weight.grad in place when there is one (a tied head has just put its gradient there), and otherwise into one
/// fresh buffer allocated with huge pages (NativeAllocator.emptyLike): its first touch cost 0.026 s instead of 0.3 s.
/// The values are autograd's: PyTorch's CPU embedding backward is the same index_add over the ids in order.
[<RequireQualifiedAccess>]
module TokenLookup =

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

    /// The rows of `weight` (V, C) for `ids` (B, T) -> (B, T, C), as Embedding's forward. Differentiable with respect
    /// to the weight when autograd is on and it needs a gradient; the gradient is added to weight.grad directly
    /// (torch.autograd.grad with respect to the weight does not see it).
    val lookup:
      weight: TorchSharp.torch.Tensor ->
        ids: TorchSharp.torch.Tensor -> TorchSharp.torch.Tensor
