namespace Gpt.Weights

open System
open System.Collections.Generic
open System.Text.RegularExpressions
open TorchSharp
open Gpt
open Gpt.Model

/// AdamW's hyperparameters for a group of parameters, as a PyTorch optimizer state dict records them.
type AdamWGroup =
    { LearningRate: float
      Beta1: float
      Beta2: float
      Epsilon: float
      WeightDecay: float
      AmsGrad: bool
      /// Our parameter names (GptModel's state_dict keys) in the group.
      Parameters: string list }

/// A PyTorch AdamW's state mapped onto GptModel's parameters: moments under "<name>.exp_avg" and
/// "<name>.exp_avg_sq" and a step count per parameter name, the names and layout Training.Optimizer.restoreState
/// takes (nn.Linear [out, in]; the book's W_query, W_key and W_value stacked into c_attn, which is exact because
/// AdamW works element by element). Owns the moment tensors: dispose it.
type BookOptimizerState(groups: AdamWGroup list, moments: IReadOnlyDictionary<string, torch.Tensor>, steps: IReadOnlyDictionary<string, int64>) =
    member _.Groups = groups
    member _.Moments = moments
    member _.Steps = steps
    interface IDisposable with
        member _.Dispose() = for tensor in moments.Values do tensor.Dispose()

/// A book checkpoint read into our model: the model (eval mode) and, for ch. 5's model_and_optimizer.pth, AdamW's
/// state. Dispose both.
type BookCheckpointContents =
    { Model: GptModel
      Optimizer: BookOptimizerState option }

/// The book's own files (ch. 5): `torch.save(model.state_dict(), "model.pth")` of its GPTModel and
/// `torch.save({"model_state_dict": ..., "optimizer_state_dict": ...}, "model_and_optimizer.pth")`. Key names are the
/// book's: tok_emb, pos_emb, trf_blocks.N.att.W_query/W_key/W_value (or a fused att.qkv, the ch. 3 bonus), att.out_proj
/// (or att.proj), ff.layers.0/2, norm1/norm2 scale/shift (or nn.LayerNorm's weight/bias), final_norm, out_head;
/// prefixes torch.compile ("_orig_mod.") and DistributedDataParallel ("module.") add are removed. Files are read with
/// TorchPickle (only tensors and plain containers); shapes are checked against the configuration before any tensor
/// is read.
[<RequireQualifiedAccess>]
module BookCheckpoint =
    /// Where one of the book's tensors goes in the Hugging Face layout.
    type private Target =
        /// A whole Hugging Face tensor; Transpose when the book's nn.Linear [out, in] becomes a Conv1D [in, out].
        | Whole of name: string * transpose: bool
        /// One of W_query (0), W_key (1), W_value (2), stacked into c_attn.
        | QkvPart of layer: int * part: int * isBias: bool
        /// The causal-mask buffer: not a weight.
        | Buffer

    let private blockKey = Regex(@"^trf_blocks\.(\d+)\.(.+)$", RegexOptions.Compiled)

    let private stripWrappers (key: string) =
        let mutable key = key
        let mutable changed = true
        while changed do
            changed <- false
            for prefix in [ "_orig_mod."; "module." ] do
                if key.StartsWith(prefix, StringComparison.Ordinal) then
                    key <- key.Substring prefix.Length
                    changed <- true
        key

    let private target (key: string) : Target option =
        match key with
        | "tok_emb.weight" -> Some(Whole("wte.weight", false))
        | "pos_emb.weight" -> Some(Whole("wpe.weight", false))
        | "final_norm.scale" | "final_norm.weight" -> Some(Whole("ln_f.weight", false))
        | "final_norm.shift" | "final_norm.bias" -> Some(Whole("ln_f.bias", false))
        | "out_head.weight" -> Some(Whole("lm_head.weight", false))
        | _ ->
            let m = blockKey.Match key
            if not m.Success then None
            else
                let layer = int m.Groups[1].Value
                let h = sprintf "h.%d." layer
                match m.Groups[2].Value with
                | "att.W_query.weight" -> Some(QkvPart(layer, 0, false))
                | "att.W_key.weight" -> Some(QkvPart(layer, 1, false))
                | "att.W_value.weight" -> Some(QkvPart(layer, 2, false))
                | "att.W_query.bias" -> Some(QkvPart(layer, 0, true))
                | "att.W_key.bias" -> Some(QkvPart(layer, 1, true))
                | "att.W_value.bias" -> Some(QkvPart(layer, 2, true))
                | "att.qkv.weight" -> Some(Whole(h + "attn.c_attn.weight", true))
                | "att.qkv.bias" -> Some(Whole(h + "attn.c_attn.bias", false))
                | "att.out_proj.weight" | "att.proj.weight" -> Some(Whole(h + "attn.c_proj.weight", true))
                | "att.out_proj.bias" | "att.proj.bias" -> Some(Whole(h + "attn.c_proj.bias", false))
                | "att.mask" -> Some Buffer
                | "ff.layers.0.weight" -> Some(Whole(h + "mlp.c_fc.weight", true))
                | "ff.layers.0.bias" -> Some(Whole(h + "mlp.c_fc.bias", false))
                | "ff.layers.2.weight" -> Some(Whole(h + "mlp.c_proj.weight", true))
                | "ff.layers.2.bias" -> Some(Whole(h + "mlp.c_proj.bias", false))
                | "norm1.scale" | "norm1.weight" -> Some(Whole(h + "ln_1.weight", false))
                | "norm1.shift" | "norm1.bias" -> Some(Whole(h + "ln_1.bias", false))
                | "norm2.scale" | "norm2.weight" -> Some(Whole(h + "ln_2.weight", false))
                | "norm2.shift" | "norm2.bias" -> Some(Whole(h + "ln_2.bias", false))
                | _ -> None

    /// Whether state dict keys are the book's GPTModel's (tok_emb, trf_blocks, ...), not Hugging Face's (wte, h, ...).
    let isBookStateDict (keys: string seq) =
        keys |> Seq.map stripWrappers |> Seq.exists (fun k -> k.StartsWith("tok_emb.", StringComparison.Ordinal) || k.StartsWith("trf_blocks.", StringComparison.Ordinal))

    /// GPT-2's head size: 64 dimensions per head in all four released sizes (768/12, 1024/16, 1280/20, 1600/25).
    let gpt2HeadSize = 64

    /// The configuration the shapes imply: vocabulary and width from tok_emb, context from pos_emb, layers from the
    /// highest block index, QKV bias from W_query.bias (or qkv.bias). The number of heads is not in any shape; it is
    /// `heads` when given, else GPT-2's rule (width / 64). Dropout 0.1 and LayerNorm epsilon 1e-5, the book's.
    let inferConfig (source: string) (heads: int option) (shapes: (string * int64[]) list) : GptConfig =
        let fail format = Printf.ksprintf (fun m -> raise (GptException(sprintf "checkpoint '%s': %s" source m))) format
        let byKey = shapes |> List.map (fun (k, s) -> stripWrappers k, s) |> Map.ofList
        let matrix key =
            match byKey.TryFind key with
            | Some [| rows; columns |] -> int rows, int columns
            | Some shape -> fail "tensor '%s' has shape %s, expected a matrix" key (Errors.shapeText shape)
            | None -> fail "missing '%s': not the book's GPTModel state dict" key
        let vocab, width = matrix "tok_emb.weight"
        let context, positionWidth = matrix "pos_emb.weight"
        if positionWidth <> width then fail "pos_emb.weight is %d wide but tok_emb.weight %d" positionWidth width
        let layers =
            byKey |> Map.toList |> List.choose (fun (k, _) -> let m = blockKey.Match k in if m.Success then Some(int m.Groups[1].Value) else None)
        let layerCount = if layers.IsEmpty then 0 else List.max layers + 1
        let heads =
            match heads with
            | Some h -> h
            | None when width % gpt2HeadSize = 0 -> width / gpt2HeadSize
            | None ->
                fail "the number of attention heads is not stored in a state dict, and the width %d is not a multiple of GPT-2's head size %d: give the configuration (--config, or a config.json next to the file)"
                    width gpt2HeadSize
        let qkvBias = byKey.ContainsKey "trf_blocks.0.att.W_query.bias" || byKey.ContainsKey "trf_blocks.0.att.qkv.bias"
        let config =
            { VocabSize = vocab; ContextLength = context; EmbeddingDim = width; Heads = heads; Layers = layerCount
              DropRate = 0.1; QkvBias = qkvBias; TiedHead = true; LayerNormEpsilon = 1e-5 }
        try GptConfig.validate config with :? GptException as e -> fail "%s" e.Message
        config

    /// Every problem with the keys and shapes of a book state dict under `config`, in the book's names.
    let private problems (config: GptConfig) (entries: (string * TensorRef) list) =
        let d, v, c = int64 config.EmbeddingDim, int64 config.VocabSize, int64 config.ContextLength
        let expected (key: string) : int64[] option =
            match key with
            | "tok_emb.weight" | "out_head.weight" -> Some [| v; d |]
            | "pos_emb.weight" -> Some [| c; d |]
            | _ ->
                let m = blockKey.Match key
                if not m.Success then Some [| d |] // the final norm
                else
                    match m.Groups[2].Value with
                    | "att.qkv.weight" -> Some [| 3L * d; d |]
                    | "att.qkv.bias" -> Some [| 3L * d |]
                    | "att.mask" -> None // its size is the book's context_length; it is not read
                    | "ff.layers.0.weight" -> Some [| 4L * d; d |]
                    | "ff.layers.0.bias" -> Some [| 4L * d |]
                    | "ff.layers.2.weight" -> Some [| d; 4L * d |]
                    | rest when rest.EndsWith ".weight" && rest.StartsWith "att." -> Some [| d; d |]
                    | _ -> Some [| d |]
        let keys = entries |> List.map fst |> Set.ofList
        [ for key, tensor in entries do
              match target key with
              | None -> ()
              | Some Buffer -> ()
              | Some _ ->
                  if not (List.contains tensor.Storage.DType [ torch.ScalarType.Float32; torch.ScalarType.Float16; torch.ScalarType.BFloat16; torch.ScalarType.Float64 ]) then
                      yield sprintf "tensor '%s' has dtype %O, expected a floating-point dtype" key tensor.Storage.DType
                  match expected key with
                  | Some shape when shape <> tensor.Shape ->
                      yield sprintf "tensor '%s' has shape %s, expected %s" key (Errors.shapeText tensor.Shape) (Errors.shapeText shape)
                  | _ -> ()
          let unexpected = entries |> List.map fst |> List.filter (fun k -> (target k).IsNone)
          if not unexpected.IsEmpty then
              let head = if keys.Contains "out_head.bias" then " (out_head has a bias: a classifier head, as in chapter 6, not a language model)" else ""
              yield sprintf "unexpected keys: %s%s" (String.concat ", " unexpected) head
          let missing =
              [ for name in [ "tok_emb.weight"; "pos_emb.weight"; "final_norm.scale|final_norm.weight"; "final_norm.shift|final_norm.bias" ] do
                    if not (name.Split '|' |> Array.exists keys.Contains) then yield name.Split('|')[0]
                for layer in 0 .. config.Layers - 1 do
                    let b = sprintf "trf_blocks.%d." layer
                    let has (suffix: string) = suffix.Split '|' |> Array.exists (fun s -> keys.Contains(b + s))
                    let fused = has "att.qkv.weight"
                    let required =
                        [ if fused then "att.qkv.weight" else yield! [ "att.W_query.weight"; "att.W_key.weight"; "att.W_value.weight" ]
                          if config.QkvBias then
                              if fused then "att.qkv.bias" else yield! [ "att.W_query.bias"; "att.W_key.bias"; "att.W_value.bias" ]
                          "att.out_proj.weight|att.proj.weight"; "att.out_proj.bias|att.proj.bias"
                          "ff.layers.0.weight"; "ff.layers.0.bias"; "ff.layers.2.weight"; "ff.layers.2.bias"
                          "norm1.scale|norm1.weight"; "norm1.shift|norm1.bias"; "norm2.scale|norm2.weight"; "norm2.shift|norm2.bias" ]
                    for suffix in required do
                        if not (has suffix) then yield b + suffix.Split('|')[0] ]
          if not missing.IsEmpty then yield "missing keys: " + String.concat ", " missing ]

    /// The parameters of a book state dict in model.parameters() order, which an optimizer state dict's ids index:
    /// the file's order (a state dict is written module by module, parameters before buffers, as parameters() walks
    /// them) without the mask buffers, a tensor saved under two names (tied weights) counted once.
    let private parameterOrder (entries: (string * TensorRef) list) =
        let seen = HashSet<TensorRef>()
        entries |> List.filter (fun (key, tensor) -> target key <> Some Buffer && seen.Add tensor) |> List.map fst

    /// Our parameter name (GptModel's state_dict key, nn.Linear layout) of a book parameter, and for W_query/W_key/
    /// W_value which third of c_attn it is.
    let private ourName (key: string) =
        match target key with
        | Some(Whole(name, _)) -> name, None
        | Some(QkvPart(layer, part, isBias)) -> sprintf "h.%d.attn.c_attn.%s" layer (if isBias then "bias" else "weight"), Some part
        | _ -> Errors.fail "no parameter for '%s'" key

    let private readOptimizer (archive: TorchPickle.Archive) (entries: (string * TensorRef) list) (model: GptModel) (value: PickleValue) =
        let source = archive.Path
        let fail format = Printf.ksprintf (fun m -> raise (GptException(sprintf "checkpoint '%s': optimizer_state_dict: %s" source m))) format
        let number (value: PickleValue) (what: string) =
            match value with
            | PFloat x -> x
            | PInt n -> float n
            | other -> fail "%s must be a number, found %s" what (TorchPickle.describe other)
        let order = parameterOrder entries |> Array.ofList
        let groups =
            match TorchPickle.tryField "param_groups" value with
            | Some(PList groups) -> List.ofSeq groups
            | _ -> fail "no \"param_groups\" list: not a torch.optim state dict"
        let groupIds =
            groups |> List.map (fun group ->
                match TorchPickle.tryField "params" group with
                | Some(PList ids) -> ids |> Seq.map (function PInt id -> id | other -> fail "a parameter id must be an integer, found %s" (TorchPickle.describe other)) |> List.ofSeq
                | _ -> fail "a parameter group has no \"params\" list")
        let ids = List.concat groupIds
        if ids.Length <> order.Length || (ids |> List.sort) <> [ 0L .. int64 order.Length - 1L ] then
            fail "the optimizer holds %d parameters (ids %s), the model state dict %d: it was not made as AdamW(model.parameters())"
                ids.Length (ids |> List.truncate 8 |> List.map string |> String.concat ", ") order.Length
        // PyTorch numbers parameters group after group; only a single group (the book's AdamW(model.parameters())) keeps
        // model.parameters()'s order, which is all that names them.
        if groups.Length <> 1 then
            fail "%d parameter groups: only the book's single group over model.parameters() can be matched to parameter names" groups.Length
        let groupSettings =
            groups |> List.mapi (fun i group ->
                let field key = match TorchPickle.tryField key group with Some v -> v | None -> fail "parameter group %d has no \"%s\"" i key
                let beta1, beta2 =
                    match field "betas" with
                    | PTuple [ b1; b2 ] -> number b1 "beta1", number b2 "beta2"
                    | PList pair when pair.Count = 2 -> number pair[0] "beta1", number pair[1] "beta2"
                    | other -> fail "betas must be a pair, found %s" (TorchPickle.describe other)
                let amsGrad = match TorchPickle.tryField "amsgrad" group with Some(PBool b) -> b | _ -> false
                { LearningRate = number (field "lr") "lr"; Beta1 = beta1; Beta2 = beta2; Epsilon = number (field "eps") "eps"
                  WeightDecay = number (field "weight_decay") "weight_decay"; AmsGrad = amsGrad
                  Parameters = groupIds[i] |> List.map (fun id -> fst (ourName order[int id])) |> List.distinct })
        let states =
            match TorchPickle.tryField "state" value with
            | Some(PDict pairs) ->
                pairs |> Seq.map (fun (k, v) -> match k with PInt id -> id, v | other -> fail "a state key must be a parameter id, found %s" (TorchPickle.describe other)) |> dict
            | _ -> fail "no \"state\" dict: not a torch.optim state dict"
        let shapes = entries |> dict
        let owned = ResizeArray<torch.Tensor>()
        try
            // Per book parameter: (step, exp_avg, exp_avg_sq); a parameter that never had a gradient has no state yet,
            // which is the same as zero moments at step 0.
            let perParameter =
                order |> Array.mapi (fun id key ->
                    let shape = shapes[key].Shape
                    match states.TryGetValue(int64 id) with
                    | true, state ->
                        let tensor (field: string) =
                            match TorchPickle.tryField field state with
                            | Some(PTensor t) ->
                                if t.Shape <> shape then
                                    fail "%s of parameter %d ('%s') has shape %s, the parameter %s" field id key (Errors.shapeText t.Shape) (Errors.shapeText shape)
                                if t.Storage.DType <> torch.ScalarType.Float32 then
                                    fail "%s of parameter %d ('%s') has dtype %O, expected float32" field id key t.Storage.DType
                                let m = archive.Materialize(sprintf "state %d %s" id field, t)
                                owned.Add m
                                m
                            | _ -> fail "the state of parameter %d ('%s') has no %s tensor" id key field
                        let step =
                            match TorchPickle.tryField "step" state with
                            | Some(PTensor t) when t.Shape.Length = 0 ->
                                use s = archive.Materialize(sprintf "state %d step" id, t)
                                use d = s.to_type torch.ScalarType.Float64
                                d.item<float> ()
                            | Some other -> number other "step"
                            | None -> fail "the state of parameter %d ('%s') has no step" id key
                        if step < 0.0 || step <> Math.Floor step then fail "the step of parameter %d ('%s') is %g, expected a whole number" id key step
                        int64 step, tensor "exp_avg", tensor "exp_avg_sq"
                    | _ ->
                        let zeros () = let z = torch.zeros(shape, dtype = torch.ScalarType.Float32) in owned.Add z; z
                        0L, zeros (), zeros ())
            let moments = Dictionary<string, torch.Tensor>()
            let steps = Dictionary<string, int64>()
            let grouped = order |> Array.mapi (fun i key -> ourName key, perParameter[i]) |> Array.groupBy (fun ((name, _), _) -> name)
            for name, members in grouped do
                let members = members |> Array.sortBy (fun ((_, part), _) -> defaultArg part 0)
                let stepSet = members |> Array.map (fun (_, (step, _, _)) -> step) |> Array.distinct
                if stepSet.Length > 1 then fail "the parts of '%s' (W_query, W_key, W_value) were stepped %A times: they cannot share one state" name stepSet
                steps[name] <- stepSet[0]
                let stack (pick: int64 * torch.Tensor * torch.Tensor -> torch.Tensor) =
                    match members with
                    | [| (_, one) |] -> (pick one).clone ()
                    | _ -> torch.cat(members |> Array.map (snd >> pick), 0L)
                moments[name + ".exp_avg"] <- stack (fun (_, m, _) -> m)
                moments[name + ".exp_avg_sq"] <- stack (fun (_, _, v) -> v)
            // Every parameter of the model we built must have its state (a tied head would have none: the caller
            // builds an untied one when the file has a separate out_head).
            let ours = model.named_parameters () |> Seq.map (fun struct (n, _) -> n) |> Set.ofSeq
            let missing = ours |> Set.filter (fun n -> not (steps.ContainsKey n))
            if not missing.IsEmpty then fail "no state for %s" (String.concat ", " missing)
            new BookOptimizerState(groupSettings, moments, steps)
        finally
            for t in owned do t.Dispose()

    /// Reads the book's state dict entries into our model (eval mode). `config` overrides what the shapes imply.
    let private buildModel (archive: TorchPickle.Archive) (entries: (string * TensorRef) list) (config: GptConfig option) (forceUntied: bool) =
        let source = archive.Path
        let entries = entries |> List.map (fun (k, t) -> stripWrappers k, t)
        let config =
            match config with
            // A given configuration sets the sizes and heads; whether there is a QKV bias is what the file holds, and
            // whether the head is tied, whether out_head equals tok_emb.
            | Some c ->
                let bias = entries |> List.exists (fun (k, _) -> k.EndsWith(".att.W_query.bias", StringComparison.Ordinal) || k.EndsWith(".att.qkv.bias", StringComparison.Ordinal))
                { c with QkvBias = bias; TiedHead = true }
            | None -> inferConfig source None (entries |> List.map (fun (k, t) -> k, t.Shape))
        match problems config entries with
        | [] -> ()
        | list -> raise (GptException(sprintf "checkpoint '%s' (the book's GPTModel): %s" source (String.concat "; " list)))
        let owned = ResizeArray<torch.Tensor>()
        let keep (t: torch.Tensor) = owned.Add t; t
        try
            let read = entries |> List.filter (fun (k, _) -> match target k with Some Buffer | None -> false | _ -> true)
                                |> List.map (fun (k, t) -> k, keep (archive.Materialize(k, t)))
            let parts = Dictionary<string, (int * torch.Tensor) list>()
            let hf =
                [ for key, tensor in read do
                      match target key with
                      | Some(Whole(name, transpose)) -> yield name, (if transpose then keep (tensor.t ()) else tensor)
                      | Some(QkvPart(layer, part, isBias)) ->
                          let name = sprintf "h.%d.attn.c_attn.%s" layer (if isBias then "bias" else "weight")
                          parts[name] <- (part, tensor) :: (match parts.TryGetValue name with | true, l -> l | _ -> [])
                      | _ -> ()
                  for KeyValue(name, list) in parts do
                      // q|k|v stacked along the output axis, as GPT-2's c_attn, then to the Conv1D layout.
                      let stacked = keep (torch.cat(list |> List.sortBy fst |> List.map snd |> Array.ofList, 0L))
                      yield name, (if name.EndsWith ".weight" then keep (stacked.t ()) else stacked) ]
            let hasHead = entries |> List.exists (fun (k, _) -> k = "out_head.weight")
            let config = if forceUntied && hasHead then { config with TiedHead = false } else config
            Pretrained.fromTensors source config hf
        finally
            for t in owned do t.Dispose()

    /// Reads a book state dict file, or the model of a model_and_optimizer.pth, into our model (eval mode). The
    /// configuration comes from the shapes (see inferConfig) unless `config` is given.
    let loadWith (config: GptConfig option) (path: string) : GptModel =
        use archive = TorchPickle.openArchive path
        let stateDict = TorchPickle.tryField "model_state_dict" archive.Root |> Option.defaultValue archive.Root
        buildModel archive (TorchPickle.stateDictEntries path stateDict) config false

    /// load with the configuration from the shapes.
    let load (path: string) = loadWith None path

    /// Reads ch. 5's model_and_optimizer.pth: the model, and AdamW's state by our parameter names (none when the file
    /// has no "optimizer_state_dict"). A separate out_head stays a separate head here, even if equal to tok_emb, so
    /// that its moments have a parameter to belong to.
    let readWithOptimizer (config: GptConfig option) (path: string) : BookCheckpointContents =
        use archive = TorchPickle.openArchive path
        let stateDict = TorchPickle.tryField "model_state_dict" archive.Root |> Option.defaultValue archive.Root
        let entries = TorchPickle.stateDictEntries path stateDict |> List.map (fun (k, t) -> stripWrappers k, t)
        match TorchPickle.tryField "optimizer_state_dict" archive.Root with
        | None -> { Model = buildModel archive entries config false; Optimizer = None }
        | Some optimizer ->
            let model = buildModel archive entries config true
            try
                { Model = model; Optimizer = Some(readOptimizer archive entries model optimizer) }
            with _ ->
                model.Dispose()
                reraise ()
