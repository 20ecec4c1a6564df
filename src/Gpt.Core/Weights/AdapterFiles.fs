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

    /// The file beside a classifier's adapter with its labels, padding token and pooling (a Hugging Face
    /// GPT2ForSequenceClassification config.json): what a classifier needs besides a language-model base.
    let classifierFileName = "classifier_config.json"

    /// The model path of a PEFT tensor name and its matrix: "h.0.attn.c_attn", "lora_A" (None for other tensors).
    let internal adapterPathOf (name: string) =
        let body = if name.StartsWith prefix then name.Substring prefix.Length else name
        let parts = body.Split '.'
        if parts.Length >= 3 && parts[parts.Length - 1] = "weight" && parts[parts.Length - 2].StartsWith "lora_" then
            let path = String.Join(".", parts[.. parts.Length - 3])
            let path = if path.StartsWith "transformer." then path.Substring "transformer.".Length else path
            Some(path, parts[parts.Length - 2])
        else None

    /// The canonical target of a model path: "h.0.attn.c_attn" -> "attn.c_attn", "lm_head" -> "lm_head".
    let internal targetOf (path: string) =
        let parts = path.Split '.'
        if path = "lm_head" then Some "lm_head"
        elif parts.Length = 4 && parts[0] = "h" && fst (Int32.TryParse parts[1]) then Some(parts[2] + "." + parts[3])
        else None

/// A LoRA adapter in memory: its adapter_config.json, its tensors under PEFT's names (the lora_A [r, in] and lora_B
/// [out, r] of each adapted map, and modules trained in full such as a classifier's `score.weight`), and a
/// classifier's label configuration. Read from a folder, taken from a trained model, written, applied to a base
/// (unmerged) or merged into one. Owns its tensors: dispose it.
type Adapter internal (config: AdapterFiles.AdapterConfig, tensors: Map<string, torch.Tensor>, classifier: ClassifierConfig option) =
    member _.Config = config
    /// Rank, alpha and targets.
    member _.Settings = config.Settings
    /// Every tensor by its PEFT name (base_model.model.…).
    member _.Tensors = tensors
    /// A classifier's labels, padding token and pooling (classifier_config.json), when the adapter is a classifier's.
    member _.Classifier = classifier
    /// Whether the adapter belongs to a classifier (task SEQ_CLS, or a classifier configuration).
    member _.IsClassifier = config.TaskType = "SEQ_CLS" || classifier.IsSome
    /// Trainable parameters it holds (the adapters and the modules trained in full).
    member _.ParameterCount = tensors |> Map.fold (fun sum _ t -> sum + t.numel ()) 0L
    interface IDisposable with
        member _.Dispose() = for KeyValue(_, tensor) in tensors do tensor.Dispose()

[<RequireQualifiedAccess>]
module Adapter =
    let private prefix = "base_model.model."

    let private peftName (path: string) (matrix: string) =
        let body = if path = "lm_head" then path else "transformer." + path
        sprintf "%s%s.%s.weight" prefix body matrix

    /// The adapter of a model whose maps carry adapters (copies of A and B), with `extra` modules trained in full
    /// (by model name, such as "score.weight").
    let ofModel (config: AdapterFiles.AdapterConfig) (model: GptModel) (extra: (string * torch.Tensor) list) (classifier: ClassifierConfig option) =
        let adapters = Lora.adapters model
        if adapters.IsEmpty then Errors.fail "the model has no LoRA adapters"
        let tensors =
            [ for path, adapter in adapters do
                  yield peftName path "lora_A", adapter.A.detach().clone()
                  yield peftName path "lora_B", adapter.B.detach().clone()
              for name, tensor in extra -> prefix + name, tensor.detach().clone() ]
        new Adapter(config, Map.ofList tensors, classifier)

    /// A classifier's adapter: its body's adapters and its head in full (modules_to_save ["score"], task SEQ_CLS).
    let ofClassifier (settings: LoraSettings) (baseModel: string option) (classifier: GptClassifier) =
        ofModel { Settings = settings; BaseModel = baseModel; ModulesToSave = [ "score" ]; TaskType = "SEQ_CLS" } classifier.Body
            [ "score.weight", classifier.Score.weight ] (Some classifier.Config)

    /// Checks the tensors against the configuration: each adapted map of a named target has lora_A [r, in] and
    /// lora_B [out, r] (in and out agreeing); other tensors only for modules_to_save.
    let private check (source: string) (config: AdapterFiles.AdapterConfig) (tensors: Map<string, torch.Tensor>) =
        let r = int64 config.Settings.Rank
        let fail format = Printf.ksprintf (fun message -> raise (GptException(sprintf "adapter '%s': %s" source message))) format
        let shape (t: torch.Tensor) = "[" + String.Join(", ", t.shape) + "]"
        let mutable maps = 0
        for KeyValue(name, tensor) in tensors do
            match AdapterFiles.adapterPathOf name with
            | Some(path, matrix) ->
                let target = AdapterFiles.targetOf path
                match target with
                | Some t when List.contains t config.Settings.Targets -> ()
                | _ ->
                    fail "%s adapts '%s', which the config's target_modules (%s) do not name" name path (String.Join(", ", config.Settings.Targets))
                if tensor.dim () <> 2L then fail "%s has shape %s, expected a matrix" name (shape tensor)
                match matrix with
                | "lora_A" ->
                    maps <- maps + 1
                    if tensor.shape[0] <> r then fail "%s has shape %s: rank %d, but the config says r = %d" name (shape tensor) tensor.shape[0] r
                    match tensors.TryFind(peftName path "lora_B") with
                    | None -> fail "%s has no lora_B beside it (%s)" name (peftName path "lora_B")
                    | Some b when b.dim () <> 2L || b.shape[1] <> r ->
                        fail "%s has shape %s: rank %d, but the config says r = %d" (peftName path "lora_B") (shape b) (if b.dim () = 2L then b.shape[1] else -1L) r
                    | Some _ -> ()
                | "lora_B" ->
                    if not (tensors.ContainsKey(peftName path "lora_A")) then fail "%s has no lora_A beside it" name
                | other -> fail "%s: unknown adapter matrix '%s' (expected lora_A or lora_B)" name other
            | None ->
                let modul = (if name.StartsWith prefix then name.Substring prefix.Length else name).Split('.')[0]
                if not (name.StartsWith prefix) || not (List.contains modul config.ModulesToSave) then
                    fail "tensor %s belongs to no adapted map and to no module of modules_to_save (%s)" name
                        (if config.ModulesToSave.IsEmpty then "none" else String.Join(", ", config.ModulesToSave))
        if maps = 0 then fail "no lora_A/lora_B tensors"

    /// Reads an adapter folder (adapter_config.json, adapter_model.safetensors and, for a classifier,
    /// classifier_config.json), checking the tensors against the configuration (another rank in the file than in the
    /// config, maps the targets do not name, unpaired matrices and stray tensors are errors).
    let read (directory: string) : Adapter =
        if not (Directory.Exists directory) then Errors.fail "adapter folder '%s' does not exist" directory
        let config = AdapterFiles.readConfig (Path.Combine(directory, AdapterFiles.configFileName))
        let file = Path.Combine(directory, AdapterFiles.weightsFileName)
        let classifierFile = Path.Combine(directory, AdapterFiles.classifierFileName)
        let classifier = if File.Exists classifierFile then Some(ClassifierFiles.readConfig classifierFile) else None
        let tensors = Safetensors.read file
        try
            check file config tensors
            new Adapter(config, tensors, classifier)
        with _ ->
            for KeyValue(_, tensor) in tensors do tensor.Dispose()
            reraise ()

    /// Writes an adapter folder, each file under a temporary name and then renamed.
    let write (directory: string) (adapter: Adapter) =
        Directory.CreateDirectory directory |> ignore
        Safetensors.write (Path.Combine(directory, AdapterFiles.weightsFileName)) (adapter.Tensors |> Map.toList)
        let writeText (name: string) (text: string) =
            let path = Path.Combine(directory, name)
            let temporary = path + ".tmp-" + Guid.NewGuid().ToString("N")
            File.WriteAllText(temporary, text)
            File.Move(temporary, path, true)
        adapter.Classifier |> Option.iter (ClassifierFiles.configJson >> writeText AdapterFiles.classifierFileName)
        writeText AdapterFiles.configFileName (AdapterFiles.configJson adapter.Config)

    /// Attaches the adapter to a model's maps (unmerged) and copies its A and B in; every targeted map must have its
    /// matrices in the shapes the map needs, and every matrix a map in the model (checked before anything is
    /// attached). Returns the modules trained in full it holds (model names such as "score.weight"; the adapter's own
    /// tensors: not to be disposed).
    let applyTo (adapter: Adapter) (model: GptModel) : (string * torch.Tensor) list =
        let r = int64 adapter.Settings.Rank
        let targeted = Lora.maps model |> List.filter (fun (_, target, _, _) -> List.contains target adapter.Settings.Targets)
        if List.contains "lm_head" adapter.Settings.Targets && model.Config.TiedHead then
            Errors.fail "the adapter targets lm_head, but the model's head is tied to the token embedding"
        let shape (t: torch.Tensor) = "[" + String.Join(", ", t.shape) + "]"
        for path, _, inFeatures, outFeatures in targeted do
            for matrix, expected in [ "lora_A", [| r; int64 inFeatures |]; "lora_B", [| int64 outFeatures; r |] ] do
                match adapter.Tensors.TryFind(peftName path matrix) with
                | None -> Errors.fail "the adapter has no %s for the model's %s" (peftName path matrix) path
                | Some t when t.shape <> expected ->
                    Errors.fail "the adapter's %s has shape %s; the model's %s needs [%s]" (peftName path matrix) (shape t) path
                        (String.Join(", ", expected))
                | Some _ -> ()
        let paths = targeted |> List.map (fun (path, _, _, _) -> path) |> Set.ofList
        for KeyValue(name, _) in adapter.Tensors do
            match AdapterFiles.adapterPathOf name with
            | Some(path, _) when not (paths.Contains path) ->
                Errors.fail "the adapter's %s adapts %s, which the model (%d layers) does not have" name path model.Config.Layers
            | _ -> ()
        use _ = torch.no_grad ()
        for path, lora in Lora.attach adapter.Settings 0L model do
            lora.A.copy_ adapter.Tensors[peftName path "lora_A"] |> ignore
            lora.B.copy_ adapter.Tensors[peftName path "lora_B"] |> ignore
        [ for KeyValue(name, tensor) in adapter.Tensors do
              if AdapterFiles.adapterPathOf name |> Option.isNone then yield name.Substring prefix.Length, tensor ]

    /// Applies the adapter to a classifier: the body's maps (unmerged) and the head trained in full.
    let applyToClassifier (adapter: Adapter) (classifier: GptClassifier) =
        let extra = applyTo adapter classifier.Body
        match extra |> List.tryFind (fun (name, _) -> name = "score.weight") with
        | Some(_, score) ->
            if score.shape <> classifier.Score.weight.shape then
                Errors.fail "the adapter's score.weight has shape [%s], the classifier's head is [%s]"
                    (String.Join(", ", score.shape)) (String.Join(", ", classifier.Score.weight.shape))
            use _ = torch.no_grad ()
            classifier.Score.weight.copy_ score |> ignore
        | None when List.contains "score" adapter.Config.ModulesToSave ->
            Errors.fail "the adapter names score in modules_to_save but holds no score.weight"
        | None -> ()

    /// A new model: the base with the adapter merged into its weights (the base is left as it is). Eval mode.
    let merge (adapter: Adapter) (baseModel: GptModel) : GptModel =
        use copy = GptModel.Uninitialised baseModel.Config
        StateDict.copy "the base model" "keys" id (StateDict.slotsOf (fun _ -> StateDict.Exact) copy) (baseModel.state_dict ())
        applyTo adapter copy |> ignore
        Lora.merged copy

[<RequireQualifiedAccess>]
module AdapterLoading =
    /// The base model an adapter names (base_model_name_or_path): a folder or file relative to the adapter's own
    /// folder when there is one there, otherwise as written (a Hugging Face id or a path from the working folder).
    let baseOf (directory: string) : string option =
        (AdapterFiles.readConfig (Path.Combine(directory, AdapterFiles.configFileName))).BaseModel
        |> Option.filter (String.IsNullOrWhiteSpace >> not)
        |> Option.map (fun b ->
            let beside = Path.GetFullPath(Path.Combine(directory, b))
            if not (Path.IsPathRooted b) && (Directory.Exists beside || File.Exists beside) then beside else b)

    let private baseOrFail (baseModel: string option) (directory: string) =
        match baseModel |> Option.orElse (baseOf directory) with
        | Some b -> b
        | None -> Errors.fail "adapter '%s' names no base model (base_model_name_or_path): give the base model (--model)" directory

    /// Refuses an adapter whose tensors hold NaN or infinities, as a model's weights are, unless the options allow it.
    let private requireFinite (options: ModelSourceOptions) (directory: string) (adapter: Adapter) =
        Pretrained.checkFinite ({ AllowNonFinite = options.AllowNonFinite }: LoadOptions) (Path.Combine(directory, AdapterFiles.weightsFileName))
            [ for KeyValue(name, tensor) in adapter.Tensors -> name, tensor ]

    /// A language model with an adapter: the base (None: the adapter's base_model_name_or_path) from any model source,
    /// loaded with `options` (downloads, AllowNonFinite: which also lets the adapter's own tensors hold NaN or
    /// infinities), the adapter applied (unmerged) or merged into the weights. Eval mode.
    let modelWith (options: ModelSourceOptions) (merge: bool) (baseModel: string option) (directory: string) : GptModel =
        use adapter = Adapter.read directory
        if adapter.IsClassifier then
            Errors.fail "adapter '%s' is a classifier's (task SEQ_CLS): use it to classify (gpt classify --adapter)" directory
        requireFinite options directory adapter
        let model = ModelSource.loadWith options (baseOrFail baseModel directory)
        try
            Adapter.applyTo adapter model |> ignore
            model.eval ()
            if merge then
                use adapted = model
                Lora.merged adapted
            else model
        with _ ->
            model.Dispose()
            reraise ()

    /// modelWith the environment's settings (non-finite weights refused).
    let model (merge: bool) (baseModel: string option) (directory: string) : GptModel =
        modelWith (ModelSource.defaults ()) merge baseModel directory

    /// A classifier with an adapter, unmerged or merged: the base is a saved classifier (its head is replaced by the
    /// adapter's `score`) or a language model (labels from the adapter's classifier_config.json), loaded with
    /// `options` (AllowNonFinite also lets the adapter's own tensors hold NaN or infinities).
    let classifierWith (options: ModelSourceOptions) (merge: bool) (baseModel: string option) (directory: string) : GptClassifier =
        use adapter = Adapter.read directory
        requireFinite options directory adapter
        let source = baseOrFail baseModel directory
        let classifier =
            if Directory.Exists source && ClassifierFiles.isClassifier source then
                ClassifierFiles.loadFrom { AllowNonFinite = options.AllowNonFinite } None source
            else
                match adapter.Classifier with
                | None ->
                    Errors.fail "adapter '%s' has no %s and its base '%s' is a language model, not a classifier: nothing gives the labels"
                        directory AdapterFiles.classifierFileName source
                | Some saved ->
                    use model = ModelSource.loadWith options source
                    ClassifierFiles.fromLanguageModel model saved.Labels saved.PadTokenId saved.Pooling 0.0 0L
        try
            Adapter.applyToClassifier adapter classifier
            classifier.eval ()
            if merge then
                use adapted = classifier
                Lora.mergedClassifier adapted
            else classifier
        with _ ->
            classifier.Dispose()
            reraise ()

    /// classifierWith the environment's settings (non-finite weights refused).
    let classifier (merge: bool) (baseModel: string option) (directory: string) : GptClassifier =
        classifierWith (ModelSource.defaults ()) merge baseModel directory

    /// Writes a base with an adapter merged into it as a plain model folder (Hugging Face layout; a classifier when
    /// the adapter or the base is one), atomically. Returns true for a classifier.
    let merge (baseModel: string option) (directory: string) (output: string) : bool =
        let source = baseOrFail baseModel directory
        let isClassifier =
            use adapter = Adapter.read directory
            adapter.IsClassifier || (Directory.Exists source && ClassifierFiles.isClassifier source)
        if isClassifier then
            use merged = classifier true (Some source) directory
            ClassifierFiles.save output merged
        else
            use merged = model true (Some source) directory
            Pretrained.save output merged
        isClassifier

