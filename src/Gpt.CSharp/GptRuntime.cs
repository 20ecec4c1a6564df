namespace Gpt;

/// <summary>Process-wide settings for applications that train or run models.</summary>
public static class GptRuntime
{
    /// <summary>Makes the C allocator (glibc on Linux) keep and reuse freed tensor memory instead of mapping fresh,
    /// zeroed pages for every large buffer: fewer page faults and a faster training step at the same peak memory.
    /// Call once at start-up, from an application. Returns false where it does not apply (not Linux/glibc).</summary>
    public static bool TuneNativeAllocator() => NativeAllocatorTuned = NativeAllocator.reuseFreedMemory();

    /// <summary>Whether <see cref="TuneNativeAllocator"/> has been applied in this process.</summary>
    public static bool NativeAllocatorTuned { get; private set; }
}
