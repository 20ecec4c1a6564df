namespace Gpt;

/// <summary>Process-wide settings for applications that train or run models.</summary>
public static class GptRuntime
{
    /// <summary>Makes the C allocator (glibc on Linux) keep and reuse freed tensor memory instead of mapping fresh,
    /// zeroed pages for every large buffer: fewer page faults and a faster training step at the same peak memory.
    /// Call once at start-up, from an application. Returns false where it does not apply (not Linux/glibc).</summary>
    public static bool TuneNativeAllocator() => NativeAllocatorTuned = Gpt.Kernels.NativeAllocator.reuseFreedMemory();

    /// <summary>Makes libtorch's OpenMP threads wait without spinning (OMP_WAIT_POLICY=PASSIVE, unless the environment
    /// sets a policy): a spinning thread takes the core from the very thread it waits for when another process competes
    /// for the cores (measured: 31 s instead of 77 s for 10 steps of the default run next to a busy process). OpenMP reads
    /// the setting when libtorch loads: call this at start-up, before the first tensor. Returns whether the policy is
    /// passive.</summary>
    public static bool PreferPassiveThreadWaiting() => Gpt.Kernels.NativeThreads.preferPassiveWaiting();

    /// <summary>The device a setting names on this machine and build: <c>cpu</c> or <c>cuda:N</c> for <c>cpu</c>,
    /// <c>cuda</c>, <c>cuda:N</c> or <c>auto</c> (CUDA when torch sees a device, else the CPU).</summary>
    /// <exception cref="GptException">An unknown device (the message names what was expected and found), or CUDA where
    /// there is none: this build uses TorchSharp-cpu, and the message says how to make a CUDA build.</exception>
    public static string ResolveDevice(string device)
    {
        ArgumentNullException.ThrowIfNull(device);
        return Gpt.Model.DeviceModule.describe(Gpt.Model.DeviceModule.resolve(Gpt.Model.DeviceModule.parse(device)));
    }

    /// <summary>Whether torch sees a CUDA device (never with this build's TorchSharp-cpu).</summary>
    public static bool CudaAvailable => Gpt.Model.DeviceModule.cudaAvailable();

    /// <summary>The TorchSharp package this build uses: <c>cpu</c> (TorchSharp-cpu) or <c>cuda</c> (built with
    /// <c>-p:TorchBackend=cuda</c>).</summary>
    public static string TorchBackend => Gpt.Model.DeviceModule.backend;

    /// <summary>Whether <see cref="TuneNativeAllocator"/> has been applied in this process.</summary>
    public static bool NativeAllocatorTuned { get; private set; }
}
