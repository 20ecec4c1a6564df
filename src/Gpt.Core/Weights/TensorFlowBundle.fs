namespace Gpt.Weights

open System
open System.IO
open System.Numerics
open System.Runtime.InteropServices
open System.Text
open System.Text.Json
open System.Text.RegularExpressions
open TorchSharp
open Gpt
open Gpt.Model

/// OpenAI's original GPT-2 checkpoint, the files the book's gpt_download.py fetches (`checkpoint`, `hparams.json`,
/// `model.ckpt.index`, `model.ckpt.data-00000-of-00001`, `encoder.json`, `vocab.bpe`), read without TensorFlow.
///
/// The format (TensorFlow's tensor bundle, tensorflow/core/util/tensor_bundle): `PREFIX.index` is a LevelDB-format
/// table (data blocks of prefix-compressed key/value entries with restart points, a metaindex block, an index block
/// whose values are the data blocks' handles, a 48-byte footer ending in the magic 0xdb4775248b80fb57; each block
/// followed by a compression byte and a masked CRC-32C). Its key "" holds a BundleHeaderProto (shard count,
/// endianness, version); every other key is a tensor name whose value is a BundleEntryProto (dtype, shape, shard,
/// offset, size, masked CRC-32C of the bytes). `PREFIX.data-0000S-of-0000N` hold the raw little-endian tensor bytes.
/// The protobuf fields are decoded by hand (a few varints and a nested shape message).
[<RequireQualifiedAccess>]
module TensorFlowBundle =
    /// One tensor as the index describes it.
    type Entry =
        { Name: string
          /// TensorFlow's DataType enum: 1 float32, 2 float64, 14 bfloat16, 19 float16, ...
          DType: int
          Shape: int64[]
          ShardId: int
          Offset: int64
          Size: int64
          /// The masked CRC-32C of the bytes, when the entry has one.
          Crc32c: uint32 option
          /// A partitioned variable (stored as slices under other keys): not read here.
          Sliced: bool }

    /// The BundleHeaderProto.
    type Header = { Shards: int; BigEndian: bool; Producer: int }

    /// The index files of real models are a few kilobytes; the largest GPT-2's is ~30 KB.
    let maxIndexBytes = 64L * 1024L * 1024L

    let private tableMagic = 0xdb4775248b80fb57UL

    // ---- CRC-32C, masked as LevelDB and TensorFlow store it ---------------------------------------------------------

    /// CRC-32C (Castagnoli) of the bytes, continuing from `crc` (0 to start). BitOperations.Crc32C is the bare
    /// polynomial step (the SSE 4.2 instruction where there is one); the conventional pre- and post-inversion is here.
    let crc32c (crc: uint32) (data: ReadOnlySpan<byte>) =
        let mutable state = ~~~crc
        let mutable rest = data
        while rest.Length >= 8 do
            state <- BitOperations.Crc32C(state, MemoryMarshal.Read<uint64> rest)
            rest <- rest.Slice 8
        for i in 0 .. rest.Length - 1 do
            state <- BitOperations.Crc32C(state, rest[i])
        ~~~state

    /// LevelDB's masking of a stored CRC (so that a CRC of data that embeds CRCs is not trivially related to them).
    let mask (crc: uint32) = ((crc >>> 15) ||| (crc <<< 17)) + 0xa282ead8u

    // ---- the LevelDB table of the index -----------------------------------------------------------------------------

    let private corrupt (path: string) format =
        Printf.ksprintf (fun message -> raise (GptException(sprintf "TensorFlow checkpoint index '%s': %s" path message))) format

    /// A cursor over bytes that fails naming the file instead of reading past the end.
    type private Reader(path: string, bytes: byte[], start: int, finish: int) =
        let mutable position = start
        member _.Position = position
        member _.AtEnd = position >= finish
        member _.Byte() =
            if position >= finish then corrupt path "a record ends early at byte %d" position
            position <- position + 1
            bytes[position - 1]
        member this.Varint64() : uint64 =
            let mutable result = 0UL
            let mutable shift = 0
            let mutable more = true
            while more do
                if shift > 63 then corrupt path "a varint at byte %d is longer than 10 bytes" position
                let b = this.Byte()
                result <- result ||| (uint64 (b &&& 0x7Fuy) <<< shift)
                shift <- shift + 7
                more <- b &&& 0x80uy <> 0uy
            result
        member this.Length(what: string) : int =
            let n = this.Varint64()
            if n > uint64 (finish - position) then corrupt path "%s of %d bytes at byte %d runs past its record" what n position
            int n
        member _.Take(count: int) : ArraySegment<byte> =
            if count < 0 || count > finish - position then corrupt path "%d bytes at byte %d run past the record" count position
            position <- position + count
            ArraySegment<byte>(bytes, position - count, count)
        member this.Fixed32() = BitConverter.ToUInt32(this.Take(4).AsSpan())
        member this.Fixed64() = BitConverter.ToUInt64(this.Take(8).AsSpan())

    /// Reads a block (content and trailer) at a handle, checking bounds, compression and checksum.
    let private readBlock (path: string) (file: byte[]) (limit: int64) (offset: uint64) (size: uint64) (what: string) =
        if offset > uint64 limit || size > uint64 limit || offset + size + 5UL > uint64 limit then
            corrupt path "the %s block at [%d, %d) runs past the blocks' end (%d)" what offset (offset + size + 5UL) limit
        let start, length = int offset, int size
        let compression = file[start + length]
        if compression <> 0uy then
            corrupt path "the %s block is compressed (type %d, Snappy); only uncompressed tables are read (TensorFlow writes bundles uncompressed)" what compression
        let stored = BitConverter.ToUInt32(file, start + length + 1)
        let actual = mask (crc32c 0u (ReadOnlySpan(file, start, length + 1)))
        if stored <> actual then corrupt path "the %s block at byte %d fails its checksum (stored %08x, computed %08x)" what start stored actual
        start, length

    /// The key/value entries of a block, keys rebuilt from their shared prefixes.
    let private blockEntries (path: string) (file: byte[]) (start: int) (length: int) : (byte[] * ArraySegment<byte>) list =
        if length < 4 then corrupt path "a block of %d bytes is too short for its restart count" length
        let restarts = BitConverter.ToUInt32(file, start + length - 4)
        if uint64 restarts * 4UL + 4UL > uint64 length then corrupt path "a block claims %d restart points in %d bytes" restarts length
        let entriesEnd = start + length - 4 - int restarts * 4
        let reader = Reader(path, file, start, entriesEnd)
        let mutable previous: byte[] = [||]
        [ while not reader.AtEnd do
              let shared = int (reader.Varint64())
              let unshared = reader.Length "a key"
              let valueLength = reader.Length "a value"
              if shared > previous.Length then corrupt path "an entry shares %d key bytes with a previous key of %d" shared previous.Length
              let suffix = reader.Take unshared
              let key = Array.append previous[.. shared - 1] (suffix.ToArray())
              previous <- key
              yield key, reader.Take valueLength ]

    /// Every (key, value) of the table, in key order.
    let private tableEntries (path: string) (file: byte[]) =
        let footerLength = 48
        if file.Length < footerLength then corrupt path "the file has %d bytes, fewer than the table footer's %d" file.Length footerLength
        let footer = Reader(path, file, file.Length - footerLength, file.Length)
        let _metaindexOffset, _metaindexSize = footer.Varint64(), footer.Varint64()
        let indexOffset, indexSize = footer.Varint64(), footer.Varint64()
        if BitConverter.ToUInt64(file, file.Length - 8) <> tableMagic then
            corrupt path "the footer does not end in the table magic number: not a TensorFlow checkpoint index"
        let limit = int64 (file.Length - footerLength)
        let indexStart, indexLength = readBlock path file limit indexOffset indexSize "index"
        [ for _, handle in blockEntries path file indexStart indexLength do
              let reader = Reader(path, handle.Array, handle.Offset, handle.Offset + handle.Count)
              let offset, size = reader.Varint64(), reader.Varint64()
              let start, length = readBlock path file limit offset size "data"
              yield! blockEntries path file start length ]

    // ---- protobuf ---------------------------------------------------------------------------------------------------

    /// The fields of a protobuf message: (field number, wire type, varint or fixed value, bytes of a length-delimited
    /// field).
    let private fields (path: string) (message: ArraySegment<byte>) =
        let reader = Reader(path, message.Array, message.Offset, message.Offset + message.Count)
        [ while not reader.AtEnd do
              let key = reader.Varint64()
              let number, wire = int (key >>> 3), int (key &&& 7UL)
              match wire with
              | 0 -> yield number, wire, reader.Varint64(), ArraySegment<byte>()
              | 1 -> yield number, wire, reader.Fixed64(), ArraySegment<byte>()
              | 2 -> yield number, wire, 0UL, reader.Take(reader.Length "a protobuf field")
              | 5 -> yield number, wire, uint64 (reader.Fixed32()), ArraySegment<byte>()
              | _ -> corrupt path "protobuf wire type %d (field %d) is not one a bundle entry uses" wire number ]

    let private parseHeader (path: string) (value: ArraySegment<byte>) : Header =
        let mutable header = { Shards = 0; BigEndian = false; Producer = 0 }
        for number, _, scalar, bytes in fields path value do
            match number with
            | 1 -> header <- { header with Shards = int scalar }
            | 2 -> header <- { header with BigEndian = scalar = 1UL }
            | 3 ->
                for n, _, v, _ in fields path bytes do
                    if n = 1 then header <- { header with Producer = int v }
            | _ -> ()
        header

    let private parseEntry (path: string) (name: string) (value: ArraySegment<byte>) : Entry =
        let mutable entry = { Name = name; DType = 0; Shape = [||]; ShardId = 0; Offset = 0L; Size = 0L; Crc32c = None; Sliced = false }
        for number, _, scalar, bytes in fields path value do
            match number with
            | 1 -> entry <- { entry with DType = int scalar }
            | 2 ->
                // TensorShapeProto: repeated Dim dim = 2 (Dim: int64 size = 1); unknown_rank = 3.
                let dims =
                    [| for n, _, v, dim in fields path bytes do
                           if n = 3 && v <> 0UL then corrupt path "tensor '%s' has an unknown rank" name
                           if n = 2 then
                               yield fields path dim |> List.tryPick (fun (k, _, size, _) -> if k = 1 then Some(int64 size) else None) |> Option.defaultValue 0L |]
                entry <- { entry with Shape = dims }
            | 3 -> entry <- { entry with ShardId = int scalar }
            | 4 -> entry <- { entry with Offset = int64 scalar }
            | 5 -> entry <- { entry with Size = int64 scalar }
            | 6 -> entry <- { entry with Crc32c = Some(uint32 scalar) }
            | 7 -> entry <- { entry with Sliced = true }
            | _ -> ()
        if entry.Offset < 0L || entry.Size < 0L || entry.Shape |> Array.exists (fun d -> d < 0L) then
            corrupt path "tensor '%s' has a negative offset, size or dimension" name
        entry

    /// Reads PREFIX.index: the header and every tensor entry, in name order.
    let readIndex (indexPath: string) : Header * Entry list =
        if not (File.Exists indexPath) then Errors.fail "TensorFlow checkpoint index '%s' does not exist" indexPath
        let length = FileInfo(indexPath).Length
        if length > maxIndexBytes then corrupt indexPath "the index has %d bytes, more than the %d a checkpoint index needs" length maxIndexBytes
        // A regular file only (links followed): a FIFO would block the read forever.
        let file = BoundedFile.readBytes "TensorFlow checkpoint index" maxIndexBytes indexPath
        let entries = tableEntries indexPath file |> List.map (fun (key, value) -> Encoding.UTF8.GetString key, value)
        match entries with
        | ("", header) :: rest -> parseHeader indexPath header, rest |> List.map (fun (name, value) -> parseEntry indexPath name value)
        | _ -> corrupt indexPath "the first entry is not the bundle header (key \"\")"

    /// Bytes per element of the TensorFlow dtypes a weight can have, with the scalar type they load as.
    let private floatTypes =
        dict [ 1, (torch.ScalarType.Float32, 4L); 2, (torch.ScalarType.Float64, 8L); 14, (torch.ScalarType.BFloat16, 2L); 19, (torch.ScalarType.Float16, 2L) ]

    let private dtypeName (dtype: int) =
        match dtype with
        | 1 -> "float32" | 2 -> "float64" | 3 -> "int32" | 4 -> "uint8" | 7 -> "string" | 9 -> "int64" | 10 -> "bool"
        | 14 -> "bfloat16" | 19 -> "float16" | other -> sprintf "DataType %d" other

    // ---- OpenAI's GPT-2 checkpoint ----------------------------------------------------------------------------------

    /// The file names of OpenAI's checkpoint folder.
    let hparamsFileName = "hparams.json"
    let checkpointFileName = "checkpoint"

    /// Whether a folder looks like OpenAI's checkpoint: hparams.json and a bundle index.
    let isCheckpointDirectory (directory: string) =
        Directory.Exists directory
        && File.Exists(Path.Combine(directory, hparamsFileName))
        && (File.Exists(Path.Combine(directory, checkpointFileName)) || Directory.GetFiles(directory, "*.index").Length > 0)

    /// Reads hparams.json (n_vocab, n_ctx, n_embd, n_head, n_layer) as a GPT-2 configuration: QKV bias, tied head,
    /// dropout 0.1, LayerNorm epsilon 1e-5, as all of OpenAI's models.
    let readHparams (path: string) : GptConfig =
        if not (File.Exists path) then Errors.fail "hparams '%s' does not exist" path
        let fail format = Printf.ksprintf (fun m -> raise (GptException(sprintf "hparams '%s': %s" path m))) format
        use document =
            try JsonDocument.Parse(BoundedFile.readText "hparams" BoundedFile.defaultLimit path, BoundedFile.jsonOptions)
            with :? JsonException as e -> fail "not valid JSON (%s)" e.Message
        let root = document.RootElement
        if root.ValueKind <> JsonValueKind.Object then fail "not a JSON object"
        let integer (key: string) =
            match root.TryGetProperty key with
            | true, value when value.ValueKind = JsonValueKind.Number && fst (value.TryGetInt32()) -> value.GetInt32()
            | true, value -> fail "\"%s\" must be an integer, found %s" key (value.GetRawText())
            | _ -> fail "missing \"%s\"" key
        let config =
            { VocabSize = integer "n_vocab"; ContextLength = integer "n_ctx"; EmbeddingDim = integer "n_embd"
              Heads = integer "n_head"; Layers = integer "n_layer"; DropRate = 0.1; QkvBias = true; TiedHead = true
              LayerNormEpsilon = 1e-5 }
        try GptConfig.validate config with :? GptException as e -> fail "%s" e.Message
        config

    /// The bundle prefix of a checkpoint folder: the `checkpoint` file's model_checkpoint_path (its file name, inside
    /// this folder: TensorFlow often records the absolute path of the machine that saved it), else the one *.index.
    let checkpointPrefix (directory: string) =
        let fromFile =
            let path = Path.Combine(directory, checkpointFileName)
            if File.Exists path then
                let m = Regex.Match(BoundedFile.readText "TensorFlow checkpoint file" BoundedFile.defaultLimit path, "model_checkpoint_path:\s*\"([^\"]*)\"")
                if m.Success then Some(Path.Combine(directory, Path.GetFileName m.Groups[1].Value)) else None
            else None
        match fromFile with
        | Some prefix -> prefix
        | None ->
            match Directory.GetFiles(directory, "*.index") with
            | [| index |] -> index.Substring(0, index.Length - ".index".Length)
            | [||] -> Errors.fail "TensorFlow checkpoint folder '%s' has no *.index file" directory
            | many -> Errors.fail "TensorFlow checkpoint folder '%s' has %d *.index files and no 'checkpoint' file naming one" directory many.Length

    /// OpenAI's variable name, shape and our (Hugging Face) name for every tensor of a configuration. The 1x1
    /// convolution kernels are [1, in, out]: without the leading 1, exactly Hugging Face's Conv1D layout.
    let expectedVariables (config: GptConfig) =
        let d, v, c = int64 config.EmbeddingDim, int64 config.VocabSize, int64 config.ContextLength
        [ "model/wte", [| v; d |], "wte.weight"
          "model/wpe", [| c; d |], "wpe.weight"
          for i in 0 .. config.Layers - 1 do
              let t, h = sprintf "model/h%d/" i, sprintf "h.%d." i
              t + "ln_1/g", [| d |], h + "ln_1.weight"
              t + "ln_1/b", [| d |], h + "ln_1.bias"
              t + "attn/c_attn/w", [| 1L; d; 3L * d |], h + "attn.c_attn.weight"
              t + "attn/c_attn/b", [| 3L * d |], h + "attn.c_attn.bias"
              t + "attn/c_proj/w", [| 1L; d; d |], h + "attn.c_proj.weight"
              t + "attn/c_proj/b", [| d |], h + "attn.c_proj.bias"
              t + "ln_2/g", [| d |], h + "ln_2.weight"
              t + "ln_2/b", [| d |], h + "ln_2.bias"
              t + "mlp/c_fc/w", [| 1L; d; 4L * d |], h + "mlp.c_fc.weight"
              t + "mlp/c_fc/b", [| 4L * d |], h + "mlp.c_fc.bias"
              t + "mlp/c_proj/w", [| 1L; 4L * d; d |], h + "mlp.c_proj.weight"
              t + "mlp/c_proj/b", [| d |], h + "mlp.c_proj.bias"
          "model/ln_f/g", [| d |], "ln_f.weight"
          "model/ln_f/b", [| d |], "ln_f.bias" ]

    /// Loads OpenAI's checkpoint folder into our model (eval mode). Every entry is checked before any tensor is read:
    /// present, float dtype, the shape hparams.json implies, size = elements x dtype size, inside its data file; then
    /// each tensor's bytes are checked against the entry's CRC-32C.
    let load (directory: string) : GptModel =
        if not (Directory.Exists directory) then Errors.fail "TensorFlow checkpoint folder '%s' does not exist" directory
        let config = readHparams (Path.Combine(directory, hparamsFileName))
        let prefix = checkpointPrefix directory
        let indexPath = prefix + ".index"
        let header, entries = readIndex indexPath
        let fail format = Printf.ksprintf (fun m -> raise (GptException(sprintf "TensorFlow checkpoint '%s': %s" prefix m))) format
        if header.BigEndian then fail "the tensors are stored big-endian; only little-endian checkpoints are read"
        if header.Shards < 1 then fail "the header names %d data shards" header.Shards
        let dataPath shard = sprintf "%s.data-%05d-of-%05d" prefix shard header.Shards
        let byName = entries |> List.map (fun e -> e.Name, e) |> Map.ofList
        let expected = expectedVariables config
        let expectedNames = expected |> List.map (fun (n, _, _) -> n) |> Set.ofList
        let shardLengths = Collections.Generic.Dictionary<int, int64>()
        let shardLength shard =
            match shardLengths.TryGetValue shard with
            | true, n -> n
            | _ ->
                let path = dataPath shard
                if not (File.Exists path) then fail "data file '%s' does not exist" path
                let n = FileInfo(path).Length
                shardLengths[shard] <- n
                n
        let problems =
            [ for name, shape, _ in expected do
                  match byName.TryFind name with
                  | None -> ()
                  | Some e ->
                      if e.Sliced then yield sprintf "'%s' is stored in slices (a partitioned variable), which is not read" name
                      else
                          match floatTypes.TryGetValue e.DType with
                          | false, _ -> yield sprintf "'%s' has dtype %s, expected a floating-point dtype" name (dtypeName e.DType)
                          | true, (_, size) ->
                              if e.Shape <> shape then
                                  yield sprintf "'%s' has shape %s, expected %s (from %s)" name (Errors.shapeText e.Shape) (Errors.shapeText shape) hparamsFileName
                              elif e.Size <> (Array.fold (*) 1L shape) * size then
                                  yield sprintf "'%s' has %d bytes, but shape %s of %s needs %d" name e.Size (Errors.shapeText shape) (dtypeName e.DType) (Array.fold (*) 1L shape * size)
                              elif e.ShardId < 0 || e.ShardId >= header.Shards then
                                  yield sprintf "'%s' is in shard %d of %d" name e.ShardId header.Shards
                              elif e.Offset + e.Size > shardLength e.ShardId then
                                  yield sprintf "'%s' at bytes [%d, %d) runs past the end of '%s' (%d bytes): the file is truncated or corrupt" name e.Offset (e.Offset + e.Size) (dataPath e.ShardId) (shardLength e.ShardId)
              let missing = expected |> List.filter (fun (n, _, _) -> not (byName.ContainsKey n)) |> List.map (fun (n, _, _) -> n)
              if not missing.IsEmpty then yield "missing variables: " + String.concat ", " missing
              let unexpected = entries |> List.filter (fun e -> e.Name.StartsWith("model/", StringComparison.Ordinal) && not (expectedNames.Contains e.Name)) |> List.map _.Name
              if not unexpected.IsEmpty then yield "unexpected variables: " + String.concat ", " unexpected ]
        if not problems.IsEmpty then fail "%s" (String.concat "; " problems)
        let tensors = ResizeArray<string * torch.Tensor>()
        try
            for name, shape, ours in expected do
                let e = byName[name]
                let scalarType, _ = floatTypes[e.DType]
                let raw = torch.empty(shape, dtype = scalarType)
                tensors.Add((ours, raw))
                (use stream = new FileStream(dataPath e.ShardId, FileMode.Open, FileAccess.Read, FileShare.Read)
                 stream.Seek(e.Offset, SeekOrigin.Begin) |> ignore
                 stream.ReadExactly(raw.bytes))
                match e.Crc32c with
                | Some stored ->
                    let actual = mask (crc32c 0u (Span<byte>.op_Implicit raw.bytes))
                    if actual <> stored then fail "'%s' fails its checksum (stored %08x, computed %08x): the data file is corrupt" name stored actual
                | None -> ()
            // [1, in, out] -> [in, out]: a view; fromTensors copies it.
            let hf = [ for ours, tensor in tensors -> ours, (if tensor.dim () = 3L then tensor.squeeze 0L else tensor) ]
            try Pretrained.fromTensors prefix config hf
            finally for (_, t), (_, original) in Seq.zip hf tensors do if not (obj.ReferenceEquals(t, original)) then t.Dispose()
        finally
            for _, t in tensors do t.Dispose()
