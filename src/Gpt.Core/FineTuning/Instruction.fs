namespace Gpt.FineTuning

// Instruction fine-tuning (book chapter 7) as a task for the one trainer: the language model itself, every parameter
// trained, the next-token loss over collated entries (targets of -100 count for nothing); then the run around it
// (folder, run.json, the model, responses for the test split and their scores) and responding to instructions.

open System
open System.IO
open System.Text.Json
open System.Text.Json.Nodes
open System.Threading
open TorchSharp
open Gpt
open Gpt.Kernels
open Gpt.Model
open Gpt.Text
open Gpt.Generation
open Gpt.Training
open Gpt.Weights

/// Every `gpt finetune instruct` option.
type InstructionOptions =
    { /// The language model to fine-tune (any model source: folder, file, Hugging Face id).
      Model: string
      /// The training entries (None, with Data None too: the built-in instruction set, split as Split says).
      Train: string option
      Validation: string option
      Test: string option
      /// One file split into training, validation and test entries (seeded shuffle).
      Data: string option
      /// Training and validation fractions of Data (the rest is the test split): the book's 0.85 and 0.1.
      Split: float * float
      PromptStyle: PromptStyle
      /// Also set the prompt's targets to -100 (the book's exercise 7.2): only the response is learned.
      MaskInstruction: bool
      /// Cut collated inputs and targets to this many tokens (None: the model's context).
      MaxLength: int option
      DropRate: float
      Shuffle: bool
      /// The most tokens of each test response generated after training (the book's 256).
      ResponseTokens: int
      Training: TrainingSettings }

/// How instruction fine-tuning ended: the run, the test responses file, and their automatic scores.
type InstructionResult =
    { Run: RunResult
      /// test-responses.json: the test entries with "model_response" (None without a test split or when no step ran).
      ResponsesFile: string option
      /// Mean exact match and token F1 of the test responses (None without test entries).
      ExactMatch: float option
      TokenF1: float option
      TrainExamples: int
      ValidationExamples: int
      TestExamples: int }

[<RequireQualifiedAccess>]
module InstructionOptions =
    /// The book's chapter 7 settings for a model: every parameter trained, AdamW 5e-5 with weight decay 0.1, 2 epochs,
    /// batch 8, the alpaca prompt, the built-in instructions split 85/10/5 when no data is given, no dropout.
    let defaults (model: string) =
        { Model = model; Train = None; Validation = None; Test = None; Data = None; Split = (0.85, 0.1)
          PromptStyle = PromptStyle.Alpaca; MaskInstruction = false; MaxLength = None; DropRate = 0.0; Shuffle = true
          ResponseTokens = 256; Training = TrainingSettings.bookFineTuning 2 }

    /// Fails on options no run can take.
    let validate (options: InstructionOptions) =
        Errors.require (not (String.IsNullOrWhiteSpace options.Model)) "no model given: instruction fine-tuning starts from a language model (--model)"
        if options.Data.IsSome && (options.Train.IsSome || options.Validation.IsSome || options.Test.IsSome) then
            Errors.fail "give the entries either as one file to split (--data) or as --train/--val/--test files, not both"
        if options.Train.IsNone && (options.Validation.IsSome || options.Test.IsSome) then Errors.fail "--val and --test need --train"
        let train, validation = options.Split
        Errors.require (train > 0.0 && validation >= 0.0 && train + validation <= 1.0)
            "the split must be training > 0, validation >= 0 and their sum <= 1, found %g, %g" train validation
        options.MaxLength |> Option.iter (fun n -> Errors.require (n > 1) "the maximum length must be at least 2, found %d" n)
        Errors.require (options.ResponseTokens >= 0) "response tokens must not be negative, found %d" options.ResponseTokens
        Errors.require (options.DropRate >= 0.0 && options.DropRate < 1.0) "dropout rate must be in [0, 1), found %g" options.DropRate
        TrainingSettings.validate options.Training

    /// The options as run.json records them (the trainer's settings live in the checkpoints).
    let toJson (options: InstructionOptions) : JsonObject =
        let text (value: string option) = value |> Option.map (fun v -> JsonValue.Create(Path.GetFullPath v) :> JsonNode) |> Option.toObj
        let json = JsonObject()
        json["task"] <- "instruction"
        json["model"] <- (if Directory.Exists options.Model || File.Exists options.Model then Path.GetFullPath options.Model else options.Model)
        json["train"] <- text options.Train
        json["validation"] <- text options.Validation
        json["test"] <- text options.Test
        json["data"] <- text options.Data
        json["split"] <- JsonArray(JsonValue.Create(fst options.Split), JsonValue.Create(snd options.Split))
        json["prompt_style"] <- options.PromptStyle.Name
        json["mask_instruction"] <- options.MaskInstruction
        json["max_length"] <- (options.MaxLength |> Option.map (fun n -> JsonValue.Create n :> JsonNode) |> Option.toObj)
        json["drop_rate"] <- options.DropRate
        json["shuffle"] <- options.Shuffle
        json["response_tokens"] <- options.ResponseTokens
        json["lora"] <- RunFile.loraJson options.Training.Lora
        json

    /// Options back from run.json and a checkpoint's trainer options, resuming from `path`.
    let ofJson (file: string) (json: JsonNode) (stored: TrainerOptions) (runDirectory: string) (resumeFrom: string) =
        try
            let text (key: string) = match json[key] with null -> None | node -> Some(node.GetValue<string>())
            let split = json["split"].AsArray()
            { Model = json["model"].GetValue<string>(); Train = text "train"; Validation = text "validation"; Test = text "test"
              Data = text "data"; Split = (split[0].GetValue<float>(), split[1].GetValue<float>())
              PromptStyle = PromptStyle.Parse(json["prompt_style"].GetValue<string>()); MaskInstruction = json["mask_instruction"].GetValue<bool>()
              MaxLength = (match json["max_length"] with null -> None | node -> Some(node.GetValue<int>()))
              DropRate = json["drop_rate"].GetValue<float>(); Shuffle = json["shuffle"].GetValue<bool>()
              ResponseTokens = json["response_tokens"].GetValue<int>()
              Training = { TrainingSettings.ofTrainerOptions stored runDirectory resumeFrom with Lora = RunFile.loraOf json["lora"] } }
        with
        | :? GptException -> reraise ()
        | e -> raise (GptException(sprintf "'%s' is not a valid instruction run file: %s" file e.Message, e))

/// Instruction fine-tuning and responding to instructions.
[<RequireQualifiedAccess>]
module Instruction =
    /// The entries of each split: the given files, one file split (seeded), or the built-in instructions split.
    let entries (options: InstructionOptions) =
        let splitAll all =
            let shuffled = ClassificationData.shuffle options.Training.Seed all
            let trainEnd = int (float shuffled.Length * fst options.Split)
            let validationEnd = trainEnd + int (float shuffled.Length * snd options.Split)
            List.take trainEnd shuffled, shuffled[trainEnd .. validationEnd - 1], List.skip validationEnd shuffled
        match options.Train, options.Data with
        | Some train, _ ->
            InstructionData.read train, (options.Validation |> Option.map InstructionData.read |> Option.defaultValue []),
            (options.Test |> Option.map InstructionData.read |> Option.defaultValue [])
        | None, Some data -> splitAll (InstructionData.read data)
        | None, None -> splitAll (InstructionData.builtIn 1100 options.Training.Seed)

    /// Training batches collated as the book does (shuffled per epoch from the seed, or in order; an incomplete last
    /// batch dropped) and evaluation batches in order.
    let batches (options: InstructionOptions) (endOfText: int) (maxLength: int)
                (train: InstructionExample[]) (validation: InstructionExample[]) : Batches<torch.Tensor * torch.Tensor> =
        let batchSize = options.Training.BatchSize
        let collate = InstructionData.collate endOfText HeadLoss.ignoreIndex options.MaskInstruction (Some maxLength)
        let loader = { Dataset.defaultLoader with BatchSize = batchSize; Shuffle = options.Shuffle; DropLast = true; Seed = options.Training.Seed }
        let order: (int * int[][]) ref = ref (-1, [||])
        let training (epoch: int) (index: int) =
            if fst order.Value <> epoch then order.Value <- (epoch, Dataset.batchIndices train.Length loader epoch)
            collate ((snd order.Value)[index] |> Array.map (fun i -> train[i]))
        let evaluation split =
            (if split = Split.Training then train else validation) |> Array.chunkBySize batchSize |> Seq.map collate
        let averageLength = if train.Length = 0 then 0.0 else train |> Array.averageBy (fun e -> float (min maxLength (e.Ids.Length + 1)))
        { PerEpoch = train.Length / batchSize
          Training = training
          Evaluation = evaluation
          TokensPerBatch = int64 (float batchSize * averageLength)
          Fingerprint = Dataset.fingerprint (train |> Array.collect (fun e -> Array.append [| e.PromptLength; e.Ids.Length |] e.Ids)) }

    /// The response to one entry: greedy (or as `options` say) generation from its prompt, stopping at end-of-text,
    /// the marker removed (the book's extraction).
    let respond (model: GptModel) (tokenizer: ITokenizer) (style: PromptStyle) (options: GenerationOptions) (entry: InstructionEntry) =
        let prompt = InstructionData.prompt style entry
        let completion = (Generator.generate (LanguageModel.ofGpt model) options [ tokenizer.Encode prompt ])[0]
        InstructionData.response style (tokenizer.Decode completion.Tokens)

    /// The response streamed piece by piece (the marker and surrounding whitespace are part of the stream: the
    /// concatenation, extracted with InstructionData.response, is `respond`'s result).
    let streamResponse (model: GptModel) (tokenizer: ITokenizer) (style: PromptStyle) (options: GenerationOptions) (entry: InstructionEntry) =
        Generator.streamText (LanguageModel.ofGpt model) tokenizer options (InstructionData.prompt style entry)

    /// Mean exact match and token F1 of responses against the expected outputs (None for none).
    let scores (responses: (InstructionEntry * string) list) =
        if responses.IsEmpty then None, None
        else
            Some(responses |> List.averageBy (fun (e, r) -> InstructionData.exactMatch e.Output r)),
            Some(responses |> List.averageBy (fun (e, r) -> InstructionData.tokenF1 e.Output r))

    /// The options an instruction run was trained with, from its folder or a checkpoint, resuming from `path`.
    let fromCheckpoint (path: string) : InstructionOptions =
        let directory = Checkpoint.resolve path
        let stored = TrainerOptions.ofJson (Checkpoint.read directory).TrainingOptions
        let runDirectory = RunOptions.runDirectoryOf directory
        let file, json = RunFile.readTask runDirectory "instruction" "an"
        InstructionOptions.ofJson file json stored runDirectory path

    /// The model an instruction run trains: a checkpoint's whole model (resume) or the starting model (a new run,
    /// or a LoRA run's checkpoint, which holds only the adapters), with the run's dropout.
    let private startingModel (options: InstructionOptions) (resumed: (string * string) option) =
        let model =
            match resumed with
            | Some(checkpoint, _) when Checkpoint.holdsWholeModel checkpoint -> Checkpoint.loadGpt checkpoint
            | _ -> ModelSource.load options.Model
        if model.Config.DropRate = options.DropRate then model
        else
            use source = model
            let copy = GptModel.Uninitialised { source.Config with DropRate = options.DropRate }
            StateDict.copy "the model" "keys" id (StateDict.slotsOf (fun _ -> StateDict.Exact) copy) (source.state_dict ())
            copy

    let private writeRunFile (runDirectory: string) (options: InstructionOptions) =
        Directory.CreateDirectory runDirectory |> ignore
        let json = InstructionOptions.toJson options
        json["created_utc"] <- DateTime.UtcNow.ToString("o")
        let text = json.ToJsonString(JsonSerializerOptions(WriteIndented = true)) + "\n"
        Metrics.writeAtomically (Path.Combine(runDirectory, RunFile.fileName)) (fun temporary -> File.WriteAllText(temporary, text))

    /// The test responses after training (greedy, end-of-text stop), written as test-responses.json.
    let private testResponses (options: InstructionOptions) (model: GptModel) (tokenizer: ITokenizer) (runDirectory: string) (test: InstructionEntry list) =
        if test.IsEmpty then None, []
        else
            let generation =
                { GenerationOptions.defaults with MaxNewTokens = options.ResponseTokens; EndOfTextId = tokenizer.EndOfTextId; Seed = Some 0L }
            let responses = test |> List.map (fun entry -> entry, respond model tokenizer options.PromptStyle generation entry)
            let path = Path.Combine(runDirectory, "test-responses.json")
            InstructionData.writeResponses path responses
            Some path, responses

    /// Fine-tunes a language model to follow instructions, in a run folder like pretraining's, writes the model to
    /// <run>/model (the language-model layout), then the test split's responses (test-responses.json) and their exact
    /// match and token F1. Reports a snapshot after every event. Cancelling stops after the current step with a
    /// checkpoint.
    let fineTune (options: InstructionOptions) (report: RunProgress -> unit) (cancellation: CancellationToken) : InstructionResult =
        InstructionOptions.validate options
        let tokenizer = Tokenizers.gpt2 ()
        let train, validation, test = entries options
        let runDirectory, resumed, runLock = Run.lockedDirectory options.Training
        use runLock = runLock
        use model = startingModel options resumed
        Run.attachAdapters options.Training model
        Device.place options.Training.Device model |> ignore // before the trainable parameters are listed
        let trainable =
            if options.Training.Lora.IsSome then Lora.freezeBase (fun _ -> false) model else Optimizer.trainable model
        let maxLength = min model.Config.ContextLength (options.MaxLength |> Option.defaultValue model.Config.ContextLength)
        let endOfText = tokenizer.EndOfTextId |> Option.defaultValue 50256
        let encode = List.map (InstructionData.encode tokenizer options.PromptStyle) >> Array.ofList
        let trainExamples, validationExamples = encode train, encode validation
        Errors.require (trainExamples.Length >= options.Training.BatchSize)
            "the training split has %d entries, fewer than one batch of %d" trainExamples.Length options.Training.BatchSize
        let trainerOptions = TrainingSettings.resolve options.Training id maxLength maxLength (None, 0) runDirectory
        let task =
            { Model = model
              Trainable = trainable
              Objective = LanguageModelTask.objective model
              Data = batches options endOfText maxLength trainExamples validationExamples
              Sample = None
              Tokenizer = tokenizer.Name
              ModelConfiguration = Pretrained.configJson model.Config }
        TrainerOptions.validate trainerOptions
        let onEvent, modelSaved, latest = Run.reporter report options.Training.Epochs runDirectory
        let onEvent = Run.writeRunFileWhenStarted (fun () -> if resumed.IsNone then writeRunFile runDirectory options) onEvent
        let trained = Trainer.fit trainerOptions task (resumed |> Option.map fst) onEvent cancellation
        let modelDirectory, (responsesFile, responses) =
            if trained.Steps = 0 then None, (None, [])
            else
                let baseModel = if Directory.Exists options.Model || File.Exists options.Model then Path.GetFullPath options.Model else options.Model
                let directory = Run.saveModel runDirectory options.Training (Some baseModel) model
                modelSaved directory
                // The responses come from the saved model: with LoRA, the merged one.
                if options.Training.Lora.IsSome then
                    use merged = Lora.merged model
                    Some directory, testResponses options merged tokenizer runDirectory test
                else Some directory, testResponses options model tokenizer runDirectory test
        let exact, f1 = scores responses
        { Run = Run.resultOf trained (latest ()).Elapsed runDirectory modelDirectory; ResponsesFile = responsesFile
          ExactMatch = exact; TokenF1 = f1; TrainExamples = train.Length; ValidationExamples = validation.Length
          TestExamples = test.Length }
