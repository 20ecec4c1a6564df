namespace Gpt.Weights

open System
open System.IO
open System.Text
open System.Text.Json
open Gpt

/// Small files read whole (config.json, checkpoint.json, run.json): only regular files, symbolic links resolved with
/// a clear error on a loop or a missing target, a size limit checked before anything is read, strict UTF-8 with the
/// offset of the first bad byte, and JSON with duplicate keys refused. A FIFO would make a plain read wait for a writer
/// forever and /dev/zero would fill memory: both report no size, so they are refused before they are opened.
[<RequireQualifiedAccess>]
module BoundedFile =
    /// The default limit for a JSON file the library reads whole: 16 MB, far above any real configuration or
    /// checkpoint state (a GPT-2 XL checkpoint.json is about 40 KB).
    let defaultLimit = 16L * 1024L * 1024L

    /// The file a path names after following symbolic links, checked to be a non-empty regular file of at most
    /// `limit` bytes; `what` names it in errors ("config"). Returns the resolved path and its length.
    let check (what: string) (limit: int64) (path: string) : string * int64 =
        if String.IsNullOrEmpty path then Errors.fail "%s: the path is empty" what
        // FileInfo looks at the link itself: a dangling link exists, a missing path does not.
        if not (FileInfo(path).Exists || Directory.Exists path) then Errors.fail "%s '%s' does not exist" what path
        let target =
            try
                match FileInfo(path).ResolveLinkTarget true with
                | null -> path
                | resolved when resolved.Exists || Directory.Exists resolved.FullName -> resolved.FullName
                | resolved -> Errors.fail "%s '%s' is a symbolic link to '%s', which does not exist" what path resolved.FullName
            with
            | :? IOException
            | :? UnauthorizedAccessException as e ->
                Errors.fail "%s '%s' is a symbolic link that cannot be followed (%s)" what path e.Message
        if Directory.Exists target then Errors.fail "%s '%s' is a folder, expected a file" what path
        let length =
            try
                FileInfo(target).Length
            with
            | :? IOException
            | :? UnauthorizedAccessException as e -> Errors.fail "%s '%s' cannot be read (%s)" what path e.Message
        if length = 0L then
            Errors.fail "%s '%s' is empty, or not a regular file (a FIFO or a device has no size)" what path
        if length > limit then
            Errors.fail "%s '%s' has %d bytes, more than the %d this reader takes: it is not a %s" what path length limit what
        target, length

    /// The bytes of a checked file (see `check`), at most `limit` of them even if the file grows meanwhile.
    let readBytes (what: string) (limit: int64) (path: string) : byte[] =
        let target, length = check what limit path
        try
            use stream = new FileStream(target, FileMode.Open, FileAccess.Read, FileShare.ReadWrite ||| FileShare.Delete, 4096)
            if not stream.CanSeek then Errors.fail "%s '%s' is not a regular file" what path
            let buffer = Array.zeroCreate<byte> (int length)
            let mutable filled = 0
            let mutable finished = false
            while not finished && filled < buffer.Length do
                let n = stream.Read(buffer, filled, buffer.Length - filled)
                if n = 0 then finished <- true else filled <- filled + n
            if filled < buffer.Length then Array.sub buffer 0 filled else buffer
        with
        | :? IOException
        | :? UnauthorizedAccessException as e -> Errors.fail "%s '%s' cannot be read (%s)" what path e.Message

    /// Decodes UTF-8 strictly (a byte-order mark is skipped): invalid bytes are an error naming the source and the
    /// offset of the first one.
    let decode (what: string) (bytes: byte[]) : string =
        let start = if bytes.Length >= 3 && bytes[0] = 0xEFuy && bytes[1] = 0xBBuy && bytes[2] = 0xBFuy then 3 else 0
        try
            UTF8Encoding(false, true).GetString(bytes, start, bytes.Length - start)
        with :? DecoderFallbackException as e ->
            Errors.fail "%s is not valid UTF-8 (byte %d)" what (start + max 0 e.Index)

    /// The text of a checked file, strict UTF-8.
    let readText (what: string) (limit: int64) (path: string) : string =
        readBytes what limit path |> decode (sprintf "%s '%s'" what path)

    /// Options that refuse duplicate keys (which one would win is a guess) and deep nesting.
    let jsonOptions = JsonDocumentOptions(AllowDuplicateProperties = false, MaxDepth = 64)

    /// Fails unless every string and property name in the element is text: JSON can escape half of a surrogate pair
    /// ("\ud800"), which is well-formed JSON but no string, and reading it later would throw an InvalidOperationException.
    let rec checkStrings (what: string) (element: JsonElement) =
        let bad (e: exn) = Errors.fail "%s holds a string that is not valid text (%s)" what e.Message
        match element.ValueKind with
        | JsonValueKind.String -> (try element.GetString() |> ignore with :? InvalidOperationException as e -> bad e)
        | JsonValueKind.Array -> for item in element.EnumerateArray() do checkStrings what item
        | JsonValueKind.Object ->
            for property in element.EnumerateObject() do
                (try property.Name |> ignore with :? InvalidOperationException as e -> bad e)
                checkStrings what property.Value
        | _ -> ()

    /// Parses JSON text with `jsonOptions` and checkStrings; `what` names it in the error ("config 'x/config.json'").
    let parseJson (what: string) (text: string) : JsonDocument =
        let document =
            try
                JsonDocument.Parse(text, jsonOptions)
            with :? JsonException as e ->
                raise (GptException(sprintf "%s is not valid JSON (%s)" what e.Message, e))
        try
            checkStrings what document.RootElement
            document
        with _ ->
            document.Dispose()
            reraise ()

    /// Reads and parses a JSON file of at most `limit` bytes (see `check`).
    let readJson (what: string) (limit: int64) (path: string) : JsonDocument =
        readText what limit path |> parseJson (sprintf "%s '%s'" what path)
