using Gpt.Bench;

namespace Gpt;

/// <summary>What a benchmark ran on.</summary>
public sealed record MachineDescription(string Cpu, int LogicalCores, int TorchThreads, double MemoryGiB, string Os, string Runtime, string TorchSharp);

/// <summary>The machine's ceilings: fp32 matrix-product speed through libtorch and memory bandwidth.</summary>
public sealed record MachineBenchmark(double MatmulGflops, double BandwidthGbps, MachineDescription Machine);

/// <summary>GPT-2 tokenizer encoding speed.</summary>
public sealed record TokenizerBenchmark(double MegabytesPerSecond, double Megabytes, int Tokens, double Seconds);

/// <summary>The benchmark suite (warm-up, then the median of several runs). Speed is measured here, never in tests.</summary>
public static class Benchmarks
{
    /// <summary>Describes this machine.</summary>
    public static MachineDescription Describe() => ToDescription(Measure.machine());

    /// <summary>fp32 matmul GFLOP/s at 1024³ and memory bandwidth in GB/s.</summary>
    public static MachineBenchmark Machine()
    {
        var result = MachineBench.machine();
        return new MachineBenchmark(result.MatmulGflops, result.BandwidthGbps, ToDescription(result.Machine));
    }

    /// <summary>Encodes at least <paramref name="megabytes"/> MB of text with GPT-2 BPE.</summary>
    public static TokenizerBenchmark Tokenizer(double megabytes = 10, int runs = 3)
    {
        var result = MachineBench.tokenizer(megabytes, runs);
        return new TokenizerBenchmark(result.MbPerS, result.Megabytes, result.Tokens, result.Seconds);
    }

    internal static MachineDescription ToDescription(Measure.MachineInfo m) =>
        new(m.Cpu, m.LogicalCores, m.TorchThreads, m.MemoryGiB, m.Os, m.Runtime, m.TorchSharp);
}
