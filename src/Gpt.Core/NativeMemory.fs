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

    let mutable private retained = false

    /// On Linux with glibc, asks malloc to keep freed memory for reuse instead of handing it back to the system.
    /// Why: every training step allocates and frees the logits and their gradients, [B, T, 50257] floats (hundreds
    /// of MB). glibc serves blocks that large with a fresh mmap and unmaps them on free, so each step page-faults
    /// its way through zeroed pages again; on this project's 2-core machine that made steps several times slower
    /// (mostly system time). With mmap off and trimming off, the blocks stay in the heap and are reused.
    /// The cost: the process keeps its peak memory until it exits. Process-wide and idempotent; returns whether
    /// the setting took effect (false on other systems or C libraries).
    let retainFreedMemory () : bool =
        if not retained && OperatingSystem.IsLinux() then
            try
                retained <- mallopt (M_MMAP_MAX, 0) = 1 && mallopt (M_TRIM_THRESHOLD, Int32.MaxValue) = 1
            with
            | :? DllNotFoundException
            | :? EntryPointNotFoundException -> ()
        retained
