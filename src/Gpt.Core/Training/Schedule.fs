namespace Gpt.Training

open System
open Gpt

/// The learning-rate schedule of the book's appendix D: a linear warmup from an initial rate to the peak, then a
/// cosine decay from the peak to a minimum rate by the last step.
type LearningRateSchedule =
    { /// Rate at step 0, the start of the warmup.
      InitialLearningRate: float
      /// Rate at the end of the warmup, where the cosine decay starts.
      PeakLearningRate: float
      /// Rate the cosine decay ends at.
      MinLearningRate: float
      /// Steps of linear warmup (0: start at the peak).
      WarmupSteps: int
      /// Optimizer steps in the whole run.
      TotalSteps: int }

[<RequireQualifiedAccess>]
module Schedule =
    /// A constant rate: no warmup, no decay (the book's chapter 5 run).
    let constant (learningRate: float) (totalSteps: int) =
        { InitialLearningRate = learningRate; PeakLearningRate = learningRate; MinLearningRate = learningRate
          WarmupSteps = 0; TotalSteps = totalSteps }

    /// Fails with a clear message on an impossible schedule.
    let validate (schedule: LearningRateSchedule) =
        Errors.require (schedule.TotalSteps > 0) "the schedule needs at least one step, found %d" schedule.TotalSteps
        Errors.require (schedule.WarmupSteps >= 0) "warmup steps must not be negative, found %d" schedule.WarmupSteps
        Errors.require (schedule.InitialLearningRate >= 0.0 && schedule.MinLearningRate >= 0.0)
            "learning rates must not be negative: initial %g, minimum %g" schedule.InitialLearningRate schedule.MinLearningRate
        Errors.require (schedule.PeakLearningRate > 0.0) "the peak learning rate must be positive, found %g" schedule.PeakLearningRate
        Errors.require (schedule.MinLearningRate <= schedule.PeakLearningRate)
            "the minimum learning rate %g is above the peak %g" schedule.MinLearningRate schedule.PeakLearningRate

    /// The rate for optimizer step `step` (0-based), a pure function of the step, so a resumed run gets the same
    /// rates. As in appendix D: step s < warmup gets initial + s * (peak - initial) / warmup; after the warmup,
    /// progress p = (s - warmup) / (total - warmup) gives min + (peak - min) * (1 + cos(pi p)) / 2. Steps past
    /// the end stay at the minimum.
    let learningRate (schedule: LearningRateSchedule) (step: int) : float =
        Errors.require (step >= 0) "the step must not be negative, found %d" step
        if step < schedule.WarmupSteps then
            let increment = (schedule.PeakLearningRate - schedule.InitialLearningRate) / float schedule.WarmupSteps
            schedule.InitialLearningRate + float step * increment
        else
            let decaySteps = schedule.TotalSteps - schedule.WarmupSteps
            let progress = if decaySteps <= 0 then 1.0 else min 1.0 (float (step - schedule.WarmupSteps) / float decaySteps)
            schedule.MinLearningRate
            + (schedule.PeakLearningRate - schedule.MinLearningRate) * 0.5 * (1.0 + Math.Cos(Math.PI * progress))
