namespace Gpt.Bench

open System
open System.Runtime.InteropServices
open System.Text
open TorchSharp
open Microsoft.FSharp.NativeInterop
open Gpt.Kernels
open Gpt.Text

#nowarn "9" // the read benchmark reads native memory

/// Reads 1 MB pieces of a zero-filled buffer (the read-bandwidth benchmark's work on the decoder's worker pool),
/// through the runtime's own vectorised search for a byte that is not zero: optimised code in every build of this
/// project (a loop of our own runs unoptimised in a Debug build, at a third of the speed).
[<Sealed>]
type internal ReadJob(address: nativeint, bytes: int64) =
    inherit ParallelJob()
    static let piece = 1L <<< 20
    member _.Chunks = int ((bytes + piece - 1L) / piece)
    override _.Execute(chunk: int) =
        let first = int64 chunk * piece
        let length = int (min bytes (first + piece) - first)
        let span = ReadOnlySpan<byte>(NativePtr.toVoidPtr (NativePtr.ofNativeInt<byte> (address + nativeint first)), length)
        if span.IndexOfAnyExcept 0uy >= 0 then failwith "the read benchmark's buffer is not zero"

/// The machine's own ceilings, and the tokenizer's speed.
[<RequireQualifiedAccess>]
module MachineBench =
    type MachineResult =
        { MatmulGflops: float
          BandwidthGbps: float
          ReadBandwidthGbps: float
          Machine: Measure.MachineInfo }

    /// fp32 matrix product n×n×n through libtorch: 2n³ floating-point operations per product, the median of `runs`
    /// products after 10 untimed ones. (This machine's rate moved between 123 and 170 GFLOP/s from one second to the
    /// next; dozens of ~12 ms products make the median steadier than a handful.)
    let matmulGflops (size: int) (runs: int) =
        use _ = torch.no_grad ()
        use a = torch.randn(int64 size, int64 size)
        use b = torch.randn(int64 size, int64 size)
        let seconds = Measure.time 10 runs (fun () -> (torch.mm(a, b)).Dispose())
        2.0 * float size ** 3.0 / Measure.median seconds / 1e9

    /// Memory bandwidth: copying a 256 MB buffer reads and writes every byte once.
    let bandwidthGbps (megabytes: int) (runs: int) =
        use _ = torch.no_grad ()
        let elements = int64 megabytes * 1024L * 1024L / 4L
        use source = torch.ones(elements)
        use target = torch.empty(elements)
        let seconds = Measure.time 1 runs (fun () -> target.copy_ source |> ignore)
        2.0 * float elements * 4.0 / Measure.median seconds / 1e9

    /// Read bandwidth, what a decoding step needs (it reads every weight once and writes little): a `megabytes`
    /// buffer read in 1 MB pieces (ReadJob) on the decoder's worker pool (every core), the median of `runs` passes after one.
    /// On this project's machine it gave 45–60 GB/s where the copy above gave 53–72 (a copy counts its writes too,
    /// which this machine's memory takes faster than reads): a decoding step's ceiling is the read figure.
    let readBandwidthGbps (megabytes: int) (runs: int) =
        let bytes = int64 megabytes <<< 20
        let buffer = NativeMemory.AlignedAlloc(unativeint bytes, 4096un)
        try
            NativeMemory.Fill(buffer, unativeint bytes, 0uy)
            let job = ReadJob(NativePtr.toNativeInt (NativePtr.ofVoidPtr<byte> buffer), bytes)
            let pool = WorkerPool.Shared.Value
            let seconds = Measure.time 1 runs (fun () -> pool.Run(job, job.Chunks))
            float bytes / Measure.median seconds / 1e9
        finally
            NativeMemory.AlignedFree buffer

    let machine () =
        { MatmulGflops = Math.Round(matmulGflops 1024 50, 1)
          BandwidthGbps = Math.Round(bandwidthGbps 256 5, 2)
          ReadBandwidthGbps = Math.Round(readBandwidthGbps 512 7, 2)
          Machine = Measure.machine () }

    type TokenizerResult =
        { MbPerS: float
          Megabytes: float
          Tokens: int
          Seconds: float }

    /// Encoding speed of GPT-2 BPE on at least `megabytes` of text (the built-in story repeated, with a counter in
    /// every copy so the tokenizer's cache cannot serve whole copies).
    let tokenizer (megabytes: float) (runs: int) =
        let story = Corpus.builtIn.Value.Text
        let builder = StringBuilder()
        let mutable copy = 0
        while float builder.Length < megabytes * 1024.0 * 1024.0 do
            builder.Append(copy).Append(' ').Append(story).Append('\n') |> ignore
            copy <- copy + 1
        let text = builder.ToString()
        let bytes = float (Encoding.UTF8.GetByteCount text)
        let gpt2 = Tokenizers.gpt2 ()
        let mutable tokens = 0
        let seconds = Measure.time 1 runs (fun () -> tokens <- (gpt2.Encode text).Length)
        let median = Measure.median seconds
        { MbPerS = Math.Round(bytes / 1048576.0 / median, 2)
          Megabytes = Math.Round(bytes / 1048576.0, 2)
          Tokens = tokens
          Seconds = Math.Round(median, 3) }
