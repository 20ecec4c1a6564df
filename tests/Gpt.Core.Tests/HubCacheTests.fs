/// Hugging Face ids, the cache layout on a fake cache tree, and downloads from a stub hub on the loopback interface.
module Gpt.Tests.HubCacheTests

open System
open System.Collections.Concurrent
open System.IO
open System.Net
open System.Net.Sockets
open System.Security.Cryptography
open System.Text
open System.Threading
open Expecto
open TorchSharp
open Gpt.Model
open Gpt.Weights
open Gpt.Tests.TestUtil
open Gpt.Tests.ModelTestUtil

let private original = fixture "weights/hf"
let private commit = "0123456789abcdef0123456789abcdef01234567"

let private sha256 (bytes: byte[]) = Convert.ToHexString(SHA256.HashData bytes).ToLowerInvariant()
let private gitBlobSha1 (bytes: byte[]) =
    Convert.ToHexString(SHA1.HashData(Array.append (Encoding.ASCII.GetBytes(sprintf "blob %d\000" bytes.Length)) bytes)).ToLowerInvariant()

/// How the stub serves a file.
type Behaviour =
    | Normal
    /// The first GET sends half the bytes and drops the connection; later GETs honour Range.
    | DropHalfwayOnce
    /// Every GET sends the bytes with one changed (the headers still promise the true hash).
    | Corrupt
    | Status of int * errorCode: string

/// One request the stub saw.
type Seen = { Method: string; Path: string; Range: string; Authorization: string }

/// A stub of the hub's resolve endpoint on 127.0.0.1 (a free port), serving files for one repository id. Stops on
/// dispose. Large files come as huggingface.co serves them: a 302 from /resolve/ to a file store path, with
/// X-Linked-Etag (SHA-256) and X-Linked-Size; small ones directly with a git-blob-SHA-1 ETag.
type StubHub(repo: string, files: Map<string, byte[]>, behaviour: string -> Behaviour) =
    let port =
        let probe = new TcpListener(IPAddress.Loopback, 0)
        probe.Start()
        let port = (probe.LocalEndpoint :?> IPEndPoint).Port
        probe.Stop()
        port
    let listener = new HttpListener()
    do listener.Prefixes.Add(sprintf "http://127.0.0.1:%d/" port)
    do listener.Start()
    let seen = ConcurrentQueue<Seen>()
    let dropped = ConcurrentDictionary<string, bool>()
    let serve (context: HttpListenerContext) =
        let request, response = context.Request, context.Response
        let path = request.Url.AbsolutePath
        seen.Enqueue { Method = request.HttpMethod; Path = path; Range = (match request.Headers["Range"] with null -> "" | r -> r)
                       Authorization = (match request.Headers["Authorization"] with null -> "" | a -> a) }
        let resolvePrefix = sprintf "/%s/resolve/main/" repo
        let large (name: string) = name.EndsWith ".safetensors"
        try
            if path.StartsWith resolvePrefix then
                let name = path.Substring resolvePrefix.Length
                match files.TryFind name, behaviour name with
                | _, Status(code, errorCode) ->
                    response.StatusCode <- code
                    if errorCode <> "" then response.Headers["X-Error-Code"] <- errorCode
                | None, _ ->
                    response.StatusCode <- 404
                    response.Headers["X-Error-Code"] <- "EntryNotFound"
                | Some bytes, _ ->
                    response.Headers["X-Repo-Commit"] <- commit
                    if large name then
                        response.StatusCode <- 302
                        response.Headers["Location"] <- sprintf "http://127.0.0.1:%d/store/%s" port name
                        response.Headers["X-Linked-Etag"] <- "\"" + sha256 bytes + "\""
                        response.Headers["X-Linked-Size"] <- string bytes.Length
                    else
                        response.Headers["ETag"] <- "\"" + gitBlobSha1 bytes + "\""
                        response.ContentLength64 <- int64 bytes.Length
                        if request.HttpMethod = "GET" then response.OutputStream.Write(bytes, 0, bytes.Length)
            elif path.StartsWith "/store/" then
                let name = path.Substring "/store/".Length
                let bytes = files[name]
                let bytes =
                    if behaviour name = Corrupt then (let copy = Array.copy bytes in copy[copy.Length / 3] <- copy[copy.Length / 3] ^^^ 0xFFuy; copy)
                    else bytes
                let start =
                    match request.Headers["Range"] with
                    | null -> 0
                    | range -> int (range.Substring("bytes=".Length).TrimEnd('-'))
                if start > 0 then
                    response.StatusCode <- 206
                    response.Headers["Content-Range"] <- sprintf "bytes %d-%d/%d" start (bytes.Length - 1) bytes.Length
                response.ContentLength64 <- int64 (bytes.Length - start)
                if behaviour name = DropHalfwayOnce && dropped.TryAdd(name, true) then
                    response.OutputStream.Write(bytes, start, (bytes.Length - start) / 2)
                    response.OutputStream.Flush()
                    response.Abort()
                else
                    response.OutputStream.Write(bytes, start, bytes.Length - start)
            else
                response.StatusCode <- 404
            response.Close()
        with _ -> (try response.Abort() with _ -> ())
    let loop =
        Tasks.Task.Run(fun () ->
            while listener.IsListening do
                try
                    let context = listener.GetContext()
                    Tasks.Task.Run(fun () -> serve context) |> ignore
                with _ -> ())

    member _.Endpoint = sprintf "http://127.0.0.1:%d" port
    member _.Seen = List.ofSeq seen
    interface IDisposable with
        member _.Dispose() =
            listener.Stop()
            listener.Close()

/// The original fixture's files, as the stub serves them.
let private tinyFiles () =
    Map.ofList [ "config.json", File.ReadAllBytes(Path.Combine(original, "config.json"))
                 "model.safetensors", File.ReadAllBytes(Path.Combine(original, "model.safetensors")) ]

let private weightsSha256 () = sha256 (File.ReadAllBytes(Path.Combine(original, "model.safetensors")))

let private settings (cache: string) (endpoint: string) =
    { HubCache.settingsFromEnvironment () with
        Endpoint = endpoint; CacheDirectory = cache; Token = None; Offline = false
        IdleTimeout = TimeSpan.FromSeconds 10.0; Attempts = 3; RetryDelay = TimeSpan.FromMilliseconds 50.0 }

let private download (settings: HubSettings) (repo: string) =
    let progress = ConcurrentQueue<DownloadProgress>()
    let folder = HubCache.resolve settings progress.Enqueue CancellationToken.None { RepoId = repo; Revision = "main" }
    folder, List.ofSeq progress

let private expectOriginal (folder: string) =
    use model = Pretrained.load folder
    use expected = Pretrained.load original
    use ids = randomIds 5 512 2 16
    use _ = torch.no_grad ()
    expectEqual (model.forward ids) (expected.forward ids) "the downloaded model computes the original's logits"

/// A fake cache: models--<repo>/snapshots/<commit>/{config.json, model.safetensors} and refs/main.
let private fakeCache (cache: string) (repo: string) (withRef: bool) =
    let repoDirectory = Path.Combine(cache, HubCache.repoFolderName repo)
    let snapshot = Path.Combine(repoDirectory, "snapshots", commit)
    Directory.CreateDirectory snapshot |> ignore
    for file in [ "config.json"; "model.safetensors" ] do File.Copy(Path.Combine(original, file), Path.Combine(snapshot, file))
    if withRef then
        Directory.CreateDirectory(Path.Combine(repoDirectory, "refs")) |> ignore
        File.WriteAllText(Path.Combine(repoDirectory, "refs", "main"), commit + "\n")
    snapshot

[<Tests>]
let idTests =
    testList "hub: model ids" [
        testCase "ids, organisations and revisions" <| fun () ->
            let parse = HubCache.tryParseId
            Expect.equal (parse "gpt2") (Some { RepoId = "gpt2"; Revision = "main" }) "bare"
            Expect.equal (parse "openai-community/gpt2-medium") (Some { RepoId = "openai-community/gpt2-medium"; Revision = "main" }) "org"
            Expect.equal (parse "user/name@refs/pr/1") (Some { RepoId = "user/name"; Revision = "refs/pr/1" }) "revision with slashes"
            for bad in [ ""; "a/b/c"; "../x"; "a--b"; "x@"; "x@../../etc"; "name with space"; "/abs" ] do
                Expect.isNone (parse bad) (sprintf "'%s' is not an id" bad)
            Expect.equal (HubCache.repoFolderName "openai-community/gpt2") "models--openai-community--gpt2" "cache folder"
            Expect.equal (HubCache.candidateRepos "gpt2") [ "gpt2"; "openai-community/gpt2" ] "the renamed GPT-2 repositories"

        testCase "the environment's settings: HF_HOME, HF_HUB_CACHE, HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE" <| fun () ->
            // Read through a child of settingsFromEnvironment's logic would need a process; here only the defaults'
            // shape is checked, the C# tests set the variables in a sequential test.
            let s = HubCache.settingsFromEnvironment ()
            Expect.isTrue (s.CacheDirectory.Length > 0) "a cache directory"
            Expect.isFalse (s.Endpoint.EndsWith "/") "no trailing slash"
    ]

[<Tests>]
let cacheTests =
    testList "hub: the cache layout" [
        testCase "refs/main names the snapshot; the model loads offline" <| fun () ->
            use temp = new TempDir()
            let snapshot = fakeCache temp.Path "gpt2" true
            let offline = { settings temp.Path "http://127.0.0.1:9" with Offline = true }
            Expect.equal (HubCache.tryResolveCached temp.Path { RepoId = "gpt2"; Revision = "main" }) (Some snapshot) "resolved"
            let folder, progress = download offline "gpt2"
            Expect.equal folder snapshot "from the cache, without the network"
            Expect.isEmpty progress "nothing downloaded"
            expectOriginal folder

        testCase "a commit as revision, the openai-community alias, and what is not there" <| fun () ->
            use temp = new TempDir()
            let snapshot = fakeCache temp.Path "openai-community/gpt2" false
            Expect.equal (HubCache.tryResolveCached temp.Path { RepoId = "openai-community/gpt2"; Revision = commit }) (Some snapshot) "commit"
            Expect.isNone (HubCache.tryResolveCached temp.Path { RepoId = "openai-community/gpt2"; Revision = "main" }) "no refs/main"
            Expect.equal (HubCache.tryResolveCached temp.Path { RepoId = "gpt2"; Revision = commit }) (Some snapshot) "gpt2 finds openai-community/gpt2"
            File.Delete(Path.Combine(snapshot, "model.safetensors"))
            Expect.isNone (HubCache.tryResolveCached temp.Path { RepoId = "gpt2"; Revision = commit }) "a snapshot without weights"

        testCase "offline and not cached: an error naming the cache and HF_HUB_OFFLINE, no request" <| fun () ->
            use temp = new TempDir()
            use hub = new StubHub("gpt2", tinyFiles (), fun _ -> Normal)
            let offline = { settings temp.Path hub.Endpoint with Offline = true }
            throwsGpt [ "'gpt2' is not in the Hugging Face cache"; temp.Path; "HF_HUB_OFFLINE" ] (fun () -> download offline "gpt2" |> ignore) "offline"
            Expect.isEmpty hub.Seen "no request"
    ]

[<Tests>]
let downloadTests =
    testSequenced <| testList "hub: downloads from a stub hub on 127.0.0.1" [
        testCase "config.json and model.safetensors land in the cache layout, checked, linked, with refs/main" <| fun () ->
            use temp = new TempDir()
            use hub = new StubHub("user/tiny", tinyFiles (), fun _ -> Normal)
            let folder, progress = download (settings temp.Path hub.Endpoint) "user/tiny"
            let repoDirectory = Path.Combine(temp.Path, "models--user--tiny")
            Expect.equal folder (Path.Combine(repoDirectory, "snapshots", commit)) "snapshot folder"
            Expect.equal (File.ReadAllText(Path.Combine(repoDirectory, "refs", "main"))) commit "refs/main"
            let weights = FileInfo(Path.Combine(folder, "model.safetensors"))
            Expect.equal weights.LinkTarget (Path.Combine("..", "..", "blobs", weightsSha256 ())) "a relative link to the blob"
            Expect.isEmpty (Directory.GetFiles(Path.Combine(repoDirectory, "blobs"), "*.incomplete")) "no partial files"
            let last = progress |> List.filter (fun p -> p.FileName = "model.safetensors") |> List.last
            Expect.isTrue last.Completed "progress ends completed"
            Expect.equal (Some last.BytesReceived) last.TotalBytes "every byte"
            expectOriginal folder
            let before = hub.Seen.Length
            let again, _ = download (settings temp.Path hub.Endpoint) "user/tiny"
            Expect.equal again folder "the same folder"
            Expect.equal hub.Seen.Length before "the second time from the cache, no request"

        testCase "a connection dropped halfway is resumed with a Range request" <| fun () ->
            use temp = new TempDir()
            use hub = new StubHub("user/tiny", tinyFiles (), fun name -> if name = "model.safetensors" then DropHalfwayOnce else Normal)
            let folder, _ = download (settings temp.Path hub.Endpoint) "user/tiny"
            let gets = hub.Seen |> List.filter (fun s -> s.Method = "GET" && s.Path = "/store/model.safetensors")
            Expect.equal gets.Length 2 "two GETs of the weights"
            Expect.equal gets[0].Range "" "the first from the start"
            Expect.stringStarts gets[1].Range "bytes=" "the second resumes"
            Expect.notEqual gets[1].Range "bytes=0-" "from where the first stopped"
            expectOriginal folder

        testCase "a partial file from an earlier run is resumed" <| fun () ->
            use temp = new TempDir()
            let bytes = (tinyFiles ())["model.safetensors"]
            let blobs = Path.Combine(temp.Path, "models--user--tiny", "blobs")
            Directory.CreateDirectory blobs |> ignore
            File.WriteAllBytes(Path.Combine(blobs, sha256 bytes + ".incomplete"), bytes[.. 99_999])
            use hub = new StubHub("user/tiny", tinyFiles (), fun _ -> Normal)
            let folder, _ = download (settings temp.Path hub.Endpoint) "user/tiny"
            let gets = hub.Seen |> List.filter (fun s -> s.Method = "GET" && s.Path = "/store/model.safetensors")
            Expect.equal (gets |> List.map _.Range) [ "bytes=100000-" ] "one GET for the rest"
            expectOriginal folder

        testCase "a corrupted file fails its SHA-256, and nothing is put in place" <| fun () ->
            use temp = new TempDir()
            use hub = new StubHub("user/tiny", tinyFiles (), fun name -> if name = "model.safetensors" then Corrupt else Normal)
            throwsGpt [ "model.safetensors"; "SHA-256 mismatch"; weightsSha256 (); "nothing was put in the cache" ]
                (fun () -> download (settings temp.Path hub.Endpoint) "user/tiny" |> ignore) "corrupt"
            let repoDirectory = Path.Combine(temp.Path, "models--user--tiny")
            let blobs = Directory.GetFiles(Path.Combine(repoDirectory, "blobs")) |> Array.map Path.GetFileName
            Expect.isFalse (blobs |> Array.exists (fun b -> b.StartsWith(weightsSha256 ()))) "no weights blob, no partial file"
            Expect.isFalse (File.Exists(Path.Combine(repoDirectory, "refs", "main"))) "no refs/main"
            Expect.isFalse (File.Exists(Path.Combine(repoDirectory, "snapshots", commit, "model.safetensors"))) "no weights in the snapshot"
            Expect.isNone (HubCache.tryResolveCached temp.Path { RepoId = "user/tiny"; Revision = "main" }) "nothing resolves"

        testCase "404 and 401 say what to do; the token is sent" <| fun () ->
            use temp = new TempDir()
            use missing = new StubHub("user/tiny", tinyFiles (), fun _ -> Status(404, "RepoNotFound"))
            throwsGpt [ "'user/tiny' was not found on the Hugging Face hub"; missing.Endpoint; "check the id" ]
                (fun () -> download (settings temp.Path missing.Endpoint) "user/tiny" |> ignore) "404"
            use gated = new StubHub("user/tiny", tinyFiles (), fun _ -> Status(401, ""))
            throwsGpt [ "401 Unauthorized"; "set HF_TOKEN" ] (fun () -> download (settings temp.Path gated.Endpoint) "user/tiny" |> ignore) "401"
            throwsGpt [ "did not accept the token in HF_TOKEN" ]
                (fun () -> download { settings temp.Path gated.Endpoint with Token = Some "hf_secret" } "user/tiny" |> ignore) "401 with a token"
            Expect.isTrue (gated.Seen |> List.exists (fun s -> s.Authorization = "Bearer hf_secret")) "the token goes to the hub"

        testCase "no model.safetensors: pytorch_model.bin instead" <| fun () ->
            use temp = new TempDir()
            let stateDict = temp.File "state.pth"
            let tensors, _ = Safetensors.readWithMetadata (Path.Combine(original, "model.safetensors"))
            try
                let state = Collections.Generic.Dictionary<string, torch.Tensor>()
                for name, tensor in tensors do state[name] <- tensor
                TorchSharp.PyBridge.PyTorchPickler.PickleStateDict(stateDict, state)
            finally
                for _, t in tensors do t.Dispose()
            let files = Map.ofList [ "config.json", (tinyFiles ())["config.json"]; "pytorch_model.bin", File.ReadAllBytes stateDict ]
            use hub = new StubHub("user/tiny", files, fun _ -> Normal)
            let folder, _ = download (settings (temp.File "cache") hub.Endpoint) "user/tiny"
            Expect.isTrue (File.Exists(Path.Combine(folder, "pytorch_model.bin"))) "the PyTorch weights"
            expectOriginal folder

        testCase "ModelSource: an id goes through the cache; a local folder of that name wins" <| fun () ->
            use temp = new TempDir()
            use hub = new StubHub("user/tiny", tinyFiles (), fun _ -> Normal)
            let options = { ModelSource.defaults () with Hub = settings (temp.File "cache") hub.Endpoint }
            use model = ModelSource.loadWith options "user/tiny"
            Expect.equal model.Config.VocabSize 512 "downloaded"
            throwsGpt [ "'user/other' was not found" ] (fun () -> ModelSource.loadWith options "user/other" |> ignore) "unknown id"
    ]
