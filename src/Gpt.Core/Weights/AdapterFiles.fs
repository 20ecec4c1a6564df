namespace Gpt.Weights

open System
open System.Collections.Generic
open System.IO
open System.Text.Json
open System.Text.Json.Nodes
open TorchSharp
open Gpt
open Gpt.Model

/// LoRA adapters in Hugging Face PEFT's layout, a folder with adapter_config.json (peft_type LORA, r, lora_alpha,
/// target_modules, fan_in_fan_out true for GPT-2's Conv1D maps, base_model_name_or_path, modules_to_save) and
/// adapter_model.safetensors (`base_model.model.transformer.h.0.attn.c_attn.lora_A.weight` [r, in],
/// `…lora_B.weight` [out, r]; a fully trained head such as a classifier's `score` as `base_model.model.score.weight`).
[<RequireQualifiedAccess>]
module AdapterFiles =
    let configFileName = "adapter_config.json"
    let weightsFileName = "adapter_model.safetensors"
    let private prefix = "base_model.model."

    /// What adapter_config.json says.
    type AdapterConfig =
        { Settings: LoraSettings
          BaseModel: string option
          /// Fully trained modules saved with the adapter (a classifier's "score").
          ModulesToSave: string list
          TaskType: string }

    /// The PEFT name of an adapter's A or B for the map at a model path ("h.0.attn.c_attn", "lm_head").
    let private peftName (path: string) (matrix: string) =
        let body = if path = "lm_head" then path else "transformer." + path
        sprintf "%s%s.%s.weight" prefix body matrix

    /// The adapter_config.json text.
    let configJson (config: AdapterConfig) =
        let json = JsonObject()
        json["peft_type"] <- "LORA"
        json["task_type"] <- config.TaskType
        json["r"] <- config.Settings.Rank
        json["lora_alpha"] <- config.Settings.Alpha
        json["lora_dropout"] <- 0.0
        json["target_modules"] <- JsonArray(config.Settings.Targets |> List.map (fun t -> JsonValue.Create t :> JsonNode) |> Array.ofList)
        // GPT-2's maps are Conv1D ([in, out] weights) in transformers: PEFT must transpose the update when merging.
        json["fan_in_fan_out"] <- true
        json["bias"] <- "none"
        json["base_model_name_or_path"] <- (config.BaseModel |> Option.map (fun b -> JsonValue.Create b :> JsonNode) |> Option.toObj)
        json["modules_to_save"] <-
            (if config.ModulesToSave.IsEmpty then null
             else JsonArray(config.ModulesToSave |> List.map (fun m -> JsonValue.Create m :> JsonNode) |> Array.ofList) :> JsonNode)
        json["inference_mode"] <- true
        json.ToJsonString(JsonSerializerOptions(WriteIndented = true)) + "\n"

    /// Reads adapter_config.json (only LoRA adapters; the targets in our canonical names).
    let readConfig (path: string) : AdapterConfig =
        if not (File.Exists path) then Errors.fail "adapter config '%s' does not exist" path
        let node =
            try JsonNode.Parse(File.ReadAllText path)
            with :? JsonException as e -> Errors.fail "adapter config '%s' is not valid JSON: %s" path e.Message
        let fail format = Printf.ksprintf (fun message -> raise (GptException(sprintf "adapter config '%s': %s" path message))) format
        try
            match node["peft_type"] with
            | value when not (isNull value) && value.GetValue<string>() = "LORA" -> ()
            | other -> fail "peft_type %s is not supported, expected \"LORA\"" (if isNull other then "(none)" else other.ToJsonString())
            let rank = match node["r"] with null -> fail "\"r\" is missing" | v -> v.GetValue<int>()
            let alpha = match node["lora_alpha"] with null -> float rank | v -> v.GetValue<float>()
            let targets =
                match node["target_modules"] with
                | :? JsonArray as array -> [ for t in array -> t.GetValue<string>() ]
                | :? JsonValue as value when value.GetValueKind() = JsonValueKind.String ->
                    // PEFT reads a single string as a regular expression over full module names.
                    let text = value.GetValue<string>()
                    try LoraSettings.parseTargets text |> ignore; [ text ]
                    with :? GptException ->
                        fail "target_modules \"%s\" is a regular expression; only lists of module names are supported" text
                | null -> fail "\"target_modules\" is missing"
                | other -> fail "\"target_modules\" must be a list of module names, found %s" (other.ToJsonString())
            match node["fan_in_fan_out"] with
            | value when not (isNull value) && not (value.GetValue<bool>()) ->
                fail "fan_in_fan_out is false: GPT-2's maps are Conv1D, whose adapters PEFT writes with fan_in_fan_out true"
            | _ -> ()
            { Settings = LoraSettings.create rank (Some alpha) (Some targets)
              BaseModel = match node["base_model_name_or_path"] with null -> None | v -> Some(v.GetValue<string>())
              ModulesToSave = match node["modules_to_save"] with :? JsonArray as a -> [ for m in a -> m.GetValue<string>() ] | _ -> []
              TaskType = match node["task_type"] with null -> "CAUSAL_LM" | v -> v.GetValue<string>() }
        with
        | :? GptException -> reraise ()
        | e -> raise (GptException(sprintf "adapter config '%s' is not valid: %s" path e.Message, e))

    /// The tensors of a model's adapters under PEFT's names (and `extra` fully trained modules, already named).
    let tensors (model: GptModel) (extra: (string * torch.Tensor) list) : (string * torch.Tensor) list =
        [ for path, adapter in Lora.adapters model do
              yield peftName path "lora_A", adapter.A.detach ()
              yield peftName path "lora_B", adapter.B.detach ()
          for name, tensor in extra -> prefix + name, tensor.detach () ]

    /// Writes an adapter folder, atomically (each file under a temporary name, then renamed).
    let save (directory: string) (config: AdapterConfig) (model: GptModel) (extra: (string * torch.Tensor) list) =
        Directory.CreateDirectory directory |> ignore
        Safetensors.write (Path.Combine(directory, weightsFileName)) (tensors model extra)
        let path = Path.Combine(directory, configFileName)
        let temporary = path + ".tmp-" + Guid.NewGuid().ToString("N")
        File.WriteAllText(temporary, configJson config)
        File.Move(temporary, path, true)

    /// Attaches the adapters of a folder to a model (unmerged) and loads their weights; returns the config and the
    /// fully trained modules the file holds (by their model names, such as "score.weight"; the caller owns them).
    /// Shapes, ranks and module names are checked against the model first.
    let load (directory: string) (model: GptModel) : AdapterConfig * (string * torch.Tensor) list =
        if not (Directory.Exists directory) then Errors.fail "adapter folder '%s' does not exist" directory
        let config = readConfig (Path.Combine(directory, configFileName))
        let file = Path.Combine(directory, weightsFileName)
        let stored = Safetensors.read file
        try
            let attached = Lora.attach config.Settings 0L model
            let slots =
                [ for path, adapter in attached do
                      yield { StateDict.Name = peftName path "lora_A"; StateDict.Destination = adapter.A; StateDict.Layout = StateDict.Exact }
                      yield { StateDict.Name = peftName path "lora_B"; StateDict.Destination = adapter.B; StateDict.Layout = StateDict.Exact } ]
            let known = slots |> List.map _.Name |> HashSet
            let extra = stored |> Map.filter (fun name _ -> not (known.Contains name))
            let unknownModules = extra |> Map.toList |> List.map fst |> List.filter (fun n -> not (n.StartsWith prefix) || n.Contains ".lora_")
            if not unknownModules.IsEmpty then
                Errors.fail "adapter '%s': tensors for modules the config does not name (rank %d, targets %s): %s" file config.Settings.Rank
                    (String.Join(", ", config.Settings.Targets)) (String.Join(", ", unknownModules |> List.truncate 5))
            let adapterTensors = stored |> Map.filter (fun name _ -> known.Contains name) |> Dictionary
            StateDict.copy (sprintf "adapter '%s'" file) "tensors" id slots adapterTensors
            for KeyValue(_, tensor) in adapterTensors do tensor.Dispose()
            config, [ for KeyValue(name, tensor) in extra -> name.Substring prefix.Length, tensor ]
        with _ ->
            for KeyValue(_, tensor) in stored do tensor.Dispose()
            reraise ()

    /// The file beside a classifier's adapter with its labels, padding token and pooling (a Hugging Face
    /// GPT2ForSequenceClassification config.json): what a classifier needs besides a language-model base.
    let classifierFileName = "classifier_config.json"

    /// Writes a classifier's adapter folder: the body's adapters, the head in full (modules_to_save ["score"],
    /// task SEQ_CLS) and classifier_config.json.
    let saveClassifier (directory: string) (settings: LoraSettings) (baseModel: string option) (classifier: GptClassifier) =
        save directory { Settings = settings; BaseModel = baseModel; ModulesToSave = [ "score" ]; TaskType = "SEQ_CLS" }
            classifier.Body [ "score.weight", classifier.Score.weight ]
        let path = Path.Combine(directory, classifierFileName)
        let temporary = path + ".tmp-" + Guid.NewGuid().ToString("N")
        File.WriteAllText(temporary, ClassifierFiles.configJson classifier.Config)
        File.Move(temporary, path, true)

    /// The base model an adapter names (base_model_name_or_path): a folder or file relative to the adapter's own
    /// folder when there is one there, otherwise as written (a Hugging Face id or a path from the working folder).
    let baseOf (directory: string) : string option =
        (readConfig (Path.Combine(directory, configFileName))).BaseModel
        |> Option.filter (String.IsNullOrWhiteSpace >> not)
        |> Option.map (fun b ->
            let beside = Path.GetFullPath(Path.Combine(directory, b))
            if not (Path.IsPathRooted b) && (Directory.Exists beside || File.Exists beside) then beside else b)

    let private baseOrFail (baseModel: string option) (directory: string) =
        match baseModel |> Option.orElse (baseOf directory) with
        | Some b -> b
        | None -> Errors.fail "adapter '%s' names no base model (base_model_name_or_path): give the base model (--model)" directory

    /// Whether an adapter folder is a classifier's (task SEQ_CLS, or a classifier_config.json beside it).
    let isClassifierAdapter (directory: string) =
        (readConfig (Path.Combine(directory, configFileName))).TaskType = "SEQ_CLS"
        || File.Exists(Path.Combine(directory, classifierFileName))

    /// A language model with an adapter merged into its weights: the base (None: the adapter's
    /// base_model_name_or_path) loaded from any model source, the adapter attached and merged. Eval mode.
    let loadMerged (baseModel: string option) (directory: string) : GptModel =
        if isClassifierAdapter directory then
            Errors.fail "adapter '%s' is a classifier's (task SEQ_CLS): use it to classify (gpt classify --adapter)" directory
        use model = ModelSource.load (baseOrFail baseModel directory)
        let _, extra = load directory model
        for _, tensor in extra do tensor.Dispose()
        Lora.merged model

    /// A classifier from a base and an adapter folder, merged. The base is a saved classifier (its head is
    /// replaced by the adapter's `score`) or a language model (labels from the adapter's classifier_config.json).
    let loadClassifier (baseModel: string option) (directory: string) : GptClassifier =
        let source = baseOrFail baseModel directory
        let classifier =
            if Directory.Exists source && ClassifierFiles.isClassifier source then ClassifierFiles.load source
            else
                let file = Path.Combine(directory, classifierFileName)
                if not (File.Exists file) then
                    Errors.fail "adapter '%s' has no %s and its base '%s' is a language model, not a classifier: nothing gives the labels" directory classifierFileName source
                let saved = ClassifierFiles.readConfig file
                use model = ModelSource.load source
                ClassifierFiles.fromLanguageModel model saved.Labels saved.PadTokenId saved.Pooling 0.0 0L
        try
            let config, extra = load directory classifier.Body
            try
                match extra |> List.tryFind (fun (name, _) -> name = "score.weight") with
                | Some(_, score) ->
                    let expected = classifier.Score.weight.shape
                    if score.shape <> expected then
                        Errors.fail "adapter '%s': score.weight has shape [%s], the classifier's head is [%s]" directory
                            (String.Join(", ", score.shape)) (String.Join(", ", expected))
                    use _ = torch.no_grad ()
                    classifier.Score.weight.copy_ score |> ignore
                | None when List.contains "score" config.ModulesToSave ->
                    Errors.fail "adapter '%s' names score in modules_to_save but holds no score.weight" directory
                | None -> ()
                let merged = Lora.mergedClassifier classifier
                classifier.Dispose()
                merged
            finally
                for _, tensor in extra do tensor.Dispose()
        with _ ->
            classifier.Dispose()
            reraise ()

    /// Writes a base with an adapter merged into it as a plain model folder (Hugging Face layout; a classifier when
    /// the adapter or the base is one), atomically. Returns true for a classifier.
    let merge (baseModel: string option) (directory: string) (output: string) : bool =
        let source = baseOrFail baseModel directory
        if isClassifierAdapter directory || (Directory.Exists source && ClassifierFiles.isClassifier source) then
            use classifier = loadClassifier (Some source) directory
            ClassifierFiles.save output classifier
            true
        else
            use model = loadMerged (Some source) directory
            Pretrained.save output model
            false
