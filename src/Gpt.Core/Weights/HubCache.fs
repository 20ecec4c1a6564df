namespace Gpt.Weights

open System
open System.IO
open System.Net
open System.Net.Http
open System.Security.Cryptography
open System.Text
open System.Text.RegularExpressions
open System.Threading
open System.Threading.Tasks
open Gpt

/// Where and how to reach the Hugging Face hub and its cache.
type HubSettings =
    { /// The hub's address (HF_ENDPOINT; https://huggingface.co).
      Endpoint: string
      /// Sent as a bearer token (HF_TOKEN, or the token file `huggingface-cli login` writes).
      Token: string option
      /// The hub cache (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub): what transformers uses.
      CacheDirectory: string
      /// Use the cache only (HF_HUB_OFFLINE=1).
      Offline: bool
      /// A download that receives nothing for this long is dropped and resumed from where it got to.
      IdleTimeout: TimeSpan
      /// Tries per file, each resuming the partial download.
      Attempts: int
      /// The pause before a retry (times the attempt number).
      RetryDelay: TimeSpan }

/// A download's progress: FileName's BytesReceived of TotalBytes (when the server said), Completed at the end.
type DownloadProgress =
    { FileName: string
      BytesReceived: int64
      TotalBytes: int64 option
      Completed: bool }

/// A model on the hub: "gpt2", "openai-community/gpt2", "user/name@revision" (a branch, tag or commit).
type HubId = { RepoId: string; Revision: string }

/// Hugging Face model ids, the hub cache layout, and downloads into it. The cache is transformers' own
/// (`models--org--name/{blobs, snapshots/<commit>/, refs/<revision>}`): a machine that ever loaded a model with
/// transformers has it, offline. Downloads go where huggingface_hub puts them: `blobs/<etag>` (the file's SHA-256 for
/// large files, its git blob SHA-1 for small ones), written as `<etag>.incomplete` first, resumed with a Range request
/// after a dropped connection, checked against that hash, renamed into place, then linked from
/// `snapshots/<commit>/<file>` (a relative symbolic link, or a copy where links are not allowed); `refs/<revision>`
/// names the commit last. No console output: progress goes to a callback.
[<RequireQualifiedAccess>]
module HubCache =
    let defaultEndpoint = "https://huggingface.co"
    let configFileName = "config.json"
    /// The weight files tried, in order.
    let weightFileNames = [ "model.safetensors"; "pytorch_model.bin" ]

    let private truthy (value: string) =
        not (isNull value) && List.contains (value.Trim().ToUpperInvariant()) [ "1"; "ON"; "YES"; "TRUE" ]

    /// The settings the environment gives, as huggingface_hub reads it: HF_ENDPOINT, HF_TOKEN (else the file at
    /// HF_TOKEN_PATH or HF_HOME/token), HF_HUB_OFFLINE, HF_HUB_CACHE or HF_HOME (else XDG_CACHE_HOME/huggingface,
    /// else ~/.cache/huggingface).
    let settingsFromEnvironment () : HubSettings =
        let env (name: string) =
            match Environment.GetEnvironmentVariable name with
            | null -> None
            | value when value.Trim() = "" -> None
            | value -> Some(value.Trim())
        let home =
            match env "HF_HOME" with
            | Some home -> home
            | None ->
                let xdg = env "XDG_CACHE_HOME" |> Option.defaultWith (fun () -> Path.Combine(Environment.GetFolderPath Environment.SpecialFolder.UserProfile, ".cache"))
                Path.Combine(xdg, "huggingface")
        let token =
            match env "HF_TOKEN" |> Option.orElse (env "HUGGING_FACE_HUB_TOKEN") with
            | Some token -> Some token
            | None ->
                let path = env "HF_TOKEN_PATH" |> Option.defaultValue (Path.Combine(home, "token"))
                try
                    if File.Exists path then (match File.ReadAllText(path).Trim() with "" -> None | t -> Some t) else None
                with :? IOException | :? UnauthorizedAccessException -> None
        { Endpoint = (env "HF_ENDPOINT" |> Option.defaultValue defaultEndpoint).TrimEnd('/')
          Token = token
          CacheDirectory = env "HF_HUB_CACHE" |> Option.orElse (env "HUGGINGFACE_HUB_CACHE") |> Option.defaultValue (Path.Combine(home, "hub"))
          Offline = truthy (Environment.GetEnvironmentVariable "HF_HUB_OFFLINE") || truthy (Environment.GetEnvironmentVariable "TRANSFORMERS_OFFLINE")
          IdleTimeout = TimeSpan.FromSeconds 60.0
          Attempts = 5
          RetryDelay = TimeSpan.FromSeconds 1.0 }

    // ---- ids ---------------------------------------------------------------------------------------------------------

    let private namePart = @"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_-])?"
    let private idPattern = Regex(sprintf "^(?:%s/)?%s$" namePart namePart, RegexOptions.Compiled)
    let private revisionPattern = Regex(@"^[A-Za-z0-9._/-]{1,200}$", RegexOptions.Compiled)
    let private commitPattern = Regex("^[0-9a-f]{40}$", RegexOptions.Compiled)

    /// "name", "org/name", either with "@revision" (default "main"), when the text has that form.
    let tryParseId (text: string) : HubId option =
        if String.IsNullOrWhiteSpace text then None
        else
            let text = text.Trim()
            let repo, revision =
                match text.IndexOf '@' with
                | -1 -> text, "main"
                | at -> text.Substring(0, at), text.Substring(at + 1)
            let safeRevision = revisionPattern.IsMatch revision && not (revision.Split('/') |> Array.exists (fun s -> s = "" || s = "." || s = ".."))
            if idPattern.IsMatch repo && not (repo.Contains "--") && not (repo.Contains "..") && safeRevision then
                Some { RepoId = repo; Revision = revision }
            else None

    /// The repo's folder in the cache: models--org--name.
    let repoFolderName (repoId: string) = "models--" + repoId.Replace("/", "--")

    /// The repos a cache may know a model under: OpenAI's GPT-2 checkpoints moved from "gpt2" to
    /// "openai-community/gpt2"; transformers caches under the id it was given.
    let candidateRepos (repoId: string) =
        let legacy = [ "gpt2"; "gpt2-medium"; "gpt2-large"; "gpt2-xl"; "distilgpt2" ]
        if List.contains repoId legacy then [ repoId; "openai-community/" + repoId ]
        elif repoId.StartsWith("openai-community/", StringComparison.Ordinal) && List.contains (repoId.Substring 17) legacy then
            [ repoId; repoId.Substring 17 ]
        else [ repoId ]

    let private isModelFolder (directory: string) =
        File.Exists(Path.Combine(directory, configFileName)) && weightFileNames |> List.exists (fun f -> File.Exists(Path.Combine(directory, f)))

    /// The snapshot folder of a cached model: refs/<revision> names the commit (or the revision is a commit);
    /// snapshots/<commit>/ must hold config.json and a weight file. None when the cache does not have it.
    let tryResolveCached (cacheDirectory: string) (id: HubId) : string option =
        candidateRepos id.RepoId
        |> List.tryPick (fun repo ->
            let repoDirectory = Path.Combine(cacheDirectory, repoFolderName repo)
            let refPath = Path.Combine(Array.append [| repoDirectory; "refs" |] (id.Revision.Split '/'))
            let commit =
                if File.Exists refPath then
                    let text = (try File.ReadAllText(refPath).Trim() with :? IOException -> "")
                    if commitPattern.IsMatch text then Some text else None
                elif commitPattern.IsMatch id.Revision then Some id.Revision
                else None
            commit
            |> Option.map (fun c -> Path.Combine(repoDirectory, "snapshots", c))
            |> Option.filter isModelFolder)

    // ---- download ----------------------------------------------------------------------------------------------------

    let private fail format = Printf.ksprintf (fun message -> raise (GptException message)) format

    /// What the hub says about a file before it is downloaded.
    type private FileInfoFromHub =
        { Commit: string
          ETag: string
          Size: int64 option
          DownloadUrl: Uri }

    type private Lookup =
        | Found of FileInfoFromHub
        | EntryNotFound

    let private header (response: HttpResponseMessage) (name: string) =
        match response.Headers.TryGetValues name with
        | true, values -> Seq.tryHead values
        | _ ->
            match response.Content.Headers.TryGetValues name with
            | true, values -> Seq.tryHead values
            | _ -> None

    let private cleanETag (etag: string) =
        let etag = etag.Trim()
        let etag = if etag.StartsWith("W/", StringComparison.Ordinal) then etag.Substring 2 else etag
        etag.Trim('"')

    let private describeId (id: HubId) = if id.Revision = "main" then sprintf "'%s'" id.RepoId else sprintf "'%s' at revision '%s'" id.RepoId id.Revision

    /// A clear error for a status the hub answered with, naming what to do.
    let private statusError (settings: HubSettings) (id: HubId) (fileName: string) (response: HttpResponseMessage) : exn =
        let code = int response.StatusCode
        let errorCode = header response "X-Error-Code" |> Option.defaultValue ""
        let where = settings.Endpoint
        let message =
            match code, errorCode with
            | 401, _ when settings.Token.IsSome ->
                sprintf "the Hugging Face hub (%s) did not accept the token in HF_TOKEN for %s (401 Unauthorized): check the token, and that its account can read the repository" where (describeId id)
            | 401, _ ->
                sprintf "the Hugging Face hub (%s) answered 401 Unauthorized for %s: the repository is private or gated, or does not exist; set HF_TOKEN to a token with access to it" where (describeId id)
            | 403, _ ->
                sprintf "the Hugging Face hub (%s) refused %s (403 Forbidden): a gated model needs its terms accepted on the hub by the account of HF_TOKEN" where (describeId id)
            | 404, "RevisionNotFound" -> sprintf "revision '%s' of '%s' was not found on the Hugging Face hub (%s)" id.Revision id.RepoId where
            | 404, "EntryNotFound" -> sprintf "'%s' has no file %s on the Hugging Face hub (%s)" id.RepoId fileName where
            | 404, _ ->
                sprintf "model %s was not found on the Hugging Face hub (%s) (404 Not Found), nor is it a local path: check the id (e.g. gpt2, openai-community/gpt2-medium), or set HF_TOKEN for a private repository" (describeId id) where
            | _ -> sprintf "the Hugging Face hub (%s) answered %d %s for %s/%s" where code response.ReasonPhrase id.RepoId fileName
        GptException message

    let private unreachable (settings: HubSettings) (id: HubId) (e: exn) : exn =
        GptException(
            sprintf "could not reach the Hugging Face hub at %s to download %s (%s): connect to the network, set HF_ENDPOINT to a mirror, or give a local folder or file (HF_HUB_OFFLINE=1 uses only the cache)"
                settings.Endpoint (describeId id) e.Message, e)

    let private resolveUrl (settings: HubSettings) (id: HubId) (fileName: string) =
        Uri(sprintf "%s/%s/resolve/%s/%s" settings.Endpoint id.RepoId (Uri.EscapeDataString id.Revision) fileName)

    let private sameHost (a: Uri) (b: Uri) = String.Equals(a.Authority, b.Authority, StringComparison.OrdinalIgnoreCase) && a.Scheme = b.Scheme

    let private request (settings: HubSettings) (verb: HttpMethod) (url: Uri) =
        let message = new HttpRequestMessage(verb, url)
        message.Headers.UserAgent.ParseAdd "gpt-dotnet/1.0"
        // The ETag the hub gives is the hash of the bytes as stored; a compressed transfer would change them.
        message.Headers.AcceptEncoding.ParseAdd "identity"
        match settings.Token with
        | Some token when sameHost url (Uri settings.Endpoint) -> message.Headers.Authorization <- Headers.AuthenticationHeaderValue("Bearer", token)
        | _ -> ()
        message

    /// HEAD on the resolve URL without following redirects (huggingface_hub's get_hf_file_metadata): a relative redirect
    /// (a renamed repository) is followed, an absolute one (to the file store) is where the bytes are; the hub puts the
    /// commit, the ETag and the size on that redirect.
    let private lookup (client: HttpClient) (settings: HubSettings) (id: HubId) (fileName: string) (cancellation: CancellationToken) =
        let mutable url = resolveUrl settings id fileName
        let mutable result = None
        let mutable hops = 0
        while result.IsNone do
            use message = request settings HttpMethod.Head url
            use response = client.Send(message, HttpCompletionOption.ResponseHeadersRead, cancellation)
            let code = int response.StatusCode
            let location = if isNull response.Headers.Location then None else Some response.Headers.Location
            match code, location with
            | c, Some target when c >= 300 && c < 400 && not target.IsAbsoluteUri && hops < 5 ->
                hops <- hops + 1
                url <- Uri(url, target)
            | c, _ when c = 404 && header response "X-Error-Code" = Some "EntryNotFound" -> result <- Some EntryNotFound
            | c, location when (c >= 200 && c < 300) || (c >= 300 && c < 400 && location.IsSome) ->
                let commit = header response "X-Repo-Commit"
                let etag = header response "X-Linked-Etag" |> Option.orElse (header response "ETag") |> Option.map cleanETag
                let size =
                    header response "X-Linked-Size"
                    |> Option.orElse (if response.Content.Headers.ContentLength.HasValue then Some(string response.Content.Headers.ContentLength.Value) else None)
                    |> Option.bind (fun s -> match Int64.TryParse s with | true, n when n >= 0L -> Some n | _ -> None)
                match commit, etag with
                | Some commit, Some etag ->
                    if not (commitPattern.IsMatch commit) then fail "the hub (%s) gave the commit '%s' for %s/%s, which is not a 40-digit commit hash" settings.Endpoint commit id.RepoId fileName
                    if not (Regex.IsMatch(etag, "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")) then
                        fail "the hub (%s) gave the ETag '%s' for %s/%s, which cannot name a cache file" settings.Endpoint etag id.RepoId fileName
                    let download = match location with Some target when c >= 300 -> Uri(url, target) | _ -> url
                    result <- Some(Found { Commit = commit; ETag = etag; Size = size; DownloadUrl = download })
                | _ ->
                    fail "the answer of %s for %s/%s has no X-Repo-Commit or ETag header: is HF_ENDPOINT a Hugging Face hub?" settings.Endpoint id.RepoId fileName
            | _ -> raise (statusError settings id fileName response)
        result.Value

    /// The hash the ETag promises, computed over the file: SHA-256 for a 64-digit ETag (large files), git's blob
    /// SHA-1 for a 40-digit one (small files), nothing to check otherwise.
    let private checkHash (path: string) (etag: string) (fileName: string) =
        let hex (bytes: byte[]) = Convert.ToHexString(bytes).ToLowerInvariant()
        if Regex.IsMatch(etag, "^[0-9a-fA-F]{64}$") then
            use stream = File.OpenRead path
            let actual = hex (SHA256.HashData stream)
            if actual <> etag.ToLowerInvariant() then
                Some(sprintf "SHA-256 mismatch for %s: the hub promised %s, the downloaded bytes hash to %s" fileName (etag.ToLowerInvariant()) actual)
            else None
        elif Regex.IsMatch(etag, "^[0-9a-fA-F]{40}$") then
            use hash = IncrementalHash.CreateHash HashAlgorithmName.SHA1
            hash.AppendData(Encoding.ASCII.GetBytes(sprintf "blob %d\000" (FileInfo(path).Length)))
            use stream = File.OpenRead path
            let buffer = Array.zeroCreate<byte> 81920
            let mutable n = stream.Read(buffer, 0, buffer.Length)
            while n > 0 do
                hash.AppendData(buffer, 0, n)
                n <- stream.Read(buffer, 0, buffer.Length)
            let actual = hex (hash.GetHashAndReset())
            if actual <> etag.ToLowerInvariant() then
                Some(sprintf "git blob SHA-1 mismatch for %s: the hub promised %s, the downloaded bytes hash to %s" fileName (etag.ToLowerInvariant()) actual)
            else None
        else None

    /// Downloads into `blob`.incomplete, resuming what is there, then checks size and hash and renames it to `blob`.
    /// (Blocking code rather than a task: the callers wait for it anyway, and the F# compiler produced an invalid
    /// program for the task version's retry loop.)
    let private downloadBlob (client: HttpClient) (settings: HubSettings) (id: HubId) (fileName: string) (info: FileInfoFromHub)
                             (blob: string) (progress: DownloadProgress -> unit) (cancellation: CancellationToken) =
        let partial = blob + ".incomplete"
        let mutable finished = false
        let mutable attempt = 0
        let mutable lastError: exn = null
        let report (received: int64) (completed: bool) =
            progress { FileName = fileName; BytesReceived = received; TotalBytes = info.Size; Completed = completed }
        /// One GET from where the partial file ends; true when the server sent everything it had.
        let receive (existing: int64) =
            use message = request settings HttpMethod.Get info.DownloadUrl
            if existing > 0L then message.Headers.Range <- Headers.RangeHeaderValue(Nullable existing, Nullable())
            use response = client.Send(message, HttpCompletionOption.ResponseHeadersRead, cancellation)
            let code = int response.StatusCode
            let append =
                match code with
                | 206 ->
                    let range = response.Content.Headers.ContentRange
                    isNull range || not range.From.HasValue || range.From.Value = existing
                | 416 -> false
                | c when c >= 200 && c < 300 -> false
                | _ -> raise (statusError settings id fileName response)
            if code = 416 || (code = 206 && not append) then
                // The server cannot continue from our partial file: start again.
                File.Delete partial
                false
            else
                use body = response.Content.ReadAsStream(cancellation)
                use file = new FileStream(partial, (if append then FileMode.Append else FileMode.Create), FileAccess.Write, FileShare.None)
                let buffer = Array.zeroCreate<byte> 262144
                let mutable received = if append then existing else 0L
                let mutable lastReport = DateTime.MinValue
                let mutable reading = true
                report received false
                while reading do
                    use idle = CancellationTokenSource.CreateLinkedTokenSource cancellation
                    idle.CancelAfter settings.IdleTimeout
                    let n =
                        try
                            body.ReadAsync(buffer.AsMemory(), idle.Token).AsTask().GetAwaiter().GetResult()
                        with :? OperationCanceledException when not cancellation.IsCancellationRequested ->
                            raise (IOException(sprintf "no data for %g s" settings.IdleTimeout.TotalSeconds))
                    if n = 0 then reading <- false
                    else
                        file.Write(buffer, 0, n)
                        received <- received + int64 n
                        match info.Size with
                        | Some size when received > size ->
                            file.Dispose()
                            File.Delete partial
                            fail "the hub sent more than the %d bytes it announced for %s of %s" size fileName id.RepoId
                        | _ -> ()
                        if (DateTime.UtcNow - lastReport).TotalMilliseconds >= 100.0 then
                            lastReport <- DateTime.UtcNow
                            report received false
                file.Flush(true)
                match info.Size with
                | Some size when received < size ->
                    lastError <- IOException(sprintf "the connection closed after %d of %d bytes" received size)
                    false
                | _ -> true
        while not finished do
            attempt <- attempt + 1
            if attempt > settings.Attempts then
                raise (GptException(
                    sprintf "downloading %s of %s failed %d times (last: %s); the %d bytes received are kept in '%s' and the next run resumes from there"
                        fileName id.RepoId settings.Attempts (if isNull lastError then "?" else lastError.Message)
                        (if File.Exists partial then FileInfo(partial).Length else 0L) partial, lastError))
            let existing = if File.Exists partial then FileInfo(partial).Length else 0L
            match info.Size with
            | Some size when existing = size -> finished <- true // a previous run got every byte
            | Some size when existing > size -> File.Delete partial
            | _ ->
                let failure =
                    try
                        finished <- receive existing
                        None
                    with
                    | :? HttpRequestException | :? IOException as e when not cancellation.IsCancellationRequested -> Some e
                match failure with
                | Some e ->
                    lastError <- e
                    if attempt < settings.Attempts then
                        cancellation.WaitHandle.WaitOne(TimeSpan.FromTicks(settings.RetryDelay.Ticks * int64 attempt)) |> ignore
                        cancellation.ThrowIfCancellationRequested()
                | None -> ()
        match checkHash partial info.ETag fileName with
        | Some mismatch ->
            File.Delete partial
            fail "%s of %s: %s. The file was deleted and nothing was put in the cache; try again, and if it persists, the server or a proxy alters the file" fileName id.RepoId mismatch
        | None -> ()
        File.Move(partial, blob, true)
        report (FileInfo(blob).Length) true

    /// Makes snapshots/<commit>/<file> point at blobs/<etag> (relative link, as huggingface_hub; a copy where the
    /// system refuses links).
    let private link (repoDirectory: string) (commit: string) (fileName: string) (etag: string) =
        let snapshot = Path.Combine(repoDirectory, "snapshots", commit)
        Directory.CreateDirectory snapshot |> ignore
        let target = Path.Combine(snapshot, fileName)
        if File.Exists target || (try File.GetAttributes(target).HasFlag FileAttributes.ReparsePoint with _ -> false) then File.Delete target
        try
            File.CreateSymbolicLink(target, Path.Combine("..", "..", "blobs", etag)) |> ignore
        with :? IOException | :? UnauthorizedAccessException | :? PlatformNotSupportedException ->
            File.Copy(Path.Combine(repoDirectory, "blobs", etag), target, true)

    /// Downloads config.json and the weights (model.safetensors, else pytorch_model.bin) of a model into the cache and
    /// returns its snapshot folder.
    let download (settings: HubSettings) (progress: DownloadProgress -> unit) (cancellation: CancellationToken) (id: HubId) : string =
        use lookupHandler = new HttpClientHandler(AllowAutoRedirect = false, AutomaticDecompression = DecompressionMethods.None)
        use lookupClient = new HttpClient(lookupHandler, Timeout = TimeSpan.FromSeconds 60.0)
        use downloadHandler = new HttpClientHandler(AllowAutoRedirect = true, AutomaticDecompression = DecompressionMethods.None)
        // The whole transfer is bounded by the idle timeout per read, not by a total time.
        use downloadClient = new HttpClient(downloadHandler, Timeout = Timeout.InfiniteTimeSpan)
        let repoDirectory = Path.Combine(settings.CacheDirectory, repoFolderName id.RepoId)
        let fetch (fileName: string) =
            let found =
                try
                    lookup lookupClient settings id fileName cancellation
                with
                | :? HttpRequestException as e -> raise (unreachable settings id e)
                | :? TaskCanceledException as e when not cancellation.IsCancellationRequested -> raise (unreachable settings id e)
            match found with
            | EntryNotFound -> None
            | Found info ->
                let blobs = Path.Combine(repoDirectory, "blobs")
                Directory.CreateDirectory blobs |> ignore
                let blob = Path.Combine(blobs, info.ETag)
                if not (File.Exists blob) || (info.Size.IsSome && FileInfo(blob).Length <> info.Size.Value) then
                    downloadBlob downloadClient settings id fileName info blob progress cancellation
                Some info
        let config =
            match fetch configFileName with
            | Some c -> c
            | None -> fail "'%s' has no %s on the Hugging Face hub (%s): not a transformers model" id.RepoId configFileName settings.Endpoint
        let weightName, weightInfo =
            match weightFileNames |> List.tryPick (fun name -> fetch name |> Option.map (fun info -> name, info)) with
            | Some w -> w
            | None -> fail "'%s' has neither %s on the Hugging Face hub (%s)" id.RepoId (String.concat " nor " weightFileNames) settings.Endpoint
        if weightInfo.Commit <> config.Commit then
            fail "the hub answered for two commits of '%s' (%s, %s) while downloading: the repository changed meanwhile; try again" id.RepoId config.Commit weightInfo.Commit
        link repoDirectory config.Commit configFileName config.ETag
        link repoDirectory config.Commit weightName weightInfo.ETag
        if id.Revision <> config.Commit then
            let refPath = Path.Combine(Array.append [| repoDirectory; "refs" |] (id.Revision.Split '/'))
            Directory.CreateDirectory(Path.GetDirectoryName refPath) |> ignore
            File.WriteAllText(refPath, config.Commit)
        Path.Combine(repoDirectory, "snapshots", config.Commit)

    /// The local folder of a hub model: the cache's snapshot when it has one (no network), else (unless offline) a
    /// download into the cache.
    let resolve (settings: HubSettings) (progress: DownloadProgress -> unit) (cancellation: CancellationToken) (id: HubId) : string =
        match tryResolveCached settings.CacheDirectory id with
        | Some snapshot -> snapshot
        | None when settings.Offline ->
            let folders = candidateRepos id.RepoId |> List.map repoFolderName |> String.concat " or "
            fail "model %s is not in the Hugging Face cache (%s, looked for %s) and HF_HUB_OFFLINE is set, so nothing was downloaded" (describeId id) settings.CacheDirectory folders
        | None -> download settings progress cancellation id
