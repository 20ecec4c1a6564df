/// The trainer wired to the real model: GptModel checkpoints, resume from a checkpoint alone, the KV-cached sample
/// at epoch ends, overfitting a tiny text, the tied head.
module Gpt.Tests.GptTrainingTests

open System
open System.IO
open System.Threading
open Expecto
open TorchSharp
open Gpt.Text
open Gpt.Model
open Gpt.Weights
open Gpt.Kernels
open Gpt.Training
open Gpt.Tests.TestUtil
open Gpt.Tests.ModelTestUtil
open Gpt.Tests.TrainingFixtures

let private noEvents (_: TrainingEvent) = ()

/// A tiny GPT over the 12-letter alphabet of the char tokenizer, with dropout.
let private tinyGpt (seed: int64) (dropRate: float) =
    new GptModel({ tinyConfig with VocabSize = alphabet.Length; ContextLength = 8; DropRate = dropRate }, seed)

let private gptData (model: GptModel) (ids: int[]) = TrainingData.forGpt model.Config charTokenizer Loss.defaultTrainRatio ids

[<Tests>]
let tests =
    testSequenced <| testList "trainer on GptModel" [
        testCase "N steps + cancel + resume from the checkpoint alone + N steps equals 2N steps, bit for bit (dropout 0.1)" <| fun () ->
            use straightDir = new TempDir()
            use resumedDir = new TempDir()
            let options =
                { tinyOptions with
                    Epochs = 3; MaxSteps = Some 10; GradientAccumulation = 2; WarmupSteps = 2; InitialLearningRate = 1e-3
                    MinLearningRate = 1e-4; GradientClip = Some 1.0; WeightDecay = 0.1; CheckpointInterval = 4
                    SamplePrompt = Some "abc"; SampleTokens = 4 }
            let samples (into: ResizeArray<string>) = function EpochEnded(_, Some s) -> into.Add s | _ -> ()
            use straight = tinyGpt 21L 0.1
            let data = gptData straight (noisyIds 150 5)
            let straightSamples = ResizeArray()
            let straightResult = Trainer.train { options with OutputDirectory = Some straightDir.Path } straight data None (samples straightSamples) CancellationToken.None
            Expect.equal straightResult.Steps 10 "10 steps"
            Expect.isGreaterThan straightSamples.Count 0 "samples at epoch ends"

            use first = tinyGpt 21L 0.1
            use cancellation = new CancellationTokenSource()
            let resumedSamples = ResizeArray()
            let stopAtFive event =
                samples resumedSamples event
                match event with
                | Stepped p when p.Step = 5 -> cancellation.Cancel()
                | _ -> ()
            let firstResult = Trainer.train { options with OutputDirectory = Some resumedDir.Path } first data None stopAtFive cancellation.Token
            Expect.equal firstResult.Steps 5 "stopped after 5"
            Expect.equal (firstResult.Checkpoint |> Option.map Path.GetFileName) (Some "step-00000005") "checkpoint on cancel"
            // The model comes from the checkpoint alone: configuration and weights.
            use second = Checkpoint.loadGpt resumedDir.Path
            Expect.equal second.Config first.Config "configuration rebuilt from the checkpoint"
            Expect.isTrue (sameWeights second first) "weights rebuilt from the checkpoint"
            torch.rand(13L).Dispose() // disturb the generator: its state must come from the checkpoint
            let secondResult = Trainer.train { options with OutputDirectory = Some resumedDir.Path } second data (Some resumedDir.Path) (samples resumedSamples) CancellationToken.None
            Expect.equal secondResult.Steps 10 "resumed to 10"
            Expect.isTrue (sameWeights second straight) "bit-identical weights"
            Expect.equal (List.ofSeq resumedSamples) (List.ofSeq straightSamples) "the same epoch-end samples"

        testCase "a tiny GPT overfits a tiny text (CI-sized)" <| fun () ->
            // Every word has one successor: a model that memorises the text predicts it exactly.
            let text = String.replicate 30 "the quick brown fox jumps over a lazy dog . "
            let tokenizer = Tokenizers.simple text
            let config =
                { VocabSize = tokenizer.VocabularySize; ContextLength = 16; EmbeddingDim = 32; Heads = 2; Layers = 2
                  DropRate = 0.0; QkvBias = false; TiedHead = true; LayerNormEpsilon = 1e-5 }
            use model = new GptModel(config, 3L)
            let data = TrainingData.forGpt config tokenizer Loss.defaultTrainRatio (tokenizer.Encode text)
            let options =
                { tinyOptions with
                    Epochs = 20; BatchSize = 4; ContextLength = 16; Stride = 16; LearningRate = 2e-2; InitialLearningRate = 2e-3
                    MinLearningRate = 2e-3; WarmupSteps = 5; WeightDecay = 0.0; GradientClip = Some 1.0; EvalInterval = 1000
                    SamplePrompt = Some "the quick"; SampleTokens = 10 }
            let samples = ResizeArray()
            let result = Trainer.train options model data None (function EpochEnded(_, Some s) -> samples.Add s | _ -> ()) CancellationToken.None
            let first = result.Evaluations[0]
            let last = Array.last result.Evaluations
            Expect.isGreaterThan first.TrainLoss 1.5 "starts high"
            Expect.isLessThan last.TrainLoss 0.05 "training loss near zero"
            Expect.isLessThan last.ValidationLoss 0.05 "the validation text follows the same pattern"
            Expect.equal (Seq.last samples) "the quick brown fox jumps over a lazy dog. the quick" "the learned continuation, through the KV cache"

        testCase "a tied head is one parameter, stepped once per step" <| fun () ->
            use model = tinyGpt 5L 0.0
            let data = gptData model (noisyIds 200 6)
            let before = model.TokenEmbedding.weight.detach().clone()
            let learningRate = 1e-2
            let options =
                { tinyOptions with
                    MaxSteps = Some 1; LearningRate = learningRate; InitialLearningRate = learningRate; MinLearningRate = learningRate
                    WeightDecay = 0.0 }
            Trainer.train options model data None noEvents CancellationToken.None |> ignore
            Expect.isNone model.Head "no separate head parameter"
            let names = model.named_parameters () |> Seq.map (fun struct (name, _) -> name) |> List.ofSeq
            Expect.equal (names |> List.filter (fun n -> n.StartsWith "wte" || n.StartsWith "lm_head")) [ "wte.weight" ] "wte only"
            use optimizer = Optimizer.adamW { Optimizer.defaults with WeightDecay = 0.0 } model
            Expect.equal (optimizer.NamedParameters |> Array.filter (fun (n, _) -> n = "wte.weight") |> Array.length) 1 "in the optimizer once"
            // Adam's first step moves each weight by lr * g / (|g| + eps): at most lr. Stepped twice, it would move
            // by up to 2 lr. The head's gradient reaches every row, so the largest move is close to lr.
            use moved = (model.TokenEmbedding.weight.detach() - before).abs().max()
            let largest = moved.to_type(torch.ScalarType.Float64).item<float> ()
            Expect.isLessThanOrEqual largest (learningRate * 1.0001) "one step of at most lr"
            Expect.isGreaterThan largest (learningRate * 0.9) "one full step of about lr"

        testCase "checkpoints hold the model's config.json; a bad one is a clear error" <| fun () ->
            use dir = new TempDir()
            use model = tinyGpt 8L 0.1
            let data = gptData model (noisyIds 200 7)
            let result = Trainer.train { tinyOptions with MaxSteps = Some 2; OutputDirectory = Some dir.Path } model data None noEvents CancellationToken.None
            let checkpoint = result.Checkpoint.Value
            let state = Checkpoint.read checkpoint
            Expect.equal (Pretrained.parseConfig "x" state.ModelConfiguration) model.Config "config.json in the checkpoint"
            use loaded = Checkpoint.loadGpt checkpoint
            Expect.isTrue (sameWeights loaded model) "the checkpoint's weights"
            Expect.isFalse loaded.training "eval mode"
            throwsGpt [ "does not exist" ] (fun () -> Checkpoint.loadGpt (dir.File "nothing-here") |> ignore) "missing"
            Directory.CreateDirectory(dir.File "empty") |> ignore
            throwsGpt [ "no complete checkpoint in"; "empty" ] (fun () -> Checkpoint.loadGpt (dir.File "empty") |> ignore) "empty folder"

        testCase "a GPT refuses a context longer than its own and a tokenizer larger than its vocabulary" <| fun () ->
            use model = tinyGpt 9L 0.0
            let data = gptData model (noisyIds 200 8)
            throwsGpt [ "training context length 9 exceeds the model's context length 8" ]
                (fun () -> Trainer.train { tinyOptions with ContextLength = 9 } model data None noEvents CancellationToken.None |> ignore) "context"
            throwsGpt [ "the tokenizer 'gpt2' has 50257 tokens, more than the model's vocabulary of 12" ]
                (fun () -> Trainer.train tinyOptions model { data with Tokenizer = Tokenizers.gpt2 () } None noEvents CancellationToken.None |> ignore) "vocabulary"
    ]

[<Tests>]
let inMemoryRunTests =
    let story = Corpus.builtIn.Value.Text
    let texts = [ story.Substring(0, 1500); story.Substring(1500, 1500) ]
    let options (temp: TempDir) (name: string) =
        { RunOptions.defaults with
            Texts = Some texts; ContextLength = Some 16; SamplePrompt = None
            Training =
                { TrainingSettings.defaults with
                    MaxSteps = Some 3; BatchSize = 2; EvalInterval = 3; EvalBatches = 1; OutputDirectory = temp.Path; Name = Some name } }
    let smallGpt () = new GptModel({ GptConfig.gpt2Small with ContextLength = 16; EmbeddingDim = 16; Heads = 2; Layers = 1; DropRate = 0.0 }, 5L)
    testSequenced <| testList "runs on texts and a model given in memory" [
        testCase "a model given in memory is trained in place on texts given in memory, and stays the caller's" <| fun () ->
            use temp = new TempDir()
            use model = smallGpt ()
            let before = model.FinalNorm.Scale.detach().clone()
            let result = Run.pretrain { options temp "memory" with InitModel = Some model } ignore CancellationToken.None
            Expect.equal result.Steps 3 "three steps"
            Expect.isFalse (model.FinalNorm.Scale.detach().allclose(before, rtol = 0.0, atol = 0.0)) "the caller's model was trained"
            use saved = Pretrained.load result.ModelDirectory.Value
            use ids = torch.tensor([| 10L; 20L; 30L |]).view(1L, 3L)
            use _ = torch.no_grad ()
            expectEqual (model.forward ids) (saved.forward ids) "not disposed, and the same weights as model/"
            let runJson = Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(result.RunDirectory, "run.json")))
            Expect.equal (runJson["data"].GetValue<string>()) "(in memory)" "data"
            Expect.equal (runJson["init_from"].GetValue<string>()) "(in memory)" "init_from"
            Expect.equal (runJson["texts"].GetValue<int>()) 2 "two texts"
            Expect.equal (runJson["texts_sha256"].GetValue<string>()) (RunFile.textsDigest texts) "their digest"

        testCase "a resume needs the texts again, and the same ones" <| fun () ->
            use temp = new TempDir()
            let first = Run.pretrain (options temp "resumable") ignore CancellationToken.None
            let resumed = RunOptions.fromCheckpoint first.RunDirectory
            Expect.equal (resumed.Data, resumed.Texts, resumed.InitFrom) (None, None, None) "nothing on disk to point to"
            let longer = { resumed with Training = { resumed.Training with MaxSteps = Some 4 } }
            throwsGpt [ "was trained on texts given in memory, which are not on disk: give the same texts again" ]
                (fun () -> Run.pretrain longer ignore CancellationToken.None |> ignore) "no texts: not the built-in story in their place"
            throwsGpt [ "was trained on other texts than those given" ]
                (fun () -> Run.pretrain { longer with Texts = Some(List.rev texts) } ignore CancellationToken.None |> ignore) "other texts"
            let again = Run.pretrain { longer with Texts = Some texts } ignore CancellationToken.None
            Expect.equal again.Steps 4 "resumed with the same texts"

        testCase "in-memory options that do not go together are clear errors, and the caller's model survives them" <| fun () ->
            use temp = new TempDir()
            use model = smallGpt ()
            let run o = fun () -> Run.pretrain o ignore CancellationToken.None |> ignore
            let o = { options temp "bad" with InitModel = Some model }
            throwsGpt [ "either from files (Data: story.txt) or from memory (Texts), not both" ] (run { o with Data = Some "story.txt" }) "data and texts"
            throwsGpt [ "either from a source (InitFrom: gpt2) or from memory (InitModel), not both" ] (run { o with InitFrom = Some "gpt2" }) "two models"
            throwsGpt [ "LoRA adapters are not attached to a model given in memory" ] (run { o with Training = { o.Training with Lora = Some(LoraSettings.create 2 None None) } }) "LoRA"
            throwsGpt [ "does not go with ResumeFrom" ] (run { o with Training = { o.Training with ResumeFrom = Some temp.Path } }) "resume"
            throwsGpt [ "text 2 of the texts given in memory is null" ] (run { o with Texts = Some [ "a"; null ] }) "a null text"
            throwsGpt [ "the text is empty (the texts given in memory)" ] (run { o with Texts = Some [] }) "no texts"
            throwsGpt [ "the model given in memory brings its own model"; "layers" ] (run { o with Model = Some { model.Config with Layers = 2 } }) "another shape"
            use ids = torch.tensor([| 1L; 2L |]).view(1L, 2L)
            use _ = torch.no_grad ()
            Expect.equal (model.forward ids).shape [| 1L; 2L; 50257L |] "the model still works"
    ]
