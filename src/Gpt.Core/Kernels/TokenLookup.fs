namespace Gpt.Kernels

open System.Collections.Generic
open TorchSharp
open Gpt

/// The token-embedding lookup for training, with a backward that adds straight into the table's gradient.
///
/// Why: autograd's embedding backward makes a zeroed vocab × C gradient every step (154 MB for GPT-2's 50,257 × 768
/// table) and then, when the table already has a gradient, adds it in and frees it. Here the step's rows are added
/// into weight.grad in place when there is one (a tied head has just put its gradient there), and otherwise into one
/// fresh buffer allocated with huge pages (NativeAllocator.emptyLike): its first touch cost 0.026 s instead of 0.3 s.
/// The values are autograd's: PyTorch's CPU embedding backward is the same index_add over the ids in order.
[<RequireQualifiedAccess>]
module TokenLookup =
    type private Function() =
        inherit torch.autograd.SingleTensorFunction<Function>()
        override _.Name = "TokenEmbeddingLookup"

        override _.forward(context, inputs) =
            let weight = inputs[0] :?> torch.Tensor
            let ids = inputs[1] :?> torch.Tensor
            context.save_for_backward(List [ ids; weight ])
            use flat = ids.flatten ()
            use rows = weight.index_select(0L, flat) // (B·T, C)
            rows.view([| yield! ids.shape; weight.shape[1] |]) // (B, T, C)

        override _.backward(context, gradOutput) =
            let saved = context.get_saved_variables ()
            use ids = saved[0]
            use weight = saved[1]
            if weight.requires_grad then
                use flat = ids.flatten().to_type(torch.int64) // index_add_ takes int64 indices only
                use rows = gradOutput.reshape(-1L, weight.shape[1]) // (B·T, C)
                use one = (1.0f).ToScalar()
                use existing = weight.grad
                if isNull existing then
                    use fresh = NativeAllocator.emptyLike weight
                    fresh.zero_().index_add_(0L, flat, rows, one) |> ignore
                    weight.grad <- fresh
                else
                    existing.index_add_(0L, flat, rows, one) |> ignore
            // The table's gradient is in weight.grad already (autograd would otherwise copy or add it a second time).
            List [ null; null ]

    /// The rows of `weight` (V, C) for `ids` (B, T) -> (B, T, C), as Embedding's forward. Differentiable with respect
    /// to the weight when autograd is on and it needs a gradient; the gradient is added to weight.grad directly
    /// (torch.autograd.grad with respect to the weight does not see it).
    let lookup (weight: torch.Tensor) (ids: torch.Tensor) : torch.Tensor =
        if torch.is_grad_enabled () && weight.requires_grad then
            torch.autograd.SingleTensorFunction<Function>.apply(weight, ids)
        else
            use flat = ids.flatten ()
            use rows = weight.index_select(0L, flat)
            rows.view([| yield! ids.shape; weight.shape[1] |])
