namespace Gpt

open System
open System.Runtime.InteropServices

/// Settings of the C allocator that libtorch takes tensor memory from (glibc's malloc on Linux).
[<RequireQualifiedAccess>]
module NativeAllocator =
    module private Libc =
        [<DllImport("libc.so.6", CallingConvention = CallingConvention.Cdecl)>]
        extern int mallopt(int parameter, int value)

        [<DllImport("libc.so.6", CallingConvention = CallingConvention.Cdecl)>]
        extern int malloc_trim(unativeint pad)

    // glibc's malloc.h
    let private trimThreshold = -1
    let private mmapThreshold = -3
    let private mmapMax = -4
    let private arenaMax = -8

    /// Largest tensor buffer (32 MB, glibc's upper limit) served from the heap instead of a fresh mapping.
    let mmapThresholdBytes = 32 * 1024 * 1024

    /// Free memory at the top of the heap kept for reuse (1 GB) instead of being given back at once.
    let trimThresholdBytes = 1024 * 1024 * 1024

    /// Makes glibc keep and reuse freed tensor memory: every buffer comes from one heap (no fresh mappings, no new
    /// arenas), and up to 1 GB of freed
    /// heap stays mapped. Why: by default glibc maps every buffer above a threshold (128 KB at first, adjusted up to
    /// 32 MB) afresh and unmaps it on free, and gives heap memory back eagerly; a training step then touches hundreds of
    /// megabytes of new pages that the kernel must fault in and zero (on a virtual machine the host as well). Measured
    /// here on preset A: 120,000 page faults and a sixth of the step time before, 14,000 after. Peak memory is
    /// unchanged (the same buffers, reused); memory freed after a run stays with the process until it exits.
    /// Process-wide: call once at start-up, from an application, not a library. Returns false where it does not
    /// apply (not Linux, or not glibc).
    let reuseFreedMemory () : bool =
        if not (OperatingSystem.IsLinux()) then false
        else
            // No fresh mappings at all: even the logits of a training step ([B, T, 50257] floats, over glibc's 32 MB
            // limit for the threshold) then come from the reusable heap.
            try
                Libc.mallopt(mmapThreshold, mmapThresholdBytes) = 1
                && Libc.mallopt(mmapMax, 0) = 1
                // No new arenas for threads that have none yet: a thread's own arena is unmapped as it empties.
                && Libc.mallopt(arenaMax, 1) = 1
                && Libc.mallopt(trimThreshold, trimThresholdBytes) = 1
            with
            | :? DllNotFoundException
            | :? EntryPointNotFoundException -> false

    /// Gives the free memory of glibc's heaps back to the system (malloc_trim), so that the resident size reflects
    /// what is in use: the benchmark suite calls it between parts. False where it does not apply.
    let releaseFreeMemory () : bool =
        if not (OperatingSystem.IsLinux()) then false
        else
            try Libc.malloc_trim 0un = 1
            with
            | :? DllNotFoundException
            | :? EntryPointNotFoundException -> false
