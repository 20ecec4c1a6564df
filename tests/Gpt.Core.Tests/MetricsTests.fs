module Gpt.Tests.MetricsTests

open System
open System.IO
open Expecto
open Gpt.Training
open Gpt.Tests.TestUtil

let private records =
    [| for i in 0 .. 20 ->
           { Step = 1 + 5 * i; Epoch = 1 + i / 7; TokensSeen = int64 (1 + 5 * i) * 512L
             TrainLoss = 10.0 * exp (-0.2 * float i) + 0.3; ValidationLoss = 6.0 + 4.0 * exp (-0.4 * float i)
             TrainAccuracy = None; ValidationAccuracy = None; LearningRate = 4e-4; ElapsedSeconds = float i * 1.5; TokensPerSecond = 1700.0 } |]

[<Tests>]
let tests =
    testList "metrics" [
        testCase "JSONL: one object per evaluation with the documented names, read back exactly" <| fun () ->
            use dir = new TempDir()
            let path = dir.File "metrics.jsonl"
            for record in records[.. 2] do Metrics.append path record
            let lines = File.ReadAllLines path
            Expect.equal lines.Length 3 "three lines"
            for name in [ "\"step\":"; "\"epoch\":"; "\"tokens_seen\":"; "\"train_loss\":"; "\"val_loss\":"; "\"lr\":"; "\"elapsed_s\":"; "\"tokens_per_s\":" ] do
                Expect.stringContains lines[0] name name
            Expect.equal (Metrics.read path) records[.. 2] "round trip"

        testCase "a line cut short by a kill is ignored, a bad line is an error" <| fun () ->
            use dir = new TempDir()
            let path = dir.File "metrics.jsonl"
            Metrics.rewrite path records[.. 1]
            File.AppendAllText(path, "{\"step\": 11, \"epo")
            Expect.equal (Metrics.read path) records[.. 1] "partial last line dropped"
            File.WriteAllText(path, "{\"step\": 1}\n")
            throwsGpt [ "line 1"; "'epoch' is missing" ] (fun () -> Metrics.read path |> ignore) "missing property"

        testCase "non-finite losses are written as null and read as NaN" <| fun () ->
            let record = { records[0] with ValidationLoss = nan }
            Expect.stringContains (Metrics.toJson record) "\"val_loss\":null" "null"
            Expect.isTrue (Double.IsNaN (Metrics.ofJson "test" (Metrics.toJson record)).ValidationLoss) "NaN"

        testCase "accuracies are written when measured and read back" <| fun () ->
            let record = { records[0] with TrainAccuracy = Some 0.75; ValidationAccuracy = Some 0.5 }
            let json = Metrics.toJson record
            Expect.stringContains json "\"train_accuracy\":0.75" "train accuracy"
            Expect.stringContains json "\"val_accuracy\":0.5" "validation accuracy"
            Expect.equal (Metrics.ofJson "test" json) record "round trip"
            Expect.isFalse ((Metrics.toJson records[0]).Contains "accuracy") "no accuracy when none was measured"

        testCase "the loss plot is a PNG, written atomically" <| fun () ->
            use dir = new TempDir()
            let path = dir.File "loss.png"
            Gpt.Plot.Plots.loss path (7L * 5L * 512L) records
            let bytes = File.ReadAllBytes path
            Expect.equal bytes[.. 7] [| 0x89uy; 0x50uy; 0x4Euy; 0x47uy; 0x0Duy; 0x0Auy; 0x1Auy; 0x0Auy |] "PNG signature"
            Expect.isGreaterThan bytes.Length 10000 "a real picture"
            Gpt.Plot.Plots.loss path (7L * 5L * 512L) records[.. 3]
            Expect.equal (Directory.GetFiles dir.Path |> Array.map Path.GetFileName) [| "loss.png" |] "no temporary file left"
            let keep = Environment.GetEnvironmentVariable "GPT_KEEP_PLOT"
            if not (String.IsNullOrEmpty keep) then Gpt.Plot.Plots.loss keep (7L * 5L * 512L) records

        testCase "a run folder's plots: loss, and accuracy when it was measured" <| fun () ->
            use dir = new TempDir()
            Metrics.rewrite (dir.File "metrics.jsonl") records
            Gpt.Plot.Plots.draw dir.Path (7L * 5L * 512L)
            Expect.isTrue (File.Exists(dir.File "loss.png")) "loss plot"
            Expect.isFalse (File.Exists(dir.File "accuracy.png")) "no accuracy plot without accuracy"
            Metrics.rewrite (dir.File "metrics.jsonl") (records |> Array.map (fun r -> { r with TrainAccuracy = Some 0.5; ValidationAccuracy = Some 0.4 }))
            Gpt.Plot.Plots.draw dir.Path (7L * 5L * 512L)
            Expect.isGreaterThan (FileInfo(dir.File "accuracy.png")).Length 10000L "accuracy plot"
    ]
