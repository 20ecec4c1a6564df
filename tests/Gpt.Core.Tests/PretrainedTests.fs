module Gpt.Tests.PretrainedTests

open System
open System.IO
open System.Text
open System.Text.Json
open Expecto
open TorchSharp
open Gpt.Model
open Gpt.Weights
open Gpt.Kernels
open Gpt.Tests.TestUtil
open Gpt.Tests.ModelTestUtil

/// Disposes every tensor of a map read from a file.
let disposeAll (tensors: Map<string, torch.Tensor>) = for KeyValue(_, tensor) in tensors do tensor.Dispose()

/// Runs f on the tensors of a safetensors file, then disposes them.
let withTensors (path: string) (f: Map<string, torch.Tensor> -> 'T) =
    let tensors = Safetensors.read path
    try f tensors finally disposeAll tensors

/// A model directory in `temp`: the tiny fixture's config.json (possibly edited) and the given tensors.
let modelDirectory (temp: TempDir) (editConfig: string -> string) (tensors: (string * torch.Tensor) seq) =
    let directory = temp.File "model"
    Directory.CreateDirectory directory |> ignore
    File.WriteAllText(Path.Combine(directory, "config.json"), editConfig (File.ReadAllText(fixture "tiny-gpt2/config.json")))
    Safetensors.write (Path.Combine(directory, "model.safetensors")) tensors
    directory

/// The tiny fixture's weights, edited by `edit` (name/tensor list in, list out), written as a model directory.
let editedFixture (temp: TempDir) (edit: (string * torch.Tensor) list -> (string * torch.Tensor) list) =
    let tensors, _ = Safetensors.readWithMetadata (fixture "tiny-gpt2/model.safetensors")
    try modelDirectory temp id (edit tensors) finally for _, t in tensors do t.Dispose()

/// A safetensors file from raw header text and data bytes.
let rawFile (path: string) (header: string) (data: byte[]) =
    let headerBytes = Encoding.UTF8.GetBytes header
    File.WriteAllBytes(path, Array.concat [ BitConverter.GetBytes(uint64 headerBytes.Length); headerBytes; data ])

let goldenTest (name: string) =
    testCase (sprintf "golden %s: logits within 1e-4, loss within 1e-4, greedy ids exactly (through the crop)" name) <| fun () ->
        let directory = fixture name
        use model = Pretrained.load directory
        Expect.isFalse model.training "loaded in eval mode"
        withTensors (Path.Combine(directory, "reference.safetensors")) (fun reference ->
            use _ = torch.no_grad ()
            use logits = model.forward reference["input_ids"]
            let difference = maxAbsDifference logits reference["logits"]
            stdout.WriteLine(sprintf "golden %s: max |logits - reference| = %.3g" name difference)
            expectClose 1e-4 logits reference["logits"] "logits"
            use loss = torch.nn.functional.cross_entropy(logits.flatten(0L, 1L), reference["targets"].flatten())
            expectClose 1e-4 loss (reference["loss"].squeeze()) "loss"
            let prompt = reference["greedy_prompt"]
            let expected = longs reference["greedy_ids"]
            Expect.isGreaterThan expected.Length model.Config.ContextLength "the fixture runs past the context length"
            use prompt2d = prompt.unsqueeze 0L
            use generated = Gpt.Generation.Generator.generateTextSimple model prompt2d (expected.Length - int prompt.shape[0]) model.Config.ContextLength
            Expect.equal (longs generated) expected "greedy ids")

[<Tests>]
let goldenTests =
    testList "pretrained: golden fixtures from the independent PyTorch reference" [
        goldenTest "tiny-gpt2"
        goldenTest "tiny-gpt2-f16-prefixed"

        testCase "the fixture's config is read from the Hugging Face keys" <| fun () ->
            let config = Pretrained.readConfig (fixture "tiny-gpt2/config.json")
            let expected =
                { VocabSize = 50257; ContextLength = 16; EmbeddingDim = 32; Heads = 4; Layers = 2; DropRate = 0.1
                  QkvBias = true; TiedHead = true; LayerNormEpsilon = 1e-5 }
            Expect.equal config expected "config"

        testCase "both fixtures load to the same function (F16 rounding aside)" <| fun () ->
            use plain = Pretrained.load (fixture "tiny-gpt2")
            use prefixed = Pretrained.load (fixture "tiny-gpt2-f16-prefixed")
            use ids = randomIds 1 50257 2 16
            use _ = torch.no_grad ()
            expectClose 1e-2 (prefixed.forward ids) (plain.forward ids) "f16 weights"
    ]

[<Tests>]
let roundTripTests =
    testList "pretrained: save and load" [
        testCase "save -> load reproduces the logits exactly, tied or not, with or without QKV bias" <| fun () ->
            for qkvBias in [ true; false ] do
                for tied in [ true; false ] do
                    use temp = new TempDir()
                    let config = { tinyConfig with QkvBias = qkvBias; TiedHead = tied; DropRate = 0.2 }
                    use model = new GptModel(config, 11L)
                    Pretrained.save (temp.File "saved") model
                    use loaded = Pretrained.load (temp.File "saved")
                    Expect.equal loaded.Config config (sprintf "config, bias %b tied %b" qkvBias tied)
                    use ids = randomIds 2 97 2 12
                    model.eval ()
                    use _ = torch.no_grad ()
                    expectEqual (loaded.forward ids) (model.forward ids) (sprintf "logits, bias %b tied %b" qkvBias tied)

        testCase "the saved files are the Hugging Face layout" <| fun () ->
            use temp = new TempDir()
            use model = new GptModel({ tinyConfig with VocabSize = 50257; QkvBias = false }, 1L)
            Pretrained.save (temp.File "saved") model
            use document = JsonDocument.Parse(File.ReadAllText(temp.File "saved/config.json"))
            let root = document.RootElement
            let text (key: string) = root.GetProperty(key).ToString()
            Expect.equal (text "model_type", text "activation_function") ("gpt2", "gelu_new") "model type, activation"
            Expect.equal (root.GetProperty("architectures").[0].GetString()) "GPT2LMHeadModel" "architectures"
            Expect.equal (text "n_ctx", text "n_positions", text "n_embd", text "n_head", text "n_layer") ("12", "12", "16", "4", "2") "sizes"
            Expect.equal (text "bos_token_id", text "eos_token_id", text "vocab_size") ("50256", "50256", "50257") "tokens"
            Expect.equal (text "tie_word_embeddings", text "qkv_bias") ("True", "False") "our extra keys"
            let header = Safetensors.readHeader (temp.File "saved/model.safetensors")
            Expect.equal (header.Metadata.TryFind "format") (Some "pt") "format pt, as transformers requires"
            let shapes = header.Entries |> List.map (fun e -> e.Name, List.ofArray e.Shape) |> Map.ofList
            Expect.equal shapes["h.0.attn.c_attn.weight"] [ 16L; 48L ] "Conv1D [in, out]"
            Expect.equal shapes["h.1.mlp.c_proj.weight"] [ 64L; 16L ] "Conv1D [in, out]"
            Expect.equal shapes["h.0.attn.c_attn.bias"] [ 48L ] "zero bias for transformers"
            Expect.isFalse (shapes.ContainsKey "lm_head.weight") "no lm_head when tied"
            withTensors (temp.File "saved/model.safetensors") (fun tensors ->
                Expect.equal (tensors["h.1.attn.c_attn.bias"].abs().sum().item<float32> ()) 0.0f "the bias is zero")

        testCase "saving into an existing directory replaces our files, keeps the others, leaves no temporary files" <| fun () ->
            use temp = new TempDir()
            let directory = temp.File "saved"
            use first = new GptModel(tinyConfig, 1L)
            use second = new GptModel({ tinyConfig with TiedHead = false }, 2L)
            Pretrained.save directory first
            File.WriteAllText(Path.Combine(directory, "tokenizer.json"), "{}")
            Pretrained.save directory second
            use loaded = Pretrained.load directory
            Expect.isFalse loaded.Config.TiedHead "the second model"
            Expect.equal (Directory.GetFiles directory |> Array.map Path.GetFileName |> Array.sort) [| "config.json"; "model.safetensors"; "tokenizer.json" |] "files"
            Expect.equal (Directory.GetDirectories temp.Path |> Array.map Path.GetFileName) [| "saved" |] "no temporary directory"

        testCase "lm_head.weight equal to wte stays tied; a different one loads as a separate head" <| fun () ->
            use temp = new TempDir()
            let withHead (scale: float) =
                editedFixture temp (fun tensors -> tensors @ [ "lm_head.weight", (snd (tensors |> List.find (fun (n, _) -> n = "wte.weight"))) * scale ])
            use reference = Pretrained.load (fixture "tiny-gpt2")
            use ids = randomIds 3 50257 1 8
            use _ = torch.no_grad ()
            use tied = Pretrained.load (withHead 1.0)
            Expect.isTrue tied.Config.TiedHead "equal copy: tied"
            expectEqual (tied.forward ids) (reference.forward ids) "same logits"
            Directory.Delete(temp.File "model", true)
            use untied = Pretrained.load (withHead 0.5)
            Expect.isFalse untied.Config.TiedHead "different head: untied"
            expectClose 1e-5 (untied.forward ids) ((reference.forward ids) * 0.5) "head = wte / 2 gives half the logits"

        testCase "nonzero c_attn biases under qkv_bias false turn the bias on; mask buffers are skipped" <| fun () ->
            use temp = new TempDir()
            let tensors, _ = Safetensors.readWithMetadata (fixture "tiny-gpt2/model.safetensors")
            try
                let extra = [ "h.0.attn.masked_bias", torch.tensor(-1e4f) ]
                let directory = modelDirectory temp (fun text -> text.Replace("\"n_layer\": 2,", "\"n_layer\": 2, \"qkv_bias\": false,")) (tensors @ extra)
                use model = Pretrained.load directory
                Expect.isTrue model.Config.QkvBias "bias on"
            finally
                for _, t in tensors do t.Dispose()
    ]

[<Tests>]
let endOfTextTests =
    let generate (model: GptModel) (options: Gpt.Generation.GenerationOptions) =
        (Gpt.Generation.Generator.generate (Gpt.Generation.LanguageModel.ofGpt model) options [ [| 1; 2 |] ])[0]
    let configText (directory: string) = File.ReadAllText(Path.Combine(directory, "config.json"))
    let setEndOfText (directory: string) (value: string) =
        let path = Path.Combine(directory, "config.json")
        File.WriteAllText(path, (File.ReadAllText path).Replace("\"eos_token_id\": null", sprintf "\"eos_token_id\": %s" value))
    testList "pretrained: the end-of-text token comes from the model's config" [
        testCase "EndOfText.resolve: the configured id inside the vocabulary, else 50256 when inside, else none" <| fun () ->
            Expect.equal (EndOfText.resolve (Some 7) 97) (Some 7) "configured"
            Expect.equal (EndOfText.resolve None 50257) (Some 50256) "GPT-2's"
            Expect.equal (EndOfText.resolve (Some 50256) 50257) (Some 50256) "GPT-2's, configured"
            Expect.equal (EndOfText.resolve None 97) None "a small vocabulary has none"
            Expect.equal (EndOfText.resolve (Some 500) 97) None "a configured id outside the vocabulary is not used"
            Expect.equal (EndOfText.resolve (Some 500) 50257) (Some 500) "any id inside"

        testCase "a model of a small vocabulary saves no end-of-text token and generates without one" <| fun () ->
            use temp = new TempDir()
            use model = new GptModel(tinyConfig, 1L)
            Pretrained.save (temp.File "small") model
            use document = JsonDocument.Parse(configText (temp.File "small"))
            Expect.equal (document.RootElement.GetProperty("eos_token_id").ValueKind) JsonValueKind.Null "eos_token_id: null"
            Expect.equal (document.RootElement.GetProperty("bos_token_id").ValueKind) JsonValueKind.Null "bos_token_id: null"
            use loaded = ModelSource.load (temp.File "small")
            Expect.equal (loaded.ConfiguredEndOfTextId, loaded.DefaultEndOfTextId) (None, None) "none configured, none by default"
            let completion = generate loaded { Gpt.Generation.GenerationOptions.forModel loaded with MaxNewTokens = 5 }
            Expect.equal completion.Tokens.Length 5 "five tokens, no error about 50256"
            throwsGpt [ "end-of-text id 50256 is outside the model's vocabulary (0..96)" ]
                (fun () -> generate loaded { Gpt.Generation.GenerationOptions.defaults with MaxNewTokens = 5 } |> ignore) "asked for explicitly: an error"

        testCase "the config's eos_token_id is where generation stops by default, and is saved again" <| fun () ->
            use temp = new TempDir()
            use model = new GptModel(tinyConfig, 1L)
            let first = (generate model { Gpt.Generation.GenerationOptions.defaults with MaxNewTokens = 1; EndOfTextId = None }).Tokens[0]
            Pretrained.save (temp.File "m") model
            setEndOfText (temp.File "m") (string first)
            use loaded = ModelSource.load (temp.File "m")
            Expect.equal (loaded.ConfiguredEndOfTextId, loaded.DefaultEndOfTextId) (Some first, Some first) "the config's"
            let completion = generate loaded { Gpt.Generation.GenerationOptions.forModel loaded with MaxNewTokens = 5 }
            Expect.equal (completion.Tokens, completion.StopReason) ([||], Gpt.Generation.StopReason.EndOfText) "stops at once at the greedy token"
            Pretrained.save (temp.File "again") loaded
            Expect.stringContains (configText (temp.File "again")) (sprintf "\"eos_token_id\": %d" first) "saved again"

        testCase "eos_token_id as a list (the first counts), outside the vocabulary (ignored), or of a wrong kind (an error)" <| fun () ->
            use temp = new TempDir()
            use model = new GptModel(tinyConfig, 1L)
            Pretrained.save (temp.File "m") model
            setEndOfText (temp.File "m") "[5, 6]"
            (use loaded = Pretrained.load (temp.File "m") in Expect.equal loaded.DefaultEndOfTextId (Some 5) "the first of a list")
            File.WriteAllText(temp.File "m/config.json", (configText (temp.File "m")).Replace("[5, 6]", "500"))
            (use loaded = Pretrained.load (temp.File "m") in Expect.equal (loaded.ConfiguredEndOfTextId, loaded.DefaultEndOfTextId) (Some 500, None) "outside: none")
            File.WriteAllText(temp.File "m/config.json", (configText (temp.File "m")).Replace("500", "\"x\""))
            throwsGpt [ "config.json"; "\"eos_token_id\" must be an integer, found \"x\"" ] (fun () -> Pretrained.load (temp.File "m") |> ignore) "a string"
    ]

[<Tests>]
let pytorchTests =
    testList "pretrained: PyTorch state dicts through TorchSharp.PyBridge" [
        testCase "a pickled state dict (prefixed names, as transformers writes) loads to the fixture's logits" <| fun () ->
            use temp = new TempDir()
            let tensors, _ = Safetensors.readWithMetadata (fixture "tiny-gpt2/model.safetensors")
            try
                let state = Collections.Generic.Dictionary<string, torch.Tensor>()
                for name, tensor in tensors do state["transformer." + name] <- tensor
                state["lm_head.weight"] <- snd (tensors |> List.find (fun (n, _) -> n = "wte.weight"))
                let directory = temp.File "pt"
                Directory.CreateDirectory directory |> ignore
                File.Copy(fixture "tiny-gpt2/config.json", Path.Combine(directory, "config.json"))
                TorchSharp.PyBridge.PyTorchPickler.PickleStateDict(Path.Combine(directory, "pytorch_model.bin"), state)
                use fromPickle = Pretrained.load directory
                use fromSafetensors = Pretrained.load (fixture "tiny-gpt2")
                Expect.isTrue fromPickle.Config.TiedHead "the lm_head copy of wte is recognised"
                use ids = randomIds 4 50257 2 16
                use _ = torch.no_grad ()
                expectEqual (fromPickle.forward ids) (fromSafetensors.forward ids) "logits"
            finally
                for _, t in tensors do t.Dispose()

        testCase "a corrupt pickle is an error naming the file" <| fun () ->
            use temp = new TempDir()
            let path = temp.File "bad.pth"
            File.WriteAllBytes(path, Encoding.ASCII.GetBytes "PK\003\004 not really a zip")
            throwsGpt [ "PyTorch checkpoint"; "bad.pth"; "could not be read" ] (fun () -> Pretrained.loadPyTorch (fixture "tiny-gpt2/config.json") path |> ignore) "corrupt"
    ]

[<Tests>]
let badCheckpointTests =
    testList "pretrained: bad files fail with the file, the tensor, expected and found" [
        testCase "a wrong shape names tensor, found and expected shape" <| fun () ->
            use temp = new TempDir()
            let directory =
                editedFixture temp (List.map (fun (name, tensor) ->
                    if name = "h.0.attn.c_attn.weight" then name, tensor.t().contiguous() else name, tensor))
            throwsGpt [ "model.safetensors"; "tensor 'h.0.attn.c_attn.weight' has shape [96, 32], expected [32, 96] (Conv1D layout [in, out])" ]
                (fun () -> Pretrained.load directory |> ignore) "transposed"

        testCase "missing and unexpected keys are listed" <| fun () ->
            use temp = new TempDir()
            let directory =
                editedFixture temp (fun tensors ->
                    (tensors |> List.filter (fun (name, _) -> name <> "h.1.mlp.c_fc.bias" && name <> "ln_f.bias"))
                    @ [ "h.0.attn.extra", torch.zeros(2L); "decoder.weight", torch.zeros(2L) ])
            throwsGpt [ "missing keys: h.1.mlp.c_fc.bias, ln_f.bias"; "unexpected keys: decoder.weight, h.0.attn.extra" ]
                (fun () -> Pretrained.load directory |> ignore) "keys"

        testCase "an integer weight names its dtype" <| fun () ->
            use temp = new TempDir()
            let directory = editedFixture temp (List.map (fun (name, tensor) -> if name = "ln_f.weight" then name, tensor.``to``(torch.int32) else name, tensor))
            throwsGpt [ "tensor 'ln_f.weight' has dtype Int32, expected a floating-point dtype" ] (fun () -> Pretrained.load directory |> ignore) "dtype"

        testCase "a name both with and without the transformer. prefix" <| fun () ->
            use temp = new TempDir()
            let directory = editedFixture temp (fun tensors -> tensors @ [ "transformer.wpe.weight", torch.zeros(16L, 32L) ])
            throwsGpt [ "both with and without the \"transformer.\" prefix: wpe.weight" ] (fun () -> Pretrained.load directory |> ignore) "prefix"

        testCase "config.json problems name the file and the key" <| fun () ->
            let loadWith (edit: string -> string) =
                use temp = new TempDir()
                let directory = editedFixture temp id
                File.WriteAllText(Path.Combine(directory, "config.json"), edit (File.ReadAllText(fixture "tiny-gpt2/config.json")))
                Pretrained.load directory |> ignore
            throwsGpt [ "config.json"; "missing \"n_embd\"" ] (fun () -> loadWith (fun t -> t.Replace("\"n_embd\"", "\"n_embed\""))) "missing"
            throwsGpt [ "config.json"; "embedding dimension 770 is not divisible by 4 heads" ] (fun () -> loadWith (fun t -> t.Replace("\"n_embd\": 32", "\"n_embd\": 770"))) "divisible"
            throwsGpt [ "\"n_head\" must be an integer, found \"4\"" ] (fun () -> loadWith (fun t -> t.Replace("\"n_head\": 4", "\"n_head\": \"4\""))) "type"
            throwsGpt [ "\"layer_norm_epsilon\" must be a number, found true" ] (fun () -> loadWith (fun t -> t.Replace("1e-05", "true"))) "number"
            throwsGpt [ "activation_function \"relu\" is not supported" ] (fun () -> loadWith (fun t -> t.Replace("gelu_new", "relu"))) "activation"
            throwsGpt [ "config.json"; "not valid JSON" ] (fun () -> loadWith (fun t -> t.Substring(0, 40))) "json"

        testCase "missing directory or files" <| fun () ->
            use temp = new TempDir()
            throwsGpt [ "model directory"; "does not exist" ] (fun () -> Pretrained.load (temp.File "nowhere") |> ignore) "directory"
            Directory.CreateDirectory(temp.File "empty") |> ignore
            throwsGpt [ "config.json' does not exist" ] (fun () -> Pretrained.load (temp.File "empty") |> ignore) "config"
            File.Copy(fixture "tiny-gpt2/config.json", temp.File "empty/config.json")
            throwsGpt [ "has no model.safetensors (nor pytorch_model.bin)" ] (fun () -> Pretrained.load (temp.File "empty") |> ignore) "weights"
    ]

[<Tests>]
let safetensorsTests =
    testList "safetensors" [
        testCase "every dtype round-trips; F16 and BF16 come back as float32; metadata kept; header 8-aligned" <| fun () ->
            use temp = new TempDir()
            let values = [| 1.5f; -2.25f; 0.0f; 1024.0f; -0.125f; 3.0f |]
            use source = torch.tensor(values).view(2L, 3L)
            let tensors =
                [ "f32", source.``to``(torch.float32); "f16", source.``to``(torch.float16); "bf16", source.``to``(torch.bfloat16)
                  "f64", source.``to``(torch.float64); "i64", source.``to``(torch.int64); "i32", source.``to``(torch.int32)
                  "u8", torch.tensor([| 0uy; 255uy |]); "scalar", torch.tensor(7.0f); "empty", torch.zeros(0L, 4L) ]
            let path = temp.File "all.safetensors"
            Safetensors.writeWithMetadata path (Map.ofList [ "format", "pt"; "note", "ünïcode" ]) tensors
            let header = Safetensors.readHeader path
            Expect.equal (header.Entries |> List.map (fun e -> e.DType)) [ "F32"; "F16"; "BF16"; "F64"; "I64"; "I32"; "U8"; "F32"; "F32" ] "dtypes"
            Expect.equal header.Metadata (Map.ofList [ "format", "pt"; "note", "ünïcode" ]) "metadata"
            Expect.equal (header.DataStart % 8L) 0L "aligned"
            let read, metadata = Safetensors.readWithMetadata path
            let read = Map.ofList read
            try
                Expect.equal metadata header.Metadata "metadata again"
                for name in [ "f32"; "f16"; "bf16" ] do
                    Expect.equal read[name].dtype torch.float32 (name + " as float32")
                    expectEqual read[name] source name
                Expect.equal read["f64"].dtype torch.float64 "f64 kept"
                Expect.equal (read["i64"].dtype, read["i32"].dtype) (torch.int64, torch.int32) "integers kept"
                Expect.equal (longs read["i64"]) [| 1L; -2L; 0L; 1024L; 0L; 3L |] "i64 values"
                Expect.equal read["scalar"].shape [||] "scalar shape"
                Expect.equal read["empty"].shape [| 0L; 4L |] "empty shape"
            finally
                disposeAll read
                for _, t in tensors do t.Dispose()

        testCase "writing replaces the file atomically and leaves no temporary file; duplicate names fail" <| fun () ->
            use temp = new TempDir()
            let path = temp.File "x.safetensors"
            Safetensors.write path [ "a", torch.ones(3L) ]
            Safetensors.write path [ "b", torch.zeros(2L) ]
            Expect.equal (Directory.GetFiles temp.Path |> Array.map Path.GetFileName) [| "x.safetensors" |] "one file"
            withTensors path (fun tensors -> Expect.equal (tensors |> Map.keys |> List.ofSeq) [ "b" ] "replaced")
            throwsGpt [ "x.safetensors"; "found twice: a" ] (fun () -> Safetensors.write path [ "a", torch.ones(1L); "a", torch.ones(1L) ]) "duplicates"

        testCase "corrupt and truncated files are errors naming the file and the tensor" <| fun () ->
            use temp = new TempDir()
            let path = temp.File "bad.safetensors"
            let fails fragments (make: unit -> unit) (what: string) =
                make ()
                throwsGpt ("bad.safetensors" :: fragments) (fun () -> Safetensors.read path |> disposeAll) what
            let twelve = Array.zeroCreate<byte> 12
            fails [ "the file has 4 bytes, too short for the 8-byte header length" ] (fun () -> File.WriteAllBytes(path, [| 1uy; 0uy; 0uy; 0uy |])) "short"
            fails [ "the header length 1000 runs past the end of the file (20 bytes)" ]
                (fun () -> File.WriteAllBytes(path, Array.append (BitConverter.GetBytes 1000UL) twelve)) "header length"
            fails [ "the header is not valid JSON" ] (fun () -> rawFile path "{\"a\": {\"dtype\": " twelve) "json"
            fails [ "the header is not a JSON object" ] (fun () -> rawFile path "[1, 2]" twelve) "array"
            fails [ "tensor 'a': the header entry has no \"shape\"" ] (fun () -> rawFile path """{"a": {"dtype": "F32", "data_offsets": [0, 12]}}""" twelve) "no shape"
            fails [ "tensor 'a'"; "non-negative integers, found [-3]" ] (fun () -> rawFile path """{"a": {"dtype": "F32", "shape": [-3], "data_offsets": [0, 12]}}""" twelve) "negative"
            fails [ "tensor 'a'"; "non-negative integers, found [\"3\"]" ] (fun () -> rawFile path """{"a": {"dtype": "F32", "shape": ["3"], "data_offsets": [0, 12]}}""" twelve) "string"
            fails [ "tensor 'a': \"dtype\" is not a string" ] (fun () -> rawFile path """{"a": {"dtype": 5, "shape": [3], "data_offsets": [0, 12]}}""" twelve) "dtype type"
            fails [ "tensor 'a' has dtype F8_E4M3, expected one of F32" ] (fun () -> rawFile path """{"a": {"dtype": "F8_E4M3", "shape": [3], "data_offsets": [0, 3]}}""" twelve) "dtype"
            fails [ "tensor 'a' has 8 bytes of data, but shape [3] of F32 needs 12" ] (fun () -> rawFile path """{"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}""" twelve) "size"
            fails [ "tensor 'b' has data offsets [12, 24] past the end of the data (12 bytes)"; "truncated" ]
                (fun () -> rawFile path """{"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}, "b": {"dtype": "F32", "shape": [3], "data_offsets": [12, 24]}}""" twelve) "out of range"
            fails [ "tensors 'a' [0, 8] and 'b' [4, 12] overlap" ]
                (fun () -> rawFile path """{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}""" twelve) "overlap"
            fails [ "\"data_offsets\" must be [begin, end] with begin <= end" ] (fun () -> rawFile path """{"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}}""" twelve) "reversed"
            fails [ "metadata 'n' is not a string" ] (fun () -> rawFile path """{"__metadata__": {"n": 3}}""" twelve) "metadata"
            fails [ "tensor 'a' appears twice" ] (fun () -> rawFile path """{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}""" twelve) "twice"
            throwsGpt [ "missing.safetensors' does not exist" ] (fun () -> Safetensors.read (temp.File "missing.safetensors") |> disposeAll) "missing"

        testCase "a truncated copy of the fixture fails naming the last tensor; the model loader passes the error on" <| fun () ->
            use temp = new TempDir()
            let directory = editedFixture temp id
            let weights = Path.Combine(directory, "model.safetensors")
            let bytes = File.ReadAllBytes weights
            File.WriteAllBytes(weights, bytes[.. bytes.Length - 11])
            throwsGpt [ weights; "tensor 'ln_f.bias' has data offsets"; "truncated" ] (fun () -> Pretrained.load directory |> ignore) "truncated"
    ]
