/// Device selection: parsing, resolving against this TorchSharp-cpu build, and runs on the CPU end to end.
module Gpt.Tests.DeviceTests

open System.IO
open System.Threading
open Expecto
open TorchSharp
open Gpt.Model
open Gpt.Generation
open Gpt.Training
open Gpt.Tests.TestUtil
open Gpt.Tests.ModelTestUtil

[<Tests>]
let tests =
    testList "devices" [
        testCase "parse reads cpu, cuda, cuda:N and auto, and names them back" <| fun () ->
            for text, device in [ "cpu", Device.Cpu; " CPU ", Device.Cpu; "cuda", Device.Cuda None; "cuda:0", Device.Cuda(Some 0)
                                  "cuda:12", Device.Cuda(Some 12); "auto", Device.Auto; "Auto", Device.Auto ] do
                Expect.equal (Device.parse text) device text
            for device in [ Device.Cpu; Device.Cuda None; Device.Cuda(Some 3); Device.Auto ] do
                Expect.equal (Device.parse (Device.name device)) device (Device.name device)

        testCase "bad devices say what was expected and what was found" <| fun () ->
            throwsGpt [ "device 'cuda:x': expected a GPU number after 'cuda:', such as cuda:0, found 'x'" ] (fun () -> Device.parse "cuda:x" |> ignore) "cuda:x"
            throwsGpt [ "found '-1'" ] (fun () -> Device.parse "cuda:-1" |> ignore) "negative"
            throwsGpt [ "found ''" ] (fun () -> Device.parse "cuda:" |> ignore) "no number"
            throwsGpt [ "unknown device 'tpu': expected cpu, cuda, cuda:N (N a GPU number such as 0) or auto" ] (fun () -> Device.parse "tpu" |> ignore) "tpu"
            throwsGpt [ "no device given: expected cpu" ] (fun () -> Device.parse " " |> ignore) "empty"

        testCase "this build is TorchSharp-cpu: auto is the CPU, and cuda is a clear error, not a crash" <| fun () ->
            Expect.equal Device.backend "cpu" "the backend this build references"
            Expect.isFalse (Device.cudaAvailable ()) "no CUDA in TorchSharp-cpu"
            Expect.equal (Device.describe (Device.resolve Device.Cpu)) "cpu" "cpu"
            Expect.equal (Device.describe (Device.resolve Device.Auto)) "cpu" "auto falls back to the CPU"
            for device in [ Device.Cuda None; Device.Cuda(Some 1) ] do
                throwsGpt [ sprintf "CUDA was asked for (device %s) but this build uses TorchSharp-cpu" (Device.name device); "-p:TorchBackend=cuda"; "--device cpu" ]
                    (fun () -> Device.resolve device |> ignore) (Device.name device)
            use model = new GptModel({ tinyConfig with VocabSize = 50 }, 1L)
            throwsGpt [ "CUDA was asked for" ] (fun () -> Device.place (Device.Cuda None) model |> ignore) "place"
            Expect.equal (model.parameters () |> Seq.head).device_type DeviceType.CPU "nothing moved"

        testCase "a model placed on the CPU (cpu or auto) computes what it did, with inputs from anywhere" <| fun () ->
            use model = new GptModel({ tinyConfig with VocabSize = 50 }, 1L)
            model.eval ()
            let before = (Generator.generate (LanguageModel.ofGpt model) { GenerationOptions.forModel model with MaxNewTokens = 5 } [ [| 1; 2 |] ])[0]
            let handles = model.parameters () |> Seq.map (fun p -> p.Handle) |> Array.ofSeq
            for device in [ Device.Cpu; Device.Auto ] do
                Expect.equal (Device.describe (Device.place device model)) "cpu" "placed on the CPU"
            Expect.equal (model.parameters () |> Seq.map (fun p -> p.Handle) |> Array.ofSeq) handles "the same parameters: nothing was copied"
            let after = (Generator.generate (LanguageModel.ofGpt model) { GenerationOptions.forModel model with MaxNewTokens = 5 } [ [| 1; 2 |] ])[0]
            Expect.equal after.Tokens before.Tokens "the same tokens"

        testSequenced (testCase "a run on the CPU trains, and a run asking for CUDA fails before it reads or writes anything" <| fun () ->
            use temp = new TempDir()
            let options device name =
                { RunOptions.defaults with
                    Model = Some { RunOptions.defaultModel with Layers = 1; EmbeddingDim = 16; Heads = 2; ContextLength = 16 }
                    SamplePrompt = None
                    Training =
                        { TrainingSettings.defaults with
                            MaxSteps = Some 2; BatchSize = 2; EvalInterval = 2; EvalBatches = 1; OutputDirectory = temp.Path
                            Name = Some name; Device = device } }
            let result = Run.pretrain (options Device.Auto "auto") ignore CancellationToken.None
            Expect.equal result.Steps 2 "two steps on auto = the CPU"
            throwsGpt [ "CUDA was asked for (device cuda:0) but this build uses TorchSharp-cpu" ]
                (fun () -> Run.pretrain (options (Device.Cuda(Some 0)) "cuda") ignore CancellationToken.None |> ignore) "cuda"
            Expect.isFalse (Directory.Exists(temp.File "cuda")) "no run folder")
    ]
