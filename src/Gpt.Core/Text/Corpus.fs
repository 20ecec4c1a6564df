namespace Gpt.Text

open System
open System.IO
open System.Text
open Gpt

/// Text to train on: the built-in story, or user text from a file, a folder or a glob.
[<RequireQualifiedAccess>]
module Corpus =
    /// One text and where it came from.
    type Document = { Source: string; Text: string }

    /// The built-in default corpus: "The Harbor Clock of Saltmere", an original short story of about 20,000
    /// characters written for this project, so that the main job needs no download.
    let builtIn: Lazy<Document> =
        lazy
            (let assembly = typeof<Document>.Assembly
             use stream =
                 match assembly.GetManifestResourceStream "Gpt.Resources.story.txt" with
                 | null -> Errors.fail "the built-in story resource is missing from %s" assembly.FullName
                 | stream -> stream
             use reader = new StreamReader(stream, UTF8Encoding(false, true))
             { Source = "built-in: The Harbor Clock of Saltmere"; Text = reader.ReadToEnd() })

    /// Reads a file as strict UTF-8 (a byte-order mark is skipped); invalid bytes are an error naming the file
    /// and the byte offset.
    let readFile (path: string) : Document =
        let bytes =
            // Nothing to read in an empty file; and a FIFO or a device (/dev/zero) reports no size either: reading one
            // would wait for a writer forever or never end.
            try (if FileInfo(path).Length = 0L && File.Exists path then [||] else File.ReadAllBytes path)
            with
            | :? FileNotFoundException
            | :? DirectoryNotFoundException -> Errors.fail "file '%s' does not exist" path
            | :? IOException as e -> Errors.fail "file '%s' could not be read: %s" path e.Message
            | :? UnauthorizedAccessException -> Errors.fail "file '%s' could not be read: access denied" path
        let start = if bytes.Length >= 3 && bytes[0] = 0xEFuy && bytes[1] = 0xBBuy && bytes[2] = 0xBFuy then 3 else 0
        let body = ReadOnlySpan<byte>(bytes, start, bytes.Length - start)
        let chars = Array.zeroCreate<char> body.Length
        let mutable bytesRead = 0
        let mutable charsWritten = 0
        match Unicode.Utf8.ToUtf16(body, Span<char>(chars), &bytesRead, &charsWritten, false, true) with
        | Buffers.OperationStatus.Done -> ()
        | _ ->
            let offset = start + bytesRead
            Errors.fail "file '%s' is not valid UTF-8: invalid byte 0x%02X at byte offset %d" path bytes[offset] offset
        let text = String(chars, 0, charsWritten)
        { Source = path; Text = text }

    let private globToRegex (pattern: string) =
        let escaped =
            Text.RegularExpressions.Regex.Escape(pattern.Replace('\\', '/'))
                .Replace(@"\*\*/", "(.*/)?")
                .Replace(@"\*\*", ".*")
                .Replace(@"\*", "[^/]*")
                .Replace(@"\?", "[^/]")
        Text.RegularExpressions.Regex("^" + escaped + "$")

    /// The files a path names: a file, every file of a folder (recursively, sorted), or a glob such as
    /// `data/*.txt` or `books/**/*.md`.
    let resolve (path: string) : string[] =
        if String.IsNullOrWhiteSpace path then Errors.fail "no data path given: expected a file, a folder or a glob"
        elif File.Exists path then [| path |]
        elif Directory.Exists path then
            let files =
                Directory.EnumerateFiles(path, "*", SearchOption.AllDirectories)
                |> Seq.filter (fun f -> not (Path.GetFileName(f).StartsWith ".")) |> Seq.sort |> Array.ofSeq
            if files.Length = 0 then Errors.fail "folder '%s' contains no files" path
            files
        elif path.IndexOfAny [| '*'; '?' |] >= 0 then
            let normalized = path.Replace('\\', '/')
            let firstWildcard = normalized.IndexOfAny [| '*'; '?' |]
            let slash = normalized.LastIndexOf('/', firstWildcard)
            let root = if slash < 0 then "." else (if slash = 0 then "/" else normalized.Substring(0, slash))
            let regex = globToRegex (if slash < 0 then normalized else normalized.Substring(slash + 1))
            if not (Directory.Exists root) then Errors.fail "glob '%s': folder '%s' does not exist" path root
            let files =
                Directory.EnumerateFiles(root, "*", SearchOption.AllDirectories)
                |> Seq.filter (fun f -> regex.IsMatch(Path.GetRelativePath(root, f).Replace('\\', '/')))
                |> Seq.sort |> Array.ofSeq
            if files.Length = 0 then Errors.fail "glob '%s' matches no files" path
            files
        else Errors.fail "data path '%s' does not exist: expected a file, a folder or a glob such as 'data/*.txt'" path

    /// Loads every document a path names.
    let load (path: string) : Document[] = resolve path |> Array.map readFile

    /// Token ids of documents, joined by the tokenizer's end-of-text token where it has one (GPT-2 marks
    /// document boundaries that way).
    let tokenize (tokenizer: ITokenizer) (documents: Document seq) : int[] =
        let ids = ResizeArray<int>()
        documents
        |> Seq.iteri (fun index document ->
            if index > 0 then
                tokenizer.EndOfTextId |> Option.iter ids.Add
            ids.AddRange(tokenizer.Encode document.Text))
        ids.ToArray()

    /// tokenize, checked to be long enough for at least one training window of contextLength tokens.
    let encode (tokenizer: ITokenizer) (contextLength: int) (documents: Document seq) : int[] =
        let documents = Array.ofSeq documents
        let ids = tokenize tokenizer documents
        let needed = contextLength + 1
        if ids.Length < needed then
            let sources = documents |> Array.map (fun d -> d.Source) |> String.concat ", "
            if ids.Length = 0 then Errors.fail "the text is empty (%s): at least %d tokens are needed for context length %d" sources needed contextLength
            Errors.fail "the text is too short (%s): it has %d tokens, at least %d are needed for context length %d" sources ids.Length needed contextLength
        ids
