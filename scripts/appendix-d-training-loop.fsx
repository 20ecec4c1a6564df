// Appendix D of "Build a Large Language Model (From Scratch)", "Adding bells and whistles to the training loop":
// learning-rate warmup, cosine decay and gradient clipping, each step by step next to this project's functions
// (Schedule.learningRate, Optimizer.gradientNorm, Optimizer.clipGradients), then the book's train_model with all three.
//   dotnet build src/Gpt.Cli && dotnet fsi scripts/appendix-d-training-loop.fsx
#load "check-build.fsx" // "build first" when the library is not built
#load "load.fsx"

open System
open System.IO
open System.Threading
open TorchSharp
open Gpt.Text
open Gpt.Model
open Gpt.Training

// A small model and the built-in story: the same code runs gpt2-small on the book's text, only slower.
let gpt2 = Tokenizers.gpt2 ()
let config = { GptConfig.gpt2Small with ContextLength = 32; EmbeddingDim = 32; Heads = 4; Layers = 2; DropRate = 0.0; QkvBias = false }
let ids = Corpus.tokenize gpt2 [ Corpus.builtIn.Value ]
let trainIds, _ = Loss.split Loss.defaultTrainRatio ids
let windows = Dataset.create trainIds config.ContextLength config.ContextLength
let loader = { Dataset.defaultLoader with BatchSize = 8; Seed = 123 }
let epochs = 2
let batchesPerEpoch = Dataset.batchCount windows loader
let totalSteps = epochs * batchesPerEpoch

// D.1 Warmup: from a small initial rate up to the peak, by the same increment at every step, over the first 20% of
// the steps. D.2 Cosine decay: from the peak down to a minimum (a tenth of the initial rate, as the book), along half
// a cosine, by the last step.
let initialLr, peakLr = 1e-4, 1e-2
let minLr = 0.1 * initialLr
let warmupSteps = int (0.2 * float totalSteps)
printfn "%d batches per epoch, %d epochs: %d steps, %d of them warmup" batchesPerEpoch epochs totalSteps warmupSteps
let lrIncrement = (peakLr - initialLr) / float warmupSteps
let bookRate step =
    if step < warmupSteps then initialLr + float step * lrIncrement
    else
        let progress = float (step - warmupSteps) / float (totalSteps - warmupSteps)
        minLr + (peakLr - minLr) * 0.5 * (1.0 + Math.Cos(Math.PI * progress))
let schedule =
    { InitialLearningRate = initialLr; PeakLearningRate = peakLr; MinLearningRate = minLr; WarmupSteps = warmupSteps; TotalSteps = totalSteps }
printfn "step  the book's formula  Schedule.learningRate"
for step in [ 0; 1; warmupSteps / 2; warmupSteps - 1; warmupSteps; (warmupSteps + totalSteps) / 2; totalSteps - 1 ] do
    printfn "%4d  %.6f            %.6f" step (bookRate step) (Schedule.learningRate schedule step)
let largestDifference = [ 0 .. totalSteps - 1 ] |> List.map (fun s -> abs (bookRate s - Schedule.learningRate schedule s)) |> List.max
printfn "largest difference over all %d steps: %g" totalSteps largestDifference

// D.3 Gradient clipping: when the gradients' global L2 norm (all of them as one vector) exceeds max_norm, every
// gradient is scaled by max_norm / norm, so the norm becomes max_norm and the direction stays.
let model = new GptModel(config, 123L)
let inputs, targets = Dataset.toTensors windows [| 0; 1; 2; 3 |]
let loss = Loss.batch model inputs targets
loss.backward ()
let parameters = Optimizer.trainable model |> Array.map snd
let largestGradient () = parameters |> Array.map (fun p -> p.grad.abs().max().item<float32> ()) |> Array.max
let byHand = sqrt (parameters |> Array.sumBy (fun p -> p.grad.square().sum().item<float32> () |> float))
printfn "loss %.4f; global gradient norm by hand %.4f, Optimizer.gradientNorm %.4f" (loss.item<float32> ()) byHand (Optimizer.gradientNorm parameters)
let beforeLargest = largestGradient ()
let maxNorm = 1.0
let returned = Optimizer.clipGradients maxNorm parameters
printfn "clipped to max_norm %.1f: norm before %.4f, after %.4f" maxNorm returned (Optimizer.gradientNorm parameters)
printfn "largest gradient %.5f -> %.5f (scaled by %.4f = max_norm / norm)" beforeLargest (largestGradient ()) (maxNorm / returned)
model.zero_grad ()

// D.4 The book's train_model: the rate of each step from the schedule, clipping once the warmup is over, AdamW.
let optimizer = Optimizer.adamW { Optimizer.defaults with LearningRate = peakLr; WeightDecay = 0.1; DecayAll = true } model
let rates = ResizeArray<float>()
let mutable step = 0
for epoch in 0 .. epochs - 1 do
    model.train ()
    for inputs, targets in Dataset.batches windows loader epoch do
        use scope = torch.NewDisposeScope()
        optimizer.AdamW.zero_grad ()
        let lr = Schedule.learningRate schedule step
        optimizer.LearningRate <- lr
        rates.Add lr
        let batchLoss = Loss.batch model inputs targets
        batchLoss.backward ()
        if step >= warmupSteps then Optimizer.clipGradients 1.0 parameters |> ignore // the book: after the warmup only
        optimizer.AdamW.step () |> ignore
        if step % 10 = 0 || step = totalSteps - 1 then
            printfn "step %3d  lr %.6f  loss %.3f" step lr (batchLoss.item<float32> ())
        step <- step + 1
printfn "%d steps; rates: first %.6f, peak %.6f at step %d, last %.6f" step rates[0] (Seq.max rates) (Seq.findIndex ((=) (Seq.max rates)) rates) rates[rates.Count - 1]

// `gpt train` (Run.pretrain, the trainer every run shares) takes the same schedule from its options and clips at every
// step (nanoGPT's choice; the book starts after the warmup). Its reported rates are Schedule.learningRate's:
let runs = Path.Combine(Path.GetTempPath(), sprintf "appendix-d-%d" Environment.ProcessId)
let reported = ResizeArray<float>()
let run =
    Run.pretrain
        { RunOptions.defaults with
            Model = Some { config with Layers = 1 }; SamplePrompt = None
            Training =
                { TrainingSettings.defaults with
                    MaxSteps = Some 8; BatchSize = 2; LearningRate = peakLr; InitialLearningRate = Some initialLr; MinLearningRate = Some minLr
                    WarmupSteps = 3; GradientClip = Some 1.0; EvalInterval = 8; EvalBatches = 1; OutputDirectory = runs; Name = Some "d" } }
        (fun p -> if p.Kind = RunEventKind.Step then reported.Add p.LearningRate) CancellationToken.None
let expected = List.init 8 (Schedule.learningRate { schedule with WarmupSteps = 3; TotalSteps = run.TotalSteps })
printfn "the trainer's %d rates equal Schedule.learningRate: %b" reported.Count (List.ofSeq reported = expected)
Directory.Delete(runs, true)
