namespace Gpt.Weights

open System
open System.IO
open System.Text
open System.Text.Json
open TorchSharp
open Gpt

/// Our own reader and writer of the safetensors format (https://huggingface.co/docs/safetensors):
/// 8 bytes little-endian header length N, N bytes of JSON
/// `{"name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ..., "__metadata__": {"k": "v"}}`,
/// then the data; offsets are relative to the start of the data. Every malformed file is a GptException naming the
/// file and, where there is one, the tensor; never a native crash.
[<RequireQualifiedAccess>]
module Safetensors =
    /// One tensor as the header describes it.
    type Entry =
        { Name: string
          /// The safetensors dtype name: F32, F16, BF16, F64, I64, I32, I16, I8, U8 or BOOL.
          DType: string
          Shape: int64[]
          /// Byte range [Begin, End) within the data section.
          Begin: int64
          End: int64 }

    /// A parsed header: the entries in file order and the free-form string metadata.
    type Header =
        { Entries: Entry list
          Metadata: Map<string, string>
          /// Where the data section starts in the file (8 + header length).
          DataStart: int64 }

    /// The safetensors spec caps the header at 100 MB; a larger length is a corrupt file, not a reason to allocate.
    let maxHeaderBytes = 100_000_000L

    let private dtypes =
        [ "F32", (torch.ScalarType.Float32, 4)
          "F16", (torch.ScalarType.Float16, 2)
          "BF16", (torch.ScalarType.BFloat16, 2)
          "F64", (torch.ScalarType.Float64, 8)
          "I64", (torch.ScalarType.Int64, 8)
          "I32", (torch.ScalarType.Int32, 4)
          "I16", (torch.ScalarType.Int16, 2)
          "I8", (torch.ScalarType.Int8, 1)
          "U8", (torch.ScalarType.Byte, 1)
          "BOOL", (torch.ScalarType.Bool, 1) ]

    let private byName = Map.ofList dtypes
    let private byScalarType = dtypes |> List.map (fun (name, (scalar, size)) -> scalar, (name, size)) |> Map.ofList

    /// Bytes per element of a safetensors dtype name, if we know it.
    let elementSize (dtype: string) = byName |> Map.tryFind dtype |> Option.map snd

    let private corrupt (path: string) format =
        Printf.ksprintf (fun message -> raise (GptException(sprintf "safetensors file '%s': %s" path message))) format

    let private parseEntry (path: string) (name: string) (info: JsonElement) : Entry =
        let bad what = corrupt path "tensor '%s': %s" name what
        if info.ValueKind <> JsonValueKind.Object then bad "the header entry is not a JSON object"
        let field (key: string) =
            match info.TryGetProperty key with
            | true, value -> value
            | _ -> bad (sprintf "the header entry has no \"%s\"" key)
        let integers (key: string) =
            let value = field key
            if value.ValueKind <> JsonValueKind.Array then bad (sprintf "\"%s\" is not an array" key)
            // TryGetInt64 throws on a non-number, so the kind is checked first.
            [| for item in value.EnumerateArray() ->
                   match item.ValueKind with
                   | JsonValueKind.Number when fst (item.TryGetInt64()) && item.GetInt64() >= 0L -> item.GetInt64()
                   | _ -> bad (sprintf "\"%s\" must hold non-negative integers, found %s" key (value.GetRawText())) |]
        let dtype = field "dtype"
        if dtype.ValueKind <> JsonValueKind.String then bad "\"dtype\" is not a string"
        let dtypeName = dtype.GetString()
        let shape = integers "shape"
        let offsets = integers "data_offsets"
        if offsets.Length <> 2 || offsets[0] > offsets[1] then
            bad (sprintf "\"data_offsets\" must be [begin, end] with begin <= end, found %s" ((field "data_offsets").GetRawText()))
        { Name = name; DType = dtypeName; Shape = shape; Begin = offsets[0]; End = offsets[1] }

    /// Reads and checks the header: JSON well-formed, each entry complete, dtype known, byte count = shape x dtype
    /// size, ranges inside the data section and not overlapping.
    let readHeader (path: string) : Header =
        if not (File.Exists path) then Errors.fail "safetensors file '%s' does not exist" path
        use stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read)
        let fileLength = stream.Length
        if fileLength < 8L then corrupt path "the file has %d bytes, too short for the 8-byte header length" fileLength
        let lengthBytes = Array.zeroCreate<byte> 8
        stream.ReadExactly(lengthBytes, 0, 8)
        let headerLength = BitConverter.ToUInt64(lengthBytes, 0)
        if headerLength > uint64 (fileLength - 8L) then
            corrupt path "the header length %d runs past the end of the file (%d bytes)" headerLength fileLength
        if int64 headerLength > maxHeaderBytes then
            corrupt path "the header length %d exceeds the format's limit of %d bytes" headerLength maxHeaderBytes
        let headerBytes = Array.zeroCreate<byte> (int headerLength)
        stream.ReadExactly(headerBytes, 0, headerBytes.Length)
        let dataStart = 8L + int64 headerLength
        let dataLength = fileLength - dataStart
        use document =
            try
                JsonDocument.Parse(ReadOnlyMemory headerBytes)
            with :? JsonException as e ->
                corrupt path "the header is not valid JSON (%s)" e.Message
        let root = document.RootElement
        if root.ValueKind <> JsonValueKind.Object then corrupt path "the header is not a JSON object"
        let mutable metadata = Map.empty
        let entries = ResizeArray<Entry>()
        let names = Collections.Generic.HashSet<string>()
        for property in root.EnumerateObject() do
            if not (names.Add property.Name) then corrupt path "tensor '%s' appears twice in the header" property.Name
            if property.Name = "__metadata__" then
                if property.Value.ValueKind <> JsonValueKind.Object then corrupt path "\"__metadata__\" is not a JSON object"
                for item in property.Value.EnumerateObject() do
                    if item.Value.ValueKind <> JsonValueKind.String then
                        corrupt path "metadata '%s' is not a string" item.Name
                    metadata <- metadata.Add(item.Name, item.Value.GetString())
            else
                let entry = parseEntry path property.Name property.Value
                match elementSize entry.DType with
                | None ->
                    corrupt path "tensor '%s' has dtype %s, expected one of %s" entry.Name entry.DType
                        (dtypes |> List.map fst |> String.concat ", ")
                | Some size ->
                    let elements =
                        try
                            entry.Shape |> Array.fold (fun acc dim -> Checked.(*) acc dim) 1L
                        with :? OverflowException ->
                            corrupt path "tensor '%s' has an impossible shape %s" entry.Name (Errors.shapeText entry.Shape)
                    let expected = if elements > Int64.MaxValue / int64 size then -1L else elements * int64 size
                    if entry.End - entry.Begin <> expected then
                        corrupt path "tensor '%s' has %d bytes of data, but shape %s of %s needs %d" entry.Name
                            (entry.End - entry.Begin) (Errors.shapeText entry.Shape) entry.DType expected
                    if entry.End > dataLength then
                        corrupt path "tensor '%s' has data offsets [%d, %d] past the end of the data (%d bytes): the file is truncated or corrupt"
                            entry.Name entry.Begin entry.End dataLength
                entries.Add entry
        let sorted = entries |> Seq.filter (fun e -> e.End > e.Begin) |> Seq.sortBy (fun e -> e.Begin) |> Array.ofSeq
        for i in 1 .. sorted.Length - 1 do
            let previous, current = sorted[i - 1], sorted[i]
            if current.Begin < previous.End then
                corrupt path "tensors '%s' [%d, %d] and '%s' [%d, %d] overlap" previous.Name previous.Begin previous.End
                    current.Name current.Begin current.End
        { Entries = List.ofSeq entries; Metadata = metadata; DataStart = dataStart }

    /// Reads every tensor, in header order, with the metadata. F16 and BF16 are converted to float32 (the model
    /// computes in float32); F64 and the integer types keep their dtype. The caller owns the tensors.
    let readWithMetadata (path: string) : (string * torch.Tensor) list * Map<string, string> =
        if not BitConverter.IsLittleEndian then Errors.fail "safetensors files are little-endian; this machine is not"
        let header = readHeader path
        use stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read)
        let tensors = ResizeArray<string * torch.Tensor>()
        try
            for entry in header.Entries do
                let scalarType, _ = byName[entry.DType]
                let raw = torch.empty(entry.Shape, dtype = scalarType)
                stream.Seek(header.DataStart + entry.Begin, SeekOrigin.Begin) |> ignore
                // Straight from the file into the tensor's memory, no managed copy.
                (try stream.ReadExactly raw.bytes
                 with :? EndOfStreamException -> corrupt path "tensor '%s': the file ends inside its data" entry.Name)
                let tensor =
                    if scalarType = torch.ScalarType.Float16 || scalarType = torch.ScalarType.BFloat16 then
                        use half = raw
                        half.``to``(torch.ScalarType.Float32)
                    else
                        raw
                tensors.Add((entry.Name, tensor))
            List.ofSeq tensors, header.Metadata
        with _ ->
            for _, tensor in tensors do tensor.Dispose()
            reraise ()

    /// Reads every tensor of a safetensors file by name (F16/BF16 converted to float32). The caller owns the tensors.
    let read (path: string) : Map<string, torch.Tensor> = readWithMetadata path |> fst |> Map.ofList

    /// Writes tensors in the given order with string metadata. The file is written under a temporary name in the
    /// same folder and renamed over `path` at the end, so a reader never sees half a file.
    let writeWithMetadata (path: string) (metadata: Map<string, string>) (tensors: (string * torch.Tensor) seq) =
        if not BitConverter.IsLittleEndian then Errors.fail "safetensors files are little-endian; this machine is not"
        let tensors = List.ofSeq tensors
        let duplicates = tensors |> List.countBy fst |> List.filter (fun (_, n) -> n > 1) |> List.map fst
        if not duplicates.IsEmpty then
            Errors.fail "safetensors file '%s': tensor names must be unique, found twice: %s" path (String.concat ", " duplicates)
        if tensors |> List.exists (fun (name, _) -> name = "__metadata__") then
            Errors.fail "safetensors file '%s': \"__metadata__\" is reserved and cannot name a tensor" path
        use scope = torch.NewDisposeScope()
        let prepared =
            [ for name, tensor in tensors ->
                  match byScalarType |> Map.tryFind tensor.dtype with
                  | None -> Errors.fail "safetensors file '%s': tensor '%s' has dtype %O, which the format cannot hold" path name tensor.dtype
                  | Some(dtypeName, size) -> name, dtypeName, tensor.detach().cpu().contiguous(), tensor.numel () * int64 size ]
        let headerBytes =
            use buffer = new MemoryStream()
            (use json = new Utf8JsonWriter(buffer)
             json.WriteStartObject()
             if not metadata.IsEmpty then
                 json.WriteStartObject "__metadata__"
                 for KeyValue(key, value) in metadata do json.WriteString(key, value)
                 json.WriteEndObject()
             let mutable offset = 0L
             for name, dtypeName, tensor, byteCount in prepared do
                 json.WriteStartObject name
                 json.WriteString("dtype", dtypeName)
                 json.WriteStartArray "shape"
                 for dim in tensor.shape do json.WriteNumberValue dim
                 json.WriteEndArray()
                 json.WriteStartArray "data_offsets"
                 json.WriteNumberValue offset
                 json.WriteNumberValue(offset + byteCount)
                 json.WriteEndArray()
                 json.WriteEndObject()
                 offset <- offset + byteCount
             json.WriteEndObject())
            // Pad with spaces to a multiple of 8 so the data starts aligned, as the reference implementation does.
            let padding = (8 - int (buffer.Length % 8L)) % 8
            buffer.Write(Encoding.ASCII.GetBytes(String(' ', padding)))
            buffer.ToArray()
        let fullPath = Path.GetFullPath path
        let temporary = fullPath + ".tmp-" + Guid.NewGuid().ToString("N")
        let writeAll () =
            use stream = new FileStream(temporary, FileMode.CreateNew, FileAccess.Write)
            stream.Write(BitConverter.GetBytes(uint64 headerBytes.LongLength), 0, 8)
            stream.Write(headerBytes, 0, headerBytes.Length)
            for _, _, tensor, _ in prepared do
                stream.Write(Span<byte>.op_Implicit tensor.bytes) // straight from the tensor's memory
            stream.Flush(true)
        try
            writeAll ()
            File.Move(temporary, fullPath, true)
        with _ ->
            (try File.Delete temporary with _ -> ())
            reraise ()

    /// Writes tensors in the given order with the metadata {"format": "pt"} that Hugging Face loaders look for.
    let write (path: string) (tensors: (string * torch.Tensor) seq) =
        writeWithMetadata path (Map.ofList [ "format", "pt" ]) tensors
