namespace Gpt.Bench

open System
open System.Collections.Generic
open System.IO
open System.Runtime.InteropServices
open System.Text
open TorchSharp
open Gpt
open Gpt.Model
open Gpt.Text

/// How GGUF stores a matrix: float32 (ggml type 0) or float16 (ggml type 1). Vectors are always float32.
[<RequireQualifiedAccess>]
type GgufMatrixType =
    | F32
    | F16

    member this.Name = match this with F32 -> "f32" | F16 -> "f16"

/// A GGUF v3 file of a GPT-2 model for llama.cpp's `gpt2` architecture: issue 18 compares our decoder with
/// llama.cpp on the same weights. Benchmark tooling, not a model format of the library (which reads and writes the
/// Hugging Face layout). Layout from the public GGUF specification (ggml/docs/gguf.md): a header, metadata
/// key/values, tensor descriptions, then the tensor bytes, each at a multiple of the alignment (32).
[<RequireQualifiedAccess>]
module Gguf =
    let private alignment = 32L

    /// A metadata value: GGUF's type id, then the value's bytes.
    type private Value =
        | UInt32 of uint32
        | Float32 of float32
        | String of string
        | Strings of string[]
        | Int32s of int[]

    /// One tensor: name, GGUF dims (innermost first, so the reverse of PyTorch's shape), ggml type, bytes.
    type private Entry = { Name: string; Dims: int64[]; GgmlType: uint32; Bytes: byte[] }

    let private writeString (writer: BinaryWriter) (text: string) =
        let bytes = Encoding.UTF8.GetBytes text
        writer.Write(uint64 bytes.Length)
        writer.Write bytes

    let private writeValue (writer: BinaryWriter) (value: Value) =
        match value with
        | UInt32 v -> writer.Write 4u; writer.Write v
        | Float32 v -> writer.Write 6u; writer.Write v
        | String v -> writer.Write 8u; writeString writer v
        | Strings vs ->
            writer.Write 9u; writer.Write 8u; writer.Write(uint64 vs.Length)
            for v in vs do writeString writer v
        | Int32s vs ->
            writer.Write 9u; writer.Write 5u; writer.Write(uint64 vs.Length)
            for v in vs do writer.Write v

    /// GPT-2's byte-level alphabet (OpenAI's bytes_to_unicode): printable bytes stand for themselves, the other 68 for
    /// U+0100 onwards, in byte order. llama.cpp's gpt2 vocabulary expects token strings in this alphabet.
    let private byteCharacters =
        let printable b = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255)
        let mutable next = 256
        Array.init 256 (fun b ->
            if printable b then string (char b)
            else
                next <- next + 1
                string (char (next - 1)))

    let private tokenString (bytes: byte[]) = bytes |> Array.map (fun b -> byteCharacters[int b]) |> String.Concat

    /// The merges "left right" in rank order. The project's vocabulary has ranks only (tiktoken's form); the merge
    /// that made a token is found as BPE finds it: its bytes merged by the lowest-ranked pair first, with only ranks
    /// below its own, until two parts are left.
    let private merges (tokenBytes: byte[][]) =
        let key (bytes: byte[]) = Encoding.Latin1.GetString bytes
        let rank = Dictionary<string, int>()
        tokenBytes |> Array.iteri (fun id bytes -> rank[key bytes] <- id)
        [| for id in 0 .. tokenBytes.Length - 1 do
               let bytes = tokenBytes[id]
               if bytes.Length >= 2 then
                   let parts = ResizeArray(bytes |> Array.map (fun b -> key [| b |]))
                   while parts.Count > 2 do
                       let mutable best, bestRank = -1, Int32.MaxValue
                       for i in 0 .. parts.Count - 2 do
                           match rank.TryGetValue(parts[i] + parts[i + 1]) with
                           | true, r when r < id && r < bestRank -> best <- i; bestRank <- r
                           | _ -> ()
                       if best < 0 then Errors.fail "GPT-2 token %d cannot be built by merges of lower rank" id
                       parts[best] <- parts[best] + parts[best + 1]
                       parts.RemoveAt(best + 1)
                   let text (part: string) = tokenString (Encoding.Latin1.GetBytes part)
                   yield text parts[0] + " " + text parts[1] |]

    let private tensorBytes (matrixType: GgufMatrixType) (tensor: torch.Tensor) =
        use cpu = tensor.detach().cpu().contiguous()
        match matrixType with
        | GgufMatrixType.F32 ->
            use values = cpu.to_type torch.ScalarType.Float32
            MemoryMarshal.AsBytes(values.data<float32>().ToArray().AsSpan()).ToArray(), 0u
        | GgufMatrixType.F16 ->
            use values = cpu.to_type torch.ScalarType.Float16
            MemoryMarshal.AsBytes(values.data<Half>().ToArray().AsSpan()).ToArray(), 1u

    let private entry (name: string) (matrixType: GgufMatrixType) (tensor: torch.Tensor) =
        // GGUF lists dims innermost first: a row-major [out, in] weight (nn.Linear, ours) is ggml's [in, out], the
        // orientation llama.cpp's gpt2 graph multiplies by. (Hugging Face's Conv1D [in, out] would need a transpose.)
        let matrixType = if tensor.dim() >= 2L then matrixType else GgufMatrixType.F32
        let bytes, ggmlType = tensorBytes matrixType tensor
        { Name = name; Dims = Array.rev tensor.shape; GgmlType = ggmlType; Bytes = bytes }

    let private linear (prefix: string) (matrixType: GgufMatrixType) (p: LinearParams) =
        if p.Adapter.IsSome then Errors.fail "GGUF export of '%s': the model has a LoRA adapter; merge it first (gpt merge)" prefix
        // llama.cpp's gpt2 needs every bias; a model without one (qkv_bias = false) gets zeros, the same map.
        use zeros = if isNull p.Bias then torch.zeros(p.Weight.shape[0], dtype = torch.ScalarType.Float32) else null
        [ entry (prefix + ".weight") matrixType p.Weight
          entry (prefix + ".bias") matrixType (if isNull p.Bias then zeros else p.Bias) ]

    let private norm (prefix: string) (p: NormParams) =
        [ entry (prefix + ".weight") GgufMatrixType.F32 p.Scale; entry (prefix + ".bias") GgufMatrixType.F32 p.Shift ]

    /// The tensors in llama.cpp's gpt2 names. output.weight is always written (the tied embedding's copy when tied), as
    /// llama.cpp's own converter does for GPT-2.
    let private entries (model: GptModel) (matrixType: GgufMatrixType) =
        let p = model.Params
        [ yield entry "token_embd.weight" matrixType p.TokenEmbedding
          yield entry "position_embd.weight" matrixType p.PositionEmbedding
          for i, block in Array.indexed p.Blocks do
              let blk = sprintf "blk.%d." i
              yield! norm (blk + "attn_norm") block.AttentionNorm
              yield! linear (blk + "attn_qkv") matrixType block.Attention.Qkv
              yield! linear (blk + "attn_output") matrixType block.Attention.Projection
              yield! norm (blk + "ffn_norm") block.MlpNorm
              yield! linear (blk + "ffn_up") matrixType block.Mlp.Expand
              yield! linear (blk + "ffn_down") matrixType block.Mlp.Project
          yield! norm "output_norm" p.FinalNorm
          if p.Head.Adapter.IsSome then Errors.fail "GGUF export: the output head has a LoRA adapter; merge it first (gpt merge)"
          yield entry "output.weight" matrixType p.Head.Weight ]

    let private metadata (model: GptModel) (matrixType: GgufMatrixType) (name: string) =
        let config = model.Config
        let tokenizer = Gpt2Tokenizer.Instance
        let endOfText = Gpt2Tokenizer.EndOfTextIdValue
        if config.VocabSize <> endOfText + 1 then
            Errors.fail "GGUF export needs GPT-2's vocabulary of %d tokens (llama.cpp's gpt2 tokenizer), found %d" (endOfText + 1) config.VocabSize
        let tokenBytes = Array.init endOfText tokenizer.TokenBytes
        let tokens = Array.append (tokenBytes |> Array.map tokenString) [| Gpt2Tokenizer.EndOfText |]
        // llama.cpp's token types: 1 normal, 3 control (<|endoftext|>).
        let tokenTypes = Array.init (endOfText + 1) (fun id -> if id = endOfText then 3 else 1)
        [ "general.architecture", String "gpt2"
          "general.name", String name
          "general.alignment", UInt32(uint32 alignment)
          // llama_ftype: 0 all float32, 1 mostly float16.
          "general.file_type", UInt32(match matrixType with GgufMatrixType.F32 -> 0u | GgufMatrixType.F16 -> 1u)
          "gpt2.context_length", UInt32(uint32 config.ContextLength)
          "gpt2.embedding_length", UInt32(uint32 config.EmbeddingDim)
          "gpt2.feed_forward_length", UInt32(uint32 (4 * config.EmbeddingDim))
          "gpt2.block_count", UInt32(uint32 config.Layers)
          "gpt2.attention.head_count", UInt32(uint32 config.Heads)
          "gpt2.attention.layer_norm_epsilon", Float32(float32 config.LayerNormEpsilon)
          "tokenizer.ggml.model", String "gpt2"
          "tokenizer.ggml.pre", String "gpt-2"
          "tokenizer.ggml.tokens", Strings tokens
          "tokenizer.ggml.token_type", Int32s tokenTypes
          "tokenizer.ggml.merges", Strings(merges tokenBytes)
          "tokenizer.ggml.bos_token_id", UInt32(uint32 endOfText)
          "tokenizer.ggml.eos_token_id", UInt32(uint32 endOfText) ]

    let private pad (writer: BinaryWriter) =
        let position = writer.BaseStream.Position
        let padding = (alignment - position % alignment) % alignment
        writer.Write(Array.zeroCreate<byte> (int padding))

    let private padded (length: int64) = (length + alignment - 1L) / alignment * alignment

    /// Writes `model` as a GGUF v3 file at `path` (written under a temporary name, then renamed over it): llama.cpp's
    /// gpt2 architecture with GPT-2's tokenizer, matrices in `matrixType`, vectors in float32. Returns the tensor count.
    let write (model: GptModel) (matrixType: GgufMatrixType) (name: string) (path: string) : int =
        use _ = torch.no_grad()
        let values = metadata model matrixType name
        let tensors = entries model matrixType
        let full = Path.GetFullPath path
        let temporary = full + sprintf ".tmp-%d" Environment.ProcessId
        try
            do
                use stream = new FileStream(temporary, FileMode.Create, FileAccess.Write, FileShare.None, 1 <<< 20)
                use writer = new BinaryWriter(stream, Encoding.UTF8, false)
                writer.Write(Encoding.ASCII.GetBytes "GGUF")
                writer.Write 3u
                writer.Write(uint64 tensors.Length)
                writer.Write(uint64 values.Length)
                for key, value in values do
                    writeString writer key
                    writeValue writer value
                let mutable offset = 0L
                for t in tensors do
                    writeString writer t.Name
                    writer.Write(uint32 t.Dims.Length)
                    for d in t.Dims do writer.Write(uint64 d)
                    writer.Write t.GgmlType
                    writer.Write(uint64 offset)
                    offset <- offset + padded (int64 t.Bytes.Length)
                pad writer
                for t in tensors do
                    writer.Write t.Bytes
                    pad writer
            File.Move(temporary, full, true)
        finally
            if File.Exists temporary then File.Delete temporary
        tensors.Length
