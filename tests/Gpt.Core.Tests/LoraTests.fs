module Gpt.Tests.LoraTests

open System
open System.IO
open System.Text.Json
open System.Threading
open Expecto
open TorchSharp
open Gpt
open Gpt.Model
open Gpt.Weights
open Gpt.Text
open Gpt.Training
open Gpt.FineTuning
open Gpt.Tests.TestUtil
open Gpt.Tests.ModelTestUtil
open Gpt.Tests.TrainingFixtures

let private reference () = Safetensors.read (fixture "lora/reference.safetensors")

/// The ch. 6 fixture's examples (token ids, labels), which the LoRA fixture reuses.
let private fixtureExamples () =
    use document = JsonDocument.Parse(File.ReadAllText(fixture "classifier/examples.json"))
    [| for item in document.RootElement.EnumerateArray() ->
           { Ids = [| for id in item.GetProperty("ids").EnumerateArray() -> id.GetInt32() |]
             Label = item.GetProperty("label").GetInt32(); Truncated = false } |]

/// The fixture's base classifier with an adapter folder attached, unmerged (as the book runs it), and its head.
let private adapted (pooling: Pooling) (adapter: string) =
    let classifier = ClassifierFiles.loadWith (Some pooling) (fixture "classifier/initial")
    use loaded = Adapter.read (fixture adapter)
    let extra = Adapter.applyTo loaded classifier.Body
    Expect.equal (extra |> List.map fst) [ "score.weight" ] "the head is the one module saved in full"
    use _ = torch.no_grad ()
    classifier.Score.weight.copy_ (snd extra.Head) |> ignore
    classifier

/// Each example alone, unpadded: the last token's label logits (10, 2).
let private aloneLogits (classifier: GptClassifier) =
    use _ = torch.no_grad ()
    classifier.eval ()
    torch.cat([| for e in fixtureExamples () -> classifier.forward(torch.tensor(Array.map int64 e.Ids).view(1L, -1L)) |], 0L)

/// A small language model with an untied head, every map adaptable.
let private smallModel (seed: int64) =
    new GptModel({ GptConfig.gpt2Small with ContextLength = 16; EmbeddingDim = 32; Heads = 4; Layers = 2; TiedHead = false; DropRate = 0.0 }, seed)

/// Random B matrices, so that adapters change what the model computes.
let private perturb (seed: int) (model: GptModel) =
    use _ = torch.no_grad ()
    for index, (_, adapter) in List.indexed (Lora.adapters model) do
        use noise = randn (seed + index) (List.ofArray adapter.B.shape)
        adapter.B.copy_(noise.mul(torch.tensor 0.05f)) |> ignore

[<Tests>]
let fixtureTests =
    testSequenced <| testList "LoRA: the book's appendix E code" [
        testCase "the PEFT adapter of the book's adapted classifier gives the book's logits, unmerged and merged" <| fun () ->
            let reference = reference ()
            use classifier = adapted Pooling.LastToken "lora/adapter"
            let config = (AdapterFiles.readConfig (fixture "lora/adapter/adapter_config.json"))
            Expect.equal (config.Settings.Rank, config.Settings.Alpha) (4, 8.0) "r and lora_alpha"
            Expect.equal config.Settings.Targets [ "attn.c_proj"; "mlp.c_fc"; "mlp.c_proj" ] "targets"
            Expect.equal config.ModulesToSave [ "score" ] "the head saved in full"
            let adapters = Lora.adapters classifier.Body
            Expect.equal (adapters |> List.map fst)
                [ "h.0.attn.c_proj"; "h.0.mlp.c_fc"; "h.0.mlp.c_proj"; "h.1.attn.c_proj"; "h.1.mlp.c_fc"; "h.1.mlp.c_proj" ] "six adapters"
            Expect.floatClose Accuracy.veryHigh (snd adapters[0]).Scale (float (reference["scaling"].item<float32> ())) "alpha / r, as the book's code scales"
            use logits = aloneLogits classifier
            expectClose 1e-5 logits reference["last_token_logits"] "adapted classifier, unmerged"
            // The update of block 0's c_fc in the Conv1D orientation [in, out].
            let fc = adapters |> List.find (fun (name, _) -> name = "h.0.mlp.c_fc") |> snd
            use delta = noGrad (fun () -> fc.B.matmul(fc.A).mul(torch.tensor (float32 fc.Scale)).t())
            expectClose 1e-6 delta reference["merged_delta_c_fc_0"] "merged update of h.0.mlp.c_fc"
            // The adapter's own base path (relative to the adapter folder), merged.
            use merged = AdapterLoading.classifier true None (fixture "lora/adapter")
            Expect.isEmpty (Lora.adapters merged.Body) "merged: plain weights"
            use mergedLogits = aloneLogits merged
            expectClose 1e-5 mergedLogits reference["last_token_logits"] "merged classifier"

        testCase "six training steps follow the book's losses; the base stays bit-equal; the trained adapter equals the book's" <| fun () ->
            let reference = reference ()
            use classifier = adapted Pooling.LastPosition "lora/adapter"
            use initial = ClassifierFiles.load (fixture "classifier/initial")
            let trainable = Lora.freezeBase (fun name -> name.StartsWith "score.") classifier
            Expect.equal (trainable |> Array.sumBy (fun (_, p) -> p.numel ())) 3136L "r (in + out) per adapted map, plus the head"
            let examples = fixtureExamples () |> Array.take 6
            let options =
                { ClassificationOptions.defaults "unused" with
                    Pooling = Some Pooling.LastPosition; Shuffle = false
                    Training = { TrainingSettings.bookFineTuning 1 with BatchSize = 1; LearningRate = 1e-3; EvalInterval = 1000; EvalBatches = 1 } }
            let task =
                { Model = classifier
                  Trainable = trainable
                  Objective = Classification.objective classifier
                  Data = Classification.batches options classifier.Config.PadTokenId (Some 14) examples examples
                  Sample = None
                  Tokenizer = "ids"
                  ModelConfiguration = ClassifierFiles.configJson classifier.Config }
            let trainerOptions = TrainingSettings.resolve options.Training id 16 16 (None, 0) "unused"
            let losses = ResizeArray<float>()
            let result =
                Trainer.fit { trainerOptions with OutputDirectory = None } task None
                    (function Stepped s -> losses.Add s.TrainLoss | _ -> ()) CancellationToken.None
            Expect.equal result.Steps 6 "six steps"
            let expected = floats reference["trajectory_losses"] |> Array.map float
            for step in 0 .. 5 do
                Expect.floatClose { absolute = 1e-4; relative = 0.0 } losses[step] expected[step] (sprintf "loss at step %d" (step + 1))
            let after = classifier.state_dict ()
            for KeyValue(name, tensor) in initial.state_dict () do
                if not (name.StartsWith "score.") then expectEqual after[name] tensor (sprintf "frozen %s" name)
            use temp = new TempDir()
            (use trainedAdapter = Adapter.ofClassifier (AdapterFiles.readConfig (fixture "lora/adapter/adapter_config.json")).Settings None classifier
             Adapter.write temp.Path trainedAdapter)
            let ours = Safetensors.read (Path.Combine(temp.Path, AdapterFiles.weightsFileName))
            let book = Safetensors.read (fixture "lora/trained/adapter_model.safetensors")
            Expect.equal (ours.Keys |> Set.ofSeq) (book.Keys |> Set.ofSeq) "PEFT's key names"
            for KeyValue(name, tensor) in book do expectClose 1e-4 ours[name] tensor (sprintf "trained %s" name)
            classifier.Config.Pooling |> ignore
            use trained = adapted Pooling.LastToken "lora/trained"
            use logits = aloneLogits trained
            expectClose 1e-4 logits reference["last_token_logits_trained"] "the book's trained adapter"
    ]

[<Tests>]
let modelTests =
    testList "LoRA: adapters on the model" [
        testCase "a fresh adapter (B = 0) leaves the logits bit-equal; the A draws are seeded" <| fun () ->
            use model = smallModel 3L
            use ids = randomIds 1 model.Config.VocabSize 2 10
            use before = noGrad (fun () -> model.eval (); model.forward ids)
            let attached = Lora.attach (LoraSettings.create 4 None (Some [ "c_attn"; "c_proj"; "c_fc"; "head" ])) 11L model
            Expect.equal attached.Length 9 "c_attn, both c_proj and c_fc in two blocks, and the head"
            use after = noGrad (fun () -> model.forward ids)
            expectEqual after before "B = 0: the same logits"
            use other = smallModel 3L
            let again = Lora.attach (LoraSettings.create 4 None (Some [ "c_attn"; "c_proj"; "c_fc"; "head" ])) 11L other
            for (name, a), (_, b) in List.zip attached again do expectEqual a.A b.A (sprintf "%s: the same A from the same seed" name)

        testCase "merged weights give the unmerged logits (1e-5), untied head included; merging leaves the source as it was" <| fun () ->
            use model = smallModel 5L
            Lora.attach (LoraSettings.create 3 (Some 5.0) (Some [ "c_attn"; "c_proj"; "c_fc"; "lm_head" ])) 2L model |> ignore
            perturb 40 model
            use ids = randomIds 2 model.Config.VocabSize 2 12
            use unmerged = noGrad (fun () -> model.eval (); model.forward ids)
            use merged = Lora.merged model
            use mergedLogits = noGrad (fun () -> merged.forward ids)
            Expect.isGreaterThan (maxAbsDifference unmerged (noGrad (fun () -> (new GptModel(model.Config, 5L)).forward ids))) 1e-4 "the adapters change the logits"
            expectClose 1e-5 mergedLogits unmerged "merged = unmerged"
            Expect.equal (Lora.adapters model).Length 9 "the source keeps its adapters"

        testCase "saved in PEFT's layout and loaded onto a fresh base: the same logits" <| fun () ->
            use temp = new TempDir()
            use model = smallModel 6L
            let settings = LoraSettings.create 2 None None
            Lora.attach settings 1L model |> ignore
            perturb 60 model
            (use adapter = Adapter.ofModel { Settings = settings; BaseModel = Some "base"; ModulesToSave = []; TaskType = "CAUSAL_LM" } model [] None
             Adapter.write temp.Path adapter)
            let names = Safetensors.read (Path.Combine(temp.Path, AdapterFiles.weightsFileName)) |> Map.toList |> List.map fst
            Expect.contains names "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" "PEFT's names"
            Expect.contains names "base_model.model.transformer.h.1.mlp.c_proj.lora_B.weight" "PEFT's names"
            let json = JsonDocument.Parse(File.ReadAllText(Path.Combine(temp.Path, AdapterFiles.configFileName))).RootElement
            Expect.equal (json.GetProperty("peft_type").GetString(), json.GetProperty("r").GetInt32(), json.GetProperty("lora_alpha").GetDouble()) ("LORA", 2, 4.0) "config"
            Expect.isTrue (json.GetProperty("fan_in_fan_out").GetBoolean()) "Conv1D maps"
            use fresh = smallModel 6L
            (use adapter = Adapter.read temp.Path
             Adapter.applyTo adapter fresh |> ignore)
            use ids = randomIds 3 model.Config.VocabSize 1 9
            use expected = noGrad (fun () -> model.eval (); model.forward ids)
            use actual = noGrad (fun () -> fresh.eval (); fresh.forward ids)
            expectEqual actual expected "reloaded adapter"

        testCase "LoRA on gpt2-small: rank 16 trains 2,359,296 parameters, a classifier's head 1,536 more" <| fun () ->
            let settings = LoraSettings.create 16 None None
            Expect.equal (LoraSettings.parameterCount settings GptConfig.gpt2Small) 2_359_296L "the formula"
            use classifier = new GptClassifier({ Body = GptConfig.gpt2Small; Labels = [| "ham"; "spam" |]; PadTokenId = 50256; Pooling = Pooling.LastToken }, 1L)
            Lora.attachClassifier settings 1L classifier |> ignore
            let trainable = Lora.freezeBase (fun name -> name.StartsWith "score.") classifier
            Expect.equal (trainable |> Array.sumBy (fun (_, p) -> p.numel ())) (2_359_296L + 1_536L) "adapters and the head"
            Expect.isTrue (classifier.parameters () |> Seq.filter (fun p -> not p.requires_grad) |> Seq.sumBy (fun p -> p.numel ()) > 124_000_000L) "the base is frozen"

        testCase "bad settings and bad adapter folders are refused with what was expected" <| fun () ->
            throwsGpt [ "rank must be positive" ] (fun () -> LoraSettings.create 0 None None |> ignore) "rank 0"
            throwsGpt [ "unknown LoRA target 'q_proj'" ] (fun () -> LoraSettings.create 4 None (Some [ "q_proj" ]) |> ignore) "target"
            throwsGpt [ "without a LoRA rank" ] (fun () -> LoraSettings.ofOptions None (Some 8.0) None |> ignore) "alpha alone"
            Expect.equal (LoraSettings.create 4 None (Some [ "c_proj" ])).Targets [ "attn.c_proj"; "mlp.c_proj" ] "c_proj is both projections, as in PEFT"
            use tied = new GptModel({ GptConfig.gpt2Small with ContextLength = 16; EmbeddingDim = 32; Heads = 4; Layers = 1 }, 1L)
            throwsGpt [ "tied" ] (fun () -> Lora.attach (LoraSettings.create 2 None (Some [ "head" ])) 0L tied |> ignore) "tied head"
            use temp = new TempDir()
            use model = smallModel 1L
            Lora.attach (LoraSettings.create 4 None None) 0L model |> ignore
            (use adapter = Adapter.ofModel { Settings = LoraSettings.create 4 None None; BaseModel = None; ModulesToSave = []; TaskType = "CAUSAL_LM" } model [] None
             Adapter.write temp.Path adapter)
            let config = Path.Combine(temp.Path, AdapterFiles.configFileName)
            File.WriteAllText(config, File.ReadAllText(config).Replace("\"r\": 4", "\"r\": 8"))
            use other = smallModel 1L
            throwsGpt [ "lora_A"; "rank 4, but the config says r = 8" ] (fun () -> (Adapter.read temp.Path :> IDisposable).Dispose()) "rank that does not match the tensors"
            File.WriteAllText(config, File.ReadAllText(config).Replace("\"r\": 8", "\"r\": 4"))
            use bigger = new GptModel({ GptConfig.gpt2Small with ContextLength = 16; EmbeddingDim = 64; Heads = 4; Layers = 2; TiedHead = false }, 1L)
            (use adapter = Adapter.read temp.Path
             throwsGpt [ "lora_A"; "[4, 32]"; "needs [4, 64]" ] (fun () -> Adapter.applyTo adapter bigger |> ignore) "another model's shapes"
             use deeper = new GptModel({ GptConfig.gpt2Small with ContextLength = 16; EmbeddingDim = 32; Heads = 4; Layers = 1; TiedHead = false }, 1L)
             throwsGpt [ "h.1."; "does not have" ] (fun () -> Adapter.applyTo adapter deeper |> ignore) "more layers than the model")
            throwsGpt [ "names no base model" ] (fun () -> (AdapterLoading.model false None temp.Path).Dispose()) "no base"
            let narrowed = File.ReadAllText(config).Replace("\"mlp.c_proj\"", "\"mlp.c_fc\"")
            File.WriteAllText(config, narrowed)
            throwsGpt [ "mlp.c_proj"; "target_modules" ] (fun () -> (Adapter.read temp.Path :> IDisposable).Dispose()) "a module the config does not name"
            File.WriteAllText(config, File.ReadAllText(config).Replace("\"LORA\"", "\"IA3\""))
            throwsGpt [ "peft_type"; "LORA" ] (fun () -> AdapterFiles.readConfig config |> ignore) "not LoRA"
            throwsGpt [ "does not exist" ] (fun () -> (Adapter.read (temp.File "missing") :> IDisposable).Dispose()) "missing folder"
    ]

[<Tests>]
let runTests =
    testSequenced <| testList "LoRA: runs" [
        testCase "a pretraining run trains adapters only, checkpoints them alone, resumes exactly and writes adapter/ and the merged model" <| fun () ->
            use temp = new TempDir()
            let baseModel = temp.File "base"
            (use lm = new GptModel({ GptConfig.gpt2Small with ContextLength = 32; EmbeddingDim = 32; Heads = 2; Layers = 2 }, 7L)
             Pretrained.save baseModel lm)
            let training =
                { TrainingSettings.defaults with
                    MaxSteps = Some 6; BatchSize = 2; EvalInterval = 3; EvalBatches = 1; LearningRate = 1e-2
                    OutputDirectory = temp.Path; Name = Some "straight"; Lora = Some(LoraSettings.create 4 None None) }
            let options =
                { RunOptions.defaults with InitFrom = Some baseModel; ContextLength = Some 16; SamplePrompt = None; Training = training }
            let straight = Run.pretrain options ignore CancellationToken.None
            Expect.equal straight.Steps 6 "six steps"
            use cancel = new CancellationTokenSource()
            let first =
                Run.pretrain { options with Training = { training with Name = Some "resumed" } }
                    (fun p -> if p.Kind = RunEventKind.Step && p.Step = 3 then cancel.Cancel()) cancel.Token
            Expect.isTrue first.Cancelled "stopped"
            let checkpoint = Directory.GetDirectories(Path.Combine(first.RunDirectory, "checkpoints")) |> Array.head
            let saved = Safetensors.read (Path.Combine(checkpoint, "model.safetensors")) |> Map.toList |> List.map fst
            Expect.isTrue (saved |> List.forall (fun n -> n.Contains "_lora.")) "a checkpoint holds only the adapters"
            let resumedOptions = RunOptions.fromCheckpoint first.RunDirectory
            Expect.equal resumedOptions.Training.Lora options.Training.Lora "LoRA settings back from run.json"
            let resumed = Run.pretrain resumedOptions ignore CancellationToken.None
            Expect.equal resumed.Steps 6 "resumed to six"
            let adapterOf (run: RunResult) = Safetensors.read (Path.Combine(run.RunDirectory, Run.adapterFolder, AdapterFiles.weightsFileName))
            let a, b = adapterOf straight, adapterOf resumed
            for KeyValue(name, tensor) in a do expectEqual b[name] tensor (sprintf "%s: resumed = straight" name)
            Expect.isTrue (a |> Seq.exists (fun (KeyValue(name, t)) -> name.EndsWith "lora_B.weight" && t.abs().max().item<float32> () > 0.0f)) "B trained"
            // The base on disk is untouched; the merged model equals the base with the adapter.
            use base' = Pretrained.load baseModel
            use withAdapter = AdapterLoading.model true None (Path.Combine(straight.RunDirectory, Run.adapterFolder))
            use unmerged = AdapterLoading.model false None (Path.Combine(straight.RunDirectory, Run.adapterFolder))
            use ids = randomIds 4 50257 1 8
            expectClose 1e-5 (noGrad (fun () -> unmerged.forward ids)) (noGrad (fun () -> withAdapter.forward ids)) "unmerged = merged"
            use merged = Pretrained.load straight.ModelDirectory.Value
            Expect.isTrue (sameWeights merged withAdapter) "model/ = base + adapter/"
            Expect.isFalse (sameWeights merged base') "the adapter changed the model"

        testCase "a classification run with LoRA: adapter/ with the head and classifier_config.json; loading it classifies as model/ does" <| fun () ->
            use temp = new TempDir()
            let baseModel = temp.File "base"
            (use lm = new GptModel({ GptConfig.gpt2Small with ContextLength = 48; EmbeddingDim = 32; Heads = 2; Layers = 2 }, 7L)
             Pretrained.save baseModel lm)
            let options =
                { ClassificationOptions.defaults baseModel with
                    Training = { TrainingSettings.bookFineTuning 1 with BatchSize = 8; LearningRate = 5e-3; MaxSteps = Some 4; EvalInterval = 2
                                                                        EvalBatches = 1; OutputDirectory = temp.Path; Name = Some "lora"
                                                                        Lora = Some(LoraSettings.create 2 None (Some [ "c_attn" ])) } }
            let result = Classification.fineTune options ignore CancellationToken.None
            Expect.equal result.Run.Steps 4 "four steps"
            let adapter = Path.Combine(result.Run.RunDirectory, Run.adapterFolder)
            Expect.isTrue (File.Exists(Path.Combine(adapter, AdapterFiles.classifierFileName))) "labels beside the adapter"
            Expect.equal (AdapterFiles.readConfig (Path.Combine(adapter, AdapterFiles.configFileName))).TaskType "SEQ_CLS" "task"
            Expect.equal (Classification.fromCheckpoint result.Run.RunDirectory).Training.Lora options.Training.Lora "run.json keeps LoRA"
            use fromAdapter = AdapterLoading.classifier true None adapter
            use saved = ClassifierFiles.load result.Run.ModelDirectory.Value
            Expect.isTrue (sameWeights fromAdapter saved) "base + adapter = model/"
            use original = Pretrained.load baseModel
            let frozenName = "transformer.h.0.mlp.c_fc.weight"
            let savedState, originalState = saved.state_dict (), original.state_dict ()
            expectEqual savedState[frozenName] originalState[frozenName.Substring "transformer.".Length] "maps without adapters unchanged"
            let texts = [ "WINNER! Claim your prize"; "see you at noon" ]
            let a = Classification.classify fromAdapter (Tokenizers.gpt2 ()) texts
            let b = Classification.classify saved (Tokenizers.gpt2 ()) texts
            Expect.equal (a |> Array.map _.Logits) (b |> Array.map _.Logits) "same logits"
    ]
