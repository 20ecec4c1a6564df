module Gpt.Tests.InstructionTests

open System
open System.IO
open System.Net
open System.Text
open System.Text.Json
open System.Threading
open Expecto
open TorchSharp
open Gpt.Kernels
open Gpt.Model
open Gpt.Weights
open Gpt.Text
open Gpt.Generation
open Gpt.Training
open Gpt.FineTuning
open Gpt.Tests.TestUtil
open Gpt.Tests.ModelTestUtil
open Gpt.Tests.TrainingFixtures

/// The entries of the ch. 7 fixture (reference/make_instruct_fixture.py; entry 3 has no "input" key).
let private fixtureEntries () = InstructionData.read (fixture "instruct/data.json")

let private referenceJson () = JsonDocument.Parse(File.ReadAllText(fixture "instruct/reference.json")).RootElement

let private reference () = Safetensors.read (fixture "instruct/reference.safetensors")

let private ints (element: JsonElement) = [| for x in element.EnumerateArray() -> x.GetInt32() |]

let private examples (entries: InstructionEntry list) =
    let gpt2 = Tokenizers.gpt2 ()
    entries |> List.map (InstructionData.encode gpt2 PromptStyle.Alpaca) |> Array.ofList

[<Tests>]
let fixtureTests =
    testSequenced <| testList "instruction: the book's ch. 7 code" [
        testCase "prompts (alpaca, phi3) and token ids equal the book's" <| fun () ->
            let gpt2 = Tokenizers.gpt2 ()
            let entries = fixtureEntries ()
            Expect.equal entries[3].Input "" "a missing input is an empty one"
            for entry, expected in Seq.zip entries ((referenceJson ()).GetProperty("entries").EnumerateArray()) do
                Expect.equal (InstructionData.prompt PromptStyle.Alpaca entry) (expected.GetProperty("prompt_alpaca").GetString()) "alpaca prompt"
                Expect.equal (InstructionData.prompt PromptStyle.Phi3 entry) (expected.GetProperty("prompt_phi3").GetString()) "phi3 prompt"
                Expect.equal (InstructionData.fullText PromptStyle.Alpaca entry) (expected.GetProperty("full_text").GetString()) "full text"
                Expect.equal (InstructionData.fullText PromptStyle.Phi3 entry) (expected.GetProperty("full_text_phi3").GetString()) "full text phi3"
                let example = InstructionData.encode gpt2 PromptStyle.Alpaca entry
                Expect.equal example.Ids (ints (expected.GetProperty "ids")) "ids"
                Expect.equal example.PromptLength (ints (expected.GetProperty "prompt_ids")).Length "prompt length"

        testCase "collation as the book's custom_collate_fn: padding, -100, masking, truncation" <| fun () ->
            let reference = reference ()
            let first3 = (examples (fixtureEntries ()))[.. 2]
            let check (mask: bool) (length: int option) (inputs: string) (targets: string) =
                let actualInputs, actualTargets = InstructionData.collate 50256 -100L mask length first3
                expectEqual actualInputs reference[inputs] (sprintf "%s" inputs)
                expectEqual actualTargets reference[targets] (sprintf "%s" targets)
            check false None "collate_inputs" "collate_targets"
            check false (Some 20) "collate_inputs_truncated" "collate_targets_truncated"
            check false (Some 50) "collate_inputs_truncated_mid" "collate_targets_truncated_mid"
            check true None "collate_inputs" "collate_targets_masked"

        testCase "the batch loss and a deterministic epoch equal the book's; greedy responses equal id for id" <| fun () ->
            let reference = reference ()
            use model = Pretrained.load (fixture "instruct/initial")
            Expect.isTrue model.Config.TiedHead "tied head, as GPT-2's checkpoints"
            (use _ = torch.no_grad ()
             use loss = model.Loss(reference["collate_inputs"], reference["collate_targets"])
             expectClose 1e-4 loss reference["batch_loss"] "the book's calc_loss_batch with -100 targets")
            let entries = fixtureEntries ()
            let all = examples entries
            let options =
                { InstructionOptions.defaults "unused" with
                    Shuffle = false
                    Training = { TrainingSettings.bookFineTuning 1 with BatchSize = 1; LearningRate = 5e-4; EvalInterval = 1000; EvalBatches = 1 } }
            let task =
                { Model = model; Trainable = Optimizer.trainable model; Objective = LanguageModelTask.objective model
                  Data = Instruction.batches options 50256 96 all all; Sample = None; Tokenizer = "gpt2"
                  ModelConfiguration = Pretrained.configJson model.Config }
            let losses = ResizeArray<float>()
            let trainerOptions = TrainingSettings.resolve options.Training id 96 96 (None, 0) "unused"
            Trainer.fit { trainerOptions with OutputDirectory = None } task None (function Stepped s -> losses.Add s.TrainLoss | _ -> ()) CancellationToken.None |> ignore
            let expected = floats reference["trajectory_losses"]
            Expect.equal losses.Count 6 "six steps"
            for step in 0 .. 5 do
                Expect.floatClose { absolute = 1e-3; relative = 0.0 } losses[step] (float expected[step]) (sprintf "loss at step %d" (step + 1))
            use trained = Pretrained.load (fixture "instruct/trained")
            for KeyValue(name, tensor) in trained.state_dict () do
                // Key biases have a zero gradient: float32 rounding noise that AdamW amplifies (see the fixture's notes).
                let tolerance = if name.EndsWith "attn.c_attn.bias" then 1e-2 else 1e-4
                expectClose tolerance (model.state_dict ()).[name] tensor (sprintf "trained %s" name)
            let gpt2 = Tokenizers.gpt2 ()
            let generation = { GenerationOptions.defaults with MaxNewTokens = 12; EndOfTextId = Some 50256; UseKvCache = false }
            for index, entry in List.indexed entries do
                let prompt = gpt2.Encode(InstructionData.prompt PromptStyle.Alpaca entry)
                let completion = (Generator.generate (LanguageModel.ofGpt model) generation [ prompt ])[0]
                Expect.equal (Array.map int64 completion.Tokens) (longs reference[sprintf "response_ids_%d" index]) (sprintf "response %d" index)
                let expectedText = ((referenceJson ()).GetProperty("entries").[index]).GetProperty("response_text").GetString()
                Expect.equal (Instruction.respond model gpt2 PromptStyle.Alpaca generation entry) expectedText (sprintf "response text %d" index)
    ]

[<Tests>]
let unitTests =
    testList "instruction: rules" [
        testCase "the first end-of-text target stays, the rest become -100, truncation comes after masking" <| fun () ->
            let batch = [| { Ids = [| 1; 2; 3; 4 |]; PromptLength = 3 }; { Ids = [| 5; 6 |]; PromptLength = 1 } |]
            let inputs, targets = InstructionData.collate 9 -100L false None batch
            Expect.equal (longs inputs) [| 1L; 2L; 3L; 4L; 5L; 6L; 9L; 9L |] "inputs padded with end-of-text"
            Expect.equal (longs targets) [| 2L; 3L; 4L; 9L; 6L; 9L; -100L; -100L |] "targets: one end-of-text, then -100"
            let _, masked = InstructionData.collate 9 -100L true (Some 3) batch
            Expect.equal (longs masked) [| -100L; -100L; 4L; 6L; 9L; -100L |] "prompt targets masked, then cut to 3"

        testCase "malformed entries name their index" <| fun () ->
            use temp = new TempDir()
            File.WriteAllText(temp.File "a.json", """[{"instruction": "x", "output": "y"}, {"instruction": "x"}]""")
            throwsGpt [ "a.json' entry 1: \"output\" is missing" ] (fun () -> InstructionData.read (temp.File "a.json") |> ignore) "missing output"
            File.WriteAllText(temp.File "b.jsonl", "{\"instruction\": \"x\", \"output\": \"y\"}\n{\"instruction\": 3, \"output\": \"y\"}\n")
            throwsGpt [ "b.jsonl' line 2: \"instruction\" must be a string, found 3" ] (fun () -> InstructionData.read (temp.File "b.jsonl") |> ignore) "wrong type"
            Expect.equal (InstructionData.read (temp.File "a.json" |> fun p -> File.WriteAllText(p, """[{"instruction": "i", "input": null, "output": "o"}]"""); p)).Head.Input "" "null input"

        testCase "exact match and token F1 normalise as SQuAD does" <| fun () ->
            Expect.equal (InstructionData.exactMatch "The cats." "cats") 1.0 "articles and punctuation"
            Expect.equal (InstructionData.exactMatch "cats" "dogs") 0.0 "different"
            Expect.floatClose Accuracy.high (InstructionData.tokenF1 "3, 2, 1" "3, 2") 0.8 "precision 1, recall 2/3"
            Expect.equal (InstructionData.tokenF1 "" "") 1.0 "both empty"

        testCase "the built-in set: single right answers, deterministic" <| fun () ->
            let entries = InstructionData.builtIn 70 1
            Expect.equal entries (InstructionData.builtIn 70 1) "deterministic"
            Expect.equal (entries |> List.map _.Instruction |> List.distinct |> List.length |> min 7) 7 "seven kinds of task"
            for entry in entries do
                Expect.isFalse (String.IsNullOrWhiteSpace entry.Output) entry.Where
            let sorted = entries |> List.find (fun e -> e.Instruction.StartsWith "Sort")
            Expect.equal sorted.Output (String.Join(", ", sorted.Input.Split(", ") |> Array.sort)) "sorted"
    ]

/// A stub judge on 127.0.0.1: answers each POST with the next reply (status, body), records the requests.
type private StubServer(replies: (int * string) list) =
    let listener = new HttpListener()
    let port = Random.Shared.Next(20000, 60000)
    do
        listener.Prefixes.Add(sprintf "http://127.0.0.1:%d/" port)
        listener.Start()
    let requests = Collections.Concurrent.ConcurrentQueue<string * string>()
    let serve =
        Tasks.Task.Run(fun () ->
            for status, body in replies do
                let context = listener.GetContext()
                use reader = new StreamReader(context.Request.InputStream)
                requests.Enqueue((context.Request.Url.AbsolutePath, reader.ReadToEnd()))
                context.Response.StatusCode <- status
                let bytes = Encoding.UTF8.GetBytes(body: string)
                context.Response.OutputStream.Write(bytes, 0, bytes.Length)
                context.Response.Close())
    member _.Url = sprintf "http://127.0.0.1:%d" port
    member _.Requests = List.ofSeq requests
    interface IDisposable with
        member _.Dispose() =
            (try serve.Wait(2000) |> ignore with _ -> ())
            listener.Close()

[<Tests>]
let judgeTests =
    testSequenced <| testList "instruction: the judge" [
        testCase "Ollama and OpenAI-compatible servers, retries after errors and wordy replies" <| fun () ->
            let entry = { Instruction = "Give the plural of the noun."; Input = "cat"; Output = "cats"; Where = "test" }
            use ollama =
                new StubServer([ 500, "overloaded"; 200, """{"message": {"role": "assistant", "content": "I would say"}}"""
                                 200, """{"message": {"role": "assistant", "content": "Score: 85"}}""" ])
            let settings = { Judge.defaults with Url = ollama.Url; Attempts = 3 }
            let judged = Judge.score settings [ entry, "cats" ] ignore CancellationToken.None
            Expect.equal (judged |> List.map _.Score) [ Some 85 ] "the third try's score"
            let path, body = ollama.Requests.Head
            Expect.equal path "/api/chat" "Ollama's endpoint"
            Expect.stringContains body "score the model response `cats` on a scale from 0 to 100" "the book's prompt"
            Expect.stringContains body "\"stream\":false" "not streamed"
            use openai = new StubServer([ 200, """{"choices": [{"message": {"role": "assistant", "content": "40"}}]}""" ])
            let judgedOpenAI = Judge.score { settings with Url = openai.Url; Api = JudgeApi.OpenAI; ApiKey = Some "k" } [ entry, "cat" ] ignore CancellationToken.None
            Expect.equal judgedOpenAI.Head.Score (Some 40) "OpenAI's shape"
            Expect.equal (fst openai.Requests.Head) "/v1/chat/completions" "OpenAI's endpoint"

        testCase "an unreachable server is a clear error" <| fun () ->
            let entry = { Instruction = "i"; Input = ""; Output = "o"; Where = "test" }
            throwsGpt [ "is unreachable"; "ollama serve" ]
                (fun () -> Judge.score { Judge.defaults with Url = "http://127.0.0.1:9" } [ entry, "x" ] ignore CancellationToken.None |> ignore) "refused"
    ]

[<Tests>]
let runTests =
    testSequenced <| testList "instruction: runs" [
        testCase "fine-tune on the built-in instructions, resume exactly, test responses written and scored" <| fun () ->
            use temp = new TempDir()
            let baseModel = temp.File "base"
            (use lm = new GptModel({ GptConfig.gpt2Small with ContextLength = 96; EmbeddingDim = 16; Heads = 2; Layers = 1 }, 7L)
             Pretrained.save baseModel lm)
            let options =
                { InstructionOptions.defaults baseModel with
                    ResponseTokens = 4
                    Training = { TrainingSettings.bookFineTuning 1 with LearningRate = 1e-3; MaxSteps = Some 4; EvalInterval = 2
                                                                        EvalBatches = 1; OutputDirectory = temp.Path; Name = Some "straight" } }
            let straight = Instruction.fineTune options ignore CancellationToken.None
            Expect.equal straight.Run.Steps 4 "four steps"
            Expect.equal (straight.TrainExamples, straight.ValidationExamples, straight.TestExamples) (935, 110, 55) "85/10/5 of 1100"
            let responses = InstructionData.readResponses straight.ResponsesFile.Value
            Expect.equal responses.Length 55 "a response per test entry"
            Expect.isSome straight.ExactMatch "exact match measured"
            use cancel = new CancellationTokenSource()
            let first =
                Instruction.fineTune { options with Training.Name = Some "resumed" }
                    (fun p -> if p.Kind = RunEventKind.Step && p.Step = 2 then cancel.Cancel()) cancel.Token
            Expect.isTrue first.Run.Cancelled "stopped"
            let resumed = Instruction.fineTune (Instruction.fromCheckpoint first.Run.RunDirectory) ignore CancellationToken.None
            use a = Pretrained.load straight.Run.ModelDirectory.Value
            use b = Pretrained.load resumed.Run.ModelDirectory.Value
            Expect.isTrue (sameWeights a b) "bit for bit"
    ]
