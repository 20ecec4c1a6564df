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

    /// functional.linear(x, weight, bias) — except for a single input row (generating one token) against a weight of
    /// 256K values or more, computed as two halves of the output on two threads. Why: MKL's matrix-vector product
    /// runs on one thread, and generation streams every weight once per token, so it was bound by what one core can
    /// read: 24 gpt2-small feed-forward matrices took 12.2 ms with one or two libtorch threads, 7.1 ms as halves in
    /// parallel; the 50,257 × 768 head 8.7 ms, 4.8 ms. Each output value is the same dot product either way. Only
    /// without autograd (a graph through two threads is not worth it) and on the CPU; otherwise functional.linear.
    let linear (weight: torch.Tensor) (bias: torch.Tensor) (x: torch.Tensor) : torch.Tensor =
        let inFeatures = weight.shape[1]
        let single = x.dim () >= 1L && x.shape[x.shape.Length - 1] = inFeatures && x.numel () = inFeatures
        let tracked (t: torch.Tensor) = not (isNull t) && t.requires_grad
        if not single || weight.numel () < 262_144L || weight.dim () <> 2L || x.device_type <> DeviceType.CPU
           || x.dtype <> weight.dtype || torch.get_num_threads () < 2
           || (torch.is_grad_enabled () && (tracked x || tracked weight || tracked bias)) then
            functional.linear(x, weight, bias)
        else
            let outFeatures = weight.shape[0]
            use output = torch.empty([| 1L; outFeatures |], dtype = x.dtype)
            use row = x.reshape(1L, inFeatures)
            // Tensors made on a pool thread belong to no dispose scope there: every one is disposed here.
            let part (start: int64) (length: int64) () =
                use rows = weight.narrow(0L, start, length)
                use transposed = rows.t ()
                use target = output.narrow(1L, start, length)
                if isNull bias then
                    target.addmm_(row, transposed, beta = 0.0f, alpha = 1.0f) |> ignore
                else
                    use shift = bias.narrow(0L, start, length)
                    target.copy_(shift).addmm_(row, transposed, beta = 1.0f, alpha = 1.0f) |> ignore
            let half = outFeatures / 2L
            System.Threading.Tasks.Parallel.Invoke(Action(part 0L half), Action(part half (outFeatures - half)))
            output.view([| yield! x.shape[.. x.shape.Length - 2]; outFeatures |])

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
        use hidden = Layers.linear c_fc.weight c_fc.bias x // (B, T, 4C); c_fc.forward, two threads for one token
        use activated = Layers.geluFast hidden
        Layers.linear c_proj.weight c_proj.bias activated // (B, T, C)
