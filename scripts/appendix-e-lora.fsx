// Appendix E of "Build a Large Language Model (From Scratch)", parameter-efficient fine-tuning with LoRA, in F#
// Interactive, with small numbers so that it runs in about a minute on two CPU cores:
//   dotnet build src/Gpt.Cli && dotnet fsi scripts/appendix-e-lora.fsx
// The book adds LoRA to GPT-2 (124M) and fine-tunes it on the SMS Spam Collection; here a small model pretrained for
// a few steps on the built-in story learns the built-in "Harbor Messages" with adapters on its frozen weights.
// With GPT-2's weights: gpt finetune classify --model gpt2 --data SMSSpamCollection --balance --lora-rank 16 (README).
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

let runs = Path.Combine(Path.GetTempPath(), "gpt-appE-" + Guid.NewGuid().ToString("N").Substring(0, 8))
let gpt2 = Tokenizers.gpt2 ()

// E.3 LoRA: beside a frozen weight W [out, in] two small matrices, A [r, in] (random) and B [out, r] (zeros), so that
// the map computes W x + (alpha / r) · B (A x) and starts out unchanged. Only A and B train: r · (in + out) numbers
// instead of in · out. On GPT-2 (124M), rank 16 on every map of the blocks:
let settings = LoraSettings.create 16 (Some 32.0) None
printfn "gpt2-small, rank 16: %d trainable LoRA parameters (targets %s)"
    (LoraSettings.parameterCount settings GptConfig.gpt2Small) (String.Join(", ", settings.Targets))

// A fresh adapter changes nothing; after training, merging B A into W gives the same logits without the extra work.
let demo () =
    use model = new GptModel({ GptConfig.gpt2Small with ContextLength = 16; EmbeddingDim = 64; Heads = 4; Layers = 2; DropRate = 0.0 }, 1L)
    model.eval ()
    use ids = torch.tensor([| 15496L; 11L; 314L; 716L |]).view(1L, -1L)
    use _ = torch.no_grad ()
    use before = model.forward ids
    let adapters = Lora.attach (LoraSettings.create 4 None None) 2L model
    use same = model.forward ids
    printfn "%d adapters attached; logits unchanged: %b" adapters.Length (same.equal(before).all().item<bool> ())
    for _, adapter in adapters do adapter.B.normal_(0.0, 0.05) |> ignore
    use adapted = model.forward ids
    use merged = Lora.merged model
    use mergedLogits = merged.forward ids
    printfn "with trained B: largest change %.3f; merged vs unmerged %.1e"
        (adapted.sub(before).abs().max().item<float32> ()) (mergedLogits.sub(adapted).abs().max().item<float32> ())
demo ()

// E.2 A pretrained model to start from: a few steps on the built-in story (the book loads GPT-2's weights).
let pretrained =
    Run.pretrain
        { RunOptions.defaults with
            Model = Some { RunOptions.defaultModel with Layers = 2; EmbeddingDim = 128 }; SamplePrompt = None
            Training = { TrainingSettings.defaults with MaxSteps = Some 20; EvalInterval = 20; OutputDirectory = runs; Name = Some "lm" } }
        ignore CancellationToken.None
let languageModel = pretrained.ModelDirectory.Value

// E.4 Fine-tuning with LoRA: the same classification run as chapter 6, but the body is frozen and only the adapters
// (and the new head, trained in full as PEFT's modules_to_save) learn.
let options =
    { ClassificationOptions.defaults languageModel with
        Training =
            { TrainingSettings.bookFineTuning 2 with
                LearningRate = 5e-3; EvalInterval = 10; OutputDirectory = runs; Name = Some "lora"
                Lora = Some(LoraSettings.create 8 None None) } }
let show (p: RunProgress) =
    if p.Kind = RunEventKind.Started then printfn "training %d of %d parameters" p.TrainableParameterCount p.ParameterCount
    if p.Kind = RunEventKind.Evaluation then
        printfn "step %3d: loss %.3f / %.3f, accuracy %.2f / %.2f" p.Step (defaultArg p.EvaluatedTrainLoss nan) (defaultArg p.ValidationLoss nan)
            (defaultArg p.TrainAccuracy nan) (defaultArg p.ValidationAccuracy nan)
let result = Classification.fineTune options (Gpt.Plot.Plots.follow show) CancellationToken.None
printfn "test accuracy %.1f%% on %d texts" (100.0 * defaultArg result.TestAccuracy nan) result.TestExamples
printfn "wrote %s" (String.Join(", ", Directory.GetFileSystemEntries result.Run.RunDirectory |> Array.map Path.GetFileName |> Array.sort))

// The run wrote the adapters in Hugging Face PEFT's layout (adapter/, a few hundred KB) beside the merged classifier
// (model/). The base plus the adapter is the classifier:
let adapter = Path.Combine(result.Run.RunDirectory, Run.adapterFolder)
printfn "adapter: %s" (String.Join(", ", Directory.GetFiles adapter |> Array.map Path.GetFileName |> Array.sort))
let fromAdapter = AdapterLoading.classifier false None adapter
let saved = ClassifierFiles.load result.Run.ModelDirectory.Value
// Two texts of the test split (the run's seeded 70/10/20 split), one of each label.
let _, _, testTexts = ClassificationData.split options.Training.Seed 0.7 0.1 ClassificationData.builtIn.Value
let texts = [ for label in [ "spam"; "ham" ] -> (testTexts |> List.find (fun t -> t.Label = label)).Text ]
for a, b in Array.zip (Classification.classify fromAdapter gpt2 texts) (Classification.classify saved gpt2 texts) do
    printfn "%s -> %s (%.2f); the merged model agrees: %b" a.Text a.Label a.Probabilities[a.LabelId] (a.Label = b.Label)
Directory.Delete(runs, true)
