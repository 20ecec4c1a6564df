namespace Gpt.FineTuning

// Instruction data for fine-tuning (book chapter 7): entries of instruction, input and output; the prompt styles;
// token ids; the book's collate function (end-of-text padding, -100 for every end-of-text target after the first,
// optional masking of the prompt, truncation); and the built-in instruction set.

open System
open System.IO
open System.Text.Json
open System.Text.Json.Nodes
open TorchSharp
open Gpt
open Gpt.Text

/// One instruction: what to do, an optional input, the expected output; where it came from ("entry 3 of file x").
type InstructionEntry = { Instruction: string; Input: string; Output: string; Where: string }

/// How an entry is turned into text.
[<RequireQualifiedAccess>]
type PromptStyle =
    /// The book's (Stanford Alpaca's): "Below is an instruction that describes a task. ...", "### Instruction:",
    /// "### Input:" only when there is an input, "### Response:".
    | Alpaca
    /// Phi-3's (the book's exercise 7.1): "<|user|>", the instruction and input, "<|assistant|>:".
    | Phi3

    member this.Name = match this with Alpaca -> "alpaca" | Phi3 -> "phi3"

    static member Parse(name: string) =
        match (if isNull name then "" else name.Trim().ToLowerInvariant()) with
        | "alpaca" -> Alpaca
        | "phi3" | "phi-3" -> Phi3
        | _ -> Errors.fail "unknown prompt style '%s': expected alpaca (the book's) or phi3" name

/// One entry as the model sees it: the ids of the prompt and the response, and how many of them are the prompt.
type InstructionExample = { Ids: int[]; PromptLength: int }

[<RequireQualifiedAccess>]
module InstructionData =
    /// The book's alpaca preamble.
    let alpacaPreamble = "Below is an instruction that describes a task. Write a response that appropriately completes the request."

    /// The prompt of an entry (the book's format_input; phi3: format_input_phi): what generation starts from.
    let prompt (style: PromptStyle) (entry: InstructionEntry) =
        match style with
        | PromptStyle.Alpaca ->
            alpacaPreamble + "\n\n### Instruction:\n" + entry.Instruction
            + (if String.IsNullOrEmpty entry.Input then "" else "\n\n### Input:\n" + entry.Input)
        | PromptStyle.Phi3 -> "<|user|>\n" + entry.Instruction + (if String.IsNullOrEmpty entry.Input then "" else "\n" + entry.Input)

    /// What separates the prompt from the response.
    let responseMarker (style: PromptStyle) =
        match style with
        | PromptStyle.Alpaca -> "\n\n### Response:\n"
        | PromptStyle.Phi3 -> "\n<|assistant|>:\n"

    /// The prompt, the response marker and the output: what the model is trained on.
    let fullText (style: PromptStyle) (entry: InstructionEntry) = prompt style entry + responseMarker style + entry.Output

    /// The response in a generated continuation of the prompt, as the book extracts it: the marker removed, then
    /// trimmed.
    let response (style: PromptStyle) (generated: string) =
        generated.Replace(responseMarker(style).Trim(), "").Trim()

    let private entryOf (where: string) (element: JsonElement) =
        if element.ValueKind <> JsonValueKind.Object then
            Errors.fail "%s: expected an object {\"instruction\", \"input\", \"output\"}, found %s" where (element.ValueKind.ToString().ToLowerInvariant())
        let text (key: string) (required: bool) =
            match element.TryGetProperty key with
            | true, value when value.ValueKind = JsonValueKind.String -> value.GetString()
            | true, value when value.ValueKind = JsonValueKind.Null && not required -> ""
            | true, value -> Errors.fail "%s: \"%s\" must be a string, found %s" where key (value.GetRawText())
            | _ when required -> Errors.fail "%s: \"%s\" is missing" where key
            | _ -> ""
        { Instruction = text "instruction" true; Input = text "input" false; Output = text "output" true; Where = where }

    /// Reads entries from a JSON list (the book's instruction-data.json) or JSON Lines; a malformed entry is one
    /// error naming its index. Strict UTF-8.
    let read (path: string) : InstructionEntry list =
        let text = (Corpus.readFile path).Text
        let trimmed = text.TrimStart()
        let where index = sprintf "file '%s' entry %d" path index
        if trimmed.StartsWith "[" then
            use document =
                try JsonDocument.Parse text
                with :? JsonException as e -> Errors.fail "file '%s' is not valid JSON: %s" path e.Message
            [ for index, element in document.RootElement.EnumerateArray() |> Seq.indexed -> entryOf (where index) element ]
        else
            [ for number, line in text.Split('\n') |> Array.indexed do
                  if not (String.IsNullOrWhiteSpace line) then
                      use document =
                          try JsonDocument.Parse line
                          with :? JsonException as e -> Errors.fail "file '%s' line %d is not a JSON object: %s" path (number + 1) e.Message
                      yield entryOf (sprintf "file '%s' line %d" path (number + 1)) document.RootElement ]

    /// Writes entries with each model response added (the book's instruction-data-with-response.json), atomically.
    let writeResponses (path: string) (entries: (InstructionEntry * string) seq) =
        let array = JsonArray()
        for entry, response in entries do
            let item = JsonObject()
            item["instruction"] <- entry.Instruction
            item["input"] <- entry.Input
            item["output"] <- entry.Output
            item["model_response"] <- response
            array.Add item
        let text = array.ToJsonString(JsonSerializerOptions(WriteIndented = true, Encoder = Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping)) + "\n"
        Gpt.Training.Metrics.writeAtomically path (fun temporary -> File.WriteAllText(temporary, text))

    /// Entries with the responses a file written by writeResponses holds.
    let readResponses (path: string) : (InstructionEntry * string) list =
        let text = (Corpus.readFile path).Text
        use document =
            try JsonDocument.Parse text
            with :? JsonException as e -> Errors.fail "file '%s' is not valid JSON: %s" path e.Message
        if document.RootElement.ValueKind <> JsonValueKind.Array then Errors.fail "file '%s': expected a JSON list of entries with \"model_response\"" path
        [ for index, element in document.RootElement.EnumerateArray() |> Seq.indexed ->
              let where = sprintf "file '%s' entry %d" path index
              let entry = entryOf where element
              match element.TryGetProperty "model_response" with
              | true, value when value.ValueKind = JsonValueKind.String -> entry, value.GetString()
              | _ -> Errors.fail "%s: \"model_response\" is missing (write it with gpt finetune instruct or gpt respond)" where ]

    /// Token ids of an entry's full text and the length of its prompt's ids.
    let encode (tokenizer: ITokenizer) (style: PromptStyle) (entry: InstructionEntry) : InstructionExample =
        { Ids = tokenizer.Encode(fullText style entry); PromptLength = (tokenizer.Encode(prompt style entry)).Length }

    /// The book's custom_collate_fn: every example gets one end-of-text id and the batch is padded with it to the
    /// longest + 1; inputs are the padded rows without their last id, targets without their first; every end-of-text
    /// target after the first of a row becomes ignoreIndex (the first stays: the model learns to stop); with
    /// maskPrompt (exercise 7.2) the targets of the prompt too; then both are cut to maxLength.
    let collate (endOfText: int) (ignoreIndex: int64) (maskPrompt: bool) (maxLength: int option) (examples: InstructionExample[]) =
        let longest = examples |> Array.map (fun e -> e.Ids.Length + 1) |> Array.max
        let width = longest - 1
        let rows =
            examples |> Array.map (fun example ->
                let padded = Array.init longest (fun i -> if i < example.Ids.Length then int64 example.Ids[i] else int64 endOfText)
                let targets = padded[1..]
                let endings = targets |> Array.indexed |> Array.filter (fun (_, id) -> id = int64 endOfText) |> Array.map fst
                for index in Array.skip 1 endings do targets[index] <- ignoreIndex
                if maskPrompt then
                    for index in 0 .. min (example.PromptLength - 2) (targets.Length - 1) do targets[index] <- ignoreIndex
                padded[.. width - 1], targets)
        let keep = maxLength |> Option.map (min width) |> Option.defaultValue width
        let tensor (pick: int64[] * int64[] -> int64[]) =
            torch.tensor(rows |> Array.collect (fun row -> Array.truncate keep (pick row))).view(int64 examples.Length, int64 keep)
        tensor fst, tensor snd

    // ---- the built-in instruction set ---------------------------------------------------------------------------

    let private nouns =
        [| "cat", "cats"; "boat", "boats"; "bell", "bells"; "tide", "tides"; "clock", "clocks"; "lamp", "lamps"; "rope", "ropes"
           "gull", "gulls"; "wave", "waves"; "door", "doors"; "box", "boxes"; "church", "churches"; "wish", "wishes"
           "glass", "glasses"; "fox", "foxes"; "city", "cities"; "story", "stories"; "harbor", "harbors"; "key", "keys"
           "child", "children"; "mouse", "mice"; "foot", "feet"; "tooth", "teeth"; "man", "men"; "leaf", "leaves"
           "knife", "knives"; "fish", "fish"; "sheep", "sheep"; "bird", "birds"; "house", "houses"; "ship", "ships" |]
    let private words =
        [| "apple"; "bread"; "coat"; "dock"; "eel"; "fog"; "gate"; "hill"; "ink"; "jar"; "kite"; "lane"; "mast"; "net"
           "oar"; "pier"; "quay"; "reef"; "sail"; "town"; "umbrella"; "vane"; "wharf"; "yard"; "zinc" |]
    let private opposites =
        [| "hot", "cold"; "big", "small"; "early", "late"; "high", "low"; "open", "closed"; "fast", "slow"; "light", "dark"
           "full", "empty"; "old", "new"; "wet", "dry"; "up", "down"; "day", "night"; "loud", "quiet"; "near", "far" |]

    /// A few hundred entries made by rules (seeded), so that instruction fine-tuning needs no download: plurals,
    /// opposites, capital letters, reversing and sorting short lists, adding small numbers, counting words. Every task
    /// has a single right answer, so exact match measures what the model learned.
    let builtIn (count: int) (seed: int) : InstructionEntry list =
        let random = Random(seed)
        let pick (items: 'T[]) = items[random.Next items.Length]
        let list n = Array.init n (fun _ -> pick words) |> Array.distinct
        let entry instruction input output = instruction, input, output
        let make task =
            match task with
            | 0 -> let noun, plural = pick nouns in entry "Give the plural of the noun." noun plural
            | 1 -> let word, opposite = pick opposites in entry "Name the opposite of the word." word opposite
            | 2 -> let word = pick words in entry "Write the word in capital letters." word (word.ToUpperInvariant())
            | 3 ->
                let items = list (3 + random.Next 2)
                entry "Reverse the list." (String.Join(", ", items)) (String.Join(", ", Array.rev items))
            | 4 ->
                let items = list (3 + random.Next 2)
                entry "Sort the words alphabetically." (String.Join(", ", items)) (String.Join(", ", Array.sort items))
            | 5 ->
                let a, b = random.Next 10, random.Next 10
                entry (sprintf "What is %d plus %d?" a b) "" (string (a + b))
            | _ ->
                let items = list (2 + random.Next 4)
                entry "How many words are in the list?" (String.Join(", ", items)) (string items.Length)
        List.init count (fun index ->
            let instruction, input, output = make (index % 7)
            { Instruction = instruction; Input = input; Output = output; Where = sprintf "built-in entry %d" index })

    // ---- automatic scores -----------------------------------------------------------------------------------------

    /// Lower case, punctuation and articles removed, whitespace collapsed (SQuAD's answer normalisation).
    let normalise (text: string) =
        let lower = text.ToLowerInvariant()
        let kept = String(lower |> Seq.map (fun c -> if Char.IsPunctuation c then ' ' else c) |> Array.ofSeq)
        kept.Split([| ' '; '\t'; '\n'; '\r' |], StringSplitOptions.RemoveEmptyEntries)
        |> Array.filter (fun w -> w <> "a" && w <> "an" && w <> "the")
        |> String.concat " "

    /// 1 when the normalised response equals the normalised expected output, else 0.
    let exactMatch (expected: string) (response: string) = if normalise expected = normalise response then 1.0 else 0.0

    /// The F1 of the normalised words of the response against the expected output's (SQuAD's token F1).
    let tokenF1 (expected: string) (response: string) =
        let words (text: string) = (normalise text).Split(' ', StringSplitOptions.RemoveEmptyEntries)
        let wanted, got = words expected, words response
        if wanted.Length = 0 || got.Length = 0 then (if wanted.Length = got.Length then 1.0 else 0.0)
        else
            let counts (ws: string[]) = ws |> Array.countBy id |> Map.ofArray
            let a, b = counts wanted, counts got
            let common = a |> Seq.sumBy (fun (KeyValue(w, n)) -> min n (b |> Map.tryFind w |> Option.defaultValue 0))
            if common = 0 then 0.0
            else
                let precision, recall = float common / float got.Length, float common / float wanted.Length
                2.0 * precision * recall / (precision + recall)
