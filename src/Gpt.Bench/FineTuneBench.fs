namespace Gpt.Bench

open System
open System.Diagnostics
open TorchSharp
open Gpt
open Gpt.Kernels
open Gpt.Model
open Gpt.Training
open Gpt.FineTuning

/// Fine-tuning speed and memory: the classifier of book chapter 6 on gpt2-small, batches of 8 texts × 128 tokens,
/// the trainer's own step (Trainer.step) over the task's own objective and trainable set.
[<RequireQualifiedAccess>]
module FineTuneBench =
    type Result =
        { Trainable: string
          BatchSize: int
          SequenceLength: int
          Parameters: int64
          TrainableParameters: int64
          TokensPerSecond: float
          StepSeconds: float
          StepTimes: float[]
          PeakRssMb: float
          WarmupSteps: int
          TimedSteps: int }

    /// Fine-tunes a freshly initialised gpt2-small classifier (2 labels, last-token pooling) with the book's AdamW
    /// (5e-5, weight decay 0.1 on every trained parameter) on random token batches, `warmup` untimed and `steps` timed
    /// steps; the trainable set as `gpt finetune classify --trainable` names it.
    let classify (trainable: string) (batchSize: int) (length: int) (warmup: int) (steps: int) (seed: int) : Result =
        Errors.require (steps > 0) "timed steps must be positive, found %d" steps
        GC.Collect()
        GC.WaitForPendingFinalizers()
        NativeAllocator.releaseFreeMemory () |> ignore
        Measure.resetPeakRss ()
        let config = { Body = { GptConfig.gpt2Small with DropRate = 0.0 }; Labels = [| "ham"; "spam" |]; PadTokenId = 50256; Pooling = Pooling.LastToken }
        use classifier = new GptClassifier(config, int64 seed)
        let set = TrainableSet.Parse trainable
        let named = Classification.trainable set classifier
        use optimizer =
            Optimizer.adamWOver { Optimizer.defaults with LearningRate = 5e-5; DecayAll = true } named
        let objective = Classification.objective classifier
        let random = Random(seed)
        let batch () =
            let examples =
                Array.init batchSize (fun _ -> { Ids = Array.init length (fun _ -> random.Next 50256); Label = random.Next 2; Truncated = false })
            ClassificationData.collate config.PadTokenId None examples
        classifier.train ()
        let time () =
            let clock = Stopwatch.StartNew()
            Trainer.step optimizer 5e-5 None 1 (fun _ -> objective.Loss Mode.Train (batch ())) ignore |> ignore
            clock.Elapsed.TotalSeconds
        for _ in 1 .. warmup do time () |> ignore
        let times = Array.init steps (fun _ -> time ())
        let median = Measure.median times
        { Trainable = set.Name; BatchSize = batchSize; SequenceLength = length; Parameters = classifier.ParameterCount
          TrainableParameters = named |> Array.sumBy (fun (_, p) -> p.numel ()); TokensPerSecond = float (batchSize * length) / median
          StepSeconds = median; StepTimes = times; PeakRssMb = Measure.peakRssMb (); WarmupSteps = warmup; TimedSteps = steps }
