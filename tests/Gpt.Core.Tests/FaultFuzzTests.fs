/// Issue 16: corrupted model folders and checkpoints, seeded. Every case is a clear error (a GptException) or a
/// correct load; never another exception, a native crash, a hang (each case runs under a 60 s guard), or more than
/// 1 GB of resident memory over the whole suite for a small model. The classes: config.json values of every wrong type
/// and absurd size (n_embd 12288 beside a small model's weights, n_layer 1,000,000, sizes of 1e9), missing and
/// duplicated keys, truncation, flipped bytes, invalid UTF-8, special files (/dev/zero, FIFOs, folders, link loops,
/// dangling links, a 17 MB file, deep nesting); non-finite weights; and for checkpoints every field of checkpoint.json
/// (types, ranges, the RNG state's size, file entries), truncated and flipped tensor files, special files, damage to
/// the latest checkpoint (named, the previous one offered) and to an older one (which must not stop the newer from
/// loading).
module Gpt.Tests.FaultFuzzTests

open System
open System.Diagnostics
open System.IO
open System.Text
open System.Text.Json.Nodes
open System.Threading
open System.Threading.Tasks
open Expecto
open TorchSharp
open Gpt
open Gpt.Model
open Gpt.Weights
open Gpt.Training
open Gpt.Tests.TestUtil

/// Resident memory of this process now, in bytes.
let private rss () =
    use self = Process.GetCurrentProcess()
    self.WorkingSet64

/// Samples resident memory every 10 ms while it lives; Peak is the largest seen.
type private MemoryWatch() =
    let baseline = rss ()
    let peak = ref baseline
    let stop = new CancellationTokenSource()
    let sampler =
        Task.Run(fun () ->
            while not stop.IsCancellationRequested do
                peak.Value <- max peak.Value (rss ())
                Thread.Sleep 10)
    member _.Baseline = baseline
    member _.Peak = max peak.Value (rss ())
    interface IDisposable with
        member _.Dispose() =
            stop.Cancel()
            sampler.Wait()
            stop.Dispose()

/// The outcome of a case: loaded (with what the caller measured) or refused with a GptException's message.
type private Outcome<'T> =
    | Loaded of 'T
    | Refused of string

/// Runs a case on another thread with a 60 s guard against hangs. A GptException is a refusal; any other exception
/// fails the test (a crash the user would see as a stack trace).
let private attempt (what: string) (load: unit -> 'T) : Outcome<'T> =
    let work =
        Task.Run(fun () ->
            try
                Loaded(load ())
            with
            | :? GptException as e -> Refused e.Message
            | e -> failtestf "%s: %s instead of a GptException: %s" what (e.GetType().Name) e.Message)
    if not (work.Wait(TimeSpan.FromSeconds 60.0)) then failtestf "%s: did not finish within 60 s" what
    match work.Result with
    | Refused message as refused ->
        Expect.isNotEmpty message (sprintf "%s: a message" what)
        Expect.isLessThan message.Length 1500 (sprintf "%s: a short message, found %d characters" what message.Length)
        refused
    | loaded -> loaded

let private makeFifo (path: string) =
    try
        use mkfifo = Process.Start(ProcessStartInfo("mkfifo", path, UseShellExecute = false))
        mkfifo.WaitForExit()
        mkfifo.ExitCode = 0
    with _ -> false

/// Values of every wrong type and size, as JSON text.
let private hostileValues =
    [| "0"; "-1"; "1"; "2"; "3"; "7"; "64"; "12288"; "1000000"; "1e9"; "1000000000"; "2147483647"; "2147483648"; "-2147483649"
       "9223372036854775808"; "1e300"; "-1e300"; "1.5"; "0.0"; "1e-300"; "\"12\""; "\"\""; "null"; "true"; "false"; "[]"; "{}"
       "[1, 2]"; "{\"a\": 1}"; "\"gpt2\""; "\"\\ud800\"" |]

// ---- model folders ------------------------------------------------------------------------------------------------

let private fixtureConfig = lazy (File.ReadAllText(fixture "tiny-gpt2/config.json"))
let private fixtureWeights = fixture "tiny-gpt2/model.safetensors"

/// The fixture's model: the shape every successful load must have (the weights file is the same in every case).
let private expected = lazy (Pretrained.readConfig (fixture "tiny-gpt2/config.json"))

/// A model folder whose config.json is written by `writeConfig` and whose weights are the fixture's (a link).
let private folder (root: string) (index: int) (writeConfig: string -> unit) =
    let directory = Path.Combine(root, sprintf "case-%03d" index)
    Directory.CreateDirectory directory |> ignore
    File.CreateSymbolicLink(Path.Combine(directory, "model.safetensors"), fixtureWeights) |> ignore
    writeConfig (Path.Combine(directory, "config.json"))
    directory

/// A placeholder for a raw JSON value, replaced in the text (a value such as "\ud800" cannot be serialized).
let private placeholder = "\"__raw_value__\""

/// The JSON text of an object with one key's value set to raw JSON text.
let private setRaw (json: JsonObject) (key: string) (raw: string) =
    json[key] <- JsonValue.Create "__raw_value__"
    json.ToJsonString().Replace(placeholder, raw)

/// The config.json text with one key's value replaced (or the key removed when value is None).
let private withField (key: string) (value: string option) =
    let json = JsonNode.Parse(fixtureConfig.Value).AsObject()
    match value with
    | Some raw -> setRaw json key raw
    | None ->
        json.Remove key |> ignore
        json.ToJsonString()

/// Config cases, seeded: (name, writer of config.json).
let private configCases (random: Random) : (string * (string -> unit)) list =
    let text (content: string) = fun (path: string) -> File.WriteAllText(path, content)
    let bytes (content: byte[]) = fun (path: string) -> File.WriteAllBytes(path, content)
    let fields =
        [| "vocab_size"; "n_positions"; "n_ctx"; "n_embd"; "n_head"; "n_layer"; "layer_norm_epsilon"; "resid_pdrop"
           "tie_word_embeddings"; "qkv_bias"; "model_type"; "activation_function"; "n_inner"; "architectures"
           "scale_attn_by_inverse_layer_idx" |]
    let original = Encoding.UTF8.GetBytes fixtureConfig.Value
    [ // The issue's cases, always present.
      "n_embd 12288 beside a small model's weights", text (withField "n_embd" (Some "12288"))
      "n_layer 1,000,000", text (withField "n_layer" (Some "1000000"))
      "vocab_size 1e9", text (withField "vocab_size" (Some "1000000000"))
      "n_positions 1e9", text (withField "n_positions" (Some "1000000000"))
      "n_embd 1e9", text (withField "n_embd" (Some "1000000000"))
      // Every field with a random hostile value, several times over.
      for i in 1 .. 150 do
          let key = fields[random.Next fields.Length]
          let value = hostileValues[random.Next hostileValues.Length]
          sprintf "%s = %s (#%d)" key value i, text (withField key (Some value))
      for key in fields do sprintf "%s missing" key, text (withField key None)
      // Half of a surrogate pair is valid JSON but no text: every string a reader looks at.
      for key in [ "model_type"; "activation_function" ] do
          sprintf "%s = \"\\ud800\"" key, text (withField key (Some "\"\\ud800\""))
      "architectures = [\"\\udc00\"]", text (withField "architectures" (Some "[\"\\udc00\"]"))
      for key in [ "n_embd"; "n_layer"; "vocab_size"; "n_head" ] do
          sprintf "%s twice" key, text (fixtureConfig.Value.TrimEnd().TrimEnd('}') + sprintf ", \"%s\": 64}" key)
      for i in 1 .. 12 do
          let cut = random.Next original.Length
          sprintf "truncated at byte %d" cut, bytes original[.. cut - 1]
      for i in 1 .. 12 do
          let position = random.Next original.Length
          let flipped = Array.copy original
          flipped[position] <- flipped[position] ^^^ byte (1 <<< random.Next 8)
          sprintf "byte %d flipped (#%d)" position i, bytes flipped
      "invalid UTF-8 in a string", bytes (Array.concat [ original[.. 20]; [| 0xFFuy; 0xFEuy |]; original[21 ..] ])
      "a byte-order mark, then the config", bytes (Array.append [| 0xEFuy; 0xBBuy; 0xBFuy |] original)
      "not an object", text "[1, 2, 3]"
      "null", text "null"
      "empty", text ""
      "NUL bytes", bytes (Array.zeroCreate 64)
      "100,000 nested arrays", text (String('[', 100_000) + String(']', 100_000))
      "17 MB", fun path -> (use f = File.Create path in f.SetLength(17L * 1024L * 1024L))
      "a link to /dev/zero", fun path -> File.CreateSymbolicLink(path, "/dev/zero") |> ignore
      "a FIFO", fun path -> if not (makeFifo path) then File.WriteAllText(path, "")
      "a folder", fun path -> Directory.CreateDirectory path |> ignore
      "a dangling link", fun path -> File.CreateSymbolicLink(path, path + ".nowhere") |> ignore
      "a link loop", fun path ->
          File.CreateSymbolicLink(path + ".other", path) |> ignore
          File.CreateSymbolicLink(path, path + ".other") |> ignore
      "a classifier's architecture", text (withField "architectures" (Some "[\"GPT2ForSequenceClassification\"]")) ]

/// Weights with one NaN or infinity in a random tensor.
let private nonFiniteCases (random: Random) =
    [ for i in 1 .. 8 ->
          let value = [| nan; infinity; -infinity |][random.Next 3]
          sprintf "%g in a random weight (#%d)" value i, value, random.Next() ]

[<Tests>]
let modelFolderTests =
    testSequenced <| testList "fault fuzz: model folders" [
        testCase "config.json corrupted 200+ ways: a clear error or the fixture's model, within 60 s each and 1 GB in all" <| fun () ->
            use temp = new TempDir()
            use watch = new MemoryWatch()
            let random = Random(16)
            let clock = Stopwatch.StartNew()
            let cases = configCases random
            let mutable loaded = 0
            cases |> List.iteri (fun index (name, write) ->
                let directory = folder temp.Path index write
                let check (model: GptModel) =
                    let c = model.Config
                    let e = expected.Value
                    Expect.equal (c.VocabSize, c.ContextLength, c.EmbeddingDim, c.Layers) (e.VocabSize, e.ContextLength, e.EmbeddingDim, e.Layers)
                        (sprintf "%s: a load has the weights' shape" name)
                    Expect.equal model.ParameterCount (GptConfig.parameterCount e) (sprintf "%s: parameters" name)
                for via, load in [ "Pretrained.load", Pretrained.load; "ModelSource.load", ModelSource.load ] do
                    match attempt (sprintf "%s (%s)" name via) (fun () -> (use model = load directory in check model)) with
                    | Loaded() -> loaded <- loaded + 1
                    | Refused _ -> ())
            // The ones that must be refused (a sample of the issue's).
            for i, (name, write) in configCases (Random 16) |> List.take 5 |> List.indexed do
                let directory = folder temp.Path (1000 + i) write
                match attempt name (fun () -> Pretrained.load directory |> (fun m -> m.Dispose())) with
                | Loaded() -> failtestf "%s: loaded, expected an error" name
                | Refused message ->
                    Expect.isTrue (message.Contains "limit" || message.Contains "has shape") (sprintf "%s: says what is wrong: %s" name message)
            stdout.WriteLine(sprintf "fault fuzz: %d config cases (%d loads through two entry points succeeded) in %.1f s, peak RSS +%d MB"
                                cases.Length loaded clock.Elapsed.TotalSeconds ((watch.Peak - watch.Baseline) / 1048576L))
            Expect.isGreaterThan cases.Length 200 "a few hundred cases"
            Expect.isLessThan (watch.Peak - watch.Baseline) (1L <<< 30) "under 1 GB of resident memory"

        testCase "non-finite weights: an error naming the tensor by default, a load with AllowNonFinite" <| fun () ->
            use temp = new TempDir()
            let random = Random(17)
            let tensors, _ = Safetensors.readWithMetadata fixtureWeights
            try
                for index, (name, value, seed) in List.indexed (nonFiniteCases random) do
                    let pick = Random(seed)
                    let victim, tensor = tensors[pick.Next tensors.Length]
                    let directory = Path.Combine(temp.Path, sprintf "nonfinite-%d" index)
                    Directory.CreateDirectory directory |> ignore
                    File.WriteAllText(Path.Combine(directory, "config.json"), fixtureConfig.Value)
                    use edited = tensor.clone ()
                    (use flat = edited.view(-1L)
                     flat[int64 (pick.Next(int (tensor.numel ())))] <- torch.tensor(value, dtype = edited.dtype))
                    Safetensors.write (Path.Combine(directory, "model.safetensors"))
                        [ for n, t in tensors -> n, (if n = victim then edited else t) ]
                    match attempt name (fun () -> Pretrained.load directory |> (fun m -> m.Dispose())) with
                    | Loaded() -> failtestf "%s: loaded, expected an error" name
                    | Refused message ->
                        Expect.stringContains message victim (sprintf "%s: names the tensor" name)
                        Expect.stringContains message "--allow-nonfinite" (sprintf "%s: says how to load anyway" name)
                    match attempt name (fun () -> ModelSource.load directory |> (fun m -> m.Dispose())) with
                    | Loaded() -> failtestf "%s: ModelSource loaded, expected an error" name
                    | Refused _ -> ()
                    use allowed = Pretrained.loadWith { AllowNonFinite = true } directory
                    Expect.equal allowed.Config expected.Value (sprintf "%s: loads when allowed" name)
                    use viaSource = ModelSource.loadWith { ModelSource.defaults () with AllowNonFinite = true } directory
                    Expect.equal viaSource.Config expected.Value (sprintf "%s: ModelSource loads when allowed" name)
            finally
                for _, t in tensors do t.Dispose()

        testCase "a PyTorch state dict or a TensorFlow index that is a FIFO is refused, not waited on" <| fun () ->
            use temp = new TempDir()
            let directory = temp.File "bin"
            Directory.CreateDirectory directory |> ignore
            File.WriteAllText(Path.Combine(directory, "config.json"), fixtureConfig.Value)
            if makeFifo (Path.Combine(directory, "pytorch_model.bin")) then
                match attempt "pytorch_model.bin FIFO" (fun () -> Pretrained.load directory |> (fun m -> m.Dispose())) with
                | Loaded() -> failtest "a FIFO loaded"
                | Refused message -> Expect.stringContains message "not a regular file" "says why"
    ]

// ---- checkpoints --------------------------------------------------------------------------------------------------

/// A tiny GPT (so that Checkpoint.loadGpt is exercised as a resume does) trained two AdamW steps.
let private tinyConfig =
    { VocabSize = 64; ContextLength = 8; EmbeddingDim = 8; Heads = 2; Layers = 1; DropRate = 0.0; QkvBias = false
      TiedHead = true; LayerNormEpsilon = 1e-5 }

let private trainedGpt () =
    let model = new GptModel(tinyConfig, 3L)
    let optimizer = Optimizer.adamW Optimizer.defaults model
    for _ in 1 .. 2 do
        use scope = torch.NewDisposeScope()
        optimizer.ZeroGrad()
        let inputs = torch.tensor([| 0L; 1L; 2L; 3L |]).view(1L, 4L)
        let targets = torch.tensor([| 1L; 2L; 3L; 4L |]).view(1L, 4L)
        (Loss.batch model inputs targets).backward ()
        optimizer.Step()
    model, optimizer

let private stateAt (step: int) =
    { Step = step; Epoch = 1; BatchInEpoch = step; BatchesPerEpoch = 100; TokensSeen = int64 step * 32L; ElapsedSeconds = 2.0
      ValidationLoss = Some(4.0 - float step / 10.0); BestValidationLoss = Some(4.0 - float step / 10.0); DataSeed = 7
      DataFingerprint = String('a', 64); Tokenizer = "gpt2"; ModelConfiguration = Pretrained.configJson tinyConfig
      TrainingOptions = TrainerOptions.toJson Gpt.Tests.TrainingFixtures.tinyOptions }

let private copyTree (source: string) (destination: string) =
    Directory.CreateDirectory destination |> ignore
    for directory in Directory.GetDirectories(source, "*", SearchOption.AllDirectories) do
        Directory.CreateDirectory(destination + directory.Substring source.Length) |> ignore
    for file in Directory.GetFiles(source, "*", SearchOption.AllDirectories) do
        File.Copy(file, destination + file.Substring source.Length)

/// What a case does to a checkpoint folder.
type private Damage = { Name: string; Apply: string -> unit; Harmless: bool }

let private checkpointDamages (random: Random) : Damage list =
    let json (edit: JsonObject -> unit) = fun (directory: string) ->
        let path = Path.Combine(directory, "checkpoint.json")
        let node = JsonNode.Parse(File.ReadAllText path).AsObject()
        edit node
        File.WriteAllText(path, node.ToJsonString())
    let raw (edit: byte[] -> byte[]) (file: string) = fun (directory: string) ->
        let path = Path.Combine(directory, file)
        File.WriteAllBytes(path, edit (File.ReadAllBytes path))
    let replace (file: string) (make: string -> unit) = fun (directory: string) ->
        let path = Path.Combine(directory, file)
        File.Delete path
        make path
    let damage name apply = { Name = name; Apply = apply; Harmless = false }
    let fields =
        [| "format"; "version"; "step"; "epoch"; "batch_in_epoch"; "batches_per_epoch"; "tokens_seen"; "elapsed_s"
           "validation_loss"; "best_validation_loss"; "data_seed"; "data_fingerprint"; "tokenizer"; "model_tensors"
           "model_configuration"; "training_options"; "torch_rng_state"; "optimizer"; "files" |]
    let at (node: JsonNode) (key: string) : JsonObject = node[key].AsObject()
    let firstGroupSteps (o: JsonObject) =
        let groups = ((at o "optimizer").["groups"]).AsArray()
        at (groups[0]) "steps"
    let rngOfLength (n: int) = "\"" + Convert.ToBase64String(Array.zeroCreate<byte> n) + "\""
    [ for i in 1 .. 90 do
          let key = fields[random.Next fields.Length]
          let value = hostileValues[random.Next hostileValues.Length]
          damage (sprintf "%s = %s (#%d)" key value i) (fun directory ->
              let path = Path.Combine(directory, "checkpoint.json")
              File.WriteAllText(path, setRaw (JsonNode.Parse(File.ReadAllText path).AsObject()) key value))
      for key in fields do damage (sprintf "%s missing" key) (json (fun o -> o.Remove key |> ignore))
      for key in [ "format"; "tokenizer"; "data_fingerprint"; "model_tensors"; "torch_rng_state" ] do
          damage (sprintf "%s = \"\\ud800\"" key) (fun directory ->
              let path = Path.Combine(directory, "checkpoint.json")
              File.WriteAllText(path, setRaw (JsonNode.Parse(File.ReadAllText path).AsObject()) key "\"\\ud800\""))
      for n in [ 0; 1; 16; 5055; 5057; 10_000 ] do
          damage (sprintf "torch_rng_state of %d bytes" n) (json (fun o -> o["torch_rng_state"] <- JsonNode.Parse(rngOfLength n)))
      damage "torch_rng_state not base64" (json (fun o -> o["torch_rng_state"] <- JsonValue.Create "not base64 at all!"))
      damage "step -1" (json (fun o -> o["step"] <- JsonValue.Create -1))
      damage "step of another folder" (json (fun o -> o["step"] <- JsonValue.Create 3))
      damage "batch_in_epoch past the epoch" (json (fun o -> o["batch_in_epoch"] <- JsonValue.Create 1000))
      damage "model_configuration with n_embd 12288" (json (fun o ->
          o["model_configuration"] <- JsonNode.Parse(Pretrained.configJson { tinyConfig with EmbeddingDim = 12288; Heads = 2 })))
      damage "model_configuration with n_layer 1,000,000" (json (fun o ->
          let c = o["model_configuration"].AsObject() in c["n_layer"] <- JsonValue.Create 1_000_000))
      damage "a file entry outside the folder" (json (fun o ->
          (at o "files")["../../../../etc/passwd"] <- JsonNode.Parse("{\"bytes\": 1, \"sha256\": \"00\"}")))
      damage "optimizer.safetensors without an entry" (json (fun o -> (at o "files").Remove "optimizer.safetensors" |> ignore))
      damage "a recorded size off by one" (json (fun o ->
          let entry = at (at o "files") "model.safetensors"
          entry["bytes"] <- JsonValue.Create(entry["bytes"].GetValue<int64>() + 1L)))
      damage "a recorded hash of zeros" (json (fun o -> (at (at o "files") "model.safetensors")["sha256"] <- JsonValue.Create(String('0', 64))))
      damage "optimizer groups not an array" (json (fun o -> (at o "optimizer")["groups"] <- JsonValue.Create 3))
      damage "a negative AdamW step count" (json (fun o ->
          (firstGroupSteps o)["wte.weight"] <- JsonValue.Create -5))
      damage "AdamW steps for an unknown parameter" (json (fun o ->
          (firstGroupSteps o)["no.such.parameter"] <- JsonValue.Create 2))
      damage "a key twice" (raw (fun b -> Encoding.UTF8.GetBytes(Encoding.UTF8.GetString(b).TrimEnd().TrimEnd('}') + ", \"step\": 4}")) "checkpoint.json")
      damage "not an object" (replace "checkpoint.json" (fun p -> File.WriteAllText(p, "[4]")))
      for i in 1 .. 10 do
          let fraction = random.NextDouble()
          damage (sprintf "checkpoint.json truncated at %.0f%%" (100.0 * fraction)) (raw (fun b -> b[.. int (fraction * float b.Length) - 1]) "checkpoint.json")
      for i in 1 .. 10 do
          let at = random.NextDouble()
          let bit = random.Next 8
          damage (sprintf "a bit of checkpoint.json flipped (#%d)" i) (raw (fun b ->
              let c = Array.copy b
              let p = int (at * float (c.Length - 1))
              c[p] <- c[p] ^^^ byte (1 <<< bit)
              c) "checkpoint.json")
      damage "invalid UTF-8 in checkpoint.json" (raw (fun b -> Array.concat [ b[.. 30]; [| 0xC3uy; 0x28uy |]; b[31 ..] ]) "checkpoint.json")
      for file in [ "model.safetensors"; "optimizer.safetensors" ] do
          damage (sprintf "%s truncated" file) (raw (fun b -> b[.. b.Length - 5]) file)
          damage (sprintf "%s with a byte flipped" file) (raw (fun b -> (let c = Array.copy b in c[c.Length - 3] <- c[c.Length - 3] ^^^ 0x10uy; c)) file)
          damage (sprintf "%s missing" file) (fun d -> File.Delete(Path.Combine(d, file)))
          damage (sprintf "%s a FIFO" file) (replace file (fun p -> if not (makeFifo p) then File.WriteAllText(p, "")))
          damage (sprintf "%s a folder" file) (replace file (fun p -> Directory.CreateDirectory p |> ignore))
          damage (sprintf "%s a link to /dev/zero" file) (replace file (fun p -> File.CreateSymbolicLink(p, "/dev/zero") |> ignore))
      damage "checkpoint.json a link to /dev/zero" (replace "checkpoint.json" (fun p -> File.CreateSymbolicLink(p, "/dev/zero") |> ignore))
      damage "checkpoint.json a FIFO" (replace "checkpoint.json" (fun p -> if not (makeFifo p) then File.WriteAllText(p, "")))
      damage "checkpoint.json a link loop" (replace "checkpoint.json" (fun p ->
          File.CreateSymbolicLink(p + ".b", p) |> ignore
          File.CreateSymbolicLink(p, p + ".b") |> ignore))
      damage "checkpoint.json of 20 MB" (replace "checkpoint.json" (fun p -> (use f = File.Create p in f.SetLength(20L <<< 20))))
      { Name = "validation_loss changed (harmless)"; Apply = json (fun o -> o["validation_loss"] <- JsonValue.Create 1.5); Harmless = true }
      { Name = "created_utc removed (harmless)"; Apply = json (fun o -> o.Remove "created_utc" |> ignore); Harmless = true } ]

[<Tests>]
let checkpointTests =
    testSequenced <| testList "fault fuzz: checkpoints" [
        testCase "checkpoints damaged 150+ ways, latest or older: a clear error naming it, or a correct resume" <| fun () ->
            use temp = new TempDir()
            use watch = new MemoryWatch()
            let pristine = temp.File "pristine"
            let model, optimizer = trainedGpt ()
            (use _ = model
             use _ = optimizer
             Checkpoint.save pristine 5 model optimizer (stateAt 2) |> ignore
             Checkpoint.save pristine 5 model optimizer (stateAt 4) |> ignore)
            // The same bytes on every run (the save time is the only thing that differs), so that a flipped bit lands on
            // the same character every time.
            for file in Directory.GetFiles(pristine, "checkpoint.json", SearchOption.AllDirectories) do
                let node = JsonNode.Parse(File.ReadAllText file).AsObject()
                node["created_utc"] <- JsonValue.Create "2026-12-01T00:00:00.0000000Z"
                File.WriteAllText(file, node.ToJsonString(Text.Json.JsonSerializerOptions(WriteIndented = true)))
            let random = Random(18)
            let damages = checkpointDamages random
            let clock = Stopwatch.StartNew()
            let mutable resumed = 0
            damages |> List.iteri (fun index damage ->
                let latest = random.NextDouble() < 0.7
                let root = temp.File(sprintf "case-%03d" index)
                copyTree pristine root
                let target = Path.Combine(root, if latest then "step-00000004" else "step-00000002")
                damage.Apply target
                let what = sprintf "%s (%s)" damage.Name (if latest then "latest" else "older")
                // Listing never fails, whatever a checkpoint holds.
                match attempt (what + ": inspect") (fun () -> Checkpoint.inspect root) with
                | Loaded inspected -> Expect.equal inspected.Length 2 (sprintf "%s: both listed" what)
                | Refused message -> failtestf "%s: inspect refused (%s)" what message
                let resumeOutcome =
                    attempt what (fun () ->
                        let directory = Checkpoint.resolve root
                        use loaded = Checkpoint.loadGpt directory
                        use other = new GptModel(tinyConfig, 9L)
                        use otherOptimizer = Optimizer.adamW Optimizer.defaults other
                        Checkpoint.restore directory other otherOptimizer |> ignore
                        directory)
                match resumeOutcome with
                | Loaded directory ->
                    resumed <- resumed + 1
                    if not latest || damage.Harmless then
                        Expect.equal (Path.GetFileName directory) "step-00000004" (sprintf "%s: the newest checkpoint resumes" what)
                | Refused message ->
                    if not latest then failtestf "%s: damage to an older checkpoint stopped the intact newer one: %s" what message
                    if damage.Harmless then failtestf "%s: refused (%s)" what message
                    Expect.stringContains message "step-00000004" (sprintf "%s: names the damaged checkpoint" what)
                    if message.Contains "is damaged" then
                        Expect.stringContains message "step-00000002" (sprintf "%s: offers the previous complete one" what))
            stdout.WriteLine(sprintf "fault fuzz: %d checkpoint cases (%d resumed) in %.1f s, peak RSS +%d MB"
                                damages.Length resumed clock.Elapsed.TotalSeconds ((watch.Peak - watch.Baseline) / 1048576L))
            Expect.isGreaterThan damages.Length 150 "many cases"
            Expect.isLessThan (watch.Peak - watch.Baseline) (1L <<< 30) "under 1 GB of resident memory"

        testCase "a full disk while saving leaves the previous checkpoint intact (a 1 MB tmpfs)" <| fun () ->
            use temp = new TempDir()
            let mountPoint = temp.File "small"
            Directory.CreateDirectory mountPoint |> ignore
            let run (file: string) (args: string) =
                try
                    use p = Process.Start(ProcessStartInfo(file, args, UseShellExecute = false, RedirectStandardError = true))
                    p.WaitForExit()
                    p.ExitCode = 0
                with _ -> false
            // Mounting needs root (and a kernel that allows it here): otherwise there is no full disk to test against.
            if not (OperatingSystem.IsLinux() && run "mount" (sprintf "-t tmpfs -o size=1m tmpfs %s" mountPoint)) then
                skiptest "cannot mount a small tmpfs here (needs root on Linux)"
            try
                let root = Path.Combine(mountPoint, "checkpoints")
                // A model of ~290 KB per checkpoint (weights plus two AdamW moments): two fit, a third does not.
                let config = { tinyConfig with VocabSize = 2048; EmbeddingDim = 16 }
                use model = new GptModel(config, 1L)
                use optimizer = Optimizer.adamW Optimizer.defaults model
                let state step = { stateAt step with ModelConfiguration = Pretrained.configJson config }
                let first = Checkpoint.save root 10 model optimizer (state 1)
                let mutable saved = [ first ]
                let mutable failure = None
                let mutable step = 2
                while failure.IsNone && step < 20 do
                    try
                        saved <- saved @ [ Checkpoint.save root 10 model optimizer (state step) ]
                    with :? GptException as e ->
                        failure <- Some e.Message
                    step <- step + 1
                match failure with
                | None -> failtest "the disk never filled"
                | Some message ->
                    Expect.stringContains message "could not write checkpoint" "says what failed"
                    Expect.stringContains message "is intact" "says the previous one is intact"
                let last = List.last saved
                Expect.equal (Checkpoint.latest root) (Some last) "the last complete checkpoint is still the latest"
                Expect.isEmpty (Directory.GetDirectories(root, ".tmp-*")) "no half-written folder left"
                use other = new GptModel(config, 2L)
                use otherOptimizer = Optimizer.adamW Optimizer.defaults other
                Checkpoint.restore last other otherOptimizer |> ignore
                Expect.isTrue (Gpt.Tests.TrainingFixtures.sameWeights model other) "it restores"
            finally
                run "umount" mountPoint |> ignore
    ]
