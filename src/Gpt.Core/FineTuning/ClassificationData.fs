namespace Gpt.FineTuning

// Labelled texts for classification fine-tuning (book chapter 6): reading CSV, TSV, JSON Lines and the UCI SMS Spam
// Collection as downloaded; labels, seeded splits and balancing; token ids and padded batches.

open System
open System.IO
open System.Text
open System.Text.Json
open TorchSharp
open Gpt
open Gpt.Text

/// One labelled text and where it came from ("file line 12"), for error messages.
type LabelledText = { Text: string; Label: string; Where: string }

/// One example as the model sees it: token ids (truncated to the maximum length) and the label's id.
type ClassificationExample = { Ids: int[]; Label: int; Truncated: bool }

/// A padded batch: ids (B, T) int64 padded after each row's real length, and label ids (B).
type ClassificationBatch = { Ids: torch.Tensor; Lengths: int64[]; Labels: torch.Tensor }

/// Reading labelled texts.
[<RequireQualifiedAccess>]
module ClassificationData =
    /// The column names of the book's CSV files.
    let defaultTextColumn = "Text"
    let defaultLabelColumn = "Label"

    /// The rows of RFC 4180 CSV text (fields separated by `delimiter`, optionally in double quotes, "" inside quotes
    /// for a quote; quoted fields may span lines), each with the line it starts on.
    let parseCsv (where: string) (delimiter: char) (text: string) : (int * string[]) list =
        let rows = ResizeArray<int * string[]>()
        let fields = ResizeArray<string>()
        let field = StringBuilder()
        let mutable line = 1
        let mutable rowLine = 1
        let mutable i = 0
        let mutable quoted = false
        let mutable fieldStarted = false
        let endField () =
            fields.Add(field.ToString())
            field.Clear() |> ignore
            fieldStarted <- false
        let endRow () =
            endField ()
            if not (fields.Count = 1 && fields[0] = "") then rows.Add((rowLine, fields.ToArray()))
            fields.Clear()
            rowLine <- line
        while i < text.Length do
            let c = text[i]
            if quoted then
                if c = '"' && i + 1 < text.Length && text[i + 1] = '"' then
                    field.Append '"' |> ignore
                    i <- i + 1
                elif c = '"' then
                    quoted <- false
                else
                    if c = '\n' then line <- line + 1
                    field.Append c |> ignore
            elif c = '"' && not fieldStarted then
                quoted <- true
                fieldStarted <- true
            elif c = delimiter then
                endField ()
            elif c = '\n' then
                line <- line + 1
                endRow ()
            elif c <> '\r' || i + 1 >= text.Length || text[i + 1] <> '\n' then
                field.Append c |> ignore
                fieldStarted <- true
            i <- i + 1
        if quoted then Errors.fail "%s line %d: a quoted field is never closed" where rowLine
        if field.Length > 0 || fields.Count > 0 then endRow ()
        List.ofSeq rows

    /// Rows with a header: the texts and labels of the named columns (case-insensitive).
    let private fromHeader (path: string) (textColumn: string) (labelColumn: string) (rows: (int * string[]) list) =
        match rows with
        | [] -> Errors.fail "file '%s' is empty: expected a header with the columns '%s' and '%s'" path textColumn labelColumn
        | (_, header) :: body ->
            let column (name: string) =
                match header |> Array.tryFindIndex (fun h -> h.Trim().Equals(name, StringComparison.OrdinalIgnoreCase)) with
                | Some index -> index
                | None ->
                    Errors.fail "file '%s' line 1: no column '%s' in the header (found %s): name the columns with --text-column and --label-column"
                        path name (header |> Array.map (sprintf "'%s'") |> String.concat ", ")
            let textIndex, labelIndex = column textColumn, column labelColumn
            [ for line, fields in body ->
                  if fields.Length <= max textIndex labelIndex then
                      Errors.fail "file '%s' line %d: expected %d columns as in the header, found %d" path line header.Length fields.Length
                  { Text = fields[textIndex]; Label = fields[labelIndex].Trim(); Where = sprintf "file '%s' line %d" path line } ]

    /// JSON Lines: one object {"text": ..., "label": ...} per line (a number as label is read as its text).
    let private fromJsonLines (path: string) (textColumn: string) (labelColumn: string) (text: string) =
        let value (line: int) (root: JsonElement) (key: string) =
            let candidates = [ key; key.ToLowerInvariant() ]
            match candidates |> List.tryPick (fun k -> match root.TryGetProperty k with | true, v -> Some v | _ -> None) with
            | Some v when v.ValueKind = JsonValueKind.String -> v.GetString()
            | Some v when v.ValueKind = JsonValueKind.Number -> v.GetRawText()
            | Some v -> Errors.fail "file '%s' line %d: \"%s\" must be a string, found %s" path line key (v.GetRawText())
            | None -> Errors.fail "file '%s' line %d: the object has no \"%s\"" path line (key.ToLowerInvariant())
        [ for index, raw in text.Split('\n') |> Array.indexed do
              if not (String.IsNullOrWhiteSpace raw) then
                  let line = index + 1
                  use document =
                      try JsonDocument.Parse raw
                      with :? JsonException as e -> Errors.fail "file '%s' line %d: not a JSON object (%s)" path line e.Message
                  if document.RootElement.ValueKind <> JsonValueKind.Object then
                      Errors.fail "file '%s' line %d: expected a JSON object {\"text\": ..., \"label\": ...}" path line
                  yield { Text = value line document.RootElement textColumn; Label = (value line document.RootElement labelColumn).Trim()
                          Where = sprintf "file '%s' line %d" path line } ]

    /// The UCI SMS Spam Collection as downloaded: `label<TAB>text` on every line, no header, no quoting (one message per
    /// line; quotes are part of the text).
    let private fromLabelTabText (path: string) (text: string) =
        [ for index, raw in text.Split('\n') |> Array.indexed do
              let line = raw.TrimEnd '\r'
              if line.Length > 0 then
                  match line.IndexOf '\t' with
                  | -1 -> Errors.fail "file '%s' line %d: expected label<TAB>text (the SMS Spam Collection's layout)" path (index + 1)
                  | tab -> yield { Text = line.Substring(tab + 1); Label = line.Substring(0, tab).Trim(); Where = sprintf "file '%s' line %d" path (index + 1) } ]

    /// Reads labelled texts from CSV (.csv, with a header), TSV (.tsv, or tab-separated: with a header naming the
    /// columns, or headerless label<TAB>text as the SMS Spam Collection is), or JSON Lines (.jsonl). Strict UTF-8.
    /// Every text must be non-empty.
    let read (path: string) (textColumn: string) (labelColumn: string) : LabelledText list =
        let text = (Corpus.readFile path).Text
        let firstLine = text.Split('\n')[0]
        let hasHeader (delimiter: char) =
            let names = firstLine.TrimEnd('\r').Split(delimiter) |> Array.map (fun h -> h.Trim().Trim('"').ToLowerInvariant())
            Array.contains (textColumn.ToLowerInvariant()) names && Array.contains (labelColumn.ToLowerInvariant()) names
        let extension = Path.GetExtension(path).ToLowerInvariant()
        let texts =
            if extension = ".jsonl" || extension = ".json" then fromJsonLines path textColumn labelColumn text
            elif extension = ".csv" then fromHeader path textColumn labelColumn (parseCsv path ',' text)
            elif firstLine.Contains '\t' then
                if hasHeader '\t' then
                    fromHeader path textColumn labelColumn (text.Split('\n') |> Array.indexed |> Array.choose (fun (i, l) ->
                        let l = l.TrimEnd '\r' in if l.Length = 0 then None else Some(i + 1, l.Split('\t'))) |> List.ofArray)
                else fromLabelTabText path text
            else fromHeader path textColumn labelColumn (parseCsv path ',' text)
        match texts |> List.tryFind (fun t -> String.IsNullOrWhiteSpace t.Text) with
        | Some empty -> Errors.fail "%s: the text is empty" empty.Where
        | None -> ()
        match texts |> List.tryFind (fun t -> t.Label = "") with
        | Some empty -> Errors.fail "%s: the label is empty" empty.Where
        | None -> ()
        texts

    /// The built-in labelled set: 240 short messages written for this project ("Harbor Messages": 160 ham, 80
    /// spam, made from templates in the spirit of the SMS Spam Collection), so that fine-tuning needs no download.
    let builtIn: Lazy<LabelledText list> =
        lazy
            (let assembly = typeof<LabelledText>.Assembly
             use stream =
                 match assembly.GetManifestResourceStream "Gpt.Resources.messages.csv" with
                 | null -> Errors.fail "the built-in messages resource is missing from %s" assembly.FullName
                 | stream -> stream
             use reader = new StreamReader(stream, UTF8Encoding(false, true))
             fromHeader "built-in messages" defaultTextColumn defaultLabelColumn (parseCsv "built-in messages" ',' (reader.ReadToEnd())))

    /// The label names in id order: `given` (every text's label must be one of them), or the labels in order of first
    /// appearance.
    let labels (given: string list option) (texts: LabelledText seq) : string[] =
        match given with
        | Some names ->
            let names = names |> List.map (fun n -> n.Trim()) |> Array.ofList
            for t in texts do
                if not (Array.contains t.Label names) then
                    Errors.fail "%s: unknown label '%s', expected one of %s" t.Where t.Label (String.Join(", ", names))
            names
        | None -> texts |> Seq.map _.Label |> Seq.distinct |> Array.ofSeq

    /// A seeded shuffle (the same order on every machine).
    let shuffle (seed: int) (items: 'T list) : 'T list =
        let array = Array.ofList items
        let random = Random(seed)
        for i in array.Length - 1 .. -1 .. 1 do
            let j = random.Next(i + 1)
            let t = array[i]
            array[i] <- array[j]
            array[j] <- t
        List.ofArray array

    /// The book's random_split: shuffle (seeded), then the first `trainFraction` for training, the next
    /// `validationFraction` for validation, the rest for testing.
    let split (seed: int) (trainFraction: float) (validationFraction: float) (texts: LabelledText list) =
        Errors.require (trainFraction > 0.0 && validationFraction >= 0.0 && trainFraction + validationFraction <= 1.0)
            "the split must be training > 0, validation >= 0 and their sum <= 1, found %g, %g" trainFraction validationFraction
        let shuffled = shuffle seed texts
        let trainEnd = int (float shuffled.Length * trainFraction)
        let validationEnd = trainEnd + int (float shuffled.Length * validationFraction)
        List.take trainEnd shuffled, shuffled[trainEnd .. validationEnd - 1], List.skip validationEnd shuffled

    /// The book's create_balanced_dataset, for any number of labels: every label undersampled (seeded) to the count of
    /// the rarest, in file order.
    let balance (seed: int) (texts: LabelledText list) =
        let groups = texts |> List.groupBy _.Label
        let smallest = groups |> List.map (snd >> List.length) |> List.min
        let keep = Collections.Generic.HashSet<LabelledText>(HashIdentity.Reference)
        for index, (_, members) in List.indexed groups do
            for t in shuffle (seed + index) members |> List.truncate smallest do keep.Add t |> ignore
        texts |> List.filter keep.Contains

    /// Token ids and label ids, truncated to `maxLength` tokens.
    let encode (tokenizer: ITokenizer) (labels: string[]) (maxLength: int) (texts: LabelledText list) : ClassificationExample[] =
        [| for t in texts ->
               let ids = tokenizer.Encode t.Text
               if ids.Length = 0 then Errors.fail "%s: the text encodes to no tokens" t.Where
               match Array.tryFindIndex ((=) t.Label) labels with
               | None -> Errors.fail "%s: unknown label '%s', expected one of %s" t.Where t.Label (String.Join(", ", labels))
               | Some label -> { Ids = Array.truncate maxLength ids; Label = label; Truncated = ids.Length > maxLength } |]

    /// Pads examples into a batch: to `length` tokens when given (the book pads every text to the longest of the
    /// training set), otherwise to the longest of the batch.
    let collate (padTokenId: int) (length: int option) (examples: ClassificationExample[]) : ClassificationBatch =
        let width = length |> Option.defaultWith (fun () -> examples |> Array.map _.Ids.Length |> Array.max)
        let ids = Array.create (examples.Length * width) (int64 padTokenId)
        examples |> Array.iteri (fun row example ->
            Errors.require (example.Ids.Length <= width) "an example has %d tokens, more than the batch length %d" example.Ids.Length width
            example.Ids |> Array.iteri (fun t id -> ids[row * width + t] <- int64 id))
        { Ids = torch.tensor(ids).view(int64 examples.Length, int64 width)
          Lengths = examples |> Array.map (fun e -> int64 e.Ids.Length)
          Labels = torch.tensor(examples |> Array.map (fun e -> int64 e.Label)) }

    /// SHA-256 of the examples' ids and labels: a resume on other data is refused.
    let fingerprint (examples: ClassificationExample[]) =
        let ids = examples |> Array.collect (fun e -> Array.append [| e.Label; e.Ids.Length |] e.Ids)
        Dataset.fingerprint ids
