// Chapter 5 of "Build a Large Language Model (From Scratch)", pretraining on unlabeled data, in F# Interactive,
// with small numbers so that it runs in well under a minute on two CPU cores:
//   dotnet build src/Gpt.Cli && dotnet fsi scripts/ch05-pretraining.fsx
// The full-size run (gpt2-small, 10 epochs) is `gpt train` with the book's options: see the README.
#load "check-build.fsx" // "build first" when the library is not built
#load "load.fsx"

open System
open System.IO
open System.Threading
open TorchSharp
open Gpt.Text
open Gpt.Model
open Gpt.Weights
open Gpt.Generation
open Gpt.Training

let gpt2 = Tokenizers.gpt2 ()
let textToIds (text: string) = torch.tensor(gpt2.Encode text |> Array.map int64).unsqueeze 0L // (1, T)
let idsToText (ids: torch.Tensor) = gpt2.Decode(ids.squeeze(0L).data<int64>().ToArray() |> Array.map int)

// A small GPT-2: the book's layout (no QKV bias, dropout 0.1) at 2 layers of 64 dimensions and 64 positions.
let config =
    { GptConfig.gpt2Small with ContextLength = 64; EmbeddingDim = 64; Heads = 4; Layers = 2; QkvBias = false; DropRate = 0.1 }
let model = new GptModel(config, 123L)
printfn "model: %s parameters" (model.ParameterCount.ToString "N0")

// 5.1.1 An untrained model produces gibberish.
let start = textToIds "Every effort moves you"
let untrained = Generator.generateTextSimple model start 10 config.ContextLength
printfn "untrained: %s" (idsToText untrained)

// 5.1.2 The loss: inputs and targets shifted by one token, as in the book's two examples.
let inputs = torch.cat([| textToIds "every effort moves"; textToIds "I really like" |], 0L) // (2, 3)
let targets = torch.cat([| textToIds " effort moves you"; textToIds " really like chocolate" |], 0L) // (2, 3)
let logits =
    model.eval ()
    use _ = torch.no_grad ()
    model.forward inputs // (2, 3, 50257)
let probabilities = logits.softmax(-1L)
let targetProbabilities = probabilities.gather(2L, targets.unsqueeze 2L).squeeze 2L // (2, 3)
printfn "probabilities of the targets: %s" (targetProbabilities.ToString(TensorStringStyle.Julia))
let negativeMeanLog = -(targetProbabilities.log().mean().item<float32> ())
let crossEntropy = (Loss.crossEntropy logits targets).item<float32> ()
printfn "-mean(log p) = %.4f, cross-entropy = %.4f, ln(vocabulary) = %.4f" negativeMeanLog crossEntropy (log 50257.0)
printfn "perplexity %.0f: an untrained model hesitates between about as many tokens as the vocabulary has" (Loss.perplexity (float crossEntropy))

// 5.1.3 Training and validation losses over the built-in story, split 90/10 by position.
let story = Corpus.builtIn.Value
let ids = Corpus.encode gpt2 config.ContextLength [ story ]
printfn "story: %d characters, %d tokens" story.Text.Length ids.Length
let data = TrainingData.forGpt config gpt2 Loss.defaultTrainRatio ids
let lossOver (tokens: int[]) =
    Trainer.evaluate model (Dataset.create tokens config.ContextLength config.ContextLength) 2 1000
printfn "before training: training loss %.3f, validation loss %.3f" (lossOver data.Train) (lossOver data.Validation)

// 5.2 Training, as a run: a folder with run.json, checkpoints, metrics.jsonl, loss.png (Gpt.Plot follows the run's
// reports) and the final model. AdamW, evaluation every few steps, a greedy sample at each epoch end (through the KV
// cache), and the appendix D extras (warmup, cosine decay, clipping). The run builds the same model (the same seed).
let runs = Path.Combine(Path.GetTempPath(), "gpt-ch05-" + Guid.NewGuid().ToString("N").Substring(0, 8))
let runOptions =
    { RunOptions.defaults with
        Model = Some config; SampleTokens = 12
        Training =
            { TrainingSettings.defaults with
                Epochs = 2; BatchSize = 2; LearningRate = 2e-3; MinLearningRate = Some 2e-4; WarmupSteps = 5; EvalInterval = 10
                EvalBatches = 2; MaxSteps = Some 40; OutputDirectory = runs; Name = Some "ch05" } }
let show (progress: RunProgress) =
    match progress.Kind, progress.Sample with
    | RunEventKind.Evaluation, _ ->
        printfn "step %3d (epoch %d): training loss %.3f, validation loss %.3f" progress.Step progress.Epoch
            (defaultArg progress.EvaluatedTrainLoss nan) (defaultArg progress.ValidationLoss nan)
    | RunEventKind.EpochEnd, Some sample -> printfn "sample after epoch %d: %s" progress.Epoch (sample.ReplaceLineEndings " ")
    | _ -> ()
let result = Run.pretrain runOptions (Gpt.Plot.Plots.follow show) CancellationToken.None
let runDirectory = result.RunDirectory
printfn "%d steps, %d tokens seen; wrote %s" result.Steps result.TokensSeen (String.Join(", ", Directory.GetFileSystemEntries runDirectory |> Array.map Path.GetFileName |> Array.sort))
let trained = Pretrained.load result.ModelDirectory.Value
// RunOptions.fromCheckpoint runDirectory gives the run's options back: `Run.pretrain { it with MaxSteps = Some 80 }`
// would continue the run from its last checkpoint.

// 5.3.1 Temperature scaling on the book's toy vocabulary and next-token logits.
let vocabulary = [| "closer"; "every"; "effort"; "forward"; "inches"; "moves"; "pizza"; "toward"; "you" |]
let nextTokenLogits = torch.tensor [| 4.51f; 0.89f; -1.90f; 6.75f; 1.63f; -1.62f; -1.89f; 6.28f; 1.79f |]
for temperature in [ 1.0; 0.1; 5.0 ] do
    let scaled = (Sampling.scaleTemperature temperature nextTokenLogits).softmax(-1L)
    printfn "temperature %.1f: %s" temperature
        (String.Join(", ", Array.map2 (fun word (p: float32) -> sprintf "%s %.3f" word p) vocabulary (scaled.data<float32>().ToArray())))
let generator = new torch.Generator(123UL, torch.CPU)
let counts = Array.zeroCreate<int> vocabulary.Length
for _ in 1 .. 1000 do
    let id = (Sampling.nextToken 1.0 None None generator nextTokenLogits).item<int64> ()
    counts[int id] <- counts[int id] + 1
printfn "1000 draws at temperature 1: %s" (String.Join(", ", Array.map2 (sprintf "%d x %s") counts vocabulary))
generator.Dispose()

// 5.3.2 Top-k: only the k most likely tokens stay candidates.
printfn "top-3 logits: %s" ((Sampling.keepTopK 3 nextTokenLogits).ToString(TensorStringStyle.Julia))

// 5.3.3 Generation with temperature and top-k through the KV-cached generator.
let languageModel = LanguageModel.ofGpt trained
for temperature, topK in [ 0.0, None; 1.4, Some 25 ] do
    let generationOptions = { GenerationOptions.defaults with MaxNewTokens = 15; Temperature = temperature; TopK = topK; Seed = Some 123L }
    let text = Generator.generateText languageModel gpt2 generationOptions "Every effort moves you"
    printfn "temperature %.1f, top-k %A: Every effort moves you%s" temperature topK (text.ReplaceLineEndings " ")

// 5.4 Saving and loading: the Hugging Face layout (config.json + model.safetensors), and the latest checkpoint.
let saved = Path.Combine(runDirectory, "copy")
Pretrained.save saved trained
let reloaded = Pretrained.load saved
let fromCheckpoint = Checkpoint.loadGpt runDirectory
let same (a: GptModel) (b: GptModel) = (a.forward start).allclose(b.forward start, rtol = 0.0, atol = 0.0)
printfn "reloaded model gives the same logits: %b; the checkpoint too: %b" (same trained reloaded) (same trained fromCheckpoint)
Directory.Delete(runs, true)
