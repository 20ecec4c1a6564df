// Time of each matrix-vector product of one gpt2-small decoder step (random weights, 12 layers and the head, the
// epilogues the decoder uses), on the calling thread alone and on the shared worker pool, per dtype: where a token's
// time goes, product by product (issue 18). Release build first, on an idle machine:
//   dotnet build src/Gpt.Cli -c Release && dotnet fsi scripts/matvec-bench.fsx [DTYPES (f32,f16,bf16)] [REPEATS (20)] [TOKENS (1)]
// TOKENS > 1 times the prompt kernel (that many activation rows per block product; the head stays at one).
#load "check-build.fsx"
#load "load.fsx"
#nowarn "9"

open System
open System.Diagnostics
open System.Runtime.InteropServices
open Microsoft.FSharp.NativeInterop
open Gpt.Kernels

let arguments = fsi.CommandLineArgs |> Array.skip 1
let dtypes = if arguments.Length > 0 then arguments[0].Split ',' |> Array.map Dtype.parse else List.toArray Dtype.all
let repeats = if arguments.Length > 1 then int arguments[1] else 20
let tokens = if arguments.Length > 2 then int arguments[2] else 1

let random = Random 1
let allocate (bytes: int64) = NativePtr.toNativeInt (NativePtr.ofVoidPtr<byte> (NativeMemory.AlignedAlloc(unativeint bytes, 64un)))

/// A block's products in the decoder's order: name, rows, columns, epilogue.
let blockProducts =
    [ "c_attn", 2304, 768, Epilogue.Store
      "attn.c_proj", 768, 768, Epilogue.Add
      "c_fc", 3072, 768, Epilogue.Gelu
      "mlp.c_proj", 768, 3072, Epilogue.Add ]

let randomMatrix (dtype: Dtype) (rows: int) (columns: int) =
    let count = int64 rows * int64 columns
    let address = allocate (count * int64 dtype.Bytes)
    for i in 0L .. count - 1L do
        let value = float32 (random.NextDouble() * 0.2 - 0.1)
        match dtype with
        | Dtype.Float32 -> NativePtr.set (NativePtr.ofNativeInt<float32> address) (int i) value
        | Dtype.Float16 -> NativePtr.set (NativePtr.ofNativeInt<Half> address) (int i) (Half.op_Explicit value)
        | Dtype.BFloat16 ->
            NativePtr.set (NativePtr.ofNativeInt<uint16> address) (int i) (uint16 (BitConverter.SingleToInt32Bits value >>> 16))
    { Address = address; Rows = rows; Columns = columns; Dtype = dtype }

let input = allocate (4L * 3072L * int64 tokens)
let output = allocate (4L * 50257L * int64 tokens)
for i in 0 .. 3072 * tokens - 1 do
    NativePtr.set (NativePtr.ofNativeInt<float32> input) i (float32 (random.NextDouble() - 0.5))

let median (values: float list) = (List.sort values)[values.Length / 2]

for dtype in dtypes do
    let products =
        [ for _ in 1 .. 12 do
              for name, rows, columns, epilogue in blockProducts do
                  yield name, randomMatrix dtype rows columns, epilogue, tokens
          yield "head", randomMatrix dtype 50257 768, Epilogue.Store, 1 ]
    let job = MatVecJob(MatVec.best, true)
    for pool, label in [ new WorkerPool(0), "alone"; WorkerPool.Shared.Value, "pool" ] do
        let times = Collections.Generic.Dictionary<string, float list>()
        let mutable steps = []
        for repeat in 0 .. repeats do // repeat 0 warms up
            let step = Stopwatch.StartNew()
            for name, matrix, epilogue, rows in products do
                let clock = Stopwatch.StartNew()
                job.Set(matrix, 0n, input, matrix.Columns, rows, output, matrix.Rows, epilogue)
                pool.Run(job, job.Chunks)
                if repeat > 0 then
                    times[name] <- clock.Elapsed.TotalSeconds :: (match times.TryGetValue name with | true, l -> l | _ -> [])
            if repeat > 0 then steps <- step.Elapsed.TotalSeconds :: steps
        let bytes (matrix: WeightMatrix) = float matrix.Rows * float matrix.RowBytes
        let parts =
            products
            |> List.distinctBy (fun (name, _, _, _) -> name)
            |> List.map (fun (name, matrix, _, _) ->
                let seconds = median times[name]
                sprintf "%s %.0f µs %.1f GB/s" name (seconds * 1e6) (bytes matrix / seconds / 1e9))
        let step = median steps
        let total = products |> List.sumBy (fun (_, matrix, _, _) -> bytes matrix)
        printfn "%-4s %-5s (%d workers) step %.2f ms, %.1f GB/s | %s"
            dtype.Name label pool.Workers (step * 1e3) (total / step / 1e9) (String.Join(" | ", parts))
    WorkerPool.Shared.Value.WaitIdle() // a speculative worker may still be reading the weights
    for _, matrix, _, _ in products do
        NativeMemory.AlignedFree(NativePtr.toVoidPtr (NativePtr.ofNativeInt<byte> matrix.Address))
