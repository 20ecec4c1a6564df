namespace Gpt.Text

/// Training examples from a token stream (book ch. 2): sliding windows of a fixed length, each target the input
/// shifted one token to the right, grouped into batches.
[<RequireQualifiedAccess>]
module Dataset =

    /// Windows over a token stream: window i starts at token i * stride.
    type SlidingWindows =
        {
          Ids: int array
          ContextLength: int
          Stride: int
        }

    /// How many windows fit: a window needs ContextLength + 1 tokens (the last one only as a target).
    val windowCount:
      tokenCount: int -> contextLength: int -> stride: int -> int

    /// Windows over token ids; fails when the stream is too short for a single window.
    val create:
      ids: int array -> contextLength: int -> stride: int -> SlidingWindows

    /// Number of windows.
    val count: windows: SlidingWindows -> int

    /// Window i: the input ids and the target ids (the input shifted by one).
    val item: windows: SlidingWindows -> index: int -> int array * int array

    /// How windows are grouped into batches.
    type LoaderOptions =
        {
          BatchSize: int
          Shuffle: bool
          DropLast: bool

          /// Seed for the shuffle; epoch e uses a permutation derived from (Seed, e).
          Seed: int
        }

    /// The book's loader defaults: batch 4, shuffled, incomplete last batch dropped.
    val defaultLoader: LoaderOptions

    /// The window indices of every batch of an epoch: deterministic for (seed, epoch).
    val batchIndices:
      windowCount: int ->
        options: LoaderOptions -> epoch: int -> int array array

    /// Number of batches in an epoch.
    val batchCount: windows: SlidingWindows -> options: LoaderOptions -> int

    /// The SHA-256 of token ids (as little-endian int32): a short identity for a training set.
    val fingerprint: ids: int array -> string

    /// The input and target tensors ([B, T], int64) of a batch of windows. The caller owns them.
    val toTensors:
      windows: SlidingWindows ->
        indices: int array ->
        TorchSharp.torch.Tensor * TorchSharp.torch.Tensor

    /// The batches of an epoch as tensors, created lazily; dispose each pair (or use a dispose scope).
    val batches:
      windows: SlidingWindows ->
        options: LoaderOptions ->
        epoch: int ->
        (TorchSharp.torch.Tensor * TorchSharp.torch.Tensor) seq
