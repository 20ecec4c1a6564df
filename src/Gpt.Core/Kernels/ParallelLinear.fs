namespace Gpt.Kernels

open System
open TorchSharp

/// A linear map whose single-row case (generating one token) runs on two threads.
[<RequireQualifiedAccess>]
module ParallelLinear =
    /// Weights smaller than this (256K values) are not worth a second thread.
    let minimumElements = 262_144L

    /// functional.linear(x, weight, bias) — except for a single input row (generating one token) against a weight of
    /// 256K values or more, computed as two halves of the output on two threads. Why: MKL's matrix-vector product
    /// runs on one thread, and generation streams every weight once per token, so it was bound by what one core can
    /// read: 24 gpt2-small feed-forward matrices took 12.2 ms with one or two libtorch threads, 7.1 ms as halves in
    /// parallel; the 50,257 × 768 head 8.7 ms, 4.8 ms. Each output value is the same dot product either way. Only
    /// without autograd (a graph through two threads is not worth it) and on the CPU; otherwise functional.linear.
    /// `bias` may be null.
    let linear (weight: torch.Tensor) (bias: torch.Tensor) (x: torch.Tensor) : torch.Tensor =
        let inFeatures = weight.shape[1]
        let single = x.dim () >= 1L && x.shape[x.shape.Length - 1] = inFeatures && x.numel () = inFeatures
        let tracked (t: torch.Tensor) = not (isNull t) && t.requires_grad
        if not single || weight.numel () < minimumElements || weight.dim () <> 2L || x.device_type <> DeviceType.CPU
           || x.dtype <> weight.dtype || torch.get_num_threads () < 2
           || (torch.is_grad_enabled () && (tracked x || tracked weight || tracked bias)) then
            torch.nn.functional.linear(x, weight, bias)
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
