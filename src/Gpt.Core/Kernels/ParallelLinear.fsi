namespace Gpt.Kernels

/// A linear map whose single-row case (generating one token) runs on two threads.
[<RequireQualifiedAccess>]
module ParallelLinear =

    /// Weights smaller than this (256K values) are not worth a second thread.
    val minimumElements: int64

    /// functional.linear(x, weight, bias) — except for a single input row (generating one token) against a weight of
    /// 256K values or more, computed as two halves of the output on two threads. Why: MKL's matrix-vector product
    /// runs on one thread, and generation streams every weight once per token, so it was bound by what one core can
    /// read: 24 gpt2-small feed-forward matrices took 12.2 ms with one or two libtorch threads, 7.1 ms as halves in
    /// parallel; the 50,257 × 768 head 8.7 ms, 4.8 ms. Each output value is the same dot product either way. Only
    /// without autograd (a graph through two threads is not worth it) and on the CPU; otherwise functional.linear.
    /// `bias` may be null.
    val linear:
      weight: TorchSharp.torch.Tensor ->
        bias: TorchSharp.torch.Tensor ->
        x: TorchSharp.torch.Tensor -> TorchSharp.torch.Tensor
