// Chapter 7 of "Build a Large Language Model (From Scratch)", fine-tuning to follow instructions, in F# Interactive,
// with small numbers so that it runs in about a minute on two CPU cores:
//   dotnet build src/Gpt.Cli && dotnet fsi scripts/ch07-instructions.fsx
// The book fine-tunes GPT-2 medium (355M) on 1,100 instructions and judges the answers with Llama 3; here a small model
// pretrained for a few steps on the built-in story learns rule-made instructions (plurals, opposites, sorting, sums).
// With the book's data: gpt finetune instruct --model gpt2-medium --data instruction-data.json (see the README).
#load "check-build.fsx" // "build first" when the library is not built
#load "load.fsx"

open System
open System.IO
open System.Threading
open TorchSharp
open Gpt.Model
open Gpt.Text
open Gpt.Weights
open Gpt.Generation
open Gpt.Training
open Gpt.FineTuning

let runs = Path.Combine(Path.GetTempPath(), "gpt-ch07-" + Guid.NewGuid().ToString("N").Substring(0, 8))
let gpt2 = Tokenizers.gpt2 ()

// 7.2 The data: instruction, optional input, output; the book's alpaca prompt (and the exercise's phi3 one).
let entries = InstructionData.builtIn 1100 123
let entry = entries |> List.find (fun e -> e.Input <> "")
printfn "%d entries, e.g.:\n%s\n---\n%s" entries.Length (InstructionData.fullText PromptStyle.Alpaca entry) (InstructionData.fullText PromptStyle.Phi3 entry)

// 7.3 Batches: the book's custom_collate_fn. Every text gets an end-of-text id, the batch is padded with it; targets
// are the inputs shifted by one, and every end-of-text target after the first is -100 (ignored by the loss).
let examples = entries |> List.take 3 |> List.map (InstructionData.encode gpt2 PromptStyle.Alpaca) |> Array.ofList
let inputs, targets = InstructionData.collate 50256 -100L false None examples
printfn "inputs %A, targets %A; -100 targets per row: %A" inputs.shape targets.shape
    [| for row in 0L .. 2L -> targets[row].eq(torch.tensor -100L).sum().item<int64> () |]

// 7.4-7.5 A pretrained model to start from (the book loads GPT-2 medium's weights).
let pretrained =
    Run.pretrain
        { RunOptions.defaults with
            Model = Some { RunOptions.defaultModel with Layers = 2; EmbeddingDim = 128 }; SamplePrompt = None
            Training = { TrainingSettings.defaults with MaxSteps = Some 20; EvalInterval = 20; OutputDirectory = runs; Name = Some "lm" } }
        ignore CancellationToken.None
let greedy = { GenerationOptions.defaults with MaxNewTokens = 12; EndOfTextId = Some 50256 }
let before =
    use model = Pretrained.load pretrained.ModelDirectory.Value
    Instruction.respond model gpt2 PromptStyle.Alpaca greedy entry
printfn "before fine-tuning: %s" before

// 7.6 Fine-tuning: every parameter, AdamW with weight decay 0.1, the next-token loss over prompt and response.
let options =
    { InstructionOptions.defaults pretrained.ModelDirectory.Value with
        ResponseTokens = 12
        Training = { TrainingSettings.bookFineTuning 1 with LearningRate = 1e-3; MaxSteps = Some 60; EvalInterval = 20; OutputDirectory = runs; Name = Some "instruct" } }
let show (p: RunProgress) =
    if p.Kind = RunEventKind.Evaluation then
        printfn "step %3d: loss %.3f / %.3f" p.Step (defaultArg p.EvaluatedTrainLoss nan) (defaultArg p.ValidationLoss nan)
let result = Instruction.fineTune options (Gpt.Plot.Plots.follow show) CancellationToken.None
printfn "wrote %s" (String.Join(", ", Directory.GetFileSystemEntries result.Run.RunDirectory |> Array.map Path.GetFileName |> Array.sort))

// 7.7 Responses of the test split (test-responses.json) and 7.8 their scores. A judge model served by Ollama adds a
// 0-100 score: gpt judge --responses <run>/test-responses.json --url http://localhost:11434
let responses = InstructionData.readResponses result.ResponsesFile.Value
for e, r in List.truncate 3 responses do printfn "%s %s -> %s (expected %s)" e.Instruction e.Input r e.Output
printfn "exact match %.1f%%, token F1 %.3f on %d test entries" (100.0 * defaultArg result.ExactMatch nan) (defaultArg result.TokenF1 nan) result.TestExamples
Directory.Delete(runs, true)
