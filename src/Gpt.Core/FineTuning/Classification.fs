namespace Gpt.FineTuning

// Classification fine-tuning (book chapter 6) as a task for the one trainer: a classifier built from a language model
// (or a saved classifier), the parameters it trains, the cross-entropy of the label logits, and padded batches of
// labelled texts; then the run around it (folder, run.json, test accuracy, the saved classifier) and inference.

open System
open System.IO
open System.Text.Json
open System.Text.Json.Nodes
open System.Threading
open TorchSharp
open TorchSharp.Modules
open Gpt
open Gpt.Model
open Gpt.Text
open Gpt.Training
open Gpt.Weights

/// Which parameters classification fine-tuning trains; the others are frozen (no gradient, no optimizer state).
[<RequireQualifiedAccess>]
type TrainableSet =
    /// The head only.
    | Head
    /// The last N transformer blocks, the final LayerNorm and the head (the book: the last block).
    | LastBlocks of int
    /// Every parameter.
    | All

    /// "head" | "last-block" | "last-N" | "all".
    member this.Name =
        match this with
        | Head -> "head"
        | LastBlocks 1 -> "last-block"
        | LastBlocks n -> sprintf "last-%d" n
        | All -> "all"

    static member Parse(name: string) =
        let text = if isNull name then "" else name.Trim().ToLowerInvariant()
        match text with
        | "head" -> Head
        | "all" -> All
        | "last-block" -> LastBlocks 1
        | _ when text.StartsWith "last-" && fst (Int32.TryParse(text.Substring 5)) && Int32.Parse(text.Substring 5) > 0 ->
            LastBlocks(Int32.Parse(text.Substring 5))
        | _ -> Errors.fail "unknown trainable set '%s': expected last-block, last-N (N blocks), head or all" name

/// Every `gpt finetune classify` option.
type ClassificationOptions =
    { /// Where to start: a language model (any model source: folder, file, Hugging Face id) gets a new head; a saved
      /// classifier keeps its own.
      Model: string
      /// The training texts (None, with Data None too: the built-in messages, split as Split says).
      Train: string option
      Validation: string option
      Test: string option
      /// One file to split into training, validation and test texts (seeded shuffle).
      Data: string option
      /// Training and validation fractions of Data (the rest is the test split): the book's 0.7 and 0.1.
      Split: float * float
      TextColumn: string
      LabelColumn: string
      /// The labels in id order (None: in order of first appearance in the training texts).
      Labels: string list option
      /// Undersample every label to the count of the rarest (the book's create_balanced_dataset).
      Balance: bool
      /// Which position is classified (None: a saved classifier's own, last-token for a new head).
      Pooling: Pooling option
      Trainable: TrainableSet
      /// Pad and truncate every text to this many tokens (None: pad each batch to its longest; with last-position
      /// pooling, every text to the longest training text, as the book does). Texts are never longer than the context.
      MaxLength: int option
      /// Dropout during fine-tuning (the book's 0.0).
      DropRate: float
      /// Shuffle the training texts every epoch (false: file order).
      Shuffle: bool
      Training: TrainingSettings }

/// How classification fine-tuning ended: the run, the test split's accuracy and loss, the labels, how many texts
/// each split had and how many were truncated.
type ClassificationResult =
    { Run: RunResult
      Labels: string[]
      TestAccuracy: float option
      TestLoss: float option
      TrainExamples: int
      ValidationExamples: int
      TestExamples: int
      TruncatedTexts: int }

/// One text classified.
type Prediction =
    { Text: string
      LabelId: int
      Label: string
      /// Softmax of the logits, in label id order.
      Probabilities: float[]
      Logits: float[] }

/// A classifier laid out for the decoder (Generation/Decoder.fs): its body's weights in a Dtype (float32 views of the
/// classifier's own weights where they can be read as they are, else copies with low-rank adapters merged in) and
/// its score matrix in float32. Classifying a text then reads every body weight once per 64 tokens through the
/// matrix kernels instead of libtorch. A snapshot: made from the weights as they are now. Owns native memory (and,
/// for float32 views, keeps the classifier's weights alive): dispose it.
[<Sealed>]
type ClassifierDecoder internal (config: ClassifierConfig, weights: Gpt.Generation.DecoderWeights, score: torch.Tensor) =
    member _.Config = config
    /// The type the body's weights are read in.
    member _.Dtype = weights.Dtype
    member internal _.Weights = weights
    /// The score matrix (labels, C): float32, contiguous, on the CPU.
    member internal _.Score = score

    interface IDisposable with
        member _.Dispose() =
            (weights :> IDisposable).Dispose()
            score.Dispose()

[<RequireQualifiedAccess>]
module ClassificationOptions =
    /// The book's chapter 6 settings for a model: 5 epochs, batch 8, AdamW 5e-5 with weight decay 0.1, the last block
    /// trained, the built-in messages split 70/10/20 when no data is given, no dropout, last-token pooling.
    let defaults (model: string) =
        { Model = model; Train = None; Validation = None; Test = None; Data = None; Split = (0.7, 0.1)
          TextColumn = ClassificationData.defaultTextColumn; LabelColumn = ClassificationData.defaultLabelColumn; Labels = None
          Balance = false; Pooling = None; Trainable = TrainableSet.LastBlocks 1; MaxLength = None; DropRate = 0.0
          Shuffle = true; Training = TrainingSettings.bookFineTuning 5 }

    /// Fails on options no run can take.
    let validate (options: ClassificationOptions) =
        Errors.require (not (String.IsNullOrWhiteSpace options.Model)) "no model given: fine-tuning starts from a language model or a classifier (--model)"
        if options.Data.IsSome && (options.Train.IsSome || options.Validation.IsSome || options.Test.IsSome) then
            Errors.fail "give the texts either as one file to split (--data) or as --train/--val/--test files, not both"
        if options.Train.IsNone && (options.Validation.IsSome || options.Test.IsSome) then
            Errors.fail "--val and --test need --train"
        let train, validation = options.Split
        Errors.require (train > 0.0 && validation >= 0.0 && train + validation <= 1.0)
            "the split must be training > 0, validation >= 0 and their sum <= 1, found %g, %g" train validation
        options.MaxLength |> Option.iter (fun n -> Errors.require (n > 0) "the maximum length must be positive, found %d" n)
        Errors.require (options.DropRate >= 0.0 && options.DropRate < 1.0) "dropout rate must be in [0, 1), found %g" options.DropRate
        match options.Trainable with
        | TrainableSet.LastBlocks n when n < 1 -> Errors.fail "the number of trained blocks must be positive, found %d" n
        | _ -> ()
        // With LoRA the adapters and the head train, whatever the trainable set says: another set than the default
        // would be ignored, so it is refused.
        if options.Training.Lora.IsSome && options.Trainable <> (defaults "").Trainable then
            Errors.fail "--trainable %s does not apply with LoRA (--lora-rank): the adapters and the head train; leave --trainable out, or drop --lora-rank"
                options.Trainable.Name
        TrainingSettings.validate options.Training

    let private full (path: string option) = path |> Option.map Path.GetFullPath

    /// The classification options as run.json records them (the trainer's settings live in the checkpoints).
    let toJson (options: ClassificationOptions) : JsonObject =
        let text (value: string option) = value |> Option.map (fun v -> JsonValue.Create v :> JsonNode) |> Option.toObj
        let json = JsonObject()
        json["task"] <- "classification"
        json["model"] <- (if Directory.Exists options.Model || File.Exists options.Model then Path.GetFullPath options.Model else options.Model)
        json["train"] <- text (full options.Train)
        json["validation"] <- text (full options.Validation)
        json["test"] <- text (full options.Test)
        json["data"] <- text (full options.Data)
        json["split"] <- JsonArray(JsonValue.Create(fst options.Split), JsonValue.Create(snd options.Split))
        json["text_column"] <- options.TextColumn
        json["label_column"] <- options.LabelColumn
        json["labels"] <- (options.Labels |> Option.map (fun l -> JsonArray(l |> List.map (fun x -> JsonValue.Create x :> JsonNode) |> Array.ofList) :> JsonNode) |> Option.toObj)
        json["balance"] <- options.Balance
        json["pooling"] <- (options.Pooling |> Option.map (fun p -> JsonValue.Create p.Name :> JsonNode) |> Option.toObj)
        json["trainable"] <- options.Trainable.Name
        json["max_length"] <- (options.MaxLength |> Option.map (fun n -> JsonValue.Create n :> JsonNode) |> Option.toObj)
        json["drop_rate"] <- options.DropRate
        json["shuffle"] <- options.Shuffle
        json["lora"] <- RunFile.loraJson options.Training.Lora
        json

    /// Options back from run.json and a checkpoint's trainer options, resuming from `path`.
    let ofJson (path: string) (json: JsonNode) (stored: TrainerOptions) (runDirectory: string) (resumeFrom: string) =
        try
            let text (key: string) = match json[key] with null -> None | node -> Some(node.GetValue<string>())
            let split = json["split"].AsArray()
            { Model = json["model"].GetValue<string>(); Train = text "train"; Validation = text "validation"; Test = text "test"
              Data = text "data"; Split = (split[0].GetValue<float>(), split[1].GetValue<float>())
              TextColumn = json["text_column"].GetValue<string>(); LabelColumn = json["label_column"].GetValue<string>()
              Labels = (match json["labels"] with null -> None | node -> Some [ for l in node.AsArray() -> l.GetValue<string>() ])
              Balance = json["balance"].GetValue<bool>(); Pooling = (match json["pooling"] with null -> None | node -> Some(Pooling.Parse(node.GetValue<string>())))
              Trainable = TrainableSet.Parse(json["trainable"].GetValue<string>())
              MaxLength = (match json["max_length"] with null -> None | node -> Some(node.GetValue<int>()))
              DropRate = json["drop_rate"].GetValue<float>(); Shuffle = json["shuffle"].GetValue<bool>()
              Training = { TrainingSettings.ofTrainerOptions stored runDirectory resumeFrom with Lora = RunFile.loraOf json["lora"] } }
        with
        | :? GptException -> reraise ()
        | e -> raise (GptException(sprintf "'%s' is not a valid classification run file: %s" path e.Message, e))

/// Classification fine-tuning and classification.
[<RequireQualifiedAccess>]
module Classification =
    /// The texts of each split: the given files, one file split (seeded), or the built-in messages split; and the
    /// labels in order of first appearance in the file the training texts come from.
    let texts (options: ClassificationOptions) : (LabelledText list * LabelledText list * LabelledText list) * string[] =
        let read path = ClassificationData.read path options.TextColumn options.LabelColumn
        let balance texts = if options.Balance then ClassificationData.balance options.Training.Seed texts else texts
        let splitAll texts = ClassificationData.split options.Training.Seed (fst options.Split) (snd options.Split) (balance texts), texts
        let splits, source =
            match options.Train, options.Data with
            | Some train, _ ->
                let texts = read train
                (balance texts, (options.Validation |> Option.map read |> Option.defaultValue []),
                 (options.Test |> Option.map read |> Option.defaultValue [])), texts
            | None, Some data -> splitAll (read data)
            | None, None -> splitAll ClassificationData.builtIn.Value
        splits, ClassificationData.labels options.Labels source

    /// Freezes every parameter outside the trainable set and returns those inside it, by name.
    let trainable (set: TrainableSet) (classifier: GptClassifier) : (string * Parameter)[] =
        let layers = classifier.Config.Body.Layers
        let inSet (name: string) =
            match set with
            | TrainableSet.All -> true
            | TrainableSet.Head -> name.StartsWith "score."
            | TrainableSet.LastBlocks n ->
                name.StartsWith "score." || name.StartsWith "transformer.ln_f."
                || (seq { max 0 (layers - n) .. layers - 1 } |> Seq.exists (fun i -> name.StartsWith(sprintf "transformer.h.%d." i)))
        for struct (name, parameter) in classifier.named_parameters () do
            parameter.requires_grad <- inSet name
        Optimizer.trainable classifier

    /// The cross-entropy of the label logits; an evaluation also counts the right answers.
    let objective (classifier: GptClassifier) : Objective<ClassificationBatch> =
        let loss (mode: Mode) (batch: ClassificationBatch) =
            use scope = torch.NewDisposeScope()
            (Classifier.loss classifier.Config mode classifier.Params batch.Ids batch.Lengths batch.Labels).MoveToOuterDisposeScope()
        let score (batch: ClassificationBatch) =
            use scope = torch.NewDisposeScope()
            let logits = Classifier.logits classifier.Config Mode.Eval classifier.Params batch.Ids batch.Lengths
            let labels = Inputs.onDeviceOf logits batch.Labels
            let value = torch.nn.functional.cross_entropy(logits, labels).item<float32> ()
            let correct = logits.argmax(-1L).eq(labels).sum().item<int64> ()
            { Loss = float value; Correct = correct; Count = batch.Labels.shape[0] }
        { Loss = loss; Score = score }

    /// Training batches (shuffled per epoch from the seed, or in file order; an incomplete last batch dropped) and
    /// evaluation batches in order.
    let batches (options: ClassificationOptions) (padTokenId: int) (length: int option)
                (train: ClassificationExample[]) (validation: ClassificationExample[]) : Batches<ClassificationBatch> =
        let batchSize = options.Training.BatchSize
        let loader = { Dataset.defaultLoader with BatchSize = batchSize; Shuffle = options.Shuffle; DropLast = true; Seed = options.Training.Seed }
        let order: (int * int[][]) ref = ref (-1, [||])
        let training (epoch: int) (index: int) =
            if fst order.Value <> epoch then order.Value <- (epoch, Dataset.batchIndices train.Length loader epoch)
            let indices = (snd order.Value)[index]
            ClassificationData.collate padTokenId length (indices |> Array.map (fun i -> train[i]))
        let evaluation split =
            let examples = if split = Split.Training then train else validation
            examples |> Array.chunkBySize batchSize |> Seq.map (ClassificationData.collate padTokenId length)
        let averageLength = if train.Length = 0 then 0.0 else train |> Array.averageBy (fun e -> float e.Ids.Length)
        { PerEpoch = train.Length / batchSize
          Training = training
          Evaluation = evaluation
          TokensPerBatch = int64 (float batchSize * (length |> Option.map float |> Option.defaultValue averageLength))
          Fingerprint = ClassificationData.fingerprint train }

    /// The classifier a run starts from: a saved classifier (its head and labels), or a language model with a new
    /// head (seeded) for the labels of the data.
    let private startingClassifier (options: ClassificationOptions) (dataLabels: string[]) =
        if Directory.Exists options.Model && ClassifierFiles.isClassifier options.Model then
            let classifier = ClassifierFiles.loadWith options.Pooling options.Model
            match dataLabels |> Array.tryFind (fun l -> not (Array.contains l classifier.Labels)) with
            | Some label ->
                classifier.Dispose()
                Errors.fail "the classifier '%s' knows the labels %s; the data has '%s'" options.Model (String.Join(", ", classifier.Labels)) label
            | None -> classifier
        else
            use model = ModelSource.load options.Model
            let padTokenId = min 50256 (model.Config.VocabSize - 1)
            let pooling = defaultArg options.Pooling Pooling.LastToken
            ClassifierFiles.fromLanguageModel model dataLabels padTokenId pooling options.DropRate (int64 options.Training.Seed)

    /// The length every text of a run is padded to (None: each batch to its longest) and the most tokens a text keeps.
    let private lengths (options: ClassificationOptions) (pooling: Pooling) (contextLength: int) (tokenizer: ITokenizer) (train: LabelledText list) =
        let limit = min contextLength (options.MaxLength |> Option.defaultValue contextLength)
        let fixedLength =
            match options.MaxLength, pooling with
            | Some n, _ -> Some(min n contextLength)
            | None, Pooling.LastPosition ->
                // The book pads every text to the longest training text (SpamDataset with max_length=None).
                Some(train |> List.map (fun t -> min limit (tokenizer.Encode t.Text).Length) |> List.fold max 1)
            | None, Pooling.LastToken -> None
        limit, fixedLength

    /// The examples of the three splits, with the labels and the truncation count.
    let private examples (options: ClassificationOptions) (labels: string[]) (limit: int) (tokenizer: ITokenizer) (train, validation, test) =
        let encode = ClassificationData.encode tokenizer labels limit
        let trainExamples, validationExamples, testExamples = encode train, encode validation, encode test
        let truncated = [ trainExamples; validationExamples; testExamples ] |> List.sumBy (Array.filter _.Truncated >> Array.length)
        Errors.require (trainExamples.Length >= options.Training.BatchSize)
            "the training split has %d texts, fewer than one batch of %d" trainExamples.Length options.Training.BatchSize
        trainExamples, validationExamples, testExamples, truncated

    /// run.json of a classification run.
    let private writeRunFile (runDirectory: string) (options: ClassificationOptions) =
        Directory.CreateDirectory runDirectory |> ignore
        let json = ClassificationOptions.toJson options
        json["created_utc"] <- DateTime.UtcNow.ToString("o")
        let text = json.ToJsonString(JsonSerializerOptions(WriteIndented = true)) + "\n"
        Metrics.writeAtomically (Path.Combine(runDirectory, RunFile.fileName)) (fun temporary -> File.WriteAllText(temporary, text))

    /// The options a classification run was trained with, from its folder or a checkpoint, resuming from `path`.
    let fromCheckpoint (path: string) : ClassificationOptions =
        let directory = Checkpoint.resolve path
        let stored = TrainerOptions.ofJson (Checkpoint.read directory).TrainingOptions
        let runDirectory = RunOptions.runDirectoryOf directory
        let file, json = RunFile.readTask runDirectory "classification" "a"
        ClassificationOptions.ofJson file json stored runDirectory path

    /// Accuracy and loss over every batch of a split (None when it has no examples).
    let private evaluateAll (classifier: GptClassifier) (batchSize: int) (padTokenId: int) (length: int option) (examples: ClassificationExample[]) =
        if examples.Length = 0 then None, None
        else
            let batches = examples |> Array.chunkBySize batchSize |> Seq.map (ClassificationData.collate padTokenId length)
            let loss, accuracy = Trainer.evaluateBatches classifier (objective classifier) batches
            accuracy, Some loss

    /// Fine-tunes a classifier as the options say, in a run folder like pretraining's (run.json, checkpoints of the
    /// trained parameters, metrics.jsonl with accuracies) and writes the classifier to <run>/model; then measures the
    /// test split. Reports a snapshot after every event. Cancelling stops after the current step with a checkpoint.
    let fineTune (options: ClassificationOptions) (report: RunProgress -> unit) (cancellation: CancellationToken) : ClassificationResult =
        ClassificationOptions.validate options
        let tokenizer = Tokenizers.gpt2 ()
        let ((train, _, _) as splits), dataLabels = texts options
        let runDirectory, resumed, runLock = Run.lockedDirectory options.Training
        use runLock = runLock
        use classifier = startingClassifier options dataLabels
        // LoRA: adapters on the frozen body, the head trained in full; otherwise the trainable set.
        let trainableParameters =
            match options.Training.Lora with
            | Some lora ->
                Lora.attachClassifier lora (int64 options.Training.Seed) classifier |> ignore
                Device.place options.Training.Device classifier |> ignore // before the trainable parameters are listed
                Lora.freezeBase (fun name -> name.StartsWith "score.") classifier
            | None ->
                Device.place options.Training.Device classifier |> ignore
                trainable options.Trainable classifier
        let config = classifier.Config
        let limit, fixedLength = lengths options config.Pooling config.Body.ContextLength tokenizer train
        let trainExamples, validationExamples, testExamples, truncated = examples options config.Labels limit tokenizer splits
        let trainerOptions =
            TrainingSettings.resolve options.Training id limit limit (None, 0) runDirectory
        let task =
            { Model = classifier
              Trainable = trainableParameters
              Objective = objective classifier
              Data = batches options config.PadTokenId fixedLength trainExamples validationExamples
              Sample = None
              Tokenizer = tokenizer.Name
              ModelConfiguration = ClassifierFiles.configJson config }
        TrainerOptions.validate trainerOptions
        let onEvent, modelSaved, latest = Run.reporter report options.Training.Epochs runDirectory
        let onEvent = Run.writeRunFileWhenStarted (fun () -> if resumed.IsNone then writeRunFile runDirectory options) onEvent
        let trained = Trainer.fit trainerOptions task (resumed |> Option.map fst) onEvent cancellation
        let modelDirectory =
            if trained.Steps = 0 then None
            else
                let directory = Path.Combine(runDirectory, Run.modelFolder)
                classifier.eval ()
                match options.Training.Lora with
                | Some lora ->
                    let baseModel = if Directory.Exists options.Model || File.Exists options.Model then Path.GetFullPath options.Model else options.Model
                    use adapter = Adapter.ofClassifier lora (Some baseModel) classifier
                    Adapter.write (Path.Combine(runDirectory, Run.adapterFolder)) adapter
                    use merged = Lora.mergedClassifier classifier
                    ClassifierFiles.save directory merged
                | None -> ClassifierFiles.save directory classifier
                modelSaved directory
                Some directory
        let testAccuracy, testLoss = evaluateAll classifier options.Training.BatchSize config.PadTokenId fixedLength testExamples
        { Run = Run.resultOf trained (latest ()).Elapsed runDirectory modelDirectory; Labels = config.Labels
          TestAccuracy = testAccuracy; TestLoss = testLoss; TrainExamples = trainExamples.Length
          ValidationExamples = validationExamples.Length; TestExamples = testExamples.Length; TruncatedTexts = truncated }

    /// A prediction from one text's label logits (float32, as computed).
    let private predictionOf (config: ClassifierConfig) (text: string) (logits: float32[]) =
        let largest = Array.max logits
        let exponentials = logits |> Array.map (fun l -> exp (float (l - largest)))
        let total = Array.sum exponentials
        let best = Array.findIndex ((=) largest) logits
        { Text = text; LabelId = best; Label = config.Labels[best]; Probabilities = exponentials |> Array.map (fun e -> e / total)
          Logits = logits |> Array.map float }

    /// Texts as token ids for classification: each truncated to the context, none empty. Texts are classified 16 at a
    /// time; a chunk is padded to its longest text (which decides what last-position pooling reads).
    let private encodeChunks (config: ClassifierConfig) (tokenizer: ITokenizer) (texts: string[]) =
        texts
        |> Array.mapi (fun i text ->
            let ids = tokenizer.Encode text
            if ids.Length = 0 then Errors.fail "text %d is empty: a text needs at least one token" i
            text, Array.truncate config.Body.ContextLength ids)
        |> Array.chunkBySize 16

    /// Classifies texts, several at a time (each truncated to the context; batches padded after each text's end).
    let classify (classifier: GptClassifier) (tokenizer: ITokenizer) (texts: string seq) : Prediction[] =
        let texts = Array.ofSeq texts
        let config = classifier.Config
        let wasTraining = classifier.training
        classifier.eval ()
        try
            use _ = torch.no_grad ()
            [| for chunk in encodeChunks config tokenizer texts do
                   use scope = torch.NewDisposeScope()
                   let examples = chunk |> Array.map (fun (_, ids) -> { Ids = ids; Label = 0; Truncated = false })
                   let batch = ClassificationData.collate config.PadTokenId None examples
                   let logits = (Classifier.logits config Mode.Eval classifier.Params batch.Ids batch.Lengths).cpu().to_type(torch.float32)
                   for row in 0 .. chunk.Length - 1 do
                       yield predictionOf config (fst chunk[row]) (logits[int64 row].data<float32>().ToArray()) |]
        finally
            classifier.train wasTraining

    /// The classifier's body in `dtype` for the decoder (float32: views of its own weights where they are
    /// contiguous CPU float32 without adapters, else a copy; float16 / bfloat16: copies, adapters merged in) and its
    /// score matrix. Made from the weights as they are now: make another after training.
    let decoder (dtype: Gpt.Kernels.Dtype) (classifier: GptClassifier) : ClassifierDecoder =
        if isNull (box classifier) then nullArg "classifier"
        use _ = torch.no_grad ()
        use scope = torch.NewDisposeScope()
        let p = classifier.Params
        let config = classifier.Config
        let score = p.Score.detach().cpu().to_type(torch.float32).contiguous()
        let expected = [| int64 config.Labels.Length; int64 config.Body.EmbeddingDim |]
        if score.shape <> expected then
            Errors.fail "score.weight has shape %s, expected %s" (Errors.shapeText score.shape) (Errors.shapeText expected)
        let weights = Gpt.Generation.DecoderWeights.create config.Body p.Body dtype
        new ClassifierDecoder(config, weights, score.DetachFromDisposeScope())

    /// Classifies texts as `classify` does (the same truncation, padding and pooling), through the decoder: each text
    /// alone, last-token pooling reading its last real token, last-position pooling its chunk's padded length.
    /// Logits agree with `classify` within float32 rounding for float32 weights (float16 / bfloat16: within what
    /// their rounding of the weights moves them).
    let classifyWith (decoder: ClassifierDecoder) (tokenizer: ITokenizer) (texts: string seq) : Prediction[] =
        if isNull (box decoder) then nullArg "decoder"
        let texts = Array.ofSeq texts
        let config = decoder.Config
        let embedding = config.Body.EmbeddingDim
        let labels = config.Labels.Length
        let score = Gpt.Kernels.TensorMemory.address decoder.Score
        use state = new Gpt.Generation.DecoderState(decoder.Weights, 1)
        let hidden = Array.zeroCreate<float32> embedding
        let handle = Runtime.InteropServices.GCHandle.Alloc(hidden, Runtime.InteropServices.GCHandleType.Pinned)
        let address = handle.AddrOfPinnedObject()
        try
            [| for chunk in encodeChunks config tokenizer texts do
                   let padded = chunk |> Array.map (fun (_, ids: int[]) -> ids.Length) |> Array.max
                   for text, ids in chunk do
                       let ids =
                           match config.Pooling with
                           | Pooling.LastToken -> ids
                           | Pooling.LastPosition -> Array.append ids (Array.create (padded - ids.Length) config.PadTokenId)
                       state.Reset()
                       state.Hidden(ids, ids.Length, address)
                       let logits = Array.init labels (fun label -> Gpt.Generation.Rows.dot (Gpt.Generation.Rows.offset score (label * embedding)) address embedding)
                       yield predictionOf config text logits |]
        finally
            handle.Free()

    /// Classifies texts with the body's weights read in `dtype`, as generation does (LanguageModel.ofGpt / ofGptIn):
    /// float32 runs through the decoder over the classifier's own weights where they can be read as they are (CPU,
    /// float32, no adapters) and through TorchSharp otherwise (another device, adapters); float16 and bfloat16 run
    /// through the decoder over a copy made for this call (to classify many times, keep a `decoder`).
    let classifyAs (dtype: Gpt.Kernels.Dtype) (classifier: GptClassifier) (tokenizer: ITokenizer) (texts: string seq) : Prediction[] =
        if isNull (box classifier) then nullArg "classifier"
        let viewable =
            use scope = torch.NewDisposeScope()
            Gpt.Generation.DecoderWeights.canView classifier.Params.Body
        if dtype = Gpt.Kernels.Dtype.Float32 && not viewable then classify classifier tokenizer texts
        else
            use decoder = decoder dtype classifier
            classifyWith decoder tokenizer texts
