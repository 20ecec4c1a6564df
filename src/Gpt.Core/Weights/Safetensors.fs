namespace Gpt.Weights

#nowarn "9" // the finite check reads tensors where they lie

open System
open System.Collections.Generic
open System.IO
open System.Text
open System.Text.Json
open System.Numerics
open TorchSharp
open Microsoft.FSharp.NativeInterop
open Gpt

/// Counting NaN and infinities where a tensor's values lie. Why: libtorch's isfinite, logical_not and sum over every
/// weight of gpt2-small took ~2 s of its ~8 s load (several passes and temporary tensors); a scan of the bits is one
/// pass at memory speed.
module internal NonFinite =
    /// Values at `address` (`count` of them, of the unsigned type of their width) whose exponent bits (`mask`) are all
    /// ones: NaN or an infinity. A vector at a time; lanes are looked at one by one only in a vector that holds one.
    let private scan<'T when 'T: (new: unit -> 'T) and 'T: struct and 'T :> ValueType and 'T: equality and 'T: unmanaged>
        (address: nativeint) (count: int64) (mask: 'T) =
        let masks = Vector<'T>(mask)
        let lanes = Vector<'T>.Count
        let size = int64 sizeof<'T>
        let hits (v: Vector<'T>) = Vector.Equals(Vector.BitwiseAnd(v, masks), masks)
        let mutable found = 0L
        let mutable i = 0L
        while i + int64 lanes <= count do
            let hit = hits (NativePtr.read (NativePtr.ofNativeInt<Vector<'T>> (address + nativeint (i * size))))
            if not (Vector.EqualsAll(hit, Vector<'T>.Zero)) then
                for lane in 0 .. lanes - 1 do
                    if not (hit[lane].Equals(Unchecked.defaultof<'T>)) then found <- found + 1L
            i <- i + int64 lanes
        while i < count do
            let value = NativePtr.read (NativePtr.ofNativeInt<'T> (address + nativeint (i * size)))
            if not (Vector.EqualsAll(hits (Vector<'T>(value: 'T)), Vector<'T>.Zero)) then found <- found + 1L
            i <- i + 1L
        found

    /// How many values of a contiguous CPU float64, float32, float16 or bfloat16 tensor are NaN or infinite; None for
    /// any other tensor (the caller asks libtorch).
    let count (tensor: torch.Tensor) : int64 option =
        if tensor.device_type <> DeviceType.CPU || not (tensor.is_contiguous ()) then None
        else
            let n = tensor.numel ()
            let at () = Gpt.Kernels.TensorMemory.address tensor
            match tensor.dtype with
            | torch.ScalarType.Float32 -> Some(if n = 0L then 0L else scan (at ()) n 0x7F800000u)
            | torch.ScalarType.Float64 -> Some(if n = 0L then 0L else scan (at ()) n 0x7FF0000000000000UL)
            | torch.ScalarType.Float16 -> Some(if n = 0L then 0L else scan (at ()) n 0x7C00us)
            | torch.ScalarType.BFloat16 -> Some(if n = 0L then 0L else scan (at ()) n 0x7F80us)
            | _ -> None

/// Our own reader and writer of the safetensors format (https://huggingface.co/docs/safetensors):
/// 8 bytes little-endian header length N, N bytes of JSON
/// `{"name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ..., "__metadata__": {"k": "v"}}`,
/// then the data; offsets are relative to the start of the data. Every malformed file is a GptException naming the
/// file and, where there is one, the tensor; never a native crash, a hang or an unbounded allocation. The whole
/// header is read and checked before any tensor is allocated: valid UTF-8 and JSON, at most maxEntries entries, each
/// entry complete with a known dtype and a byte count that matches its shape, and the tensors covering the data section
/// exactly (no gap, no overlap, nothing after the last one), which the reference implementation requires too and which
/// catches a header length that is off by a byte.
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

    /// At most this many header entries (tensors and metadata items together). GPT-2 XL has 580 tensors; 100 MB of
    /// header can describe 1.6 million empty ones, which is an attack on memory, not a model.
    let maxEntries = 100_000

    /// At most this many dimensions per tensor: more than any model uses, few enough that a shape is never a burden.
    let maxDimensions = 64

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

    /// A name or a piece of header as an error message shows it: control characters escaped and at most 100
    /// characters, since a header can hold a name of megabytes and an error message is one line.
    let private shown (text: string) =
        let limit = 100
        let builder = StringBuilder()
        for c in (if text.Length > limit then text.Substring(0, limit) else text) do
            if Char.IsControl c then builder.AppendFormat("\\u{0:x4}", int c) |> ignore
            else builder.Append c |> ignore
        if text.Length > limit then builder.AppendFormat("... ({0} characters)", text.Length) |> ignore
        builder.ToString()

    // ---- the header, read with a streaming JSON reader: no document of the whole header is built, and reading stops
    // at the first problem (a header of a million entries is refused after maxEntries of them) ----

    /// Moves to the next token. The header is complete in memory: no next token means the JSON ended early.
    let private next (path: string) (reader: byref<Utf8JsonReader>) =
        if not (reader.Read()) then corrupt path "the header is not valid JSON (it ends before its last '}')"

    /// The string at the reader. The UTF-8 was checked before; an escape such as "\ud800" (half of a surrogate pair)
    /// is still not text. `what` names the string for the error message (a function: it is rarely needed, and a header
    /// has up to maxEntries strings).
    let private text (path: string) (what: unit -> string) (reader: byref<Utf8JsonReader>) : string =
        try
            reader.GetString()
        with :? InvalidOperationException as e ->
            corrupt path "%s in the header is not valid text (%s, byte %d of the header)" (what ()) e.Message reader.TokenStartIndex

    /// An array of non-negative integers (the reader is on its '['), copied into `values` (at most values.Length of
    /// them are kept); returns how many there were and the byte range of its text, for error messages.
    let private integers
        (path: string) (name: string) (key: string) (values: int64[]) (header: byte[]) (reader: byref<Utf8JsonReader>) =
        if reader.TokenType <> JsonTokenType.StartArray then corrupt path "tensor '%s': \"%s\" is not an array" (shown name) key
        let start = int reader.TokenStartIndex
        let mutable count = 0
        let mutable valid = true
        next path &reader
        while reader.TokenType <> JsonTokenType.EndArray do
            let mutable value = 0L
            if reader.TokenType = JsonTokenType.Number && reader.TryGetInt64(&value) && value >= 0L then
                if count < values.Length then values[count] <- value
                count <- count + 1
            else
                valid <- false
                reader.Skip() // a nested array or object, whole
            next path &reader
        let finish = int reader.BytesConsumed
        if not valid then
            corrupt path "tensor '%s': \"%s\" must hold non-negative integers, found %s" (shown name) key
                (shown (Encoding.UTF8.GetString(header, start, finish - start)))
        struct (count, start, finish)

    let private dtypeNames = [| for name, _ in dtypes -> name, Encoding.ASCII.GetBytes name |]
    let private dtypeKey = "dtype"B
    let private shapeKey = "shape"B
    let private offsetsKey = "data_offsets"B

    /// One tensor's entry (the reader is on its value). It allocates little besides the entry itself: a header may
    /// hold maxEntries of them.
    let private entry
        (path: string) (name: string) (header: byte[]) (scratch: int64[]) (reader: byref<Utf8JsonReader>) : Entry =
        let bad what = corrupt path "tensor '%s': %s" (shown name) what
        if reader.TokenType <> JsonTokenType.StartObject then bad "the header entry is not a JSON object"
        let mutable dtype: string = null
        let mutable shape: int64[] = null
        let mutable offsets: int64[] = null
        next path &reader
        while reader.TokenType <> JsonTokenType.EndObject do
            let key =
                if reader.ValueTextEquals dtypeKey then "dtype"
                elif reader.ValueTextEquals shapeKey then "shape"
                elif reader.ValueTextEquals offsetsKey then "data_offsets"
                else ""
            next path &reader
            match key with
            | "dtype" ->
                if not (isNull dtype) then bad "\"dtype\" appears twice in the header entry"
                if reader.TokenType <> JsonTokenType.String then bad "\"dtype\" is not a string"
                let mutable known = 0
                while known < dtypeNames.Length && not (reader.ValueTextEquals(snd dtypeNames[known])) do
                    known <- known + 1
                dtype <-
                    if known < dtypeNames.Length then fst dtypeNames[known]
                    else text path (fun () -> sprintf "the dtype of tensor '%s'" (shown name)) &reader
            | "shape" ->
                if not (isNull shape) then bad "\"shape\" appears twice in the header entry"
                let struct (count, _, _) = integers path name key scratch header &reader
                if count > maxDimensions then bad (sprintf "\"shape\" has more than %d dimensions" maxDimensions)
                shape <- Array.sub scratch 0 count
            | "data_offsets" ->
                if not (isNull offsets) then bad "\"data_offsets\" appears twice in the header entry"
                let struct (count, start, finish) = integers path name key scratch header &reader
                if count <> 2 || scratch[0] > scratch[1] then
                    bad (sprintf "\"data_offsets\" must be [begin, end] with begin <= end, found %s"
                            (shown (Encoding.UTF8.GetString(header, start, finish - start))))
                offsets <- [| scratch[0]; scratch[1] |]
            | _ ->
                // Other keys are ignored, as the reference implementation ignores them.
                reader.Skip()
            next path &reader
        if isNull dtype then bad "the header entry has no \"dtype\""
        if isNull shape then bad "the header entry has no \"shape\""
        if isNull offsets then bad "the header entry has no \"data_offsets\""
        { Name = name; DType = dtype; Shape = shape; Begin = offsets[0]; End = offsets[1] }

    /// An entry's dtype, its byte count against its shape, and its range against the data section.
    let private check (path: string) (dataLength: int64) (entry: Entry) =
        match elementSize entry.DType with
        | None ->
            corrupt path "tensor '%s' has dtype %s, expected one of %s" (shown entry.Name) (shown entry.DType)
                (dtypes |> List.map fst |> String.concat ", ")
        | Some size ->
            // Every dimension counts, also next to a zero: [0, 2^62, 2^62] holds nothing, but libtorch would still
            // compute its strides.
            let elements, tooLarge =
                try
                    entry.Shape |> Array.fold (fun acc dim -> Checked.(*) acc dim) 1L,
                    entry.Shape |> Array.fold (fun acc dim -> Checked.(*) acc (max dim 1L)) 1L > Int64.MaxValue / int64 size
                with :? OverflowException ->
                    0L, true
            if tooLarge then corrupt path "tensor '%s' has an impossible shape %s" (shown entry.Name) (Errors.shapeText entry.Shape)
            let expected = elements * int64 size
            if entry.End - entry.Begin <> expected then
                corrupt path "tensor '%s' has %d bytes of data, but shape %s of %s needs %d" (shown entry.Name)
                    (entry.End - entry.Begin) (Errors.shapeText entry.Shape) entry.DType expected
            if entry.End > dataLength then
                corrupt path "tensor '%s' has data offsets [%d, %d] past the end of the data (%d bytes): the file is truncated or corrupt"
                    (shown entry.Name) entry.Begin entry.End dataLength

    /// The tensors must cover the data section exactly, as the reference implementation requires: sorted by offset,
    /// each begins where the previous one ends (empty tensors included) and the last one ends at the end of the file.
    /// A gap or bytes after the last tensor mean the header and the data disagree: a header length one byte short
    /// leaves valid JSON (the header is padded with spaces) and shifts every tensor by a byte.
    let private checkCoverage (path: string) (dataLength: int64) (entries: ResizeArray<Entry>) =
        let sorted = entries.ToArray()
        // A comparison of two int64 fields: F#'s structural comparison of tuple keys would box every field.
        Array.Sort(sorted, Comparison(fun (a: Entry) (b: Entry) ->
            if a.Begin <> b.Begin then compare a.Begin b.Begin else compare a.End b.End))
        let mutable covered = 0L
        for i in 0 .. sorted.Length - 1 do
            let current = sorted[i]
            if current.Begin > covered then
                let after = if i = 0 then "" else sprintf " after '%s'" (shown sorted[i - 1].Name)
                corrupt path "bytes [%d, %d) of the data section belong to no tensor (a gap%s, before '%s')" covered current.Begin
                    after (shown current.Name)
            elif current.Begin < covered then
                let previous = sorted[i - 1]
                corrupt path "tensors '%s' [%d, %d] and '%s' [%d, %d] overlap" (shown previous.Name) previous.Begin previous.End
                    (shown current.Name) current.Begin current.End
            covered <- current.End
        if covered <> dataLength then
            corrupt path "the data section has %d bytes but the tensors cover %d: the header length is wrong or the file has bytes appended"
                dataLength covered

    /// Parses and checks the header's bytes: UTF-8, JSON, entries, coverage of a data section of `dataLength` bytes.
    let private parse (path: string) (header: byte[]) (dataLength: int64) : Entry list * Map<string, string> =
        // The reader does not check UTF-8 inside strings; a strict decoder says where the first bad byte is.
        if not (Unicode.Utf8.IsValid(ReadOnlySpan header)) then
            let offset =
                try
                    UTF8Encoding(false, true).GetCharCount header |> ignore
                    0
                with :? DecoderFallbackException as e -> e.Index
            corrupt path "the header is not valid UTF-8 (byte %d of the header, %d of the file)" offset (8 + offset)
        let entries = ResizeArray<Entry>()
        let scratch = Array.zeroCreate<int64> (maxDimensions + 1)
        let mutable metadata = Map.empty
        let mutable reader = Utf8JsonReader(ReadOnlySpan header, JsonReaderOptions(MaxDepth = 64))
        try
            next path &reader
            if reader.TokenType <> JsonTokenType.StartObject then corrupt path "the header is not a JSON object"
            let names = HashSet<string>(StringComparer.Ordinal)
            let mutable count = 0
            let counted () =
                count <- count + 1
                if count > maxEntries then
                    corrupt path "the header has more than %d entries (tensors and metadata): refused before reading the rest" maxEntries
            next path &reader
            while reader.TokenType <> JsonTokenType.EndObject do
                let name = text path (fun () -> "a tensor name") &reader
                counted ()
                if not (names.Add name) then corrupt path "tensor '%s' appears twice in the header" (shown name)
                next path &reader
                if name = "__metadata__" then
                    if reader.TokenType <> JsonTokenType.StartObject then corrupt path "\"__metadata__\" is not a JSON object"
                    next path &reader
                    while reader.TokenType <> JsonTokenType.EndObject do
                        let key = text path (fun () -> "a metadata key") &reader
                        counted ()
                        if metadata.ContainsKey key then corrupt path "metadata '%s' appears twice" (shown key)
                        next path &reader
                        if reader.TokenType <> JsonTokenType.String then corrupt path "metadata '%s' is not a string" (shown key)
                        metadata <- metadata.Add(key, text path (fun () -> sprintf "metadata '%s'" (shown key)) &reader)
                        next path &reader
                else
                    let parsed = entry path name header scratch &reader
                    check path dataLength parsed
                    entries.Add parsed
                next path &reader
            // Only white space may follow the object (the reader throws on anything else).
            if reader.Read() then corrupt path "the header has more after its JSON object"
        with :? JsonException as e ->
            corrupt path "the header is not valid JSON (%s)" e.Message
        checkCoverage path dataLength entries
        List.ofSeq entries, metadata

    // ---- the file ----

    /// Opens a safetensors file: symbolic links resolved (a loop or a missing target is an error that says so), only
    /// a file with a size (a FIFO, socket or device reports none: opening a FIFO would wait for a writer forever), and
    /// file-system failures as GptException.
    let private openFile (path: string) : FileStream =
        if String.IsNullOrEmpty path then Errors.fail "safetensors file: the path is empty"
        // FileInfo looks at the link itself: a dangling link exists, a missing path does not.
        if not (FileInfo(path).Exists || Directory.Exists path) then Errors.fail "safetensors file '%s' does not exist" path
        let target =
            try
                match FileInfo(path).ResolveLinkTarget true with
                | null -> path
                | resolved when resolved.Exists || Directory.Exists resolved.FullName -> resolved.FullName
                | resolved -> Errors.fail "safetensors file '%s' is a symbolic link to '%s', which does not exist" path resolved.FullName
            with
            | :? IOException
            | :? UnauthorizedAccessException as e ->
                Errors.fail "safetensors file '%s' is a symbolic link that cannot be followed (%s)" path e.Message
        if Directory.Exists target then Errors.fail "safetensors file '%s' is a folder, expected a file" path
        if not (File.Exists target) then Errors.fail "safetensors file '%s' does not exist" path
        let length =
            try
                FileInfo(target).Length
            with
            | :? IOException
            | :? UnauthorizedAccessException as e -> Errors.fail "safetensors file '%s' cannot be read (%s)" path e.Message
        if length < 8L then
            let hint = if length = 0L then " (an empty file, or not a regular file: a FIFO or a device has no size)" else ""
            corrupt path "the file has %d bytes, too short for the 8-byte header length%s" length hint
        let stream =
            try
                new FileStream(target, FileMode.Open, FileAccess.Read, FileShare.Read, 4096, FileOptions.RandomAccess)
            with
            | :? IOException
            | :? UnauthorizedAccessException as e -> Errors.fail "safetensors file '%s' cannot be opened (%s)" path e.Message
        if not stream.CanSeek then
            stream.Dispose()
            corrupt path "it is not a regular file"
        stream

    /// Reads exactly buffer.Length bytes, or fails saying what was being read.
    let private readExactly (path: string) (stream: FileStream) (buffer: Span<byte>) (what: unit -> string) =
        try
            stream.ReadExactly buffer
        with
        | :? EndOfStreamException -> corrupt path "the file ends inside %s" (what ())
        | :? IOException as e -> corrupt path "reading %s failed (%s)" (what ()) e.Message

    /// The header of an open file.
    let private readHeaderFrom (path: string) (stream: FileStream) : Header =
        let fileLength = stream.Length
        if fileLength < 8L then corrupt path "the file has %d bytes, too short for the 8-byte header length" fileLength
        let lengthBytes = Array.zeroCreate<byte> 8
        readExactly path stream (Span lengthBytes) (fun () -> "the header length")
        let headerLength = BitConverter.ToUInt64(lengthBytes, 0)
        if headerLength > uint64 (fileLength - 8L) then
            corrupt path "the header length %d runs past the end of the file (%d bytes)" headerLength fileLength
        if int64 headerLength > maxHeaderBytes then
            corrupt path "the header length %d exceeds the format's limit of %d bytes" headerLength maxHeaderBytes
        let headerBytes = Array.zeroCreate<byte> (int headerLength)
        readExactly path stream (Span headerBytes) (fun () -> "the header")
        let dataStart = 8L + int64 headerLength
        let entries, metadata = parse path headerBytes (fileLength - dataStart)
        { Entries = entries; Metadata = metadata; DataStart = dataStart }

    /// Reads and checks the header: UTF-8 and JSON well-formed, at most maxEntries entries, each entry complete, dtype
    /// known, byte count = shape x dtype size, and the tensors covering the data section exactly.
    let readHeader (path: string) : Header =
        use stream = openFile path
        readHeaderFrom path stream

    /// Reads every tensor, in header order, with the metadata, after the whole header has been checked. F16 and BF16
    /// are converted to float32 (the model computes in float32); F64 and the integer types keep their dtype. The caller
    /// owns the tensors.
    let readWithMetadata (path: string) : (string * torch.Tensor) list * Map<string, string> =
        if not BitConverter.IsLittleEndian then Errors.fail "safetensors files are little-endian; this machine is not"
        use stream = openFile path
        let header = readHeaderFrom path stream
        let tensors = ResizeArray<string * torch.Tensor>()
        try
            for entry in header.Entries do
                // The data goes straight into the tensor's memory, through one span: a tensor over 2 GiB does not fit.
                if entry.End - entry.Begin > int64 Int32.MaxValue then
                    corrupt path "tensor '%s' has %d bytes, more than this reader takes in one tensor (2 GiB)"
                        (shown entry.Name) (entry.End - entry.Begin)
                let scalarType, _ = byName[entry.DType]
                let raw = torch.empty(entry.Shape, dtype = scalarType)
                stream.Seek(header.DataStart + entry.Begin, SeekOrigin.Begin) |> ignore
                (try
                    readExactly path stream raw.bytes (fun () -> sprintf "the data of tensor '%s'" (shown entry.Name))
                 with _ ->
                    raw.Dispose()
                    reraise ())
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

    /// The floating-point tensors among these that hold NaN or an infinity, each with how many such values, in the
    /// given order. Loading does not look (a checkpoint may hold them on purpose); a loader that wants finite weights
    /// calls this or requireFinite.
    let findNonFinite (tensors: (string * torch.Tensor) seq) : (string * int64) list =
        use _ = torch.no_grad ()
        [ for name, tensor in tensors do
              if tensor.is_floating_point () then
                  let nonFinite =
                      match NonFinite.count tensor with
                      | Some count -> count
                      | None ->
                          use finite = torch.isfinite tensor
                          use count = finite.logical_not().sum()
                          count.item<int64> ()
                  if nonFinite > 0L then yield name, nonFinite ]

    /// Fails when a floating-point tensor holds NaN or an infinity, naming at most three of them and how many there are:
    /// "'x.safetensors': 2 tensors hold NaN or infinite values: 'h.0.attn.c_attn.weight' (1 of 1,769,472), ...".
    let requireFinite (source: string) (tensors: (string * torch.Tensor) seq) =
        let tensors = List.ofSeq tensors
        match findNonFinite tensors with
        | [] -> ()
        | found ->
            let sizes = dict [ for name, tensor in tensors -> name, tensor.numel () ]
            let listed =
                found
                |> List.truncate 3
                |> List.map (fun (name, count) -> sprintf "'%s' (%d of %d)" (shown name) count sizes[name])
                |> String.concat ", "
            let more = if found.Length > 3 then sprintf ", and %d more" (found.Length - 3) else ""
            Errors.fail "'%s': %d %s NaN or infinite values: %s%s" source found.Length
                (if found.Length = 1 then "tensor holds" else "tensors hold") listed more

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
        // What this writer makes, the reader above takes.
        if tensors.Length + metadata.Count > maxEntries then
            Errors.fail "safetensors file '%s': %d tensors and %d metadata items, the reader takes at most %d entries" path
                tensors.Length metadata.Count maxEntries
        match tensors |> List.tryFind (fun (_, tensor) -> tensor.Dimensions > int64 maxDimensions) with
        | Some(name, tensor) ->
            Errors.fail "safetensors file '%s': tensor '%s' has %d dimensions, the reader takes at most %d" path (shown name)
                tensor.Dimensions maxDimensions
        | None -> ()
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
