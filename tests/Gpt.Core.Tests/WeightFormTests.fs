/// One tiny GPT-2 in every form (reference/make_weight_forms.py): the book's .pth files, model_and_optimizer.pth and
/// OpenAI's TensorFlow checkpoint load to the logits of the safetensors original.
module Gpt.Tests.WeightFormTests

open System
open System.IO
open System.IO.Compression
open System.Text
open Expecto
open TorchSharp
open Gpt.Model
open Gpt.Weights
open Gpt.Training
open Gpt.Tests.TestUtil
open Gpt.Tests.ModelTestUtil

let private forms (relative: string) = fixture (Path.Combine("weights", relative))

/// The fixture's configuration (4 heads: a 32-wide model's heads are not in any shape).
let private config = lazy (Pretrained.readConfig (forms "hf/config.json"))

let private withConfig = lazy ({ ModelSource.defaults () with Config = Some config.Value })

/// Logits of a model for the fixture's input ids, and the Python reference's float64 logits.
let private logitsOf (model: GptModel) =
    let tensors = Safetensors.read (forms "reference.safetensors")
    try
        use ids = tensors["input_ids"].to_type torch.ScalarType.Int64
        use _ = torch.no_grad ()
        model.forward ids
    finally
        for KeyValue(_, t) in tensors do t.Dispose()

let private referenceLogits (name: string) =
    let tensors = Safetensors.read (forms "reference.safetensors")
    try tensors[name].to_type torch.ScalarType.Float32
    finally for KeyValue(_, t) in tensors do t.Dispose()

/// Expects `model` to compute the original's logits (<= 1e-6) and the independent float64 reference's (<= 1e-5).
let private expectSameFunction (model: GptModel) (original: string) (referenceName: string) (what: string) =
    use original = Pretrained.load (forms original)
    use expected = logitsOf original
    use actual = logitsOf model
    expectClose 1e-6 actual expected (sprintf "%s against the safetensors original" what)
    use reference = referenceLogits referenceName
    expectClose 1e-5 actual reference (sprintf "%s against the Python reference" what)

/// Rewrites a zip archive, transforming the bytes of each entry.
let private rewriteZip (source: string) (target: string) (edit: string -> byte[] -> byte[] option) =
    use input = ZipFile.OpenRead source
    use output = ZipFile.Open(target, ZipArchiveMode.Create)
    for entry in input.Entries do
        let bytes =
            use stream = entry.Open()
            use buffer = new MemoryStream()
            stream.CopyTo buffer
            buffer.ToArray()
        match edit entry.FullName bytes with
        | None -> ()
        | Some bytes ->
            use stream = output.CreateEntry(entry.FullName, CompressionLevel.NoCompression).Open()
            stream.Write(bytes, 0, bytes.Length)

/// A zip archive holding one data.pkl.
let private pickleFile (path: string) (program: byte[]) =
    use output = ZipFile.Open(path, ZipArchiveMode.Create)
    use stream = output.CreateEntry("archive/data.pkl").Open()
    stream.Write(program, 0, program.Length)

[<Tests>]
let bookTests =
    testList "weights: the book's .pth files" [
        for fused in [ "separate"; "fused" ] do
            for bias in [ "bias"; "nobias" ] do
                testCase (sprintf "model-%s-%s.pth loads to the original's logits" fused bias) <| fun () ->
                    use model = ModelSource.loadWith withConfig.Value (forms (sprintf "book/model-%s-%s.pth" fused bias))
                    Expect.equal model.Config.QkvBias (bias = "bias") "QKV bias from the file"
                    Expect.isTrue model.Config.TiedHead "out_head equal to tok_emb becomes a tied head"
                    let original, reference = if bias = "bias" then "hf", "logits" else "hf-nobias", "logits_nobias"
                    expectSameFunction model original reference (sprintf "%s %s" fused bias)

        testCase "the configuration comes from the shapes, a config.json beside the file, or --config" <| fun () ->
            use archive = TorchPickle.openArchive (forms "book/model-separate-bias.pth")
            let shapes = TorchPickle.stateDictEntries archive.Path archive.Root |> List.map (fun (k, t) -> k, t.Shape)
            let inferred = BookCheckpoint.inferConfig archive.Path (Some 4) shapes
            Expect.equal inferred { config.Value with DropRate = 0.1 } "sizes and bias from the shapes, heads given"
            throwsGpt [ "number of attention heads"; "32"; "--config" ] (fun () -> BookCheckpoint.inferConfig archive.Path None shapes |> ignore) "heads"
            let gpt2Shapes = [ "tok_emb.weight", [| 50257L; 768L |]; "pos_emb.weight", [| 256L; 768L |]; "trf_blocks.11.norm1.scale", [| 768L |] ]
            let small = BookCheckpoint.inferConfig "x" None gpt2Shapes
            Expect.equal (small.Heads, small.Layers, small.ContextLength, small.QkvBias) (12, 12, 256, false) "GPT-2's 64-wide heads"
            use temp = new TempDir()
            File.Copy(forms "book/model-separate-bias.pth", temp.File "model.pth")
            File.Copy(forms "hf/config.json", temp.File "config.json")
            use model = ModelSource.load (temp.File "model.pth")
            Expect.equal model.Config.Heads 4 "heads from the config.json beside the file"
            File.WriteAllText(temp.File "config.json", """{"vocab_size": 512, "context_length": 16, "emb_dim": 32, "n_heads": 4, "n_layers": 2, "drop_rate": 0.0, "qkv_bias": true}""")
            use fromBookConfig = ModelSource.load (temp.File "model.pth")
            expectSameFunction fromBookConfig "hf" "logits" "with the book's GPT_CONFIG as JSON"

        testCase "model_and_optimizer.pth: the model and AdamW's moments by our names; one more step matches PyTorch's" <| fun () ->
            let contents = BookCheckpoint.readWithOptimizer (Some config.Value) (forms "book/model_and_optimizer.pth")
            use model = contents.Model
            use state = contents.Optimizer.Value
            Expect.isFalse model.Config.TiedHead "a trained out_head is its own head"
            expectSameFunction model "hf-trained" "logits_trained" "model_and_optimizer"
            let group = List.exactlyOne state.Groups
            Expect.equal (group.LearningRate, group.Beta1, group.Beta2, group.Epsilon, group.WeightDecay) (1e-2, 0.9, 0.999, 1e-8, 0.1) "hyperparameters"
            let reference = Safetensors.read (forms "book/optimizer-reference.safetensors")
            try
                let names = model.named_parameters () |> Seq.map (fun struct (n, _) -> n) |> List.ofSeq
                Expect.equal (Set.ofSeq state.Steps.Keys) (Set.ofList names) "a state for every parameter"
                for name in names do
                    Expect.equal state.Steps[name] 2L (sprintf "%s: two steps" name)
                    expectEqual state.Moments[name + ".exp_avg"] reference["exp_avg." + name] (name + " exp_avg")
                    expectEqual state.Moments[name + ".exp_avg_sq"] reference["exp_avg_sq." + name] (name + " exp_avg_sq")
                // Continue training here: AdamW with the file's settings and state, one step on PyTorch's third batch.
                use optimizer =
                    Optimizer.adamW { LearningRate = group.LearningRate; Beta1 = group.Beta1; Beta2 = group.Beta2; Epsilon = group.Epsilon
                                      WeightDecay = group.WeightDecay; DecayAll = true } model
                Optimizer.restoreState "model_and_optimizer.pth" optimizer state.Moments state.Steps
                use batch = reference["batch"].to_type torch.ScalarType.Int64
                use inputs = batch.narrow(1L, 0L, 8L)
                use targets = batch.narrow(1L, 1L, 8L)
                optimizer.ZeroGrad()
                use loss = model.Loss(inputs, targets) // eval mode: no dropout, as the reference (drop rate 0)
                loss.backward ()
                optimizer.Step()
                for struct (name, parameter) in model.named_parameters () do
                    expectClose 1e-5 parameter reference["after." + name] (name + " after PyTorch's third step")
            finally
                for KeyValue(_, t) in reference do t.Dispose()

        testCase "the model of model_and_optimizer.pth loads through ModelSource as any state dict" <| fun () ->
            use model = ModelSource.loadWith withConfig.Value (forms "book/model_and_optimizer.pth")
            expectSameFunction model "hf-trained" "logits_trained" "model part"

        testCase "a given configuration that does not fit is an error naming the tensor, found and expected shape" <| fun () ->
            let wrong = { ModelSource.defaults () with Config = Some { config.Value with EmbeddingDim = 64 } }
            throwsGpt [ "model-separate-bias.pth"; "tok_emb.weight' has shape [512, 32], expected [512, 64]" ]
                (fun () -> ModelSource.loadWith wrong (forms "book/model-separate-bias.pth") |> ignore) "shape"

        testCase "missing and unknown keys are named in the book's terms" <| fun () ->
            use temp = new TempDir()
            let path = temp.File "edited.pth"
            // Renaming a key inside the pickle keeps the program valid (same length).
            rewriteZip (forms "book/model-separate-bias.pth") path (fun name bytes ->
                if name.EndsWith "data.pkl" then
                    let text = Encoding.Latin1.GetString bytes
                    Some(Encoding.Latin1.GetBytes(text.Replace("trf_blocks.1.ff.layers.2.bias", "trf_blocks.1.ff.layers.3.bias")))
                else Some bytes)
            throwsGpt [ "missing keys: trf_blocks.1.ff.layers.2.bias"; "unexpected keys: trf_blocks.1.ff.layers.3.bias" ]
                (fun () -> ModelSource.loadWith withConfig.Value path |> ignore) "keys"
    ]

[<Tests>]
let pickleSafetyTests =
    testList "weights: the restricted torch.save reader" [
        testCase "a pickle that calls os.system is refused before anything runs" <| fun () ->
            use temp = new TempDir()
            let path = temp.File "evil.pth"
            let program =
                Array.concat [ [| 0x80uy; 2uy |]; Encoding.ASCII.GetBytes "cos\nsystem\n"; [| byte 'X'; 7uy; 0uy; 0uy; 0uy |]
                               Encoding.ASCII.GetBytes "echo hi"; [| 0x85uy; byte 'R'; byte '.' |] ]
            pickleFile path program
            throwsGpt [ "evil.pth"; "'os.system'"; "only tensors and plain containers" ] (fun () -> TorchPickle.readStateDict path |> ignore) "global"

        testCase "a pickled object (BUILD on a class instance, NEWOBJ) is refused" <| fun () ->
            use temp = new TempDir()
            let path = temp.File "object.pth"
            pickleFile path (Array.concat [ [| 0x80uy; 2uy |]; Encoding.ASCII.GetBytes "c__main__\nGPTModel\n"; [| byte ')'; 0x81uy; byte '.' |] ])
            throwsGpt [ "'__main__.GPTModel'" ] (fun () -> TorchPickle.readStateDict path |> ignore) "class"

        testCase "a storage file shorter than the storage is an error, not zeros" <| fun () ->
            use temp = new TempDir()
            let path = temp.File "short.pth"
            rewriteZip (forms "book/model-separate-bias.pth") path (fun name bytes ->
                if name.EndsWith "/data/0" then Some bytes[.. bytes.Length / 2] else Some bytes)
            throwsGpt [ "short.pth"; "storage '0'"; "truncated or corrupt" ] (fun () -> TorchPickle.readStateDict path |> ignore) "short"

        testCase "a truncated file is an error naming it" <| fun () ->
            use temp = new TempDir()
            let path = temp.File "cut.pth"
            let bytes = File.ReadAllBytes(forms "book/model-separate-bias.pth")
            File.WriteAllBytes(path, bytes[.. bytes.Length / 2])
            throwsGpt [ "cut.pth" ] (fun () -> ModelSource.loadWith withConfig.Value path |> ignore) "cut"

        testCase "a view that reaches past its storage is an error before reading" <| fun () ->
            let path = forms "book/model-separate-bias.pth"
            use archive = TorchPickle.openArchive path
            let name, tensor = TorchPickle.stateDictEntries path archive.Root |> List.head
            let shrunk = { tensor with Storage = { tensor.Storage with Elements = 3L } }
            throwsGpt [ name; "reaches element"; "which has 3" ] (fun () -> archive.Materialize(name, shrunk) |> ignore) "extent"
    ]

[<Tests>]
let tensorFlowTests =
    testList "weights: OpenAI's TensorFlow checkpoint" [
        testCase "CRC-32C gives the standard check value" <| fun () ->
            Expect.equal (TensorFlowBundle.crc32c 0u (ReadOnlySpan(Encoding.ASCII.GetBytes "123456789"))) 0xE3069283u "crc32c(\"123456789\")"

        testCase "the bundle index lists every variable with dtype, shape, offset and size" <| fun () ->
            let header, entries = TensorFlowBundle.readIndex (forms "openai/model.ckpt.index")
            Expect.equal header.Shards 1 "one shard"
            Expect.equal entries.Length (4 + 2 * 12) "variables"
            let attn = entries |> List.find (fun e -> e.Name = "model/h0/attn/c_attn/w")
            Expect.equal (attn.DType, attn.Shape, attn.Size) (1, [| 1L; 32L; 96L |], 1L * 32L * 96L * 4L) "c_attn/w"
            Expect.equal (entries |> List.map _.Name) (entries |> List.map _.Name |> List.sortWith (fun a b -> String.CompareOrdinal(a, b))) "key order"

        testCase "the checkpoint folder loads to the original's logits" <| fun () ->
            use model = ModelSource.load (forms "openai")
            Expect.equal (model.Config.Heads, model.Config.Layers, model.Config.QkvBias, model.Config.TiedHead) (4, 2, true, true) "config from hparams.json"
            expectSameFunction model "hf" "logits" "TensorFlow bundle"
            use throughIndex = ModelSource.load (forms "openai/model.ckpt.index")
            expectSameFunction throughIndex "hf" "logits" "through the index file's path"

        testCase "a flipped byte in the data file fails the tensor's checksum" <| fun () ->
            use temp = new TempDir()
            for file in Directory.GetFiles(forms "openai") do File.Copy(file, temp.File(Path.GetFileName file))
            let data = temp.File "model.ckpt.data-00000-of-00001"
            let bytes = File.ReadAllBytes data
            bytes[1000] <- bytes[1000] ^^^ 0x10uy
            File.WriteAllBytes(data, bytes)
            throwsGpt [ "fails its checksum"; "corrupt" ] (fun () -> TensorFlowBundle.load temp.Path |> ignore) "crc"

        testCase "a truncated data file, a corrupt index and hparams that do not fit are errors before reading" <| fun () ->
            use temp = new TempDir()
            for file in Directory.GetFiles(forms "openai") do File.Copy(file, temp.File(Path.GetFileName file))
            let data = temp.File "model.ckpt.data-00000-of-00001"
            let original = File.ReadAllBytes data
            File.WriteAllBytes(data, original[.. original.Length - 100])
            throwsGpt [ "runs past the end"; "truncated or corrupt" ] (fun () -> TensorFlowBundle.load temp.Path |> ignore) "truncated"
            File.WriteAllBytes(data, original)
            let index = temp.File "model.ckpt.index"
            let indexBytes = File.ReadAllBytes index
            let flipped = Array.copy indexBytes
            flipped[20] <- flipped[20] ^^^ 0x01uy
            File.WriteAllBytes(index, flipped)
            throwsGpt [ "model.ckpt.index"; "checksum" ] (fun () -> TensorFlowBundle.load temp.Path |> ignore) "index crc"
            File.WriteAllBytes(index, indexBytes)
            File.WriteAllText(temp.File "hparams.json", """{"n_vocab": 512, "n_ctx": 16, "n_embd": 64, "n_head": 4, "n_layer": 2}""")
            throwsGpt [ "'model/wte' has shape [512, 32], expected [512, 64]" ] (fun () -> TensorFlowBundle.load temp.Path |> ignore) "hparams"
    ]

[<Tests>]
let sourceTests =
    testList "weights: what --model names" [
        testCase "folders, files and ids are told apart without reading weights" <| fun () ->
            Expect.equal (ModelSource.classify (forms "hf")) (HuggingFaceFolder(forms "hf")) "HF folder"
            Expect.equal (ModelSource.classify (forms "openai")) (OpenAICheckpoint(forms "openai")) "OpenAI folder"
            Expect.equal (ModelSource.classify (forms "book/model-fused-bias.pth")) (StateDictFile(forms "book/model-fused-bias.pth")) ".pth"
            Expect.equal (ModelSource.classify "gpt2") (HubModel { RepoId = "gpt2"; Revision = "main" }) "id"
            Expect.equal (ModelSource.classify "user/name@v1.0") (HubModel { RepoId = "user/name"; Revision = "v1.0" }) "id with revision"
            throwsGpt [ "'missing/model.pth' does not exist" ] (fun () -> ModelSource.classify "missing/model.pth" |> ignore) "missing file"
            throwsGpt [ "'a/b/c' does not exist" ] (fun () -> ModelSource.classify "a/b/c" |> ignore) "three parts: a path"

        testCase "a configuration given for a folder with its own is an error, not ignored" <| fun () ->
            throwsGpt [ "carries its own" ] (fun () -> ModelSource.loadWith withConfig.Value (forms "hf") |> ignore) "override"
    ]
