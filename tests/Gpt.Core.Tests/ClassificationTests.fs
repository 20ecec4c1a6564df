module Gpt.Tests.ClassificationTests

open System
open System.IO
open System.Text.Json
open System.Threading
open Expecto
open FsCheck
open FsCheck.FSharp
open TorchSharp
open Gpt.Model
open Gpt.Weights
open Gpt.Text
open Gpt.Training
open Gpt.FineTuning
open Gpt.Tests.TestUtil
open Gpt.Tests.ModelTestUtil
open Gpt.Tests.TrainingFixtures

/// The book's examples of the ch. 6 fixture (reference/make_classifier_fixture.py): token ids and labels.
let private fixtureExamples () =
    use document = JsonDocument.Parse(File.ReadAllText(fixture "classifier/examples.json"))
    [| for item in document.RootElement.EnumerateArray() ->
           { Ids = [| for id in item.GetProperty("ids").EnumerateArray() -> id.GetInt32() |]
             Label = item.GetProperty("label").GetInt32(); Truncated = false } |]

let private reference () = Safetensors.read (fixture "classifier/reference.safetensors")

/// The book's chapter 6 epoch on the fixture: batch 1, file order, padded to the longest text, last block + final
/// norm + head trained, AdamW lr 1e-3, weight decay 0.1 on every trained parameter, no clipping.
let private bookEpoch (classifier: GptClassifier) (examples: ClassificationExample[]) (events: TrainingEvent -> unit) =
    let options =
        { ClassificationOptions.defaults "unused" with
            Pooling = Some Pooling.LastPosition; Shuffle = false
            Training = { TrainingSettings.bookFineTuning 1 with BatchSize = 1; LearningRate = 1e-3; EvalInterval = 1000; EvalBatches = 1 } }
    let length = examples |> Array.map _.Ids.Length |> Array.max
    let task =
        { Model = classifier
          Trainable = Classification.trainable options.Trainable classifier
          Objective = Classification.objective classifier
          Data = Classification.batches options classifier.Config.PadTokenId (Some length) examples examples
          Sample = None
          Tokenizer = "ids"
          ModelConfiguration = ClassifierFiles.configJson classifier.Config }
    let trainerOptions = TrainingSettings.resolve options.Training id 16 16 (None, 0) "unused"
    Trainer.fit { trainerOptions with OutputDirectory = None } task None events CancellationToken.None

let private labelled (rows: (string * string) list) =
    rows |> List.mapi (fun i (label, text) -> { Text = text; Label = label; Where = sprintf "line %d" (i + 1) })

[<Tests>]
let fixtureTests =
    testSequenced <| testList "classification: the book's ch. 6 code" [
        testCase "last-position and last-token logits and the batch loss equal the book's" <| fun () ->
            use classifier = ClassifierFiles.load (fixture "classifier/initial")
            let reference = reference ()
            let padded = reference["padded_ids"]
            let examples = fixtureExamples ()
            Expect.equal classifier.Labels [| "ham"; "spam" |] "labels from id2label"
            Expect.equal classifier.Config.PadTokenId 511 "pad id"
            let book = { classifier.Config with Pooling = Pooling.LastPosition }
            use scope = torch.NewDisposeScope()
            use _ = torch.no_grad ()
            let full = Array.create examples.Length padded.shape[1]
            expectClose 1e-5 (Classifier.logits book Mode.Eval classifier.Params padded full) reference["last_position_logits"] "last position (the book)"
            let lengths = examples |> Array.map (fun e -> int64 e.Ids.Length)
            expectClose 1e-5 (classifier.Logits(padded, lengths)) reference["last_token_logits"] "last real token of the padded batch"
            let alone = torch.cat([| for e in examples -> classifier.forward(torch.tensor(Array.map int64 e.Ids).view(1L, -1L)) |], 0L)
            expectClose 1e-5 alone reference["last_token_logits"] "each text alone"
            let loss = Classifier.loss book Mode.Eval classifier.Params padded full reference["labels"]
            expectClose 1e-5 loss reference["batch_loss"] "the book's calc_loss_batch"

        testCase "a deterministic epoch follows the book's losses step by step; frozen weights stay bit-equal" <| fun () ->
            use classifier = ClassifierFiles.loadWith (Some Pooling.LastPosition) (fixture "classifier/initial")
            use initial = ClassifierFiles.load (fixture "classifier/initial")
            use trained = ClassifierFiles.load (fixture "classifier/trained")
            let reference = reference ()
            let losses = ResizeArray<float>()
            let result = bookEpoch classifier (fixtureExamples ()) (function Stepped s -> losses.Add s.TrainLoss | _ -> ())
            Expect.equal result.Steps 10 "ten steps"
            let expected = floats reference["trajectory_losses"] |> Array.map float
            for step in 0 .. 9 do
                Expect.floatClose { absolute = 1e-4; relative = 0.0 } losses[step] expected[step] (sprintf "loss at step %d" (step + 1))
            let after = classifier.state_dict ()
            for KeyValue(name, tensor) in initial.state_dict () do
                let trainedName = name.StartsWith "score." || name.StartsWith "transformer.ln_f." || name.StartsWith "transformer.h.1."
                if not trainedName then expectEqual after[name] tensor (sprintf "frozen %s" name)
            for KeyValue(name, tensor) in trained.state_dict () do
                // The key bias of the trained block has a zero gradient: float32 rounding noise that AdamW amplifies
                // (the fixture's note), so it is compared loosely.
                let tolerance = if name = "transformer.h.1.attn.c_attn.bias" then 1e-2 else 1e-4
                expectClose tolerance after[name] tensor (sprintf "trained %s" name)
            let padded = reference["padded_ids"]
            let book = { classifier.Config with Pooling = Pooling.LastPosition }
            let accuracy =
                use _ = torch.no_grad ()
                use logits = Classifier.logits book Mode.Eval classifier.Params padded (Array.create 10 padded.shape[1])
                Some(float (logits.argmax(-1L).eq(reference["labels"]).sum().item<int64> ()) / 10.0)
            Expect.floatClose Accuracy.high accuracy.Value (float (reference["accuracy_after"].item<float32> ())) "the book's accuracy after the epoch"
    ]

/// A small random classifier for property tests.
let private smallClassifier (seed: int) =
    let config = { Body = { tinyConfig with ContextLength = 24; VocabSize = 60 }; Labels = [| "a"; "b"; "c" |]; PadTokenId = 59; Pooling = Pooling.LastToken }
    new GptClassifier(config, int64 seed)

/// Logits of `classifyWith` (the decoder) and `classify` (TorchSharp) on texts of 1 to 150 tokens: the largest
/// difference, and whether the labels agree.
let private decoderAgainstTorch (classifier: GptClassifier) (dtype: Gpt.Kernels.Dtype) =
    let texts =
        [ "Hi"; "Free entry to win a prize, text WIN now"; "See you at the harbor at seven, bring the map please"
          String.replicate 30 "Call now to claim your reward. "; String.replicate 11 "the boat is late again " ]
    let tokenizer = Tokenizers.gpt2 ()
    let reference = Classification.classify classifier tokenizer texts
    use decoder = Classification.decoder dtype classifier
    Expect.equal decoder.Dtype dtype "the decoder's dtype"
    let decoded = Classification.classifyWith decoder tokenizer texts
    Expect.equal (decoded |> Array.map (fun p -> p.Text)) (reference |> Array.map (fun p -> p.Text)) "one prediction per text, in order"
    let difference =
        Array.map2 (fun (a: Prediction) (b: Prediction) -> Array.map2 (fun x y -> abs (x - y)) a.Logits b.Logits |> Array.max) decoded reference
        |> Array.max
    for p in decoded do
        Expect.floatClose Accuracy.medium (Array.sum p.Probabilities) 1.0 "probabilities sum to 1"
    difference, Array.forall2 (fun (a: Prediction) (b: Prediction) -> a.LabelId = b.LabelId) decoded reference

[<Tests>]
let decoderTests =
    // 50,257 tokens (GPT-2's tokenizer), 48 columns (not a multiple of the kernels' 32), a context of 80 tokens: the
    // long texts are truncated and cross the decoder's 64-token chunks.
    let config pooling =
        { Body = { tinyConfig with VocabSize = 50257; ContextLength = 80; EmbeddingDim = 48; Heads = 4 }
          Labels = [| "ham"; "spam"; "other" |]; PadTokenId = 50256; Pooling = pooling }
    testList "classification: the decoder (--dtype)" [
        for pooling in [ Pooling.LastToken; Pooling.LastPosition ] do
            test (sprintf "float32 through the decoder gives the TorchSharp path's logits (%s)" pooling.Name) {
                use classifier = new GptClassifier(config pooling, 7L)
                classifier.eval ()
                // a sharper head than the initial N(0, 0.02), so that the labels differ clearly between texts
                using (torch.no_grad ()) (fun _ -> classifier.Score.weight.mul_(torch.tensor 50.0f) |> ignore)
                let difference, sameLabels = decoderAgainstTorch classifier Gpt.Kernels.Dtype.Float32
                printfn "classifier decoder f32 (%s): max |logits - TorchSharp| = %.3g" pooling.Name difference
                Expect.isLessThan difference 1e-4 "float32 logits"
                Expect.isTrue sameLabels "the same labels"
            }
            for dtype, tolerance in [ Gpt.Kernels.Dtype.Float16, 5e-3; Gpt.Kernels.Dtype.BFloat16, 5e-2 ] do
                test (sprintf "%s through the decoder stays near float32 (%s)" dtype.Name pooling.Name) {
                    use classifier = new GptClassifier(config pooling, 7L)
                    using (torch.no_grad ()) (fun _ -> classifier.Score.weight.mul_(torch.tensor 50.0f) |> ignore)
                    let difference, _ = decoderAgainstTorch classifier dtype
                    printfn "classifier decoder %s (%s): max |logits - TorchSharp| = %.3g" dtype.Name pooling.Name difference
                    Expect.isLessThan difference tolerance (sprintf "%s logits" dtype.Name)
                    Expect.isGreaterThan difference 0.0 "the weights really are read in 16 bits"
                }
        test "classifyAs: float32 with low-rank adapters takes the TorchSharp path, bf16 merges them" {
            use classifier = new GptClassifier(config Pooling.LastToken, 3L)
            Lora.attachClassifier (LoraSettings.create 2 None None) 5L classifier |> ignore
            // adapters that change something: B starts at zero
            using (torch.no_grad ()) (fun _ ->
                for name, p in classifier.named_parameters () do
                    if name.EndsWith "lora_B" then p.normal_(0.0, 0.5) |> ignore)
            classifier.eval ()
            let texts = [ "Claim your prize"; "Lunch at noon?" ]
            let tokenizer = Tokenizers.gpt2 ()
            let reference = Classification.classify classifier tokenizer texts
            let viaF32 = Classification.classifyAs Gpt.Kernels.Dtype.Float32 classifier tokenizer texts
            Expect.equal (viaF32 |> Array.map (fun p -> p.Logits)) (reference |> Array.map (fun p -> p.Logits)) "TorchSharp's logits exactly"
            let viaBf16 = Classification.classifyAs Gpt.Kernels.Dtype.BFloat16 classifier tokenizer texts
            let difference = Array.map2 (fun (a: Prediction) (b: Prediction) -> Array.map2 (fun x y -> abs (x - y)) a.Logits b.Logits |> Array.max) viaBf16 reference |> Array.max
            Expect.isLessThan difference 5e-2 "bf16 with the adapters merged in"
        }
        test "an empty text is refused by the decoder path as by TorchSharp's" {
            use classifier = new GptClassifier(config Pooling.LastToken, 3L)
            use decoder = Classification.decoder Gpt.Kernels.Dtype.BFloat16 classifier
            Expect.throwsC (fun () -> Classification.classifyWith decoder (Tokenizers.gpt2 ()) [ "fine"; "" ] |> ignore)
                (fun e -> Expect.stringContains e.Message "text 1 is empty" "names the text")
        }
    ]

[<Tests>]
let modelTests =
    testList "classification: the model" [
        testProperty "the last real token's logits do not change when padding is added" <| fun (seed: PositiveInt) (extra: PositiveInt) ->
            use classifier = smallClassifier seed.Get
            classifier.eval ()
            use scope = torch.NewDisposeScope()
            use _ = torch.no_grad ()
            let random = Random(seed.Get)
            let length = 1 + random.Next 12
            let pad = 1 + extra.Get % 10
            let ids = Array.init length (fun _ -> int64 (random.Next 59))
            let alone = classifier.forward(torch.tensor(ids).view(1L, -1L))
            let padded = torch.tensor(Array.append ids (Array.create pad 59L)).view(1L, -1L)
            maxAbsDifference (classifier.Logits(padded, [| int64 length |])) alone < 1e-5

        testCase "save then load gives the same logits and the Hugging Face names" <| fun () ->
            use temp = new TempDir()
            use classifier = smallClassifier 3
            classifier.eval ()
            ClassifierFiles.save (temp.File "c") classifier
            use loaded = ClassifierFiles.load (temp.File "c")
            use ids = randomIds 4 59 2 7
            expectEqual (loaded.forward ids) (classifier.forward ids) "logits"
            let names = Safetensors.read (Path.Combine(temp.File "c", "model.safetensors")) |> Map.toList |> List.map fst
            Expect.contains names "score.weight" "head"
            Expect.contains names "transformer.h.0.attn.c_attn.weight" "body under transformer."
            let config = File.ReadAllText(Path.Combine(temp.File "c", "config.json"))
            for key in [ "\"GPT2ForSequenceClassification\""; "\"num_labels\": 3"; "\"id2label\""; "\"label2id\""; "\"pad_token_id\": 59" ] do
                Expect.stringContains config key key
            throwsGpt [ "is a text classifier"; "gpt classify" ] (fun () -> Pretrained.load (temp.File "c") |> ignore) "not a language model"

        testCase "trainable sets freeze the rest" <| fun () ->
            use classifier = smallClassifier 5
            let names set = Classification.trainable set classifier |> Array.map fst |> Set.ofArray
            Expect.equal (names TrainableSet.Head) (set [ "score.weight" ]) "head"
            let lastBlock = names (TrainableSet.LastBlocks 1)
            Expect.isTrue (lastBlock.Contains "transformer.h.1.mlp.c_fc.weight" && lastBlock.Contains "transformer.ln_f.weight") "last block and final norm"
            Expect.isFalse (lastBlock |> Set.exists (fun n -> n.StartsWith "transformer.h.0." || n.StartsWith "transformer.wte")) "earlier blocks frozen"
            Expect.isTrue ((names TrainableSet.All).Contains "transformer.wte.weight") "all"
            Expect.equal (names (TrainableSet.LastBlocks 2) |> Set.filter (fun n -> n.StartsWith "transformer.h.")).Count 24 "two blocks"
            Expect.equal (TrainableSet.Parse "last-3") (TrainableSet.LastBlocks 3) "last-N"
            throwsGpt [ "expected last-block, last-N" ] (fun () -> TrainableSet.Parse "middle" |> ignore) "unknown"
            let frozen = classifier.parameters () |> Seq.filter (fun p -> not p.requires_grad) |> Seq.length
            Expect.isGreaterThan frozen 0 "the last call froze the others"
    ]

[<Tests>]
let dataTests =
    testList "classification: data" [
        testCase "CSV with quotes and newlines, TSV with a header, the SMS Spam Collection, JSON Lines" <| fun () ->
            use temp = new TempDir()
            File.WriteAllText(temp.File "a.csv", "Label,Text\nham,\"Hi, \"\"you\"\"\nthere\"\nspam,Win now\n")
            let csv = ClassificationData.read (temp.File "a.csv") "Text" "Label"
            Expect.equal (csv |> List.map (fun t -> t.Label, t.Text)) [ "ham", "Hi, \"you\"\nthere"; "spam", "Win now" ] "csv"
            Expect.equal (csv |> List.map _.Where) [ sprintf "file '%s' line 2" (temp.File "a.csv"); sprintf "file '%s' line 4" (temp.File "a.csv") ] "lines"
            File.WriteAllText(temp.File "b.tsv", "text\tlabel\nhello\tham\n")
            Expect.equal (ClassificationData.read (temp.File "b.tsv") "Text" "Label" |> List.map (fun t -> t.Label, t.Text)) [ "ham", "hello" ] "tsv"
            File.WriteAllText(temp.File "SMSSpamCollection", "ham\tGo until \"jurong\" point\r\nspam\tFree entry, txt 87121\n")
            Expect.equal (ClassificationData.read (temp.File "SMSSpamCollection") "Text" "Label" |> List.map (fun t -> t.Label, t.Text))
                [ "ham", "Go until \"jurong\" point"; "spam", "Free entry, txt 87121" ] "sms"
            File.WriteAllText(temp.File "c.jsonl", "{\"text\": \"a b\", \"label\": \"x\"}\n\n{\"text\": \"c\", \"label\": 1}\n")
            Expect.equal (ClassificationData.read (temp.File "c.jsonl") "Text" "Label" |> List.map (fun t -> t.Label, t.Text)) [ "x", "a b"; "1", "c" ] "jsonl"

        testCase "bad files name the file, the line and what was expected" <| fun () ->
            use temp = new TempDir()
            File.WriteAllText(temp.File "a.csv", "Label,Body\nham,hi\n")
            throwsGpt [ "a.csv' line 1"; "no column 'Text'"; "--text-column" ] (fun () -> ClassificationData.read (temp.File "a.csv") "Text" "Label" |> ignore) "column"
            File.WriteAllText(temp.File "b.csv", "Label,Text\nham,hi\nspam,\n")
            throwsGpt [ "b.csv' line 3: the text is empty" ] (fun () -> ClassificationData.read (temp.File "b.csv") "Text" "Label" |> ignore) "empty"
            File.WriteAllText(temp.File "c.csv", "Label,Text\nham,\"open\n")
            throwsGpt [ "c.csv line 2: a quoted field is never closed" ] (fun () -> ClassificationData.read (temp.File "c.csv") "Text" "Label" |> ignore) "quote"
            let texts = labelled [ "ham", "a"; "eggs", "b" ]
            throwsGpt [ "line 2: unknown label 'eggs', expected one of ham, spam" ] (fun () -> ClassificationData.labels (Some [ "ham"; "spam" ]) texts |> ignore) "label"
            Expect.equal (ClassificationData.labels None (labelled [ "b", "x"; "a", "y"; "b", "z" ])) [| "b"; "a" |] "first appearance"

        testCase "seeded split (the book's 70/10/20), balance, truncation, padding" <| fun () ->
            let texts = labelled [ for i in 1 .. 50 -> (if i % 5 = 0 then "spam" else "ham"), sprintf "text %d" i ]
            let train, validation, test = ClassificationData.split 123 0.7 0.1 texts
            Expect.equal (train.Length, validation.Length, test.Length) (35, 5, 10) "sizes"
            Expect.equal (ClassificationData.split 123 0.7 0.1 texts) (train, validation, test) "deterministic"
            Expect.equal (List.sort (train @ validation @ test)) (List.sort texts) "a partition"
            let balanced = ClassificationData.balance 123 texts
            Expect.equal (balanced |> List.countBy _.Label |> List.sort) [ "ham", 10; "spam", 10 ] "undersampled to the rarest"
            let gpt2 = Tokenizers.gpt2 ()
            let examples = ClassificationData.encode gpt2 [| "ham"; "spam" |] 3 (labelled [ "spam", "one two three four five"; "ham", "hi" ])
            Expect.equal (examples |> Array.map (fun e -> e.Ids.Length, e.Label, e.Truncated)) [| 3, 1, true; 1, 0, false |] "truncated to 3"
            let batch = ClassificationData.collate 50256 None examples
            Expect.equal batch.Ids.shape [| 2L; 3L |] "padded to the longest"
            Expect.equal batch.Lengths [| 3L; 1L |] "real lengths"
            let flat = longs batch.Ids
            Expect.equal flat[3 ..] [| int64 examples[1].Ids[0]; 50256L; 50256L |] "pad id after the text"
            Expect.equal (ClassificationData.collate 50256 (Some 5) examples).Ids.shape [| 2L; 5L |] "fixed length"

        testCase "the built-in messages: 240 texts, two labels" <| fun () ->
            let texts = ClassificationData.builtIn.Value
            Expect.equal texts.Length 240 "texts"
            Expect.equal (texts |> List.countBy _.Label |> List.sort) [ "ham", 160; "spam", 80 ] "labels"
    ]

[<Tests>]
let runTests =
    testSequenced <| testList "classification: runs" [
        testCase "fine-tune on the built-in messages, resume exactly, classify" <| fun () ->
            use temp = new TempDir()
            let baseModel = temp.File "base"
            (use lm = new GptModel({ GptConfig.gpt2Small with ContextLength = 48; EmbeddingDim = 32; Heads = 2; Layers = 2 }, 7L)
             Pretrained.save baseModel lm)
            let options =
                { ClassificationOptions.defaults baseModel with
                    Training = { TrainingSettings.bookFineTuning 1 with BatchSize = 8; LearningRate = 2e-3; MaxSteps = Some 6
                                                                        EvalInterval = 3; EvalBatches = 2; OutputDirectory = temp.Path; Name = Some "straight" } }
            let straight = Classification.fineTune options ignore CancellationToken.None
            Expect.equal straight.Run.Steps 6 "six steps"
            Expect.equal (straight.TrainExamples, straight.ValidationExamples, straight.TestExamples) (168, 24, 48) "70/10/20 of 240"
            Expect.isSome straight.TestAccuracy "test accuracy"
            let records = Metrics.read (Path.Combine(straight.Run.RunDirectory, "metrics.jsonl"))
            Expect.isTrue (records |> Array.forall (fun r -> r.TrainAccuracy.IsSome && r.ValidationAccuracy.IsSome)) "accuracies logged"
            // Three steps, a stop, a resume and three more give the straight run's weights.
            use cancel = new CancellationTokenSource()
            let first =
                Classification.fineTune { options with Training.Name = Some "resumed" }
                    (fun p -> if p.Kind = RunEventKind.Step && p.Step = 3 then cancel.Cancel()) cancel.Token
            Expect.isTrue first.Run.Cancelled "stopped"
            let resumedOptions = Classification.fromCheckpoint first.Run.RunDirectory
            Expect.equal resumedOptions.Trainable options.Trainable "options back from run.json"
            let resumed = Classification.fineTune resumedOptions ignore CancellationToken.None
            Expect.equal resumed.Run.Steps 6 "resumed to six"
            use a = ClassifierFiles.load straight.Run.ModelDirectory.Value
            use b = ClassifierFiles.load resumed.Run.ModelDirectory.Value
            Expect.isTrue (sameWeights a b) "bit for bit"
            let checkpoint = Directory.GetDirectories(Path.Combine(first.Run.RunDirectory, "checkpoints")) |> Array.head
            let saved = Safetensors.read (Path.Combine(checkpoint, "model.safetensors")) |> Map.toList |> List.map fst
            Expect.isFalse (saved |> List.exists (fun n -> n.StartsWith "transformer.h.0.")) "a checkpoint holds only the trained parameters"
            let predictions = Classification.classify a (Tokenizers.gpt2 ()) [ "WINNER! Claim your prize now"; "See you at the harbor" ]
            Expect.equal predictions.Length 2 "two predictions"
            for p in predictions do
                Expect.floatClose Accuracy.medium (Array.sum p.Probabilities) 1.0 "probabilities sum to 1"
                Expect.equal p.Label a.Labels[p.LabelId] "label name"
    ]
