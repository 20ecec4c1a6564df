/// `gpt train --engine torchrun`'s side in the core: the token shards, the batch order, options.json and the prepared
/// folder (checked here, and read back by scale/test_formats.py when a python3 is found), the launch command, and the
/// errors for what is missing. The training itself, through torchrun, is tested in Gpt.CSharp.Tests (TorchrunTests).
module Gpt.Tests.DistributedTests

open System
open System.Diagnostics
open System.IO
open System.Text.Json
open System.Text.Json.Nodes
open Expecto
open TorchSharp
open Gpt.Text
open Gpt.Model
open Gpt.Weights
open Gpt.Training
open Gpt.Tests.TestUtil

/// A small run on the built-in story: GPT-2's vocabulary, 2 layers of 32, context 16, batch 4, 6 steps.
let private tinyRun (outputDirectory: string) =
    { RunOptions.defaults with
        Model = Some { RunOptions.defaultModel with Layers = 2; EmbeddingDim = 32; Heads = 2; ContextLength = 16; DropRate = 0.0 }
        SampleTokens = 3
        Training =
            { TrainingSettings.defaults with
                BatchSize = 4; MaxSteps = Some 6; OutputDirectory = outputDirectory; Name = Some "tiny"; Seed = 7 } }

let private twoProcesses = { TorchrunOptions.defaults with ProcessesPerNode = 2; Python = "/no/such/python3" }

/// A python3 to run the format test with (any Python 3: the reader needs neither PyTorch nor numpy).
let private python3 =
    lazy
        [ "python3"; "/usr/bin/python3" ]
        |> List.tryFind (fun python ->
            try
                use p = Process.Start(ProcessStartInfo(python, [ "--version" ], RedirectStandardOutput = true, RedirectStandardError = true))
                p.WaitForExit 10_000 && p.ExitCode = 0
            with _ -> false)

/// A script standing in for Python: prints the probe's answer (or fails), to check the messages for what is missing.
let private fakePython (directory: string) (name: string) (body: string) =
    let path = Path.Combine(directory, name)
    File.WriteAllText(path, "#!/bin/sh\n" + body + "\n")
    File.SetUnixFileMode(path, UnixFileMode.UserRead ||| UnixFileMode.UserWrite ||| UnixFileMode.UserExecute)
    path

let private probeAnswer (fields: string) = sprintf "echo '{\"python\": \"3.11.2\"%s}'" fields

[<Tests>]
let tests =
    testList "torchrun preparation" [
        testCase "a token shard is the documented header and the ids as uint16; a larger id is refused" <| fun () ->
            use dir = new TempDir()
            let ids = [| 0; 1; 255; 256; 50256; 65535; 7 |]
            let path = dir.File "t.bin"
            TokenShards.write path ids 1 5
            let bytes = File.ReadAllBytes path
            Expect.equal bytes.Length (32 + 2 * 5) "header + 2 bytes a token"
            Expect.equal bytes[0..7] "GPTTOKS\000"B "magic"
            Expect.equal (BitConverter.ToUInt32(bytes, 8)) 1u "version"
            Expect.equal (BitConverter.ToUInt32(bytes, 12)) 32u "header bytes"
            Expect.equal (BitConverter.ToUInt32(bytes, 16)) 2u "bytes per token"
            Expect.equal (BitConverter.ToUInt32(bytes, 20)) 0u "reserved"
            Expect.equal (BitConverter.ToUInt64(bytes, 24)) 5UL "token count"
            Expect.equal bytes[32..33] [| 1uy; 0uy |] "little-endian ids"
            Expect.equal (TokenShards.read path) ids[1..5] "read back"
            throwsGpt [ "token id 70000 at position 1"; "16 bits" ] (fun () -> TokenShards.write (dir.File "x.bin") [| 3; 70000 |] 0 2) "too large"
            File.WriteAllBytes(dir.File "short.bin", bytes[.. bytes.Length - 2])
            throwsGpt [ "short.bin"; "expected 42 for 5 tokens" ] (fun () -> TokenShards.read (dir.File "short.bin") |> ignore) "truncated"

        testCase "a split is cut into shards in order" <| fun () ->
            use dir = new TempDir()
            let ids = Array.init 10 id
            let names = TokenShards.writeSplit dir.Path "train" ids 4
            Expect.equal names [| "train-00000.bin"; "train-00001.bin"; "train-00002.bin" |] "three shards"
            Expect.equal (names |> Array.collect (fun n -> TokenShards.read (dir.File n))) ids "in order"

        testCase "the batch order is Dataset.batchIndices of every epoch" <| fun () ->
            use dir = new TempDir()
            let loader = { Dataset.defaultLoader with BatchSize = 3; Seed = 11 }
            let epochs = Array.init 3 (fun epoch -> Dataset.batchIndices 20 loader epoch)
            BatchOrder.write (dir.File "order.bin") 3 epochs
            Expect.equal (BatchOrder.read (dir.File "order.bin")) epochs "read back"
            Expect.notEqual epochs[0] epochs[1] "each epoch its own shuffle"
            let bytes = File.ReadAllBytes(dir.File "order.bin")
            Expect.equal bytes[0..7] "GPTORDER"B "magic"
            Expect.equal (BitConverter.ToUInt32(bytes, 16), BitConverter.ToUInt32(bytes, 20), BitConverter.ToUInt32(bytes, 24)) (3u, 6u, 3u)
                "epochs, batches per epoch, batch size"
            Expect.equal bytes.Length (32 + 4 * 3 * 6 * 3) "int32 indices"

        testCase "the global batch must split evenly over the processes" <| fun () ->
            throwsGpt [ "batch size 3 is the global batch"; "2 processes (2 per node x 1 nodes)"; "2 or 4 would do" ]
                (fun () -> TorchrunOptions.checkBatch twoProcesses 3) "3 over 2"
            throwsGpt [ "batch size 2"; "8 processes"; "8 would do" ]
                (fun () -> TorchrunOptions.checkBatch { twoProcesses with ProcessesPerNode = 4; Nodes = 2; MasterAddress = Some "n0" } 2) "2 over 8"
            TorchrunOptions.checkBatch twoProcesses 4
            throwsGpt [ "--nnodes 2 needs --master-addr" ] (fun () -> TorchrunOptions.validate { twoProcesses with Nodes = 2 }) "no master"
            throwsGpt [ "--node-rank must be between 0 and 1" ]
                (fun () -> TorchrunOptions.validate { twoProcesses with Nodes = 2; NodeRank = 2; MasterAddress = Some "n0" }) "rank"

        testCase "the command: one node rendezvous on its own, several meet at node 0" <| fun () ->
            let program, arguments = Torchrun.command twoProcesses "/r/torchrun/train.py" "/r/torchrun/options.json"
            Expect.equal program "/no/such/python3" "the Python runs torchrun"
            Expect.equal arguments
                [ "-m"; "torch.distributed.run"; "--nproc_per_node"; "2"; "--standalone"; "/r/torchrun/train.py"; "--options"; "/r/torchrun/options.json" ]
                "one node"
            let multi = { twoProcesses with Nodes = 3; NodeRank = 2; MasterAddress = Some "10.0.0.1"; MasterPort = Some 29400 }
            let _, arguments = Torchrun.command multi "t.py" "o.json"
            Expect.equal arguments
                [ "-m"; "torch.distributed.run"; "--nproc_per_node"; "2"; "--nnodes"; "3"; "--node_rank"; "2"; "--master_addr"; "10.0.0.1"
                  "--master_port"; "29400"; "t.py"; "--options"; "o.json" ]
                "three nodes"
            Expect.equal (Torchrun.commandLine "python3" [ "a b"; "it's"; "/x/y.py" ]) "python3 'a b' 'it'\\''s' /x/y.py" "shell quoting"
            let run =
                { RunDirectory = "/r"; Folder = "/r/torchrun"; OptionsPath = "o.json"; ScriptPath = "t.py"; Program = "python3"
                  Arguments = [ "-m"; "torch.distributed.run"; "--nproc_per_node"; "2"; "--standalone"; "t.py"; "--options"; "o.json" ]
                  TotalSteps = 1; ResumeFrom = None }
            let debian =
                { Python = "python3"; PythonVersion = "3.11.2"; TorchVersion = "1.13.0a0"; Gloo = true; Nccl = false; CudaDevices = 0
                  RedirectsBroken = true }
            Expect.equal (Torchrun.commandFor run (Some debian) true)
                ("python3", [ "-m"; "torch.distributed.run"; "--redirects"; "9:0"; "--tee"; "9:0"; "--nproc_per_node"; "2"; "--standalone"
                              "t.py"; "--options"; "o.json"; "--events" ])
                "PyTorch 1.13 on Python 3.11: torchrun's redirects read as none; gpt follows the events"
            Expect.equal (Torchrun.commandFor run None false) (run.Program, run.Arguments) "no interpreter to ask: the plain command"

        testCase "prepare writes the shards, the order, the initial model and options.json, which the Python reader reads" <| fun () ->
            use dir = new TempDir()
            let options = tinyRun dir.Path
            let run = Torchrun.prepare options twoProcesses
            let prepared = Run.prepare { options with Training.Name = Some "again" }
            use model = prepared.Model
            let trainerOptions = { prepared.TrainerOptions with OutputDirectory = Some run.RunDirectory }
            Expect.equal run.RunDirectory (Path.Combine(dir.Path, "tiny")) "the run folder"
            Expect.equal run.TotalSteps 6 "max steps"
            Expect.isTrue (File.Exists(Path.Combine(run.RunDirectory, RunFile.fileName))) "run.json for gpt train --resume"
            Expect.isTrue (File.Exists(Path.Combine(run.Folder, "train.py")) && File.Exists(Path.Combine(run.Folder, "gpt_run.py"))) "the scripts"
            let folder = run.Folder
            Expect.equal (TokenShards.read (Path.Combine(folder, "train-00000.bin"))) prepared.Data.Train "training tokens"
            Expect.equal (TokenShards.read (Path.Combine(folder, "val-00000.bin"))) prepared.Data.Validation "validation tokens"
            let windows = Dataset.windowCount prepared.Data.Train.Length 16 16
            let loader = { Dataset.defaultLoader with BatchSize = 4; Seed = 7 }
            Expect.equal (BatchOrder.read (Path.Combine(folder, "order.bin"))) [| Dataset.batchIndices windows loader 0 |]
                "the epochs the 6 steps reach, in gpt's shuffle"
            // The initial model: the weights gpt train draws for the seed.
            use initial = Pretrained.load (Path.Combine(folder, "init"))
            use scope = torch.NewDisposeScope()
            for KeyValue(name, tensor) in model.state_dict () do
                Expect.isTrue (tensor.allclose(initial.state_dict()[name], rtol = 0.0, atol = 0.0)) (sprintf "init/ holds %s as drawn from the seed" name)
            use document = JsonDocument.Parse(File.ReadAllText run.OptionsPath)
            let root = document.RootElement
            Expect.equal (root.GetProperty("format").GetString()) "gpt-torchrun-run" "format"
            Expect.equal (root.GetProperty("run_directory").GetString()) ".." "paths relative to the folder"
            Expect.equal (TrainerOptions.ofJson (root.GetProperty("training").GetRawText())) trainerOptions "the trainer's options, as checkpoints store them"
            Expect.equal (Pretrained.parseConfig "options.json" (root.GetProperty("model_configuration").GetRawText())) model.Config "the model"
            let data = root.GetProperty "data"
            Expect.equal (data.GetProperty("train").GetProperty("fingerprint").GetString()) (Checkpoint.fingerprint prepared.Data.Train) "fingerprint"
            Expect.equal (data.GetProperty("batches_per_epoch").GetInt32()) (windows / 4) "batches per epoch"
            Expect.equal [ for id in data.GetProperty("sample_prompt_ids").EnumerateArray() -> id.GetInt32() ]
                (List.ofArray ((Tokenizers.gpt2 ()).Encode "Every effort moves you")) "the sample prompt as ids"
            Expect.equal (root.GetProperty("distributed").GetProperty("world_size").GetInt32()) 2 "world size"
            // The Python side reads the same (scale/test_formats.py, standard library only).
            match python3.Force() with
            | None -> skiptest "no python3 on this machine: the Python reader test (scale/test_formats.py) did not run"
            | Some python ->
                let expected = JsonObject()
                expected["run_directory"] <- run.RunDirectory
                expected["total_steps"] <- 6
                expected["train"] <- JsonSerializer.SerializeToNode prepared.Data.Train
                expected["validation"] <- JsonSerializer.SerializeToNode prepared.Data.Validation
                expected["order"] <- JsonSerializer.SerializeToNode(BatchOrder.read (Path.Combine(folder, "order.bin")))
                expected["training"] <- JsonNode.Parse """{"batch_size": 4, "context_length": 16, "stride": 16, "seed": 7, "max_steps": 6, "gradient_clip": 1.0, "decay_all": false, "sample_prompt": "Every effort moves you"}"""
                expected["model_configuration"] <- JsonNode.Parse """{"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 16, "vocab_size": 50257, "qkv_bias": false, "tie_word_embeddings": true}"""
                File.WriteAllText(dir.File "expected.json", expected.ToJsonString())
                let script = Path.Combine(repositoryRoot, "scale", "test_formats.py")
                use p = Process.Start(ProcessStartInfo(python, [ "-B"; script; folder; dir.File "expected.json" ], RedirectStandardOutput = true, RedirectStandardError = true))
                let error = p.StandardError.ReadToEndAsync()
                let output = p.StandardOutput.ReadToEnd()
                p.WaitForExit()
                Expect.equal p.ExitCode 0 (sprintf "%s reads what gpt wrote:\n%s%s" python output error.Result)
                Expect.stringContains output "all checks passed" "every check ran"

        testCase "a resumed run starts from its checkpoint and the data must be the run's" <| fun () ->
            use dir = new TempDir()
            let options = tinyRun dir.Path
            let trained = Run.pretrain { options with Training.MaxSteps = Some 2 } ignore Threading.CancellationToken.None
            let resumed = { RunOptions.fromCheckpoint trained.RunDirectory with Training.MaxSteps = Some 6 }
            let run = Torchrun.prepare resumed twoProcesses
            Expect.equal (run.ResumeFrom |> Option.map Path.GetFileName) (Some "step-00000002") "the latest checkpoint"
            Expect.isFalse (Directory.Exists(Path.Combine(run.Folder, "init"))) "no initial model"
            use document = JsonDocument.Parse(File.ReadAllText run.OptionsPath)
            let model = document.RootElement.GetProperty "model"
            Expect.equal (model.GetProperty("resume_from").GetString()) "../checkpoints/step-00000002" "relative to the folder"
            Expect.equal (model.GetProperty("initial_weights").ValueKind) JsonValueKind.Null "no initial weights"
            File.WriteAllText(dir.File "other.txt", String.replicate 60 "Other text entirely, read by nobody before. ")
            throwsGpt [ "was trained on other data" ]
                (fun () -> Torchrun.prepare { resumed with Data = Some(dir.File "other.txt") } twoProcesses |> ignore) "other data"
            throwsGpt [ "trained with batch size 4, this run asks for 2" ]
                (fun () -> Torchrun.prepare { resumed with Training.BatchSize = 2 } twoProcesses |> ignore) "other batch"

        testCase "texts or a model given in memory, and a device, stay with the in-process engine" <| fun () ->
            use dir = new TempDir()
            let options = tinyRun dir.Path
            let texts = [ String.replicate 40 "Texts given in memory, never written to a file. " ]
            throwsGpt [ "texts given in memory train in process only" ]
                (fun () -> Torchrun.prepare { options with Texts = Some texts } twoProcesses |> ignore) "texts"
            use model = new GptModel(options.Model.Value, 7L)
            throwsGpt [ "a model given in memory trains in process only"; "InitFrom" ]
                (fun () -> Torchrun.prepare { options with InitModel = Some model } twoProcesses |> ignore) "model"
            (use ids = torch.tensor([| 1L; 2L |]).view(1L, 2L)
             use _ = torch.no_grad ()
             Expect.equal (model.forward ids).shape [| 1L; 2L; 50257L |] "the caller's model still works")
            for device in [ Device.Cuda None; Device.Auto ] do
                throwsGpt [ sprintf "device %s" (Device.name device); "--engine dotnet" ]
                    (fun () -> Torchrun.prepare { options with Training.Device = device } twoProcesses |> ignore) (Device.name device)
            Expect.isFalse (Directory.Exists(dir.File "tiny")) "nothing written"

        testCase "a missing Python, PyTorch, torchrun or numpy is named with what to install" <| fun () ->
            use dir = new TempDir()
            let check python = Torchrun.checkPython { twoProcesses with Python = python } |> ignore
            throwsGpt [ "Python '/no/such/python3' was not found"; "pip install torch"; "--python" ] (fun () -> check "/no/such/python3") "no Python"
            let noTorch = fakePython dir.Path "noTorch" (probeAnswer ", \"error\": \"ModuleNotFoundError: No module named torch\"")
            throwsGpt [ "PyTorch is not installed for Python 3.11.2"; "No module named torch"; "pip install torch" ] (fun () -> check noTorch) "no torch"
            let oldTorch = fakePython dir.Path "oldTorch" (probeAnswer ", \"torch\": \"1.9.0\", \"distributed\": true, \"gloo\": true, \"run\": false, \"numpy\": true")
            throwsGpt [ "torchrun (torch.distributed.run) is missing from PyTorch 1.9.0"; "1.10 or later" ] (fun () -> check oldTorch) "no torchrun"
            let noNumpy = fakePython dir.Path "noNumpy" (probeAnswer ", \"torch\": \"2.3.0\", \"distributed\": true, \"gloo\": true, \"run\": true, \"numpy\": false")
            throwsGpt [ "numpy is not installed"; "pip install numpy" ] (fun () -> check noNumpy) "no numpy"
            let cpuOnly = fakePython dir.Path "cpuOnly" (probeAnswer ", \"torch\": \"1.13.0\", \"distributed\": true, \"gloo\": true, \"nccl\": false, \"cuda\": 0, \"run\": true, \"numpy\": true")
            throwsGpt [ "the nccl backend needs CUDA GPUs"; "--backend gloo" ]
                (fun () -> Torchrun.checkPython { twoProcesses with Python = cpuOnly; Backend = "nccl" } |> ignore) "nccl without GPUs"
            throwsGpt [ "--strategy fsdp needs PyTorch 2.1"; "1.13.0" ]
                (fun () -> Torchrun.checkPython { twoProcesses with Python = cpuOnly; Strategy = ShardingStrategy.Fsdp } |> ignore) "old FSDP"
            let info = Torchrun.checkPython { twoProcesses with Python = cpuOnly }
            Expect.equal (info.TorchVersion, info.Gloo, info.CudaDevices) ("1.13.0", true, 0) "what the probe found"
            let broken = fakePython dir.Path "broken" "exit 3"
            throwsGpt [ "did not run the PyTorch check (exit code 3)" ] (fun () -> check broken) "a failing interpreter"
    ]
