namespace Gpt.Weights

open System
open System.Collections.Generic
open System.IO
open System.IO.Compression
open System.Text
open TorchSharp
open Gpt

/// A value of a `torch.save` file, as far as a state dict or a checkpoint dictionary needs: plain containers, numbers,
/// strings, and tensors still on disk (TensorRef). Lists and dicts are mutable because the pickle program fills them
/// after creating them.
type PickleValue =
    | PNone
    | PBool of bool
    | PInt of int64
    | PFloat of float
    | PString of string
    | PBytes of byte[]
    | PTuple of PickleValue list
    | PList of ResizeArray<PickleValue>
    /// Key/value pairs in insertion order (an OrderedDict keeps its order, and a state dict's order is
    /// model.parameters()'s, which optimizer state indexes).
    | PDict of ResizeArray<PickleValue * PickleValue>
    | PTensor of TensorRef
    /// A global the reader allows (a storage type or a rebuild function), as module.name.
    | PGlobal of string
    /// A storage named by a persistent id: (dtype, archive key, element count).
    | PStorage of StorageRef

/// A storage record of the archive: the file `data/<Key>` holding Elements values of DType.
and StorageRef = { DType: torch.ScalarType; Key: string; Elements: int64 }

/// A tensor as torch._utils._rebuild_tensor_v2 describes it: a strided view into a storage.
and TensorRef =
    { Storage: StorageRef
      Offset: int64
      Shape: int64[]
      Stride: int64[] }

/// Our own reader of `torch.save` files (the zip format of PyTorch >= 1.6: `<prefix>/data.pkl`, a pickle program, and
/// `<prefix>/data/<key>`, one raw little-endian file per storage). Why not TorchSharp.PyBridge's unpickler: it builds
/// the objects of any global it meets through Razorvine.Pickle (as dictionaries rather than by running code, but still
/// objects the file chooses), allocates each tensor from the shape the file states before any check, reads a storage
/// file that is shorter than the tensor without an error, and ignores a view's storage offset. This reader runs the
/// pickle program on a small machine that knows only plain containers, numbers and strings, and of the globals only
/// OrderedDict, the tensor rebuild functions and the storage types; any other global (a class, `os.system`, ...) is an
/// error. Tensors stay references until `materialize`, which checks dtype, extent and the storage file's size before it
/// allocates; callers check shapes against a configuration in between.
[<RequireQualifiedAccess>]
module TorchPickle =
    /// The pickle program of a state dict is a few kilobytes; one larger than this is not a checkpoint we read.
    let maxPickleBytes = 64L * 1024L * 1024L

    let private storageTypes =
        dict [ "FloatStorage", torch.ScalarType.Float32
               "HalfStorage", torch.ScalarType.Float16
               "BFloat16Storage", torch.ScalarType.BFloat16
               "DoubleStorage", torch.ScalarType.Float64
               "LongStorage", torch.ScalarType.Int64
               "IntStorage", torch.ScalarType.Int32
               "ShortStorage", torch.ScalarType.Int16
               "CharStorage", torch.ScalarType.Int8
               "ByteStorage", torch.ScalarType.Byte
               "BoolStorage", torch.ScalarType.Bool ]

    /// Bytes per element of the dtypes a storage can have here.
    let elementSize (dtype: torch.ScalarType) =
        match dtype with
        | torch.ScalarType.Float64 | torch.ScalarType.Int64 -> 8L
        | torch.ScalarType.Float32 | torch.ScalarType.Int32 -> 4L
        | torch.ScalarType.Float16 | torch.ScalarType.BFloat16 | torch.ScalarType.Int16 -> 2L
        | _ -> 1L

    let private allowedGlobals =
        set [ "collections.OrderedDict"
              "torch._utils._rebuild_tensor"
              "torch._utils._rebuild_tensor_v2"
              "torch._utils._rebuild_parameter" ]

    /// A value in a few words, for error messages (never the whole of a large dict).
    let describe (value: PickleValue) =
        match value with
        | PNone -> "None"
        | PBool b -> sprintf "the boolean %b" b
        | PInt n -> sprintf "the integer %d" n
        | PFloat x -> sprintf "the number %g" x
        | PString s -> sprintf "the string '%s'" (if s.Length > 40 then s.Substring(0, 40) + "..." else s)
        | PBytes b -> sprintf "%d bytes" b.Length
        | PTuple items -> sprintf "a tuple of %d items" items.Length
        | PList items -> sprintf "a list of %d items" items.Count
        | PDict pairs -> sprintf "a dict of %d items" pairs.Count
        | PTensor t -> sprintf "a tensor of size %s" (Errors.shapeText t.Shape)
        | PGlobal name -> name
        | PStorage s -> sprintf "storage '%s'" s.Key

    let private fail (path: string) format =
        Printf.ksprintf (fun message -> raise (GptException(sprintf "PyTorch checkpoint '%s': %s" path message))) format

    /// Runs the pickle program (protocols 2 to 4, the opcodes torch.save's pickler emits for containers, numbers,
    /// strings and tensors).
    let private run (path: string) (program: byte[]) : PickleValue =
        let fail format = fail path format
        let stack = Stack<PickleValue>()
        let marks = Stack<int>()
        let memo = Dictionary<int64, PickleValue>()
        let mutable position = 0
        let need count =
            if position + count > program.Length then fail "the pickle program ends inside an instruction at byte %d" position
        let readByte () =
            need 1
            position <- position + 1
            program[position - 1]
        let bytes count =
            if count < 0 || int64 position + int64 count > int64 program.Length then
                fail "a string of %d bytes at byte %d runs past the end of the pickle program" count position
            position <- position + count
            program[position - count .. position - 1]
        let readUInt16 () = let b = bytes 2 in int b[0] ||| (int b[1] <<< 8)
        let readInt32 () = BitConverter.ToInt32(bytes 4, 0)
        let length32 () =
            let n = BitConverter.ToUInt32(bytes 4, 0)
            if int64 n > int64 program.Length then fail "a string of %d bytes at byte %d cannot fit in the pickle program" n position
            int n
        let pop () = if stack.Count = 0 then fail "the pickle program pops an empty stack at byte %d" position else stack.Pop()
        let popMark () =
            if marks.Count = 0 then fail "the pickle program has no MARK for the instruction at byte %d" position
            let mark = marks.Pop()
            let items = [ while stack.Count > mark do yield stack.Pop() ] |> List.rev
            items
        let push value = stack.Push value
        let memoize key =
            if stack.Count = 0 then fail "the pickle program memoizes an empty stack at byte %d" position
            memo[key] <- stack.Peek()
        let recall key =
            match memo.TryGetValue key with
            | true, value -> push value
            | _ -> fail "the pickle program reads memo slot %d, which was never written" key
        let textLine () =
            let start = position
            while position < program.Length && program[position] <> 10uy do position <- position + 1
            if position >= program.Length then fail "the pickle program ends inside a GLOBAL name"
            position <- position + 1
            Encoding.ASCII.GetString(program, start, position - start - 1)
        let globalRef (moduleName: string) (name: string) =
            let full = moduleName + "." + name
            if moduleName = "torch" && storageTypes.ContainsKey name then PGlobal full
            elif allowedGlobals.Contains full then PGlobal full
            else fail "the pickle refers to '%s', which a state dict never does: only tensors and plain containers are read (no classes, no code)" full
        let asInt (value: PickleValue) (what: string) =
            match value with
            | PInt n -> n
            | PBool b -> if b then 1L else 0L
            | other -> fail "%s must be an integer, found %s" what (describe other)
        let ints (value: PickleValue) (what: string) =
            match value with
            | PTuple items -> items |> List.map (fun v -> asInt v what) |> Array.ofList
            | PList items -> items |> Seq.map (fun v -> asInt v what) |> Array.ofSeq
            | other -> fail "%s must be a tuple of integers, found %s" what (describe other)
        let reduce (callable: PickleValue) (args: PickleValue) =
            let arguments = match args with PTuple items -> items | other -> fail "REDUCE arguments must be a tuple, found %s" (describe other)
            match callable, arguments with
            | PGlobal "collections.OrderedDict", [] -> PDict(ResizeArray())
            | PGlobal "collections.OrderedDict", [ (PTuple _ | PList _) as items ] ->
                // OrderedDict(iterable of pairs), as some picklers (TorchSharp.PyBridge's) write it.
                let items = match items with PTuple l -> l | PList l -> List.ofSeq l | _ -> []
                let pair item =
                    match item with
                    | PTuple [ k; v ] -> k, v
                    | PList l when l.Count = 2 -> l[0], l[1]
                    | other -> fail "OrderedDict takes (key, value) pairs, found %s" (describe other)
                PDict(ResizeArray(items |> List.map pair))
            | PGlobal("torch._utils._rebuild_tensor_v2" | "torch._utils._rebuild_tensor"), PStorage storage :: offset :: size :: stride :: _ ->
                let shape = ints size "a tensor's size"
                let strides = ints stride "a tensor's stride"
                if shape.Length <> strides.Length then fail "a tensor has size %s but stride %s" (Errors.shapeText shape) (Errors.shapeText strides)
                PTensor { Storage = storage; Offset = asInt offset "a tensor's storage offset"; Shape = shape; Stride = strides }
            | PGlobal "torch._utils._rebuild_parameter", (PTensor _ as tensor) :: _ -> tensor
            | PGlobal name, _ -> fail "%s called with unexpected arguments (%s)" name (arguments |> List.map describe |> String.concat ", ")
            | other, _ -> fail "the pickle calls %s, which is not a function this reader allows" (describe other)
        let persistent (pid: PickleValue) =
            match pid with
            | PTuple [ PString "storage"; PGlobal storageType; key; _location; elements ] ->
                let typeName = storageType.Substring(storageType.LastIndexOf '.' + 1)
                let key = match key with PString k -> k | PInt k -> string k | other -> fail "a storage key must be a string, found %s" (describe other)
                if key.Length = 0 || key |> Seq.exists (fun c -> not (Char.IsAsciiLetterOrDigit c || c = '_')) then
                    fail "storage key '%s' is not a plain name" key
                let elements = asInt elements "a storage's element count"
                if elements < 0L then fail "storage '%s' has a negative element count %d" key elements
                PStorage { DType = storageTypes[typeName]; Key = key; Elements = elements }
            | other -> fail "unknown persistent id %s: expected (\"storage\", type, key, location, count)" (describe other)
        let mutable result = None
        while result.IsNone do
            if position >= program.Length then fail "the pickle program ends without STOP"
            let opcode = readByte ()
            match opcode with
            | 0x80uy -> readByte () |> ignore // PROTO
            | 0x95uy -> bytes 8 |> ignore // FRAME: a length hint
            | '.'B -> result <- Some(pop ()) // STOP
            | '('B -> marks.Push stack.Count // MARK
            | '0'B -> pop () |> ignore // POP
            | '1'B -> popMark () |> ignore // POP_MARK
            | '2'B -> let top = pop () in push top; push top // DUP
            | 'N'B -> push PNone
            | 0x88uy -> push (PBool true)
            | 0x89uy -> push (PBool false)
            | 'J'B -> push (PInt(int64 (readInt32 ()))) // BININT
            | 'K'B -> push (PInt(int64 (readByte ()))) // BININT1
            | 'M'B -> push (PInt(int64 (readUInt16 ()))) // BININT2
            | 0x8auy -> // LONG1: little-endian two's complement
                let n = int (readByte ())
                if n > 8 then fail "an integer of %d bytes is too large" n
                let b = bytes n
                let mutable value = 0L
                for i in n - 1 .. -1 .. 0 do value <- (value <<< 8) ||| int64 b[i]
                if n > 0 && n < 8 && b[n - 1] >= 0x80uy then value <- value - (1L <<< (8 * n))
                push (PInt value)
            | 'G'B -> let b = bytes 8 in push (PFloat(BitConverter.ToDouble(Array.rev b, 0))) // BINFLOAT, big-endian
            | 'X'B -> let n = length32 () in push (PString(Encoding.UTF8.GetString(bytes n))) // BINUNICODE
            | 0x8cuy -> let n = int (readByte ()) in push (PString(Encoding.UTF8.GetString(bytes n))) // SHORT_BINUNICODE
            | 'B'B -> let n = length32 () in push (PBytes(bytes n)) // BINBYTES
            | 'C'B -> let n = int (readByte ()) in push (PBytes(bytes n)) // SHORT_BINBYTES
            | ')'B -> push (PTuple [])
            | 't'B -> push (PTuple(popMark ()))
            | 0x85uy -> let a = pop () in push (PTuple [ a ])
            | 0x86uy -> let b = pop () in let a = pop () in push (PTuple [ a; b ])
            | 0x87uy -> let c = pop () in let b = pop () in let a = pop () in push (PTuple [ a; b; c ])
            | ']'B -> push (PList(ResizeArray()))
            | 'l'B -> push (PList(ResizeArray(popMark ()))) // LIST
            | '}'B -> push (PDict(ResizeArray()))
            | 'a'B -> // APPEND
                let item = pop ()
                match pop () with
                | PList items as list -> items.Add item; push list
                | other -> fail "APPEND to %s, not a list" (describe other)
            | 'e'B -> // APPENDS
                let items = popMark ()
                match pop () with
                | PList list as value -> list.AddRange items; push value
                | other -> fail "APPENDS to %s, not a list" (describe other)
            | 's'B -> // SETITEM
                let value = pop ()
                let key = pop ()
                match pop () with
                | PDict pairs as dictionary -> pairs.Add((key, value)); push dictionary
                | other -> fail "SETITEM on %s, not a dict" (describe other)
            | 'u'B -> // SETITEMS
                let items = popMark ()
                if items.Length % 2 <> 0 then fail "SETITEMS with an odd number of items"
                match pop () with
                | PDict pairs as dictionary ->
                    for pair in List.chunkBySize 2 items do pairs.Add((pair[0], pair[1]))
                    push dictionary
                | other -> fail "SETITEMS on %s, not a dict" (describe other)
            | 'q'B -> memoize (int64 (readByte ())) // BINPUT
            | 'r'B -> memoize (int64 (BitConverter.ToUInt32(bytes 4, 0))) // LONG_BINPUT
            | 0x94uy -> memoize (int64 memo.Count) // MEMOIZE
            | 'h'B -> recall (int64 (readByte ())) // BINGET
            | 'j'B -> recall (int64 (BitConverter.ToUInt32(bytes 4, 0))) // LONG_BINGET
            | 'c'B -> // GLOBAL "module\nname\n"
                let moduleName = textLine ()
                let name = textLine ()
                push (globalRef moduleName name)
            | 0x93uy -> // STACK_GLOBAL
                let name = pop ()
                let moduleName = pop ()
                match moduleName, name with
                | PString m, PString n -> push (globalRef m n)
                | _ -> fail "STACK_GLOBAL needs two strings"
            | 'Q'B -> push (persistent (pop ())) // BINPERSID
            | 'R'B -> // REDUCE
                let args = pop ()
                let callable = pop ()
                push (reduce callable args)
            | 'b'B -> // BUILD: an OrderedDict's __dict__ (a state dict's _metadata of module versions) is not needed
                let _state = pop ()
                match stack.Count with
                | 0 -> fail "BUILD on an empty stack"
                | _ ->
                    match stack.Peek() with
                    | PDict _ -> ()
                    | other -> fail "BUILD on %s: only an OrderedDict's attributes are accepted" (describe other)
            | _ ->
                fail "pickle opcode 0x%02x at byte %d is not one a state dict needs (objects, classes and code are not read)" opcode (position - 1)
        result.Value

    /// An opened torch.save archive: its pickle's value and the storage files, until disposed.
    type Archive internal (path: string, zip: ZipArchive, root: PickleValue, prefix: string) =
        /// The file, for messages.
        member _.Path = path
        /// The value torch.save wrote (a state dict, or a dictionary of them).
        member _.Root = root

        /// Reads a tensor after checking its dtype, its view's extent within the storage and the storage file's
        /// length against the storage's element count. A new contiguous tensor the caller owns.
        member _.Materialize(name: string, tensor: TensorRef) : torch.Tensor =
            let fail format = fail path format
            let storage = tensor.Storage
            if tensor.Shape |> Array.exists (fun n -> n < 0L) || tensor.Stride |> Array.exists (fun n -> n < 0L) || tensor.Offset < 0L then
                fail "tensor '%s' has a negative size, stride or offset (size %s, stride %s, offset %d)" name
                    (Errors.shapeText tensor.Shape) (Errors.shapeText tensor.Stride) tensor.Offset
            let elements =
                try tensor.Shape |> Array.fold (fun acc n -> Checked.(*) acc n) 1L
                with :? OverflowException -> fail "tensor '%s' has an impossible size %s" name (Errors.shapeText tensor.Shape)
            let extent =
                if elements = 0L then 0L
                else
                    try tensor.Offset + (Array.fold2 (fun acc n s -> Checked.(+) acc (Checked.(*) (n - 1L) s)) 0L tensor.Shape tensor.Stride) + 1L
                    with :? OverflowException -> fail "tensor '%s' has an impossible stride %s" name (Errors.shapeText tensor.Stride)
            if extent > storage.Elements then
                fail "tensor '%s' (size %s, stride %s, offset %d) reaches element %d of storage '%s', which has %d" name
                    (Errors.shapeText tensor.Shape) (Errors.shapeText tensor.Stride) tensor.Offset extent storage.Key storage.Elements
            let entry = zip.GetEntry(prefix + "data/" + storage.Key)
            if isNull entry then fail "tensor '%s': the archive has no storage file '%sdata/%s'" name prefix storage.Key
            let byteCount = storage.Elements * elementSize storage.DType
            if entry.Length <> byteCount then
                fail "storage '%s' of tensor '%s' has %d bytes, but %d %O values need %d: the file is truncated or corrupt" storage.Key name
                    entry.Length storage.Elements storage.DType byteCount
            if byteCount > int64 Int32.MaxValue then fail "storage '%s' of tensor '%s' is larger than 2 GB, which this reader cannot hold" storage.Key name
            use whole = torch.empty([| storage.Elements |], dtype = storage.DType)
            (use stream = entry.Open()
             try stream.ReadExactly(whole.bytes)
             with :? EndOfStreamException -> fail "storage '%s' of tensor '%s' ends early: the file is truncated" storage.Key name)
            use view = whole.as_strided(tensor.Shape, tensor.Stride, tensor.Offset)
            use contiguous = view.contiguous ()
            contiguous.clone ()

        interface IDisposable with
            member _.Dispose() = zip.Dispose()

    /// Opens a torch.save file and runs its pickle program (no tensor is read yet). Dispose the archive.
    let openArchive (path: string) : Archive =
        if not (File.Exists path) then Errors.fail "PyTorch checkpoint '%s' does not exist" path
        // A regular file only (links followed): opening a FIFO would wait for a writer forever.
        let target, _ = BoundedFile.check "PyTorch checkpoint" Int64.MaxValue path
        let stream = new FileStream(target, FileMode.Open, FileAccess.Read, FileShare.Read)
        let signature = Array.zeroCreate<byte> 4
        let read = stream.Read(signature, 0, 4)
        if read < 4 || signature <> [| 0x50uy; 0x4Buy; 0x03uy; 0x04uy |] then
            stream.Dispose()
            if read >= 2 && signature[0] = 0x80uy then
                fail path "this is PyTorch's legacy (pre-1.6) serialization, which is not read: re-save it with torch.save in PyTorch >= 1.6"
            fail path "not a zip archive (the format torch.save writes since PyTorch 1.6)"
        stream.Position <- 0L
        let zip =
            try new ZipArchive(stream, ZipArchiveMode.Read, false)
            with :? InvalidDataException as e ->
                stream.Dispose()
                fail path "could not be read as a zip archive (%s)" e.Message
        try
            let pickles = zip.Entries |> Seq.filter (fun e -> e.FullName.EndsWith("/data.pkl", StringComparison.Ordinal) || e.FullName = "data.pkl") |> List.ofSeq
            let entry =
                match pickles with
                | [ entry ] -> entry
                | [] -> fail path "the archive has no data.pkl: not a torch.save file"
                | _ -> fail path "the archive has %d data.pkl files, expected one" pickles.Length
            let prefix = entry.FullName.Substring(0, entry.FullName.Length - "data.pkl".Length)
            match zip.GetEntry(prefix + "byteorder") with
            | null -> ()
            | order ->
                use reader = new StreamReader(order.Open())
                let text = reader.ReadToEnd().Trim()
                if text <> "little" then fail path "the tensors are stored %s-endian; only little-endian files are read" text
            if entry.Length > maxPickleBytes then
                fail path "data.pkl has %d bytes, more than the %d a state dict needs" entry.Length maxPickleBytes
            let program =
                use source = entry.Open()
                use buffer = new MemoryStream()
                source.CopyTo buffer
                buffer.ToArray()
            new Archive(path, zip, run path program, prefix)
        with _ ->
            zip.Dispose()
            reraise ()

    /// The tensors of a state dict value: (name, reference) pairs in the file's order, or an error naming what else it
    /// holds.
    let stateDictEntries (path: string) (value: PickleValue) : (string * TensorRef) list =
        match value with
        | PDict pairs ->
            [ for key, item in pairs ->
                  match key, item with
                  | PString name, PTensor tensor -> name, tensor
                  | PString name, other -> fail path "entry '%s' is %s, not a tensor: expected a state dict" name (describe other)
                  | other, _ -> fail path "a key (%s) is not a string: expected a state dict" (describe other) ]
        | other -> fail path "the file holds %s, not a state dict (a dictionary of tensors)" (describe other)

    /// Looks up a string key in a dictionary value.
    let tryField (key: string) (value: PickleValue) =
        match value with
        | PDict pairs -> pairs |> Seq.tryPick (fun (k, v) -> if k = PString key then Some v else None)
        | _ -> None

    /// Reads a state dict file (`torch.save(model.state_dict(), path)`) with every tensor materialized, in the file's
    /// order. The caller owns the tensors.
    let readStateDict (path: string) : (string * torch.Tensor) list =
        use archive = openArchive path
        let entries = stateDictEntries path archive.Root
        let tensors = ResizeArray()
        try
            for name, tensor in entries do tensors.Add((name, archive.Materialize(name, tensor)))
            List.ofSeq tensors
        with _ ->
            for _, t in tensors do t.Dispose()
            reraise ()
