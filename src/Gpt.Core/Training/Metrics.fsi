namespace Gpt.Training

/// One evaluation during training: a line of the JSONL log and a point of the loss plot.
type EvaluationRecord =
    {
      Step: int

      /// The epoch in progress, counting from 1.
      Epoch: int
      TokensSeen: int64

      /// Loss on the first evaluation batches of the training windows, in eval mode (no dropout), as the book's
      /// evaluate_model measures it.
      TrainLoss: float
      ValidationLoss: float

      /// Share of correct predictions on the evaluated training and validation batches, for objectives that have one
      /// (classification).
      TrainAccuracy: float option
      ValidationAccuracy: float option
      LearningRate: float
      ElapsedSeconds: float
      TokensPerSecond: float
    }

/// The training log: JSON Lines, one object per evaluation.
[<RequireQualifiedAccess>]
module Metrics =

    /// One record as a single-line JSON object with snake_case names; non-finite numbers become null.
    val toJson: record: EvaluationRecord -> string

    /// Parses a line written by toJson; `where` names the line in error messages.
    val ofJson: where: string -> line: string -> EvaluationRecord

    /// Appends one record as a line and flushes it to disk.
    val append: path: string -> record: EvaluationRecord -> unit

    /// The records of a log (none when it does not exist). A last line without its newline, cut short by a
    /// killed process, is ignored; any other bad line is an error naming it.
    val read: path: string -> EvaluationRecord array

    /// Writes a file by writing a temporary sibling and renaming it over the target, so that a reader never sees
    /// half a file.
    val writeAtomically: path: string -> write: (string -> unit) -> unit

    /// Replaces a log with the given records (a resumed run drops the evaluations made after its checkpoint).
    val rewrite: path: string -> records: EvaluationRecord seq -> unit
