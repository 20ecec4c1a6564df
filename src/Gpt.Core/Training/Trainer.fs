namespace Gpt.Training

open System
open System.Diagnostics
open System.IO
open System.Text.Json
open System.Threading
open TorchSharp
open Gpt
open Gpt.Model
open Gpt.Text

/// The parts of an optimizer step, in order, for a caller that times them (the benchmark).
[<RequireQualifiedAccess>]
type StepPart =
    | ZeroGrad
    /// One micro-batch's loss (forward pass).
    | Forward
    /// One micro-batch's backward pass.
    | Backward
    | Clip
    | Update

/// Where a run stands between two steps. Each step makes a new one.
type TrainerState =
    { Step: int
      BestValidationLoss: float option
      /// Mean loss of the last step's batches (NaN before the first).
      LastTrainLoss: float
      LastCheckpoint: string option
      LastSavedStep: int
      Cancelled: bool
      /// This session's evaluations, newest first.
      Evaluations: EvaluationRecord list }

/// The one training loop (book ch. 5 with appendix D's warmup, cosine decay and clipping) for every task:
/// pretraining, classification and instruction fine-tuning differ only in their TrainingTask (objective, batches,
/// trainable parameters).
[<RequireQualifiedAccess>]
module Trainer =
    /// One optimizer step: zero the gradients, then for each of `accumulation` micro-batches compute its loss
    /// (`lossOf micro`, made inside a dispose scope of its own) and backpropagate it scaled by 1 / accumulation (the
    /// gradient of one big batch), clip the global gradient norm, update. Returns the mean loss and the norm before
    /// clipping. `observe` is told when each part ends.
    let step (optimizer: NamedAdamW) (learningRate: float) (clip: float option) (accumulation: int) (lossOf: int -> torch.Tensor)
             (observe: StepPart -> unit) : float * float option =
        use scope = torch.NewDisposeScope()
        // Gradients on even when the caller runs us under no_grad (a script, a notebook).
        use _ = torch.enable_grad ()
        optimizer.LearningRate <- learningRate
        optimizer.ZeroGrad()
        observe StepPart.ZeroGrad
        let microLoss micro =
            use microScope = torch.NewDisposeScope()
            let loss = lossOf micro
            observe StepPart.Forward
            let scaled = if accumulation = 1 then loss else loss / float accumulation
            scaled.backward ()
            observe StepPart.Backward
            float (loss.item<float32> ())
        let lossSum = Seq.sumBy microLoss (seq { 0 .. accumulation - 1 })
        // A non-finite loss makes non-finite gradients: applied, they would turn every weight into NaN, and the run's
        // later checkpoints (rotating out the good ones) with them. So the step stops here, nothing applied.
        if not (Double.IsFinite lossSum) then
            Errors.fail "the training loss is %s: the weights diverged (or held NaN already); this step was not applied. Lower the learning rate (--lr) or clip the gradients (--grad-clip)"
                (if Double.IsNaN lossSum then "NaN" else "infinite")
        let norm = clip |> Option.map (fun maxNorm -> Optimizer.clipGradients maxNorm (Array.map snd optimizer.NamedParameters))
        observe StepPart.Clip
        optimizer.Step()
        observe StepPart.Update
        lossSum / float accumulation, norm

    /// Mean loss (and accuracy, for objectives that score answers) over batches, in eval mode under no_grad; the
    /// model's previous mode is restored. Each batch is made and freed inside a dispose scope of its own.
    let evaluateBatches (model: torch.nn.Module) (objective: Objective<'Batch>) (batches: seq<'Batch>) : float * float option =
        let wasTraining = model.training
        model.eval ()
        try
            use _ = torch.no_grad ()
            use enumerator = batches.GetEnumerator()
            let next () =
                use scope = torch.NewDisposeScope()
                if enumerator.MoveNext() then Some(objective.Score enumerator.Current) else None
            let scores = List.unfold (fun () -> next () |> Option.map (fun score -> score, ())) ()
            let loss = if scores.IsEmpty then nan else scores |> List.averageBy _.Loss
            let count = scores |> List.sumBy _.Count
            loss, (if count > 0L then Some(float (scores |> List.sumBy _.Correct) / float count) else None)
        finally
            model.train wasTraining

    /// Mean loss over the first `batches` batches of windows (in order), in eval mode under no_grad; the model's
    /// previous mode is restored. The book's evaluate_model for one split.
    let evaluate (model: torch.nn.Module<torch.Tensor, torch.Tensor>) (windows: Dataset.SlidingWindows) (batchSize: int) (batches: int) : float =
        Errors.require (batches > 0) "the batch limit must be positive, found %d" batches
        let loader = { Dataset.defaultLoader with BatchSize = batchSize; Shuffle = false; DropLast = false }
        Dataset.batches windows loader 0 |> Seq.truncate batches |> evaluateBatches model (LanguageModelTask.objective model) |> fst

    /// What does not change during a run.
    type private Session<'Batch> =
        { Options: TrainerOptions
          Task: TrainingTask<'Batch>
          Optimizer: NamedAdamW
          Schedule: LearningRateSchedule
          Plan: TrainingPlan
          PreviousElapsed: float
          Clock: Stopwatch
          OnEvent: TrainingEvent -> unit
          Cancellation: CancellationToken }

    let private checkpointRoot (options: TrainerOptions) = options.OutputDirectory |> Option.map (fun d -> Path.Combine(d, "checkpoints"))
    let private metricsPath (options: TrainerOptions) = options.OutputDirectory |> Option.map (fun d -> Path.Combine(d, "metrics.jsonl"))

    /// Refuses to resume from a checkpoint whose data position would not carry over to this run.
    let checkResumable (directory: string) (stored: CheckpointState) (options: TrainerOptions) (task: TrainingTask<'Batch>) =
        if stored.Tokenizer <> task.Tokenizer then
            Errors.fail "checkpoint '%s' was trained with tokenizer '%s', this run uses '%s'" directory stored.Tokenizer task.Tokenizer
        if stored.DataFingerprint <> task.Data.Fingerprint then
            Errors.fail "checkpoint '%s' was trained on other data (training tokens fingerprint %s, this run's %s)"
                directory stored.DataFingerprint task.Data.Fingerprint
        use storedOptions = JsonDocument.Parse stored.TrainingOptions
        let same (name: string) (label: string) (value: int) =
            match storedOptions.RootElement.TryGetProperty name with
            | true, element when not (element.ValueKind = JsonValueKind.Number && fst (element.TryGetInt32()) && element.GetInt32() = value) ->
                Errors.fail "checkpoint '%s' was trained with %s %s, this run asks for %d: the data position would not carry over"
                    directory label (element.GetRawText()) value
            | _ -> ()
        same "batch_size" "batch size" options.BatchSize
        same "context_length" "context length" options.ContextLength
        same "stride" "stride" options.Stride
        same "seed" "seed" options.Seed
        same "gradient_accumulation" "gradient accumulation" options.GradientAccumulation
        if stored.BatchesPerEpoch <> task.Data.PerEpoch then
            Errors.fail "checkpoint '%s' has %d batches per epoch, this run has %d" directory stored.BatchesPerEpoch task.Data.PerEpoch

    /// Where to start: a fresh run seeds torch's generator (and refuses a folder holding another run's checkpoints);
    /// a resume restores everything the checkpoint holds.
    let private initialState (options: TrainerOptions) (task: TrainingTask<'Batch>) (optimizer: NamedAdamW) (resumeFrom: string option) =
        match resumeFrom with
        | Some path ->
            let directory = Checkpoint.resolve path
            checkResumable directory (Checkpoint.read directory) options task
            let stored = Checkpoint.restore directory task.Model optimizer
            { Step = stored.Step; BestValidationLoss = stored.BestValidationLoss; LastTrainLoss = nan; LastCheckpoint = Some directory
              LastSavedStep = stored.Step; Cancelled = false; Evaluations = [] }, Some(directory, stored)
        | None ->
            // A fresh run never mixes its checkpoints with another run's (pruning would delete the newer ones).
            match checkpointRoot options with
            | Some root when (Checkpoint.list root).Length > 0 ->
                Errors.fail "'%s' already holds checkpoints of a run: resume it, or train into another directory" root
            | _ -> ()
            torch.manual_seed (int64 options.Seed) |> ignore
            { Step = 0; BestValidationLoss = None; LastTrainLoss = nan; LastCheckpoint = None; LastSavedStep = -1
              Cancelled = false; Evaluations = [] }, None

    /// Checks the options against the task and computes the plan and the schedule.
    let private plan (options: TrainerOptions) (task: TrainingTask<'Batch>) (startStep: int) (resumedFrom: string option) =
        let accumulation = options.GradientAccumulation
        let possibleSteps = int ((int64 options.Epochs * int64 task.Data.PerEpoch) / int64 accumulation)
        if possibleSteps = 0 then
            Errors.fail "no optimizer step fits: the training split gives %d batches of %d x %d tokens per epoch, over %d epochs, and a step takes %d batches"
                task.Data.PerEpoch options.BatchSize options.ContextLength options.Epochs accumulation
        let totalSteps = options.MaxSteps |> Option.map (min possibleSteps) |> Option.defaultValue possibleSteps
        let schedule =
            { InitialLearningRate = options.InitialLearningRate; PeakLearningRate = options.LearningRate
              MinLearningRate = options.MinLearningRate; WarmupSteps = options.WarmupSteps; TotalSteps = totalSteps }
        Schedule.validate schedule
        let count (parameters: seq<torch.Tensor>) = parameters |> Seq.sumBy (fun p -> p.numel ())
        { TotalSteps = totalSteps; StartStep = startStep; BatchesPerEpoch = task.Data.PerEpoch
          TokensPerBatch = task.Data.TokensPerBatch
          TokensPerStep = task.Data.TokensPerBatch * int64 accumulation
          ParameterCount = count (task.Model.parameters () |> Seq.distinctBy _.Handle |> Seq.cast)
          TrainableParameterCount = count (task.Trainable |> Seq.map snd |> Seq.cast)
          ResumedFrom = resumedFrom }, schedule

    let private elapsedSeconds (session: Session<'Batch>) = session.PreviousElapsed + session.Clock.Elapsed.TotalSeconds

    let private sessionTokensPerSecond (session: Session<'Batch>) (step: int) =
        let seconds = session.Clock.Elapsed.TotalSeconds
        if seconds > 0.0 then float (int64 (step - session.Plan.StartStep) * session.Plan.TokensPerStep) / seconds else 0.0

    /// Evaluates both splits on the first EvalBatches batches, logs the record and reports it.
    let private evaluateSplits (session: Session<'Batch>) (state: TrainerState) (epoch: int) (learningRate: float) =
        let splitScore split =
            session.Task.Data.Evaluation split |> Seq.truncate session.Options.EvalBatches
            |> evaluateBatches session.Task.Model session.Task.Objective
        let trainLoss, trainAccuracy = splitScore Split.Training
        let validationLoss, validationAccuracy = splitScore Split.Validation
        let record =
            { Step = state.Step; Epoch = epoch; TokensSeen = int64 state.Step * session.Plan.TokensPerStep
              TrainLoss = trainLoss; ValidationLoss = validationLoss; TrainAccuracy = trainAccuracy
              ValidationAccuracy = validationAccuracy; LearningRate = learningRate
              ElapsedSeconds = elapsedSeconds session; TokensPerSecond = sessionTokensPerSecond session state.Step }
        metricsPath session.Options |> Option.iter (fun path -> Metrics.append path record)
        session.OnEvent(Evaluated record)
        let improves = Double.IsFinite validationLoss && state.BestValidationLoss |> Option.forall (fun best -> validationLoss < best)
        let best = if improves then Some validationLoss else state.BestValidationLoss
        { state with BestValidationLoss = best; Evaluations = record :: state.Evaluations }, validationLoss

    /// Writes a checkpoint of the state after its step (when the run has an output directory).
    let private saveCheckpoint (session: Session<'Batch>) (state: TrainerState) (validationLoss: float option) =
        match checkpointRoot session.Options with
        | None -> state
        | Some root ->
            let perEpoch = int64 session.Plan.BatchesPerEpoch
            let next = int64 state.Step * int64 session.Options.GradientAccumulation
            let stored =
                { Step = state.Step; Epoch = int (next / perEpoch) + 1; BatchInEpoch = int (next % perEpoch)
                  BatchesPerEpoch = session.Plan.BatchesPerEpoch; TokensSeen = int64 state.Step * session.Plan.TokensPerStep
                  ElapsedSeconds = elapsedSeconds session; ValidationLoss = validationLoss
                  BestValidationLoss = state.BestValidationLoss; DataSeed = session.Options.Seed
                  DataFingerprint = session.Task.Data.Fingerprint; Tokenizer = session.Task.Tokenizer
                  ModelConfiguration = session.Task.ModelConfiguration; TrainingOptions = TrainerOptions.toJson session.Options }
            let directory = Checkpoint.save root session.Options.KeepLast session.Task.Model session.Optimizer stored
            session.OnEvent(CheckpointSaved directory)
            { state with LastCheckpoint = Some directory; LastSavedStep = state.Step }

    /// The epochs that end with micro-batches first .. last, each with the task's sample.
    let private epochEnds (session: Session<'Batch>) (first: int64) (last: int64) =
        let perEpoch = int64 session.Plan.BatchesPerEpoch
        for micro in first .. last do
            if (micro + 1L) % perEpoch = 0L then
                session.OnEvent(EpochEnded(int (micro / perEpoch) + 1, session.Task.Sample |> Option.map (fun sample -> sample ())))

    /// The optimizer step of state.Step with its training batches, reported as Stepped.
    let private trainStep (session: Session<'Batch>) (state: TrainerState) =
        let options = session.Options
        let accumulation = options.GradientAccumulation
        let firstMicro = int64 state.Step * int64 accumulation
        let perEpoch = int64 session.Plan.BatchesPerEpoch
        let batchAt micro = session.Task.Data.Training (int (micro / perEpoch)) (int (micro % perEpoch))
        let learningRate = Schedule.learningRate session.Schedule state.Step
        let lossOf micro = session.Task.Objective.Loss Mode.Train (batchAt (firstMicro + int64 micro))
        let loss, norm =
            try step session.Optimizer learningRate options.GradientClip accumulation lossOf ignore
            with :? GptException as e ->
                let kept = state.LastCheckpoint |> Option.map (sprintf "; the last checkpoint, %s, is as it was") |> Option.defaultValue ""
                Errors.fail "step %d of %d: %s%s" (state.Step + 1) session.Plan.TotalSteps e.Message kept
        let stepped = state.Step + 1
        let perStep = session.Clock.Elapsed.TotalSeconds / float (stepped - session.Plan.StartStep)
        let epoch = int ((firstMicro + int64 accumulation - 1L) / perEpoch) + 1
        session.OnEvent(
            Stepped
                { Step = stepped; TotalSteps = session.Plan.TotalSteps; Epoch = epoch; Epochs = options.Epochs
                  TrainLoss = loss; LearningRate = learningRate; GradientNorm = norm
                  TokensSeen = int64 stepped * session.Plan.TokensPerStep; TokensPerSecond = sessionTokensPerSecond session stepped
                  Elapsed = TimeSpan.FromSeconds(elapsedSeconds session)
                  Remaining = TimeSpan.FromSeconds(perStep * float (session.Plan.TotalSteps - stepped)) })
        { state with Step = stepped; LastTrainLoss = loss }, (firstMicro, epoch, learningRate)

    /// One step and what follows it: evaluation (first step, every EvalInterval, the last, and with each checkpoint),
    /// epoch ends (before the checkpoint, so whatever a sample draws from the generator is saved), checkpoint.
    let private advance (session: Session<'Batch>) (state: TrainerState) : TrainerState =
        if session.Cancellation.IsCancellationRequested then { state with Cancelled = true }
        else
            // Event handlers run inside this scope: what they make without detaching is freed after the step.
            use scope = torch.NewDisposeScope()
            session.Task.Model.train ()
            let state, (firstMicro, epoch, learningRate) = trainStep session state
            let options = session.Options
            let total = session.Plan.TotalSteps
            let checkpointDue =
                options.OutputDirectory.IsSome
                && (state.Step = total || (options.CheckpointInterval > 0 && state.Step % options.CheckpointInterval = 0))
            let state, validationLoss =
                if state.Step = 1 || state.Step % options.EvalInterval = 0 || state.Step = total || checkpointDue then
                    let evaluated, loss = evaluateSplits session state epoch learningRate
                    evaluated, Some loss
                else state, None
            epochEnds session firstMicro (firstMicro + int64 options.GradientAccumulation - 1L)
            if checkpointDue then saveCheckpoint session state validationLoss else state

    /// Trains a task with `options`, from scratch or from the checkpoint `resumeFrom` (a checkpoint directory, a
    /// directory of checkpoints, or a run's output directory: the latest complete checkpoint is taken). Deterministic
    /// on the CPU for a seed: N steps, a checkpoint, a resume and N more steps give the same weights as 2N steps
    /// straight. On cancellation, writes a checkpoint (when OutputDirectory is set) and returns.
    let fit (options: TrainerOptions) (task: TrainingTask<'Batch>) (resumeFrom: string option) (onEvent: TrainingEvent -> unit)
            (cancellation: CancellationToken) : TrainingResult =
        TrainerOptions.validate options
        use optimizer =
            Optimizer.adamWOver
                { LearningRate = options.LearningRate; Beta1 = options.Beta1; Beta2 = options.Beta2; Epsilon = 1e-8
                  WeightDecay = options.WeightDecay; DecayAll = options.DecayAll }
                task.Trainable
        let state, resumed = initialState options task optimizer resumeFrom
        let plan, schedule = plan options task state.Step (resumed |> Option.map fst)
        // A resumed run drops log lines of evaluations made after its checkpoint: they will be made again.
        match metricsPath options with
        | Some path when File.Exists path ->
            if resumed.IsSome then Metrics.rewrite path (Metrics.read path |> Array.filter (fun r -> r.Step <= state.Step))
            else File.Delete path
        | _ -> ()
        onEvent (Started plan)
        let session =
            { Options = options; Task = task; Optimizer = optimizer; Schedule = schedule; Plan = plan
              PreviousElapsed = resumed |> Option.map (fun (_, s) -> s.ElapsedSeconds) |> Option.defaultValue 0.0
              Clock = Stopwatch.StartNew(); OnEvent = onEvent; Cancellation = cancellation }
        let mutable current = state
        while current.Step < plan.TotalSteps && not current.Cancelled do
            current <- advance session current
        let final =
            if current.Cancelled && current.Step > current.LastSavedStep && current.Step > 0 then saveCheckpoint session current None
            else current
        { Steps = final.Step; TotalSteps = plan.TotalSteps; TokensSeen = int64 final.Step * plan.TokensPerStep
          Cancelled = final.Cancelled; LastTrainLoss = final.LastTrainLoss; BestValidationLoss = final.BestValidationLoss
          Checkpoint = final.LastCheckpoint; Evaluations = final.Evaluations |> List.rev |> Array.ofList }

    /// Pretrains any ids -> logits model on token streams (LanguageModelTask): the book's chapter 5 loop.
    let train (options: TrainerOptions) (model: torch.nn.Module<torch.Tensor, torch.Tensor>) (data: TrainingData) (resumeFrom: string option)
              (onEvent: TrainingEvent -> unit) (cancellation: CancellationToken) : TrainingResult =
        TrainerOptions.validate options
        fit options (LanguageModelTask.create options model data) resumeFrom onEvent cancellation
