namespace Gpt

open System
open System.Runtime.InteropServices

/// How the process allocates the native memory libtorch asks for.
[<RequireQualifiedAccess>]
module NativeMemory =
    [<DllImport("libc", EntryPoint = "mallopt")>]
    extern int private mallopt(int parameter, int value)

    // glibc's malloc.h
    let private M_TRIM_THRESHOLD = -1
    let private M_MMAP_MAX = -4
    let private M_ARENA_MAX = -8

    let mutable private retained = false

    /// On Linux with glibc, asks malloc to keep freed memory for reuse instead of handing it back to the system.
    /// Why: every training step allocates and frees the logits and their gradients, [B, T, 50257] floats (hundreds
    /// of MB), and many blocks of a few MB. glibc serves the large ones with a fresh mmap and unmaps them on free,
    /// and trims its heap as it empties: each step then page-faults its way through zeroed pages again (measured on
    /// this project's 2-core machine: seconds of system time per step). Here: no mmap, no trimming, and no new
    /// arenas for threads that have none yet. What it cannot change: a thread that already has an arena of its own
    /// (glibc hands out arenas at a thread's first allocation, and reuses those of exited threads) gets heaps that
    /// glibc unmaps when they empty; only the main thread is sure to use the main heap, or every thread with
    /// MALLOC_ARENA_MAX=1 in the environment. The cost: the process keeps its peak memory until it exits.
    /// Process-wide and idempotent; returns whether the settings took effect (false on other systems or C libraries).
    let retainFreedMemory () : bool =
        if not retained && OperatingSystem.IsLinux() then
            try
                retained <-
                    mallopt (M_ARENA_MAX, 1) = 1 && mallopt (M_MMAP_MAX, 0) = 1 && mallopt (M_TRIM_THRESHOLD, Int32.MaxValue) = 1
            with
            | :? DllNotFoundException
            | :? EntryPointNotFoundException -> ()
        retained

/// How libtorch's worker threads wait.
[<RequireQualifiedAccess>]
module NativeThreads =
    [<DllImport("libc", EntryPoint = "setenv")>]
    extern int private setenv(string name, string value, int overwrite)

    /// Sets OMP_WAIT_POLICY=PASSIVE for libtorch's OpenMP runtime unless the environment already sets a policy.
    /// Why: by default an OpenMP thread that waits for its team spins, burning its core; when another process
    /// competes for the cores (a shared 2-core machine), the spinning thread takes CPU from the very thread it waits
    /// for. Measured on this project's machine with one other busy process: 4.0 s per step of the default
    /// `gpt train` with 2 spinning threads, 1.5 s with 1 thread, 1.45 s with 2 passive threads. OpenMP reads the
    /// variable once, when libtorch is loaded: call this before the first TorchSharp call, or it has no effect.
    /// Returns whether the policy is now passive (false on Windows, or when the environment asked for another).
    let preferPassiveWaiting () : bool =
        match Environment.GetEnvironmentVariable "OMP_WAIT_POLICY" with
        | null | "" when not (OperatingSystem.IsWindows()) ->
            try
                // The native environment, which OpenMP reads (.NET's own copy is not the process's on Unix).
                setenv ("OMP_WAIT_POLICY", "PASSIVE", 0) = 0
                && (Environment.SetEnvironmentVariable("OMP_WAIT_POLICY", "PASSIVE"); true)
            with
            | :? DllNotFoundException
            | :? EntryPointNotFoundException -> false
        | policy -> not (isNull policy) && policy.Equals("PASSIVE", StringComparison.OrdinalIgnoreCase)
