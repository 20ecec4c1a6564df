/// Hostile and broken safetensors files: every one is a GptException with a clear, short message or a correct load;
/// never another exception, a hang, or memory out of proportion to the file. A seeded fuzz suite corrupts real files
/// in every way the issue lists (truncation, flipped bytes, header length off, bad JSON, wrong dtypes, shapes and
/// offsets, huge entry counts, invalid UTF-8, FIFOs, symbolic link loops and dangling links).
module Gpt.Tests.SafetensorsHardeningTests

open System
open System.Diagnostics
open System.IO
open System.Text
open System.Threading.Tasks
open Expecto
open TorchSharp
open Gpt
open Gpt.Weights
open Gpt.Tests.TestUtil
open Gpt.Tests.PretrainedTests

/// The outcome of reading a file: tensors read (then disposed) or the error's message.
type private Outcome =
    | Loaded of entries: int * bytes: int64
    | Refused of message: string

/// Reads a file completely, on another thread so that a hang fails the test instead of stopping the suite (a guard,
/// not a timing: the limit is far above any real read), with the managed bytes that thread allocated meanwhile.
/// Anything but a GptException propagates: a failure.
let private attemptMeasured (path: string) : Outcome * int64 =
    let work =
        Task.Run(fun () ->
            let before = GC.GetAllocatedBytesForCurrentThread()
            let outcome =
                try
                    let tensors, _ = Safetensors.readWithMetadata path
                    let bytes = tensors |> List.sumBy (fun (_, t) -> t.numel () * int64 t.ElementSize)
                    for _, t in tensors do t.Dispose()
                    Loaded(tensors.Length, bytes)
                with :? GptException as e -> Refused e.Message
            outcome, GC.GetAllocatedBytesForCurrentThread() - before)
    if not (work.Wait(TimeSpan.FromSeconds 60.0)) then failtestf "reading '%s' did not finish within 60 s" path
    work.Result

let private attempt (path: string) : Outcome = fst (attemptMeasured path)

let private refused (fragments: string list) (path: string) (what: string) =
    match attempt path with
    | Loaded _ -> failtestf "%s: the file loaded, expected an error containing %A" what fragments
    | Refused message ->
        for fragment in fragments do
            Expect.stringContains message fragment (sprintf "%s: message '%s'" what message)
        Expect.isLessThan message.Length 600 (sprintf "%s: a short message" what)

/// A small valid file of our own writer: several dtypes, an empty tensor, metadata.
let private writeSample (path: string) =
    use a = torch.arange(12.0f).view(3L, 4L)
    use b = torch.tensor([| 1L; -2L; 3L |])
    use c = torch.ones(2L, dtype = torch.float16)
    use d = torch.zeros(0L, 5L)
    use e = torch.tensor([| 7uy |])
    Safetensors.writeWithMetadata path (Map.ofList [ "format", "pt"; "note", "ünïcode" ]) [ "a", a; "b", b; "c", c; "empty", d; "e", e ]

/// A file from a header given as bytes and data bytes, the length field computed unless given.
let private rawBytes (path: string) (header: byte[]) (data: byte[]) =
    File.WriteAllBytes(path, Array.concat [ BitConverter.GetBytes(uint64 header.Length); header; data ])

/// The header bytes and data of a file.
let private split (bytes: byte[]) =
    let length = int (BitConverter.ToUInt64(bytes, 0))
    bytes[8 .. 8 + length - 1], bytes[8 + length ..]

let private makeFifo (path: string) =
    try
        use mkfifo = Process.Start(ProcessStartInfo("mkfifo", path, UseShellExecute = false))
        mkfifo.WaitForExit()
        mkfifo.ExitCode = 0
    with _ -> false

[<Tests>]
let tests =
    testList "safetensors: hostile files" [
        testCase "invalid UTF-8 in a name, a dtype or metadata is an error with its offset" <| fun () ->
            use temp = new TempDir()
            let path = temp.File "bad.safetensors"
            let twelve = Array.zeroCreate<byte> 12
            let withBytes (before: string) (bad: byte[]) (after: string) =
                Array.concat [ Encoding.UTF8.GetBytes before; bad; Encoding.UTF8.GetBytes after ]
            for header, what in
                [ withBytes "{\"a" [| 0xFFuy |] "\": {\"dtype\": \"F32\", \"shape\": [3], \"data_offsets\": [0, 12]}}", "name"
                  withBytes "{\"a\": {\"dtype\": \"F3" [| 0xC0uy; 0x80uy |] "\", \"shape\": [3], \"data_offsets\": [0, 12]}}", "overlong dtype"
                  withBytes "{\"__metadata__\": {\"k\": \"" [| 0xE2uy; 0x82uy |] "\"}, \"a\": {\"dtype\": \"F32\", \"shape\": [3], \"data_offsets\": [0, 12]}}", "truncated sequence in metadata"
                  withBytes "{\"a\": {\"dtype\": \"F32\", \"shape\": [3], \"data_offsets\": [0, 12]}, \"" [| 0xEDuy; 0xA0uy; 0x80uy |] "\": 1}", "encoded surrogate" ] do
                rawBytes path header twelve
                refused [ "bad.safetensors"; "the header is not valid UTF-8 (byte" ] path what
            rawFile path """{"\ud800": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}}""" twelve
            refused [ "a tensor name in the header is not valid text" ] path "an escaped half surrogate"

        testCase "the tensors must cover the data section exactly" <| fun () ->
            use temp = new TempDir()
            let path = temp.File "bad.safetensors"
            let twelve = Array.zeroCreate<byte> 12
            rawFile path """{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}""" twelve
            refused [ "bytes [4, 8) of the data section belong to no tensor"; "after 'a', before 'b'" ] path "gap"
            rawFile path """{"b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}""" twelve
            refused [ "bytes [0, 4) of the data section belong to no tensor (a gap, before 'b')" ] path "gap at the start"
            rawFile path """{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}""" twelve
            refused [ "the data section has 12 bytes but the tensors cover 8" ] path "bytes after the last tensor"
            rawFile path """{"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}, "z": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]}}""" twelve
            refused [ "tensors 'a' [0, 12] and 'z' [4, 4] overlap" ] path "an empty tensor inside another"
            // Out of order in the header, contiguous in the data, empty tensors at the seams: a correct file.
            rawFile path """{"c": {"dtype": "U8", "shape": [4], "data_offsets": [8, 12]}, "e": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "f": {"dtype": "I64", "shape": [0, 3], "data_offsets": [12, 12]}}""" twelve
            Expect.equal (attempt path) (Loaded(4, 12L)) "contiguous out of order"
            rawFile path "{}" [||]
            Expect.equal (attempt path) (Loaded(0, 0L)) "an empty file of no tensors"

        testCase "a header length off by one to eight is an error, never tensors read a few bytes off" <| fun () ->
            use temp = new TempDir()
            let source = temp.File "good.safetensors"
            writeSample source
            let fixtureBytes = File.ReadAllBytes(fixture "tiny-gpt2/model.safetensors")
            for bytes, what in [ File.ReadAllBytes source, "sample"; fixtureBytes, "tiny-gpt2" ] do
                let length = BitConverter.ToUInt64(bytes, 0)
                for delta in [ -8L .. -1L ] @ [ 1L .. 8L ] do
                    let path = temp.File(sprintf "%s%+d.safetensors" what delta)
                    let copy = Array.copy bytes
                    BitConverter.GetBytes(uint64 (int64 length + delta)).CopyTo(copy, 0)
                    File.WriteAllBytes(path, copy)
                    refused [ Path.GetFileName path ] path (sprintf "%s, header length %+d" what delta)

        testCase "a header of 1.6 million empty tensors (99 MB) is refused after the first 100,000, with a short message" <| fun () ->
            use temp = new TempDir()
            let path = temp.File "many.safetensors"
            let builder = StringBuilder(100_000_000)
            builder.Append('{') |> ignore
            let mutable i = 0
            while builder.Length < 99_000_000 do
                if i > 0 then builder.Append(',') |> ignore
                builder.Append("\"t").Append(i).Append("\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]}") |> ignore
                i <- i + 1
            builder.Append('}') |> ignore
            rawFile path (builder.ToString()) [||]
            Expect.isGreaterThan i 1_500_000 "1.5 million entries or more"
            let outcome, allocated = attemptMeasured path
            match outcome with
            | Refused message ->
                Expect.stringContains message "the header has more than 100000 entries" "too many entries"
                Expect.isLessThan message.Length 600 "a short message"
            | Loaded _ -> failtest "loaded 1.6 million entries"
            // The 99 MB header itself, then a bounded amount for at most 100,000 entries (well under 1 KB each): no
            // document of the whole header, no list of 1.6 million.
            Expect.isLessThan allocated 250_000_000L (sprintf "allocated %d bytes" allocated)

        testCase "too many dimensions, an impossible shape, a duplicate field: errors" <| fun () ->
            use temp = new TempDir()
            let path = temp.File "bad.safetensors"
            let ones = String.replicate 64 "1, " + "1"
            rawFile path (sprintf """{"a": {"dtype": "U8", "shape": [%s], "data_offsets": [0, 1]}}""" ones) [| 0uy |]
            refused [ "tensor 'a': \"shape\" has more than 64 dimensions" ] path "65 dimensions"
            rawFile path """{"a": {"dtype": "F32", "shape": [0, 4611686018427387904, 4611686018427387904], "data_offsets": [0, 0]}}""" [||]
            refused [ "tensor 'a' has an impossible shape" ] path "empty, but with huge dimensions"
            rawFile path """{"a": {"dtype": "F32", "dtype": "F64", "shape": [1], "data_offsets": [0, 4]}}""" (Array.zeroCreate 4)
            refused [ "tensor 'a': \"dtype\" appears twice in the header entry" ] path "a field twice"
            rawFile path """{"__metadata__": {"k": "1", "k": "2"}}""" [||]
            refused [ "metadata 'k' appears twice" ] path "a metadata key twice"
            rawFile path """{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}""" (Array.zeroCreate 4)
            refused [ "\"data_offsets\" must be [begin, end]" ] path "three offsets"
            let longName = String('n', 5000) + "\n\u001b[31m"
            rawFile path (sprintf """{"%s": {"dtype": "X", "shape": [1], "data_offsets": [0, 4]}}""" (Text.Json.JsonEncodedText.Encode(longName).ToString())) (Array.zeroCreate 4)
            match attempt path with
            | Refused message ->
                Expect.stringContains message "(5006 characters)" "a long name is cut"
                Expect.isFalse (message.Contains '\u001b') "control characters are escaped"
            | Loaded _ -> failtest "loaded a file with dtype X"

        testCase "FIFOs, devices, folders and symbolic links: a clear error or the file it points to" <| fun () ->
            use temp = new TempDir()
            let good = temp.File "good.safetensors"
            writeSample good
            let expected = attempt good
            let link name target =
                let path = temp.File name
                File.CreateSymbolicLink(path, target) |> ignore
                path
            Expect.equal (attempt (link "to-good.safetensors" good)) expected "a link to a good file reads that file"
            Expect.equal (attempt (link "chain.safetensors" (temp.File "to-good.safetensors"))) expected "a chain of links"
            link "loop-a.safetensors" (temp.File "loop-b.safetensors") |> ignore
            link "loop-b.safetensors" (temp.File "loop-a.safetensors") |> ignore
            refused [ "loop-a.safetensors' is a symbolic link that cannot be followed" ] (temp.File "loop-a.safetensors") "a loop"
            refused [ "is a symbolic link to"; "which does not exist" ] (link "dangling.safetensors" (temp.File "nothing")) "dangling"
            refused [ "is a folder" ] temp.Path "a folder"
            refused [ "is a folder" ] (link "to-folder.safetensors" temp.Path) "a link to a folder"
            if File.Exists "/dev/zero" then
                refused [ "the file has 0 bytes" ] (link "zero.safetensors" "/dev/zero") "/dev/zero"
            let fifo = temp.File "fifo.safetensors"
            if makeFifo fifo then
                refused [ "fifo.safetensors"; "the file has 0 bytes" ] fifo "a FIFO with no writer: refused, not waited on"

        testCase "findNonFinite and requireFinite: NaN and infinities in float tensors, at most three names listed" <| fun () ->
            use clean = torch.ones(4L)
            use nan = torch.tensor([| 1.0f; Single.NaN; 2.0f |])
            use inf = torch.tensor([| Double.PositiveInfinity; Double.NegativeInfinity |])
            use half = torch.tensor([| 1.0f; Single.PositiveInfinity |]).``to``(torch.float16)
            use integers = torch.tensor([| 1L; 2L |])
            let tensors = [ "clean", clean; "nan", nan; "inf", inf; "half", half; "integers", integers ]
            Expect.equal (Safetensors.findNonFinite tensors) [ "nan", 1L; "inf", 2L; "half", 1L ] "found"
            Safetensors.requireFinite "ok.safetensors" [ "clean", clean; "integers", integers ]
            throwsGpt [ "'x.safetensors': 3 tensors hold NaN or infinite values: 'nan' (1 of 3), 'inf' (2 of 2), 'half' (1 of 2)" ]
                (fun () -> Safetensors.requireFinite "x.safetensors" tensors) "three"
            use more = torch.tensor([| Single.NaN; Single.NaN |])
            let many = [ for i in 1 .. 10 -> sprintf "t%d" i, more ]
            throwsGpt [ "10 tensors hold"; "'t3' (2 of 2), and 7 more" ] (fun () -> Safetensors.requireFinite "x.safetensors" many) "ten"

        testCase "findNonFinite counts as libtorch's isfinite does: every float type, every length, the extremes that are finite" <| fun () ->
            let random = Random 7
            for dtype in [ torch.float64; torch.float32; torch.float16; torch.bfloat16 ] do
                for length in [ 0; 1; 7; 8; 9; 33; 1000; 4099 ] do
                    use values = torch.tensor(Array.init length (fun _ -> (random.NextDouble() - 0.5) * 2000.0))
                    // NaN, both infinities, the largest finite value and the smallest subnormal of the type, at random places
                    let largest, tiny =
                        if dtype = torch.float16 then 65504.0, 5.96e-8
                        elif dtype = torch.bfloat16 then 3.38e38, 9.2e-41
                        elif dtype = torch.float32 then float Single.MaxValue, float Single.Epsilon
                        else Double.MaxValue, Double.Epsilon
                    for special in [ nan; infinity; -infinity; largest; -largest; tiny ] do
                        if length > 0 then values[int64 (random.Next length)] <- torch.tensor(special)
                    use typed = values.``to``(dtype)
                    use finite = torch.isfinite typed
                    use notFinite = finite.logical_not().sum()
                    let expected = notFinite.item<int64> ()
                    let found = Safetensors.findNonFinite [ "t", typed ] |> List.sumBy snd
                    Expect.equal found expected (sprintf "%O, %d values" dtype length)
            // not contiguous: libtorch counts
            use matrix = torch.tensor([| 1.0f; Single.NaN; 2.0f; Single.PositiveInfinity |]).view(2L, 2L)
            use transposed = matrix.t()
            Expect.equal (Safetensors.findNonFinite [ "t", transposed ]) [ "t", 2L ] "a transposed view"

        testCase "NaN weights read from a file are found after loading" <| fun () ->
            use temp = new TempDir()
            let path = temp.File "nan.safetensors"
            use weights = torch.tensor([| 0.5f; Single.NaN |])
            Safetensors.write path [ "w", weights ]
            let tensors, _ = Safetensors.readWithMetadata path
            try
                Expect.equal (Safetensors.findNonFinite tensors) [ "w", 1L ] "one NaN"
            finally
                for _, t in tensors do t.Dispose()
    ]

// ---- the fuzz suite ----------------------------------------------------------------------------------------------

/// One corruption of a valid file's bytes: its name and the corrupted bytes.
let private corruptions (random: Random) (bytes: byte[]) : (string * byte[]) list =
    let header, data = split bytes
    let headerText = Encoding.UTF8.GetString header
    let withHeader (text: string) = Array.concat [ BitConverter.GetBytes(uint64 (Encoding.UTF8.GetByteCount text)); Encoding.UTF8.GetBytes text; data ]
    let withHeaderBytes (h: byte[]) = Array.concat [ BitConverter.GetBytes(uint64 h.Length); h; data ]
    let replaceRandom (pattern: string) (replacement: unit -> string) =
        let matches = RegularExpressions.Regex.Matches(headerText, pattern)
        if matches.Count = 0 then headerText
        else
            let m = matches[random.Next matches.Count]
            headerText.Substring(0, m.Index) + replacement () + headerText.Substring(m.Index + m.Length)
    let pick (items: 'a[]) = items[random.Next items.Length]
    [ // truncation anywhere
      "truncate", bytes[.. random.Next bytes.Length - 1]
      // flipped bytes: in the header, anywhere
      "flip header bytes", (let copy = Array.copy bytes in (for _ in 1 .. random.Next(1, 6) do copy[8 + random.Next header.Length] <- byte (random.Next 256)); copy)
      "flip any bytes", (let copy = Array.copy bytes in (for _ in 1 .. random.Next(1, 10) do copy[random.Next copy.Length] <- byte (random.Next 256)); copy)
      // the header length: off by a little, or absurd
      "header length", (let copy = Array.copy bytes
                        let value =
                            match random.Next 4 with
                            | 0 -> uint64 (int64 header.Length + int64 (pick [| -16 .. -1 |] * (if random.Next 2 = 0 then 1 else -1)))
                            | 1 -> 1UL <<< 63
                            | 2 -> 1UL <<< 40
                            | _ -> uint64 (random.NextInt64())
                        BitConverter.GetBytes(value).CopyTo(copy, 0)
                        copy)
      // JSON broken by inserting or deleting characters
      "bad JSON", (let position = random.Next(headerText.Length + 1)
                   if random.Next 2 = 0 then withHeader (headerText.Insert(position, pick [| "{"; "}"; "\""; ","; ":"; "["; "]"; "\\"; "nul"; "1e999" |]))
                   else withHeader (headerText.Remove(min position (headerText.Length - 1), 1)))
      // wrong dtypes, shapes and offsets
      "dtype", withHeader (replaceRandom "\"(F32|F16|BF16|I64|U8)\"" (fun () -> pick [| "\"F64\""; "\"I8\""; "\"BOOL\""; "\"F8_E4M3\""; "\"\""; "7"; "null"; "[\"F32\"]" |]))
      "shape", withHeader (replaceRandom "\"shape\":\\[[0-9, ]*\\]" (fun () -> pick [| "\"shape\":[]"; "\"shape\":[1,1,1]"; "\"shape\":[-1]"; "\"shape\":[1.5]"; "\"shape\":[99999999999]"; "\"shape\":{}"; sprintf "\"shape\":[%d]" (random.Next 100) |]))
      "offsets", withHeader (replaceRandom "\"data_offsets\":\\[[0-9]+,[0-9]+\\]" (fun () -> sprintf "\"data_offsets\":[%d,%d]" (random.Next 200) (random.Next 200)))
      // a huge count of entries (kept below a second: 120,000 empty tensors)
      "huge count", (let trimmed = headerText.TrimEnd()
                     let builder = StringBuilder(trimmed, 0, trimmed.Length - 1, 8_000_000)
                     for i in 1 .. 110_000 do
                         builder.Append(",\"x").Append(i).Append("\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]}") |> ignore
                     withHeader (builder.Append('}').ToString()))
      // invalid UTF-8 in a string
      "invalid UTF-8", (let quote = [| for i in 0 .. header.Length - 1 do if header[i] = byte '"' then yield i |]
                        let at = if quote.Length = 0 then 0 else pick quote + 1
                        withHeaderBytes (Array.concat [ header[.. at - 1]; pick [| [| 0xFFuy |]; [| 0xC0uy; 0xAFuy |]; [| 0x80uy |]; [| 0xF4uy; 0x90uy; 0x80uy; 0x80uy |]; [| 0xE2uy |] |]; header[at ..] ]))
      // a key twice
      "duplicate", withHeader (replaceRandom "\"dtype\":\"[A-Z0-9]+\"" (fun () -> "\"dtype\":\"F32\",\"dtype\":\"F32\"")) ]

[<Tests>]
let fuzz =
    testList "safetensors: fuzz" [
        testCase "400 corrupted files: a GptException naming the file or a correct load, nothing else" <| fun () ->
            use temp = new TempDir()
            let sample = temp.File "sample.safetensors"
            writeSample sample
            let sources = [ "sample", File.ReadAllBytes sample; "tiny-gpt2", File.ReadAllBytes(fixture "tiny-gpt2/model.safetensors") ]
            let random = Random 1600
            let counts = Collections.Generic.Dictionary<string, int * int>()
            let failures = ResizeArray<string>()
            let mutable case = 0
            while case < 400 do
                for sourceName, bytes in sources do
                    // The big fixture a quarter of the time: it is 6.5 MB.
                    if sourceName = "sample" || random.Next 4 = 0 then
                        for kind, corrupted in corruptions random bytes do
                            if case < 400 then
                                case <- case + 1
                                let path = temp.File(sprintf "case-%03d.safetensors" case)
                                File.WriteAllBytes(path, corrupted)
                                let outcome, allocated =
                                    try
                                        let outcome, allocated = attemptMeasured path
                                        Ok outcome, allocated
                                    with e -> Error e, 0L
                                // Managed memory in proportion to the file (its header is read whole) plus at most
                                // 100,000 entries, whatever the file says.
                                if allocated > 2L * int64 corrupted.Length + 100_000_000L then
                                    failures.Add(sprintf "case %d (%s, %s): %d bytes allocated for a %d-byte file" case sourceName kind allocated corrupted.Length)
                                let loaded, refusedCount = match counts.TryGetValue kind with | true, c -> c | _ -> (0, 0)
                                match outcome with
                                | Ok(Loaded(_, tensorBytes)) ->
                                    counts[kind] <- (loaded + 1, refusedCount)
                                    // A correct load reads no more than the file holds.
                                    if tensorBytes > int64 corrupted.Length * 2L then
                                        failures.Add(sprintf "case %d (%s, %s): loaded %d bytes of tensors from a %d-byte file" case sourceName kind tensorBytes corrupted.Length)
                                | Ok(Refused message) ->
                                    counts[kind] <- (loaded, refusedCount + 1)
                                    if not (message.Contains(path)) || message.Length > 600 then
                                        failures.Add(sprintf "case %d (%s, %s): unclear message '%s'" case sourceName kind (message.Substring(0, min 300 message.Length)))
                                | Error e ->
                                    let e = match e with :? AggregateException as a -> a.InnerException | e -> e
                                    failures.Add(sprintf "case %d (%s, %s): %s: %s" case sourceName kind (e.GetType().Name) e.Message)
                                File.Delete path
            // FIFOs, links in loops and dangling links among them.
            for i in 1 .. 5 do
                let fifo = temp.File(sprintf "fifo-%d.safetensors" i)
                if makeFifo fifo then
                    match attempt fifo with
                    | Refused message when message.Contains fifo -> ()
                    | other -> failures.Add(sprintf "FIFO %d: %A" i other)
                let a, b = temp.File(sprintf "loop-%d-a.safetensors" i), temp.File(sprintf "loop-%d-b.safetensors" i)
                File.CreateSymbolicLink(a, b) |> ignore
                File.CreateSymbolicLink(b, a) |> ignore
                match attempt a with
                | Refused message when message.Contains "symbolic link" -> ()
                | other -> failures.Add(sprintf "loop %d: %A" i other)
                let dangling = temp.File(sprintf "dangling-%d.safetensors" i)
                File.CreateSymbolicLink(dangling, temp.File(sprintf "missing-%d" i)) |> ignore
                match attempt dangling with
                | Refused message when message.Contains "does not exist" -> ()
                | other -> failures.Add(sprintf "dangling %d: %A" i other)
            Expect.equal case 400 "400 corrupted files"
            Expect.isTrue (failures.Count = 0) (sprintf "%d failures:\n%s" failures.Count (String.Join("\n", failures |> Seq.truncate 20)))
            // Every class was tried and refused at least once (a flipped data byte or another known dtype of the same
            // size can still make a valid file); these can never make one.
            for kind in [ "truncate"; "flip header bytes"; "header length"; "bad JSON"; "dtype"; "shape"; "offsets"; "huge count"; "invalid UTF-8"; "duplicate" ] do
                let _, refusedCount = counts[kind]
                Expect.isGreaterThan refusedCount 0 (sprintf "%s: some refused" kind)
            for kind in [ "truncate"; "header length"; "huge count"; "invalid UTF-8"; "duplicate" ] do
                let loaded, _ = counts[kind]
                Expect.equal loaded 0 (sprintf "%s: never loaded" kind)
    ]
