namespace Gpt.Kernels

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

        [<DllImport("libc.so.6", CallingConvention = CallingConvention.Cdecl)>]
        extern int madvise(nativeint address, unativeint length, int advice)

    module private TorchSharpNative =
        /// The address of a tensor's first element (TorchSharp's native wrapper).
        [<DllImport("LibTorchSharp", CallingConvention = CallingConvention.Cdecl)>]
        extern nativeint THSTensor_data(nativeint handle)

    // glibc's malloc.h
    let private trimThreshold = -1
    let private mmapThreshold = -3
    let private mmapMax = -4
    let private arenaMax = -8
    let private madviseHugePage = 14
    let private pageBytes = 4096L
    let private hugePageBytes = 2L * 1024L * 1024L

    /// Largest tensor buffer (32 MB, glibc's upper limit) served from the heap instead of a fresh mapping.
    let mmapThresholdBytes = 32 * 1024 * 1024

    /// Free memory at the top of the heap kept for reuse (1 GB) instead of being given back at once.
    let trimThresholdBytes = 1024 * 1024 * 1024

    /// Makes glibc keep and reuse freed tensor memory: buffers below 32 MB come from one heap (no new arenas), and up
    /// to 1 GB of freed heap stays mapped for reuse. Why: by default glibc maps every buffer above a threshold (128 KB
    /// at first, adjusted up to 32 MB) afresh and unmaps it on free, and gives heap memory back eagerly; a training
    /// step then touches hundreds of megabytes of new pages that the kernel must fault in and zero. On this kind of
    /// virtual machine a fault costs about 8 µs (a fresh 154 MB buffer: 0.3 s). Measured on preset A: 120,000 page
    /// faults and a sixth of the step time before, 14,000 after.
    /// Buffers of 32 MB or more still get their own mapping, given back when freed: on one heap, a large buffer freed
    /// and requested again every step (GPT-2's 50,257 × 768 gradients) finds its hole nibbled by smaller activations
    /// in between, and the heap grew by a whole gradient per step without bound (measured: 147 MB a step on gpt2-small).
    /// The few large buffers of a step are allocated by this library with adviseHugePages, which makes their
    /// first touch cheap. Process-wide: call once at start-up, from an application, not a library. Returns false
    /// where it does not apply (not Linux, or not glibc).
    let reuseFreedMemory () : bool =
        if not (OperatingSystem.IsLinux()) then false
        else
            try
                Libc.mallopt(mmapThreshold, mmapThresholdBytes) = 1
                // No new arenas for threads that have none yet: a thread's own arena is unmapped as it empties.
                && Libc.mallopt(arenaMax, 1) = 1
                && Libc.mallopt(trimThreshold, trimThresholdBytes) = 1
            with
            | :? DllNotFoundException
            | :? EntryPointNotFoundException -> false

    /// Asks the kernel to back a tensor's memory with transparent huge pages (madvise MADV_HUGEPAGE), before the
    /// memory is first touched: one fault per 2 MB instead of one per 4 KB. Measured here: filling a fresh
    /// 50,257 × 768 float buffer took 0.27–0.34 s with 4 KB pages (37,700 faults) and 0.026 s advised (390 faults).
    /// Only whole pages inside the tensor's own bytes are advised. A hint: returns false where it does not apply
    /// (not Linux, not a contiguous CPU tensor, smaller than 2 MB, or the kernel refuses); the tensor is unchanged.
    let adviseHugePages (tensor: TorchSharp.torch.Tensor) : bool =
        let bytes = tensor.numel () * int64 tensor.ElementSize
        if not (OperatingSystem.IsLinux()) || bytes < hugePageBytes || tensor.device_type <> TorchSharp.DeviceType.CPU
           || not (tensor.is_contiguous ()) then false
        else
            try
                let address = int64 (TorchSharpNative.THSTensor_data tensor.Handle)
                let first = (address + pageBytes - 1L) &&& ~~~(pageBytes - 1L)
                let last = (address + bytes) &&& ~~~(pageBytes - 1L)
                last > first && Libc.madvise(nativeint first, unativeint (last - first), madviseHugePage) = 0
            with
            | :? DllNotFoundException
            | :? EntryPointNotFoundException -> false

    /// An uninitialised tensor like `model` (its shape, type and device), advised to use huge pages when it is a
    /// large CPU buffer (adviseHugePages). For the large buffers made afresh each training step.
    let emptyLike (model: TorchSharp.torch.Tensor) : TorchSharp.torch.Tensor =
        let tensor = TorchSharp.torch.empty_like model
        adviseHugePages tensor |> ignore
        tensor

    /// Gives the free memory of glibc's heaps back to the system (malloc_trim), so that the resident size reflects
    /// what is in use: the benchmark suite calls it between parts. False where it does not apply.
    let releaseFreeMemory () : bool =
        if not (OperatingSystem.IsLinux()) then false
        else
            try Libc.malloc_trim 0un = 1
            with
            | :? DllNotFoundException
            | :? EntryPointNotFoundException -> false
