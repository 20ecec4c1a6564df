namespace Gpt.Text

open System
open TorchSharp
open Gpt

/// Training examples from a token stream (book ch. 2): sliding windows of a fixed length, each target the input
/// shifted one token to the right, grouped into batches.
[<RequireQualifiedAccess>]
module Dataset =
    /// Windows over a token stream: window i starts at token i * stride.
    type SlidingWindows =
        { Ids: int[]
          ContextLength: int
          Stride: int }

    /// How many windows fit: a window needs ContextLength + 1 tokens (the last one only as a target).
    let windowCount (tokenCount: int) (contextLength: int) (stride: int) =
        if tokenCount <= contextLength then 0 else (tokenCount - contextLength + stride - 1) / stride

    /// Windows over token ids; fails when the stream is too short for a single window.
    let create (ids: int[]) (contextLength: int) (stride: int) : SlidingWindows =
        Errors.require (contextLength > 0) "context length must be positive, found %d" contextLength
        Errors.require (stride > 0) "stride must be positive, found %d" stride
        Errors.require (ids.Length > contextLength)
            "the token stream has %d tokens, at least %d are needed for one window of context length %d"
            ids.Length (contextLength + 1) contextLength
        { Ids = ids; ContextLength = contextLength; Stride = stride }

    /// Number of windows.
    let count (windows: SlidingWindows) = windowCount windows.Ids.Length windows.ContextLength windows.Stride

    /// Window i: the input ids and the target ids (the input shifted by one).
    let item (windows: SlidingWindows) (index: int) : int[] * int[] =
        let n = count windows
        if index < 0 || index >= n then Errors.fail "window %d does not exist: there are %d windows" index n
        let start = index * windows.Stride
        windows.Ids[start .. start + windows.ContextLength - 1], windows.Ids[start + 1 .. start + windows.ContextLength]

    /// How windows are grouped into batches.
    type LoaderOptions =
        { BatchSize: int
          Shuffle: bool
          DropLast: bool
          /// Seed for the shuffle; epoch e uses a permutation derived from (Seed, e).
          Seed: int }

    /// The book's loader defaults: batch 4, shuffled, incomplete last batch dropped.
    let defaultLoader = { BatchSize = 4; Shuffle = true; DropLast = true; Seed = 123 }

    /// The window indices of every batch of an epoch: deterministic for (seed, epoch).
    let batchIndices (windowCount: int) (options: LoaderOptions) (epoch: int) : int[][] =
        Errors.require (options.BatchSize > 0) "batch size must be positive, found %d" options.BatchSize
        let order = Array.init windowCount id
        if options.Shuffle then
            // Fisher-Yates with a generator seeded from (seed, epoch): the same order on every machine and in every
            // process. (Not HashCode.Combine: it is salted per process, so a run resumed in a new process would
            // read its batches in another order.)
            let mixed = (int64 options.Seed * 1_000_003L + int64 epoch) % 2_147_483_647L
            let random = Random(int (abs mixed))
            for i in windowCount - 1 .. -1 .. 1 do
                let j = random.Next(i + 1)
                let t = order[i]
                order[i] <- order[j]
                order[j] <- t
        let chunks = order |> Array.chunkBySize options.BatchSize
        if options.DropLast && chunks.Length > 0 && chunks[chunks.Length - 1].Length < options.BatchSize then
            chunks[.. chunks.Length - 2]
        else chunks

    /// Number of batches in an epoch.
    let batchCount (windows: SlidingWindows) (options: LoaderOptions) =
        let n = count windows
        if options.DropLast then n / options.BatchSize else (n + options.BatchSize - 1) / options.BatchSize

    /// The SHA-256 of token ids (as little-endian int32): a short identity for a training set.
    let fingerprint (ids: int[]) =
        let bytes = Array.zeroCreate<byte> (ids.Length * 4)
        Buffer.BlockCopy(ids, 0, bytes, 0, bytes.Length)
        Convert.ToHexString(Security.Cryptography.SHA256.HashData bytes).ToLowerInvariant()

    /// The input and target tensors ([B, T], int64) of a batch of windows. The caller owns them.
    let toTensors (windows: SlidingWindows) (indices: int[]) : torch.Tensor * torch.Tensor =
        Gpt.Kernels.NativeLibraries.install () // often a script's first tensor (book ch. 2): TorchSharp must find its library
        let length = windows.ContextLength
        let inputs = Array.zeroCreate<int64> (indices.Length * length)
        let targets = Array.zeroCreate<int64> (indices.Length * length)
        indices
        |> Array.iteri (fun row index ->
            let start = index * windows.Stride
            for t in 0 .. length - 1 do
                inputs[row * length + t] <- int64 windows.Ids[start + t]
                targets[row * length + t] <- int64 windows.Ids[start + t + 1])
        let shape = [| int64 indices.Length; int64 length |]
        torch.tensor(inputs).view(shape), torch.tensor(targets).view(shape)

    /// The batches of an epoch as tensors, created lazily; dispose each pair (or use a dispose scope).
    let batches (windows: SlidingWindows) (options: LoaderOptions) (epoch: int) : seq<torch.Tensor * torch.Tensor> =
        batchIndices (count windows) options epoch |> Seq.map (toTensors windows)
