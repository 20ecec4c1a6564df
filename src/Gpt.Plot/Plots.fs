namespace Gpt.Plot

// The book's figures for a training run, drawn with ScottPlot. Kept out of Gpt.Core so that the model core does not
// carry a plotting library and its native renderer: a run gets its plots by letting Plots.follow watch its reports.

open System
open System.IO
open Gpt
open Gpt.Training

[<RequireQualifiedAccess>]
module Plots =
    /// The name of the loss plot in a run folder.
    let lossFile = "loss.png"

    /// The name of the accuracy plot in a run folder (runs whose objective scores answers).
    let accuracyFile = "accuracy.png"

    /// A figure of two series (training, validation) against tokens seen, with the epochs marked on a top axis.
    let private figure (path: string) (title: string) (label: string) (tokensPerEpoch: int64) (records: EvaluationRecord[])
                       (train: EvaluationRecord -> float) (validation: EvaluationRecord -> float) =
        Errors.require (tokensPerEpoch > 0L) "tokens per epoch must be positive, found %d" tokensPerEpoch
        let series (value: EvaluationRecord -> float) =
            let points = records |> Array.filter (fun r -> Double.IsFinite(value r))
            points |> Array.map (fun r -> float r.TokensSeen), points |> Array.map value
        use plot = new ScottPlot.Plot()
        let trainX, trainY = series train
        let validationX, validationY = series validation
        let training = plot.Add.Scatter(trainX, trainY)
        training.LegendText <- "Training " + label.ToLowerInvariant()
        let validating = plot.Add.Scatter(validationX, validationY)
        validating.LegendText <- "Validation " + label.ToLowerInvariant()
        validating.LinePattern <- ScottPlot.LinePattern.Dashed
        plot.XLabel "Tokens seen"
        plot.YLabel label
        plot.ShowLegend(ScottPlot.Alignment.UpperRight) |> ignore
        let lastTokens = if records.Length = 0 then 0L else records |> Array.map _.TokensSeen |> Array.max
        let right = float (max lastTokens 1L) * 1.03
        let epochs = int (lastTokens / tokensPerEpoch)
        for epoch in 1 .. epochs do
            let line = plot.Add.VerticalLine(float (int64 epoch * tokensPerEpoch))
            line.LinePattern <- ScottPlot.LinePattern.Dotted
            line.Color <- ScottPlot.Colors.Gray
        // The epoch axis shares the token coordinate: a tick where each epoch ends. (Its labels say "epoch k"
        // instead of an axis title: ScottPlot 5.1 draws a top-axis title over the plot title.)
        let step = max 1 (epochs / 10 + 1)
        let ticks = ScottPlot.TickGenerators.NumericManual()
        for epoch in step .. step .. epochs do
            ticks.AddMajor(float (int64 epoch * tokensPerEpoch), sprintf "epoch %d" epoch)
        plot.Axes.Top.TickGenerator <- ticks
        plot.Title title
        plot.Axes.SetLimitsX(0.0, right, plot.Axes.Bottom)
        plot.Axes.SetLimitsX(0.0, right, plot.Axes.Top)
        let bytes = plot.GetImageBytes(800, 500, ScottPlot.ImageFormat.Png)
        Metrics.writeAtomically path (fun temporary -> File.WriteAllBytes(temporary, bytes))

    /// The book's figure 5.12: training and validation loss against tokens seen, with the epochs on a secondary top
    /// axis and a dotted line where each epoch ends. Written as a PNG, atomically.
    let loss (path: string) (tokensPerEpoch: int64) (records: EvaluationRecord seq) =
        figure path "Training and validation loss" "Loss" tokensPerEpoch (Array.ofSeq records) _.TrainLoss _.ValidationLoss

    /// The book's figure 6.17: training and validation accuracy against tokens seen (records without accuracy are
    /// left out).
    let accuracy (path: string) (tokensPerEpoch: int64) (records: EvaluationRecord seq) =
        let value (pick: EvaluationRecord -> float option) (r: EvaluationRecord) = pick r |> Option.defaultValue nan
        figure path "Training and validation accuracy" "Accuracy" tokensPerEpoch (Array.ofSeq records)
            (value _.TrainAccuracy) (value _.ValidationAccuracy)

    /// Draws a run folder's plots from its metrics.jsonl: loss.png, and accuracy.png when the run measured accuracy.
    let draw (runDirectory: string) (tokensPerEpoch: int64) =
        let records = Metrics.read (Path.Combine(runDirectory, "metrics.jsonl"))
        loss (Path.Combine(runDirectory, lossFile)) tokensPerEpoch records
        if records |> Array.exists _.ValidationAccuracy.IsSome then
            accuracy (Path.Combine(runDirectory, accuracyFile)) tokensPerEpoch records

    /// Passes a run's reports on to `next` and redraws the run's plots at every checkpoint.
    let follow (next: RunProgress -> unit) : RunProgress -> unit =
        fun progress ->
            match progress.Kind, progress.Path with
            | RunEventKind.Checkpoint, Some checkpoint ->
                draw (RunOptions.runDirectoryOf checkpoint) progress.TokensPerEpoch
            | _ -> ()
            next progress

    /// The same for the trainer's own events, for a run whose trainer writes into `outputDirectory`.
    let followTrainer (outputDirectory: string) (next: TrainingEvent -> unit) : TrainingEvent -> unit =
        let tokensPerEpoch = ref 0L
        fun event ->
            match event with
            | Started plan -> tokensPerEpoch.Value <- plan.TokensPerBatch * int64 plan.BatchesPerEpoch
            | CheckpointSaved _ -> draw outputDirectory tokensPerEpoch.Value
            | _ -> ()
            next event
