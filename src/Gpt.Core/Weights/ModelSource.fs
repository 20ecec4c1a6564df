namespace Gpt.Weights

open System
open System.IO
open System.Text.Json
open System.Threading
open Gpt
open Gpt.Model

/// How ModelSource reaches models that are not local folders, and what it assumes about files without a configuration.
type ModelSourceOptions =
    { Hub: HubSettings
      /// Download progress (called from the downloading thread).
      Progress: DownloadProgress -> unit
      /// The configuration of a state dict file, which carries none (else a config.json beside it, else the shapes).
      Config: GptConfig option
      Cancellation: CancellationToken
      /// Load weights that hold NaN or infinities (by default an error naming the tensors).
      AllowNonFinite: bool }

/// What a model source names.
type ModelSourceKind =
    /// A folder with config.json and model.safetensors (or pytorch_model.bin).
    | HuggingFaceFolder of directory: string
    /// OpenAI's checkpoint folder (hparams.json, model.ckpt.index, model.ckpt.data-...).
    | OpenAICheckpoint of directory: string
    /// A torch.save file: the book's state dict or model_and_optimizer.pth, or a state dict with Hugging Face names.
    | StateDictFile of path: string
    /// A safetensors file with Hugging Face names (its configuration beside it or given).
    | SafetensorsFile of path: string
    /// A Hugging Face model id, from the cache or downloaded.
    | HubModel of HubId

/// One entry point for every place a model can come from (`--model` on every command, `GptModel.Load` in C#):
///   1. an existing folder: the Hugging Face layout, or OpenAI's TensorFlow checkpoint;
///   2. an existing file: a torch.save state dict (the book's names, model_and_optimizer.pth, or Hugging Face names),
///      a .safetensors file, or a file of OpenAI's checkpoint folder;
///   3. otherwise a Hugging Face id (gpt2, openai-community/gpt2-medium, user/name@revision): the hub cache, else a
///      download into it (HubCache).
[<RequireQualifiedAccess>]
module ModelSource =
    /// The environment's hub settings, no progress, no configuration override.
    let defaults () =
        { Hub = HubCache.settingsFromEnvironment (); Progress = ignore; Config = None; Cancellation = CancellationToken.None
          AllowNonFinite = false }

    let private fileExtensions = [ ".pth"; ".pt"; ".bin"; ".safetensors"; ".index"; ".json"; ".ckpt" ]

    /// What a source names, looking only at the file system (no weights read, no network).
    let classify (source: string) : ModelSourceKind =
        if String.IsNullOrWhiteSpace source then Errors.fail "no model given: expected a folder, a .pth file or a Hugging Face id such as gpt2"
        let path = source.Trim()
        if Directory.Exists path then
            if File.Exists(Path.Combine(path, Pretrained.configFileName)) then HuggingFaceFolder path
            elif TensorFlowBundle.isCheckpointDirectory path then OpenAICheckpoint path
            else
                Errors.fail "model folder '%s' holds neither %s with %s (the Hugging Face layout) nor %s with model.ckpt.index (OpenAI's checkpoint)"
                    path Pretrained.configFileName Pretrained.weightsFileName TensorFlowBundle.hparamsFileName
        elif File.Exists path then
            let name = Path.GetFileName path
            let directory = match Path.GetDirectoryName(Path.GetFullPath path) with null -> "." | d -> d
            if name.EndsWith(".safetensors", StringComparison.OrdinalIgnoreCase) then SafetensorsFile path
            elif name = TensorFlowBundle.hparamsFileName || name = TensorFlowBundle.checkpointFileName || name.EndsWith ".index" || name.Contains ".data-" then
                if TensorFlowBundle.isCheckpointDirectory directory then OpenAICheckpoint directory
                else Errors.fail "'%s' is part of a TensorFlow checkpoint, but its folder has no %s" path TensorFlowBundle.hparamsFileName
            elif name = Pretrained.configFileName then HuggingFaceFolder directory
            else StateDictFile path
        else
            let looksLikePath =
                path.StartsWith "." || path.StartsWith "/" || path.StartsWith "~" || path.Contains '\\' || Path.IsPathRooted path
                || fileExtensions |> List.exists (fun e -> path.EndsWith(e, StringComparison.OrdinalIgnoreCase))
            match (if looksLikePath then None else HubCache.tryParseId path) with
            | Some id -> HubModel id
            | None -> Errors.fail "model '%s' does not exist (no such model directory or file): expected a folder, a .pth or .safetensors file, or a Hugging Face id such as gpt2 or openai-community/gpt2-medium" path

    /// Reads a configuration file: a Hugging Face config.json (n_embd, n_head, ...) or the book's GPT_CONFIG
    /// dictionary as JSON (vocab_size, context_length, emb_dim, n_heads, n_layers, drop_rate, qkv_bias).
    let readConfigFile (path: string) : GptConfig =
        let text = BoundedFile.readText "configuration" Pretrained.configSizeLimit path
        let book =
            try
                use document = JsonDocument.Parse(text, BoundedFile.jsonOptions)
                document.RootElement.ValueKind = JsonValueKind.Object && (fst (document.RootElement.TryGetProperty "emb_dim"))
            with :? JsonException -> false
        if not book then Pretrained.parseConfig path text
        else
            use document = BoundedFile.parseJson (sprintf "configuration '%s'" path) text
            let root = document.RootElement
            let fail format = Printf.ksprintf (fun m -> raise (GptException(sprintf "configuration '%s': %s" path m))) format
            let field (key: string) = match root.TryGetProperty key with | true, v -> Some v | _ -> None
            let integer key =
                match field key with
                | Some v when v.ValueKind = JsonValueKind.Number && fst (v.TryGetInt32()) -> v.GetInt32()
                | Some v -> fail "\"%s\" must be an integer, found %s" key (v.GetRawText())
                | None -> fail "missing \"%s\"" key
            let config =
                { VocabSize = integer "vocab_size"; ContextLength = integer "context_length"; EmbeddingDim = integer "emb_dim"
                  Heads = integer "n_heads"; Layers = integer "n_layers"
                  DropRate = (match field "drop_rate" with Some v when v.ValueKind = JsonValueKind.Number -> v.GetDouble() | _ -> 0.1)
                  QkvBias = (match field "qkv_bias" with Some v when v.ValueKind = JsonValueKind.True -> true | _ -> false)
                  TiedHead = false; LayerNormEpsilon = 1e-5 }
            try GptConfig.validate config with :? GptException as e -> fail "%s" e.Message
            config

    /// The configuration for a state dict or safetensors file: the one given, else config.json beside the file.
    let private configFor (options: ModelSourceOptions) (path: string) =
        match options.Config with
        | Some c -> Some c
        | None ->
            let beside = Path.Combine((match Path.GetDirectoryName(Path.GetFullPath path) with null -> "." | d -> d), Pretrained.configFileName)
            if File.Exists beside then Some(readConfigFile beside) else None

    let private noOverride (options: ModelSourceOptions) (what: string) =
        if options.Config.IsSome then
            Errors.fail "a configuration was given, but %s carries its own: it applies only to state dict files" what

    /// A local path for a source: the folder or file itself, or the hub cache's snapshot folder (downloaded unless
    /// cached or offline).
    let locate (options: ModelSourceOptions) (source: string) : string =
        match classify source with
        | HubModel id -> HubCache.resolve options.Hub options.Progress options.Cancellation id
        | HuggingFaceFolder d | OpenAICheckpoint d -> d
        | StateDictFile p | SafetensorsFile p -> p

    /// A model from a reader that checks no values: refused (and disposed) when a weight is not finite, unless the
    /// options allow it.
    let private finiteModel (options: ModelSourceOptions) (source: string) (model: GptModel) =
        try
            Pretrained.checkFinite { AllowNonFinite = options.AllowNonFinite } source
                [ for KeyValue(name, tensor) in model.state_dict () -> name, tensor ]
            model
        with _ ->
            model.Dispose()
            reraise ()

    /// Loads a model from any source (see the module's summary). Sizes, names and shapes are checked before the model
    /// is built; weights that hold NaN or infinities are an error unless options.AllowNonFinite. Eval mode.
    let loadWith (options: ModelSourceOptions) (source: string) : GptModel =
        let loadOptions = { AllowNonFinite = options.AllowNonFinite }
        match classify source with
        | HuggingFaceFolder directory ->
            noOverride options (sprintf "the Hugging Face folder '%s'" directory)
            Pretrained.loadWith loadOptions directory
        | OpenAICheckpoint directory ->
            noOverride options (sprintf "OpenAI's checkpoint '%s' (hparams.json)" directory)
            TensorFlowBundle.load directory |> finiteModel options directory
        | HubModel id ->
            noOverride options (sprintf "the Hugging Face model '%s'" id.RepoId)
            Pretrained.loadWith loadOptions (HubCache.resolve options.Hub options.Progress options.Cancellation id)
        | SafetensorsFile path ->
            match configFor options path with
            | None -> Errors.fail "safetensors file '%s' has no configuration: put its config.json beside it, or give one" path
            | Some config ->
                // The header against the configuration before any tensor is read.
                Pretrained.checkDescribed path config (Pretrained.describeHeader (Safetensors.readHeader path))
                ModelMemory.require (sprintf "checkpoint '%s'" path) config
                let tensors, _ = Safetensors.readWithMetadata path
                try Pretrained.fromTensorsWith loadOptions path config tensors
                finally for _, t in tensors do t.Dispose()
        | StateDictFile path ->
            let isBook =
                use archive = TorchPickle.openArchive path
                let stateDict = TorchPickle.tryField "model_state_dict" archive.Root |> Option.defaultValue archive.Root
                BookCheckpoint.isBookStateDict (TorchPickle.stateDictEntries path stateDict |> List.map fst)
            if isBook then BookCheckpoint.loadWith (configFor options path) path |> finiteModel options path
            else
                match configFor options path with
                | None ->
                    Errors.fail "PyTorch state dict '%s' has Hugging Face names but no configuration: put its config.json beside it, or give one" path
                | Some config ->
                    let tensors = Pretrained.readPyTorchStateDict path
                    try Pretrained.fromTensorsWith loadOptions path config tensors
                    finally for _, t in tensors do t.Dispose()

    /// loadWith the environment's settings.
    let load (source: string) : GptModel = loadWith (defaults ()) source

    /// A model by Hugging Face id ("gpt2", "openai-community/gpt2-medium", "user/name@revision") or any other source
    /// `load` takes: a local folder of that name first, then the hub cache, then a download.
    let fromPretrained (source: string) : GptModel = load source

    /// A short name of a source's kind, for messages and `gpt convert`'s output.
    let kindName (kind: ModelSourceKind) =
        match kind with
        | HuggingFaceFolder _ -> "hugging-face-folder"
        | OpenAICheckpoint _ -> "openai-checkpoint"
        | StateDictFile _ -> "pytorch-state-dict"
        | SafetensorsFile _ -> "safetensors-file"
        | HubModel _ -> "hugging-face-hub"
