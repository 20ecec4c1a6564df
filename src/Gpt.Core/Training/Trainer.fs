namespace Gpt.Training

open System
open System.Diagnostics
open System.IO
open System.Text.Json
open System.Threading
open TorchSharp
open Gpt
open Gpt.Text
open Gpt.Model
open Gpt.Generation

/// Everything that shapes a training run. Plain data: it is stored as JSON in every checkpoint.
type TrainerOptions =
    { Epochs: int
      /// Stop after this many optimizer steps even if epochs remain.
      MaxSteps: int option
      BatchSize: int
      ContextLength: int
      /// Distance between the starts of consecutive training windows (= ContextLength: no overlap, as in the book).
      Stride: int
      /// Peak learning rate.
      LearningRate: float
      /// Rate at step 0, rising linearly to LearningRate over WarmupSteps.
      InitialLearningRate: float
      /// Rate the cosine decay reaches at the last step (= LearningRate: no decay).
      MinLearningRate: float
      WarmupSteps: int
      WeightDecay: float
      /// Decay every parameter (the book) instead of matrices only (nanoGPT).
      DecayAll: bool
      Beta1: float
      Beta2: float
      /// Clip the global gradient norm to this value before each step.
      GradientClip: float option
      /// Batches whose gradients are summed into one optimizer step.
      GradientAccumulation: int
      /// Evaluate every this many steps (and after the first and the last step).
      EvalInterval: int
      /// Batches of each split an evaluation reads.
      EvalBatches: int
      /// Seeds the data order and, on a fresh start, torch's generator (dropout).
      Seed: int
      /// Where checkpoints/, metrics.jsonl and loss.png go; nothing is written without it.
      OutputDirectory: string option
      /// Write a checkpoint every this many steps (0: only at the end and on cancellation).
      CheckpointInterval: int
      /// Checkpoints kept besides the best by validation loss.
      KeepLast: int
      /// Greedy continuation of this prompt at every epoch end.
      SamplePrompt: string option
      SampleTokens: int }

/// What a run will do, announced before its first step.
type TrainingPlan =
    { TotalSteps: int
      StartStep: int
      BatchesPerEpoch: int
      TokensPerStep: int64
      ParameterCount: int64
      /// The checkpoint the run resumed from.
      ResumedFrom: string option }

/// Progress after each optimizer step.
type TrainingProgress =
    { Step: int
      TotalSteps: int
      /// The epoch in progress, counting from 1.
      Epoch: int
      Epochs: int
      /// Mean loss of this step's batches, in training mode (with dropout).
      TrainLoss: float
      LearningRate: float
      /// Global gradient norm before clipping, when clipping is on.
      GradientNorm: float option
      TokensSeen: int64
      TokensPerSecond: float
      Elapsed: TimeSpan
      Remaining: TimeSpan }

/// What a run reports as it goes. Handlers run on the training thread, between steps, inside that step's dispose
/// scope (tensors they create without detaching are freed after the handler).
type TrainingEvent =
    | Started of TrainingPlan
    | Stepped of TrainingProgress
    | Evaluated of EvaluationRecord
    /// An epoch ended; the sample is the greedy continuation of SamplePrompt when one is set. A handler may
    /// generate its own sample here: what it draws from torch's generator is part of the checkpointed state.
    | EpochEnded of epoch: int * sample: string option
    | CheckpointSaved of directory: string

type TrainingResult =
    { Steps: int
      TotalSteps: int
      TokensSeen: int64
      Cancelled: bool
      /// Mean loss of the last step's batches (NaN when no step ran).
      LastTrainLoss: float
      BestValidationLoss: float option
      /// The last checkpoint written, when any.
      Checkpoint: string option
      /// This session's evaluations.
      Evaluations: EvaluationRecord[] }

/// Token streams to train on and what a checkpoint must know about the model and the tokenizer.
type TrainingData =
    { Train: int[]
      Validation: int[]
      Tokenizer: ITokenizer
      /// The model's configuration as JSON, stored in checkpoints so the model can be rebuilt to resume: for a
      /// GptModel, its config.json (Pretrained.configJson), which Checkpoint.loadGpt reads back.
      ModelConfiguration: string }

[<RequireQualifiedAccess>]
module TrainingData =
    /// Training data for a GPT model: the token stream split by position (the first `trainRatio` for training, the
    /// rest for validation, as the book does), the model's config.json as its configuration.
    let forGpt (config: GptConfig) (tokenizer: ITokenizer) (trainRatio: float) (ids: int[]) : TrainingData =
        let train, validation = Loss.split trainRatio ids
        { Train = train; Validation = validation; Tokenizer = tokenizer; ModelConfiguration = Pretrained.configJson config }

[<RequireQualifiedAccess>]
module TrainerOptions =
    /// The book's chapter 5 run: 10 epochs, batch 2, context 256, no overlap, constant lr 4e-4, decay 0.1,
    /// evaluation every 5 steps on 5 batches, seed 123; no warmup, no decay schedule, no clipping.
    let defaults =
        { Epochs = 10; MaxSteps = None; BatchSize = 2; ContextLength = 256; Stride = 256
          LearningRate = 4e-4; InitialLearningRate = 4e-4; MinLearningRate = 4e-4; WarmupSteps = 0
          WeightDecay = 0.1; DecayAll = false; Beta1 = 0.9; Beta2 = 0.999; GradientClip = None
          GradientAccumulation = 1; EvalInterval = 5; EvalBatches = 5; Seed = 123
          OutputDirectory = None; CheckpointInterval = 50; KeepLast = 3
          SamplePrompt = Some "Every effort moves you"; SampleTokens = 50 }

    let private json =
        JsonSerializerOptions(PropertyNamingPolicy = JsonNamingPolicy.SnakeCaseLower, RespectRequiredConstructorParameters = true)

    /// The snake_case JSON stored in checkpoints.
    let toJson (options: TrainerOptions) = JsonSerializer.Serialize(options, json)

    /// Options back from a checkpoint's JSON (so that a resume can reuse them); every field must be present.
    let ofJson (text: string) : TrainerOptions =
        let options =
            try JsonSerializer.Deserialize<TrainerOptions>(text, json)
            with :? JsonException as e -> raise (GptException(sprintf "training options are not valid: %s" e.Message, e))
        if obj.ReferenceEquals(options, null) then Errors.fail "training options are missing (JSON null)"
        options

    /// Fails with a clear message on impossible options.
    let validate (o: TrainerOptions) =
        let positive name value = Errors.require (value > 0) "%s must be positive, found %d" name value
        positive "epochs" o.Epochs
        positive "batch size" o.BatchSize
        positive "context length" o.ContextLength
        positive "stride" o.Stride
        positive "gradient accumulation" o.GradientAccumulation
        positive "evaluation interval" o.EvalInterval
        positive "evaluation batches" o.EvalBatches
        positive "checkpoints kept" o.KeepLast
        o.MaxSteps |> Option.iter (positive "max steps")
        Errors.require (o.CheckpointInterval >= 0) "checkpoint interval must not be negative, found %d" o.CheckpointInterval
        Errors.require (o.SampleTokens >= 0) "sample tokens must not be negative, found %d" o.SampleTokens
        o.GradientClip |> Option.iter (fun c -> Errors.require (c > 0.0) "gradient clipping norm must be positive, found %g" c)
        Errors.require (o.Beta1 >= 0.0 && o.Beta1 < 1.0 && o.Beta2 >= 0.0 && o.Beta2 < 1.0)
            "AdamW betas must be in [0, 1), found (%g, %g)" o.Beta1 o.Beta2
        Errors.require (o.WeightDecay >= 0.0) "weight decay must not be negative, found %g" o.WeightDecay

/// The pretraining loop (book ch. 5 with appendix D's warmup, cosine decay and clipping) over any model that maps
/// token ids [B, T] to logits [B, T, V].
[<RequireQualifiedAccess>]
module Trainer =
    type private Model = torch.nn.Module<torch.Tensor, torch.Tensor>

    /// Mean loss over the first `batches` batches of windows (in order), in eval mode under no_grad; the model's
    /// previous mode is restored after.
    let evaluate (model: Model) (windows: Dataset.SlidingWindows) (batchSize: int) (batches: int) : float =
        let wasTraining = model.training
        model.eval ()
        try
            let loader = { Dataset.defaultLoader with BatchSize = batchSize; Shuffle = false; DropLast = false }
            Dataset.batches windows loader 0 |> Loss.loader model (Some batches)
        finally
            model.train wasTraining

    /// The book's greedy loop for any ids → logits model: crop to the last contextLength tokens, take the argmax of
    /// the last position, append.
    let private greedyLoop (model: Model) (ids: ResizeArray<int>) (contextLength: int) (maxNewTokens: int) =
        let wasTraining = model.training
        model.eval ()
        try
            use _ = torch.no_grad ()
            for _ in 1 .. maxNewTokens do
                use scope = torch.NewDisposeScope()
                let start = max 0 (ids.Count - contextLength)
                let context = [| for i in start .. ids.Count - 1 -> int64 ids[i] |]
                let input = torch.tensor(context).view(1L, int64 context.Length) // (1, T)
                let logits = model.forward input // (1, T, V)
                ids.Add(int (logits[0L, -1L].argmax().item<int64> ()))
        finally
            model.train wasTraining

    /// Greedy continuation of a prompt, returned with the prompt as text. A GptModel goes through the KV-cached
    /// Generator (which looks at up to the model's own context length and stops at the tokenizer's end-of-text
    /// token); any other ids → logits model through the book's loop over the last contextLength tokens. Neither
    /// draws from torch's generator; the model's train/eval mode is restored.
    let sample (model: Model) (tokenizer: ITokenizer) (contextLength: int) (prompt: string) (maxNewTokens: int) : string =
        let ids = ResizeArray<int>(tokenizer.Encode prompt)
        if ids.Count = 0 then Errors.fail "the sample prompt '%s' encodes to no tokens" prompt
        match model with
        | :? GptModel as gpt ->
            let options =
                { GenerationOptions.defaults with
                    MaxNewTokens = maxNewTokens; Temperature = 0.0; Seed = Some 0L; EndOfTextId = tokenizer.EndOfTextId }
            let completion = (Generator.generate (LanguageModel.ofGpt gpt) options [ ids.ToArray() ])[0]
            ids.AddRange completion.Tokens
        | _ -> greedyLoop model ids contextLength maxNewTokens
        tokenizer.Decode ids

    /// Refuses to resume from a checkpoint whose data position would not carry over to this run.
    let private checkResumable (directory: string) (stored: CheckpointState) (options: TrainerOptions) (data: TrainingData)
                               (fingerprint: string) (batchesPerEpoch: int) =
        if stored.Tokenizer <> data.Tokenizer.Name then
            Errors.fail "checkpoint '%s' was trained with tokenizer '%s', this run uses '%s'" directory stored.Tokenizer data.Tokenizer.Name
        if stored.DataFingerprint <> fingerprint then
            Errors.fail "checkpoint '%s' was trained on other data (training tokens fingerprint %s, this run's %s)"
                directory stored.DataFingerprint fingerprint
        use storedOptions = JsonDocument.Parse stored.TrainingOptions
        let same (name: string) (label: string) (value: int) =
            match storedOptions.RootElement.TryGetProperty name with
            | true, element when element.ValueKind = JsonValueKind.Number && element.GetInt32() <> value ->
                Errors.fail "checkpoint '%s' was trained with %s %d, this run asks for %d: the data position would not carry over"
                    directory label (element.GetInt32()) value
            | _ -> ()
        same "batch_size" "batch size" options.BatchSize
        same "context_length" "context length" options.ContextLength
        same "stride" "stride" options.Stride
        same "seed" "seed" options.Seed
        same "gradient_accumulation" "gradient accumulation" options.GradientAccumulation
        if stored.BatchesPerEpoch <> batchesPerEpoch then
            Errors.fail "checkpoint '%s' has %d batches per epoch, this run has %d" directory stored.BatchesPerEpoch batchesPerEpoch

    /// Trains `model` on `data`, from scratch or from the checkpoint `resumeFrom` (a checkpoint directory, a
    /// directory of checkpoints, or a run's output directory: the latest complete checkpoint is taken).
    /// Deterministic on CPU for a seed: N steps, a checkpoint, a resume and N more steps give the same weights as
    /// 2N steps straight. On cancellation, writes a checkpoint (when OutputDirectory is set) and returns.
    let train (options: TrainerOptions) (model: Model) (data: TrainingData) (resumeFrom: string option)
              (onEvent: TrainingEvent -> unit) (cancellation: CancellationToken) : TrainingResult =
        TrainerOptions.validate options
        match model with
        | :? GptModel as gpt ->
            let config = gpt.Config
            Errors.require (options.ContextLength <= config.ContextLength)
                "the training context length %d exceeds the model's context length %d" options.ContextLength config.ContextLength
            Errors.require (data.Tokenizer.VocabularySize <= config.VocabSize)
                "the tokenizer '%s' has %d tokens, more than the model's vocabulary of %d"
                data.Tokenizer.Name data.Tokenizer.VocabularySize config.VocabSize
        | _ -> ()
        NativeAllocator.reuseFreedMemory () |> ignore
        let needed = options.ContextLength + 1
        Errors.require (data.Train.Length >= needed)
            "the training split has %d tokens, at least %d are needed for context length %d" data.Train.Length needed options.ContextLength
        Errors.require (data.Validation.Length >= needed)
            "the validation split has %d tokens, at least %d are needed for context length %d" data.Validation.Length needed options.ContextLength
        let trainWindows = Dataset.create data.Train options.ContextLength options.Stride
        let validationWindows = Dataset.create data.Validation options.ContextLength options.Stride
        let loader = { Dataset.defaultLoader with BatchSize = options.BatchSize; Shuffle = true; DropLast = true; Seed = options.Seed }
        let batchesPerEpoch = Dataset.batchCount trainWindows loader
        let accumulation = options.GradientAccumulation
        let possibleSteps = int ((int64 options.Epochs * int64 batchesPerEpoch) / int64 accumulation)
        if possibleSteps = 0 then
            Errors.fail "no optimizer step fits: the training split gives %d batches of %d x %d tokens per epoch, over %d epochs, and a step takes %d batches"
                batchesPerEpoch options.BatchSize options.ContextLength options.Epochs accumulation
        let totalSteps = options.MaxSteps |> Option.map (min possibleSteps) |> Option.defaultValue possibleSteps
        let schedule =
            { InitialLearningRate = options.InitialLearningRate; PeakLearningRate = options.LearningRate
              MinLearningRate = options.MinLearningRate; WarmupSteps = options.WarmupSteps; TotalSteps = totalSteps }
        Schedule.validate schedule
        let tokensPerBatch = int64 options.BatchSize * int64 options.ContextLength
        let tokensPerStep = tokensPerBatch * int64 accumulation
        let fingerprint = Checkpoint.fingerprint data.Train
        let optionsJson = TrainerOptions.toJson options
        let checkpointRoot = options.OutputDirectory |> Option.map (fun d -> Path.Combine(d, "checkpoints"))
        let metricsPath = options.OutputDirectory |> Option.map (fun d -> Path.Combine(d, "metrics.jsonl"))
        let plotPath = options.OutputDirectory |> Option.map (fun d -> Path.Combine(d, "loss.png"))

        use optimizer =
            Optimizer.adamW
                { LearningRate = options.LearningRate; Beta1 = options.Beta1; Beta2 = options.Beta2; Epsilon = 1e-8
                  WeightDecay = options.WeightDecay; DecayAll = options.DecayAll }
                model
        let parameters = optimizer.NamedParameters |> Array.map snd

        // Where to start: a fresh run seeds torch's generator; a resume restores everything the checkpoint holds.
        let resumed =
            resumeFrom
            |> Option.map (fun path ->
                let directory = Checkpoint.resolve path
                checkResumable directory (Checkpoint.read directory) options data fingerprint batchesPerEpoch
                let state = Checkpoint.restore directory model optimizer
                directory, state)
        if resumed.IsNone then
            // A fresh run never mixes its checkpoints with another run's (pruning would delete the newer ones).
            match checkpointRoot with
            | Some root when (Checkpoint.list root).Length > 0 ->
                Errors.fail "'%s' already holds checkpoints of a run: resume it, or train into another directory" root
            | _ -> ()
            torch.manual_seed (int64 options.Seed) |> ignore

        let startStep = resumed |> Option.map (fun (_, s) -> s.Step) |> Option.defaultValue 0
        let mutable step = startStep
        let mutable bestValidationLoss = resumed |> Option.bind (fun (_, s) -> s.BestValidationLoss)
        let previousElapsed = resumed |> Option.map (fun (_, s) -> s.ElapsedSeconds) |> Option.defaultValue 0.0
        let mutable lastCheckpoint = resumed |> Option.map fst
        let mutable lastSavedStep = if resumed.IsSome then startStep else -1
        let mutable lastTrainLoss = nan
        let mutable cancelled = false
        let evaluations = ResizeArray<EvaluationRecord>()

        // A resumed run drops log lines of evaluations made after its checkpoint: they will be made again.
        match metricsPath with
        | Some path when File.Exists path ->
            if resumed.IsSome then Metrics.rewrite path (Metrics.read path |> Array.filter (fun r -> r.Step <= startStep))
            else File.Delete path
        | _ -> ()

        let parameterCount = parameters |> Array.sumBy (fun p -> p.numel ())
        onEvent (Started { TotalSteps = totalSteps; StartStep = startStep; BatchesPerEpoch = batchesPerEpoch
                           TokensPerStep = tokensPerStep; ParameterCount = parameterCount; ResumedFrom = resumed |> Option.map fst })

        let mutable orderEpoch = -1
        let mutable order: int[][] = [||]
        let batchAt (micro: int64) =
            let epoch = int (micro / int64 batchesPerEpoch)
            if epoch <> orderEpoch then
                order <- Dataset.batchIndices (Dataset.count trainWindows) loader epoch
                orderEpoch <- epoch
            order[int (micro % int64 batchesPerEpoch)]

        let clock = Stopwatch.StartNew()
        let elapsedSeconds () = previousElapsed + clock.Elapsed.TotalSeconds
        let sessionTokensPerSecond () =
            let seconds = clock.Elapsed.TotalSeconds
            if seconds > 0.0 then float (int64 (step - startStep) * tokensPerStep) / seconds else 0.0

        let saveCheckpoint (validationLoss: float option) =
            match checkpointRoot with
            | None -> ()
            | Some root ->
                let next = int64 step * int64 accumulation
                let state =
                    { Step = step
                      Epoch = int (next / int64 batchesPerEpoch) + 1
                      BatchInEpoch = int (next % int64 batchesPerEpoch)
                      BatchesPerEpoch = batchesPerEpoch
                      TokensSeen = int64 step * tokensPerStep
                      ElapsedSeconds = elapsedSeconds ()
                      ValidationLoss = validationLoss
                      BestValidationLoss = bestValidationLoss
                      DataSeed = options.Seed
                      DataFingerprint = fingerprint
                      Tokenizer = data.Tokenizer.Name
                      ModelConfiguration = data.ModelConfiguration
                      TrainingOptions = optionsJson }
                let directory = Checkpoint.save root options.KeepLast model optimizer state
                lastCheckpoint <- Some directory
                lastSavedStep <- step
                match metricsPath, plotPath with
                | Some log, Some png -> Metrics.plot png (int64 batchesPerEpoch * tokensPerBatch) (Metrics.read log)
                | _ -> ()
                onEvent (CheckpointSaved directory)

        model.train ()
        while step < totalSteps && not cancelled do
            if cancellation.IsCancellationRequested then cancelled <- true
            else
                let firstMicro = int64 step * int64 accumulation
                let learningRate = Schedule.learningRate schedule step
                // The step itself: forward, backward over the accumulated batches, clip, update.
                let trainLoss, gradientNorm =
                    use scope = torch.NewDisposeScope()
                    // Gradients on even when the caller runs us under no_grad (a script, a notebook).
                    use _ = torch.enable_grad ()
                    optimizer.LearningRate <- learningRate
                    optimizer.ZeroGrad()
                    let mutable lossSum = 0.0
                    for micro in firstMicro .. firstMicro + int64 accumulation - 1L do
                        use microScope = torch.NewDisposeScope()
                        let inputs, targets = Dataset.toTensors trainWindows (batchAt micro)
                        let loss = Loss.batch model inputs targets
                        lossSum <- lossSum + float (loss.item<float32> ())
                        // Mean over the accumulated batches: the gradient of one big batch.
                        let scaled = if accumulation = 1 then loss else loss / float accumulation
                        scaled.backward ()
                    let norm = options.GradientClip |> Option.map (fun maxNorm -> Optimizer.clipGradients maxNorm parameters)
                    optimizer.Step()
                    lossSum / float accumulation, norm
                step <- step + 1
                lastTrainLoss <- trainLoss
                // Bookkeeping after the step: progress, evaluation, epoch ends, checkpoint.
                use scope = torch.NewDisposeScope()
                let lastMicro = firstMicro + int64 accumulation - 1L
                let epoch = int (lastMicro / int64 batchesPerEpoch) + 1
                let sessionSteps = step - startStep
                let perStep = clock.Elapsed.TotalSeconds / float sessionSteps
                onEvent (
                    Stepped
                        { Step = step; TotalSteps = totalSteps; Epoch = epoch; Epochs = options.Epochs
                          TrainLoss = trainLoss; LearningRate = learningRate; GradientNorm = gradientNorm
                          TokensSeen = int64 step * tokensPerStep; TokensPerSecond = sessionTokensPerSecond ()
                          Elapsed = TimeSpan.FromSeconds(elapsedSeconds ())
                          Remaining = TimeSpan.FromSeconds(perStep * float (totalSteps - step)) })
                let checkpointDue =
                    checkpointRoot.IsSome
                    && (step = totalSteps || (options.CheckpointInterval > 0 && step % options.CheckpointInterval = 0))
                let mutable validationLoss = None
                if step = 1 || step % options.EvalInterval = 0 || step = totalSteps || checkpointDue then
                    let trainEval = evaluate model trainWindows options.BatchSize options.EvalBatches
                    let validationEval = evaluate model validationWindows options.BatchSize options.EvalBatches
                    validationLoss <- Some validationEval
                    if Double.IsFinite validationEval && (bestValidationLoss.IsNone || validationEval < bestValidationLoss.Value) then
                        bestValidationLoss <- Some validationEval
                    let record =
                        { Step = step; Epoch = epoch; TokensSeen = int64 step * tokensPerStep
                          TrainLoss = trainEval; ValidationLoss = validationEval; LearningRate = learningRate
                          ElapsedSeconds = elapsedSeconds (); TokensPerSecond = sessionTokensPerSecond () }
                    evaluations.Add record
                    metricsPath |> Option.iter (fun path -> Metrics.append path record)
                    onEvent (Evaluated record)
                // Epoch ends come before the checkpoint, so whatever a sample draws from the generator is saved.
                for micro in firstMicro .. lastMicro do
                    if (micro + 1L) % int64 batchesPerEpoch = 0L then
                        let ended = int (micro / int64 batchesPerEpoch) + 1
                        let text =
                            options.SamplePrompt
                            |> Option.filter (fun _ -> options.SampleTokens > 0)
                            |> Option.map (fun prompt -> sample model data.Tokenizer options.ContextLength prompt options.SampleTokens)
                        onEvent (EpochEnded(ended, text))
                if checkpointDue then saveCheckpoint validationLoss

        if cancelled && step > lastSavedStep && step > 0 then saveCheckpoint None
        { Steps = step
          TotalSteps = totalSteps
          TokensSeen = int64 step * tokensPerStep
          Cancelled = cancelled
          LastTrainLoss = lastTrainLoss
          BestValidationLoss = bestValidationLoss
          Checkpoint = lastCheckpoint
          Evaluations = evaluations.ToArray() }
