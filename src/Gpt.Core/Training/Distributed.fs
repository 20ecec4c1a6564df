namespace Gpt.Training

// Past one machine: a run handed to PyTorch's distributed training and taken back. TorchSharp has no
// torch.distributed, so `gpt train --engine torchrun` prepares the run here (the text tokenized into shards, the
// seeded batch order, the model in the Hugging Face layout, the options as JSON) and launches torchrun on
// scale/train.py, which trains with DDP or FSDP and writes the run folder back in our formats: metrics.jsonl,
// checkpoints that `gpt train --resume` continues, and model/ for `gpt generate`. Its events come back as the run's
// usual reports.

open System
open System.Collections.Generic
open System.ComponentModel
open System.Diagnostics
open System.IO
open System.Text
open System.Text.Json
open System.Threading
open Gpt
open Gpt.Text
open Gpt.Weights

/// How the model is spread over the processes.
[<RequireQualifiedAccess>]
type ShardingStrategy =
    /// DistributedDataParallel: every process holds the whole model; gradients are averaged after each backward.
    | Ddp
    /// FullyShardedDataParallel: every process holds a shard of each block's parameters, gradients and AdamW state
    /// (for models that do not fit one device; PyTorch 2.1 or later).
    | Fsdp

/// Where and how torchrun trains a run. The batch size stays the global batch: each of the
/// ProcessesPerNode × Nodes processes takes its equal share of every batch.
type TorchrunOptions =
    { /// Processes on this machine (one per GPU, or CPU processes).
      ProcessesPerNode: int
      /// Machines in the job.
      Nodes: int
      /// This machine's index, 0 .. Nodes - 1 (node 0 hosts the rendezvous).
      NodeRank: int
      /// Node 0's address (needed with more than one node; one node rendezvous on its own).
      MasterAddress: string option
      /// Node 0's port for the rendezvous (None: 29500).
      MasterPort: int option
      Strategy: ShardingStrategy
      /// "auto" (NCCL when PyTorch sees CUDA GPUs, else gloo), "nccl" or "gloo" (CPU).
      Backend: string
      /// The Python interpreter that has PyTorch (its `-m torch.distributed.run` is torchrun).
      Python: string
      /// Tokens per shard file at most (a split larger than this is cut into several files).
      ShardTokens: int }

[<RequireQualifiedAccess>]
module TorchrunOptions =
    /// One process on this machine, DDP, the backend PyTorch picks, `python3` from the PATH, 100M tokens a shard.
    let defaults =
        { ProcessesPerNode = 1; Nodes = 1; NodeRank = 0; MasterAddress = None; MasterPort = None; Strategy = ShardingStrategy.Ddp
          Backend = "auto"; Python = "python3"; ShardTokens = 100_000_000 }

    /// The number of processes that share each batch.
    let worldSize (options: TorchrunOptions) = options.ProcessesPerNode * options.Nodes

    /// Fails on options torchrun cannot take.
    let validate (o: TorchrunOptions) =
        Errors.require (o.ProcessesPerNode > 0) "--nproc-per-node must be positive, found %d" o.ProcessesPerNode
        Errors.require (o.Nodes > 0) "--nnodes must be positive, found %d" o.Nodes
        Errors.require (o.NodeRank >= 0 && o.NodeRank < o.Nodes) "--node-rank must be between 0 and %d (--nnodes %d), found %d"
            (o.Nodes - 1) o.Nodes o.NodeRank
        o.MasterPort |> Option.iter (fun port -> Errors.require (port > 0 && port < 65536) "--master-port must be a TCP port (1-65535), found %d" port)
        if o.Nodes > 1 && o.MasterAddress.IsNone then
            Errors.fail "--nnodes %d needs --master-addr: the address of node 0, which every node can reach" o.Nodes
        Errors.require (List.contains o.Backend [ "auto"; "nccl"; "gloo" ]) "the backend must be auto, nccl or gloo, found '%s'" o.Backend
        Errors.require (not (String.IsNullOrWhiteSpace o.Python)) "no Python interpreter given"
        Errors.require (o.ShardTokens > 0) "tokens per shard must be positive, found %d" o.ShardTokens

    /// Fails when the global batch does not split evenly over the processes.
    let checkBatch (o: TorchrunOptions) (batchSize: int) =
        let world = worldSize o
        if batchSize % world <> 0 then
            let below, above = batchSize / world * world, (batchSize / world + 1) * world
            Errors.fail "the batch size %d is the global batch and must be divisible by the %d processes (%d per node x %d nodes): %s"
                batchSize world o.ProcessesPerNode o.Nodes
                (if below > 0 then sprintf "%d or %d would do" below above else sprintf "%d would do" above)

/// The fixed 32-byte header our binary files share: 8 magic bytes, version, header size, four more uint32 fields.
module private BinaryHeader =
    let size = 32
    let version = 1

    let write (stream: Stream) (magic: byte[]) (fields: uint32[]) (tail: uint64 option) =
        use writer = new BinaryWriter(stream, Encoding.UTF8, true)
        writer.Write magic
        writer.Write(uint32 version)
        writer.Write(uint32 size)
        for field in fields do writer.Write field
        tail |> Option.iter writer.Write

    /// The fields after magic, version and header size, checked.
    let read (path: string) (reader: BinaryReader) (magic: byte[]) (what: string) =
        let head = reader.ReadBytes size
        if head.Length < size then Errors.fail "%s '%s': %d bytes, shorter than the %d-byte header" what path head.Length size
        if head[0..7] <> magic then
            Errors.fail "%s '%s': magic %s, expected %s" what path (Convert.ToHexString head[0..7]) (Convert.ToHexString magic)
        let field i = BitConverter.ToUInt32(head, 8 + 4 * i)
        if field 0 <> uint32 version then Errors.fail "%s '%s': format version %d, this program reads version %d" what path (field 0) version
        if field 1 <> uint32 size then Errors.fail "%s '%s': a header of %d bytes, expected %d" what path (field 1) size
        head

/// Token shards: a split's token ids as unsigned 16-bit numbers after a 32-byte header (scale/gpt_run.py documents the
/// layout and reads it). GPT-2's 50,257 ids fit; a larger id is an error, never a silent truncation.
[<RequireQualifiedAccess>]
module TokenShards =
    let magic = "GPTTOKS\000"B

    /// Writes ids[start .. start + count - 1] to a shard file.
    let write (path: string) (ids: int[]) (start: int) (count: int) =
        use stream = new FileStream(path, FileMode.Create, FileAccess.Write)
        BinaryHeader.write stream magic [| 2u; 0u |] (Some(uint64 count))
        let buffer = Array.zeroCreate<byte> (2 * count)
        for i in 0 .. count - 1 do
            let id = ids[start + i]
            if id < 0 || id > 65535 then
                Errors.fail "token id %d at position %d does not fit a shard's 16 bits: --engine torchrun takes vocabularies of at most 65,536 tokens"
                    id (start + i)
            buffer[2 * i] <- byte (id &&& 0xFF)
            buffer[2 * i + 1] <- byte (id >>> 8)
        stream.Write(buffer, 0, buffer.Length)

    /// A shard's ids.
    let read (path: string) : int[] =
        use stream = File.OpenRead path
        use reader = new BinaryReader(stream)
        let head = BinaryHeader.read path reader magic "token shard"
        let tokenBytes = BitConverter.ToUInt32(head, 16)
        if tokenBytes <> 2u then Errors.fail "token shard '%s': %d bytes per token, expected 2" path tokenBytes
        let count = BitConverter.ToUInt64(head, 24)
        let expected = int64 BinaryHeader.size + 2L * int64 count
        if stream.Length <> expected then Errors.fail "token shard '%s': %d bytes, expected %d for %d tokens" path stream.Length expected count
        let bytes = reader.ReadBytes(int (2UL * count))
        Array.init (int count) (fun i -> int bytes[2 * i] ||| (int bytes[2 * i + 1] <<< 8))

    /// Writes a split as `prefix-00000.bin`, `prefix-00001.bin`, ... of at most `shardTokens` tokens each, in order;
    /// returns the file names.
    let writeSplit (directory: string) (prefix: string) (ids: int[]) (shardTokens: int) : string[] =
        let shards = max 1 ((ids.Length + shardTokens - 1) / shardTokens)
        [| for shard in 0 .. shards - 1 ->
               let name = sprintf "%s-%05d.bin" prefix shard
               let start = shard * shardTokens
               write (Path.Combine(directory, name)) ids start (min shardTokens (ids.Length - start))
               name |]

/// The batch order: the window indices of every training batch of every epoch, as Dataset.batchIndices shuffles them
/// from (seed, epoch), so that the Python side reads the batches in gpt's order without reimplementing .NET's
/// Random. Layout in scale/gpt_run.py.
[<RequireQualifiedAccess>]
module BatchOrder =
    let magic = "GPTORDER"B

    /// Writes epochs × batches × batchSize int32 window indices; every batch must have batchSize windows.
    let write (path: string) (batchSize: int) (epochs: int[][][]) =
        let perEpoch = if epochs.Length = 0 then 0 else epochs[0].Length
        for epoch in epochs do
            Errors.require (epoch.Length = perEpoch) "every epoch must have %d batches, found %d" perEpoch epoch.Length
            for batch in epoch do
                Errors.require (batch.Length = batchSize) "every batch must have %d windows, found %d" batchSize batch.Length
        use stream = new FileStream(path, FileMode.Create, FileAccess.Write)
        BinaryHeader.write stream magic [| uint32 epochs.Length; uint32 perEpoch; uint32 batchSize; 0u |] None
        use writer = new BinaryWriter(stream)
        for epoch in epochs do
            for batch in epoch do
                for index in batch do writer.Write(int32 index)

    /// The batches of every epoch.
    let read (path: string) : int[][][] =
        use stream = File.OpenRead path
        use reader = new BinaryReader(stream)
        let head = BinaryHeader.read path reader magic "batch order"
        let field i = int (BitConverter.ToUInt32(head, 16 + 4 * i))
        let epochs, perEpoch, batchSize = field 0, field 1, field 2
        let expected = int64 BinaryHeader.size + 4L * int64 epochs * int64 perEpoch * int64 batchSize
        if stream.Length <> expected then Errors.fail "batch order '%s': %d bytes, expected %d" path stream.Length expected
        Array.init epochs (fun _ -> Array.init perEpoch (fun _ -> Array.init batchSize (fun _ -> reader.ReadInt32())))

/// What PyTorch a Python interpreter has, as the probe found it.
type PythonInfo =
    { Python: string
      PythonVersion: string
      TorchVersion: string
      Gloo: bool
      Nccl: bool
      CudaDevices: int
      /// torchrun's Std.from_str("0") gives None: PyTorch 1.13 on Python 3.11 (fixed in PyTorch 2.0); the launch works
      /// around it.
      RedirectsBroken: bool }

/// A run prepared for torchrun: the folder of files it reads and the command that launches it.
type TorchrunRun =
    { RunDirectory: string
      /// RUN/torchrun: options.json, the shards, order.bin, init/, train.py and gpt_run.py.
      Folder: string
      OptionsPath: string
      ScriptPath: string
      /// The program and arguments that launch the run on this node: python -m torch.distributed.run ... train.py
      /// --options options.json.
      Program: string
      Arguments: string list
      TotalSteps: int
      /// The checkpoint the run continues from.
      ResumeFrom: string option }

/// `gpt train --engine torchrun`: prepare, launch, follow.
[<RequireQualifiedAccess>]
module Torchrun =
    let folderName = "torchrun"
    let optionsFileName = "options.json"
    let orderFileName = "order.bin"
    let stopFileName = "STOP"
    let initFolder = "init"
    let scriptFileName = "train.py"
    let formatsFileName = "gpt_run.py"
    let optionsFormat = "gpt-torchrun-run"
    /// The prefix of the event lines train.py prints with --events.
    let eventPrefix = "GPT_EVENT "

    let private install = "pip install torch numpy (https://pytorch.org/get-started/locally/)"

    /// The embedded copy of a file of scale/.
    let private script (name: string) =
        use stream =
            match typeof<TorchrunRun>.Assembly.GetManifestResourceStream("Gpt.Resources.scale." + name) with
            | null -> Errors.fail "the torchrun script '%s' is missing from Gpt.Core" name
            | s -> s
        use reader = new StreamReader(stream)
        reader.ReadToEnd()

    /// Optimizer steps the run makes: as the trainer plans them (epochs of whole batches, divided by accumulation,
    /// capped by MaxSteps).
    let totalSteps (options: TrainerOptions) (perEpoch: int) =
        let possible = int ((int64 options.Epochs * int64 perEpoch) / int64 options.GradientAccumulation)
        if possible = 0 then
            Errors.fail "no optimizer step fits: the training split gives %d batches of %d x %d tokens per epoch, over %d epochs, and a step takes %d batches"
                perEpoch options.BatchSize options.ContextLength options.Epochs options.GradientAccumulation
        options.MaxSteps |> Option.map (min possible) |> Option.defaultValue possible

    // ---- Python ----

    let private probeScript =
        String.concat "\n"
            [ "import json, sys"
              "info = {'python': sys.version.split()[0]}"
              "try:"
              "    import torch"
              "except Exception as e:"
              "    info['error'] = '%s: %s' % (type(e).__name__, e)"
              "    print(json.dumps(info)); sys.exit(0)"
              "import importlib.util, torch.distributed as dist"
              "info['torch'] = torch.__version__"
              "info['distributed'] = dist.is_available()"
              "info['gloo'] = info['distributed'] and dist.is_gloo_available()"
              "info['nccl'] = info['distributed'] and dist.is_nccl_available()"
              "info['cuda'] = torch.cuda.device_count() if torch.cuda.is_available() else 0"
              "info['run'] = importlib.util.find_spec('torch.distributed.run') is not None"
              "info['numpy'] = importlib.util.find_spec('numpy') is not None"
              "try:"
              "    from torch.distributed.elastic.multiprocessing.api import Std"
              "    info['redirects_broken'] = Std.from_str('0') is None"
              "except Exception:"
              "    info['redirects_broken'] = False"
              "print(json.dumps(info))" ]

    /// Runs a program to its end; its exit code, standard output and standard error. A program that cannot be
    /// started is None.
    let private runToEnd (program: string) (arguments: string list) =
        let start = ProcessStartInfo(program, arguments, RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false)
        try
            use child = Process.Start start
            let error = child.StandardError.ReadToEndAsync()
            let output = child.StandardOutput.ReadToEnd()
            child.WaitForExit()
            Some(child.ExitCode, output, error.Result)
        with :? Win32Exception -> None

    let private version (text: string) =
        let digits = text.Split('.') |> Array.truncate 2 |> Array.map (fun part -> String(part |> Seq.takeWhile Char.IsDigit |> Array.ofSeq))
        match digits with
        | [| major; minor |] when major <> "" && minor <> "" -> int major, int minor
        | _ -> 0, 0

    /// Checks that the interpreter runs and has what the run needs (PyTorch with torch.distributed, torchrun, numpy,
    /// the backend, FSDP's PyTorch version), with an error that names what to install otherwise.
    let checkPython (options: TorchrunOptions) : PythonInfo =
        let python = options.Python
        match runToEnd python [ "-c"; probeScript ] with
        | None ->
            Errors.fail "Python '%s' was not found: install Python 3 with PyTorch (%s), or give the interpreter that has them with --python"
                python install
        | Some(code, output, error) ->
            let line = output.Split('\n', StringSplitOptions.RemoveEmptyEntries) |> Array.tryLast |> Option.defaultValue ""
            let json =
                try Some(JsonDocument.Parse line) with :? JsonException -> None
            match json with
            | None ->
                Errors.fail "Python '%s' did not run the PyTorch check (exit code %d): %s" python code
                    ((if error.Trim() = "" then output else error).Trim())
            | Some document ->
                use document = document
                let root = document.RootElement
                let text (name: string) = match root.TryGetProperty name with | true, v when v.ValueKind = JsonValueKind.String -> v.GetString() | _ -> ""
                let flag (name: string) = match root.TryGetProperty name with | true, v -> v.ValueKind = JsonValueKind.True | _ -> false
                let pythonVersion = text "python"
                if text "error" <> "" then
                    Errors.fail "PyTorch is not installed for Python %s ('%s': %s): %s, or give the interpreter that has it with --python (a virtual environment's bin/python, for example)"
                        pythonVersion python (text "error") install
                let torch = text "torch"
                if not (flag "distributed") then
                    Errors.fail "PyTorch %s of '%s' was built without torch.distributed: install a build that has it (%s)" torch python install
                if not (flag "run") then
                    Errors.fail "torchrun (torch.distributed.run) is missing from PyTorch %s of '%s': it needs PyTorch 1.10 or later (pip install -U torch)" torch python
                if not (flag "numpy") then
                    Errors.fail "numpy is not installed for '%s' (PyTorch %s): pip install numpy" python torch
                let cuda = match root.TryGetProperty "cuda" with | true, v -> v.GetInt32() | _ -> 0
                match options.Backend with
                | "nccl" when not (flag "nccl") || cuda = 0 ->
                    Errors.fail "the nccl backend needs CUDA GPUs and a PyTorch built with NCCL; PyTorch %s of '%s' sees %d GPUs%s: use --backend gloo for the CPU"
                        torch python cuda (if flag "nccl" then "" else " and has no NCCL")
                | "gloo" when not (flag "gloo") ->
                    Errors.fail "PyTorch %s of '%s' has no gloo backend, which training on the CPU needs" torch python
                | "auto" when cuda = 0 && not (flag "gloo") ->
                    Errors.fail "PyTorch %s of '%s' has no gloo backend, which training on the CPU needs" torch python
                | _ -> ()
                if options.Strategy = ShardingStrategy.Fsdp && version torch < (2, 1) then
                    Errors.fail "--strategy fsdp needs PyTorch 2.1 or later, '%s' has %s: pip install -U torch, or use --strategy ddp" python torch
                let broken = flag "redirects_broken"
                if broken && options.ProcessesPerNode > 9 then
                    Errors.fail "torchrun of PyTorch %s on Python %s cannot start more than 9 processes per node (a bug fixed in PyTorch 2.0): pip install -U torch"
                        torch pythonVersion
                { Python = python; PythonVersion = pythonVersion; TorchVersion = torch; Gloo = flag "gloo"; Nccl = flag "nccl"
                  CudaDevices = cuda; RedirectsBroken = broken }

    // ---- preparing ----

    let private strategyName (strategy: ShardingStrategy) = match strategy with ShardingStrategy.Ddp -> "ddp" | ShardingStrategy.Fsdp -> "fsdp"

    /// The launch command on this node for a prepared options file (without train.py's --events).
    let command (options: TorchrunOptions) (scriptPath: string) (optionsPath: string) : string * string list =
        let rendezvous =
            if options.Nodes = 1 && options.MasterAddress.IsNone && options.MasterPort.IsNone then [ "--standalone" ]
            else
                [ "--nnodes"; string options.Nodes; "--node_rank"; string options.NodeRank
                  "--master_addr"; options.MasterAddress |> Option.defaultValue "127.0.0.1"
                  "--master_port"; string (options.MasterPort |> Option.defaultValue 29500) ]
        options.Python,
        [ "-m"; "torch.distributed.run"; "--nproc_per_node"; string options.ProcessesPerNode ] @ rendezvous
        @ [ scriptPath; "--options"; optionsPath ]

    /// A command as a POSIX shell reads it: arguments with anything but safe characters in single quotes.
    let commandLine (program: string) (arguments: string list) =
        let quote (argument: string) =
            if argument <> "" && argument |> Seq.forall (fun c -> Char.IsAsciiLetterOrDigit c || "-_./=:,@%+".Contains c) then argument
            else "'" + argument.Replace("'", "'\\''") + "'"
        String.Join(" ", program :: arguments |> List.map quote)

    /// options.json: what train.py reads (scale/gpt_run.py checks it); paths relative to the torchrun folder.
    let private writeOptions (path: string) (folder: string) (prepared: PreparedRun) (torchrun: TorchrunOptions) (trainShards: string[])
                             (validationShards: string[]) (perEpoch: int) (total: int) (samplePrompt: int[] option) =
        let relative (target: string) = Path.GetRelativePath(folder, target).Replace('\\', '/')
        let options = prepared.TrainerOptions
        let windows ids = Dataset.windowCount (Array.length ids) options.ContextLength options.Stride
        use stream = new FileStream(path, FileMode.Create, FileAccess.Write)
        (use json = new Utf8JsonWriter(stream, JsonWriterOptions(Indented = true))
         json.WriteStartObject()
         json.WriteString("format", optionsFormat)
         json.WriteNumber("version", 1)
         json.WriteString("created_utc", DateTime.UtcNow.ToString "o")
         json.WriteString("run_directory", relative prepared.RunDirectory)
         json.WriteString("stop_file", stopFileName)
         json.WriteString("tokenizer", prepared.Data.Tokenizer.Name)
         json.WriteNumber("total_steps", total)
         json.WriteStartObject "model"
         match prepared.ResumeFrom with
         | Some checkpoint ->
             json.WriteNull "initial_weights"
             json.WriteString("resume_from", relative checkpoint)
         | None ->
             json.WriteString("initial_weights", initFolder)
             json.WriteNull "resume_from"
         json.WriteEndObject()
         json.WritePropertyName "model_configuration"
         json.WriteRawValue prepared.Data.ModelConfiguration
         json.WriteStartObject "data"
         let split (name: string) (shards: string[]) (ids: int[]) (fingerprint: bool) =
             json.WriteStartObject name
             json.WriteStartArray "shards"
             for shard in shards do json.WriteStringValue shard
             json.WriteEndArray()
             json.WriteNumber("tokens", ids.Length)
             json.WriteNumber("windows", windows ids)
             // What checkpoints record to refuse a resume on other data (Checkpoint.fingerprint).
             if fingerprint then json.WriteString("fingerprint", Checkpoint.fingerprint ids)
             json.WriteEndObject()
         split "train" trainShards prepared.Data.Train true
         split "validation" validationShards prepared.Data.Validation false
         json.WriteString("order", orderFileName)
         json.WriteNumber("batches_per_epoch", perEpoch)
         match samplePrompt with
         | Some ids ->
             json.WriteStartArray "sample_prompt_ids"
             for id in ids do json.WriteNumberValue id
             json.WriteEndArray()
         | None -> json.WriteNull "sample_prompt_ids"
         match prepared.Data.Tokenizer.EndOfTextId with
         | Some id -> json.WriteNumber("end_of_text_id", id)
         | None -> json.WriteNull "end_of_text_id"
         json.WriteEndObject()
         json.WritePropertyName "training"
         json.WriteRawValue(TrainerOptions.toJson options)
         json.WriteStartObject "distributed"
         json.WriteString("strategy", strategyName torchrun.Strategy)
         json.WriteString("backend", torchrun.Backend)
         json.WriteNumber("nproc_per_node", torchrun.ProcessesPerNode)
         json.WriteNumber("nnodes", torchrun.Nodes)
         json.WriteNumber("world_size", TorchrunOptions.worldSize torchrun)
         json.WriteEndObject()
         json.WriteEndObject())
        stream.Flush(true)

    /// Prepares a run for torchrun: the run folder (run.json for a new run), and RUN/torchrun/ with the training and
    /// validation tokens as shards, the batch order of every epoch the run reaches, the model to start from in the
    /// Hugging Face layout (a new run; a resumed one starts from its checkpoint), options.json and the scripts. The
    /// same checks as an in-process run (the data, the options, a resume's compatibility), plus the global batch
    /// against the processes. Launches nothing.
    let prepare (options: RunOptions) (torchrun: TorchrunOptions) : TorchrunRun =
        TorchrunOptions.validate torchrun
        TorchrunOptions.checkBatch torchrun options.Training.BatchSize
        if options.Training.Lora.IsSome then
            Errors.fail "LoRA runs train in process only: --engine torchrun trains every weight (leave out --lora-rank, or use --engine dotnet)"
        if options.Texts.IsSome then
            Errors.fail "texts given in memory train in process only: torchrun's processes read a run's data from files (give it as Data, or train in process: Run.pretrain; C#: Trainer.Train)"
        if options.InitModel.IsSome then
            Errors.fail "a model given in memory trains in process only: torchrun's processes start from files (save it and give its folder as InitFrom, or train in process: Run.pretrain; C#: Trainer.Train)"
        if options.Training.Device <> Gpt.Model.Device.Cpu then
            Errors.fail "device %s (--device; C#: RunSettings.Device) is for the in-process engine: torchrun's processes choose their own devices (--backend nccl puts each on its GPU); leave out --device, or use --engine dotnet"
                (Gpt.Model.Device.name options.Training.Device)
        let prepared = Run.prepare options
        // The lock covers the preparation; torchrun's processes write the folder on their own (not locked).
        use runLock = prepared.Lock
        use model = prepared.Model
        let trainerOptions = prepared.TrainerOptions
        let task = LanguageModelTask.create trainerOptions model prepared.Data
        prepared.ResumeFrom |> Option.iter (fun checkpoint -> Trainer.checkResumable checkpoint (Checkpoint.read checkpoint) trainerOptions task)
        let perEpoch = task.Data.PerEpoch
        let total = totalSteps trainerOptions perEpoch
        Schedule.validate
            { InitialLearningRate = trainerOptions.InitialLearningRate; PeakLearningRate = trainerOptions.LearningRate
              MinLearningRate = trainerOptions.MinLearningRate; WarmupSteps = trainerOptions.WarmupSteps; TotalSteps = total }
        let tokenizer = prepared.Data.Tokenizer
        let samplePrompt =
            trainerOptions.SamplePrompt
            |> Option.filter (fun _ -> trainerOptions.SampleTokens > 0)
            |> Option.map (fun prompt ->
                let ids = tokenizer.Encode prompt
                if ids.Length = 0 then Errors.fail "the sample prompt '%s' encodes to no tokens" prompt
                ids)
        let folder = Path.Combine(prepared.RunDirectory, folderName)
        // A new preparation replaces the last one's files (a resume may have other data or more steps).
        if Directory.Exists folder then
            for file in Directory.GetFiles(folder, "*.bin") do File.Delete file
            if Directory.Exists(Path.Combine(folder, initFolder)) then Directory.Delete(Path.Combine(folder, initFolder), true)
            File.Delete(Path.Combine(folder, stopFileName))
        Directory.CreateDirectory folder |> ignore
        let trainShards = TokenShards.writeSplit folder "train" prepared.Data.Train torchrun.ShardTokens
        let validationShards = TokenShards.writeSplit folder "val" prepared.Data.Validation torchrun.ShardTokens
        let loader =
            { Dataset.defaultLoader with BatchSize = trainerOptions.BatchSize; Shuffle = true; DropLast = true; Seed = trainerOptions.Seed }
        let windows = Dataset.windowCount prepared.Data.Train.Length trainerOptions.ContextLength trainerOptions.Stride
        let epochsReached = int ((int64 total * int64 trainerOptions.GradientAccumulation + int64 perEpoch - 1L) / int64 perEpoch)
        BatchOrder.write (Path.Combine(folder, orderFileName)) trainerOptions.BatchSize
            (Array.init epochsReached (fun epoch -> Dataset.batchIndices windows loader epoch))
        if prepared.ResumeFrom.IsNone then Pretrained.save (Path.Combine(folder, initFolder)) model
        for name in [ scriptFileName; formatsFileName ] do
            File.WriteAllText(Path.Combine(folder, name), script name)
        let optionsPath = Path.Combine(folder, optionsFileName)
        writeOptions optionsPath folder prepared torchrun trainShards validationShards perEpoch total samplePrompt
        if prepared.ResumeFrom.IsNone then RunFile.write prepared.RunDirectory options
        let scriptPath = Path.Combine(folder, scriptFileName)
        let program, arguments = command torchrun scriptPath optionsPath
        { RunDirectory = prepared.RunDirectory; Folder = folder; OptionsPath = optionsPath; ScriptPath = scriptPath
          Program = program; Arguments = arguments; TotalSteps = total; ResumeFrom = prepared.ResumeFrom }

    // ---- launching and following ----

    /// One event line of train.py as the trainer's event, with what the run's result needs.
    type private Followed =
        | Event of TrainingEvent
        | ModelWritten of string
        | Finished of steps: int * total: int * tokens: int64 * cancelled: bool * lastLoss: float * best: float option * checkpoint: string option
        | Other

    let private parseEvent (tokenizer: ITokenizer) (json: string) : Followed =
        use document = JsonDocument.Parse json
        let root = document.RootElement
        let get (name: string) =
            match root.TryGetProperty name with
            | true, value -> value
            | _ -> Errors.fail "torchrun event %s: property '%s' is missing" json name
        let number name = let v = get name in if v.ValueKind = JsonValueKind.Number then v.GetDouble() else nan
        let optional name = let v = number name in if Double.IsFinite v then Some v else None
        let integer name = (get name).GetInt32()
        let text name = match get name with v when v.ValueKind = JsonValueKind.String -> Some(v.GetString()) | _ -> None
        match (get "event").GetString() with
        | "started" ->
            Event(
                Started
                    { TotalSteps = integer "total_steps"; StartStep = integer "start_step"; BatchesPerEpoch = integer "batches_per_epoch"
                      TokensPerBatch = (get "tokens_per_batch").GetInt64(); TokensPerStep = (get "tokens_per_step").GetInt64()
                      ParameterCount = (get "parameters").GetInt64(); TrainableParameterCount = (get "trainable_parameters").GetInt64()
                      ResumedFrom = text "resumed_from" })
        | "step" ->
            Event(
                Stepped
                    { Step = integer "step"; TotalSteps = integer "total_steps"; Epoch = integer "epoch"; Epochs = integer "epochs"
                      TrainLoss = number "loss"; LearningRate = number "lr"; GradientNorm = optional "grad_norm"
                      TokensSeen = (get "tokens_seen").GetInt64(); TokensPerSecond = number "tokens_per_s"
                      Elapsed = TimeSpan.FromSeconds(number "elapsed_s"); Remaining = TimeSpan.FromSeconds(number "remaining_s") })
        | "evaluation" -> Event(Evaluated(Metrics.ofJson "torchrun evaluation event" json))
        | "epoch_end" ->
            let sample =
                match get "sample_ids" with
                | ids when ids.ValueKind = JsonValueKind.Array -> Some(tokenizer.Decode [ for id in ids.EnumerateArray() -> id.GetInt32() ])
                | _ -> None
            Event(EpochEnded(integer "epoch", sample))
        | "checkpoint" -> Event(CheckpointSaved((text "path").Value))
        | "model" -> ModelWritten((text "path").Value)
        | "finished" ->
            Finished(integer "steps", integer "total_steps", (get "tokens_seen").GetInt64(), (get "cancelled").GetBoolean(),
                     number "last_train_loss", optional "best_validation_loss", text "checkpoint")
        | _ -> Other

    /// setsid, when the system has it: torchrun then runs in a session of its own, so a Ctrl+C on the terminal reaches
    /// gpt alone, which asks the workers to stop after their step (the STOP file) instead of torchrun killing them.
    let private setsid =
        [ "/usr/bin/setsid"; "/bin/setsid" ] |> List.tryFind (fun path -> OperatingSystem.IsLinux() && File.Exists path)

    /// The interpreter's answers when it can be asked (None when it is missing or lacks something).
    let tryCheckPython (options: TorchrunOptions) : PythonInfo option =
        try Some(checkPython options) with :? GptException -> None

    /// A prepared run's command for an interpreter: with the workaround torchrun of PyTorch 1.13 needs on Python 3.11
    /// (its default "--redirects 0" reads as None there; a mapping for a local rank that does not exist reads as "none
    /// redirected" for the others), and train.py's --events when gpt follows the run.
    let commandFor (run: TorchrunRun) (python: PythonInfo option) (events: bool) : string * string list =
        let workaround = if python |> Option.exists _.RedirectsBroken then [ "--redirects"; "9:0"; "--tee"; "9:0" ] else []
        let arguments =
            match run.Arguments with
            | "-m" :: launcher :: rest -> "-m" :: launcher :: workaround @ rest
            | other -> other
        run.Program, (if events then arguments @ [ "--events" ] else arguments)

    /// Launches a prepared run (torchrun on this node) and follows it: train.py's events become the run's reports,
    /// its other output goes to `log` line by line. Cancelling asks every process to stop after its current step
    /// (they write a checkpoint and the model so far); the result then has Cancelled = true.
    let launch (run: TorchrunRun) (python: PythonInfo) (tokenizer: ITokenizer) (epochs: int) (report: RunProgress -> unit)
               (log: string -> unit) (cancellation: CancellationToken) : RunResult =
        let program, arguments = commandFor run (Some python) true
        let program, arguments =
            match setsid with
            | Some path -> path, "--wait" :: program :: arguments
            | None -> program, arguments
        let start =
            ProcessStartInfo(program, arguments, RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false,
                             WorkingDirectory = run.RunDirectory)
        start.Environment["PYTHONUNBUFFERED"] <- "1"
        let recent = Queue<string>()
        let gate = obj ()
        let write (line: string) =
            lock gate (fun () ->
                recent.Enqueue line
                if recent.Count > 30 then recent.Dequeue() |> ignore
                log line)
        let onEvent, modelSaved, latest = Run.reporter report epochs run.RunDirectory
        let evaluations = List<EvaluationRecord>()
        let mutable modelDirectory = None
        let mutable finished = None
        use child =
            try Process.Start start
            with :? Win32Exception as e -> Errors.fail "could not start '%s': %s" program e.Message
        // gpt quitting at once (a second Ctrl+C) takes the run with it: torchrun is in a session of its own.
        let killTree = EventHandler(fun _ _ -> try (if not child.HasExited then child.Kill true) with _ -> ())
        AppDomain.CurrentDomain.ProcessExit.AddHandler killTree
        use _ = cancellation.Register(fun () ->
            try File.WriteAllText(Path.Combine(run.Folder, stopFileName), "stop requested by gpt\n") with _ -> ())
        try
            child.ErrorDataReceived.Add(fun e -> if not (isNull e.Data) then write e.Data)
            child.BeginErrorReadLine()
            let mutable line = child.StandardOutput.ReadLine()
            while not (isNull line) do
                match line.IndexOf eventPrefix with
                | -1 -> write line
                | at ->
                    match parseEvent tokenizer (line.Substring(at + eventPrefix.Length)) with
                    | Event event ->
                        match event with
                        | Evaluated record -> evaluations.Add record
                        | _ -> ()
                        onEvent event
                    | ModelWritten directory ->
                        modelDirectory <- Some directory
                        modelSaved directory
                    | Finished(steps, total, tokens, cancelled, lastLoss, best, checkpoint) ->
                        finished <- Some { Steps = steps; TotalSteps = total; TokensSeen = tokens; Cancelled = cancelled; LastTrainLoss = lastLoss
                                           BestValidationLoss = best; Checkpoint = checkpoint; Evaluations = evaluations.ToArray() }
                    | Other -> ()
                line <- child.StandardOutput.ReadLine()
            child.WaitForExit()
        finally
            AppDomain.CurrentDomain.ProcessExit.RemoveHandler killTree
            if not child.HasExited then (try child.Kill true with _ -> ())
        let lastLines () = lock gate (fun () -> String.Join("\n", recent))
        if child.ExitCode <> 0 then
            Errors.fail "torchrun exited with code %d; its last lines:\n%s" child.ExitCode (lastLines ())
        match finished with
        | None -> Errors.fail "torchrun ended without finishing the run; its last lines:\n%s" (lastLines ())
        | Some trained -> Run.resultOf trained (latest ()).Elapsed run.RunDirectory modelDirectory

    /// Trains a run with torchrun on this node: checks the options and the Python (what is missing is named), prepares
    /// the run folder (prepare), launches torchrun and reports its progress as an in-process run does. The run folder
    /// is the one `gpt train` makes: checkpoints `Run.pretrain` resumes, metrics.jsonl, model/.
    let train (options: RunOptions) (torchrun: TorchrunOptions) (report: RunProgress -> unit) (log: string -> unit)
              (cancellation: CancellationToken) : RunResult =
        TorchrunOptions.validate torchrun
        if torchrun.NodeRank <> 0 then
            Errors.fail "gpt follows a run from node 0, where the process of rank 0 reports and writes the run folder: on node %d run the command that --dry-run prints (with --node-rank %d)"
                torchrun.NodeRank torchrun.NodeRank
        TorchrunOptions.checkBatch torchrun options.Training.BatchSize
        RunOptions.validate options
        let python = checkPython torchrun
        let run = prepare options torchrun
        launch run python (Tokenizers.gpt2 ()) options.Training.Epochs report log cancellation
