namespace Gpt.Training

open System
open System.IO
open System.Text
open System.Text.Json
open Gpt

/// One evaluation during training: a line of the JSONL log and a point of the loss plot.
type EvaluationRecord =
    { Step: int
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
      TokensPerSecond: float }

/// The training log: JSON Lines, one object per evaluation.
[<RequireQualifiedAccess>]
module Metrics =
    /// One record as a single-line JSON object with snake_case names; non-finite numbers become null.
    let toJson (record: EvaluationRecord) : string =
        use buffer = new MemoryStream()
        (use writer = new Utf8JsonWriter(buffer)
         let number (name: string) (value: float) =
             if Double.IsFinite value then writer.WriteNumber(name, value) else writer.WriteNull name
         writer.WriteStartObject()
         writer.WriteNumber("step", record.Step)
         writer.WriteNumber("epoch", record.Epoch)
         writer.WriteNumber("tokens_seen", record.TokensSeen)
         number "train_loss" record.TrainLoss
         number "val_loss" record.ValidationLoss
         record.TrainAccuracy |> Option.iter (number "train_accuracy")
         record.ValidationAccuracy |> Option.iter (number "val_accuracy")
         number "lr" record.LearningRate
         number "elapsed_s" record.ElapsedSeconds
         number "tokens_per_s" record.TokensPerSecond
         writer.WriteEndObject())
        Encoding.UTF8.GetString(buffer.ToArray())

    /// Parses a line written by toJson; `where` names the line in error messages.
    let ofJson (where: string) (line: string) : EvaluationRecord =
        use document =
            try JsonDocument.Parse line
            with :? JsonException as e -> raise (GptException(sprintf "%s: not a JSON object: %s" where e.Message, e))
        let root = document.RootElement
        let get (name: string) =
            match root.TryGetProperty name with
            | true, value -> value
            | _ -> Errors.fail "%s: property '%s' is missing" where name
        let number name =
            let value = get name
            match value.ValueKind with
            | JsonValueKind.Number -> value.GetDouble()
            | JsonValueKind.Null -> nan
            | _ -> Errors.fail "%s: property '%s' should be a number, found %s" where name (value.GetRawText())
        let optionalNumber (name: string) =
            match root.TryGetProperty name with
            | true, value when value.ValueKind = JsonValueKind.Number -> Some(value.GetDouble())
            | true, value when value.ValueKind <> JsonValueKind.Null ->
                Errors.fail "%s: property '%s' should be a number, found %s" where name (value.GetRawText())
            | _ -> None
        { Step = int (number "step")
          Epoch = int (number "epoch")
          TokensSeen = int64 (number "tokens_seen")
          TrainLoss = number "train_loss"
          ValidationLoss = number "val_loss"
          TrainAccuracy = optionalNumber "train_accuracy"
          ValidationAccuracy = optionalNumber "val_accuracy"
          LearningRate = number "lr"
          ElapsedSeconds = number "elapsed_s"
          TokensPerSecond = number "tokens_per_s" }

    /// Appends one record as a line and flushes it to disk.
    let append (path: string) (record: EvaluationRecord) =
        match Path.GetDirectoryName(Path.GetFullPath path) with
        | null -> ()
        | directory -> Directory.CreateDirectory directory |> ignore
        use stream = new FileStream(path, FileMode.Append, FileAccess.Write)
        let bytes = Encoding.UTF8.GetBytes(toJson record + "\n")
        stream.Write(bytes, 0, bytes.Length)
        stream.Flush(true)

    /// The records of a log (none when it does not exist). A last line without its newline, cut short by a
    /// killed process, is ignored; any other bad line is an error naming it.
    let read (path: string) : EvaluationRecord[] =
        if not (File.Exists path) then [||]
        else
            let text = File.ReadAllText path
            let lines = text.Split('\n')
            // The piece after the last '\n' is empty for a complete file, a partial record otherwise.
            lines[.. lines.Length - 2]
            |> Array.mapi (fun i line -> i, line)
            |> Array.filter (fun (_, line) -> not (String.IsNullOrWhiteSpace line))
            |> Array.map (fun (i, line) -> ofJson (sprintf "%s line %d" path (i + 1)) line)

    /// Writes a file by writing a temporary sibling and renaming it over the target, so that a reader never sees
    /// half a file.
    let writeAtomically (path: string) (write: string -> unit) =
        let full = Path.GetFullPath path
        let directory = Path.GetDirectoryName full |> Option.ofObj |> Option.defaultValue "."
        Directory.CreateDirectory directory |> ignore
        let temporary = Path.Combine(directory, sprintf ".%s.%s.tmp" (Path.GetFileName full) (Guid.NewGuid().ToString "N"))
        try
            write temporary
            File.Move(temporary, full, true)
        with _ ->
            (try File.Delete temporary with _ -> ())
            reraise ()

    /// Replaces a log with the given records (a resumed run drops the evaluations made after its checkpoint).
    let rewrite (path: string) (records: EvaluationRecord seq) =
        writeAtomically path (fun temporary ->
            use stream = new FileStream(temporary, FileMode.CreateNew, FileAccess.Write)
            for record in records do
                let bytes = Encoding.UTF8.GetBytes(toJson record + "\n")
                stream.Write(bytes, 0, bytes.Length)
            stream.Flush(true))
