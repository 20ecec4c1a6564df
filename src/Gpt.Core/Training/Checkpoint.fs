namespace Gpt.Training

open System
open System.Collections.Generic
open System.IO
open System.Security.Cryptography
open System.Text
open System.Text.Json
open TorchSharp
open Gpt
open Gpt.Model
open Gpt.Weights

/// Where a run stands, written into a checkpoint beside the model and optimizer tensors.
type CheckpointState =
    { /// Optimizer steps done.
      Step: int
      /// The epoch of the next batch, counting from 1.
      Epoch: int
      /// Index of the next batch in that epoch's (seeded) order.
      BatchInEpoch: int
      BatchesPerEpoch: int
      TokensSeen: int64
      /// Training time so far, across resumed sessions.
      ElapsedSeconds: float
      /// Validation loss measured at this step, when there was an evaluation at it.
      ValidationLoss: float option
      BestValidationLoss: float option
      /// Seed of the data order (each epoch's shuffle derives from it).
      DataSeed: int
      /// SHA-256 of the training token ids: a resume on other data is refused.
      DataFingerprint: string
      /// The tokenizer's name ("gpt2", "simple").
      Tokenizer: string
      /// The model's configuration as JSON (what is needed to rebuild the model before loading the weights).
      ModelConfiguration: string
      /// The training options as JSON.
      TrainingOptions: string }

/// Checkpoints that lose nothing: a directory `step-NNNNNNNN` holding
///   model.safetensors      the model's state_dict;
///   optimizer.safetensors  AdamW's moments by parameter name ("<name>.exp_avg", "<name>.exp_avg_sq");
///   checkpoint.json        the CheckpointState, AdamW's step count per parameter and hyperparameters per group,
///                          the torch CPU generator state (dropout draws from it), and the size and SHA-256 of
///                          both tensor files.
/// A checkpoint is written into a temporary sibling directory (`.tmp-…`), checkpoint.json last, then renamed into
/// place in one step: a save killed midway leaves a `.tmp-…` directory that loading ignores, and the previous
/// checkpoint intact.
[<RequireQualifiedAccess>]
module Checkpoint =
    let formatName = "gpt-training-checkpoint"
    let formatVersion = 1
    let modelFile = "model.safetensors"
    let optimizerFile = "optimizer.safetensors"
    let stateFile = "checkpoint.json"

    let private directoryName (step: int) = sprintf "step-%08d" step

    let private sha256 (path: string) =
        use stream = File.OpenRead path
        Convert.ToHexString(SHA256.HashData stream).ToLowerInvariant()

    /// The SHA-256 of token ids (as little-endian int32): a short identity for a training set.
    let fingerprint (ids: int[]) = Gpt.Text.Dataset.fingerprint ids

    // ---- the JSON document ----

    type private FileEntry = { Name: string; Bytes: int64; Sha256: string }

    type private Document =
        { State: CheckpointState
          /// "all": model.safetensors holds the whole state_dict; "trainable": only what was trained (the frozen
          /// parameters come from the run's base model).
          ModelTensors: string
          RngState: byte[]
          Steps: IReadOnlyDictionary<string, int64>
          Files: FileEntry[] }

    /// AdamW's hyperparameters per group and step count per parameter, as the "optimizer" object.
    let private writeOptimizer (writer: Utf8JsonWriter) (optimizer: NamedAdamW) =
        writer.WriteStartObject "optimizer"
        writer.WriteString("type", "AdamW")
        writer.WriteStartArray "groups"
        let steps = dict (Optimizer.stepCounts optimizer)
        for group in optimizer.Groups do
            writer.WriteStartObject()
            writer.WriteNumber("weight_decay", group.WeightDecay)
            writer.WriteNumber("lr", optimizer.LearningRate)
            writer.WriteNumber("beta1", optimizer.Settings.Beta1)
            writer.WriteNumber("beta2", optimizer.Settings.Beta2)
            writer.WriteNumber("eps", optimizer.Settings.Epsilon)
            writer.WriteStartObject "steps"
            for name in group.Names do
                writer.WriteNumber(name, steps[name])
            writer.WriteEndObject()
            writer.WriteEndObject()
        writer.WriteEndArray()
        writer.WriteEndObject()

    let private writeDocument (path: string) (state: CheckpointState) (modelTensors: string) (rng: byte[]) (optimizer: NamedAdamW) (files: FileEntry[]) =
        let parseCheck what (json: string) =
            try JsonDocument.Parse(json).Dispose()
            with e -> raise (GptException(sprintf "the %s to store in a checkpoint is not valid JSON: %s" what e.Message, e))
        parseCheck "model configuration" state.ModelConfiguration
        parseCheck "training options" state.TrainingOptions
        let optionalNumber (writer: Utf8JsonWriter) (name: string) (value: float option) =
            match value with
            | Some v when Double.IsFinite v -> writer.WriteNumber(name, v)
            | _ -> writer.WriteNull name
        use stream = new FileStream(path, FileMode.CreateNew, FileAccess.Write)
        (use writer = new Utf8JsonWriter(stream, JsonWriterOptions(Indented = true))
         writer.WriteStartObject()
         writer.WriteString("format", formatName)
         writer.WriteNumber("version", formatVersion)
         writer.WriteString("created_utc", DateTime.UtcNow.ToString("o"))
         writer.WriteNumber("step", state.Step)
         writer.WriteNumber("epoch", state.Epoch)
         writer.WriteNumber("batch_in_epoch", state.BatchInEpoch)
         writer.WriteNumber("batches_per_epoch", state.BatchesPerEpoch)
         writer.WriteNumber("tokens_seen", state.TokensSeen)
         writer.WriteNumber("elapsed_s", state.ElapsedSeconds)
         optionalNumber writer "validation_loss" state.ValidationLoss
         optionalNumber writer "best_validation_loss" state.BestValidationLoss
         writer.WriteNumber("data_seed", state.DataSeed)
         writer.WriteString("data_fingerprint", state.DataFingerprint)
         writer.WriteString("tokenizer", state.Tokenizer)
         writer.WriteString("model_tensors", modelTensors)
         writer.WritePropertyName "model_configuration"
         writer.WriteRawValue state.ModelConfiguration
         writer.WritePropertyName "training_options"
         writer.WriteRawValue state.TrainingOptions
         writer.WriteString("torch_rng_state", Convert.ToBase64String rng)
         writeOptimizer writer optimizer
         writer.WriteStartObject "files"
         for file in files do
             writer.WriteStartObject file.Name
             writer.WriteNumber("bytes", file.Bytes)
             writer.WriteString("sha256", file.Sha256)
             writer.WriteEndObject()
         writer.WriteEndObject()
         writer.WriteEndObject())
        stream.Flush(true)

    /// The most a checkpoint.json may hold (a GPT-2 XL run's is about 40 KB).
    let stateFileLimit = BoundedFile.defaultLimit

    /// The byte length of torch's CPU generator state (5,056 for libtorch's mt19937). A state of another length makes
    /// libtorch abort the whole process (a c10::Error no handler catches), so a checkpoint's is checked against it.
    let private rngStateLength =
        lazy
            (Gpt.Kernels.NativeLibraries.install ()
             use state = torch.random.get_rng_state ()
             state.numel ())

    let private isSha256 (text: string) =
        text.Length = 64 && text |> Seq.forall (fun c -> Char.IsAsciiDigit c || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'))

    /// Typed access to the properties of a checkpoint.json: every value's type and range is checked, and every error
    /// names the file and the property. A value of the wrong type is a GptException, never an InvalidOperationException.
    type private Fields(path: string, root: JsonElement) =
        do if root.ValueKind <> JsonValueKind.Object then Errors.fail "checkpoint '%s': not a JSON object" path
        member _.Root = root
        member _.Fail(name: string, expected: string, value: JsonElement) : 'T =
            let raw = value.GetRawText()
            let raw = if raw.Length > 80 then raw.Substring(0, 80) + "..." else raw
            Errors.fail "checkpoint '%s': property '%s' should be %s, found %s" path name expected raw
        member _.Property(element: JsonElement, name: string) =
            match element.TryGetProperty name with
            | true, value -> value
            | _ -> Errors.fail "checkpoint '%s': property '%s' is missing" path name
        member this.Get(name: string) = this.Property(root, name)
        member this.Int64(element: JsonElement, name: string, minimum: int64) =
            let value = this.Property(element, name)
            match (if value.ValueKind = JsonValueKind.Number then value.TryGetInt64() else false, 0L) with
            | true, v when v >= minimum -> v
            | _ -> this.Fail(name, sprintf "an integer >= %d" minimum, value)
        member this.Int32(name: string, minimum: int) =
            let value = this.Get name
            match (if value.ValueKind = JsonValueKind.Number then value.TryGetInt32() else false, 0) with
            | true, v when v >= minimum -> v
            | _ -> this.Fail(name, (if minimum = Int32.MinValue then "a 32-bit integer" else sprintf "an integer >= %d" minimum), value)
        member this.Int64(name: string, minimum: int64) = this.Int64(root, name, minimum)
        member this.Finite(element: JsonElement, name: string) =
            let value = this.Property(element, name)
            match (if value.ValueKind = JsonValueKind.Number then value.TryGetDouble() else false, 0.0) with
            | true, v when Double.IsFinite v -> v
            | _ -> this.Fail(name, "a finite number", value)
        member this.OptionalFinite(name: string) =
            if (this.Get name).ValueKind = JsonValueKind.Null then None else Some(this.Finite(root, name))
        member this.Text(element: JsonElement, name: string) =
            let value = this.Property(element, name)
            if value.ValueKind <> JsonValueKind.String then this.Fail(name, "a string", value)
            value.GetString()
        member this.Text(name: string) = this.Text(root, name)
        member this.Object(element: JsonElement, name: string) =
            let value = this.Property(element, name)
            if value.ValueKind <> JsonValueKind.Object then this.Fail(name, "a JSON object", value)
            value
        member this.Array(element: JsonElement, name: string) =
            let value = this.Property(element, name)
            if value.ValueKind <> JsonValueKind.Array then this.Fail(name, "a JSON array", value)
            value

    /// The run state: every number in its range, the model configuration and training options JSON objects.
    let private readState (path: string) (fields: Fields) : CheckpointState =
        // What the configuration describes depends on the task (loadGpt reads it as a config.json, within GptConfig's
        // limits, before anything is built).
        let configuration = fields.Object(fields.Root, "model_configuration").GetRawText()
        // Read into TrainerOptions (and checked) by whoever resumes the run: that type is defined after this module.
        let options = fields.Object(fields.Root, "training_options").GetRawText()
        let state =
            { Step = fields.Int32("step", 0)
              Epoch = fields.Int32("epoch", 1)
              BatchInEpoch = fields.Int32("batch_in_epoch", 0)
              BatchesPerEpoch = fields.Int32("batches_per_epoch", 1)
              TokensSeen = fields.Int64("tokens_seen", 0L)
              ElapsedSeconds = fields.Finite(fields.Root, "elapsed_s")
              ValidationLoss = fields.OptionalFinite "validation_loss"
              BestValidationLoss = fields.OptionalFinite "best_validation_loss"
              DataSeed = fields.Int32("data_seed", Int32.MinValue)
              DataFingerprint = fields.Text "data_fingerprint"
              Tokenizer = fields.Text "tokenizer"
              ModelConfiguration = configuration
              TrainingOptions = options }
        if state.BatchInEpoch > state.BatchesPerEpoch then
            Errors.fail "checkpoint '%s': batch_in_epoch %d is past batches_per_epoch %d" path state.BatchInEpoch state.BatchesPerEpoch
        if state.ElapsedSeconds < 0.0 then Errors.fail "checkpoint '%s': elapsed_s %g is negative" path state.ElapsedSeconds
        // Compared with the run's own (a SHA-256 in hex), never interpreted: any short identity will do.
        if state.DataFingerprint.Length = 0 || state.DataFingerprint.Length > 200 then
            Errors.fail "checkpoint '%s': data_fingerprint should be an identity of 1 to 200 characters" path
        if state.Tokenizer.Length = 0 || state.Tokenizer.Length > 100 then
            Errors.fail "checkpoint '%s': tokenizer should be a name of 1 to 100 characters" path
        state

    /// AdamW's step count per parameter, from every group.
    let private readSteps (path: string) (fields: Fields) =
        let optimizer = fields.Object(fields.Root, "optimizer")
        let steps = Dictionary<string, int64>()
        for group in fields.Array(optimizer, "groups").EnumerateArray() do
            if group.ValueKind <> JsonValueKind.Object then fields.Fail("groups", "an array of JSON objects", group)
            for name in [ "weight_decay"; "lr"; "beta1"; "beta2"; "eps" ] do
                if fst (group.TryGetProperty name) then fields.Finite(group, name) |> ignore
            for entry in fields.Object(group, "steps").EnumerateObject() do
                if steps.ContainsKey entry.Name then Errors.fail "checkpoint '%s': parameter '%s' has step counts in two groups" path entry.Name
                steps[entry.Name] <- fields.Int64(group.GetProperty "steps", entry.Name, 0L)
        steps

    /// The recorded tensor files: exactly model.safetensors and optimizer.safetensors (a name is never a path), each with
    /// a size and a SHA-256.
    let private readFiles (path: string) (fields: Fields) =
        let files =
            [| for entry in fields.Object(fields.Root, "files").EnumerateObject() ->
                   if entry.Name <> modelFile && entry.Name <> optimizerFile then
                       Errors.fail "checkpoint '%s': 'files' names '%s', expected only %s and %s" path
                           (if entry.Name.Length > 80 then entry.Name.Substring(0, 80) + "..." else entry.Name) modelFile optimizerFile
                   if entry.Value.ValueKind <> JsonValueKind.Object then fields.Fail(entry.Name, "a JSON object", entry.Value)
                   let sha = fields.Text(entry.Value, "sha256")
                   if not (isSha256 sha) then fields.Fail("sha256", "64 hex digits", entry.Value.GetProperty "sha256")
                   { Name = entry.Name; Bytes = fields.Int64(entry.Value, "bytes", 0L); Sha256 = sha.ToLowerInvariant() } |]
        for required in [ modelFile; optimizerFile ] do
            if not (files |> Array.exists (fun f -> f.Name = required)) then
                Errors.fail "checkpoint '%s': no entry for %s under 'files'" path required
        files

    /// The step a directory's name says ("step-00000120" -> 120), if it is a checkpoint's name.
    let stepOfName (directory: string) : int option =
        let name = Path.GetFileName(Path.TrimEndingDirectorySeparator directory)
        match name with
        | null -> None
        | name when name.StartsWith("step-", StringComparison.Ordinal) ->
            match Int32.TryParse(name.Substring 5, Globalization.NumberStyles.None, Globalization.CultureInfo.InvariantCulture) with
            | true, step -> Some step
            | _ -> None
        | _ -> None

    /// Reads and checks checkpoint.json: a regular file of at most stateFileLimit bytes, strict UTF-8, JSON without
    /// duplicate keys, every field of the right type and in range, an RNG state of the size this libtorch uses, and a
    /// step equal to the one in the directory's name. Any problem is a GptException naming the file.
    let private readDocument (directory: string) : Document =
        let path = Path.Combine(directory, stateFile)
        if not (Directory.Exists directory) then Errors.fail "checkpoint directory '%s' does not exist" directory
        if not (FileInfo(path).Exists) then
            Errors.fail "'%s' is not a complete checkpoint: %s is missing (was its save interrupted?)" directory stateFile
        use document = BoundedFile.readJson "checkpoint" stateFileLimit path
        let fields = Fields(path, document.RootElement)
        let format = fields.Text "format"
        if format <> formatName then Errors.fail "checkpoint '%s': format '%s', expected '%s'" path format formatName
        let version = fields.Int32("version", Int32.MinValue)
        if version <> formatVersion then
            Errors.fail "checkpoint '%s' has format version %d; this program reads version %d" path version formatVersion
        let modelTensors =
            match document.RootElement.TryGetProperty "model_tensors" with
            | true, _ ->
                match fields.Text "model_tensors" with
                | "all" | "trainable" as kind -> kind
                | other -> Errors.fail "checkpoint '%s': model_tensors '%s', expected 'all' or 'trainable'" path other
            | _ -> "all"
        let rngText = fields.Text "torch_rng_state"
        // Base64 of the expected length, checked before decoding anything large.
        let expectedRng = rngStateLength.Force()
        if int64 rngText.Length > 4L * (expectedRng + 2L) / 3L + 4L then
            Errors.fail "checkpoint '%s': torch_rng_state holds more than the %d bytes of torch's generator state" path expectedRng
        let rng =
            try Convert.FromBase64String rngText
            with :? FormatException -> Errors.fail "checkpoint '%s': torch_rng_state is not base64" path
        if int64 rng.Length <> expectedRng then
            Errors.fail "checkpoint '%s': torch_rng_state has %d bytes, torch's generator state has %d (a different libtorch, or a damaged file)"
                path rng.Length expectedRng
        let state = readState path fields
        match stepOfName directory with
        | Some step when step <> state.Step ->
            Errors.fail "checkpoint '%s': step %d, but its folder is named for step %d" path state.Step step
        | _ -> ()
        { State = state; ModelTensors = modelTensors; RngState = rng; Steps = readSteps path fields; Files = readFiles path fields }

    /// Checks that the tensor files are there with the recorded sizes (cheap) and, when `hashes`, the recorded SHA-256.
    let private checkFiles (directory: string) (document: Document) (hashes: bool) =
        for file in document.Files do
            let path = Path.Combine(directory, file.Name)
            if not (File.Exists path) then Errors.fail "checkpoint '%s': %s is missing" directory file.Name
            // A regular file (links followed; a FIFO would block the hash forever), of the recorded size.
            let path, length = BoundedFile.check (sprintf "checkpoint '%s': tensor file" directory) Int64.MaxValue path
            if length <> file.Bytes then
                Errors.fail "checkpoint '%s': %s has %d bytes, expected %d (truncated or replaced?)" directory file.Name length file.Bytes
            if hashes && sha256 path <> file.Sha256 then
                Errors.fail "checkpoint '%s': %s does not match its recorded SHA-256 (corrupted?)" directory file.Name

    // ---- model state ----

    /// The model tensors a checkpoint holds: the state_dict without the frozen parameters (those that require no
    /// gradient come from the run's base model), and whether that is all of it.
    let savedTensors (model: torch.nn.Module) : (string * torch.Tensor) list * bool =
        let frozen = HashSet<string>()
        for struct (name, parameter) in model.named_parameters () do
            if not parameter.requires_grad then frozen.Add name |> ignore
        [ for KeyValue(name, tensor) in model.state_dict () do if not (frozen.Contains name) then name, tensor ], frozen.Count = 0

    /// Copies tensors into the model's saved tensors (savedTensors), checking that the names, shapes and types match
    /// exactly.
    let loadStateDict (source: string) (model: torch.nn.Module) (tensors: IReadOnlyDictionary<string, torch.Tensor>) =
        let slots = [ for name, tensor in fst (savedTensors model) -> { StateDict.Name = name; StateDict.Destination = tensor; StateDict.Layout = StateDict.Exact } ]
        StateDict.copy (sprintf "checkpoint '%s'" source) "keys" id slots tensors

    // ---- listing ----

    /// A checkpoint folder under a root (a step-NNNNNNNN directory) and what reading it found.
    type Inspection =
        { Directory: string
          /// The step its name says.
          Step: int
          /// Its state when checkpoint.json reads and checks and the files have their recorded sizes.
          State: CheckpointState option
          /// What is wrong with it otherwise.
          Problem: string option }

    /// Reads a directory's checkpoint.json and checks the files' sizes: the state, or what is wrong. Any failure
    /// counts (a GptException, a file system error, a file deleted meanwhile by another process's pruning): a damaged
    /// checkpoint never stops the others from being listed.
    let private tryRead (directory: string) : Result<CheckpointState, string> =
        try
            let document = readDocument directory
            checkFiles directory document false
            Ok document.State
        with
        | :? GptException as e -> Error e.Message
        | e -> Error(sprintf "%s: %s" (e.GetType().Name) e.Message)

    /// Every step-NNNNNNNN folder under a root, by the step in its name, each with its state or its problem. Temporary
    /// folders of unfinished saves (.tmp-*) are not checkpoints and are not listed.
    let inspect (root: string) : Inspection[] =
        if not (Directory.Exists root) then [||]
        else
            let directories = try Directory.GetDirectories(root, "step-*") with :? IOException | :? UnauthorizedAccessException -> [||]
            directories
            |> Array.choose (fun d -> stepOfName d |> Option.map (fun step -> d, step))
            |> Array.sortBy snd
            |> Array.choose (fun (directory, step) ->
                match tryRead directory with
                | Ok state -> Some { Directory = directory; Step = step; State = Some state; Problem = None }
                // Deleted while it was read (pruned by a run that holds the folder): gone, not damaged.
                | Error _ when not (Directory.Exists directory) -> None
                | Error problem -> Some { Directory = directory; Step = step; State = None; Problem = Some problem })

    /// Complete checkpoints under a root directory, oldest first. Temporary directories of unfinished saves and
    /// damaged checkpoints (see inspect) are left out.
    let list (root: string) : (string * CheckpointState)[] =
        inspect root |> Array.choose (fun i -> i.State |> Option.map (fun s -> i.Directory, s))

    /// The most recent complete checkpoint under a root directory.
    let latest (root: string) : string option = list root |> Array.tryLast |> Option.map fst

    /// The complete checkpoint with the lowest validation loss under a root directory.
    let best (root: string) : string option =
        list root
        |> Array.choose (fun (d, s) -> s.ValidationLoss |> Option.map (fun loss -> d, loss))
        |> Array.sortBy snd
        |> Array.tryHead
        |> Option.map fst

    /// What to tell the user about a damaged checkpoint: what is wrong, and the complete checkpoint before it, to
    /// resume from explicitly (nothing is resumed silently from an older checkpoint than the user expects).
    let private damaged (what: string) (directory: string) (problem: string) (root: string) (step: int) =
        let previous = list root |> Array.filter (fun (_, s) -> s.Step < step) |> Array.tryLast
        let offer =
            match previous with
            | Some(d, s) ->
                sprintf "The previous complete checkpoint is '%s' (step %d): resume from it with --resume %s (the damaged one is replaced when the run saves step %d again)"
                    d s.Step d step
            | None -> "There is no complete checkpoint before it"
        Errors.fail "%s '%s' is damaged: %s. %s" what directory (problem.TrimEnd('.')) offer

    /// A checkpoint directory from a path that is one, a root of checkpoints, or a run's output directory (with a
    /// `checkpoints` folder): in the last two, the latest checkpoint, which must be complete. A damaged latest one
    /// is an error that says what is wrong with it and names the previous complete checkpoint to resume from.
    let resolve (path: string) : string =
        if String.IsNullOrWhiteSpace path then Errors.fail "no checkpoint path given"
        let runCheckpoints = Path.Combine(path, "checkpoints")
        let root = if Directory.Exists runCheckpoints then runCheckpoints else path
        if FileInfo(Path.Combine(path, stateFile)).Exists then path
        elif Directory.Exists root then
            match inspect root |> Array.tryLast with
            | Some { Directory = directory; State = Some _ } -> directory
            | Some { Directory = directory; Step = step; Problem = Some problem } -> damaged "the latest checkpoint" directory problem root step
            | _ ->
                Errors.fail "no complete checkpoint in '%s' (expected %s, step-* directories holding one, or a run directory with checkpoints/)"
                    path stateFile
        else Errors.fail "checkpoint path '%s' does not exist" path

    // ---- save and load ----

    /// Deletes all but the last `keepLast` complete checkpoints and the best one by validation loss, and
    /// temporary directories that killed saves left behind.
    let prune (root: string) (keepLast: int) =
        Errors.require (keepLast >= 1) "at least one checkpoint must be kept, found keepLast = %d" keepLast
        // Deleting is tidying: a folder that cannot be deleted now (a full or read-only disk) is left for next time.
        let tryDelete (directory: string) =
            try Directory.Delete(directory, true) with :? IOException | :? UnauthorizedAccessException -> ()
        for leftover in Directory.GetDirectories(root, ".tmp-*") do tryDelete leftover
        let complete = list root
        let keep = HashSet<string>(complete |> Array.skip (max 0 (complete.Length - keepLast)) |> Array.map fst)
        best root |> Option.iter (keep.Add >> ignore)
        for directory, _ in complete do
            if not (keep.Contains directory) then tryDelete directory

    /// Writes a checkpoint of the model, the optimizer, the torch RNG state and `state` under `root` as
    /// `step-NNNNNNNN`, atomically, then keeps the last `keepLast` and the best. Returns its directory.
    let save (root: string) (keepLast: int) (model: torch.nn.Module) (optimizer: NamedAdamW) (state: CheckpointState) : string =
        Errors.require (keepLast >= 1) "at least one checkpoint must be kept, found keepLast = %d" keepLast
        let final = Path.Combine(root, directoryName state.Step)
        let temporary = Path.Combine(root, sprintf ".tmp-%s-%s" (directoryName state.Step) (Guid.NewGuid().ToString "N"))
        // A full disk (or any write error) fails here with the previous checkpoints untouched: they are only pruned
        // once the new one is complete and in place.
        let failed (e: exn) =
            let previous = match latest root with Some d -> sprintf "the previous checkpoint '%s' is intact" d | None -> "no earlier checkpoint was touched"
            GptException(sprintf "could not write checkpoint '%s' (%s): %s" final e.Message previous, e)
        try
            Directory.CreateDirectory root |> ignore
            Directory.CreateDirectory temporary |> ignore
        with
        | :? IOException
        | :? UnauthorizedAccessException as e -> raise (failed e)
        try
            let rng =
                use rngState = torch.random.get_rng_state ()
                rngState.data<byte>().ToArray()
            let entry name =
                let path = Path.Combine(temporary, name)
                { Name = name; Bytes = FileInfo(path).Length; Sha256 = sha256 path }
            let tensors, all = savedTensors model
            Safetensors.write (Path.Combine(temporary, modelFile)) tensors
            Safetensors.write (Path.Combine(temporary, optimizerFile)) (Optimizer.momentTensors optimizer)
            // checkpoint.json last: a directory without it was never finished.
            let modelTensors = if all then "all" else "trainable"
            writeDocument (Path.Combine(temporary, stateFile)) state modelTensors rng optimizer [| entry modelFile; entry optimizerFile |]
            if Directory.Exists final then
                // Same step saved again (a cancel right after a periodic save, or a damaged checkpoint replaced): swap
                // the old one out first, and back if the new one cannot take its place.
                let old = Path.Combine(root, sprintf ".tmp-old-%s-%s" (directoryName state.Step) (Guid.NewGuid().ToString "N"))
                Directory.Move(final, old)
                (try
                    Directory.Move(temporary, final)
                 with _ ->
                    (try Directory.Move(old, final) with _ -> ())
                    reraise ())
                try Directory.Delete(old, true) with :? IOException | :? UnauthorizedAccessException -> ()
            else Directory.Move(temporary, final)
        with e ->
            (try Directory.Delete(temporary, true) with _ -> ())
            match e with
            | :? IOException
            | :? UnauthorizedAccessException -> raise (failed e)
            | _ -> reraise ()
        prune root keepLast
        final

    /// Whether a checkpoint holds the whole model (false: only the trained parameters of a run with a frozen base,
    /// which its run rebuilds from where it started).
    let holdsWholeModel (directory: string) = (readDocument directory).ModelTensors = "all"

    /// Reads and checks a checkpoint's state (JSON and file sizes) without loading any tensor.
    let read (directory: string) : CheckpointState =
        let document = readDocument directory
        checkFiles directory document false
        document.State

    /// Loads only the model weights of a checkpoint (checked against its recorded SHA-256).
    let loadModel (directory: string) (model: torch.nn.Module) =
        let document = readDocument directory
        checkFiles directory document true
        let tensors = Safetensors.read (Path.Combine(directory, modelFile))
        try loadStateDict directory model tensors
        finally for t in tensors.Values do t.Dispose()

    /// Restores everything a checkpoint holds: model weights, AdamW moments and step counts, and the torch CPU
    /// generator state. Files are checked against their recorded sizes and SHA-256 first.
    let restore (directory: string) (model: torch.nn.Module) (optimizer: NamedAdamW) : CheckpointState =
        let document = readDocument directory
        (try
            checkFiles directory document true
         with :? GptException as e ->
            match stepOfName directory with
            | Some step -> damaged "checkpoint" directory e.Message (Path.GetDirectoryName(Path.GetFullPath directory)) step
            | None -> reraise ())
        (let tensors = Safetensors.read (Path.Combine(directory, modelFile))
         try loadStateDict directory model tensors
         finally for t in tensors.Values do t.Dispose())
        (let moments = Safetensors.read (Path.Combine(directory, optimizerFile))
         try Optimizer.restoreState (Path.Combine(directory, optimizerFile)) optimizer moments document.Steps
         finally for t in moments.Values do t.Dispose())
        (use rng = torch.tensor(document.RngState, dtype = torch.uint8)
         try torch.random.set_rng_state rng
         with e -> raise (GptException(sprintf "checkpoint '%s': the torch RNG state cannot be restored: %s" directory e.Message, e)))
        document.State

    /// Rebuilds the GPT model a checkpoint was trained with: its configuration from the checkpoint's
    /// model_configuration (config.json keys, as Pretrained.configJson writes them), its weights from model.safetensors
    /// (checked against the recorded SHA-256). `path` is anything `resolve` accepts. Returned in eval mode.
    let loadGpt (path: string) : GptModel =
        let directory = resolve path
        let document = readDocument directory
        if document.ModelTensors <> "all" then
            Errors.fail "checkpoint '%s' holds only the trained parameters of a fine-tuning run, not a whole model: resume its run, or use the model its run wrote" directory
        let config = Pretrained.parseConfig (Path.Combine(directory, stateFile) + " (model_configuration)") document.State.ModelConfiguration
        // The tensor file's header against the configuration before the model is built: a model_configuration that
        // disagrees with the weights (n_embd 12288 beside a small model's) must not allocate a large model first.
        checkFiles directory document false
        let weights = Path.Combine(directory, modelFile)
        let stored = dict [ for entry in (Safetensors.readHeader weights).Entries -> entry.Name, entry.Shape ]
        let problems =
            [ for name, shape, required in Pretrained.expectedTensors config do
                  // The state_dict holds Linear weights [out, in], not the Hugging Face layout's Conv1D [in, out].
                  let shape = if Pretrained.isConv1DWeight name then Array.rev shape else shape
                  match stored.TryGetValue name with
                  | true, found when found <> shape ->
                      yield sprintf "tensor '%s' has shape %s, expected %s" name (Errors.shapeText found) (Errors.shapeText shape)
                  | false, _ when required -> yield sprintf "missing tensor '%s'" name
                  | _ -> () ]
        if not problems.IsEmpty then
            Errors.fail "checkpoint '%s': %s does not fit the checkpoint's model_configuration: %s%s" directory modelFile
                (problems |> List.truncate 3 |> String.concat "; ")
                (if problems.Length > 3 then sprintf "; and %d more" (problems.Length - 3) else "")
        ModelMemory.require (sprintf "checkpoint '%s'" directory) config
        let model = GptModel.Uninitialised config // every weight is overwritten by the checkpoint's
        try
            loadModel directory model
            model.eval ()
            model
        with _ ->
            model.Dispose()
            reraise ()
