namespace Gpt.Kernels

/// Settings of the C allocator that libtorch takes tensor memory from (glibc's malloc on Linux).
[<RequireQualifiedAccess>]
module NativeAllocator =

    module private Libc =

        val mallopt: parameter: int * value: int -> int

        val malloc_trim: pad: unativeint -> int

        val madvise:
          address: nativeint * length: unativeint * advice: int -> int

    module private TorchSharpNative =

        /// The address of a tensor's first element (TorchSharp's native wrapper).
        val THSTensor_data: handle: nativeint -> nativeint

    /// Largest tensor buffer (32 MB, glibc's upper limit) served from the heap instead of a fresh mapping.
    val mmapThresholdBytes: int

    /// Free memory at the top of the heap kept for reuse (1 GB) instead of being given back at once.
    val trimThresholdBytes: int

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
    val reuseFreedMemory: unit -> bool

    /// Asks the kernel to back a tensor's memory with transparent huge pages (madvise MADV_HUGEPAGE), before the
    /// memory is first touched: one fault per 2 MB instead of one per 4 KB. Measured here: filling a fresh
    /// 50,257 × 768 float buffer took 0.27–0.34 s with 4 KB pages (37,700 faults) and 0.026 s advised (390 faults).
    /// Only whole pages inside the tensor's own bytes are advised. A hint: returns false where it does not apply
    /// (not Linux, not a contiguous CPU tensor, smaller than 2 MB, or the kernel refuses); the tensor is unchanged.
    val adviseHugePages: tensor: TorchSharp.torch.Tensor -> bool

    /// An uninitialised tensor like `model` (its shape, type and device), advised to use huge pages when it is a
    /// large CPU buffer (adviseHugePages). For the large buffers made afresh each training step.
    val emptyLike: model: TorchSharp.torch.Tensor -> TorchSharp.torch.Tensor

    /// Gives the free memory of glibc's heaps back to the system (malloc_trim), so that the resident size reflects
    /// what is in use: the benchmark suite calls it between parts. False where it does not apply.
    val releaseFreeMemory: unit -> bool
