module Gpt.Tests.TrainingTests

open System
open Expecto
open FsCheck
open FsCheck.FSharp
open TorchSharp
open TorchSharp.Modules
open Gpt.Text
open Gpt.Training
open Gpt.Tests.TestUtil
open Gpt.Tests.TrainingFixtures

[<Tests>]
let lossTests =
    testList "loss" [
        testCase "uniform logits give ln(vocabulary)" <| fun () ->
            for vocab in [ 2; 12; 50257 ] do
                use logits = torch.zeros([| 2L; 3L; int64 vocab |])
                use targets = torch.zeros([| 2L; 3L |], dtype = torch.int64)
                use loss = Loss.crossEntropy logits targets
                Expect.floatClose Accuracy.medium (float (loss.item<float32> ())) (log (float vocab)) (sprintf "ln %d" vocab)

        testCase "an untrained model with uniform logits has loss ln(vocabulary), batch and loader" <| fun () ->
            use model = new BigramModel(alphabet.Length, 4, 0.0)
            use _ = torch.no_grad ()
            model.Head.weight.zero_ () |> ignore
            model.Head.bias.zero_ () |> ignore
            let windows = Dataset.create (noisyIds 100 1) 8 8
            let loader = { Dataset.defaultLoader with BatchSize = 2 }
            let expected = log (float alphabet.Length)
            let inputs, targets = Dataset.toTensors windows [| 0; 1 |]
            use loss = Loss.batch model inputs targets
            Expect.floatClose Accuracy.medium (float (loss.item<float32> ())) expected "batch loss"
            Expect.floatClose Accuracy.medium (Loss.loader model None (Dataset.batches windows loader 0)) expected "loader loss"
            Expect.floatClose Accuracy.medium (Loss.perplexity expected) (float alphabet.Length) "perplexity = vocabulary"

        testCase "cross-entropy is the mean of -log softmax at the targets" <| fun () ->
            use logits = torch.randn([| 2L; 3L; 5L |])
            use targets = torch.tensor([| 0L; 4L; 2L; 1L; 1L; 3L |]).view(2L, 3L)
            use loss = Loss.crossEntropy logits targets
            use logProbabilities = torch.nn.functional.log_softmax(logits, -1L)
            let mutable sum = 0.0
            for b in 0L .. 1L do
                for t in 0L .. 2L do
                    sum <- sum - float (logProbabilities[b, t, targets[b, t].item<int64> ()].item<float32> ())
            Expect.floatClose Accuracy.medium (float (loss.item<float32> ())) (sum / 6.0) "mean over B*T"

        testCase "the loader reads at most the batch limit and NaN when empty" <| fun () ->
            use model = new BigramModel(alphabet.Length, 4, 0.0)
            let windows = Dataset.create (noisyIds 200 2) 8 8
            let loader = { Dataset.defaultLoader with BatchSize = 2; Shuffle = false }
            let mutable read = 0
            let counted = Dataset.batches windows loader 0 |> Seq.map (fun b -> read <- read + 1; b)
            Loss.loader model (Some 3) counted |> ignore
            Expect.equal read 3 "three batches read"
            Expect.isTrue (Double.IsNaN(Loss.loader model None Seq.empty)) "NaN for no batches"

        testCase "shape errors say what was expected" <| fun () ->
            throwsGpt [ "logits must have shape [batch, length, vocabulary]"; "[2, 5]" ]
                (fun () -> Loss.crossEntropy (torch.zeros(2L, 5L)) (torch.zeros(2L, 5L, dtype = torch.int64)) |> ignore) "2-D logits"
            throwsGpt [ "targets must have shape [2, 3]"; "[2, 4]" ]
                (fun () -> Loss.crossEntropy (torch.zeros(2L, 3L, 5L)) (torch.zeros(2L, 4L, dtype = torch.int64)) |> ignore) "mismatch"

        testCase "the split is 90/10 by position" <| fun () ->
            let train, validation = Loss.split Loss.defaultTrainRatio [| 0 .. 99 |]
            Expect.equal train [| 0 .. 89 |] "first 90%"
            Expect.equal validation [| 90 .. 99 |] "last 10%"
            throwsGpt [ "between 0 and 1" ] (fun () -> Loss.split 1.0 [| 1 |] |> ignore) "ratio 1"

        testPropertyWithConfig propertyConfig "the split keeps every token in order" <| Prop.forAll (Arb.fromGen (Gen.zip (Gen.choose (0, 300)) (Gen.choose (1, 99)))) (fun (length, percent) ->
            let ids = Array.init length id
            let train, validation = Loss.split (float percent / 100.0) ids
            Expect.equal (Array.append train validation) ids "concatenation is the stream"
            Expect.equal train.Length (int (float percent / 100.0 * float length)) "cut at int(ratio * length)")
    ]

[<Tests>]
let scheduleTests =
    // Appendix D: peak 0.001, initial 0.0001, minimum 0.1 * initial, 20% warmup.
    let schedule = { InitialLearningRate = 1e-4; PeakLearningRate = 1e-3; MinLearningRate = 1e-5; WarmupSteps = 20; TotalSteps = 100 }
    let at = Schedule.learningRate schedule
    testList "learning-rate schedule" [
        testCase "values at key steps" <| fun () ->
            Expect.floatClose Accuracy.high (at 0) 1e-4 "step 0: initial"
            Expect.floatClose Accuracy.high (at 10) 5.5e-4 "halfway through warmup"
            Expect.floatClose Accuracy.high (at 20) 1e-3 "end of warmup: peak"
            Expect.floatClose Accuracy.high (at 60) ((1e-3 + 1e-5) / 2.0) "middle of the decay: halfway between peak and minimum"
            let last = 1e-5 + (1e-3 - 1e-5) * 0.5 * (1.0 + cos (Math.PI * 79.0 / 80.0))
            Expect.floatClose Accuracy.high (at 99) last "last step (the book's formula)"
            Expect.isLessThan (at 99) 1.1e-5 "last step is near the minimum"
            Expect.floatClose Accuracy.high (at 100) 1e-5 "end: minimum"
            Expect.floatClose Accuracy.high (at 1000) 1e-5 "past the end: minimum"

        testCase "constant schedule and no warmup" <| fun () ->
            let constant = Schedule.constant 4e-4 10
            Expect.equal ([ 0 .. 12 ] |> List.map (Schedule.learningRate constant) |> List.distinct) [ 4e-4 ] "always 4e-4"
            Expect.floatClose Accuracy.high (Schedule.learningRate { schedule with WarmupSteps = 0 } 0) 1e-3 "starts at the peak"

        testCase "rises during warmup, falls after" <| fun () ->
            let rates = [| for s in 0 .. 100 -> at s |]
            for s in 1 .. 20 do Expect.isGreaterThan rates[s] rates[s - 1] (sprintf "rising at %d" s)
            for s in 21 .. 100 do Expect.isLessThan rates[s] rates[s - 1] (sprintf "falling at %d" s)

        testCase "bad schedules are refused" <| fun () ->
            throwsGpt [ "minimum learning rate 0.01 is above the peak 0.001" ] (fun () -> Schedule.validate { schedule with MinLearningRate = 0.01 }) "min > peak"
            throwsGpt [ "at least one step" ] (fun () -> Schedule.validate { schedule with TotalSteps = 0 }) "no steps"
    ]

let private setGradients (model: torch.nn.Module) (scale: float) =
    for p in model.parameters () do
        use g = torch.randn(p.shape) * scale
        p.grad <- g.clone ()

[<Tests>]
let optimizerTests =
    testList "optimizer" [
        testCase "weight decay on matrices only by default, on everything with DecayAll" <| fun () ->
            use model = new BigramModel(alphabet.Length, 4, 0.0)
            let groups = Optimizer.parameterGroups 0.1 false model
            Expect.equal (groups |> Array.map (fun g -> List.ofArray g.Names, g.WeightDecay)) [| [ "wte.weight"; "head.weight" ], 0.1; [ "head.bias" ], 0.0 |] "nanoGPT groups"
            let all = Optimizer.parameterGroups 0.1 true model
            Expect.equal (all |> Array.map (fun g -> List.ofArray g.Names, g.WeightDecay)) [| [ "wte.weight"; "head.weight"; "head.bias" ], 0.1 |] "one group"
            use optimizer = Optimizer.adamW Optimizer.defaults model
            Expect.equal (optimizer.AdamW.ParamGroups |> Seq.length) 2 "two AdamW groups"

        testCase "a tensor shared under two names is optimized once" <| fun () ->
            use model = new TiedModel()
            let groups = Optimizer.parameterGroups 0.1 false model
            Expect.equal (groups |> Array.sumBy (fun g -> g.Parameters.Length)) 1 "one parameter"

        testCase "no decay leaves undecayed parameters untouched by the decay term" <| fun () ->
            use model = new BigramModel(alphabet.Length, 4, 0.0)
            use optimizer = Optimizer.adamW { Optimizer.defaults with LearningRate = 0.1; WeightDecay = 0.5 } model
            use biasBefore = model.Head.bias.detach().clone ()
            use weightBefore = model.Head.weight.detach().clone ()
            // Zero gradients: AdamW's update is 0, only the decay term moves a parameter.
            for p in model.parameters () do
                p.grad <- torch.zeros_like p
            optimizer.Step()
            Expect.isTrue (model.Head.bias.Equals biasBefore) "bias not decayed"
            use expected = weightBefore * (1.0 - 0.1 * 0.5)
            Expect.isTrue (torch.allclose(model.Head.weight, expected)) "weight decayed by lr * decay"

        testPropertyWithConfig { propertyConfig with maxTest = 50 } "clipping bounds the gradient norm and returns the norm before" <| Prop.forAll (Arb.fromGen (Gen.zip (Gen.choose (1, 1000)) (Gen.choose (1, 500)))) (fun (scale, maxNorm) ->
            use model = new BigramModel(alphabet.Length, 4, 0.0)
            let maxNorm = float maxNorm / 100.0
            setGradients model (float scale / 100.0)
            let parameters = Array.ofSeq (model.parameters ())
            let before = Optimizer.gradientNorm parameters
            let returned = Optimizer.clipGradients maxNorm parameters
            let after = Optimizer.gradientNorm parameters
            Expect.floatClose Accuracy.medium returned before "returns the norm before clipping"
            Expect.isLessThanOrEqual after (maxNorm * (1.0 + 1e-4)) "bounded after"
            if before <= maxNorm then Expect.floatClose Accuracy.medium after before "small gradients untouched"
            else Expect.floatClose Accuracy.medium after maxNorm "large gradients scaled to the bound")

        testCase "moments and step counts round-trip by name" <| fun () ->
            use model = new BigramModel(alphabet.Length, 4, 0.0)
            use optimizer = Optimizer.adamW Optimizer.defaults model
            for _ in 1 .. 3 do
                setGradients model 1.0
                optimizer.Step()
            use other = Optimizer.adamW Optimizer.defaults model
            let moments = Optimizer.momentTensors optimizer |> dict |> Collections.Generic.Dictionary
            let steps = Optimizer.stepCounts optimizer |> dict |> Collections.Generic.Dictionary
            Optimizer.restoreState "test" other moments steps
            Expect.equal (Optimizer.stepCounts other) (Optimizer.stepCounts optimizer) "steps"
            Expect.equal (Optimizer.stepCounts other |> Array.map snd |> Array.distinct) [| 3L |] "3 steps each"
            for (name, a), (_, b) in Array.zip (Optimizer.momentTensors optimizer) (Optimizer.momentTensors other) do
                Expect.isTrue (a.Equals b) name
            moments.Remove "head.bias.exp_avg" |> ignore
            throwsGpt [ "missing tensors: head.bias.exp_avg" ] (fun () -> Optimizer.restoreState "test" other moments steps) "missing"
    ]

[<Tests>]
let fineTuningRunFileTests =
    testList "run.json of fine-tuning runs" [
        testCase "read within the size limit, with the task checked and named" <| fun () ->
            use dir = new TempDir()
            let file = IO.Path.Combine(dir.Path, RunFile.fileName)
            throwsGpt [ "has no run.json"; "an instruction run" ] (fun () -> RunFile.readTask dir.Path "instruction" "an" |> ignore) "missing"
            IO.File.WriteAllText(file, """{"task": "classification", "model": "m"}""")
            let path, json = RunFile.readTask dir.Path "classification" "a"
            Expect.equal path file "the file"
            Expect.equal (json["model"].GetValue<string>()) "m" "its JSON"
            throwsGpt [ "\"classification\" run, not an instruction run" ] (fun () -> RunFile.readTask dir.Path "instruction" "an" |> ignore) "another task"
            IO.File.WriteAllText(file, """{"model": "m"}""")
            throwsGpt [ "pretraining run, not a classification run"; "gpt train --resume" ] (fun () -> RunFile.readTask dir.Path "classification" "a" |> ignore) "no task"
            IO.File.WriteAllText(file, """{"task": 7}""")
            throwsGpt [ "is a 7 run, not a classification run" ] (fun () -> RunFile.readTask dir.Path "classification" "a" |> ignore) "a task that is not text"
            IO.File.WriteAllText(file, "null")
            throwsGpt [ "expected a JSON object" ] (fun () -> RunFile.readTask dir.Path "classification" "a" |> ignore) "null"
            IO.File.WriteAllText(file, "{\"task\": ")
            throwsGpt [ "not valid JSON" ] (fun () -> RunFile.readTask dir.Path "classification" "a" |> ignore) "cut short"
            // a 17 MB run.json (sparse: nothing is written) is refused before it is read
            do
                use stream = new IO.FileStream(file, IO.FileMode.Create)
                stream.SetLength(17L * 1024L * 1024L)
            throwsGpt [ "run file" ] (fun () -> RunFile.readTask dir.Path "classification" "a" |> ignore) "too large"
    ]
