namespace Gpt.Weights

open System
open System.Collections.Generic
open System.IO
open System.Text.Json
open System.Text.Json.Nodes
open TorchSharp
open Gpt
open Gpt.Model

/// Classifiers in Hugging Face's GPT2ForSequenceClassification layout: config.json with `architectures`,
/// `num_labels`, `id2label`, `label2id` and `pad_token_id` (plus our `classifier_pooling`), and model.safetensors with
/// the body under `transformer.` (GPT-2's names, Conv1D weights [in, out]) and `score.weight` (labels, C).
[<RequireQualifiedAccess>]
module ClassifierFiles =
    let architecture = "GPT2ForSequenceClassification"

    /// The config.json text: the body's GPT-2 keys and the classifier's.
    let configJson (config: ClassifierConfig) : string =
        let json = JsonNode.Parse(Pretrained.configJson config.Body).AsObject()
        json["architectures"] <- JsonArray(JsonValue.Create architecture)
        json["num_labels"] <- config.Labels.Length
        let id2label = JsonObject()
        let label2id = JsonObject()
        config.Labels |> Array.iteri (fun id label -> id2label[string id] <- label; label2id[label] <- id)
        json["id2label"] <- id2label
        json["label2id"] <- label2id
        json["pad_token_id"] <- config.PadTokenId
        json["classifier_pooling"] <- config.Pooling.Name
        json.ToJsonString(JsonSerializerOptions(WriteIndented = true)) + "\n"

    /// The most labels a classifier's config.json may declare (num_labels is read before anything else is checked).
    let maxLabels = 100_000

    /// The labels in id order from id2label, checked against num_labels and label2id.
    let private labelsOf (fields: Pretrained.ConfigFields) (path: string) =
        let count = fields.Required [ "num_labels" ]
        if count < 0 || count > maxLabels then
            Errors.fail "config '%s': num_labels %d is outside 2..%d" path count maxLabels
        let labels =
            match fields.TryField "id2label" with
            | Some value when value.ValueKind = JsonValueKind.Object ->
                let byId = Dictionary<int, string>()
                for item in value.EnumerateObject() do
                    match Int32.TryParse item.Name, item.Value.ValueKind with
                    | (true, id), JsonValueKind.String -> byId[id] <- item.Value.GetString()
                    | _ -> Errors.fail "config '%s': id2label entry \"%s\" must map a label id to a name" path item.Name
                Array.init count (fun id ->
                    match byId.TryGetValue id with
                    | true, label -> label
                    | _ -> Errors.fail "config '%s': id2label has no label for id %d of %d" path id count)
            | _ -> Array.init count (sprintf "LABEL_%d") // transformers' default names
        match fields.TryField "label2id" with
        | Some value when value.ValueKind = JsonValueKind.Object ->
            labels |> Array.iteri (fun id label ->
                match value.TryGetProperty label with
                | true, v when v.ValueKind = JsonValueKind.Number && (match v.TryGetInt32() with | true, n -> n = id | _ -> false) -> ()
                | _ -> Errors.fail "config '%s': label2id does not map '%s' to %d as id2label does" path label id)
        | _ -> ()
        labels

    /// Whether a folder holds a classifier (its config.json names GPT2ForSequenceClassification).
    let isClassifier (directory: string) =
        let path = Path.Combine(directory, Pretrained.configFileName)
        File.Exists path
        && Pretrained.parseWith path (Pretrained.readConfigText path) (fun fields -> List.contains architecture (Pretrained.architecturesOf fields))

    /// A classifier's config.json.
    let readConfig (path: string) : ClassifierConfig =
        Pretrained.parseWith path (Pretrained.readConfigText path) (fun fields ->
            if not (List.contains architecture (Pretrained.architecturesOf fields)) then
                Errors.fail "config '%s' is not a classifier: expected \"architectures\": [\"%s\"] (a language model is fine-tuned into one with gpt finetune classify)" path architecture
            let body = Pretrained.configOf fields
            let config =
                { Body = { body with TiedHead = true }
                  Labels = labelsOf fields path
                  PadTokenId = fields.Optional("pad_token_id", fields.Integer, min 50256 (body.VocabSize - 1))
                  Pooling =
                    match fields.TryField "classifier_pooling" with
                    | Some value when value.ValueKind = JsonValueKind.String -> Pooling.Parse(value.GetString())
                    | _ -> Pooling.LastToken }
            try ClassifierConfig.validate config
            with :? GptException as e -> Errors.fail "config '%s': %s" path e.Message
            config)

    /// The classifier's tensors under Hugging Face's names: the body's (Pretrained.toTensors) under `transformer.`,
    /// then `score.weight`.
    let toTensors (classifier: GptClassifier) : (string * torch.Tensor) list =
        [ for name, tensor in Pretrained.toTensors classifier.Body -> "transformer." + name, tensor
          yield "score.weight", classifier.Score.weight.detach () ]

    /// Builds a classifier from its configuration and tensors in the layout above (body names with or without
    /// `transformer.`). Eval mode.
    let fromTensors (source: string) (config: ClassifierConfig) (tensors: (string * torch.Tensor) list) : GptClassifier =
        let score, body = tensors |> List.partition (fun (name, _) -> name = "score.weight")
        let scoreWeight =
            match score with
            | [ _, weight ] when weight.shape = [| int64 config.Labels.Length; int64 config.Body.EmbeddingDim |] -> weight
            | [ _, weight ] ->
                Errors.fail "checkpoint '%s': tensor 'score.weight' has shape %s, expected [%d, %d] (labels, embedding dimension)"
                    source (Errors.shapeText weight.shape) config.Labels.Length config.Body.EmbeddingDim
            | _ -> Errors.fail "checkpoint '%s': missing keys: score.weight (the classification head)" source
        let model = Pretrained.fromTensors source config.Body body
        let head = torch.nn.Linear(int64 config.Body.EmbeddingDim, int64 config.Labels.Length, hasBias = false)
        (use _ = torch.no_grad ()
         head.weight.copy_ scoreWeight |> ignore)
        let classifier = new GptClassifier({ config with Body = model.Config }, model, head)
        classifier.eval ()
        classifier

    /// What is wrong with tensors a file describes (see Pretrained.describedProblems) for a classifier: the body's
    /// problems and the head's.
    let describedProblems (config: ClassifierConfig) (described: (string * string * bool * int64[]) list) : string list =
        let score, body = described |> List.partition (fun (name, _, _, _) -> name = "score.weight")
        let expected = [| int64 config.Labels.Length; int64 config.Body.EmbeddingDim |]
        [ yield! Pretrained.describedProblems config.Body body
          match score with
          | [ _, _, true, shape ] when shape = expected -> ()
          | [ _, dtype, false, _ ] -> yield sprintf "tensor 'score.weight' has dtype %s, expected a floating-point dtype" dtype
          | [ _, _, _, shape ] ->
              yield sprintf "tensor 'score.weight' has shape %s, expected [%d, %d] (labels, embedding dimension)"
                        (Errors.shapeText shape) config.Labels.Length config.Body.EmbeddingDim
          | _ -> yield "missing keys: score.weight (the classification head)" ]

    /// Loads a classifier folder (config.json + model.safetensors) with another pooling than its own when given. The
    /// configuration, then the safetensors header against it and the memory, are checked before any tensor is read;
    /// the weights must be finite unless the options allow otherwise. Eval mode.
    let loadFrom (options: LoadOptions) (pooling: Pooling option) (directory: string) : GptClassifier =
        if not (Directory.Exists directory) then Errors.fail "model directory '%s' does not exist" directory
        let saved = readConfig (Path.Combine(directory, Pretrained.configFileName))
        let config = { saved with Pooling = defaultArg pooling saved.Pooling }
        let check source described =
            match describedProblems config described with
            | [] -> ModelMemory.require (sprintf "checkpoint '%s'" source) config.Body
            | problems -> Errors.fail "checkpoint '%s': %s" source (String.concat "; " problems)
        let source, tensors = Pretrained.readTensorsChecked check directory
        try
            check source (Pretrained.describeTensors tensors)
            Pretrained.checkFinite options source tensors
            fromTensors source config tensors
        finally
            for _, tensor in tensors do tensor.Dispose()

    /// Loads a classifier folder with another pooling than its own when given (non-finite weights refused). Eval mode.
    let loadWith (pooling: Pooling option) (directory: string) : GptClassifier = loadFrom LoadOptions.defaults pooling directory

    /// Loads a classifier folder (config.json + model.safetensors). Eval mode.
    let load (directory: string) : GptClassifier = loadWith None directory

    /// Writes a classifier folder, atomically.
    let save (directory: string) (classifier: GptClassifier) =
        Pretrained.writeDirectory directory (configJson classifier.Config) (fun () -> toTensors classifier)

    /// A classifier with a language model's body and a new head (seeded): the start of classification fine-tuning.
    /// The body gets the classifier's dropout rate; the language model's output head is left behind.
    let fromLanguageModel (model: GptModel) (labels: string[]) (padTokenId: int) (pooling: Pooling) (dropRate: float) (seed: int64) =
        let config = { Body = { model.Config with TiedHead = true; DropRate = dropRate }; Labels = labels; PadTokenId = padTokenId; Pooling = pooling }
        ClassifierConfig.validate config
        let body = GptModel.Uninitialised config.Body
        try
            let source = model.state_dict ()
            let slots = StateDict.slotsOf (fun _ -> StateDict.Exact) body
            let stored = Dictionary<string, torch.Tensor>()
            for slot in slots do stored[slot.Name] <- source[slot.Name]
            StateDict.copy "the language model" "keys" id slots stored
            new GptClassifier(config, body, GptClassifier.NewHead(config, seed))
        with _ ->
            body.Dispose()
            reraise ()
