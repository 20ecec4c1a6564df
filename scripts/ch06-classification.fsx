// Chapter 6 of "Build a Large Language Model (From Scratch)", fine-tuning for classification, in F# Interactive,
// with small numbers so that it runs in about a minute on two CPU cores:
//   dotnet build src/Gpt.Cli && dotnet fsi scripts/ch06-classification.fsx
// The book fine-tunes GPT-2 (124M) on the SMS Spam Collection; here a small model pretrained for a few steps on the
// built-in story learns the built-in "Harbor Messages" (240 texts written for this project, ham or spam).
// With the real data set: gpt finetune classify --model gpt2 --data SMSSpamCollection --balance (see the README).
#load "check-build.fsx" // "build first" when the library is not built
#load "load.fsx"

open System
open System.IO
open System.Threading
open TorchSharp
open Gpt.Model
open Gpt.Text
open Gpt.Weights
open Gpt.Training
open Gpt.FineTuning

let runs = Path.Combine(Path.GetTempPath(), "gpt-ch06-" + Guid.NewGuid().ToString("N").Substring(0, 8))
let gpt2 = Tokenizers.gpt2 ()

// 6.2 The data: labelled texts, split 70/10/20 after a seeded shuffle (the book's random_split).
let messages = ClassificationData.builtIn.Value
printfn "%d messages: %A" messages.Length (messages |> List.countBy _.Label)
let train, validation, test = ClassificationData.split 123 0.7 0.1 messages
printfn "split: %d training, %d validation, %d test" train.Length validation.Length test.Length

// 6.3 Batches: token ids padded with <|endoftext|> (50256) to the longest text of the batch; each row's real length
// is kept, so the classifier reads the hidden state of the last real token.
let labels = ClassificationData.labels None messages
let examples = ClassificationData.encode gpt2 labels 128 train
let batch = ClassificationData.collate 50256 None examples[.. 7]
printfn "labels %A; a batch of ids %A, lengths %A, labels %A" labels batch.Ids.shape batch.Lengths (batch.Labels.data<int64>().ToArray())

// 6.4 A pretrained model to start from: a few steps on the built-in story (the book loads GPT-2's weights).
let pretrained =
    Run.pretrain
        { RunOptions.defaults with
            Model = Some { RunOptions.defaultModel with Layers = 2; EmbeddingDim = 128 }; SamplePrompt = None
            Training = { TrainingSettings.defaults with MaxSteps = Some 20; EvalInterval = 20; OutputDirectory = runs; Name = Some "lm" } }
        ignore CancellationToken.None
let languageModel = pretrained.ModelDirectory.Value

// 6.5 The classifier: the body of the language model and a new head of 2 outputs (Hugging Face's `score`), reading the
// last real token. Before fine-tuning it guesses.
// (let, not use: a script's top level is a module, where F# treats use as let with warning FS0524; disposed below.)
let model = ModelSource.load languageModel
let untrained = ClassifierFiles.fromLanguageModel model labels 50256 Pooling.LastToken 0.0 123L
let before = Classification.classify untrained gpt2 [ "You have won a free cruise, text WIN to 80082"; "See you at the harbor at six" ]
for p in before do printfn "untrained: %s -> %s %A" p.Text p.Label p.Probabilities

// 6.6-6.7 Fine-tuning: the last transformer block, the final LayerNorm and the head train (the book's choice), AdamW
// 5e-5 with weight decay 0.1; loss and accuracy on both splits at each evaluation, then the test split.
let options =
    { ClassificationOptions.defaults languageModel with
        Training = { TrainingSettings.bookFineTuning 2 with LearningRate = 1e-3; EvalInterval = 10; OutputDirectory = runs; Name = Some "classifier" } }
let show (p: RunProgress) =
    if p.Kind = RunEventKind.Started then printfn "training %d of %d parameters" p.TrainableParameterCount p.ParameterCount
    if p.Kind = RunEventKind.Evaluation then
        printfn "step %3d: loss %.3f / %.3f, accuracy %.2f / %.2f" p.Step (defaultArg p.EvaluatedTrainLoss nan) (defaultArg p.ValidationLoss nan)
            (defaultArg p.TrainAccuracy nan) (defaultArg p.ValidationAccuracy nan)
let result = Classification.fineTune options (Gpt.Plot.Plots.follow show) CancellationToken.None
printfn "test accuracy %.1f%% on %d texts" (100.0 * defaultArg result.TestAccuracy nan) result.TestExamples
printfn "wrote %s" (String.Join(", ", Directory.GetFileSystemEntries result.Run.RunDirectory |> Array.map Path.GetFileName |> Array.sort))

// 6.8 Using the classifier.
let classifier = ClassifierFiles.load result.Run.ModelDirectory.Value
for p in Classification.classify classifier gpt2 [ "You have won a free cruise, text WIN to 80082"; "See you at the harbor at six" ] do
    printfn "fine-tuned: %s -> %s (%.2f)" p.Text p.Label p.Probabilities[p.LabelId]
for owner in [ classifier :> IDisposable; untrained; model ] do owner.Dispose()
Directory.Delete(runs, true)
