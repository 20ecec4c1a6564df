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

    /// Typed access to the properties of a checkpoint.json, failing with its path and the property's name.
    type private Fields(path: string, root: JsonElement) =
        member _.Property(element: JsonElement, name: string) =
            match element.TryGetProperty name with
            | true, value -> value
            | _ -> Errors.fail "checkpoint '%s': property '%s' is missing" path name
        member this.Get(name: string) = this.Property(root, name)
        member private this.Number(name: string, read: JsonElement -> bool * 'T) =
            let value = this.Get name
            match (if value.ValueKind = JsonValueKind.Number then read value else false, Unchecked.defaultof<'T>) with
            | true, v -> v
            | _ -> Errors.fail "checkpoint '%s': property '%s' should be a number, found %s" path name (value.GetRawText())
        member this.Int32(name: string) = this.Number(name, fun v -> v.TryGetInt32())
        member this.Int64(name: string) = this.Number(name, fun v -> v.TryGetInt64())
        member this.Double(name: string) = this.Number(name, fun v -> v.TryGetDouble())
        member this.OptionalDouble(name: string) =
            if (this.Get name).ValueKind = JsonValueKind.Null then None else Some(this.Double name)
        member this.Text(name: string) =
            let value = this.Get name
            if value.ValueKind <> JsonValueKind.String then
                Errors.fail "checkpoint '%s': property '%s' should be a string, found %s" path name (value.GetRawText())
            value.GetString()

    let private readState (fields: Fields) : CheckpointState =
        { Step = fields.Int32 "step"
          Epoch = fields.Int32 "epoch"
          BatchInEpoch = fields.Int32 "batch_in_epoch"
          BatchesPerEpoch = fields.Int32 "batches_per_epoch"
          TokensSeen = fields.Int64 "tokens_seen"
          ElapsedSeconds = fields.Double "elapsed_s"
          ValidationLoss = fields.OptionalDouble "validation_loss"
          BestValidationLoss = fields.OptionalDouble "best_validation_loss"
          DataSeed = fields.Int32 "data_seed"
          DataFingerprint = fields.Text "data_fingerprint"
          Tokenizer = fields.Text "tokenizer"
          ModelConfiguration = (fields.Get "model_configuration").GetRawText()
          TrainingOptions = (fields.Get "training_options").GetRawText() }

    let private readSteps (fields: Fields) =
        let steps = Dictionary<string, int64>()
        for group in (fields.Property(fields.Get "optimizer", "groups")).EnumerateArray() do
            for entry in (fields.Property(group, "steps")).EnumerateObject() do
                steps[entry.Name] <- entry.Value.GetInt64()
        steps

    let private readFiles (path: string) (fields: Fields) =
        let files =
            [| for entry in (fields.Get "files").EnumerateObject() ->
                   { Name = entry.Name
                     Bytes = (fields.Property(entry.Value, "bytes")).GetInt64()
                     Sha256 = (fields.Property(entry.Value, "sha256")).GetString() } |]
        for required in [ modelFile; optimizerFile ] do
            if not (files |> Array.exists (fun f -> f.Name = required)) then
                Errors.fail "checkpoint '%s': no entry for %s under 'files'" path required
        files

    let private readDocument (directory: string) : Document =
        let path = Path.Combine(directory, stateFile)
        if not (Directory.Exists directory) then Errors.fail "checkpoint directory '%s' does not exist" directory
        if not (File.Exists path) then
            Errors.fail "'%s' is not a complete checkpoint: %s is missing (was its save interrupted?)" directory stateFile
        use document =
            try JsonDocument.Parse(File.ReadAllBytes path)
            with :? JsonException as e -> raise (GptException(sprintf "checkpoint '%s' is not valid JSON: %s" path e.Message, e))
        let fields = Fields(path, document.RootElement)
        let format = fields.Text "format"
        if format <> formatName then Errors.fail "checkpoint '%s': format '%s', expected '%s'" path format formatName
        let version = fields.Int32 "version"
        if version <> formatVersion then
            Errors.fail "checkpoint '%s' has format version %d; this program reads version %d" path version formatVersion
        let modelTensors =
            match document.RootElement.TryGetProperty "model_tensors" with
            | true, _ -> fields.Text "model_tensors"
            | _ -> "all"
        let rng =
            try Convert.FromBase64String(fields.Text "torch_rng_state")
            with :? FormatException -> Errors.fail "checkpoint '%s': torch_rng_state is not base64" path
        { State = readState fields; ModelTensors = modelTensors; RngState = rng; Steps = readSteps fields; Files = readFiles path fields }

    /// Checks that the tensor files are there with the recorded sizes (cheap) and, when `hashes`, the recorded SHA-256.
    let private checkFiles (directory: string) (document: Document) (hashes: bool) =
        for file in document.Files do
            let path = Path.Combine(directory, file.Name)
            if not (File.Exists path) then Errors.fail "checkpoint '%s': %s is missing" directory file.Name
            let length = FileInfo(path).Length
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

    /// Whether a directory holds a checkpoint whose JSON reads and whose files have their recorded sizes.
    let private tryReadComplete (directory: string) =
        try
            let document = readDocument directory
            checkFiles directory document false
            Some document.State
        with :? GptException -> None

    /// Complete checkpoints under a root directory, oldest first. Temporary directories of unfinished saves and
    /// checkpoints with a missing or truncated file are left out.
    let list (root: string) : (string * CheckpointState)[] =
        if not (Directory.Exists root) then [||]
        else
            Directory.GetDirectories(root, "step-*")
            |> Array.choose (fun d -> tryReadComplete d |> Option.map (fun s -> d, s))
            |> Array.sortBy (fun (_, s) -> s.Step)

    /// The most recent complete checkpoint under a root directory.
    let latest (root: string) : string option = list root |> Array.tryLast |> Option.map fst

    /// The complete checkpoint with the lowest validation loss under a root directory.
    let best (root: string) : string option =
        list root
        |> Array.choose (fun (d, s) -> s.ValidationLoss |> Option.map (fun loss -> d, loss))
        |> Array.sortBy snd
        |> Array.tryHead
        |> Option.map fst

    /// A checkpoint directory from a path that is one, a root of checkpoints, or a run's output directory (with a
    /// `checkpoints` folder): in the last two, the latest complete checkpoint is taken.
    let resolve (path: string) : string =
        if String.IsNullOrWhiteSpace path then Errors.fail "no checkpoint path given"
        let runCheckpoints = Path.Combine(path, "checkpoints")
        let root = if Directory.Exists runCheckpoints then runCheckpoints else path
        if File.Exists(Path.Combine(path, stateFile)) then path
        elif Directory.Exists root then
            match latest root with
            | Some directory -> directory
            | None ->
                Errors.fail "no complete checkpoint in '%s' (expected %s, step-* directories holding one, or a run directory with checkpoints/)"
                    path stateFile
        else Errors.fail "checkpoint path '%s' does not exist" path

    // ---- save and load ----

    /// Deletes all but the last `keepLast` complete checkpoints and the best one by validation loss, and
    /// temporary directories that killed saves left behind.
    let prune (root: string) (keepLast: int) =
        Errors.require (keepLast >= 1) "at least one checkpoint must be kept, found keepLast = %d" keepLast
        for leftover in Directory.GetDirectories(root, ".tmp-*") do
            try Directory.Delete(leftover, true) with :? IOException -> ()
        let complete = list root
        let keep = HashSet<string>(complete |> Array.skip (max 0 (complete.Length - keepLast)) |> Array.map fst)
        best root |> Option.iter (keep.Add >> ignore)
        for directory, _ in complete do
            if not (keep.Contains directory) then Directory.Delete(directory, true)

    /// Writes a checkpoint of the model, the optimizer, the torch RNG state and `state` under `root` as
    /// `step-NNNNNNNN`, atomically, then keeps the last `keepLast` and the best. Returns its directory.
    let save (root: string) (keepLast: int) (model: torch.nn.Module) (optimizer: NamedAdamW) (state: CheckpointState) : string =
        Errors.require (keepLast >= 1) "at least one checkpoint must be kept, found keepLast = %d" keepLast
        Directory.CreateDirectory root |> ignore
        let final = Path.Combine(root, directoryName state.Step)
        let temporary = Path.Combine(root, sprintf ".tmp-%s-%s" (directoryName state.Step) (Guid.NewGuid().ToString "N"))
        Directory.CreateDirectory temporary |> ignore
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
                // Same step saved again (a cancel right after a periodic save): swap the old one out first.
                let old = Path.Combine(root, sprintf ".tmp-old-%s-%s" (directoryName state.Step) (Guid.NewGuid().ToString "N"))
                Directory.Move(final, old)
                Directory.Move(temporary, final)
                Directory.Delete(old, true)
            else Directory.Move(temporary, final)
        with _ ->
            (try Directory.Delete(temporary, true) with _ -> ())
            reraise ()
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
        checkFiles directory document true
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
        let model = GptModel.Uninitialised config // every weight is overwritten by the checkpoint's
        try
            loadModel directory model
            model.eval ()
            model
        with _ ->
            model.Dispose()
            reraise ()
