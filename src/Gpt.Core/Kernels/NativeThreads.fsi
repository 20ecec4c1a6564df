namespace Gpt.Kernels

/// How libtorch's worker threads wait.
[<RequireQualifiedAccess>]
module NativeThreads =

    /// Sets OMP_WAIT_POLICY=PASSIVE for libtorch's OpenMP runtime unless the environment already sets a policy.
    /// Why: by default an OpenMP thread that waits for its team spins, burning its core; when another process
    /// competes for the cores (a shared 2-core machine), the spinning thread takes CPU from the very thread it waits
    /// for. Measured on this project's machine with one other busy process: 4.0 s per step of the default
    /// `gpt train` with 2 spinning threads, 1.5 s with 1 thread, 1.45 s with 2 passive threads. OpenMP reads the
    /// variable once, when libtorch is loaded: call this before the first TorchSharp call, or it has no effect.
    /// Returns whether the policy is now passive (false on Windows, or when the environment asked for another).
    val preferPassiveWaiting: unit -> bool
