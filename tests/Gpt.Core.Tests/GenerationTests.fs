module Gpt.Tests.GenerationTests

open System
open System.Text
open Expecto
open FsCheck
open FsCheck.FSharp
open TorchSharp
open Gpt.Text
open Gpt.Generation
open Gpt.Tests.TestUtil
open Gpt.Tests.StandInModels

// ---------------------------------------------------------------------------------------------------------------
// Helpers

let private floatTensor (rows: float32[][]) =
    let batch, vocabulary = rows.Length, rows[0].Length
    torch.tensor(Array.concat rows, ReadOnlySpan<int64> [| int64 batch; int64 vocabulary |])

let private rowsOf (tensor: torch.Tensor) : float32[][] =
    let vocabulary = int tensor.shape[1]
    tensor.data<float32>().ToArray() |> Array.chunkBySize vocabulary

/// Rows of distinct logits (so that "the k most likely" and "the smallest set reaching p" are well defined).
let private distinctLogits (random: Random) (batch: int) (vocabulary: int) =
    Array.init batch (fun _ ->
        let scale = 0.05 + random.NextDouble() * 1.5
        let offset = random.NextDouble() * 10.0 - 5.0
        let order = Array.init vocabulary id
        random.Shuffle order
        order |> Array.map (fun rank -> float32 (offset + float rank * scale)))

let private softmax64 (logits: float32[]) =
    let top = logits |> Array.map float |> Array.max
    let exps = logits |> Array.map (fun l -> if Single.IsNegativeInfinity l then 0.0 else Math.Exp(float l - top))
    let total = Array.sum exps
    exps |> Array.map (fun e -> e / total)

/// For each token, the probability of the tokens strictly more likely than it.
let private massBefore (probabilities: float[]) =
    let order = probabilities |> Array.indexed |> Array.sortByDescending snd
    let before = Array.zeroCreate probabilities.Length
    let mutable sum = 0.0
    for index, probability in order do
        before[index] <- sum
        sum <- sum + probability
    before

let private argmax (values: float32[]) = values |> Array.indexed |> Array.maxBy snd |> fst

let private topIndices (k: int) (values: float32[]) =
    values |> Array.indexed |> Array.sortByDescending snd |> Array.take (min k values.Length) |> Array.map fst |> Set.ofArray

let private draws (count: int) (sample: unit -> torch.Tensor) =
    Array.init count (fun _ ->
        use ids = sample ()
        ids.data<int64>().ToArray() |> Array.map int)

let private greedyOptions maxNewTokens =
    { GenerationOptions.defaults with MaxNewTokens = maxNewTokens; EndOfTextId = None }

let private liveTensors () = DisposeScopeManager.Statistics.ThreadTotalLiveCount

// ---------------------------------------------------------------------------------------------------------------
// Sampling

let private logitsCase =
    Gen.zip3 (Gen.choose (1, 3)) (Gen.choose (1, 30)) (Gen.choose (0, 1_000_000)) |> Arb.fromGen

[<Tests>]
let samplingTests =
    testList "sampling" [
        testCase "greedy is argmax, shape [B, 1] or [1]" <| fun () ->
            use logits = floatTensor [| [| 0.1f; 2.0f; -1.0f |]; [| 5.0f; 2.0f; 7.0f |] |]
            use ids = Sampling.greedy logits
            Expect.equal ids.shape [| 2L; 1L |] "shape [B, 1]"
            Expect.equal (ids.data<int64>().ToArray()) [| 1L; 2L |] "argmax per row"
            use row = logits.select(0L, 0L)
            use one = Sampling.greedy row
            Expect.equal one.shape [| 1L |] "shape [1] for [V]"
            use generator = new torch.Generator(1UL, torch.CPU)
            use sampled = Sampling.nextToken 1.0 None None generator row
            Expect.equal sampled.shape [| 1L |] "sampled shape [1] for [V]"

        testCase "temperature divides the logits" <| fun () ->
            use logits = floatTensor [| [| 1.0f; 2.0f; -4.0f |] |]
            use scaled = Sampling.scaleTemperature 2.0 logits
            Expect.equal (rowsOf scaled) [| [| 0.5f; 1.0f; -2.0f |] |] "logits / 2"

        testCase "settings are checked with clear messages" <| fun () ->
            use logits = floatTensor [| [| 1.0f; 2.0f |] |]
            use generator = new torch.Generator(1UL, torch.CPU)
            throwsGpt [ "temperature"; "found -1" ] (fun () -> Sampling.nextToken -1.0 None None generator logits |> ignore) "negative temperature"
            throwsGpt [ "temperature"; "NaN" ] (fun () -> Sampling.nextToken nan None None generator logits |> ignore) "NaN temperature"
            throwsGpt [ "top-k"; "found 0" ] (fun () -> Sampling.keepTopK 0 logits |> ignore) "top-k 0"
            throwsGpt [ "top-p must be in (0, 1]"; "found 0" ] (fun () -> Sampling.keepTopP 0.0 logits |> ignore) "top-p 0"
            throwsGpt [ "top-p must be in (0, 1]"; "found 1.5" ] (fun () -> Sampling.keepTopP 1.5 logits |> ignore) "top-p 1.5"
            use cube = torch.zeros([| 1L; 1L; 2L |])
            throwsGpt [ "[batch, vocabulary]"; "[1, 1, 2]" ] (fun () -> Sampling.greedy cube |> ignore) "3-d logits"

        testPropertyWithConfig propertyConfig "top-k keeps exactly the k largest logits, and draws stay among them"
        <| Prop.forAll logitsCase (fun (batch, vocabulary, seed) ->
            let random = Random seed
            let rows = distinctLogits random batch vocabulary
            let k = random.Next(1, vocabulary + 2)
            use logits = floatTensor rows
            use kept = Sampling.keepTopK k logits
            for row, values in Array.indexed (rowsOf kept) do
                let top = topIndices k rows[row]
                for index, value in Array.indexed values do
                    if top.Contains index then Expect.equal value rows.[row].[index] "a kept logit is unchanged"
                    else Expect.isTrue (Single.IsNegativeInfinity value) "a dropped logit is -inf"
            use generator = new torch.Generator(uint64 seed, torch.CPU)
            let temperature = 0.5 + random.NextDouble() * 2.0
            for ids in draws 20 (fun () -> Sampling.nextToken temperature (Some k) None generator logits) do
                for row, id in Array.indexed ids do
                    Expect.isTrue ((topIndices k rows[row]).Contains id) (sprintf "token %d of row %d is among the %d most likely" id row k))

        testPropertyWithConfig propertyConfig "top-p keeps exactly the smallest set reaching p, and draws stay in it"
        <| Prop.forAll logitsCase (fun (batch, vocabulary, seed) ->
            let random = Random seed
            let rows = distinctLogits random batch vocabulary
            let p = if random.Next 5 = 0 then 1.0 else 0.01 + random.NextDouble() * 0.98
            use logits = floatTensor rows
            use kept = Sampling.keepTopP p logits
            let befores = rows |> Array.map (softmax64 >> massBefore)
            for row, values in Array.indexed (rowsOf kept) do
                Expect.isGreaterThan (values |> Array.filter Single.IsFinite |> Array.length) 0 "at least one token is kept"
                for index, value in Array.indexed values do
                    let before = befores[row][index]
                    if before < p - 1e-9 then Expect.equal value rows.[row].[index] (sprintf "token %d (mass before %g < p %g) is kept" index before p)
                    elif before > p + 1e-9 then Expect.isTrue (Single.IsNegativeInfinity value) (sprintf "token %d (mass before %g >= p %g) is dropped" index before p)
            use generator = new torch.Generator(uint64 seed, torch.CPU)
            for ids in draws 20 (fun () -> Sampling.nextToken 1.0 None (Some p) generator logits) do
                for row, id in Array.indexed ids do
                    Expect.isLessThan befores.[row].[id] (p + 1e-9) (sprintf "token %d of row %d is in the nucleus of %g" id row p))

        testPropertyWithConfig propertyConfig "temperature, top-k and top-p combine: draws are in the top k and in the nucleus of what is left"
        <| Prop.forAll logitsCase (fun (batch, vocabulary, seed) ->
            let random = Random seed
            let rows = distinctLogits random batch vocabulary
            let k = random.Next(1, vocabulary + 1)
            let p = 0.05 + random.NextDouble() * 0.9
            let temperature = 0.3 + random.NextDouble() * 2.0
            use logits = floatTensor rows
            use generator = new torch.Generator(uint64 seed, torch.CPU)
            for ids in draws 10 (fun () -> Sampling.nextToken temperature (Some k) (Some p) generator logits) do
                for row, id in Array.indexed ids do
                    let top = topIndices k rows[row]
                    Expect.isTrue (top.Contains id) "within the top k"
                    let tempered = rows[row] |> Array.mapi (fun i l -> if top.Contains i then float32 (float l / temperature) else Single.NegativeInfinity)
                    let before = massBefore (softmax64 tempered)
                    Expect.isLessThan before[id] (p + 1e-6) "within the nucleus of the tempered top-k distribution")

        testPropertyWithConfig propertyConfig "temperature 0 is argmax; temperature -> 0 samples the argmax"
        <| Prop.forAll logitsCase (fun (batch, vocabulary, seed) ->
            let random = Random seed
            let rows = distinctLogits random batch vocabulary
            use logits = floatTensor rows
            let expected = rows |> Array.map (argmax >> int64)
            use generator = new torch.Generator(uint64 seed, torch.CPU)
            let topK = if random.Next 2 = 0 then Some(random.Next(1, vocabulary + 1)) else None
            let topP = if random.Next 2 = 0 then Some(0.01 + random.NextDouble() * 0.99) else None
            use greedy = Sampling.nextToken 0.0 topK topP generator logits
            Expect.equal (greedy.data<int64>().ToArray()) expected "temperature 0 = argmax"
            let temperature = Math.Pow(10.0, -4.0 - 2.0 * random.NextDouble()) // 1e-6 .. 1e-4
            use sampled = Sampling.nextToken temperature topK topP generator logits
            Expect.equal (sampled.data<int64>().ToArray()) expected (sprintf "temperature %g samples the argmax" temperature))

        testCase "the same generator seed gives the same draws" <| fun () ->
            use logits = floatTensor (distinctLogits (Random 5) 2 50)
            let run seed =
                use generator = new torch.Generator(seed, torch.CPU)
                draws 30 (fun () -> Sampling.nextToken 1.3 (Some 20) (Some 0.9) generator logits)
            Expect.equal (run 42UL) (run 42UL) "seed 42 twice"
            Expect.notEqual (run 42UL) (run 43UL) "seeds 42 and 43 (60 draws from ~15 tokens)"
    ]

// ---------------------------------------------------------------------------------------------------------------
// Generation

type private CacheCase =
    { Vocabulary: int
      Context: int
      Heads: int
      HeadSize: int
      Layers: int
      Seed: int
      PromptLengths: int list
      NewTokens: int }

let private cacheCases =
    gen {
        let! vocabulary = Gen.choose (2, 40)
        let! context = Gen.choose (1, 8)
        let! heads = Gen.choose (1, 2)
        let! headSize = Gen.choose (1, 4)
        let! layers = Gen.choose (1, 2)
        let! seed = Gen.choose (0, 1_000_000)
        let! prompts = Gen.listOfLength 3 (Gen.choose (1, 2 * context + 2)) |> Gen.map (List.truncate (1 + seed % 3))
        let! newTokens = Gen.choose (0, 2 * context + 3)
        return
            { Vocabulary = vocabulary; Context = context; Heads = heads; HeadSize = headSize; Layers = layers
              Seed = seed; PromptLengths = prompts; NewTokens = newTokens }
    }
    |> Arb.fromGen

let private randomPrompt (random: Random) (vocabulary: int) (length: int) = Array.init length (fun _ -> random.Next vocabulary)

/// Teacher-forced: a cached and an uncached window follow the same random continuation of a batch of prompts; their
/// logits agree within 1e-4 at every step, also after the window starts sliding.
let private expectWindowsAgree (language: ILanguageModel) (batch: int[][]) (case: CacheCase) (random: Random) =
    use withCache = new ContextWindow(language, batch, true)
    use without = new ContextWindow(language, batch, false)
    for step in 0 .. case.NewTokens do
        use a = withCache.NextLogits()
        use b = without.NextLogits()
        Expect.equal a.shape [| int64 batch.Length; int64 case.Vocabulary |] "logits [B, V]"
        let difference = (a - b).abs().max().item<float32> ()
        Expect.isLessThan difference 1e-4f (sprintf "step %d (sequence length %d, context %d)" step withCache.Length case.Context)
        let next = [| for _ in batch -> random.Next case.Vocabulary |]
        withCache.Append next
        without.Append next

/// next token = token + 1 (mod 10); 9 is the end-of-text token.
let private countingModel context = ScriptedModel(10, context, fun _ token -> (token + 1) % 10)

let private replayModel (promptLength: int) (script: int[]) (endOfText: int) =
    ScriptedModel(50257, promptLength + script.Length + 2, fun position _ ->
        let index = position - (promptLength - 1)
        if index >= 0 && index < script.Length then script[index] else endOfText)

let private gpt2 = lazy (Tokenizers.gpt2 ())

/// Token id sequences rich in partial UTF-8: raw byte tokens, arbitrary tokens, and pieces of multi-byte text.
let private scripts =
    let multiByte = lazy ("日本語 🎉 é ünïcödé 𝐀 Ω≈ç√ 😀👍🏽 naïve" |> gpt2.Force().Encode)
    gen {
        let! length = Gen.choose (0, 30)
        let! seed = Gen.choose (0, 1_000_000)
        let random = Random seed
        let pieces = multiByte.Force()
        return
            Array.init length (fun _ ->
                match random.Next 4 with
                | 0 -> random.Next 256
                | 1 -> random.Next 50256
                | _ -> pieces[random.Next pieces.Length])
    }
    |> Arb.fromGen

let private hasLoneSurrogate (text: string) =
    let mutable lone = false
    let mutable i = 0
    while i < text.Length do
        if Char.IsHighSurrogate text[i] && i + 1 < text.Length && Char.IsLowSurrogate text[i + 1] then i <- i + 2
        else
            if Char.IsSurrogate text[i] then lone <- true
            i <- i + 1
    lone

[<Tests>]
let generationTests =
    testList "generation" [
        testPropertyWithConfig { propertyConfig with maxTest = 200 } "greedy picks torch.argmax's token: ties (the first wins), ±0, ±infinity" <| fun (seed: int) (width: PositiveInt) (rows: PositiveInt) ->
            // The generation loop reads float32 CPU logits in place for its argmax and NaN check; this holds it to
            // libtorch's argmax on rows made of few distinct values (so ties are common), widths across the vector size.
            let vocabulary = 1 + width.Get % 70
            let batch = 1 + rows.Get % 3
            let random = Random seed
            let choices = [| Single.NegativeInfinity; -1.0f; -0.0f; 0.0f; 1.0f; 2.0f; Single.PositiveInfinity |]
            let values = Array.init (batch * vocabulary) (fun _ -> choices[random.Next(if random.Next 4 = 0 then choices.Length else choices.Length - 1)])
            use table = torch.tensor(values, ReadOnlySpan<int64> [| int64 batch; int64 vocabulary |])
            let model =
                { new ILanguageModel with
                    member _.VocabSize = vocabulary
                    member _.ContextLength = 8
                    member _.Device = torch.CPU
                    member _.Training with get () = false and set (_: bool) = ()
                    member _.Logits ids = table.unsqueeze(1L).expand(int64 batch, ids.shape[1], int64 vocabulary).contiguous()
                    member _.CreateCache _ = failwith "no cache"
                    member _.LogitsCached(_, _) = failwith "no cache" }
            let options = { GenerationOptions.defaults with MaxNewTokens = 1; EndOfTextId = None; UseKvCache = false }
            let chosen = Generator.generate model options (Array.init batch (fun _ -> [| 0 |])) |> Array.map (fun c -> c.Tokens[0])
            use expected = table.argmax(-1L)
            Expect.equal chosen (expected.data<int64>().ToArray() |> Array.map int) "torch.argmax's ids"

        testPropertyWithConfig { propertyConfig with maxTest = 40 } "cached and uncached generation agree: same greedy ids, logits within 1e-4, also past the context"
        <| Prop.forAll cacheCases (fun case ->
            let model, language = tiny case.Vocabulary case.Context (case.Heads * case.HeadSize) case.Heads case.Layers (int64 case.Seed)
            use _ = model
            let random = Random case.Seed
            let prompts = case.PromptLengths |> List.map (randomPrompt random case.Vocabulary)
            let options = greedyOptions case.NewTokens
            let cached = Generator.generate language options prompts
            let uncached = Generator.generate language { options with UseKvCache = false } prompts
            Expect.equal cached uncached "greedy completions with and without the cache"
            for completion in cached do
                Expect.equal completion.Tokens.Length case.NewTokens "no end-of-text: every prompt gets all new tokens"
            // Teacher-forced: both windows follow the same random continuation; compare logits at every step.
            let length = List.head case.PromptLengths
            let batch = [| for _ in 1 .. 2 -> randomPrompt random case.Vocabulary length |]
            expectWindowsAgree language batch case random)

        testCase "the cache feeds one token per step until the window is full, then the whole window" <| fun () ->
            let cached = countingModel 5
            Generator.generate cached (greedyOptions 6) [ [| 1; 2 |] ] |> ignore
            Expect.equal cached.Fed [ 2; 1; 1; 1; 5; 5 ] "prefill 2, then 1 per step, then re-prefill 5 once the window slides"
            let uncached = countingModel 5
            Generator.generate uncached { greedyOptions 6 with UseKvCache = false } [ [| 1; 2 |] ] |> ignore
            Expect.equal uncached.Fed [ 2; 3; 4; 5; 5; 5 ] "without the cache the window is recomputed"

        testCase "the end-of-text token stops each prompt on its own and is not part of the output" <| fun () ->
            let prompts = [ [| 5 |]; [| 0; 1 |]; [| 8 |]; [| 3; 4; 5; 6; 7; 2 |]; [| 1 |] ]
            let options = { GenerationOptions.defaults with MaxNewTokens = 6; EndOfTextId = Some 9 }
            for useCache in [ true; false ] do
                let completions = Generator.generate (countingModel 6) { options with UseKvCache = useCache } prompts
                let expected =
                    [| { Tokens = [| 6; 7; 8 |]; StopReason = StopReason.EndOfText }
                       { Tokens = [| 2; 3; 4; 5; 6; 7 |]; StopReason = StopReason.MaxNewTokens }
                       { Tokens = [||]; StopReason = StopReason.EndOfText }
                       { Tokens = [| 3; 4; 5; 6; 7; 8 |]; StopReason = StopReason.MaxNewTokens }
                       { Tokens = [| 2; 3; 4; 5; 6; 7 |]; StopReason = StopReason.MaxNewTokens } |]
                Expect.equal completions expected (sprintf "each prompt stops on its own (cache %b)" useCache)
                let alone = prompts |> List.map (fun prompt -> (Generator.generate (countingModel 6) options [ prompt ])[0]) |> Array.ofList
                Expect.equal completions alone "the same as one prompt at a time"
            let noStop = Generator.generate (countingModel 6) { options with EndOfTextId = None } [ [| 8 |] ]
            Expect.equal noStop[0].Tokens [| 9; 0; 1; 2; 3; 4 |] "with no end-of-text id, 9 is an ordinary token"
            let streamed = Generator.tokens (countingModel 6) options [| 5 |] |> List.ofSeq
            Expect.equal streamed [ 6; 7; 8 ] "the token stream stops before the end-of-text token"

        testCase "a batch of prompts gives each prompt's own result, greedy and sampled" <| fun () ->
            let model, language = tiny 30 8 16 2 2 7L
            use _ = model
            let random = Random 3
            let prompts = [ 3; 5; 3; 1; 12; 5; 20 ] |> List.map (randomPrompt random 30)
            for options in [ greedyOptions 12; { greedyOptions 12 with Temperature = 1.0; TopK = Some 10; Seed = Some 77L } ] do
                let batch = Generator.generate language options prompts
                prompts |> List.iteri (fun index prompt ->
                    let alone = Generator.generate language { options with Seed = options.Seed |> Option.map (fun seed -> seed + int64 index) } [ prompt ]
                    Expect.equal batch[index] alone[0] (sprintf "prompt %d (length %d) alone, temperature %g" index prompt.Length options.Temperature))

        testCase "generations on one model run in parallel, each with its own generator" <| fun () ->
            let model, language = tiny 30 8 16 2 1 23L
            use _ = model
            let run seed = Generator.generate language { greedyOptions 12 with Temperature = 1.0; Seed = Some seed } [ [| 1; 2 |]; [| 3 |] ]
            let sequential = [| 0L .. 5L |] |> Array.map run
            let concurrent = [| 0L .. 5L |] |> Array.Parallel.map run
            Expect.equal concurrent sequential "parallel runs = sequential runs"

        testCase "the module adapter runs its own cache and refuses another kind" <| fun () ->
            let model, language = tiny 10 4 8 2 1 1L
            use _ = model
            use ids = torch.zeros([| 1L; 1L |], dtype = torch.int64)
            throwsGpt [ "was not made by it"; "ScriptedCache" ] (fun () -> language.LogitsCached(ids, new ScriptedCache()) |> ignore) "a foreign cache"
            use cache = language.CreateCache 1
            use logits = language.LogitsCached(ids, cache)
            Expect.equal logits.shape [| 1L; 1L; 10L |] "logits [1, 1, V]"
            Expect.equal cache.Length 1 "the cache holds one token"

        testCase "a prompt longer than the context is cropped to its last ContextLength tokens" <| fun () ->
            let model, language = tiny 25 6 8 2 1 11L
            use _ = model
            let prompt = randomPrompt (Random 9) 25 20
            for useCache in [ true; false ] do
                let options = { greedyOptions 10 with UseKvCache = useCache }
                let full = Generator.generate language options [ prompt ]
                let cropped = Generator.generate language options [ prompt[14..] ]
                Expect.equal full cropped (sprintf "same continuation (cache %b)" useCache)

        testCase "temperature -> 0 generates the greedy text" <| fun () ->
            let model, language = tiny 30 8 16 2 2 21L
            use _ = model
            let prompts = [ [| 1; 2; 3 |]; [| 4 |] ]
            let greedy = Generator.generate language (greedyOptions 20) prompts
            let cold = Generator.generate language { greedyOptions 20 with Temperature = 1e-6; Seed = Some 5L } prompts
            Expect.equal cold greedy "temperature 1e-6"

        testCase "same seed, same ids; without a seed, generation still runs" <| fun () ->
            let model, language = tiny 40 8 16 2 1 5L
            use _ = model
            let options = { greedyOptions 16 with Temperature = 1.2; TopP = Some 0.95; Seed = Some 123L }
            let first = Generator.generate language options [ [| 1; 2 |]; [| 3 |] ]
            let second = Generator.generate language options [ [| 1; 2 |]; [| 3 |] ]
            Expect.equal first second "seed 123 twice"
            let uncached = Generator.generate language { options with UseKvCache = false } [ [| 1; 2 |]; [| 3 |] ]
            Expect.equal uncached first "seed 123 without the cache"
            let unseeded = Generator.generate language { options with Seed = None } [ [| 1; 2 |] ]
            Expect.equal unseeded[0].Tokens.Length 16 "unseeded run"

        testCase "different seeds give different samples in the overwhelming majority of pairs" <| fun () ->
            let model, language = tiny 32 8 16 2 1 8L
            use _ = model
            // 40 copies of one prompt: copy i samples with seed 1000 + i.
            let options = { greedyOptions 12 with Temperature = 1.0; Seed = Some 1000L }
            let samples = Generator.generate language options (List.replicate 40 [| 1; 2; 3 |]) |> Array.map (fun c -> c.Tokens)
            let distinct = samples |> Array.distinct |> Array.length
            Expect.isGreaterThanOrEqual distinct 38 "at least 38 of 40 seeds give distinct 12-token samples"
            let again = Generator.generate language { options with Seed = Some 1005L } [ [| 1; 2; 3 |] ]
            Expect.equal again[0].Tokens samples[5] "seed 1005 alone reproduces copy 5"

        testCase "over many seeds, first tokens follow the softmax probabilities (chi-square)" <| fun () ->
            let model, language = tiny 8 8 16 2 1 13L
            use _ = model
            let prompt = [| 1; 2; 3 |]
            let logits =
                use window = new ContextWindow(language, [| prompt |], true)
                use next = window.NextLogits()
                (rowsOf next)[0]
            let seeds = 3000
            for temperature, topK, topP in [ 1.0, None, None; 0.7, Some 5, Some 0.9 ] do
                let expected =
                    use tensor = floatTensor [| logits |]
                    use filtered = Sampling.filter temperature topK topP tensor
                    softmax64 (rowsOf filtered).[0]
                let options = { greedyOptions 1 with Temperature = temperature; TopK = topK; TopP = topP; Seed = Some 99L }
                let counts = Array.zeroCreate 8
                for completion in Generator.generate language options (List.replicate seeds prompt) do
                    counts[completion.Tokens[0]] <- counts[completion.Tokens[0]] + 1
                let mutable chiSquare = 0.0
                for token in 0 .. 7 do
                    let e = expected[token] * float seeds
                    if e = 0.0 then Expect.equal counts[token] 0 (sprintf "token %d has probability 0 and is never drawn" token)
                    else chiSquare <- chiSquare + (float counts[token] - e) ** 2.0 / e
                // At most 7 degrees of freedom: P(chi-square > 30) < 1e-4 when the draws follow the distribution.
                Expect.isLessThan chiSquare 30.0 (sprintf "chi-square %.2f, counts %A, expected %A (T %g, k %A, p %A)" chiSquare counts expected temperature topK topP)

        testPropertyWithConfig { propertyConfig with maxTest = 60 } "stream pieces are whole characters and concatenate to the decoded text"
        <| Prop.forAll scripts (fun script ->
            let tokenizer = gpt2.Force()
            let prompt = "Hi"
            let promptLength = (tokenizer.Encode prompt).Length
            let withEnd = Array.append script [| 50256; 15496 |] // text after the end-of-text token never appears
            let options = { GenerationOptions.defaults with MaxNewTokens = withEnd.Length }
            let expected = tokenizer.Decode script
            let pieces = Generator.streamText (replayModel promptLength withEnd 50256) tokenizer options prompt |> List.ofSeq
            Expect.equal (String.concat "" pieces) expected "pieces concatenate to the decoded text"
            for piece in pieces do
                Expect.isFalse (hasLoneSurrogate piece) "no piece ends or starts inside a surrogate pair"
                Expect.isGreaterThan piece.Length 0 "no empty pieces"
            if not (expected.Contains '\uFFFD') then
                for piece in pieces do
                    Expect.isFalse (piece.Contains '\uFFFD') "valid UTF-8 is never split into replacement characters"
            let text = Generator.generateText (replayModel promptLength withEnd 50256) tokenizer options prompt
            Expect.equal text expected "generateText"
            let received = ResizeArray<string>()
            let returned = Generator.streamTextTo (replayModel promptLength withEnd 50256) tokenizer options prompt received.Add
            Expect.equal (List.ofSeq received) pieces "the callback gets the same pieces"
            Expect.equal returned expected "streamTextTo returns the whole text")

        testCase "streaming is lazy: a piece is out before the next token is computed" <| fun () ->
            let tokenizer = gpt2.Force()
            let script = tokenizer.Encode " and so the story goes on and on"
            let model = replayModel 1 script 50256
            let first = Generator.streamText model tokenizer { GenerationOptions.defaults with MaxNewTokens = 50 } "Hi" |> Seq.head
            Expect.equal first " and" "first piece"
            Expect.equal model.Fed [ 1 ] "only the prompt went through the model"

        testCase "generateTexts decodes each prompt's completion" <| fun () ->
            let tokenizer = gpt2.Force()
            let script = tokenizer.Encode " world"
            let texts = Generator.generateTexts (replayModel 1 script 50256) tokenizer { GenerationOptions.defaults with MaxNewTokens = 10 } [ "Hello"; "Hi" ]
            Expect.equal texts [| " world"; " world" |] "both prompts"

        testCase "generation runs in evaluation mode and restores training mode" <| fun () ->
            use model = new TinyModel(30, 8, 16, 2, 1, 0.5, 17L)
            let language = tinyLanguageModel model
            model.eval ()
            let inEval = Generator.generate language (greedyOptions 12) [ [| 1; 2; 3 |] ]
            model.train ()
            let inTraining = Generator.generate language (greedyOptions 12) [ [| 1; 2; 3 |] ]
            Expect.equal inTraining inEval "dropout is off during generation"
            Expect.isTrue model.training "training mode is restored"
            model.eval ()
            Generator.generate language (greedyOptions 3) [ [| 1 |] ] |> ignore
            Expect.isFalse model.training "evaluation mode stays"

        testCase "no tensor outlives a generation call" <| fun () ->
            let model, language = tiny 30 6 16 2 2 19L
            use _ = model
            let run () =
                Generator.generate language { greedyOptions 14 with Temperature = 0.9; TopK = Some 8; TopP = Some 0.9; Seed = Some 1L } [ [| 1; 2 |]; [| 3 |]; [| 4; 5 |] ] |> ignore
                Generator.generate language { greedyOptions 14 with UseKvCache = false } [ [| 1; 2 |] ] |> ignore
                Generator.tokens language (greedyOptions 14) [| 1; 2 |] |> Seq.truncate 3 |> List.ofSeq |> ignore
                Generator.tokens language (greedyOptions 14) [| 1; 2 |] |> List.ofSeq |> ignore
            run ()
            let before = liveTensors ()
            run ()
            Expect.equal (liveTensors ()) before "live tensors before and after"

        testCase "settings and prompts are checked with clear messages" <| fun () ->
            let model, language = tiny 30 6 16 2 1 1L
            use _ = model
            let generate options prompts = fun () -> Generator.generate language options prompts |> ignore
            throwsGpt [ "prompt 1 is empty" ] (generate (greedyOptions 3) [ [| 1 |]; [||] ]) "empty prompt"
            throwsGpt [ "prompt 0"; "token id 30"; "(0..29)" ] (generate (greedyOptions 3) [ [| 30 |] ]) "id outside the vocabulary"
            throwsGpt [ "end-of-text id 50256"; "(0..29)" ] (generate { greedyOptions 3 with EndOfTextId = Some 50256 } [ [| 1 |] ]) "end-of-text outside the vocabulary"
            throwsGpt [ "new tokens"; "found -1" ] (generate (greedyOptions -1) [ [| 1 |] ]) "negative length"
            throwsGpt [ "top-k"; "found 0" ] (generate { greedyOptions 3 with Temperature = 1.0; TopK = Some 0 } [ [| 1 |] ]) "top-k 0"
            throwsGpt [ "prompt 0 is empty" ] (fun () -> Generator.streamText language (Tokenizers.simple "a b") (greedyOptions 3) "" |> ignore) "empty text prompt, checked before streaming starts"
            Expect.equal (Generator.generate language (greedyOptions 0) [ [| 1 |] ]) [| { Tokens = [||]; StopReason = StopReason.MaxNewTokens } |] "0 new tokens"
            Expect.equal (Generator.generate language (greedyOptions 3) []) [||] "no prompts"

        testCase "measureTokensPerSecond generates the requested tokens" <| fun () ->
            let model, language = tiny 30 8 16 2 1 2L
            use _ = model
            for useCache in [ true; false ] do
                let result = Gpt.Bench.GenerationBench.measureTokensPerSecond language 4 10 useCache 3
                Expect.equal result.NewTokens 10 "10 new tokens (past the context of 8)"
                Expect.equal result.RunTokensPerSecond.Length 3 "three runs"
                Expect.contains result.RunTokensPerSecond result.TokensPerSecond "the figure is one of the runs (the median)"
                Expect.equal result.PromptTokens 4 "4 prompt tokens"
                Expect.equal result.UsedKvCache useCache "cache flag"
                Expect.isGreaterThan result.TokensPerSecond 0.0 "a positive rate"
                Expect.isGreaterThanOrEqual result.Seconds result.FirstTokenSeconds "first token within the total"
            throwsGpt [ "at least 1 run, found 0" ] (fun () -> Gpt.Bench.GenerationBench.measureTokensPerSecond language 4 10 true 0 |> ignore) "runs"

        testCase "compareKvCache pairs runs with and without the cache" <| fun () ->
            let model, language = tiny 30 8 16 2 1 2L
            use _ = model
            let cached, uncached, speedup = Gpt.Bench.GenerationBench.compareKvCache language 4 10 3
            Expect.isTrue cached.UsedKvCache "first: with the cache"
            Expect.isFalse uncached.UsedKvCache "second: without"
            Expect.equal (cached.RunTokensPerSecond.Length, uncached.RunTokensPerSecond.Length) (3, 3) "three runs each"
            Expect.equal (cached.NewTokens, uncached.NewTokens) (10, 10) "10 new tokens each"
            Expect.floatClose Accuracy.high speedup (cached.TokensPerSecond / uncached.TokensPerSecond) "the ratio of the medians"
    ]

[<Tests>]
let globalSeedTests =
    testSequenced
    <| testList "generation and the global seed" [
        testCase "seeded sampling leaves the global torch generator alone" <| fun () ->
            let model, language = tiny 30 8 16 2 1 3L
            use _ = model
            use before = torch.get_rng_state ()
            Generator.generate language { greedyOptions 10 with Temperature = 1.0; Seed = Some 4L } [ [| 1 |]; [| 2; 3 |] ] |> ignore
            use after = torch.get_rng_state ()
            Expect.equal (after.data<byte>().ToArray()) (before.data<byte>().ToArray()) "global generator state unchanged"
    ]

// ---------------------------------------------------------------------------------------------------------------
// The real GPT model through LanguageModel.ofGpt

[<Tests>]
let gptModelTests =
    testList "generation with GptModel" [
        testPropertyWithConfig { propertyConfig with maxTest = 25 } "GptModel: cached and uncached generation agree, also past the context"
        <| Prop.forAll cacheCases (fun case ->
            let config =
                { Gpt.Model.GptConfig.gpt2Small with
                    VocabSize = case.Vocabulary; ContextLength = case.Context; EmbeddingDim = case.Heads * case.HeadSize * 2
                    Heads = case.Heads; Layers = case.Layers; QkvBias = case.Seed % 2 = 0; TiedHead = case.Seed % 3 <> 0 }
            use model = new Gpt.Model.GptModel(config, int64 case.Seed)
            model.eval () // ContextWindow is used directly below: without eval, dropout (0.1) would differ per call
            let language = LanguageModel.ofGpt model
            let random = Random case.Seed
            let prompts = case.PromptLengths |> List.map (randomPrompt random case.Vocabulary)
            let options = greedyOptions case.NewTokens
            let cached = Generator.generate language options prompts
            let uncached = Generator.generate language { options with UseKvCache = false } prompts
            Expect.equal cached uncached "greedy completions with and without the cache"
            let batch = [| for _ in 1 .. 2 -> randomPrompt random case.Vocabulary (List.head case.PromptLengths) |]
            expectWindowsAgree language batch case random)

        testCase "the reference's greedy continuation, with and without the cache" <| fun () ->
            use model = Gpt.Weights.Pretrained.load (fixture "tiny-gpt2")
            use reference = Gpt.Weights.Safetensors.read (fixture "tiny-gpt2/reference.safetensors") |> fun m -> m["greedy_ids"]
            let expected = reference.data<int64>().ToArray() |> Array.map int
            let prompt = expected[.. 4]
            for useCache in [ true; false ] do
                let options = { greedyOptions (expected.Length - prompt.Length) with UseKvCache = useCache }
                let completion = (Generator.generate (LanguageModel.ofGpt model) options [ prompt ])[0]
                Expect.equal (Array.append prompt completion.Tokens) expected (sprintf "greedy ids (cache %b)" useCache)

        testCase "GptModel: seeded sampling is the same with and without the cache; streaming equals the text" <| fun () ->
            use model = Gpt.Weights.Pretrained.load (fixture "tiny-gpt2")
            let language = LanguageModel.ofGpt model
            let options = { GenerationOptions.defaults with MaxNewTokens = 30; Temperature = 1.0; TopK = Some 500; Seed = Some 11L; EndOfTextId = None }
            let gpt2 = Tokenizers.gpt2 ()
            let text = Generator.generateText language gpt2 options "Hello, world"
            Expect.equal (Generator.generateText language gpt2 { options with UseKvCache = false } "Hello, world") text "same sample without the cache"
            Expect.equal (String.concat "" (Generator.streamText language gpt2 options "Hello, world")) text "stream pieces concatenate to the text"
    ]
