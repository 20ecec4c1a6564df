namespace Gpt.Training

// What a training run is made of, as data: its options, the objective (batch -> loss), the batches, the parameters
// it trains, and what it reports. Pretraining, classification and instruction fine-tuning are different tasks for
// the one loop in Trainer.fs.

open System
open System.Text.Json
open TorchSharp
open TorchSharp.Modules
open Gpt
open Gpt.Model
open Gpt.Text
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

/// How an evaluation scores one batch: its mean loss, and for objectives with a notion of a right answer
/// (classification), how many of its Count examples were predicted correctly (Count = 0 otherwise).
type BatchScore = { Loss: float; Correct: int64; Count: int64 }

/// What training minimises: the mean loss of a batch in a mode (differentiable in Train mode), and the score of a
/// batch in an evaluation (run in Eval mode under no_grad).
type Objective<'Batch> = { Loss: Mode -> 'Batch -> torch.Tensor; Score: 'Batch -> BatchScore }

/// Which split an evaluation reads.
[<RequireQualifiedAccess>]
type Split =
    | Training
    | Validation

/// The batches of a run. Batches are made on demand, inside the caller's dispose scope.
type Batches<'Batch> =
    { /// Training batches per epoch (an incomplete last batch is dropped).
      PerEpoch: int
      /// The training batch at `index` of `epoch` (both from 0), in that epoch's seeded order.
      Training: int -> int -> 'Batch
      /// The first batches of a split in order, for evaluation.
      Evaluation: Split -> seq<'Batch>
      /// Tokens a training batch holds (for throughput).
      TokensPerBatch: int64
      /// SHA-256 of the training examples: a resume on other data is refused.
      Fingerprint: string }

/// One training task: the model (its train/eval mode and state), the parameters to train (by name; the others must
/// be frozen: requires_grad false), the objective and the batches, an optional sample at each epoch end, and what a
/// checkpoint records to identify the run (the tokenizer's name and the model's configuration as JSON).
type TrainingTask<'Batch> =
    { Model: torch.nn.Module
      Trainable: (string * Parameter)[]
      Objective: Objective<'Batch>
      Data: Batches<'Batch>
      Sample: (unit -> string) option
      Tokenizer: string
      ModelConfiguration: string }

/// What a run will do, announced before its first step.
type TrainingPlan =
    { TotalSteps: int
      StartStep: int
      BatchesPerEpoch: int
      TokensPerBatch: int64
      TokensPerStep: int64
      /// Parameters of the whole model.
      ParameterCount: int64
      /// Parameters the run trains (the others are frozen).
      TrainableParameterCount: int64
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
    /// An epoch ended; the sample is the task's sample (a greedy continuation) when it has one. A handler may
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

/// Token streams to train a language model on and what a checkpoint must know about the model and the tokenizer.
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
        { Train = train; Validation = validation; Tokenizer = tokenizer; ModelConfiguration = Gpt.Weights.Pretrained.configJson config }

/// Next-token prediction (pretraining, book ch. 5) as a task.
[<RequireQualifiedAccess>]
module LanguageModelTask =
    /// Mean next-token cross-entropy of a batch of windows (Loss.batch: a GptModel's head is fused with the loss).
    let objective (model: torch.nn.Module<torch.Tensor, torch.Tensor>) : Objective<torch.Tensor * torch.Tensor> =
        let loss (_: Mode) (inputs, targets) = Loss.batch model inputs targets
        { Loss = loss
          Score = fun batch -> { Loss = float ((loss Mode.Eval batch).item<float32> ()); Correct = 0L; Count = 0L } }

    /// Sliding windows of both splits: training batches shuffled per epoch from the seed (incomplete last batch
    /// dropped), evaluation batches in order.
    let batches (options: TrainerOptions) (data: TrainingData) : Batches<torch.Tensor * torch.Tensor> =
        let needed = options.ContextLength + 1
        Errors.require (data.Train.Length >= needed)
            "the training split has %d tokens, at least %d are needed for context length %d" data.Train.Length needed options.ContextLength
        Errors.require (data.Validation.Length >= needed)
            "the validation split has %d tokens, at least %d are needed for context length %d" data.Validation.Length needed options.ContextLength
        let windows ids = Dataset.create ids options.ContextLength options.Stride
        let train, validation = windows data.Train, windows data.Validation
        let loader = { Dataset.defaultLoader with BatchSize = options.BatchSize; Shuffle = true; DropLast = true; Seed = options.Seed }
        // The order of the epoch last asked for: a shuffle of every window, made once per epoch.
        let order: (int * int[][]) ref = ref (-1, [||])
        let training (epoch: int) (index: int) =
            if fst order.Value <> epoch then order.Value <- (epoch, Dataset.batchIndices (Dataset.count train) loader epoch)
            let batches = snd order.Value
            Dataset.toTensors train batches[index]
        let evaluation split =
            let inOrder = { loader with Shuffle = false; DropLast = false }
            Dataset.batches (if split = Split.Training then train else validation) inOrder 0
        { PerEpoch = Dataset.batchCount train loader
          Training = training
          Evaluation = evaluation
          TokensPerBatch = int64 options.BatchSize * int64 options.ContextLength
          Fingerprint = Checkpoint.fingerprint data.Train }

    /// Greedy continuation of a prompt, returned with the prompt as text. A GptModel goes through the KV-cached
    /// Generator (up to the model's own context, stopping at the tokenizer's end-of-text token); any other
    /// ids → logits model through the same greedy loop without a cache, over the last contextLength tokens. Neither
    /// draws from torch's generator; the model's train/eval mode is restored.
    let sample (model: torch.nn.Module<torch.Tensor, torch.Tensor>) (tokenizer: ITokenizer) (contextLength: int) (prompt: string) (maxNewTokens: int) : string =
        let ids = tokenizer.Encode prompt
        if ids.Length = 0 then Errors.fail "the sample prompt '%s' encodes to no tokens" prompt
        let language, cached =
            match model with
            | :? GptModel as gpt -> LanguageModel.ofGpt gpt, true
            | _ -> LanguageModel.ofForward model tokenizer.VocabularySize contextLength, false
        let options =
            { GenerationOptions.defaults with
                MaxNewTokens = maxNewTokens; Temperature = 0.0; Seed = Some 0L; EndOfTextId = tokenizer.EndOfTextId; UseKvCache = cached }
        let completion = (Generator.generate language options [ ids ])[0]
        tokenizer.Decode(Array.append ids completion.Tokens)

    /// Pretraining `model` (any ids -> logits module; a GptModel gets the fused head) on token streams, every
    /// parameter that requires a gradient trained.
    let create (options: TrainerOptions) (model: torch.nn.Module<torch.Tensor, torch.Tensor>) (data: TrainingData) : TrainingTask<torch.Tensor * torch.Tensor> =
        match model with
        | :? GptModel as gpt ->
            let config = gpt.Config
            Errors.require (options.ContextLength <= config.ContextLength)
                "the training context length %d exceeds the model's context length %d" options.ContextLength config.ContextLength
            Errors.require (data.Tokenizer.VocabularySize <= config.VocabSize)
                "the tokenizer '%s' has %d tokens, more than the model's vocabulary of %d"
                data.Tokenizer.Name data.Tokenizer.VocabularySize config.VocabSize
        | _ -> ()
        let prompt = options.SamplePrompt |> Option.filter (fun _ -> options.SampleTokens > 0)
        { Model = model
          Trainable = Optimizer.trainable model
          Objective = objective model
          Data = batches options data
          Sample = prompt |> Option.map (fun p () -> sample model data.Tokenizer options.ContextLength p options.SampleTokens)
          Tokenizer = data.Tokenizer.Name
          ModelConfiguration = data.ModelConfiguration }
