module Gpt.Tests.TrainerTests

open System
open System.IO
open System.Threading
open Expecto
open TorchSharp
open Gpt.Text
open Gpt.Training
open Gpt.Tests.TestUtil
open Gpt.Tests.TrainingFixtures

let private noEvents (_: TrainingEvent) = ()

/// A model made under a fixed torch seed.
let private bigram (seed: int64) (dropRate: float) =
    torch.manual_seed seed |> ignore
    new BigramModel(alphabet.Length, 8, dropRate)

[<Tests>]
let tests =
    testSequenced <| testList "trainer" [
        testCase "a tiny model overfits a tiny text to near-zero loss" <| fun () ->
            // Every word has one successor, so a bigram model can learn the text exactly.
            let text = String.replicate 40 "the quick brown fox jumps over a lazy dog . "
            let tokenizer = Tokenizers.simple text
            let ids = tokenizer.Encode text
            use model = new BigramModel(tokenizer.VocabularySize, 16, 0.0)
            let train, validation = Loss.split Loss.defaultTrainRatio ids
            let data = { Train = train; Validation = validation; Tokenizer = tokenizer; ModelConfiguration = "{}" }
            let options =
                { tinyOptions with
                    Epochs = 12; BatchSize = 4; ContextLength = 8; Stride = 8; LearningRate = 1e-1
                    InitialLearningRate = 5e-3; MinLearningRate = 5e-3; WarmupSteps = 5; EvalInterval = 50
                    SamplePrompt = Some "the quick"; SampleTokens = 8; GradientClip = Some 1.0 }
            let samples = ResizeArray()
            let result = Trainer.train options model data None (function EpochEnded(_, Some s) -> samples.Add s | _ -> ()) CancellationToken.None
            let first = result.Evaluations[0]
            let last = Array.last result.Evaluations
            Expect.isGreaterThan first.TrainLoss 2.0 "starts high"
            Expect.isLessThan last.TrainLoss 0.05 "training loss near zero"
            Expect.isLessThan last.ValidationLoss 0.05 "the validation text follows the same pattern"
            Expect.equal samples.Count 12 "a sample at every epoch end"
            Expect.equal (Seq.last samples) "the quick brown fox jumps over a lazy dog." "the learned continuation"

        testCase "a non-finite training loss stops the run before its update, and keeps the checkpoints" <| fun () ->
            // NaN in a weight: the first step's loss is NaN; nothing is applied.
            use model = bigram 1L 0.0
            let data = trainingData (noisyIds 300 3)
            do
                use _ = torch.no_grad ()
                model.Head.bias[0L].fill_(nan) |> ignore
            let before = model.Head.weight.clone ()
            throwsGpt [ "step 1 of "; "the training loss is NaN"; "this step was not applied"; "--lr" ]
                (fun () -> Trainer.train tinyOptions model data None noEvents CancellationToken.None |> ignore) "NaN weights"
            Expect.equal ((model.Head.weight - before).abs().max().item<float32> ()) 0.0f "the weights are as they were"
            // Divergence: a learning rate of 1e37 overflows the weights within a few steps; the run stops at the first
            // non-finite loss, and the checkpoints written before it are left alone.
            use dir = new TempDir()
            use diverging = bigram 1L 0.0
            let options = { tinyOptions with OutputDirectory = Some dir.Path; CheckpointInterval = 1; KeepLast = 100; LearningRate = 1e37; InitialLearningRate = 1e37; MinLearningRate = 1e37 }
            let events = ResizeArray()
            throwsGpt [ "the training loss is"; "the last checkpoint, " ]
                (fun () -> Trainer.train options diverging data None events.Add CancellationToken.None |> ignore) "divergence"
            let stepped = events |> Seq.choose (function Stepped s -> Some s | _ -> None) |> Array.ofSeq
            Expect.isGreaterThan stepped.Length 0 "some steps ran first"
            Expect.isLessThan stepped.Length (options.Epochs * 22) "the run stopped early"
            Expect.all stepped (fun s -> Double.IsFinite s.TrainLoss) "every reported step had a finite loss"
            Expect.equal (Directory.GetDirectories(Path.Combine(dir.Path, "checkpoints")).Length) stepped.Length "a checkpoint for each step before"

        testCase "events, evaluation schedule, log, plot and checkpoints of a run" <| fun () ->
            use dir = new TempDir()
            use model = bigram 1L 0.2
            let options =
                { tinyOptions with
                    Epochs = 2; OutputDirectory = Some dir.Path; CheckpointInterval = 11; KeepLast = 2
                    SamplePrompt = Some "abc"; SampleTokens = 5; WarmupSteps = 3; InitialLearningRate = 1e-3; MinLearningRate = 1e-3 }
            let data = trainingData (noisyIds 300 3)
            let events = ResizeArray()
            // The plot is drawn by the plotting layer, which follows the trainer's events.
            let result = Trainer.train options model data None (Gpt.Plot.Plots.followTrainer dir.Path events.Add) CancellationToken.None
            let plan = events |> Seq.pick (function Started p -> Some p | _ -> None)
            // 270 training tokens: (270 - 8 + 3) / 4 = 66 windows, 22 batches of 3 per epoch.
            Expect.equal plan.BatchesPerEpoch 22 "batches per epoch"
            Expect.equal plan.TotalSteps 44 "two epochs"
            Expect.equal plan.TokensPerStep 24L "3 x 8 tokens"
            Expect.equal plan.ParameterCount (int64 (12 * 8 + 8 * 12 + 12)) "parameters"
            Expect.equal plan.TrainableParameterCount plan.ParameterCount "every parameter is trained"
            let steps = events |> Seq.choose (function Stepped p -> Some p | _ -> None) |> Array.ofSeq
            Expect.equal (steps |> Array.map _.Step) [| 1 .. 44 |] "every step"
            Expect.equal (steps |> Array.map _.Epoch |> Array.countBy id) [| 1, 22; 2, 22 |] "epochs"
            Expect.floatClose Accuracy.high steps[0].LearningRate 1e-3 "warmup from the initial rate"
            Expect.floatClose Accuracy.high steps[3].LearningRate 1e-2 "peak after warmup"
            Expect.equal (Array.last steps).TokensSeen (44L * 24L) "tokens seen"
            Expect.isGreaterThan (Array.last steps).TokensPerSecond 0.0 "throughput"
            Expect.equal (Array.last steps).Remaining TimeSpan.Zero "nothing left"
            let evaluated = events |> Seq.choose (function Evaluated r -> Some r.Step | _ -> None) |> List.ofSeq
            Expect.equal evaluated [ 1; 2; 4; 6; 8; 10; 11; 12; 14; 16; 18; 20; 22; 24; 26; 28; 30; 32; 33; 34; 36; 38; 40; 42; 44 ] "first, every 2nd, at each checkpoint, last"
            let ended = events |> Seq.choose (function EpochEnded(e, s) -> Some(e, s) | _ -> None) |> List.ofSeq
            Expect.equal (ended |> List.map fst) [ 1; 2 ] "two epoch ends"
            for _, sample in ended do
                Expect.isTrue (sample.IsSome && sample.Value.StartsWith "abc" && sample.Value.Length = 8) "prompt + 5 greedy tokens"
            Expect.equal (Metrics.read (Path.Combine(dir.Path, "metrics.jsonl")) |> Array.map _.Step |> List.ofArray) evaluated "JSONL per evaluation"
            Expect.isTrue (File.Exists(Path.Combine(dir.Path, "loss.png"))) "plot"
            let saved = events |> Seq.choose (function CheckpointSaved d -> Some(Path.GetFileName d) | _ -> None) |> List.ofSeq
            Expect.equal saved [ "step-00000011"; "step-00000022"; "step-00000033"; "step-00000044" ] "a checkpoint every 11 steps"
            let kept = Checkpoint.list (Path.Combine(dir.Path, "checkpoints")) |> Array.map (fun (d, s) -> Path.GetFileName d, s.ValidationLoss.IsSome)
            Expect.isTrue (kept.Length >= 2 && kept.Length <= 3) "the last two and the best"
            Expect.isTrue (kept |> Array.forall snd) "every periodic checkpoint has a validation loss"
            Expect.equal result.Checkpoint (Some(Path.Combine(dir.Path, "checkpoints", "step-00000044"))) "last checkpoint"
            Expect.isFalse result.Cancelled "not cancelled"
            Expect.isTrue model.training "left in training mode"

        testCase "options round-trip through the checkpoint JSON" <| fun () ->
            let options = { tinyOptions with MaxSteps = Some 12; GradientClip = Some 0.5; OutputDirectory = Some "runs/x"; SamplePrompt = Some "ab" }
            let json = TrainerOptions.toJson options
            Expect.stringContains json "\"max_steps\":12" "snake_case, options as values"
            Expect.stringContains json "\"gradient_accumulation\":1" "snake_case"
            Expect.equal (TrainerOptions.ofJson json) options "round trip"
            Expect.equal (TrainerOptions.ofJson (TrainerOptions.toJson TrainerOptions.defaults)) TrainerOptions.defaults "defaults round trip"
            throwsGpt [ "training options are not valid" ] (fun () -> TrainerOptions.ofJson "{\"epochs\": \"ten\"}" |> ignore) "bad JSON"
            throwsGpt [ "training options are not valid"; "batch_size" ] (fun () -> TrainerOptions.ofJson "{\"epochs\": 3}" |> ignore) "missing fields"

        testCase "evaluation runs in eval mode and restores training mode" <| fun () ->
            use model = bigram 2L 0.5
            let windows = Dataset.create (noisyIds 200 4) 8 4
            model.train ()
            let a = Trainer.evaluate model windows 3 2
            let b = Trainer.evaluate model windows 3 2
            Expect.equal a b "no dropout in evaluation: the same loss twice"
            Expect.isTrue model.training "back in training mode"
            model.eval ()
            Trainer.evaluate model windows 3 2 |> ignore
            Expect.isFalse model.training "eval mode kept"

        testCase "N steps + cancel + resume + N steps equals 2N steps straight, bit for bit (dropout on)" <| fun () ->
            use straightDir = new TempDir()
            use resumedDir = new TempDir()
            let data = trainingData (noisyIds 150 5)
            let options =
                { tinyOptions with
                    Epochs = 3; MaxSteps = Some 12; GradientAccumulation = 2; WarmupSteps = 3; InitialLearningRate = 1e-3
                    MinLearningRate = 1e-4; GradientClip = Some 0.5; WeightDecay = 0.1; CheckpointInterval = 5
                    SamplePrompt = Some "ab"; SampleTokens = 3 }
            // An epoch-end handler that draws from torch's generator: its draws must be part of the saved state.
            let handler (draws: ResizeArray<float32>) = function
                | EpochEnded _ -> draws.Add((torch.rand(1L)).item<float32> ())
                | _ -> ()
            let straightDraws = ResizeArray()
            use straight = bigram 11L 0.3
            let straightResult = Trainer.train { options with OutputDirectory = Some straightDir.Path } straight data None (handler straightDraws) CancellationToken.None
            Expect.equal straightResult.Steps 12 "12 steps"
            let resumedDraws = ResizeArray()
            use first = bigram 11L 0.3
            use cancellation = new CancellationTokenSource()
            let stopAtSix event =
                handler resumedDraws event
                match event with
                | Stepped p when p.Step = 6 -> cancellation.Cancel()
                | _ -> ()
            let firstResult = Trainer.train { options with OutputDirectory = Some resumedDir.Path } first data None stopAtSix cancellation.Token
            Expect.isTrue firstResult.Cancelled "cancelled"
            Expect.equal firstResult.Steps 6 "6 steps"
            Expect.equal (firstResult.Checkpoint |> Option.map Path.GetFileName) (Some "step-00000006") "checkpoint written on cancel"
            Expect.isFalse (sameWeights first straight) "halfway differs from the end"
            use second = bigram 99L 0.3 // other initial weights and generator state: everything must come from the checkpoint
            torch.rand(17L).Dispose()
            let secondResult = Trainer.train { options with OutputDirectory = Some resumedDir.Path } second data (Some resumedDir.Path) (handler resumedDraws) CancellationToken.None
            Expect.equal secondResult.Steps 12 "resumed to 12"
            Expect.isTrue (sameWeights second straight) "bit-identical weights"
            Expect.equal (List.ofSeq resumedDraws) (List.ofSeq straightDraws) "the same generator draws at epoch ends"
            let log dir = Metrics.read (Path.Combine(dir, "metrics.jsonl")) |> Array.map (fun r -> r.Step, r.TrainLoss, r.ValidationLoss)
            Expect.equal (log resumedDir.Path) (log straightDir.Path) "the same evaluation log"

        testCase "two accumulated batches of 3 make the same step as one batch of 6" <| fun () ->
            // Both read the same six windows: batches are consecutive chunks of one seeded permutation.
            let data = trainingData (noisyIds 200 9)
            let options = { tinyOptions with MaxSteps = Some 1; WeightDecay = 0.1; GradientClip = Some 0.5 }
            use accumulated = bigram 5L 0.0
            use whole = bigram 5L 0.0
            // AdamW's update is blind to a constant gradient scale: compare the gradient norms too.
            let norm (result: ResizeArray<float>) = function Stepped p -> result.Add p.GradientNorm.Value | _ -> ()
            let accumulatedNorm, wholeNorm = ResizeArray(), ResizeArray()
            Trainer.train { options with BatchSize = 3; GradientAccumulation = 2 } accumulated data None (norm accumulatedNorm) CancellationToken.None |> ignore
            Trainer.train { options with BatchSize = 6 } whole data None (norm wholeNorm) CancellationToken.None |> ignore
            Expect.floatClose Accuracy.medium accumulatedNorm[0] wholeNorm[0] "the same gradient"
            for KeyValue(name, tensor) in accumulated.state_dict () do
                Expect.isTrue (torch.allclose(tensor, whole.state_dict().[name], rtol = 1e-5, atol = 1e-6)) name

        testCase "no tensor leaks from step to step" <| fun () ->
            use model = bigram 3L 0.2
            let options = { tinyOptions with Epochs = 2; GradientAccumulation = 2; GradientClip = Some 1.0; SamplePrompt = Some "a"; SampleTokens = 2 }
            let data = trainingData (noisyIds 200 6)
            let live = ResizeArray()
            let before = DisposeScopeManager.Statistics.ThreadTotalLiveCount
            Trainer.train options model data None (function Stepped _ -> live.Add DisposeScopeManager.Statistics.ThreadTotalLiveCount | _ -> ()) CancellationToken.None |> ignore
            let after = DisposeScopeManager.Statistics.ThreadTotalLiveCount
            Expect.isGreaterThan live.Count 10 "enough steps"
            Expect.equal (live |> Seq.skip 1 |> Seq.distinct |> List.ofSeq) [ live[1] ] "the same live tensors at every step"
            Expect.equal after before "nothing left after the run"

        testCase "bad data and incompatible resumes are refused clearly" <| fun () ->
            use model = bigram 4L 0.0
            let data = trainingData (noisyIds 300 7)
            throwsGpt [ "the validation split has 5 tokens"; "at least 9" ]
                (fun () -> Trainer.train tinyOptions model { data with Validation = data.Validation[.. 4] } None noEvents CancellationToken.None |> ignore) "short validation"
            throwsGpt [ "no optimizer step fits" ]
                (fun () -> Trainer.train { tinyOptions with Epochs = 1; GradientAccumulation = 100 } model data None noEvents CancellationToken.None |> ignore) "accumulation too large"
            throwsGpt [ "evaluation interval must be positive" ]
                (fun () -> Trainer.train { tinyOptions with EvalInterval = 0 } model data None noEvents CancellationToken.None |> ignore) "options"
            use dir = new TempDir()
            let options = { tinyOptions with MaxSteps = Some 2; OutputDirectory = Some dir.Path }
            Trainer.train options model data None noEvents CancellationToken.None |> ignore
            throwsGpt [ "already holds checkpoints of a run" ]
                (fun () -> Trainer.train options model data None noEvents CancellationToken.None |> ignore) "fresh run over an old one"
            throwsGpt [ "was trained with batch size 3, this run asks for 4" ]
                (fun () -> Trainer.train { options with BatchSize = 4 } model data (Some dir.Path) noEvents CancellationToken.None |> ignore) "batch size"
            throwsGpt [ "was trained on other data" ]
                (fun () -> Trainer.train options model (trainingData (noisyIds 300 8)) (Some dir.Path) noEvents CancellationToken.None |> ignore) "data"
            throwsGpt [ "was trained with tokenizer 'chars', this run uses 'simple'" ]
                (fun () -> Trainer.train options model { data with Tokenizer = Tokenizers.simple "a b" } (Some dir.Path) noEvents CancellationToken.None |> ignore) "tokenizer"
    ]
