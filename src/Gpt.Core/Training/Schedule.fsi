namespace Gpt.Training

/// The learning-rate schedule of the book's appendix D: a linear warmup from an initial rate to the peak, then a
/// cosine decay from the peak to a minimum rate by the last step.
type LearningRateSchedule =
    {
      /// Rate at step 0, the start of the warmup.
      InitialLearningRate: float

      /// Rate at the end of the warmup, where the cosine decay starts.
      PeakLearningRate: float

      /// Rate the cosine decay ends at.
      MinLearningRate: float

      /// Steps of linear warmup (0: start at the peak).
      WarmupSteps: int

      /// Optimizer steps in the whole run.
      TotalSteps: int
    }

[<RequireQualifiedAccess>]
module Schedule =

    /// A constant rate: no warmup, no decay (the book's chapter 5 run).
    val constant:
      learningRate: float -> totalSteps: int -> LearningRateSchedule

    /// Fails with a clear message on an impossible schedule.
    val validate: schedule: LearningRateSchedule -> unit

    /// The rate for optimizer step `step` (0-based), a pure function of the step, so a resumed run gets the same
    /// rates. As in appendix D: step s < warmup gets initial + s * (peak - initial) / warmup; after the warmup,
    /// progress p = (s - warmup) / (total - warmup) gives min + (peak - min) * (1 + cos(pi p)) / 2. Steps past
    /// the end stay at the minimum.
    val learningRate: schedule: LearningRateSchedule -> step: int -> float
