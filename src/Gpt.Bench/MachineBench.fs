namespace Gpt.Bench

open System
open System.Text
open TorchSharp
open Gpt.Text

/// The machine's own ceilings, and the tokenizer's speed.
[<RequireQualifiedAccess>]
module MachineBench =
    type MachineResult =
        { MatmulGflops: float
          BandwidthGbps: float
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

    let machine () =
        { MatmulGflops = Math.Round(matmulGflops 1024 50, 1)
          BandwidthGbps = Math.Round(bandwidthGbps 256 5, 2)
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
