namespace Gpt.Training

// A training run as the user sees it: a folder runs/NAME/ with run.json (where the data came from), checkpoints/,
// metrics.jsonl and the final model/, made from one options record; a resume rebuilds everything from the folder.
// The CLI, the C# façade and F# scripts all train through this module.

open System
open System.IO
open System.Text.Json
open System.Text.Json.Nodes
open System.Threading
open Gpt
open Gpt.Model
open Gpt.Text
open Gpt.Weights

/// How a fresh model's weights are drawn.
[<RequireQualifiedAccess>]
type ModelInitialization =
    /// GPT-2's (nanoGPT's): weights N(0, 0.02), residual projections N(0, 0.02 / sqrt(2 × layers)), biases 0.
    | Gpt2
    /// PyTorch's default for each layer, which the book's GPTModel keeps: Linear U(±1/sqrt(fan_in)), embeddings N(0, 1).
    | TorchDefaults

/// What every training run takes, whatever it trains: optimisation, evaluation and output. A run resolves it into the
/// trainer's options (TrainerOptions) once it knows its model.
type TrainingSettings =
    { BatchSize: int
      Epochs: int
      MaxSteps: int option
      LearningRate: float
      /// Where the cosine decay ends (None: the run's default, a tenth of LearningRate for pretraining).
      MinLearningRate: float option
      /// Where the warmup starts (None: the minimum rate).
      InitialLearningRate: float option
      WarmupSteps: int
      WeightDecay: float
      /// Decay every parameter (the book) instead of matrices only (nanoGPT).
      DecayAll: bool
      Beta1: float
      Beta2: float
      GradientClip: float option
      GradientAccumulation: int
      EvalInterval: int
      EvalBatches: int
      Seed: int
      /// Folder of runs: the run writes OutputDirectory/Name/.
      OutputDirectory: string
      /// The run's folder name (None: run-yyyyMMdd-HHmmss).
      Name: string option
      KeepLast: int
      CheckpointInterval: int
      /// A run's folder, its checkpoints folder or one checkpoint: continue that run.
      ResumeFrom: string option
      /// Train low-rank adapters on the frozen model instead of its weights (LoRA, the book's appendix E); the run
      /// writes them in PEFT's layout (adapter/) beside the merged model (model/).
      Lora: LoraSettings option
      /// Where the model, its batches and the optimizer state live (the model is moved there before training).
      Device: Device }

[<RequireQualifiedAccess>]
module TrainingSettings =
    /// `gpt train`'s defaults: batch 4, 20 epochs, AdamW 1e-3 with 10 warmup steps and a cosine decay to 1e-4,
    /// weight decay 0.1 on matrices, clipping at 1, evaluation every 20 steps on 5 batches, seed 123, runs/.
    let defaults =
        { BatchSize = 4; Epochs = 20; MaxSteps = None; LearningRate = 1e-3; MinLearningRate = None; InitialLearningRate = None
          WarmupSteps = 10; WeightDecay = 0.1; DecayAll = false; Beta1 = 0.9; Beta2 = 0.999; GradientClip = Some 1.0
          GradientAccumulation = 1; EvalInterval = 20; EvalBatches = 5; Seed = 123; OutputDirectory = "runs"; Name = None
          KeepLast = 3; CheckpointInterval = 100; ResumeFrom = None; Lora = None; Device = Device.Cpu }

    /// The book's fine-tuning (chapters 6 and 7): AdamW at 5e-5 with weight decay 0.1 on every parameter, batch 8, no
    /// warmup, no clipping; `epochs` epochs, evaluation every 50 steps on 5 batches. Fine-tuning runs resolve a missing
    /// minimum rate to the learning rate itself: a constant rate unless --min-lr is given.
    let bookFineTuning (epochs: int) =
        { defaults with
            BatchSize = 8; Epochs = epochs; LearningRate = 5e-5; WarmupSteps = 0; DecayAll = true; GradientClip = None
            EvalInterval = 50 }

    /// The trainer's options for these settings, a training window, a sample and the run's folder. The minimum rate
    /// defaults to `defaultMinimum` (of the learning rate), the initial rate to the minimum.
    let resolve (settings: TrainingSettings) (defaultMinimum: float -> float) (contextLength: int) (stride: int)
                (sample: string option * int) (runDirectory: string) : TrainerOptions =
        let minimum = settings.MinLearningRate |> Option.defaultValue (defaultMinimum settings.LearningRate)
        { Epochs = settings.Epochs; MaxSteps = settings.MaxSteps; BatchSize = settings.BatchSize; ContextLength = contextLength
          Stride = stride; LearningRate = settings.LearningRate; MinLearningRate = minimum
          InitialLearningRate = settings.InitialLearningRate |> Option.defaultValue minimum
          WarmupSteps = settings.WarmupSteps; WeightDecay = settings.WeightDecay; DecayAll = settings.DecayAll; Beta1 = settings.Beta1
          Beta2 = settings.Beta2; GradientClip = settings.GradientClip; GradientAccumulation = settings.GradientAccumulation
          EvalInterval = settings.EvalInterval; EvalBatches = settings.EvalBatches; Seed = settings.Seed
          OutputDirectory = Some runDirectory; CheckpointInterval = settings.CheckpointInterval; KeepLast = settings.KeepLast
          SamplePrompt = fst sample; SampleTokens = snd sample }

    /// The settings a checkpoint's trainer options were resolved from, in the run folder that holds it (LoRA settings
    /// live in run.json: see RunFile).
    let ofTrainerOptions (stored: TrainerOptions) (runDirectory: string) (resumeFrom: string) =
        { BatchSize = stored.BatchSize; Epochs = stored.Epochs; MaxSteps = stored.MaxSteps; LearningRate = stored.LearningRate
          MinLearningRate = Some stored.MinLearningRate; InitialLearningRate = Some stored.InitialLearningRate
          WarmupSteps = stored.WarmupSteps; WeightDecay = stored.WeightDecay; DecayAll = stored.DecayAll; Beta1 = stored.Beta1
          Beta2 = stored.Beta2; GradientClip = stored.GradientClip; GradientAccumulation = stored.GradientAccumulation
          EvalInterval = stored.EvalInterval; EvalBatches = stored.EvalBatches; Seed = stored.Seed
          OutputDirectory = Path.GetDirectoryName runDirectory; Name = Some(Path.GetFileName runDirectory); KeepLast = stored.KeepLast
          CheckpointInterval = stored.CheckpointInterval; ResumeFrom = Some resumeFrom; Lora = None; Device = Device.Cpu }

    /// Fails on settings no run can take (the trainer checks the rest).
    let validate (settings: TrainingSettings) =
        match settings.Name with
        | Some name when name = "" || name = "." || name = ".." || name.IndexOfAny(Path.GetInvalidFileNameChars()) >= 0 ->
            Errors.fail "the run name '%s' is not a valid folder name" name
        | _ -> ()
        Errors.require (not (String.IsNullOrWhiteSpace settings.OutputDirectory)) "the output directory is not set"
        // A device that is not there (CUDA on this TorchSharp-cpu build) fails before any data or model is read.
        Device.resolve settings.Device |> ignore

/// Everything that shapes a pretraining run: every `gpt train` option.
type RunOptions =
    { /// A file, a folder (every file, recursively) or a glob; None: the built-in story (or Texts).
      Data: string option
      /// Texts given in memory, each a document, instead of files (Data). run.json records "(in memory)" and their
      /// SHA-256: a resume needs the same texts again.
      Texts: string list option
      /// Share of the tokens, from the start, used for training; the rest is the validation text.
      TrainRatio: float
      /// The shape of a fresh model (None: the default model). InitFrom and ResumeFrom bring their own: a shape given
      /// with them must be theirs.
      Model: GptConfig option
      Initialization: ModelInitialization
      /// Continue pretraining a model (any model source) instead of starting from random weights.
      InitFrom: string option
      /// Continue pretraining this model, given in memory, instead of a source (InitFrom): it is trained in place (its
      /// weights are the run's when it ends) and never disposed by the run. Not with LoRA.
      InitModel: GptModel option
      /// Tokens per training window (None: the model's context length).
      ContextLength: int option
      /// Distance between window starts (None: the context length, no overlap).
      Stride: int option
      /// The greedy sample at each epoch end (None: no sample).
      SamplePrompt: string option
      SampleTokens: int
      Training: TrainingSettings }

/// What a run reports. Every report carries the latest value of everything (a snapshot), so a display can show
/// any of it at any time.
[<RequireQualifiedAccess>]
type RunEventKind =
    | Started
    | Step
    | Evaluation
    | EpochEnd
    | Checkpoint
    | ModelSaved

/// A snapshot of a run, made after each event.
type RunProgress =
    { Kind: RunEventKind
      /// Optimizer steps done (counting those before a resume).
      Step: int
      TotalSteps: int
      /// The epoch in progress (or just ended), counting from 1.
      Epoch: int
      Epochs: int
      /// Mean loss of the last step's batches in training mode (NaN before the first step).
      TrainLoss: float
      /// The latest evaluation (eval mode, a few batches of each split).
      EvaluatedTrainLoss: float option
      ValidationLoss: float option
      TrainAccuracy: float option
      ValidationAccuracy: float option
      LearningRate: float
      GradientNorm: float option
      TokensSeen: int64
      TokensPerSecond: float
      Elapsed: TimeSpan
      Remaining: TimeSpan option
      ParameterCount: int64
      TrainableParameterCount: int64
      TokensPerEpoch: int64
      /// The sample text at an epoch end.
      Sample: string option
      /// The run folder (Started), the checkpoint (Checkpoint) or the model folder (ModelSaved).
      Path: string option }

/// How a run ended.
type RunResult =
    { Steps: int
      TotalSteps: int
      TokensSeen: int64
      /// The run stopped early on the cancellation token (a checkpoint and the model so far were written).
      Cancelled: bool
      /// This session's first evaluation of the training split, and the last evaluation's losses (NaN: none).
      FirstEvaluatedTrainLoss: float
      TrainLoss: float
      ValidationLoss: float
      BestValidationLoss: float option
      /// Mean loss of the last step's batches in training mode (NaN when no step ran).
      LastStepLoss: float
      RunDirectory: string
      /// The final model in the Hugging Face layout (None when no step ran).
      ModelDirectory: string option
      CheckpointDirectory: string option
      Elapsed: TimeSpan
      Evaluations: EvaluationRecord[] }

/// run.json: what a run's checkpoints do not hold (where the text came from and how it was split, the model it started
/// from, its LoRA settings).
[<RequireQualifiedAccess>]
module RunFile =
    let fileName = "run.json"

    /// What run.json says in place of a path when the texts or the model were given in memory.
    let inMemory = "(in memory)"

    /// What a pretraining run's run.json records.
    type Contents =
        { Data: string option
          /// The texts were given in memory: the SHA-256 of them all (textsDigest), to check them on a resume.
          TextsDigest: string option
          TrainRatio: float
          InitFrom: string option
          /// The run started from a model given in memory (InitModel).
          InitFromMemory: bool
          Initialization: ModelInitialization
          Lora: LoraSettings option }

    /// The SHA-256 of texts, each with its length first so that the boundaries count, as lower-case hex.
    let textsDigest (texts: string list) =
        use sha = Security.Cryptography.SHA256.Create()
        for text in texts do
            let bytes = Text.Encoding.UTF8.GetBytes text
            let length = BitConverter.GetBytes(int64 bytes.Length)
            sha.TransformBlock(length, 0, length.Length, null, 0) |> ignore
            sha.TransformBlock(bytes, 0, bytes.Length, null, 0) |> ignore
        sha.TransformFinalBlock([||], 0, 0) |> ignore
        Convert.ToHexStringLower sha.Hash

    /// LoRA settings as JSON (null: none).
    let loraJson (lora: LoraSettings option) : JsonNode =
        match lora with
        | None -> null
        | Some l ->
            let json = JsonObject()
            json["rank"] <- l.Rank
            json["alpha"] <- l.Alpha
            json["targets"] <- JsonArray(l.Targets |> List.map (fun t -> JsonValue.Create t :> JsonNode) |> Array.ofList)
            json

    /// LoRA settings back from JSON.
    let loraOf (node: JsonNode) : LoraSettings option =
        match node with
        | null -> None
        | json ->
            Some(LoraSettings.create (json["rank"].GetValue<int>()) (Some(json["alpha"].GetValue<float>()))
                     (Some [ for t in json["targets"].AsArray() -> t.GetValue<string>() ]))

    /// A fine-tuning run's run.json (read within BoundedFile's limit) and its path, after checking that it records
    /// `task` ("classification", "instruction"); `article` is "a" or "an" for the messages.
    let readTask (runDirectory: string) (task: string) (article: string) : string * JsonNode =
        let file = Path.Combine(runDirectory, fileName)
        if not (File.Exists file) then Errors.fail "'%s' has no %s: it is not the folder of %s %s run" runDirectory fileName article task
        let json =
            try JsonNode.Parse(BoundedFile.readText "run file" BoundedFile.defaultLimit file)
            with :? JsonException as e -> raise (GptException(sprintf "'%s' is not valid JSON: %s" file e.Message, e))
        if isNull json then Errors.fail "'%s' is empty (null): expected a JSON object" file
        match json["task"] with
        | null -> Errors.fail "'%s' is a pretraining run, not %s %s run: resume it with gpt train --resume" runDirectory article task
        | recorded when recorded.GetValueKind() <> JsonValueKind.String || recorded.GetValue<string>() <> task ->
            Errors.fail "'%s' is a %s run, not %s %s run" runDirectory (recorded.ToJsonString()) article task
        | _ -> file, json

    /// Writes a run.json, atomically.
    let writeJson (runDirectory: string) (json: JsonObject) =
        json["created_utc"] <- DateTime.UtcNow.ToString("o")
        Directory.CreateDirectory runDirectory |> ignore
        let text = json.ToJsonString(JsonSerializerOptions(WriteIndented = true)) + "\n"
        Metrics.writeAtomically (Path.Combine(runDirectory, fileName)) (fun temporary -> File.WriteAllText(temporary, text))

    /// Writes a pretraining run's run.json.
    let write (runDirectory: string) (options: RunOptions) =
        let json = JsonObject()
        match options.Texts with
        | Some texts ->
            json["data"] <- inMemory
            json["texts"] <- texts.Length
            json["texts_sha256"] <- textsDigest texts
        | None -> json["data"] <- options.Data |> Option.map (fun d -> JsonValue.Create(Path.GetFullPath d) :> JsonNode) |> Option.toObj
        json["train_ratio"] <- options.TrainRatio
        json["tokenizer"] <- "gpt2"
        json["init_from"] <-
            match options.InitModel with
            | Some _ -> JsonValue.Create inMemory :> JsonNode
            | None ->
                options.InitFrom |> Option.map (fun d -> JsonValue.Create(if Directory.Exists d || File.Exists d then Path.GetFullPath d else d) :> JsonNode) |> Option.toObj
        json["initialization"] <- (if options.InitFrom.IsNone && options.InitModel.IsNone then JsonValue.Create(string options.Initialization) :> JsonNode else null)
        json["lora"] <- loraJson options.Training.Lora
        writeJson runDirectory json

    /// A pretraining run's run.json; the built-in story, 90/10 and a fresh model when the run has none.
    let read (runDirectory: string) : Contents =
        let path = Path.Combine(runDirectory, fileName)
        let none =
            { Data = None; TextsDigest = None; TrainRatio = Loss.defaultTrainRatio; InitFrom = None; InitFromMemory = false
              Initialization = ModelInitialization.Gpt2; Lora = None }
        if not (File.Exists path) then none
        else
            try
                let json = JsonNode.Parse(BoundedFile.readText "run file" BoundedFile.defaultLimit path)
                let text (key: string) = match json[key] with null -> None | node -> Some(node.GetValue<string>())
                let path (key: string) = text key |> Option.filter (fun value -> value <> inMemory)
                { Data = path "data"
                  TextsDigest = (if text "data" = Some inMemory then text "texts_sha256" else None)
                  TrainRatio = match json["train_ratio"] with null -> Loss.defaultTrainRatio | node -> node.GetValue<float>()
                  InitFrom = path "init_from"
                  InitFromMemory = (text "init_from" = Some inMemory)
                  Initialization = (if text "initialization" = Some "TorchDefaults" then ModelInitialization.TorchDefaults else ModelInitialization.Gpt2)
                  Lora = loraOf json["lora"] }
            with
            | :? JsonException
            | :? InvalidOperationException
            | :? FormatException as e -> raise (GptException(sprintf "'%s' is not a valid run file: %s" path e.Message, e))

[<RequireQualifiedAccess>]
module RunOptions =
    /// The model `gpt train` trains by default: GPT-2's vocabulary and layout, 4 layers of 256 dimensions with 4 heads,
    /// 128 positions, dropout 0.1, no QKV bias, head tied to the token embedding (16.1M parameters).
    let defaultModel =
        { GptConfig.gpt2Small with ContextLength = 128; EmbeddingDim = 256; Heads = 4; Layers = 4; DropRate = 0.1; QkvBias = false }

    /// The default run: the default model on the built-in story for 20 epochs (TrainingSettings.defaults), a sample of
    /// 40 tokens after "Every effort moves you" at every epoch end.
    let defaults =
        { Data = None; Texts = None; TrainRatio = Loss.defaultTrainRatio; Model = None; Initialization = ModelInitialization.Gpt2
          InitFrom = None; InitModel = None; ContextLength = None; Stride = None; SamplePrompt = Some "Every effort moves you"; SampleTokens = 40
          Training = TrainingSettings.defaults }

    /// The book's chapter 5 run: gpt2-small with 256 positions, no QKV bias and an untied head (162M parameters),
    /// PyTorch's default initialisation (with GPT-2's this run stalls near a loss of 5); AdamW with a constant 4e-4
    /// and weight decay 0.1 on every parameter; batch 2; 10 epochs; evaluation every 5 steps on 5 batches; no
    /// warmup, no clipping; the sample "Every effort moves you" (50 tokens) at every epoch end.
    let book =
        { defaults with
            Model = Some { GptConfig.gpt2Small with ContextLength = 256; QkvBias = false; DropRate = 0.1; TiedHead = false }
            Initialization = ModelInitialization.TorchDefaults; SampleTokens = 50
            Training =
                { TrainingSettings.defaults with
                    BatchSize = 2; Epochs = 10; LearningRate = 4e-4; MinLearningRate = Some 4e-4; WarmupSteps = 0
                    DecayAll = true; GradientClip = None; EvalInterval = 5 } }

    /// The run directory a checkpoint directory (RUN/checkpoints/step-N) belongs to.
    let runDirectoryOf (checkpointDirectory: string) =
        let full = Path.GetFullPath(checkpointDirectory).TrimEnd(Path.DirectorySeparatorChar)
        match Path.GetDirectoryName full with
        | null -> full
        | root when Path.GetFileName root = "checkpoints" -> Path.GetDirectoryName root
        | root -> root

    /// The run folder a resume path names, found without reading any checkpoint (what resolving it and runDirectoryOf
    /// give): a run folder, its checkpoints folder, or a checkpoint in it. None when the path is not a folder.
    let runDirectoryOfPath (resume: string) =
        if String.IsNullOrWhiteSpace resume || not (Directory.Exists resume) then None
        elif File.Exists(Path.Combine(resume, Checkpoint.stateFile)) then Some(runDirectoryOf resume)
        elif Directory.Exists(Path.Combine(resume, "checkpoints")) then Some(Path.GetFullPath(resume).TrimEnd(Path.DirectorySeparatorChar))
        else Some(runDirectoryOf (Path.Combine(resume, "step-00000000")))

    /// The options a run was trained with, read back from its folder or a checkpoint, with ResumeFrom = path: change
    /// MaxSteps or Epochs to extend it. Texts given in memory are not on disk: set Texts to them again. A folder
    /// another run holds (see RunLock) is refused first: that run may be pruning the very checkpoint this would read.
    let fromCheckpoint (path: string) : RunOptions =
        runDirectoryOfPath path |> Option.iter RunLock.requireFree
        let directory = Checkpoint.resolve path
        let state = Checkpoint.read directory
        let stored = TrainerOptions.ofJson state.TrainingOptions
        let runDirectory = runDirectoryOf directory
        let file = RunFile.read runDirectory
        // A LoRA run rebuilds its frozen base the way it started; a whole-model run brings its model in the checkpoint.
        let start, initialization = if file.Lora.IsSome then file.InitFrom, file.Initialization else None, ModelInitialization.Gpt2
        { Data = file.Data; Texts = None; TrainRatio = file.TrainRatio; Model = Some(Pretrained.parseConfig directory state.ModelConfiguration)
          Initialization = initialization; InitFrom = start; InitModel = None; ContextLength = Some stored.ContextLength
          Stride = Some stored.Stride; SamplePrompt = stored.SamplePrompt; SampleTokens = stored.SampleTokens
          Training = { TrainingSettings.ofTrainerOptions stored runDirectory path with Lora = file.Lora } }

    /// The trainer's options for a run with the model's training window and its folder.
    let toTrainerOptions (options: RunOptions) (contextLength: int) (runDirectory: string) : TrainerOptions =
        TrainingSettings.resolve options.Training (fun lr -> lr / 10.0) contextLength (options.Stride |> Option.defaultValue contextLength)
            (options.SamplePrompt, options.SampleTokens) runDirectory

    /// Fails on options no run can take (the trainer checks the rest).
    let validate (options: RunOptions) =
        // A LoRA run resumes on the base it started from: its InitFrom stays.
        if options.Training.ResumeFrom.IsSome && options.InitFrom.IsSome && options.Training.Lora.IsNone then
            Errors.fail "--resume and --init-from do not go together: --resume continues a run with its own model, --init-from starts a new run from a model"
        if options.Data.IsSome && options.Texts.IsSome then
            Errors.fail "the text comes either from files (Data: %s) or from memory (Texts), not both" options.Data.Value
        match options.Texts with
        | Some texts -> texts |> List.iteri (fun index text -> if isNull text then Errors.fail "text %d of the texts given in memory is null" (index + 1))
        | None -> ()
        match options.InitModel with
        | None -> ()
        | Some model ->
            if isNull (box model) then Errors.fail "the model given in memory is null"
            if options.InitFrom.IsSome then
                Errors.fail "the model to continue comes either from a source (InitFrom: %s) or from memory (InitModel), not both" options.InitFrom.Value
            if options.Training.ResumeFrom.IsSome then
                Errors.fail "a resumed run brings its own model (its checkpoint): a model given in memory does not go with ResumeFrom"
            if options.Training.Lora.IsSome then
                Errors.fail "LoRA adapters are not attached to a model given in memory (they would change the caller's model): save it (Pretrained.save; C#: GptModel.Save) and give its folder as InitFrom"
            if options.Initialization = ModelInitialization.TorchDefaults then
                Errors.fail "a model given in memory brings its own weights: --init does not apply"
        Errors.require (options.TrainRatio > 0.0 && options.TrainRatio < 1.0)
            "the training ratio must be between 0 and 1 (exclusive), found %g" options.TrainRatio
        TrainingSettings.validate options.Training
        if options.Training.Lora.IsSome && options.InitFrom.IsNone then
            Errors.fail "LoRA trains adapters on a pretrained model: give the model to adapt (--init-from)"
        match options.Training.ResumeFrom, options.InitFrom, options.Initialization with
        | Some _, _, ModelInitialization.TorchDefaults when options.Training.Lora.IsNone -> Errors.fail "--resume brings its own weights: --init does not apply"
        | _, Some _, ModelInitialization.TorchDefaults -> Errors.fail "--init-from brings its own weights: --init does not apply"
        | _ -> ()
        options.Model |> Option.iter GptConfig.validate

/// A run ready for its first step (Run.prepare): what every engine that trains it starts from.
type PreparedRun =
    { RunDirectory: string
      /// The checkpoint a resumed run continues from.
      ResumeFrom: string option
      /// The model to train (a resumed run's as its checkpoint holds it); the caller disposes it when OwnsModel.
      Model: GptModel
      /// False when Model is the one given in memory (RunOptions.InitModel): it is the caller's, never disposed by a run.
      OwnsModel: bool
      Data: TrainingData
      TrainerOptions: TrainerOptions
      /// The run folder's lock (see RunLock); the caller releases it when the run is over.
      Lock: RunLock }

/// Pretraining runs (book ch. 5): a folder, a model, the data, the trainer, the final model.
[<RequireQualifiedAccess>]
module Run =
    /// The name of the final model's folder in a run directory.
    let modelFolder = "model"
    /// Where a LoRA run writes its adapters (PEFT's layout), beside the merged model.
    let adapterFolder = "adapter"

    /// The smallest number of tokens that gives both splits one window of contextLength tokens (plus the target
    /// token after it).
    let tokensNeeded (contextLength: int) (trainRatio: float) =
        let window = contextLength + 1
        let fits count = let train = int (trainRatio * float count) in train >= window && count - train >= window
        let start = int (Math.Ceiling(float window / min trainRatio (1.0 - trainRatio)))
        let lower = Seq.initInfinite (fun i -> start - i) |> Seq.takeWhile (fun n -> n > window && fits (n - 1)) |> Seq.tryLast
        let first = lower |> Option.map (fun n -> n - 1) |> Option.defaultValue start
        Seq.initInfinite (fun i -> first + i) |> Seq.find fits

    /// run-yyyyMMdd-HHmmss, with -2, -3, ... when that folder exists.
    let defaultName (outputDirectory: string) =
        let stem = sprintf "run-%s" (DateTime.Now.ToString "yyyyMMdd-HHmmss")
        Seq.initInfinite (fun i -> if i = 0 then stem else sprintf "%s-%d" stem (i + 1))
        |> Seq.find (fun name -> not (Directory.Exists(Path.Combine(outputDirectory, name))))

    /// Fails when a shape was asked for that the model a run brings does not have (disposing it when the run owns it).
    let private checkShape (what: string) (owner: string) (options: RunOptions) (model: GptModel, owned: bool) =
        match options.Model |> Option.map (GptConfig.differences owner model.Config) with
        | Some(_ :: _ as different) ->
            if owned then model.Dispose()
            Errors.fail "%s brings its own model: %s cannot change it" what (String.concat ", " different)
        | _ -> ()

    /// The checkpoint a resumed run continues from and the run's folder; a folder given in the settings must be that one.
    let resumedDirectory (settings: TrainingSettings) (resume: string) =
        let checkpoint = Checkpoint.resolve resume
        let runDirectory = RunOptions.runDirectoryOf checkpoint
        match settings.Name with
        | Some name when Path.GetFullPath(Path.Combine(settings.OutputDirectory, name)) <> runDirectory ->
            Errors.fail "--resume continues in the run's own folder (%s): --out and --name cannot move it" runDirectory
        | _ -> ()
        checkpoint, runDirectory

    /// A new run's folder: OutputDirectory/Name (or a dated name), refused when it holds another run's checkpoints.
    let freshDirectory (settings: TrainingSettings) =
        let name = settings.Name |> Option.defaultWith (fun () -> defaultName settings.OutputDirectory)
        let runDirectory = Path.GetFullPath(Path.Combine(settings.OutputDirectory, name))
        if (Checkpoint.list (Path.Combine(runDirectory, "checkpoints"))).Length > 0 then
            Errors.fail "'%s' already holds a run: resume it (--resume %s) or choose another name" runDirectory runDirectory
        runDirectory

    /// The run's folder, locked (see RunLock), and for a resume the checkpoint it continues from and the folder. A
    /// resumed run's folder is locked before any checkpoint is read: a second writer fails on the lock, naming the
    /// first, and never on a checkpoint the first is pruning meanwhile.
    let lockedDirectory (settings: TrainingSettings) : string * (string * string) option * RunLock =
        match settings.ResumeFrom with
        | Some resume ->
            match RunOptions.runDirectoryOfPath resume with
            | None ->
                // resumedDirectory says what is wrong with the path.
                let checkpoint, runDirectory = resumedDirectory settings resume
                let runLock = RunLock.acquire runDirectory
                runDirectory, Some(checkpoint, runDirectory), runLock
            | Some expected ->
                let runLock = RunLock.acquire expected
                try
                    let checkpoint, runDirectory = resumedDirectory settings resume
                    if runDirectory <> runLock.Directory then
                        Errors.fail "the checkpoint '%s' belongs to the run folder '%s', not '%s'" checkpoint runDirectory runLock.Directory
                    runDirectory, Some(checkpoint, runDirectory), runLock
                with _ ->
                    runLock.Release()
                    reraise ()
        | None ->
            let runDirectory = freshDirectory settings
            runDirectory, None, RunLock.acquire runDirectory

    /// The model a new run starts from, and whether the run owns it (disposes it): the one given in memory (not
    /// owned), a pretrained one, or a fresh one (its size checked against memory first).
    let private startingModel (options: RunOptions) : GptModel * bool =
        let config = options.Model |> Option.defaultValue RunOptions.defaultModel
        match options.InitModel, options.InitFrom, options.Initialization with
        | Some model, _, _ -> model, false
        | None, Some init, _ -> ModelSource.load init, true
        | None, None, initialization ->
            ModelMemory.require "the run's model" config
            match initialization with
            | ModelInitialization.TorchDefaults -> GptModel.WithTorchDefaults(config, int64 options.Training.Seed), true
            | ModelInitialization.Gpt2 -> new GptModel(config, int64 options.Training.Seed), true

    /// A resumed run's data must be where it was: texts that were given in memory are not on disk, so they must be
    /// given again, and be the same.
    let private checkResumedTexts (runDirectory: string) (options: RunOptions) =
        match (RunFile.read runDirectory).TextsDigest, options.Texts with
        | Some _, None when options.Data.IsNone ->
            Errors.fail "run '%s' was trained on texts given in memory, which are not on disk: give the same texts again (RunOptions.Texts; C#: TrainingOptions.Texts) to resume it" runDirectory
        | Some digest, Some texts when RunFile.textsDigest texts <> digest ->
            Errors.fail "run '%s' was trained on other texts than those given (SHA-256 %s, given %s): resume it with the same texts" runDirectory digest (RunFile.textsDigest texts)
        | _ -> ()

    /// The run folder (locked: see RunLock) and the model a run starts from, and whether the run owns that model: a
    /// checkpoint's (resume; a LoRA checkpoint holds only the adapters, so its base is rebuilt as it started), one
    /// given in memory, a pretrained one, or a fresh one.
    let private prepareModel (options: RunOptions) : string * string option * GptModel * bool * RunLock =
        let runDirectory, resumed, runLock = lockedDirectory options.Training
        try
            match resumed with
            | Some(checkpoint, _) ->
                checkResumedTexts runDirectory options
                let model, owned = if Checkpoint.holdsWholeModel checkpoint then Checkpoint.loadGpt checkpoint, true else startingModel options
                checkShape "--resume" "the run" options (model, owned)
                runDirectory, Some checkpoint, model, owned, runLock
            | None ->
                let model, owned = startingModel options
                if options.InitFrom.IsSome then checkShape "--init-from" "the model" options (model, owned)
                if options.InitModel.IsSome then checkShape "the model given in memory" "the model" options (model, owned)
                runDirectory, None, model, owned, runLock
        with _ ->
            runLock.Release()
            reraise ()

    /// Attaches a run's adapters and freezes the base (LoRA); nothing without LoRA settings.
    let attachAdapters (settings: TrainingSettings) (model: GptModel) =
        settings.Lora |> Option.iter (fun lora -> Lora.attach lora (int64 settings.Seed) model |> ignore)

    /// Writes the final model of a run into <run>/model (merged when it has adapters, which go to <run>/adapter in
    /// PEFT's layout) and returns the model folder.
    let saveModel (runDirectory: string) (settings: TrainingSettings) (baseModel: string option) (model: GptModel) =
        let directory = Path.Combine(runDirectory, modelFolder)
        model.eval ()
        match settings.Lora with
        | None -> Pretrained.save directory model
        | Some lora ->
            use adapter = Adapter.ofModel { Settings = lora; BaseModel = baseModel; ModulesToSave = []; TaskType = "CAUSAL_LM" } model [] None
            Adapter.write (Path.Combine(runDirectory, adapterFolder)) adapter
            use merged = Lora.merged model
            Pretrained.save directory merged
        directory

    /// The text of a run as token ids, checked to give both splits a window.
    let private tokens (options: RunOptions) (documents: Corpus.Document[]) (tokenizer: ITokenizer) (contextLength: int) =
        let source =
            match options.Texts, options.Data with
            | Some _, _ -> "the texts given in memory"
            | None, Some data -> data
            | None, None -> "the built-in story"
        let needed = tokensNeeded contextLength options.TrainRatio
        let advice =
            sprintf "at least %d are needed for context length %d with a %.0f%% training split (%d tokens in each split): use more text or a shorter context length"
                needed contextLength (100.0 * options.TrainRatio) (contextLength + 1)
        if documents |> Array.forall (fun d -> d.Text.Length = 0) then Errors.fail "the text is empty (%s): %s" source advice
        let ids = Corpus.tokenize tokenizer documents
        if ids.Length < needed then Errors.fail "the text is too short (%s): it has %d tokens, %s" source ids.Length advice
        ids

    /// Turns the trainer's events into snapshots of the run: the handler for the trainer, one for the saved model,
    /// and the latest snapshot.
    let reporter (report: RunProgress -> unit) (epochs: int) (runDirectory: string) =
        let latest =
            ref
                { Kind = RunEventKind.Started; Step = 0; TotalSteps = 0; Epoch = 1; Epochs = epochs; TrainLoss = nan
                  EvaluatedTrainLoss = None; ValidationLoss = None; TrainAccuracy = None; ValidationAccuracy = None
                  LearningRate = 0.0; GradientNorm = None; TokensSeen = 0L; TokensPerSecond = 0.0; Elapsed = TimeSpan.Zero
                  Remaining = None; ParameterCount = 0L; TrainableParameterCount = 0L; TokensPerEpoch = 0L; Sample = None; Path = None }
        let finite value = if Double.IsFinite value then Some value else None
        let emit (next: RunProgress) = latest.Value <- { next with Sample = None; Path = None }; report next
        let onEvent event =
            let p = latest.Value
            match event with
            | Started plan ->
                emit { p with Kind = RunEventKind.Started; Step = plan.StartStep; TotalSteps = plan.TotalSteps
                              ParameterCount = plan.ParameterCount; TrainableParameterCount = plan.TrainableParameterCount
                              TokensSeen = int64 plan.StartStep * plan.TokensPerStep
                              TokensPerEpoch = plan.TokensPerBatch * int64 plan.BatchesPerEpoch
                              Path = Some runDirectory }
            | Stepped s ->
                emit { p with Kind = RunEventKind.Step; Step = s.Step; TotalSteps = s.TotalSteps; Epoch = s.Epoch; Epochs = s.Epochs
                              TrainLoss = s.TrainLoss; LearningRate = s.LearningRate; GradientNorm = s.GradientNorm
                              TokensSeen = s.TokensSeen; TokensPerSecond = s.TokensPerSecond; Elapsed = s.Elapsed; Remaining = Some s.Remaining }
            | Evaluated r ->
                emit { p with Kind = RunEventKind.Evaluation; EvaluatedTrainLoss = finite r.TrainLoss; ValidationLoss = finite r.ValidationLoss
                              TrainAccuracy = r.TrainAccuracy; ValidationAccuracy = r.ValidationAccuracy
                              Elapsed = TimeSpan.FromSeconds r.ElapsedSeconds }
            | EpochEnded(epoch, sample) -> emit { p with Kind = RunEventKind.EpochEnd; Epoch = epoch; Sample = sample }
            | CheckpointSaved directory -> emit { p with Kind = RunEventKind.Checkpoint; Path = Some directory }
        let modelSaved directory = emit { latest.Value with Kind = RunEventKind.ModelSaved; Path = Some directory }
        onEvent, modelSaved, (fun () -> latest.Value)

    /// The trainer's event handler that first writes a fresh run's run.json when the trainer starts: only then has
    /// every option been checked (the trainer checks its own against the data), so a refused run writes nothing.
    let writeRunFileWhenStarted (write: unit -> unit) (onEvent: TrainingEvent -> unit) =
        fun event ->
            match event with
            | Started _ -> write ()
            | _ -> ()
            onEvent event

    /// The run's result from the trainer's.
    let resultOf (r: TrainingResult) (elapsed: TimeSpan) (runDirectory: string) (modelDirectory: string option) =
        let first = r.Evaluations |> Array.tryHead
        let last = r.Evaluations |> Array.tryLast
        { Steps = r.Steps; TotalSteps = r.TotalSteps; TokensSeen = r.TokensSeen; Cancelled = r.Cancelled
          FirstEvaluatedTrainLoss = first |> Option.map _.TrainLoss |> Option.defaultValue nan
          TrainLoss = last |> Option.map _.TrainLoss |> Option.defaultValue nan
          ValidationLoss = last |> Option.map _.ValidationLoss |> Option.defaultValue nan
          BestValidationLoss = r.BestValidationLoss; LastStepLoss = r.LastTrainLoss; RunDirectory = runDirectory
          ModelDirectory = modelDirectory; CheckpointDirectory = r.Checkpoint; Elapsed = elapsed; Evaluations = r.Evaluations }

    /// Everything a run needs before its first step, checked: its folder, the checkpoint it resumes from, the model
    /// (on the settings' device; the caller owns it unless it was given in memory: see OwnsModel), the data split, and
    /// the trainer's options. Nothing is written yet.
    let prepare (options: RunOptions) : PreparedRun =
        RunOptions.validate options
        let tokenizer = Tokenizers.gpt2 ()
        // The text first: a missing file is found before a large model is built.
        let documents =
            match options.Texts, options.Data with
            | Some texts, _ -> texts |> List.mapi (fun index text -> ({ Source = sprintf "text %d (in memory)" (index + 1); Text = text }: Corpus.Document)) |> Array.ofList
            | None, Some data -> Corpus.load data
            | None, None -> [| Corpus.builtIn.Value |]
        let runDirectory, resumeFrom, model, owned, runLock = prepareModel options
        try
            attachAdapters options.Training model
            // On its device (with its adapters) before the trainer lists the parameters and makes the optimizer.
            Device.place options.Training.Device model |> ignore
            if options.Training.Lora.IsSome then Lora.freezeBase (fun _ -> false) model |> ignore
            let config = model.Config
            let contextLength = options.ContextLength |> Option.defaultValue config.ContextLength
            if contextLength < 1 || contextLength > config.ContextLength then
                Errors.fail "the training context length %d must be between 1 and the model's context length %d" contextLength config.ContextLength
            if config.VocabSize < tokenizer.VocabularySize then
                Errors.fail "the model's vocabulary has %d tokens; GPT-2's tokenizer needs %d" config.VocabSize tokenizer.VocabularySize
            let data = TrainingData.forGpt config tokenizer options.TrainRatio (tokens options documents tokenizer contextLength)
            let trainerOptions = RunOptions.toTrainerOptions options contextLength runDirectory
            TrainerOptions.validate trainerOptions
            { RunDirectory = runDirectory; ResumeFrom = resumeFrom; Model = model; OwnsModel = owned; Data = data
              TrainerOptions = trainerOptions; Lock = runLock }
        with _ ->
            // A model given in memory is the caller's: never disposed here.
            if owned then model.Dispose()
            runLock.Release()
            reraise ()

    /// Pretrains a model as the options say, in OutputDirectory/Name (or the resumed run's folder): run.json, checkpoints,
    /// metrics.jsonl, and the final model in the Hugging Face layout under model/. Reports a snapshot after every event.
    /// Cancelling stops after the current step with a checkpoint and the model so far (Cancelled = true). A model given
    /// in memory (InitModel) is trained in place and stays the caller's.
    let pretrain (options: RunOptions) (report: RunProgress -> unit) (cancellation: CancellationToken) : RunResult =
        let prepared = prepare options
        let runDirectory = prepared.RunDirectory
        use runLock = prepared.Lock
        let model = prepared.Model
        use _owner = if prepared.OwnsModel then model :> IDisposable else { new IDisposable with member _.Dispose() = () }
        let onEvent, modelSaved, latest = reporter report options.Training.Epochs runDirectory
        let onEvent = writeRunFileWhenStarted (fun () -> if prepared.ResumeFrom.IsNone then RunFile.write runDirectory options) onEvent
        let trained = Trainer.train prepared.TrainerOptions model prepared.Data prepared.ResumeFrom onEvent cancellation
        let modelDirectory =
            if trained.Steps = 0 then None
            else
                let directory = saveModel runDirectory options.Training options.InitFrom model
                modelSaved directory
                Some directory
        resultOf trained (latest ()).Elapsed runDirectory modelDirectory
