module Gpt.Tests.CheckpointTests

open System.IO
open System.Text.Json
open Expecto
open TorchSharp
open Gpt.Training
open Gpt.Tests.TestUtil
open Gpt.Tests.TrainingFixtures

let private state step validationLoss =
    { Step = step; Epoch = 1; BatchInEpoch = step; BatchesPerEpoch = 100; TokensSeen = int64 step * 24L
      ElapsedSeconds = 1.5; ValidationLoss = validationLoss; BestValidationLoss = validationLoss
      DataSeed = 7; DataFingerprint = "abc"; Tokenizer = "chars"
      ModelConfiguration = """{"kind":"bigram"}"""; TrainingOptions = TrainerOptions.toJson tinyOptions }

/// A model and optimizer a few AdamW steps in, so that every piece of state is non-trivial.
let private trained () =
    let model = new BigramModel(alphabet.Length, 4, 0.1)
    let optimizer = Optimizer.adamW Optimizer.defaults model
    for _ in 1 .. 2 do
        use scope = torch.NewDisposeScope()
        optimizer.ZeroGrad()
        let inputs = torch.tensor([| 0L; 1L; 2L; 3L |]).view(1L, 4L)
        let targets = torch.tensor([| 1L; 2L; 3L; 4L |]).view(1L, 4L)
        (Loss.batch model inputs targets).backward ()
        optimizer.Step()
    model, optimizer

let private stepDirectories root =
    Directory.GetDirectories(root, "step-*") |> Array.map Path.GetFileName |> Array.sort |> List.ofArray

[<Tests>]
let tests =
    testSequenced <| testList "checkpoints" [
        testCase "a checkpoint restores model, optimizer, RNG and state exactly" <| fun () ->
            use dir = new TempDir()
            let model, optimizer = trained ()
            use _ = model
            use _ = optimizer
            let directory = Checkpoint.save dir.Path 3 model optimizer (state 2 (Some 1.25))
            Expect.equal (Path.GetFileName directory) "step-00000002" "directory name"
            for file in [ "model.safetensors"; "optimizer.safetensors"; "checkpoint.json" ] do
                Expect.isTrue (File.Exists(Path.Combine(directory, file))) file
            use drawnAfterSave = torch.rand(5L)
            use other = new BigramModel(alphabet.Length, 4, 0.1)
            use otherOptimizer = Optimizer.adamW Optimizer.defaults other
            let restored = Checkpoint.restore directory other otherOptimizer
            Expect.equal restored (state 2 (Some 1.25)) "state"
            Expect.isTrue (sameWeights model other) "weights"
            Expect.equal (Optimizer.stepCounts otherOptimizer) (Optimizer.stepCounts optimizer) "AdamW steps"
            for (name, a), (_, b) in Array.zip (Optimizer.momentTensors optimizer) (Optimizer.momentTensors otherOptimizer) do
                Expect.isTrue (a.Equals b) name
            use drawnAfterRestore = torch.rand(5L)
            Expect.isTrue (drawnAfterRestore.Equals drawnAfterSave) "the generator continues from the saved state"

        testCase "the JSON holds configuration, position, tokenizer and AdamW hyperparameters" <| fun () ->
            use dir = new TempDir()
            let model, optimizer = trained ()
            use _ = model
            use _ = optimizer
            let directory = Checkpoint.save dir.Path 3 model optimizer (state 4 None)
            use json = JsonDocument.Parse(File.ReadAllText(Path.Combine(directory, "checkpoint.json")))
            let root = json.RootElement
            Expect.equal (root.GetProperty("step").GetInt32()) 4 "step"
            Expect.equal (root.GetProperty("tokenizer").GetString()) "chars" "tokenizer"
            Expect.equal (root.GetProperty("model_configuration").GetProperty("kind").GetString()) "bigram" "model config"
            Expect.equal (root.GetProperty("training_options").GetProperty("batch_size").GetInt32()) 3 "options"
            Expect.equal (root.GetProperty("validation_loss").ValueKind) JsonValueKind.Null "no validation loss"
            let groups = root.GetProperty("optimizer").GetProperty("groups")
            Expect.equal (groups[1].GetProperty("weight_decay").GetDouble()) 0.0 "undecayed group"
            Expect.equal (groups[0].GetProperty("steps").GetProperty("wte.weight").GetInt64()) 2L "per-parameter step"
            Expect.isGreaterThan (root.GetProperty("torch_rng_state").GetString().Length) 1000 "generator state"

        testCase "a save killed midway leaves the previous checkpoint loadable" <| fun () ->
            use dir = new TempDir()
            let model, optimizer = trained ()
            use _ = model
            use _ = optimizer
            let good = Checkpoint.save dir.Path 3 model optimizer (state 2 (Some 2.0))
            // A save killed while writing: a temporary directory with a truncated tensor file and no checkpoint.json.
            let killed = Path.Combine(dir.Path, ".tmp-step-00000004-0123456789abcdef")
            Directory.CreateDirectory killed |> ignore
            let bytes = File.ReadAllBytes(Path.Combine(good, "model.safetensors"))
            File.WriteAllBytes(Path.Combine(killed, "model.safetensors"), bytes[.. bytes.Length / 2])
            // A checkpoint directory whose model file was cut short afterwards (a copy interrupted, a full disk).
            let damaged = Path.Combine(dir.Path, "step-00000006")
            Directory.CreateDirectory damaged |> ignore
            for file in Directory.GetFiles good do
                File.Copy(file, Path.Combine(damaged, Path.GetFileName file))
            File.WriteAllText(Path.Combine(damaged, "checkpoint.json"), File.ReadAllText(Path.Combine(good, "checkpoint.json")).Replace("\"step\": 2", "\"step\": 6"))
            File.WriteAllBytes(Path.Combine(damaged, "model.safetensors"), bytes[.. bytes.Length - 10])
            Expect.equal (Checkpoint.latest dir.Path) (Some good) "latest skips the unfinished and the truncated"
            // Issue 16: resuming silently from an older checkpoint than the latest is refused; the error names the damaged
            // one and offers the previous good one.
            throwsGpt [ "the latest checkpoint"; "step-00000006' is damaged"; "model.safetensors has"; sprintf "--resume %s" good ]
                (fun () -> Checkpoint.resolve dir.Path |> ignore) "resolve a root with a damaged latest checkpoint"
            throwsGpt [ "step-00000006"; "model.safetensors has"; "(truncated or replaced?)" ]
                (fun () -> Checkpoint.restore damaged model optimizer |> ignore) "the damaged one is refused clearly"
            throwsGpt [ "is not a complete checkpoint"; "checkpoint.json is missing" ]
                (fun () -> Checkpoint.read killed |> ignore) "the unfinished one is refused clearly"
            use other = new BigramModel(alphabet.Length, 4, 0.1)
            use otherOptimizer = Optimizer.adamW Optimizer.defaults other
            Checkpoint.restore (Checkpoint.resolve good) other otherOptimizer |> ignore
            Expect.isTrue (sameWeights model other) "the previous checkpoint loads (named explicitly)"
            // The next save clears the leftover temporary directory.
            Checkpoint.save dir.Path 3 model optimizer (state 8 None) |> ignore
            Expect.isFalse (Directory.Exists killed) "leftover removed"

        testCase "a flipped byte is caught by the recorded SHA-256" <| fun () ->
            use dir = new TempDir()
            let model, optimizer = trained ()
            use _ = model
            use _ = optimizer
            let directory = Checkpoint.save dir.Path 3 model optimizer (state 2 None)
            let path = Path.Combine(directory, "optimizer.safetensors")
            let bytes = File.ReadAllBytes path
            bytes[bytes.Length - 1] <- bytes[bytes.Length - 1] ^^^ 0xFFuy
            File.WriteAllBytes(path, bytes)
            throwsGpt [ "optimizer.safetensors does not match its recorded SHA-256" ] (fun () -> Checkpoint.restore directory model optimizer |> ignore) "corrupted"

        testCase "keeps the last K and the best by validation loss" <| fun () ->
            use dir = new TempDir()
            let model, optimizer = trained ()
            use _ = model
            use _ = optimizer
            for step, loss in [ 1, 5.0; 2, 1.0; 3, 4.0; 4, 3.0; 5, 2.0 ] do
                Checkpoint.save dir.Path 2 model optimizer (state step (Some loss)) |> ignore
            Expect.equal (stepDirectories dir.Path) [ "step-00000002"; "step-00000004"; "step-00000005" ] "last two and the best"
            Expect.equal (Checkpoint.best dir.Path |> Option.map Path.GetFileName) (Some "step-00000002") "best"
            Expect.equal (Checkpoint.latest dir.Path |> Option.map Path.GetFileName) (Some "step-00000005") "latest"
            // Saving the same step again replaces it.
            Checkpoint.save dir.Path 2 model optimizer (state 5 (Some 2.5)) |> ignore
            Expect.equal ((Checkpoint.read (Path.Combine(dir.Path, "step-00000005"))).ValidationLoss) (Some 2.5) "replaced"

        testCase "loading into a different model names the mismatch" <| fun () ->
            use dir = new TempDir()
            let model, optimizer = trained ()
            use _ = model
            use _ = optimizer
            let directory = Checkpoint.save dir.Path 3 model optimizer (state 2 None)
            use wider = new BigramModel(alphabet.Length, 6, 0.1)
            throwsGpt [ "tensor 'wte.weight' has shape [12, 4], expected [12, 6]" ] (fun () -> Checkpoint.loadModel directory wider) "shape"
            use other = new TiedModel()
            throwsGpt [ "checkpoint"; "keys:" ] (fun () -> Checkpoint.loadModel directory other) "keys"
            throwsGpt [ "checkpoint path"; "does not exist" ] (fun () -> Checkpoint.resolve (Path.Combine(dir.Path, "nope")) |> ignore) "no such path"
            use empty = new TempDir()
            throwsGpt [ "no complete checkpoint in" ] (fun () -> Checkpoint.resolve empty.Path |> ignore) "empty root"
    ]
