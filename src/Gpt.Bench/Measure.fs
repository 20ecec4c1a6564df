namespace Gpt.Bench

open System
open System.Diagnostics
open System.IO
open TorchSharp

/// Timing and machine facts for the benchmark suite (never used by tests to assert speed).
[<RequireQualifiedAccess>]
module Measure =
    /// What the numbers were measured on.
    type MachineInfo =
        { Cpu: string
          LogicalCores: int
          TorchThreads: int
          MemoryGiB: float
          Os: string
          Runtime: string
          TorchSharp: string
          /// The 1-minute load average when the description was made.
          LoadAverage: float }

    let private cpuModel () =
        try
            File.ReadLines "/proc/cpuinfo"
            |> Seq.tryFind (fun line -> line.StartsWith "model name")
            |> Option.map (fun line -> line.Substring(line.IndexOf ':' + 1).Trim())
            |> Option.defaultValue "unknown"
        with _ -> "unknown"

    let private memoryGiB () =
        try
            File.ReadLines "/proc/meminfo"
            |> Seq.tryFind (fun line -> line.StartsWith "MemTotal:")
            |> Option.map (fun line -> float (line.Split(' ', StringSplitOptions.RemoveEmptyEntries)[1]) / 1024.0 / 1024.0)
            |> Option.defaultValue nan
        with _ -> nan

    /// The 1-minute load average (other processes competing for the cores); NaN where unknown.
    let loadAverage () =
        try
            let fields = (File.ReadAllText "/proc/loadavg").Split ' '
            Double.Parse(fields[0], Globalization.CultureInfo.InvariantCulture)
        with _ -> nan

    let machine () =
        { Cpu = cpuModel ()
          LogicalCores = Environment.ProcessorCount
          TorchThreads = torch.get_num_threads ()
          MemoryGiB = Math.Round(memoryGiB (), 1)
          Os = Runtime.InteropServices.RuntimeInformation.OSDescription
          Runtime = Environment.Version.ToString()
          TorchSharp = typeof<torch.Tensor>.Assembly.GetName().Version.ToString()
          LoadAverage = loadAverage () }

    /// Peak resident set size of this process so far (VmHWM), in MB; current RSS when the peak is unknown.
    let peakRssMb () =
        try
            File.ReadLines "/proc/self/status"
            |> Seq.tryFind (fun line -> line.StartsWith "VmHWM:")
            |> Option.map (fun line -> float (line.Split(' ', StringSplitOptions.RemoveEmptyEntries)[1]) / 1024.0)
            |> Option.defaultWith (fun () -> float (Process.GetCurrentProcess().PeakWorkingSet64) / 1048576.0)
        with _ -> float (Process.GetCurrentProcess().PeakWorkingSet64) / 1048576.0

    /// Starts a new peak for peakRssMb (Linux: writing 5 to /proc/self/clear_refs resets VmHWM to the current RSS),
    /// so that each part of a suite run in one process reports its own peak. Does nothing where that is refused.
    let resetPeakRss () =
        try File.WriteAllText("/proc/self/clear_refs", "5") with _ -> ()

    /// Minor page faults of this process so far (field 10 of /proc/self/stat): each is a fresh page the kernel had
    /// to map and zero; 0 where unknown.
    let minorPageFaults () =
        try
            let stat = File.ReadAllText "/proc/self/stat"
            // The command name (field 2) is in parentheses and may hold spaces: count fields after the last ')'.
            let fields = stat.Substring(stat.LastIndexOf ')' + 2).Split ' '
            int64 fields[7]
        with _ -> 0L

    /// CPU time so far, in clock ticks: of the whole machine (busy and idle, all cores) and of this process.
    type CpuSnapshot = { MachineBusy: int64; MachineTotal: int64; Process: int64 }

    let cpuSnapshot () =
        try
            let fields = (File.ReadLines "/proc/stat" |> Seq.head).Split(' ', StringSplitOptions.RemoveEmptyEntries)
            let ticks = fields[1..] |> Array.map int64 // user nice system idle iowait irq softirq steal ...
            let idle = ticks[3] + ticks[4]
            let total = ticks |> Array.truncate 8 |> Array.sum
            let stat = File.ReadAllText "/proc/self/stat"
            let own = stat.Substring(stat.LastIndexOf ')' + 2).Split ' '
            { MachineBusy = total - idle; MachineTotal = total; Process = int64 own[11] + int64 own[12] } // utime, stime
        with _ -> { MachineBusy = 0L; MachineTotal = 0L; Process = 0L }

    /// The share of the machine's CPU capacity that other processes used between two snapshots, in percent (0 on
    /// an otherwise idle machine; 50 means one of two cores was busy with something else). NaN where unknown.
    let othersCpuPercent (before: CpuSnapshot) (after: CpuSnapshot) =
        let total = after.MachineTotal - before.MachineTotal
        if total <= 0L then nan
        else
            let others = (after.MachineBusy - before.MachineBusy) - (after.Process - before.Process)
            Math.Round(100.0 * float (max 0L others) / float total, 1)

    /// Current resident set size, in MB.
    let rssMb () =
        use self = Process.GetCurrentProcess()
        self.Refresh()
        float self.WorkingSet64 / 1048576.0

    /// Median of a list of numbers.
    let median (values: float seq) =
        let sorted = values |> Seq.sort |> Array.ofSeq
        if sorted.Length = 0 then nan
        elif sorted.Length % 2 = 1 then sorted[sorted.Length / 2]
        else (sorted[sorted.Length / 2 - 1] + sorted[sorted.Length / 2]) / 2.0

    /// Runs an action `warmup` times untimed, then `runs` times timed; returns the seconds of each timed run.
    let time (warmup: int) (runs: int) (action: unit -> unit) : float[] =
        for _ in 1 .. warmup do
            action ()
        [| for _ in 1 .. runs do
               let watch = Stopwatch.StartNew()
               action ()
               watch.Stop()
               watch.Elapsed.TotalSeconds |]
