namespace Gpt.Model

// LoRA (the book's appendix E, Hu et al. 2021): instead of every weight, a few low-rank matrices are trained beside the
// frozen linear maps of a model. Adapters attach to a GptModel's (or a classifier body's) maps by name, the base is
// frozen, and the adapted model can be merged back into plain weights W + (alpha / r) · B A.

open System
open TorchSharp
open global.Gpt

/// Which maps get adapters, their rank and alpha (the scale is alpha / rank, PEFT's convention; the book's first
/// edition multiplied by alpha alone, so its alpha is PEFT's lora_alpha / r).
type LoraSettings =
    { Rank: int
      Alpha: float
      /// Canonical names: "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "lm_head".
      Targets: string list }

[<RequireQualifiedAccess>]
module LoraSettings =
    /// Every linear map of the blocks (the head is added with "head" when it is not tied).
    let defaultTargets = [ "attn.c_attn"; "attn.c_proj"; "mlp.c_fc"; "mlp.c_proj" ]

    /// The canonical names a target stands for, as a user (or PEFT's target_modules) may write it: c_attn, c_fc,
    /// attn.c_proj, mlp.c_proj, lm_head (or head); a bare c_proj is both projections, as PEFT matches module names by
    /// their last part.
    let parseTargets (name: string) =
        match (if isNull name then "" else name.Trim().ToLowerInvariant()) with
        | "c_attn" | "attn.c_attn" -> [ "attn.c_attn" ]
        | "c_proj" -> [ "attn.c_proj"; "mlp.c_proj" ]
        | "attn.c_proj" -> [ "attn.c_proj" ]
        | "c_fc" | "mlp.c_fc" -> [ "mlp.c_fc" ]
        | "mlp.c_proj" -> [ "mlp.c_proj" ]
        | "head" | "lm_head" -> [ "lm_head" ]
        | _ -> Errors.fail "unknown LoRA target '%s': expected c_attn, c_proj (both projections), attn.c_proj, c_fc, mlp.c_proj or lm_head" name

    /// Rank r, alpha (default 2r), targets (default: every linear map of the blocks).
    let create (rank: int) (alpha: float option) (targets: string list option) =
        Errors.require (rank > 0) "the LoRA rank must be positive, found %d" rank
        let alpha = alpha |> Option.defaultValue (2.0 * float rank)
        Errors.require (alpha > 0.0 && Double.IsFinite alpha) "the LoRA alpha must be positive, found %g" alpha
        let targets =
            targets |> Option.map (List.collect parseTargets >> List.distinct) |> Option.defaultValue defaultTargets
        Errors.require (not targets.IsEmpty) "no LoRA target given"
        { Rank = rank; Alpha = alpha; Targets = targets }

    /// LoRA settings from the options of a run: none without a rank (or rank 0); alpha or targets without a rank is a
    /// mistake.
    let ofOptions (rank: int option) (alpha: float option) (targets: string list option) =
        match rank with
        | Some rank when rank <> 0 -> Some(create rank alpha targets)
        | _ ->
            if alpha.IsSome then Errors.fail "a LoRA alpha was given without a LoRA rank: give the rank too (--lora-rank)"
            if targets.IsSome then Errors.fail "LoRA targets were given without a LoRA rank: give the rank too (--lora-rank)"
            None

    /// Trainable parameters of the adapters on a configuration: r · (in + out) per adapted map.
    let parameterCount (settings: LoraSettings) (config: GptConfig) =
        let c = int64 config.EmbeddingDim
        let r = int64 settings.Rank
        let perBlock =
            settings.Targets |> List.sumBy (function
                | "attn.c_attn" -> r * (c + 3L * c)
                | "attn.c_proj" -> r * (c + c)
                | "mlp.c_fc" -> r * (c + 4L * c)
                | "mlp.c_proj" -> r * (4L * c + c)
                | _ -> 0L)
        let head = if List.contains "lm_head" settings.Targets && not config.TiedHead then r * (c + int64 config.VocabSize) else 0L
        int64 config.Layers * perBlock + head

[<RequireQualifiedAccess>]
module Lora =
    /// The modules of a model that can hold adapters, with where they are: ("h.0.attn", "attn"), ("h.0.mlp", "mlp"),
    /// ("", "") for the model itself (its separate head).
    let private owners (model: GptModel) : (string * string * IAdaptable) list =
        [ for index, block in Seq.indexed model.Blocks do
              yield sprintf "h.%d.attn" index, "attn", block.Attention :> IAdaptable
              yield sprintf "h.%d.mlp" index, "mlp", block.FeedForward :> IAdaptable
          yield "", "", model :> IAdaptable ]

    let private join (path: string) (name: string) = if path = "" then name else path + "." + name
    let private kind (group: string) (name: string) = if group = "" then name else group + "." + name

    /// The maps of a model that can hold adapters: path ("h.0.attn.c_attn", "lm_head"), canonical target
    /// ("attn.c_attn"), in and out features.
    let maps (model: GptModel) : (string * string * int * int) list =
        [ for path, group, owner in owners model do
              for name, inFeatures, outFeatures in owner.Maps -> join path name, kind group name, inFeatures, outFeatures ]

    /// The adapters a model holds, by the path of the map they adapt ("h.0.attn.c_attn", "lm_head").
    let adapters (model: GptModel) : (string * LoraAdapter) list =
        [ for path, _, owner in owners model do
              for KeyValue(name, adapter) in owner.Adapters -> join path name, adapter ]

    /// Attaches a fresh adapter (B = 0: the model computes what it did) to every targeted map; adapter k draws its A
    /// from seed + k. Fails when a target names no map of the model (a tied head has no map of its own).
    let attach (settings: LoraSettings) (seed: int64) (model: GptModel) : (string * LoraAdapter) list =
        if not (adapters model).IsEmpty then Errors.fail "the model already has LoRA adapters"
        if List.contains "lm_head" settings.Targets && model.Config.TiedHead then
            Errors.fail "the LoRA target head: the model's head is tied to the token embedding, so it has no map of its own to adapt"
        let attached =
            [ for path, group, owner in owners model do
                  for name, inFeatures, outFeatures in owner.Maps do
                      if List.contains (kind group name) settings.Targets then yield path, name, owner, inFeatures, outFeatures ]
        attached |> List.mapi (fun index (path, name, owner, inFeatures, outFeatures) ->
            let adapter = new LoraAdapter(inFeatures, outFeatures, settings.Rank, settings.Alpha, seed + int64 index)
            owner.Attach(name, adapter)
            join path name, adapter)

    /// Freezes every parameter of a module except its adapters' (and those `keep` names, such as a classifier's
    /// `score`); returns the trainable ones by name.
    let freezeBase (keep: string -> bool) (model: torch.nn.Module) =
        for struct (name, parameter) in model.named_parameters () do
            parameter.requires_grad <- name.Contains "_lora." || keep name
        model.named_parameters () |> Seq.filter (fun struct (_, p) -> p.requires_grad) |> Seq.map (fun struct (n, p) -> n, p) |> Array.ofSeq

    /// Copies a model's weights into `target` (a model of the same configuration, without adapters) with every adapter
    /// merged into the map it adapts: W + (alpha / r) · B A, in the weight's own [out, in] orientation.
    let mergeInto (source: GptModel) (target: GptModel) =
        let merged = adapters source |> Map.ofList
        use _ = torch.no_grad ()
        let sourceState = source.state_dict ()
        for KeyValue(name, destination) in target.state_dict () do
            destination.copy_ sourceState[name] |> ignore
            if name.EndsWith ".weight" then
                match merged.TryFind(name.Substring(0, name.Length - ".weight".Length)) with
                | Some adapter -> destination.addmm_(adapter.B, adapter.A, beta = 1.0f, alpha = float32 adapter.Scale) |> ignore
                | None -> ()

    /// A new model with every adapter merged into its weights (the source is left as it is). Eval mode.
    let merged (model: GptModel) : GptModel =
        let result = GptModel.Uninitialised model.Config
        try
            mergeInto model result
            result.eval ()
            result
        with _ ->
            result.Dispose()
            reraise ()

    /// Attaches adapters to a classifier's transformer (its head, `score`, is trained in full beside them: PEFT's
    /// modules_to_save). The body's own head is tied and absent, so lm_head is no target here.
    let attachClassifier (settings: LoraSettings) (seed: int64) (classifier: GptClassifier) =
        if List.contains "lm_head" settings.Targets then
            Errors.fail "the LoRA target lm_head: a classifier has no language-model head; its head (score) is trained in full"
        attach settings seed classifier.Body

    /// A new classifier with every adapter of its body merged into the weights and the same head. Eval mode.
    let mergedClassifier (classifier: GptClassifier) : GptClassifier =
        let result = GptClassifier.Uninitialised classifier.Config
        try
            mergeInto classifier.Body result.Body
            use _ = torch.no_grad ()
            result.Score.weight.copy_ classifier.Score.weight |> ignore
            result.eval ()
            result
        with _ ->
            result.Dispose()
            reraise ()
