using Gpt.Bench;

namespace Gpt;

/// <summary>What a benchmark ran on.</summary>
/// <remarks><see cref="LoadAverage"/> is the 1-minute load average when the description was made: other processes
/// competing for the cores make every figure slower.</remarks>
public sealed record MachineDescription(string Cpu, int LogicalCores, int TorchThreads, double MemoryGiB, string Os, string Runtime, string TorchSharp,
    double LoadAverage);

/// <summary>The machine's ceilings: fp32 matrix-product speed through libtorch and memory bandwidth.</summary>
public sealed record MachineBenchmark(double MatmulGflops, double BandwidthGbps, MachineDescription Machine);

/// <summary>GPT-2 tokenizer encoding speed.</summary>
public sealed record TokenizerBenchmark(double MegabytesPerSecond, double Megabytes, int Tokens, double Seconds);

/// <summary>Median seconds of each part of a training step.</summary>
/// <summary>Median seconds of each part of a training step. Forward = Body (embeddings, blocks, final norm) + HeadAndLoss
/// (the output head fused with the cross-entropy, which also computes the head's gradients, so Backward excludes them).</summary>
public sealed record TrainStepBreakdown(double ZeroGradSeconds, double ForwardSeconds, double BackwardSeconds, double OptimizerSeconds,
    double BodySeconds, double HeadAndLossSeconds);

/// <summary>Training speed of a preset: tokens/s, model FLOPs utilisation against the matmul speed measured in the same
/// process, peak memory, and where the time of a step goes.</summary>
public sealed record TrainBenchmark(
    string Preset, int BatchSize, int SequenceLength, long Parameters, long MatrixParameters, double FlopsPerToken,
    double TokensPerSecond, double Mfu, double MatmulGflops, double PeakRssMb, double StepSeconds, IReadOnlyList<double> StepTimes,
    TrainStepBreakdown Breakdown, double TensorsPerStep, double PageFaultsPerStep, int WarmupSteps, int TimedSteps,
    double FirstLoss, double LastLoss);

/// <summary>Memory over a long training run of a small model (with KV-cache generation and evaluation in between):
/// live tensor handles and resident memory after the warm-up and at the end.</summary>
public sealed record LeakBenchmark(
    int Steps, int WarmupSteps, double RssAfterWarmupMb, double RssEndMb, double RssGrowthPercent,
    long LiveTensorsAfterWarmup, long LiveTensorsEnd, long LiveTensorsGrowth, long LiveTensorsMax, int Generations, int Evaluations,
    double Seconds);

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

    /// <summary>Trains a fresh model of preset <c>A</c> or <c>B</c>: <paramref name="warmupSteps"/> untimed steps, then
    /// the median of <paramref name="steps"/> timed ones (forward, cross-entropy, backward, AdamW with weight decay).</summary>
    /// <exception cref="GptException">Unknown preset or bad step counts.</exception>
    public static TrainBenchmark Train(string preset, int warmupSteps = 2, int steps = 5, int seed = 123)
    {
        ArgumentNullException.ThrowIfNull(preset);
        var r = TrainBench.run(TrainBench.preset(preset), warmupSteps, steps, seed);
        var b = r.Breakdown;
        return new TrainBenchmark(r.Preset, r.BatchSize, r.SequenceLength, r.Parameters, r.MatrixParameters, r.FlopsPerToken,
            r.TokensPerSecond, r.Mfu, r.MatmulGflops, r.PeakRssMb, r.StepSeconds, r.StepTimes,
            new TrainStepBreakdown(b.ZeroGrad, b.Forward, b.Backward, b.Optimizer, b.Body, b.HeadAndLoss),
            r.TensorsPerStep, r.PageFaultsPerStep, r.WarmupSteps, r.TimedSteps, r.FirstLoss, r.LastLoss);
    }

    /// <summary>Trains a small model for <paramref name="steps"/> steps, generating through the KV cache every 10 steps
    /// and evaluating every 50, and compares live tensors and resident memory after <paramref name="warmupSteps"/> with
    /// the end.</summary>
    /// <exception cref="GptException">Bad step counts.</exception>
    public static LeakBenchmark Leak(int steps = 500, int warmupSteps = 50, int seed = 123)
    {
        var r = LeakBench.run(steps, warmupSteps, seed);
        return new LeakBenchmark(r.Steps, r.WarmupSteps, r.RssAfterWarmupMb, r.RssEndMb, r.RssGrowthPct, r.LiveTensorsAfterWarmup,
            r.LiveTensorsEnd, r.LiveTensorsGrowth, r.LiveTensorsMax, r.Generations, r.Evaluations, r.Seconds);
    }

    /// <summary>Runs <paramref name="measure"/> and tells how much of the machine's CPU other processes used meanwhile,
    /// in percent of all cores (Linux; NaN elsewhere): figures measured next to a busy neighbour are slower.</summary>
    public static (T Result, double OthersCpuPercent) WithContention<T>(Func<T> measure)
    {
        ArgumentNullException.ThrowIfNull(measure);
        var before = Measure.cpuSnapshot();
        var result = measure();
        return (result, Measure.othersCpuPercent(before, Measure.cpuSnapshot()));
    }

    internal static MachineDescription ToDescription(Measure.MachineInfo m) =>
        new(m.Cpu, m.LogicalCores, m.TorchThreads, m.MemoryGiB, m.Os, m.Runtime, m.TorchSharp, m.LoadAverage);
}
