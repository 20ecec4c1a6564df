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
