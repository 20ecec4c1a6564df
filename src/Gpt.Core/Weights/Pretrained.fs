namespace Gpt.Weights

open System
open System.Collections.Generic
open System.IO
open System.Text.Json
open System.Text.RegularExpressions
open TorchSharp
open Gpt
open Gpt.Model

/// How a loader treats weights that are well-formed but unusual.
type LoadOptions =
    { /// Load weights that hold NaN or infinities. By default that is an error naming the tensors: one NaN in a
      /// weight matrix quietly changes every output.
      AllowNonFinite: bool }

[<RequireQualifiedAccess>]
module LoadOptions =
    /// Non-finite weights refused.
    let defaults = { AllowNonFinite = false }

/// Weights in the Hugging Face GPT-2 layout: a directory with `config.json` and `model.safetensors`, the layout
/// `transformers.GPT2LMHeadModel` reads and writes.
[<RequireQualifiedAccess>]
module Pretrained =
    let configFileName = "config.json"
    let weightsFileName = "model.safetensors"
    /// The name transformers gives a pickled PyTorch state dict; `load` falls back to it.
    let pytorchFileName = "pytorch_model.bin"

    // ---- config.json ----------------------------------------------------------------------------------------------

    let private configError (path: string) format =
        Printf.ksprintf (fun message -> raise (GptException(sprintf "config '%s': %s" path message))) format

    /// Typed access to the fields of a config.json; every error names the file and the key. A null value counts as
    /// absent.
    type ConfigFields(path: string, root: JsonElement) =
        do if root.ValueKind <> JsonValueKind.Object then configError path "not a JSON object"
        member _.Path = path
        member _.TryField(key: string) =
            match root.TryGetProperty key with
            | true, value when value.ValueKind <> JsonValueKind.Null -> Some value
            | _ -> None
        // TryGet* throws on a non-number, so the kind is checked first.
        member _.Integer(value: JsonElement, key: string) =
            match value.ValueKind with
            | JsonValueKind.Number when fst (value.TryGetInt32()) -> value.GetInt32()
            | _ -> configError path "\"%s\" must be an integer, found %s" key (value.GetRawText())
        member _.Number(value: JsonElement, key: string) =
            match value.ValueKind with
            | JsonValueKind.Number -> value.GetDouble()
            | _ -> configError path "\"%s\" must be a number, found %s" key (value.GetRawText())
        member _.Boolean(value: JsonElement, key: string) =
            match value.ValueKind with
            | JsonValueKind.True -> true
            | JsonValueKind.False -> false
            | _ -> configError path "\"%s\" must be true or false, found %s" key (value.GetRawText())
        /// The first of the keys that is present, as an integer.
        member this.Required(keys: string list) =
            match keys |> List.tryPick (fun key -> this.TryField key |> Option.map (fun value -> this.Integer(value, key))) with
            | Some value -> value
            | None -> configError path "missing \"%s\"" (String.concat "\" or \"" keys)
        member this.Optional(key: string, parse: JsonElement * string -> 'T, fallback: 'T) =
            this.TryField key |> Option.map (fun value -> parse (value, key)) |> Option.defaultValue fallback

    /// Settings of transformers' GPT-2 that this model cannot honour are errors, not silently different maths.
    let private checkSupported (fields: ConfigFields) (config: GptConfig) =
        let path = fields.Path
        match fields.TryField "model_type" with
        | Some value when value.ValueKind <> JsonValueKind.String || value.GetString() <> "gpt2" ->
            configError path "model_type %s is not supported, expected \"gpt2\"" (value.GetRawText())
        | _ -> ()
        match fields.TryField "activation_function" with
        | Some value when value.ValueKind <> JsonValueKind.String || not (List.contains (value.GetString()) [ "gelu_new"; "gelu_pytorch_tanh"; "gelu_fast" ]) ->
            configError path "activation_function %s is not supported: GPT-2 uses the tanh-approximate GELU (\"gelu_new\")" (value.GetRawText())
        | _ -> ()
        match fields.TryField "n_inner" with
        | Some value when fields.Integer(value, "n_inner") <> 4 * config.EmbeddingDim ->
            configError path "n_inner %s is not supported: the feed-forward width is 4 x n_embd = %d" (value.GetRawText()) (4 * config.EmbeddingDim)
        | _ -> ()
        if fields.Optional("scale_attn_by_inverse_layer_idx", fields.Boolean, false) then
            configError path "scale_attn_by_inverse_layer_idx = true is not supported"

    /// The model configuration of a config.json's fields.
    let configOf (fields: ConfigFields) : GptConfig =
        let config =
            { VocabSize = fields.Required [ "vocab_size" ]
              ContextLength = fields.Required [ "n_positions"; "n_ctx" ]
              EmbeddingDim = fields.Required [ "n_embd" ]
              Heads = fields.Required [ "n_head" ]
              Layers = fields.Required [ "n_layer" ]
              DropRate = fields.Optional("resid_pdrop", fields.Number, 0.1)
              QkvBias = fields.Optional("qkv_bias", fields.Boolean, true)
              TiedHead = fields.Optional("tie_word_embeddings", fields.Boolean, true)
              LayerNormEpsilon = fields.Optional("layer_norm_epsilon", fields.Number, 1e-5) }
        checkSupported fields config
        try
            GptConfig.validate config
        with :? GptException as e ->
            configError fields.Path "%s" e.Message
        config

    /// config.json's eos_token_id: a number, or the first of a list (newer transformers allow several; generation here
    /// stops at one); None when absent or null.
    let endOfTextOf (fields: ConfigFields) : int option =
        match fields.TryField "eos_token_id" with
        | None -> None
        | Some value when value.ValueKind = JsonValueKind.Array ->
            value.EnumerateArray() |> Seq.tryHead |> Option.map (fun first -> fields.Integer(first, "eos_token_id"))
        | Some value -> Some(fields.Integer(value, "eos_token_id"))

    /// Parses a config.json's text and reads it with `read`; `path` names it in error messages. Duplicate keys are
    /// an error (which of two "n_embd" counts is a guess).
    let parseWith (path: string) (text: string) (read: ConfigFields -> 'T) : 'T =
        use document =
            try
                JsonDocument.Parse(text, BoundedFile.jsonOptions)
            with :? JsonException as e ->
                configError path "not valid JSON (%s)" e.Message
        BoundedFile.checkStrings (sprintf "config '%s'" path) document.RootElement
        read (ConfigFields(path, document.RootElement))

    /// The most a config.json may hold: 16 MB (GPT-2's is 700 bytes; a classifier's labels add a little).
    let configSizeLimit = BoundedFile.defaultLimit

    /// The text of a config.json: a regular file (links followed) of at most configSizeLimit bytes, strict UTF-8.
    let readConfigText (path: string) : string = BoundedFile.readText "config" configSizeLimit path

    /// Parses the text of a Hugging Face GPT-2 config.json (see readConfig); `path` names it in error messages.
    let parseConfig (path: string) (text: string) : GptConfig = parseWith path text configOf

    /// Reads a Hugging Face GPT-2 config.json: n_embd, n_head, n_layer, n_positions (or n_ctx), vocab_size,
    /// layer_norm_epsilon; resid_pdrop for dropout (default 0.1), tie_word_embeddings (default true) and our own
    /// qkv_bias (default true: every released GPT-2 has it). Settings this model cannot honour are errors.
    let readConfig (path: string) : GptConfig = parseConfig path (readConfigText path)

    /// The config.json text for a configuration and its end-of-text token (eos_token_id and bos_token_id, null for
    /// none): the standard GPT-2 keys (so transformers can read it) plus tie_word_embeddings, the three dropout rates
    /// and our own qkv_bias, so an untied or bias-less model round-trips.
    let configJsonWith (endOfText: int option) (config: GptConfig) =
        use buffer = new MemoryStream()
        (use json = new Utf8JsonWriter(buffer, JsonWriterOptions(Indented = true))
         json.WriteStartObject()
         json.WriteString("model_type", "gpt2")
         json.WriteStartArray "architectures"
         json.WriteStringValue "GPT2LMHeadModel"
         json.WriteEndArray()
         json.WriteNumber("vocab_size", config.VocabSize)
         json.WriteNumber("n_positions", config.ContextLength)
         json.WriteNumber("n_ctx", config.ContextLength)
         json.WriteNumber("n_embd", config.EmbeddingDim)
         json.WriteNumber("n_head", config.Heads)
         json.WriteNumber("n_layer", config.Layers)
         json.WriteNumber("layer_norm_epsilon", config.LayerNormEpsilon)
         json.WriteString("activation_function", "gelu_new")
         json.WriteNumber("resid_pdrop", config.DropRate)
         json.WriteNumber("embd_pdrop", config.DropRate)
         json.WriteNumber("attn_pdrop", config.DropRate)
         // GPT-2 begins and ends texts with the same token. A vocabulary without one says null rather than naming an
         // arbitrary id that generation would then stop at.
         for key in [ "bos_token_id"; "eos_token_id" ] do
             match endOfText with
             | Some id -> json.WriteNumber(key, id)
             | None -> json.WriteNull key
         json.WriteBoolean("tie_word_embeddings", config.TiedHead)
         json.WriteBoolean("qkv_bias", config.QkvBias)
         json.WriteEndObject())
        Text.Encoding.UTF8.GetString(buffer.ToArray()) + "\n"

    /// configJsonWith the default end-of-text token of the vocabulary: GPT-2's 50256 when it has it, else none.
    let configJson (config: GptConfig) = configJsonWith (EndOfText.resolve None config.VocabSize) config

    // ---- tensor names -------------------------------------------------------------------------------------------

    /// Hugging Face stores these four as Conv1D weights, [in, out] (y = x W + b): transposed relative to a Linear
    /// layer's [out, in] (y = x Wᵀ + b).
    let isConv1DWeight (name: string) =
        [ ".attn.c_attn.weight"; ".attn.c_proj.weight"; ".mlp.c_fc.weight"; ".mlp.c_proj.weight" ]
        |> List.exists (fun suffix -> name.EndsWith(suffix, StringComparison.Ordinal))

    /// The causal-mask buffers older checkpoints carry, h.{i}.attn.bias and h.{i}.attn.masked_bias: not weights.
    /// (Anchored on ".attn.": "h.0.attn.c_attn.bias" is a weight and must not match.)
    let isMaskBuffer (name: string) = Regex.IsMatch(name, @"^h\.\d+\.attn\.(bias|masked_bias)$")

    /// GPT2LMHeadModel names its body "transformer.": the bare GPT2Model names are the same without it.
    let stripPrefix (name: string) =
        if name.StartsWith("transformer.", StringComparison.Ordinal) then name.Substring "transformer.".Length else name

    // ---- checks before anything is allocated ----------------------------------------------------------------------

    /// The tensors a configuration has in the Hugging Face layout (Conv1D weights [in, out]), with their shapes and
    /// whether a file must hold them: the c_attn biases only with qkv_bias (transformers always writes them), lm_head
    /// only when the head is untied (a tied head may still be stored, as a copy of wte).
    let expectedTensors (config: GptConfig) : (string * int64[] * bool) list =
        let vocabulary, positions, d = int64 config.VocabSize, int64 config.ContextLength, int64 config.EmbeddingDim
        [ yield "wte.weight", [| vocabulary; d |], true
          yield "wpe.weight", [| positions; d |], true
          for i in 0 .. config.Layers - 1 do
              let h = sprintf "h.%d." i
              yield h + "ln_1.weight", [| d |], true
              yield h + "ln_1.bias", [| d |], true
              yield h + "attn.c_attn.weight", [| d; 3L * d |], true
              yield h + "attn.c_attn.bias", [| 3L * d |], config.QkvBias
              yield h + "attn.c_proj.weight", [| d; d |], true
              yield h + "attn.c_proj.bias", [| d |], true
              yield h + "ln_2.weight", [| d |], true
              yield h + "ln_2.bias", [| d |], true
              yield h + "mlp.c_fc.weight", [| d; 4L * d |], true
              yield h + "mlp.c_fc.bias", [| 4L * d |], true
              yield h + "mlp.c_proj.weight", [| 4L * d; d |], true
              yield h + "mlp.c_proj.bias", [| d |], true
          yield "ln_f.weight", [| d |], true
          yield "ln_f.bias", [| d |], true
          yield "lm_head.weight", [| vocabulary; d |], not config.TiedHead ]

    /// Names for an error message: at most `shown` of them, then how many there are in all.
    let listed (shown: int) (names: string list) =
        match List.length names with
        | n when n <= shown -> String.concat ", " names
        | n -> sprintf "%s, ... (%d in all)" (names |> List.truncate shown |> String.concat ", ") n

    /// What is wrong with the tensors a file describes — (name as stored, dtype as the file names it, whether that is
    /// a floating-point type, shape) — for a configuration: names both with and without "transformer.", non-float
    /// dtypes, wrong shapes, missing and unexpected names. It looks at descriptions only, so a loader can call it on a
    /// safetensors header before any tensor is read or any module built (a 367-byte config.json with n_embd 12288
    /// beside a small model's weights is refused at once, instead of building 7 GB first). At most a few names each.
    let describedProblems (config: GptConfig) (described: (string * string * bool * int64[]) list) : string list =
        let renamed = described |> List.map (fun ((name, _, _, _) as d) -> stripPrefix name, d)
        let twice = renamed |> List.countBy fst |> List.filter (fun (_, n) -> n > 1) |> List.map fst
        if not twice.IsEmpty then
            [ sprintf "these tensors appear both with and without the \"transformer.\" prefix: %s" (listed 5 twice) ]
        else
            let byName = renamed |> List.filter (fun (name, _) -> not (isMaskBuffer name)) |> dict
            let expected = expectedTensors config
            let known = expected |> List.map (fun (name, _, _) -> name) |> HashSet
            let wrong =
                [ for name, shape, _ in expected do
                      match byName.TryGetValue name with
                      | true, (stored, dtype, isFloat, found) ->
                          if not isFloat then yield sprintf "tensor '%s' has dtype %s, expected a floating-point dtype" stored dtype
                          elif found <> shape then
                              let layout = if isConv1DWeight name then " (Conv1D layout [in, out])" else ""
                              yield sprintf "tensor '%s' has shape %s, expected %s%s" stored (Errors.shapeText found) (Errors.shapeText shape) layout
                      | _ -> () ]
            let missing = [ for name, _, required in expected do if required && not (byName.ContainsKey name) then name ] |> List.sort
            let unexpected = [ for KeyValue(name, (stored, _, _, _)) in byName do if not (known.Contains name) then stored ] |> List.sort
            [ yield! List.truncate 3 wrong
              if wrong.Length > 3 then yield sprintf "and %d more tensors of the wrong shape or dtype" (wrong.Length - 3)
              if not missing.IsEmpty then yield sprintf "missing keys: %s" (listed 5 missing)
              if not unexpected.IsEmpty then yield sprintf "unexpected keys: %s" (listed 5 unexpected) ]

    /// Fails with describedProblems, naming the source: "checkpoint 'x': problem; problem".
    let checkDescribed (source: string) (config: GptConfig) (described: (string * string * bool * int64[]) list) =
        match describedProblems config described with
        | [] -> ()
        | problems -> Errors.fail "checkpoint '%s': %s" source (String.concat "; " problems)

    /// The descriptions of a safetensors header, for checkDescribed (dtypes under torch's names, as for tensors in
    /// memory).
    let describeHeader (header: Safetensors.Header) =
        let torchName =
            dict [ "F32", "Float32"; "F16", "Float16"; "BF16", "BFloat16"; "F64", "Float64"; "I64", "Int64"; "I32", "Int32"
                   "I16", "Int16"; "I8", "Int8"; "U8", "Byte"; "BOOL", "Bool" ]
        [ for entry in header.Entries ->
              let name = match torchName.TryGetValue entry.DType with | true, n -> n | _ -> entry.DType
              entry.Name, name, List.contains entry.DType [ "F32"; "F16"; "BF16"; "F64" ], entry.Shape ]

    /// The descriptions of tensors in memory, for checkDescribed.
    let describeTensors (tensors: (string * torch.Tensor) list) =
        [ for name, tensor in tensors -> name, string tensor.dtype, tensor.is_floating_point (), tensor.shape ]

    /// Fails unless every floating-point weight is finite, naming at most three tensors and how many there are
    /// (unless the options allow it).
    let checkFinite (options: LoadOptions) (source: string) (tensors: (string * torch.Tensor) list) =
        if not options.AllowNonFinite then
            try
                Safetensors.requireFinite source tensors
            with :? GptException as e ->
                Errors.fail "%s (load anyway with --allow-nonfinite, or AllowNonFinite in the load options)" e.Message

    // ---- load ---------------------------------------------------------------------------------------------------

    /// Builds a model from tensors in the Hugging Face layout (names with or without "transformer.", Conv1D
    /// weights [in, out], any float dtype). `source` names the file in error messages. The configuration adapts to
    /// what the tensors say: an lm_head.weight that differs from wte.weight makes the head untied; nonzero
    /// c_attn biases under qkv_bias = false turn the bias on. The model is returned in eval mode.
    let fromTensors (source: string) (config: GptConfig) (tensors: (string * torch.Tensor) list) : GptModel =
        let fail format = Printf.ksprintf (fun message -> raise (GptException(sprintf "checkpoint '%s': %s" source message))) format
        // Names, dtypes and shapes first, then the memory: nothing is built for tensors that do not fit.
        checkDescribed source config (describeTensors tensors)
        ModelMemory.require (sprintf "checkpoint '%s'" source) config
        let renamed = tensors |> List.map (fun (name, tensor) -> stripPrefix name, (name, tensor))
        match renamed |> List.countBy fst |> List.filter (fun (_, n) -> n > 1) with
        | [] -> ()
        | twice -> fail "these tensors appear both with and without the \"transformer.\" prefix: %s" (twice |> List.map fst |> String.concat ", ")
        let byName = renamed |> List.filter (fun (name, _) -> not (isMaskBuffer name)) |> Map.ofList
        let isZero (tensor: torch.Tensor) = tensor.count_nonzero().item<int64> () = 0L
        let tied =
            config.TiedHead
            && (match byName.TryFind "lm_head.weight", byName.TryFind "wte.weight" with
                | Some(_, head), Some(_, embedding) -> head.shape = embedding.shape && head.allclose(embedding, rtol = 0.0, atol = 0.0)
                | Some _, None -> false
                | None, _ -> true)
        let qkvBias =
            config.QkvBias
            || byName |> Map.exists (fun name (_, tensor) -> name.EndsWith(".attn.c_attn.bias", StringComparison.Ordinal) && not (isZero tensor))
        let config = { config with TiedHead = tied; QkvBias = qkvBias }
        // What a tied head or a bias-less attention leaves over: the copy of wte, and the zero biases we save for
        // transformers (whose GPT-2 always has them).
        let redundant (name: string) =
            (tied && name = "lm_head.weight") || (not qkvBias && name.EndsWith(".attn.c_attn.bias", StringComparison.Ordinal))
        let available = byName |> Map.filter (fun name _ -> not (redundant name))
        let model = GptModel.Uninitialised config // every weight is overwritten below
        try
            let layout name = if isConv1DWeight name then StateDict.TransposedFloat else StateDict.AnyFloat
            let stored = available |> Map.map (fun _ (_, tensor) -> tensor) |> Dictionary
            let display name = match available.TryFind name with Some(original, _) -> original | None -> name
            StateDict.copy (sprintf "checkpoint '%s'" source) "keys" display (StateDict.slotsOf layout model) stored
            model.eval ()
            model
        with _ ->
            model.Dispose()
            reraise ()

    /// Reads a pickled PyTorch state dict (`torch.save(model.state_dict(), path)`: a .pth, or transformers'
    /// pytorch_model.bin) with TorchPickle, which reads only tensors and plain containers, sorted by name. The caller
    /// owns the tensors.
    let readPyTorchStateDict (path: string) : (string * torch.Tensor) list =
        TorchPickle.readStateDict path |> List.sortBy fst

    /// fromTensors after checking that the weights are finite (unless the options allow NaN and infinities).
    let fromTensorsWith (options: LoadOptions) (source: string) (config: GptConfig) (tensors: (string * torch.Tensor) list) : GptModel =
        checkDescribed source config (describeTensors tensors)
        checkFinite options source tensors
        fromTensors source config tensors

    /// Loads a configuration and a pickled PyTorch state dict in the Hugging Face GPT-2 layout. Eval mode.
    let loadPyTorch (configPath: string) (statePath: string) : GptModel =
        let config = readConfig configPath
        let tensors = readPyTorchStateDict statePath
        try
            fromTensorsWith LoadOptions.defaults statePath config tensors
        finally
            for _, tensor in tensors do tensor.Dispose()

    /// The architectures a config.json names ("GPT2LMHeadModel", "GPT2ForSequenceClassification", ...).
    let architecturesOf (fields: ConfigFields) : string list =
        match fields.TryField "architectures" with
        | Some value when value.ValueKind = JsonValueKind.Array ->
            [ for item in value.EnumerateArray() do if item.ValueKind = JsonValueKind.String then item.GetString() ]
        | _ -> []

    /// A model folder's tensors: model.safetensors (F16/BF16 converted to float32), or pytorch_model.bin when there
    /// is no safetensors file, with the file they came from. The caller disposes them. `check` sees the safetensors
    /// header's descriptions (see describeHeader) before any tensor is read.
    let readTensorsChecked (check: string -> (string * string * bool * int64[]) list -> unit) (directory: string)
        : string * (string * torch.Tensor) list =
        let weightsPath = Path.Combine(directory, weightsFileName)
        let pytorchPath = Path.Combine(directory, pytorchFileName)
        // FileInfo.Exists: a dangling link is reported by the reader, not taken for a missing file.
        let exists (path: string) = FileInfo(path).Exists || Directory.Exists path || File.Exists path
        if exists weightsPath then
            check weightsPath (describeHeader (Safetensors.readHeader weightsPath))
            weightsPath, fst (Safetensors.readWithMetadata weightsPath)
        elif exists pytorchPath then pytorchPath, readPyTorchStateDict pytorchPath
        else Errors.fail "model directory '%s' has no %s (nor %s)" directory weightsFileName pytorchFileName

    /// A model folder's tensors (see readTensorsChecked), unchecked.
    let readTensors (directory: string) : string * (string * torch.Tensor) list = readTensorsChecked (fun _ _ -> ()) directory

    /// Loads DIR/config.json and DIR/model.safetensors (or DIR/pytorch_model.bin). The configuration is checked first
    /// (sizes within GptConfig's limits), then the safetensors header against it (names, dtypes, shapes) and the
    /// memory the model needs, all before a tensor is read or a module built; then the weights must be finite unless
    /// the options allow otherwise. Bad files fail naming the file, the tensor, expected and found shape or dtype,
    /// and the missing and unexpected keys. Eval mode.
    let loadWith (options: LoadOptions) (directory: string) : GptModel =
        if not (Directory.Exists directory) then Errors.fail "model directory '%s' does not exist" directory
        let configPath = Path.Combine(directory, configFileName)
        let config, architectures, endOfText =
            parseWith configPath (readConfigText configPath) (fun fields -> configOf fields, architecturesOf fields, endOfTextOf fields)
        if List.contains "GPT2ForSequenceClassification" architectures then
            Errors.fail "'%s' is a text classifier (GPT2ForSequenceClassification), not a language model: use it with gpt classify (TextClassifier)" directory
        let check source described =
            checkDescribed source config described
            ModelMemory.require (sprintf "checkpoint '%s'" source) config
        let source, tensors = readTensorsChecked check directory
        try
            let model = fromTensorsWith options source config tensors
            model.ConfiguredEndOfTextId <- endOfText
            model
        finally
            for _, tensor in tensors do tensor.Dispose()

    /// loadWith the default options: non-finite weights are an error.
    let load (directory: string) : GptModel = loadWith LoadOptions.defaults directory

    // ---- save ---------------------------------------------------------------------------------------------------

    /// The model's tensors under Hugging Face names and layout: Conv1D weights transposed to [in, out]; no lm_head
    /// when tied; zero c_attn biases when the model has none, so that transformers (whose GPT-2 always has them)
    /// computes the same function.
    let toTensors (model: GptModel) : (string * torch.Tensor) list =
        let config = model.Config
        [ for KeyValue(name, parameter) in model.state_dict () do
              let tensor = parameter.detach ()
              yield name, (if isConv1DWeight name then tensor.t().contiguous() else tensor)
              if not config.QkvBias && name.EndsWith(".attn.c_attn.weight", StringComparison.Ordinal) then
                  yield name.Replace(".weight", ".bias"), torch.zeros(3L * int64 config.EmbeddingDim, dtype = parameter.dtype) ]

    /// Writes DIR/config.json (configText) and DIR/model.safetensors (the tensors, made inside a dispose scope). A new directory is written as a temporary sibling and renamed
    /// into place; in an existing directory (which may hold other files, such as a tokenizer) each file is written
    /// under a temporary name and renamed over the old one, so no reader ever sees a half-written file.
    let writeDirectory (directory: string) (configText: string) (tensors: unit -> (string * torch.Tensor) list) =
        let directory = Path.GetFullPath directory
        let writeInto (folder: string) =
            use scope = torch.NewDisposeScope()
            let configTemporary = Path.Combine(folder, configFileName + ".tmp-" + Guid.NewGuid().ToString("N"))
            File.WriteAllText(configTemporary, configText)
            try
                Safetensors.write (Path.Combine(folder, weightsFileName)) (tensors ())
                File.Move(configTemporary, Path.Combine(folder, configFileName), true)
            with _ ->
                (try File.Delete configTemporary with _ -> ())
                reraise ()
        if Directory.Exists directory then
            writeInto directory
        else
            let parent = Path.GetDirectoryName directory
            if not (String.IsNullOrEmpty parent) then Directory.CreateDirectory parent |> ignore
            let temporary = directory + ".tmp-" + Guid.NewGuid().ToString("N")
            Directory.CreateDirectory temporary |> ignore
            try
                writeInto temporary
                Directory.Move(temporary, directory)
            with _ ->
                (try Directory.Delete(temporary, true) with _ -> ())
                reraise ()

    /// Writes a model in the Hugging Face layout: DIR/config.json and DIR/model.safetensors, atomically.
    /// Its end-of-text token is the one it stops at by default (GptModel.DefaultEndOfTextId).
    let save (directory: string) (model: GptModel) =
        writeDirectory directory (configJsonWith model.DefaultEndOfTextId model.Config) (fun () -> toTensors model)
