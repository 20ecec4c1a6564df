namespace Gpt.Kernels

// Native pointers are the point of this file: the kernels read weights where they lie.
#nowarn "9"

open System
open System.Numerics
open System.Runtime.CompilerServices
open System.Runtime.InteropServices
open System.Runtime.Intrinsics
open System.Runtime.Intrinsics.X86
open Microsoft.FSharp.NativeInterop

/// The element type inference weights are stored in. Products are always accumulated in float32: a 16-bit weight is
/// widened to float32 in the kernel, next to the multiply-add that uses it.
[<RequireQualifiedAccess>]
type Dtype =
    /// IEEE single precision, 4 bytes: the weights as trained.
    | Float32
    /// IEEE half precision, 2 bytes: 11 significant bits, range ±65,504.
    | Float16
    /// bfloat16 (the upper half of a float32), 2 bytes: 8 significant bits, float32's range.
    | BFloat16

    /// Bytes per element.
    member this.Bytes =
        match this with
        | Float32 -> 4
        | Float16
        | BFloat16 -> 2

    /// The short name the command line uses: f32, f16, bf16.
    member this.Name =
        match this with
        | Float32 -> "f32"
        | Float16 -> "f16"
        | BFloat16 -> "bf16"

/// Dtype names.
[<RequireQualifiedAccess>]
module Dtype =
    /// Every dtype, in order of size.
    let all = [ Dtype.Float32; Dtype.Float16; Dtype.BFloat16 ]

    /// f32 | f16 | bf16 (also float32, fp32, float16, fp16, half, bfloat16), case-insensitive.
    let parse (text: string) =
        match (if isNull text then "" else text.Trim().ToLowerInvariant()) with
        | "f32" | "fp32" | "float32" | "float" -> Dtype.Float32
        | "f16" | "fp16" | "float16" | "half" -> Dtype.Float16
        | "bf16" | "bfloat16" -> Dtype.BFloat16
        | _ -> Gpt.Errors.fail "unknown dtype '%s': expected f32, f16 or bf16" text

/// Which instructions compute the products: AVX2 with FMA (x86-64), or System.Numerics.Vector, which works on every
/// processor .NET runs on (and is what runs where AVX2 is missing).
[<RequireQualifiedAccess>]
type MatVecPath =
    | Avx2
    | Portable
    /// AVX-512F (16 floats per instruction, 32 vector registers): the AVX2 path's design at twice the width, and a
    /// prompt kernel that reads two weight rows against eight activation rows at a time.
    | Avx512

/// A row-major weight matrix [Rows, Columns] at Address (native memory that someone else keeps alive), in Dtype.
[<Struct>]
type WeightMatrix =
    { Address: nativeint
      Rows: int
      Columns: int
      Dtype: Dtype }

    /// Bytes from one row to the next.
    member this.RowBytes = nativeint this.Columns * nativeint this.Dtype.Bytes

/// Where a tensor's elements are, for kernels that read them in place.
[<RequireQualifiedAccess>]
module TensorMemory =
    [<DllImport("LibTorchSharp", CallingConvention = CallingConvention.Cdecl)>]
    extern nativeint private THSTensor_data(nativeint handle)

    /// The address of a CPU tensor's first element (its storage offset included). Valid while the tensor's storage
    /// lives: keep a handle to it.
    let address (tensor: TorchSharp.torch.Tensor) =
        if isNull tensor then nullArg "tensor"
        if tensor.device_type <> TorchSharp.DeviceType.CPU then
            Gpt.Errors.fail "kernels read CPU tensors, found one on %O" tensor.device
        THSTensor_data tensor.Handle

    /// A contiguous 2-D CPU tensor of float32, float16 or bfloat16 as a WeightMatrix (a view: keep the tensor alive
    /// while it is used).
    let matrix (tensor: TorchSharp.torch.Tensor) : WeightMatrix =
        if isNull tensor then nullArg "tensor"
        if tensor.dim () <> 2L || not (tensor.is_contiguous ()) then
            Gpt.Errors.fail "a weight matrix must be a contiguous 2-D tensor, found shape %s" (Gpt.Errors.shapeText tensor.shape)
        let dtype =
            match tensor.dtype with
            | TorchSharp.torch.ScalarType.Float32 -> Dtype.Float32
            | TorchSharp.torch.ScalarType.Float16 -> Dtype.Float16
            | TorchSharp.torch.ScalarType.BFloat16 -> Dtype.BFloat16
            | other -> Gpt.Errors.fail "weights must be float32, float16 or bfloat16, found %O" other
        { Address = address tensor; Rows = int tensor.shape[0]; Columns = int tensor.shape[1]; Dtype = dtype }

/// What a product does with each result z = W x + b: store it, add it to what is there (a residual connection), or
/// store GELU(z) (the feed-forward expansion).
[<RequireQualifiedAccess>]
type Epilogue =
    | Store
    | Add
    | Gelu

/// The scalar pieces every path shares.
[<RequireQualifiedAccess>]
module internal Scalar =
    /// A float16 (IEEE binary16) bit pattern as float32: exact.
    let inline half (bits: uint16) = float32 (BitConverter.UInt16BitsToHalf bits)

    /// A bfloat16 bit pattern as float32: exact (bfloat16 is float32's upper half).
    let inline bfloat (bits: uint16) = BitConverter.Int32BitsToSingle(int bits <<< 16)

    /// Element `index` of a row of weights at `row`, as float32.
    let inline element (dtype: Dtype) (row: nativeint) (index: int) =
        match dtype with
        | Dtype.Float32 -> NativePtr.get (NativePtr.ofNativeInt<float32> row) index
        | Dtype.Float16 -> half (NativePtr.get (NativePtr.ofNativeInt<uint16> row) index)
        | Dtype.BFloat16 -> bfloat (NativePtr.get (NativePtr.ofNativeInt<uint16> row) index)

    /// GPT-2's tanh-approximate GELU of 8 values: 0.5 z (1 + tanh u) with u = √(2/π) (z + 0.044715 z³), written as
    /// z / (1 + e^(-2u)), the same function (1 + tanh u = 2 / (1 + e^(-2u))), so that it needs one vector exponential
    /// (Vector256.Exp) instead of a scalar MathF.Tanh per value. Why: the scalar tanh took ~120 µs of each
    /// 3072-row expansion of gpt2-small on one thread (~40 ns a value), as long as reading its 4.7 MB of float16
    /// weights. Large |u| saturates as tanh does: e^(-2u) → ∞ gives ±0, e^(-2u) → 0 gives z.
    let inline geluVector (z: Vector256<float32>) =
        let inner = Vector256.Create(0.7978845608028654f) * (z + Vector256.Create(0.044715f) * z * z * z)
        z / (Vector256<float32>.One + Vector256.Exp(Vector256.Create(-2.0f) * inner))

    /// geluVector over count values at `values`, in place; a last partial group goes through the same vector
    /// computation (padded), so a value's result does not depend on where it lies.
    let geluInPlace (values: nativeptr<float32>) (count: int) =
        let mutable i = 0
        while i + 8 <= count do
            let at = NativePtr.add values i
            Vector256.Store(geluVector (Vector256.Load at), at)
            i <- i + 8
        if i < count then
            let padded = NativePtr.stackalloc<float32> 8
            for j in 0 .. 7 do
                NativePtr.set padded j (if i + j < count then NativePtr.get values (i + j) else 0.0f)
            Vector256.Store(geluVector (Vector256.Load padded), padded)
            for j in 0 .. count - i - 1 do
                NativePtr.set values (i + j) (NativePtr.get padded j)

    /// GPT-2's tanh-approximate GELU of one value (geluVector's computation).
    let gelu (z: float32) =
        let padded = NativePtr.stackalloc<float32> 1
        NativePtr.write padded z
        geluInPlace padded 1
        NativePtr.read padded

/// The AVX2 + FMA kernels for float32 weights: dot products of one weight row with one activation row (generation) or
/// with 8 (a prompt or a batch), 8 columns per instruction. One row at a time, front to back: each thread then reads its weights as one
/// sequential stream, which the hardware prefetchers follow. Measured on this project's machine (one thread, all of
/// gpt2-small's matrices): interleaving 4 rows (4 short streams of 1.5–3 KB) read 16.8 GB/s of float32 and 12.9 of
/// bfloat16; one row at a time with 4 accumulators, 23.3 and 22.4.
module internal Avx2Kernels =
    /// float32 weights: one load.
    let inline loadF32 (address: nativeint) = Avx.LoadVector256(NativePtr.ofNativeInt<float32> address)

    let inline scalarF32 (w: nativeint) (k: int) = NativePtr.get (NativePtr.ofNativeInt<float32> w) k
    let inline scalarF16 (w: nativeint) (k: int) = Scalar.half (NativePtr.get (NativePtr.ofNativeInt<uint16> w) k)
    let inline scalarBF16 (w: nativeint) (k: int) = Scalar.bfloat (NativePtr.get (NativePtr.ofNativeInt<uint16> w) k)

    /// float16 bits in a float32's upper half, arithmetically shifted right by 3, masked with this: sign at bit 31,
    /// exponent and mantissa at float32's places (bias 15 instead of 127).
    let f16Mask () = Vector256.Create(0x8FFFE000)

    let inline private x8 (x: nativeint) (k: int) = Avx.LoadVector256(NativePtr.add (NativePtr.ofNativeInt<float32> x) k)
    let inline private xAt (x: nativeint) (k: int) = NativePtr.get (NativePtr.ofNativeInt<float32> x) k

    /// The dot product of one weight row with one activation row: 4 independent sums over 32 columns per step.
    let inline dotRow
        ([<InlineIfLambda>] load: nativeint -> Vector256<float32>)
        ([<InlineIfLambda>] scalar: nativeint -> int -> float32)
        (bytes: int) (w: nativeint) (x: nativeint) (columns: int) =
        let step = nativeint (8 * bytes)
        let mutable a0 = Vector256<float32>.Zero
        let mutable a1 = Vector256<float32>.Zero
        let mutable a2 = Vector256<float32>.Zero
        let mutable a3 = Vector256<float32>.Zero
        let mutable k = 0
        while k + 32 <= columns do
            let at = w + nativeint (k * bytes)
            a0 <- Fma.MultiplyAdd(load at, x8 x k, a0)
            a1 <- Fma.MultiplyAdd(load (at + step), x8 x (k + 8), a1)
            a2 <- Fma.MultiplyAdd(load (at + 2n * step), x8 x (k + 16), a2)
            a3 <- Fma.MultiplyAdd(load (at + 3n * step), x8 x (k + 24), a3)
            k <- k + 32
        while k + 8 <= columns do
            a0 <- Fma.MultiplyAdd(load (w + nativeint (k * bytes)), x8 x k, a0)
            k <- k + 8
        let mutable sum = Vector256.Sum((a0 + a1) + (a2 + a3))
        while k < columns do
            sum <- sum + scalar w k * xAt x k
            k <- k + 1
        sum

    /// Dot products of one weight row with 8 activation rows x0 .. x7; each weight vector, loaded and widened once,
    /// serves 8 tokens, and 8 independent sums keep both FMA units busy. Results to results[0..7].
    let inline dotRow8
        ([<InlineIfLambda>] load: nativeint -> Vector256<float32>)
        ([<InlineIfLambda>] scalar: nativeint -> int -> float32)
        (bytes: int) (w: nativeint) (x0: nativeint) (x1: nativeint) (x2: nativeint) (x3: nativeint)
        (x4: nativeint) (x5: nativeint) (x6: nativeint) (x7: nativeint) (columns: int) (results: nativeptr<float32>) =
        let mutable a0 = Vector256<float32>.Zero
        let mutable a1 = Vector256<float32>.Zero
        let mutable a2 = Vector256<float32>.Zero
        let mutable a3 = Vector256<float32>.Zero
        let mutable a4 = Vector256<float32>.Zero
        let mutable a5 = Vector256<float32>.Zero
        let mutable a6 = Vector256<float32>.Zero
        let mutable a7 = Vector256<float32>.Zero
        let mutable k = 0
        while k + 8 <= columns do
            let v = load (w + nativeint (k * bytes))
            a0 <- Fma.MultiplyAdd(v, x8 x0 k, a0)
            a1 <- Fma.MultiplyAdd(v, x8 x1 k, a1)
            a2 <- Fma.MultiplyAdd(v, x8 x2 k, a2)
            a3 <- Fma.MultiplyAdd(v, x8 x3 k, a3)
            a4 <- Fma.MultiplyAdd(v, x8 x4 k, a4)
            a5 <- Fma.MultiplyAdd(v, x8 x5 k, a5)
            a6 <- Fma.MultiplyAdd(v, x8 x6 k, a6)
            a7 <- Fma.MultiplyAdd(v, x8 x7 k, a7)
            k <- k + 8
        let mutable s0 = Vector256.Sum a0
        let mutable s1 = Vector256.Sum a1
        let mutable s2 = Vector256.Sum a2
        let mutable s3 = Vector256.Sum a3
        let mutable s4 = Vector256.Sum a4
        let mutable s5 = Vector256.Sum a5
        let mutable s6 = Vector256.Sum a6
        let mutable s7 = Vector256.Sum a7
        while k < columns do
            let u = scalar w k
            s0 <- s0 + u * xAt x0 k
            s1 <- s1 + u * xAt x1 k
            s2 <- s2 + u * xAt x2 k
            s3 <- s3 + u * xAt x3 k
            s4 <- s4 + u * xAt x4 k
            s5 <- s5 + u * xAt x5 k
            s6 <- s6 + u * xAt x6 k
            s7 <- s7 + u * xAt x7 k
            k <- k + 1
        NativePtr.set results 0 s0
        NativePtr.set results 1 s1
        NativePtr.set results 2 s2
        NativePtr.set results 3 s3
        NativePtr.set results 4 s4
        NativePtr.set results 5 s5
        NativePtr.set results 6 s6
        NativePtr.set results 7 s7

/// The AVX2 kernels for 16-bit weights, two instructions per 16 weights cheaper than widening 8 at a time: one 32-byte
/// load of 16 weights, then vpunpcklwd / vpunpckhwd with zero put weights 0–3, 8–11 and 4–7, 12–15 into the upper
/// halves of two float32 vectors. The activations are staged once per product in that order (MatVecJob.Set), so the
/// weights need no shuffle back. bfloat16 is then exact as it stands; float16 needs its exponent moved (an arithmetic
/// shift and a mask: f16Mask) and comes out 2^-112 too small, which the staging folds into the activations
/// (× 2^56) and the sum (× 2^56): powers of two, so the products and sums are those of the plain computation.
module internal Avx2Kernels16 =
    /// The order activations are staged in, per 16 columns.
    let order = [| 0; 1; 2; 3; 8; 9; 10; 11; 4; 5; 6; 7; 12; 13; 14; 15 |]

    /// 2^56: the staging scale of float16 products (applied to the activations and again to the sum).
    let halfScale = BitConverter.Int32BitsToSingle((56 + 127) <<< 23)

    let inline bfloat (upper: Vector256<int>) = upper.AsSingle()

    let inline half (mask: Vector256<int>) (upper: Vector256<int>) = Avx2.And(Avx2.ShiftRightArithmetic(upper, 3uy), mask).AsSingle()

    let inline private load16 (address: nativeint) = Avx.LoadVector256(NativePtr.ofNativeInt<int16> address)
    let inline private low (v: Vector256<int16>) = Avx2.UnpackLow(Vector256<int16>.Zero, v).AsInt32()
    let inline private high (v: Vector256<int16>) = Avx2.UnpackHigh(Vector256<int16>.Zero, v).AsInt32()
    let inline private x8 (x: nativeint) (k: int) = Avx.LoadVector256(NativePtr.add (NativePtr.ofNativeInt<float32> x) k)
    let inline private xAt (x: nativeint) (k: int) = NativePtr.get (NativePtr.ofNativeInt<float32> x) k

    /// Columns the vector loop covers (whole blocks of 16); the rest go through `scalar` with the plain activations.
    let inline vectorColumns (columns: int) = columns &&& ~~~15

    /// One weight row (16-bit, at w) with one staged activation row xs (plain: x): 4 sums over 32 columns per step.
    let inline dotRow
        ([<InlineIfLambda>] fix: Vector256<int> -> Vector256<float32>)
        ([<InlineIfLambda>] scalar: nativeint -> int -> float32)
        (w: nativeint) (xs: nativeint) (x: nativeint) (columns: int) (sumScale: float32) =
        let blocks = vectorColumns columns
        let mutable a0 = Vector256<float32>.Zero
        let mutable a1 = Vector256<float32>.Zero
        let mutable a2 = Vector256<float32>.Zero
        let mutable a3 = Vector256<float32>.Zero
        let mutable k = 0
        while k + 32 <= blocks do
            let v0 = load16 (w + nativeint (k * 2))
            let v1 = load16 (w + nativeint (k * 2 + 32))
            a0 <- Fma.MultiplyAdd(fix (low v0), x8 xs k, a0)
            a1 <- Fma.MultiplyAdd(fix (high v0), x8 xs (k + 8), a1)
            a2 <- Fma.MultiplyAdd(fix (low v1), x8 xs (k + 16), a2)
            a3 <- Fma.MultiplyAdd(fix (high v1), x8 xs (k + 24), a3)
            k <- k + 32
        if k < blocks then
            let v0 = load16 (w + nativeint (k * 2))
            a0 <- Fma.MultiplyAdd(fix (low v0), x8 xs k, a0)
            a1 <- Fma.MultiplyAdd(fix (high v0), x8 xs (k + 8), a1)
            k <- k + 16
        let mutable sum = Vector256.Sum((a0 + a1) + (a2 + a3)) * sumScale
        while k < columns do
            sum <- sum + scalar w k * xAt x k
            k <- k + 1
        sum

    /// One weight row with 8 staged activation rows (xs + i·stagedBytes; plain: x0 .. x7): each widened pair of
    /// vectors serves 8 tokens.
    let inline dotRow8
        ([<InlineIfLambda>] fix: Vector256<int> -> Vector256<float32>)
        ([<InlineIfLambda>] scalar: nativeint -> int -> float32)
        (w: nativeint) (s0: nativeint) (s1: nativeint) (s2: nativeint) (s3: nativeint)
        (s4: nativeint) (s5: nativeint) (s6: nativeint) (s7: nativeint)
        (x0: nativeint) (x1: nativeint) (x2: nativeint) (x3: nativeint)
        (x4: nativeint) (x5: nativeint) (x6: nativeint) (x7: nativeint)
        (columns: int) (sumScale: float32) (results: nativeptr<float32>) =
        let blocks = vectorColumns columns
        let mutable a0 = Vector256<float32>.Zero
        let mutable a1 = Vector256<float32>.Zero
        let mutable a2 = Vector256<float32>.Zero
        let mutable a3 = Vector256<float32>.Zero
        let mutable a4 = Vector256<float32>.Zero
        let mutable a5 = Vector256<float32>.Zero
        let mutable a6 = Vector256<float32>.Zero
        let mutable a7 = Vector256<float32>.Zero
        let mutable k = 0
        while k < blocks do
            let v = load16 (w + nativeint (k * 2))
            let lo = fix (low v)
            let hi = fix (high v)
            let k8 = k + 8
            a0 <- Fma.MultiplyAdd(hi, x8 s0 k8, Fma.MultiplyAdd(lo, x8 s0 k, a0))
            a1 <- Fma.MultiplyAdd(hi, x8 s1 k8, Fma.MultiplyAdd(lo, x8 s1 k, a1))
            a2 <- Fma.MultiplyAdd(hi, x8 s2 k8, Fma.MultiplyAdd(lo, x8 s2 k, a2))
            a3 <- Fma.MultiplyAdd(hi, x8 s3 k8, Fma.MultiplyAdd(lo, x8 s3 k, a3))
            a4 <- Fma.MultiplyAdd(hi, x8 s4 k8, Fma.MultiplyAdd(lo, x8 s4 k, a4))
            a5 <- Fma.MultiplyAdd(hi, x8 s5 k8, Fma.MultiplyAdd(lo, x8 s5 k, a5))
            a6 <- Fma.MultiplyAdd(hi, x8 s6 k8, Fma.MultiplyAdd(lo, x8 s6 k, a6))
            a7 <- Fma.MultiplyAdd(hi, x8 s7 k8, Fma.MultiplyAdd(lo, x8 s7 k, a7))
            k <- k + 16
        let mutable r0 = Vector256.Sum a0 * sumScale
        let mutable r1 = Vector256.Sum a1 * sumScale
        let mutable r2 = Vector256.Sum a2 * sumScale
        let mutable r3 = Vector256.Sum a3 * sumScale
        let mutable r4 = Vector256.Sum a4 * sumScale
        let mutable r5 = Vector256.Sum a5 * sumScale
        let mutable r6 = Vector256.Sum a6 * sumScale
        let mutable r7 = Vector256.Sum a7 * sumScale
        while k < columns do
            let u = scalar w k
            r0 <- r0 + u * xAt x0 k
            r1 <- r1 + u * xAt x1 k
            r2 <- r2 + u * xAt x2 k
            r3 <- r3 + u * xAt x3 k
            r4 <- r4 + u * xAt x4 k
            r5 <- r5 + u * xAt x5 k
            r6 <- r6 + u * xAt x6 k
            r7 <- r7 + u * xAt x7 k
            k <- k + 1
        NativePtr.set results 0 r0
        NativePtr.set results 1 r1
        NativePtr.set results 2 r2
        NativePtr.set results 3 r3
        NativePtr.set results 4 r4
        NativePtr.set results 5 r5
        NativePtr.set results 6 r6
        NativePtr.set results 7 r7

/// The AVX-512 kernels: the weights at 16 lanes per instruction. 16-bit weights are widened in order, so the
/// activations need no reordering: bfloat16 by a zero-extending move (vpmovzxwd) and a shift into the upper halves of
/// float32 lanes, read against the activations as they are; float16 by a sign-extending move, a shift and a mask
/// (the AVX2 path's exponent trick), against activations staged × 2^56. Prompts and batches go two
/// weight rows against eight activation rows at a time: 16 sums in registers, each activation vector loaded once for
/// two rows and each weight vector once for eight tokens, so the kernel is bound by multiply-adds, not loads.
module internal Avx512Kernels =
    let inline loadF32 (address: nativeint) = Avx512F.LoadVector512(NativePtr.ofNativeInt<float32> address)

    /// 16 bfloat16 / float16 weights in the upper halves of 16 int32 lanes.
    let inline upper16 (address: nativeint) =
        Avx512F.ShiftLeftLogical(Avx512F.ConvertToVector512Int32(Avx.LoadVector256(NativePtr.ofNativeInt<uint16> address)), 16uy)

    let inline bfloat (upper: Vector512<int>) = upper.AsSingle()

    /// 16 float16 weights in float32 lanes, 2^-112 too small (Avx2Kernels16's trick, one instruction shorter): the
    /// sign-extending move puts copies of the sign above the exponent, a shift by 13 moves exponent and mantissa to
    /// float32's places, and the mask keeps one sign bit.
    let inline half (mask: Vector512<int>) (address: nativeint) =
        Avx512F.And(Avx512F.ShiftLeftLogical(Avx512F.ConvertToVector512Int32(Avx.LoadVector256(NativePtr.ofNativeInt<int16> address)), 13uy), mask).AsSingle()

    let f16Mask () = Vector512.Create(0x8FFFE000)

    let inline private x16 (x: nativeint) (k: int) = Avx512F.LoadVector512(NativePtr.add (NativePtr.ofNativeInt<float32> x) k)
    let inline private xAt (x: nativeint) (k: int) = NativePtr.get (NativePtr.ofNativeInt<float32> x) k
    let inline private fma (a: Vector512<float32>) (b: Vector512<float32>) (c: Vector512<float32>) = Avx512F.FusedMultiplyAdd(a, b, c)

    /// One weight row (16 columns per `load`, `bytes` per element) with one activation row xs (plain: x, for the
    /// scalar tail): 4 independent sums over 64 columns per step.
    let inline dotRow
        ([<InlineIfLambda>] load: nativeint -> Vector512<float32>)
        ([<InlineIfLambda>] scalar: nativeint -> int -> float32)
        (bytes: int) (w: nativeint) (xs: nativeint) (x: nativeint) (columns: int) (sumScale: float32) =
        let step = nativeint (16 * bytes)
        let mutable a0 = Vector512<float32>.Zero
        let mutable a1 = Vector512<float32>.Zero
        let mutable a2 = Vector512<float32>.Zero
        let mutable a3 = Vector512<float32>.Zero
        let mutable k = 0
        while k + 64 <= columns do
            let at = w + nativeint (k * bytes)
            // Every cache line of this step's weights, 4 KB ahead (a prefetch never faults), non-temporal: the weights
            // are read once per token, and a plain prefetch would also leave them in the outer caches, pushing out
            // what the step reads again (activations, the KV cache). Measured with scripts/matvec-bench.fsx,
            // alternating, on this machine in a slow spell: a float32 gpt2-small step's products 15.0–15.6 ms
            // without, 10.6–11.5 with (2 KB ahead: 10.6–11.9); bfloat16 5.98–6.19 against 5.58–5.92 (the hardware
            // prefetchers alone were not far enough ahead when memory was slow). Then whole decoder steps, the
            // kinds alternating, 10 rounds of 64 tokens, medians: float32 100.8 tokens/s with a plain prefetch
            // (prefetcht0), 106.2 non-temporal (prefetchnta), 104.6 none, 101.4 prefetcht2; bfloat16 164.4, 168.7, 155.2,
            // 159.2; again: float32 101.8 / 102.3, bfloat16 162.5 / 167.6 (plain / non-temporal).
            for line in 0 .. bytes - 1 do
                Sse.PrefetchNonTemporal(NativePtr.toVoidPtr (NativePtr.ofNativeInt<byte> (at + 4096n + nativeint (line * 64))))
            a0 <- fma (load at) (x16 xs k) a0
            a1 <- fma (load (at + step)) (x16 xs (k + 16)) a1
            a2 <- fma (load (at + 2n * step)) (x16 xs (k + 32)) a2
            a3 <- fma (load (at + 3n * step)) (x16 xs (k + 48)) a3
            k <- k + 64
        while k + 16 <= columns do
            a0 <- fma (load (w + nativeint (k * bytes))) (x16 xs k) a0
            k <- k + 16
        let mutable sum = Vector512.Sum((a0 + a1) + (a2 + a3)) * sumScale
        while k < columns do
            sum <- sum + scalar w k * xAt x k
            k <- k + 1
        sum

    /// Two weight rows (w0, w1) with 8 activation rows (staged s0 .. s7; plain x0 .. x7 for the scalar tail): the 16
    /// dot products to results[r · 8 + t].
    let inline dot2x8
        ([<InlineIfLambda>] load: nativeint -> Vector512<float32>)
        ([<InlineIfLambda>] scalar: nativeint -> int -> float32)
        (bytes: int) (w0: nativeint) (w1: nativeint)
        (s0: nativeint) (s1: nativeint) (s2: nativeint) (s3: nativeint) (s4: nativeint) (s5: nativeint) (s6: nativeint) (s7: nativeint)
        (x0: nativeint) (x1: nativeint) (x2: nativeint) (x3: nativeint) (x4: nativeint) (x5: nativeint) (x6: nativeint) (x7: nativeint)
        (columns: int) (sumScale: float32) (results: nativeptr<float32>) =
        // The plain activation rows of the scalar tail, on the stack. Also why the kernel is compiled fully optimised
        // at once: .NET's tiered JIT compiles a method with loops quickly and poorly first, unless it allocates on the
        // stack (F# cannot mark a method AggressiveOptimization); a prompt step does not wait for tier 1.
        let plain = NativePtr.stackalloc<nativeint> 8
        let mutable a0 = Vector512<float32>.Zero
        let mutable a1 = Vector512<float32>.Zero
        let mutable a2 = Vector512<float32>.Zero
        let mutable a3 = Vector512<float32>.Zero
        let mutable a4 = Vector512<float32>.Zero
        let mutable a5 = Vector512<float32>.Zero
        let mutable a6 = Vector512<float32>.Zero
        let mutable a7 = Vector512<float32>.Zero
        let mutable b0 = Vector512<float32>.Zero
        let mutable b1 = Vector512<float32>.Zero
        let mutable b2 = Vector512<float32>.Zero
        let mutable b3 = Vector512<float32>.Zero
        let mutable b4 = Vector512<float32>.Zero
        let mutable b5 = Vector512<float32>.Zero
        let mutable b6 = Vector512<float32>.Zero
        let mutable b7 = Vector512<float32>.Zero
        let mutable k = 0
        while k + 16 <= columns do
            let offset = nativeint (k * bytes)
            // 1 KB ahead in both rows: an 8-token prompt step of gpt2-small took ~10 % less (a prefetch never faults)
            Sse.Prefetch0(NativePtr.toVoidPtr (NativePtr.ofNativeInt<byte> (w0 + offset + 1024n)))
            Sse.Prefetch0(NativePtr.toVoidPtr (NativePtr.ofNativeInt<byte> (w1 + offset + 1024n)))
            let u = load (w0 + offset)
            let v = load (w1 + offset)
            let x = x16 s0 k
            a0 <- fma u x a0
            b0 <- fma v x b0
            let x = x16 s1 k
            a1 <- fma u x a1
            b1 <- fma v x b1
            let x = x16 s2 k
            a2 <- fma u x a2
            b2 <- fma v x b2
            let x = x16 s3 k
            a3 <- fma u x a3
            b3 <- fma v x b3
            let x = x16 s4 k
            a4 <- fma u x a4
            b4 <- fma v x b4
            let x = x16 s5 k
            a5 <- fma u x a5
            b5 <- fma v x b5
            let x = x16 s6 k
            a6 <- fma u x a6
            b6 <- fma v x b6
            let x = x16 s7 k
            a7 <- fma u x a7
            b7 <- fma v x b7
            k <- k + 16
        let vectorEnd = k
        NativePtr.set results 0 (Vector512.Sum a0 * sumScale)
        NativePtr.set results 1 (Vector512.Sum a1 * sumScale)
        NativePtr.set results 2 (Vector512.Sum a2 * sumScale)
        NativePtr.set results 3 (Vector512.Sum a3 * sumScale)
        NativePtr.set results 4 (Vector512.Sum a4 * sumScale)
        NativePtr.set results 5 (Vector512.Sum a5 * sumScale)
        NativePtr.set results 6 (Vector512.Sum a6 * sumScale)
        NativePtr.set results 7 (Vector512.Sum a7 * sumScale)
        NativePtr.set results 8 (Vector512.Sum b0 * sumScale)
        NativePtr.set results 9 (Vector512.Sum b1 * sumScale)
        NativePtr.set results 10 (Vector512.Sum b2 * sumScale)
        NativePtr.set results 11 (Vector512.Sum b3 * sumScale)
        NativePtr.set results 12 (Vector512.Sum b4 * sumScale)
        NativePtr.set results 13 (Vector512.Sum b5 * sumScale)
        NativePtr.set results 14 (Vector512.Sum b6 * sumScale)
        NativePtr.set results 15 (Vector512.Sum b7 * sumScale)
        if vectorEnd < columns then
            NativePtr.set plain 0 x0
            NativePtr.set plain 1 x1
            NativePtr.set plain 2 x2
            NativePtr.set plain 3 x3
            NativePtr.set plain 4 x4
            NativePtr.set plain 5 x5
            NativePtr.set plain 6 x6
            NativePtr.set plain 7 x7
            for t in 0 .. 7 do
                for j in vectorEnd .. columns - 1 do
                    let xj = xAt (NativePtr.get plain t) j
                    NativePtr.set results t (NativePtr.get results t + scalar w0 j * xj)
                    NativePtr.set results (8 + t) (NativePtr.get results (8 + t) + scalar w1 j * xj)

    /// dot2x8 and dotRow for each weight type, each its own (small) method: inlined into the row loops, the kernels'
    /// 16 accumulators were kept on the stack instead of in registers (the JIT stops tracking locals in large methods).
    [<MethodImpl(MethodImplOptions.NoInlining)>]
    let dot2x8F32 w0 w1 s0 s1 s2 s3 s4 s5 s6 s7 x0 x1 x2 x3 x4 x5 x6 x7 columns results =
        dot2x8 loadF32 Avx2Kernels.scalarF32 4 w0 w1 s0 s1 s2 s3 s4 s5 s6 s7 x0 x1 x2 x3 x4 x5 x6 x7 columns 1.0f results

    [<MethodImpl(MethodImplOptions.NoInlining)>]
    let dot2x8BF16 w0 w1 s0 s1 s2 s3 s4 s5 s6 s7 x0 x1 x2 x3 x4 x5 x6 x7 columns results =
        dot2x8 (fun a -> bfloat (upper16 a)) Avx2Kernels.scalarBF16 2 w0 w1 s0 s1 s2 s3 s4 s5 s6 s7 x0 x1 x2 x3 x4 x5 x6 x7 columns 1.0f results

    [<MethodImpl(MethodImplOptions.NoInlining)>]
    let dot2x8F16 w0 w1 s0 s1 s2 s3 s4 s5 s6 s7 x0 x1 x2 x3 x4 x5 x6 x7 columns results =
        let mask = f16Mask ()
        dot2x8 (fun a -> half mask a) Avx2Kernels.scalarF16 2 w0 w1 s0 s1 s2 s3 s4 s5 s6 s7 x0 x1 x2 x3 x4 x5 x6 x7 columns Avx2Kernels16.halfScale results

    let inline dotRowF32 w xs x columns = dotRow loadF32 Avx2Kernels.scalarF32 4 w xs x columns 1.0f

    let inline dotRowBF16 w xs x columns = dotRow (fun a -> bfloat (upper16 a)) Avx2Kernels.scalarBF16 2 w xs x columns 1.0f

    let inline dotRowF16 w xs x columns =
        let mask = f16Mask ()
        dotRow (fun a -> half mask a) Avx2Kernels.scalarF16 2 w xs x columns Avx2Kernels16.halfScale

/// The portable kernel: one weight row against one activation row with System.Numerics.Vector (whatever width the
/// processor has); 16-bit weights are widened with the same bit operations as the AVX2 path.
module internal PortableKernels =
    let private f16Mask = Vector<int>(0x8FFFE000)
    let private f16Scale = Vector<float32>(BitConverter.Int32BitsToSingle((112 + 127) <<< 23))

    /// Widened halves of a vector of 16-bit weights: each value moved into the upper 16 bits of a 32-bit lane.
    let inline private upperHalves (address: nativeint) =
        let raw = NativePtr.read (NativePtr.ofNativeInt<Vector<uint16>> address)
        let mutable low = Vector<uint32>.Zero
        let mutable high = Vector<uint32>.Zero
        Vector.Widen(raw, &low, &high)
        Vector.AsVectorInt32(Vector.ShiftLeft(low, 16)), Vector.AsVectorInt32(Vector.ShiftLeft(high, 16))

    let inline private fromHalf (upper: Vector<int>) =
        Vector.AsVectorSingle(Vector.BitwiseAnd(Vector.ShiftRightArithmetic(upper, 3), f16Mask)) * f16Scale

    let inline private xAt (x: nativeint) (k: int) = NativePtr.read (NativePtr.ofNativeInt<Vector<float32>> (x + nativeint (k * 4)))

    /// The dot product of a weight row of `columns` elements of `dtype` at `w` with float32 activations at `x`.
    let dot (dtype: Dtype) (w: nativeint) (x: nativeint) (columns: int) =
        let width = Vector<float32>.Count
        let mutable sum = Vector<float32>.Zero
        let mutable k = 0
        match dtype with
        | Dtype.Float32 ->
            while k + width <= columns do
                sum <- sum + NativePtr.read (NativePtr.ofNativeInt<Vector<float32>> (w + nativeint (k * 4))) * xAt x k
                k <- k + width
        | Dtype.Float16
        | Dtype.BFloat16 ->
            let half = dtype = Dtype.Float16
            while k + 2 * width <= columns do
                let low, high = upperHalves (w + nativeint (k * 2))
                let low, high =
                    if half then fromHalf low, fromHalf high else Vector.AsVectorSingle low, Vector.AsVectorSingle high
                sum <- sum + low * xAt x k + high * xAt x (k + width)
                k <- k + 2 * width
        let mutable total = Vector.Sum sum
        while k < columns do
            total <- total + Scalar.element dtype w k * NativePtr.get (NativePtr.ofNativeInt<float32> x) k
            k <- k + 1
        total

/// One product's parameters: for t < Tokens and r < Matrix.Rows, z = Σ_k W[r, k] · X[t·XStride + k] + Bias[r] goes to
/// Y[t·YStride + r] as Epilogue says.
[<Struct>]
type internal Product =
    { Matrix: WeightMatrix
      Bias: nativeint
      X: nativeint
      XStride: int
      Tokens: int
      Y: nativeint
      YStride: int
      Epilogue: Epilogue
      RowsPerChunk: int
      /// Chunks of RowsPerChunk rows before the tail; the tail (the last rows, at most two big chunks' worth) goes in
      /// chunks of TailRows.
      BigChunks: int
      TailRows: int
      /// 16-bit weights on the AVX2 path: the activations staged in Avx2Kernels16.order (float16: × 2^56), Columns
      /// floats per token; float16 on the AVX-512 path: staged in order, × 2^56; otherwise 0n (read in place).
      Staged: nativeint }

/// The loops around the kernels: rows first .. last - 1 of a product, the raw dot products (no bias, no epilogue)
/// into out[(r - first) · Tokens + t]; then `finish` applies bias and epilogue.
module internal Products =
    let inline row (p: Product) (index: int) = p.Matrix.Address + nativeint index * p.Matrix.RowBytes
    let inline token (p: Product) (index: int) = p.X + nativeint (index * p.XStride * 4)

    let inline private rows
        ([<InlineIfLambda>] load: nativeint -> Vector256<float32>)
        ([<InlineIfLambda>] scalar: nativeint -> int -> float32)
        (p: Product) (first: int) (last: int) (out: nativeptr<float32>) =
        let bytes = p.Matrix.Dtype.Bytes
        let columns = p.Matrix.Columns
        let tokens = p.Tokens
        if tokens = 1 then
            let x = p.X
            for r in first .. last - 1 do
                NativePtr.set out (r - first) (Avx2Kernels.dotRow load scalar bytes (row p r) x columns)
        else
            let results = NativePtr.stackalloc<float32> 8
            for r in first .. last - 1 do
                let w = row p r
                let mutable t = 0
                while t < tokens do
                    let count = min 8 (tokens - t)
                    // a last group of fewer than 8 tokens repeats its last token; the repeats are not stored
                    let at i = token p (t + min i (count - 1))
                    Avx2Kernels.dotRow8 load scalar bytes w (at 0) (at 1) (at 2) (at 3) (at 4) (at 5) (at 6) (at 7) columns results
                    for i in 0 .. count - 1 do
                        NativePtr.set out ((r - first) * tokens + t + i) (NativePtr.get results i)
                    t <- t + 8

    let computeF32 (p: Product) (first: int) (last: int) (out: nativeptr<float32>) =
        rows Avx2Kernels.loadF32 Avx2Kernels.scalarF32 p first last out

    /// 16-bit weights through the staged activations (Avx2Kernels16).
    let inline private rows16
        ([<InlineIfLambda>] fix: Vector256<int> -> Vector256<float32>)
        ([<InlineIfLambda>] scalar: nativeint -> int -> float32)
        (sumScale: float32) (p: Product) (first: int) (last: int) (out: nativeptr<float32>) =
        let columns = p.Matrix.Columns
        let tokens = p.Tokens
        let staged (index: int) = p.Staged + nativeint (index * columns * 4)
        if tokens = 1 then
            let xs, x = p.Staged, p.X
            for r in first .. last - 1 do
                NativePtr.set out (r - first) (Avx2Kernels16.dotRow fix scalar (row p r) xs x columns sumScale)
        else
            let results = NativePtr.stackalloc<float32> 8
            for r in first .. last - 1 do
                let w = row p r
                let mutable t = 0
                while t < tokens do
                    let count = min 8 (tokens - t)
                    // a last group of fewer than 8 tokens repeats its last token; the repeats are not stored
                    let i0, i1, i2, i3 = t, t + min 1 (count - 1), t + min 2 (count - 1), t + min 3 (count - 1)
                    let i4, i5, i6, i7 = t + min 4 (count - 1), t + min 5 (count - 1), t + min 6 (count - 1), t + min 7 (count - 1)
                    Avx2Kernels16.dotRow8 fix scalar w (staged i0) (staged i1) (staged i2) (staged i3) (staged i4) (staged i5) (staged i6) (staged i7)
                        (token p i0) (token p i1) (token p i2) (token p i3) (token p i4) (token p i5) (token p i6) (token p i7)
                        columns sumScale results
                    for i in 0 .. count - 1 do
                        NativePtr.set out ((r - first) * tokens + t + i) (NativePtr.get results i)
                    t <- t + 8

    let computeBF16 (p: Product) (first: int) (last: int) (out: nativeptr<float32>) =
        rows16 Avx2Kernels16.bfloat Avx2Kernels.scalarBF16 1.0f p first last out

    let computeF16 (p: Product) (first: int) (last: int) (out: nativeptr<float32>) =
        let mask = Avx2Kernels.f16Mask ()
        rows16 (Avx2Kernels16.half mask) Avx2Kernels.scalarF16 Avx2Kernels16.halfScale p first last out

    /// The AVX-512 loops: x is the staged activations for 16-bit weights (identity order, float16 × 2^56), the
    /// plain ones for float32. Rows go in pairs through dot2x8 (a last odd row pairs with itself; its copy is not
    /// stored), so a row's result does not depend on where a chunk starts (chunks hold a multiple of 4 rows).
    let inline private rows512
        ([<InlineIfLambda>] one: nativeint -> nativeint -> nativeint -> int -> float32)
        ([<InlineIfLambda>] eight: nativeint -> nativeint -> nativeint -> nativeint -> nativeint -> nativeint -> nativeint -> nativeint -> nativeint -> nativeint -> nativeint -> nativeint -> nativeint -> nativeint -> nativeint -> nativeint -> nativeint -> nativeint -> int -> nativeptr<float32> -> unit)
        (p: Product) (first: int) (last: int) (out: nativeptr<float32>) =
        let columns = p.Matrix.Columns
        let tokens = p.Tokens
        let staged (index: int) = if p.Staged = 0n then token p index else p.Staged + nativeint (index * columns * 4)
        if tokens = 1 then
            let xs, x = staged 0, p.X
            for r in first .. last - 1 do
                NativePtr.set out (r - first) (one (row p r) xs x columns)
        else
            let results = NativePtr.stackalloc<float32> 16
            let mutable r = first
            while r < last do
                let w0 = row p r
                let pair = r + 1 < last
                let w1 = if pair then row p (r + 1) else w0
                let mutable t = 0
                while t < tokens do
                    let count = min 8 (tokens - t)
                    // a last group of fewer than 8 tokens repeats its last token; the repeats are not stored
                    let i0, i1, i2, i3 = t, t + min 1 (count - 1), t + min 2 (count - 1), t + min 3 (count - 1)
                    let i4, i5, i6, i7 = t + min 4 (count - 1), t + min 5 (count - 1), t + min 6 (count - 1), t + min 7 (count - 1)
                    eight w0 w1 (staged i0) (staged i1) (staged i2) (staged i3) (staged i4) (staged i5) (staged i6) (staged i7)
                        (token p i0) (token p i1) (token p i2) (token p i3) (token p i4) (token p i5) (token p i6) (token p i7)
                        columns results
                    for i in 0 .. count - 1 do
                        NativePtr.set out ((r - first) * tokens + t + i) (NativePtr.get results i)
                        if pair then NativePtr.set out ((r + 1 - first) * tokens + t + i) (NativePtr.get results (8 + i))
                    t <- t + 8
                r <- r + 2

    let compute512F32 (p: Product) (first: int) (last: int) (out: nativeptr<float32>) =
        rows512 Avx512Kernels.dotRowF32 Avx512Kernels.dot2x8F32 p first last out

    let compute512BF16 (p: Product) (first: int) (last: int) (out: nativeptr<float32>) =
        rows512 Avx512Kernels.dotRowBF16 Avx512Kernels.dot2x8BF16 p first last out

    let compute512F16 (p: Product) (first: int) (last: int) (out: nativeptr<float32>) =
        rows512 Avx512Kernels.dotRowF16 Avx512Kernels.dot2x8F16 p first last out

    let computePortable (p: Product) (first: int) (last: int) (out: nativeptr<float32>) =
        for r in first .. last - 1 do
            for t in 0 .. p.Tokens - 1 do
                NativePtr.set out ((r - first) * p.Tokens + t) (PortableKernels.dot p.Matrix.Dtype (row p r) (token p t) p.Matrix.Columns)

    /// The raw dot products of rows first .. last - 1 on a path.
    let compute (path: MatVecPath) (p: Product) (first: int) (last: int) (out: nativeptr<float32>) =
        match path, p.Matrix.Dtype with
        | MatVecPath.Avx2, Dtype.Float32 -> computeF32 p first last out
        | MatVecPath.Avx2, Dtype.BFloat16 -> computeBF16 p first last out
        | MatVecPath.Avx2, Dtype.Float16 -> computeF16 p first last out
        | MatVecPath.Avx512, Dtype.Float32 -> compute512F32 p first last out
        | MatVecPath.Avx512, Dtype.BFloat16 -> compute512BF16 p first last out
        | MatVecPath.Avx512, Dtype.Float16 -> compute512F16 p first last out
        | MatVecPath.Portable, _ -> computePortable p first last out

    /// Bias and epilogue: the value z of row r for token t, finished and written to Y.
    let inline finish (p: Product) (r: int) (t: int) (value: float32) =
        let value = if p.Bias = 0n then value else value + NativePtr.get (NativePtr.ofNativeInt<float32> p.Bias) r
        let target = NativePtr.add (NativePtr.ofNativeInt<float32> p.Y) (t * p.YStride + r)
        match p.Epilogue with
        | Epilogue.Store -> NativePtr.write target value
        | Epilogue.Add -> NativePtr.write target (NativePtr.read target + value)
        | Epilogue.Gelu -> NativePtr.write target (Scalar.gelu value)

    /// Finishes rows first .. last - 1 from their raw dot products (GELU: bias added in place, then GELU over the
    /// whole chunk's values in vectors, then stored).
    let finishAll (p: Product) (first: int) (last: int) (raw: nativeptr<float32>) =
        let tokens = p.Tokens
        match p.Epilogue with
        | Epilogue.Gelu ->
            if p.Bias <> 0n then
                for r in first .. last - 1 do
                    let b = NativePtr.get (NativePtr.ofNativeInt<float32> p.Bias) r
                    for t in 0 .. tokens - 1 do
                        let i = (r - first) * tokens + t
                        NativePtr.set raw i (NativePtr.get raw i + b)
            Scalar.geluInPlace raw ((last - first) * tokens)
            let y = NativePtr.ofNativeInt<float32> p.Y
            for r in first .. last - 1 do
                for t in 0 .. tokens - 1 do
                    NativePtr.set y (t * p.YStride + r) (NativePtr.get raw ((r - first) * tokens + t))
        | _ when tokens = 1 ->
            // one token (generation): the rows lie side by side in y as in raw; vectors. Why: a call per value
            // here took ~10 % of a bfloat16 gpt2-small step (133,000 values a token, ~4 ns each).
            let y = NativePtr.add (NativePtr.ofNativeInt<float32> p.Y) first
            let bias = if p.Bias = 0n then NativePtr.nullPtr else NativePtr.add (NativePtr.ofNativeInt<float32> p.Bias) first
            let add = p.Epilogue = Epilogue.Add
            let count = last - first
            let width = Vector<float32>.Count
            let inline vectorAt (at: nativeptr<float32>) (i: int) = NativePtr.ofNativeInt<Vector<float32>> (NativePtr.toNativeInt (NativePtr.add at i))
            let mutable i = 0
            while i + width <= count do
                let mutable v = NativePtr.read (vectorAt raw i)
                if p.Bias <> 0n then v <- v + NativePtr.read (vectorAt bias i)
                if add then v <- v + NativePtr.read (vectorAt y i)
                NativePtr.write (vectorAt y i) v
                i <- i + width
            while i < count do
                finish p (first + i) 0 (NativePtr.get raw i)
                i <- i + 1
        | _ ->
            for r in first .. last - 1 do
                for t in 0 .. tokens - 1 do
                    finish p r t (NativePtr.get raw ((r - first) * tokens + t))

/// y = W x + b for a block of activation rows (tokens) against a weight matrix in any Dtype, with the output rows
/// shared out over a WorkerPool: the kernel of one-token generation, where every weight is read once per token and
/// the speed is that of memory. One object serves every call (Set, then run it on a pool): no allocation per call.
/// A speculative job (the decoder's) computes each chunk into scratch and writes it out in Commit (ParallelJob): its
/// inputs must stay alive until pool.WaitIdle(); a plain one (the default) writes as it goes.
[<Sealed>]
type MatVecJob(path: MatVecPath, speculative: bool) =
    inherit ParallelJob()
    /// Weight bytes per chunk: an eighth of the matrix, between 64 KB and 1 MB. Why: each chunk costs a few atomic
    /// operations on lines both cores write, and on this machine two threads read all of gpt2-small's matrices at
    /// 28 GB/s in 48 KB chunks, 39 in 256 KB and 43 in 1 MB ones (one thread: 24); chunks of half a matrix leave one
    /// thread idle at the end of each product (16 GB/s).
    static let chunkBytes (matrixBytes: int64) = int (min (1L <<< 20) (max (64L <<< 10) (matrixBytes / 8L)))
    [<ThreadStatic; DefaultValue>]
    static val mutable private raw: Scratch
    let mutable product = Unchecked.defaultof<Product>
    let mutable chunks = 0
    /// The staged activations (16-bit weights). Grown, never shrunk; a replaced buffer is kept until the job is
    /// collected, since a late speculative worker may still read it.
    let mutable stage = 0n
    let mutable stageBytes = 0
    let retired = Collections.Generic.List<nativeint>()

    let stageFor (weights: WeightMatrix) (input: nativeint) (inputStride: int) (tokens: int) =
        let needed = tokens * weights.Columns * 4
        if needed > stageBytes then
            if stage <> 0n then retired.Add stage
            stageBytes <- max needed (2 * stageBytes)
            stage <- NativePtr.toNativeInt (NativePtr.ofVoidPtr<byte> (NativeMemory.AlignedAlloc(unativeint stageBytes, 64un)))
        let scale = if weights.Dtype = Dtype.Float16 then Avx2Kernels16.halfScale else 1.0f
        let columns = weights.Columns
        for t in 0 .. tokens - 1 do
            let source = NativePtr.ofNativeInt<float32> (input + nativeint (t * inputStride * 4))
            let target = NativePtr.ofNativeInt<float32> (stage + nativeint (t * columns * 4))
            if path = MatVecPath.Avx512 then
                // in order (the AVX-512 kernels widen weights in order): the scale alone
                let factor = Vector<float32>(scale)
                let width = Vector<float32>.Count
                let mutable k = 0
                while k + width <= columns do
                    NativePtr.write (NativePtr.ofNativeInt<Vector<float32>> (NativePtr.toNativeInt (NativePtr.add target k)))
                        (factor * NativePtr.read (NativePtr.ofNativeInt<Vector<float32>> (NativePtr.toNativeInt (NativePtr.add source k))))
                    k <- k + width
                while k < columns do
                    NativePtr.set target k (NativePtr.get source k * scale)
                    k <- k + 1
            else
                let blocks = Avx2Kernels16.vectorColumns columns
                let order = Avx2Kernels16.order
                let mutable block = 0
                while block < blocks do
                    for j in 0 .. 15 do
                        NativePtr.set target (block + j) (NativePtr.get source (block + order[j]) * scale)
                    block <- block + 16
        stage

    let range (p: Product) (chunk: int) =
        let start (c: int) = if c <= p.BigChunks then c * p.RowsPerChunk else p.BigChunks * p.RowsPerChunk + (c - p.BigChunks) * p.TailRows
        start chunk, min p.Matrix.Rows (start (chunk + 1))

    new(path: MatVecPath) = MatVecJob(path, false)

    /// The instructions this job uses.
    member _.Path = path

    /// Number of chunks of the product last set.
    member _.Chunks = chunks

    /// Sets the next product: for t < tokens and r < matrix.Rows, z = Σ_k W[r, k] · x[t·xStride + k] + bias[r]
    /// (bias: float32 [Rows], or 0n for none), written to y[t·yStride + r] as the epilogue says. x and y are float32.
    member _.Set(weights: WeightMatrix, biasAddress: nativeint, input: nativeint, inputStride: int, tokenCount: int,
                 output: nativeint, outputStride: int, finishing: Epilogue) =
        if tokenCount < 1 then invalidArg (nameof tokenCount) (sprintf "at least one token, found %d" tokenCount)
        if inputStride < weights.Columns || outputStride < weights.Rows && tokenCount > 1 then
            invalidArg (nameof inputStride) (sprintf "strides %d and %d do not fit a [%d, %d] matrix" inputStride outputStride weights.Rows weights.Columns)
        let rowBytes = int weights.RowBytes
        // An even number of chunks of about chunkBytes, as equal as multiples of 4 rows allow: with two threads, a
        // product of 9 full chunks and a sliver (gpt2-small's float32 c_fc and mlp.c_proj at 1 MB) left one thread
        // reading a whole chunk alone at its end.
        let matrixBytes = int64 weights.Rows * int64 rowBytes
        let wanted = max 1L ((matrixBytes + int64 (chunkBytes matrixBytes) - 1L) / int64 (chunkBytes matrixBytes))
        let even = if wanted > 1L then (wanted + 1L) &&& ~~~1L else 1L
        let rowsPerChunk = max 4 (((int ((int64 weights.Rows + even - 1L) / even)) + 3) &&& ~~~3)
        // The last rows (about two chunks' worth) go in quarter chunks: a product ends when its slower thread does,
        // and with whole chunks one thread often read the last one alone. Measured (whole decoder steps of
        // gpt2-small, alternating, 12–16 rounds each): the time a thread waited for the other fell from ~700 to
        // ~450 µs a float32 token (~630 to ~400 bfloat16); tokens/s moved by +4.3, -1.5 and +2.5 % (float32) and
        // +4.4, +2.0 % (bfloat16): one thread alone reads more than half the memory bandwidth, so waiting cost less
        // than its length.
        let tailRows = max 4 ((rowsPerChunk / 4) &&& ~~~3)
        let bigChunks = max 0 ((weights.Rows - 2 * rowsPerChunk + rowsPerChunk - 1) / rowsPerChunk)
        let staged =
            match path, weights.Dtype with
            | MatVecPath.Portable, _
            | _, Dtype.Float32
            | MatVecPath.Avx512, Dtype.BFloat16 -> 0n // read in place (AVX-512 widens bfloat16 in order, exactly)
            | _ -> stageFor weights input inputStride tokenCount
        product <-
            { Matrix = weights; Bias = biasAddress; X = input; XStride = inputStride; Tokens = tokenCount
              Y = output; YStride = outputStride; Epilogue = finishing; RowsPerChunk = rowsPerChunk; Staged = staged
              BigChunks = bigChunks; TailRows = tailRows }
        chunks <- bigChunks + (weights.Rows - bigChunks * rowsPerChunk + tailRows - 1) / tailRows

    override _.Speculative = speculative

    override _.Finalize() =
        for buffer in retired do
            NativeMemory.AlignedFree(NativePtr.toVoidPtr (NativePtr.ofNativeInt<byte> buffer))
        if stage <> 0n then NativeMemory.AlignedFree(NativePtr.toVoidPtr (NativePtr.ofNativeInt<byte> stage))

    override _.ScratchBytes = product.RowsPerChunk * product.Tokens * 4

    override _.Execute(chunk: int) =
        let p = product
        let first, last = range p chunk
        if isNull MatVecJob.raw then MatVecJob.raw <- Scratch()
        let raw = NativePtr.ofNativeInt<float32> (MatVecJob.raw.Ensure(p.RowsPerChunk * p.Tokens * 4))
        Products.compute path p first last raw
        Products.finishAll p first last raw

    override _.Compute(chunk: int, scratch: nativeint, pool: WorkerPool, generation: int) =
        let p = product // a copy: checked below, then used alone
        if not (isNull pool) && not (pool.IsCurrent generation) then false
        else
            let first, last = range p chunk
            Products.compute path p first last (NativePtr.ofNativeInt<float32> scratch)
            true

    override _.Commit(chunk: int, scratch: nativeint) =
        let p = product
        let first, last = range p chunk
        Products.finishAll p first last (NativePtr.ofNativeInt<float32> scratch)

/// Matrix-vector products for generation (MatVecJob).
[<RequireQualifiedAccess>]
module MatVec =
    /// Whether a path can run on this processor.
    let supported (path: MatVecPath) =
        match path with
        | MatVecPath.Avx512 -> Avx512F.IsSupported && Avx2.IsSupported && Fma.IsSupported
        | MatVecPath.Avx2 -> Avx2.IsSupported && Fma.IsSupported
        | MatVecPath.Portable -> true

    /// The fastest path this processor supports.
    let best =
        if supported MatVecPath.Avx512 then MatVecPath.Avx512
        elif supported MatVecPath.Avx2 then MatVecPath.Avx2
        else MatVecPath.Portable

    /// One product on a pool (allocates a job: for repeated calls, keep a MatVecJob).
    let multiply (pool: WorkerPool) (path: MatVecPath) (weights: WeightMatrix) (bias: nativeint) (x: nativeint) (tokens: int) (y: nativeint) (epilogue: Epilogue) =
        if not (supported path) then Gpt.Errors.fail "the %A matrix-vector path needs instructions this processor lacks" path
        let job = MatVecJob(path)
        job.Set(weights, bias, x, weights.Columns, tokens, y, weights.Rows, epilogue)
        if isNull pool then
            for chunk in 0 .. job.Chunks - 1 do
                job.Execute chunk
        else pool.Run(job, job.Chunks)
