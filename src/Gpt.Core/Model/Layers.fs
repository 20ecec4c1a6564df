namespace Gpt.Model

open System
open TorchSharp
open TorchSharp.Modules
open type TorchSharp.torch.nn
open Gpt

/// The maths of the GPT building blocks (book ch. 4) as plain functions on tensors.
[<RequireQualifiedAccess>]
module Layers =
    /// The book's LayerNorm, written out: normalise the last axis to mean 0 and variance 1 (the biased variance,
    /// dividing by n as GPT-2 does, not n - 1), then scale and shift. x [.., C], scale [C], shift [C].
    let layerNorm (epsilon: float) (scale: torch.Tensor) (shift: torch.Tensor) (x: torch.Tensor) =
        use scope = torch.NewDisposeScope()
        let mean = x.mean([| -1L |], keepdim = true)
        let variance = x.var(-1L, unbiased = false, keepdim = true)
        let normalised = (x - mean) / torch.sqrt(variance + epsilon)
        (scale * normalised + shift).MoveToOuterDisposeScope()

    /// The same LayerNorm through libtorch's fused kernel (what the model runs).
    let layerNormFast (epsilon: float) (scale: torch.Tensor) (shift: torch.Tensor) (x: torch.Tensor) =
        functional.layer_norm(x, [| x.shape[x.shape.Length - 1] |], scale, shift, epsilon)

    /// The book's GELU, the tanh approximation GPT-2 was trained with:
    /// 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
    /// The exact erf GELU differs by up to 4e-4, enough to drift away from the released weights.
    let gelu (x: torch.Tensor) =
        use scope = torch.NewDisposeScope()
        let inner = (x + x * x * x * 0.044715) * Math.Sqrt(2.0 / Math.PI)
        (x * 0.5 * (torch.tanh inner + 1.0)).MoveToOuterDisposeScope()

    /// The same tanh-approximate GELU through libtorch's kernel (what the model runs).
    let geluFast (x: torch.Tensor) = functional.gelu(x, GELU.Approximate.tanh)

/// Layer normalisation over the last axis with a learned scale (`weight`) and shift (`bias`), as GPT-2 names them.
type LayerNorm(embeddingDim: int, epsilon: float) as this =
    inherit Module<torch.Tensor, torch.Tensor>("LayerNorm")
    do
        Errors.require (embeddingDim > 0) "embedding dimension must be positive, found %d" embeddingDim
        Errors.require (epsilon > 0.0) "layer norm epsilon must be positive, found %g" epsilon
    let weight = Parameter(torch.ones(int64 embeddingDim)) // scale, starts at 1
    let bias = Parameter(torch.zeros(int64 embeddingDim)) // shift, starts at 0
    do this.RegisterComponents()

    new(embeddingDim: int) = new LayerNorm(embeddingDim, 1e-5)

    member _.Epsilon = epsilon
    /// The learned scale, state_dict key `weight` (the book's `scale`).
    member _.Scale = weight
    /// The learned shift, state_dict key `bias` (the book's `shift`).
    member _.Shift = bias

    override _.forward(x: torch.Tensor) = Layers.layerNormFast epsilon weight bias x

    /// The book's explicit formula with this module's parameters; equal to `forward` up to rounding.
    member _.ForwardExplicit(x: torch.Tensor) = Layers.layerNorm epsilon weight bias x

/// The position-wise feed-forward network: expand 4x, GELU, project back (book ch. 4, nanoGPT's MLP).
type FeedForward(embeddingDim: int) as this =
    inherit Module<torch.Tensor, torch.Tensor>("FeedForward")
    let c_fc = Linear(int64 embeddingDim, 4L * int64 embeddingDim)
    let c_proj = Linear(4L * int64 embeddingDim, int64 embeddingDim)
    do this.RegisterComponents()

    /// The expansion C -> 4C, state_dict key `c_fc`.
    member _.Expand = c_fc
    /// The projection back 4C -> C, state_dict key `c_proj`.
    member _.Project = c_proj

    override _.forward(x: torch.Tensor) =
        use hidden = c_fc.forward x // (B, T, 4C)
        use activated = Layers.geluFast hidden
        c_proj.forward activated // (B, T, C)
