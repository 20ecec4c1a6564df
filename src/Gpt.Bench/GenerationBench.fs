namespace Gpt.Bench

open System
open System.Diagnostics
open TorchSharp
open Gpt
open Gpt.Generation

/// Generation speed, for `gpt bench generate`.
type Throughput =
    { PromptTokens: int
      NewTokens: int
      UsedKvCache: bool
      /// Time to the first new token (includes processing the prompt).
      FirstTokenSeconds: float
      /// Time for all new tokens (the median run's).
      Seconds: float
      /// NewTokens / Seconds: the median of the runs.
      TokensPerSecond: float
      /// Tokens per second of each timed run, in order.
      RunTokensPerSecond: float[]
      /// Tensor handles created per new token (the median run's): each is a .NET ↔ libtorch crossing.
      TensorsPerToken: float
      /// Sequences generated together (the figures above count the tokens of all of them).
      BatchSize: int
      /// Tokens after the first over the time after the first (the median run's): decoding alone, without the prompt.
      DecodeTokensPerSecond: float
      /// The greedy ids the first sequence got (the median run's), to check against another implementation.
      Ids: int[] }

/// Generation speed: greedy tokens per second, time to the first token, tensor handles per token.
[<RequireQualifiedAccess>]
module GenerationBench =
    /// The benchmark's greedy options and fixed prompt; checks the sizes.
    let private benchmarkSetup (model: ILanguageModel) (promptTokens: int) (newTokens: int) (runs: int) =
        if promptTokens < 1 then Errors.fail "the benchmark prompt needs at least 1 token, found %d" promptTokens
        if newTokens < 1 then Errors.fail "the benchmark needs at least 1 new token, found %d" newTokens
        if runs < 1 then Errors.fail "the benchmark needs at least 1 run, found %d" runs
        let prompt = Array.init promptTokens (fun i -> (i * 7919 + 13) % model.VocabSize)
        let options = { GenerationOptions.defaults with MaxNewTokens = newTokens; EndOfTextId = None }
        prompt, options

    // Warm-up: a process's first few dozen tokens are slower (51 ms instead of 29 for gpt2-small's first 10 here), so
    // a couple of tokens are not enough to measure the steady state; each measurement first runs up to 32 tokens.

    /// One timed greedy generation of a batch of prompts through a ContextWindow (the generation loop, without the
    /// stops): tokens generated per sequence, seconds to the first, seconds in all, tensor handles made.
    let private timedRun (model: ILanguageModel) (options: GenerationOptions) (prompts: int[][]) =
        let statistics = DisposeScopeManager.Statistics
        let created () = statistics.CreatedInScopeCount + statistics.CreatedOutsideScopeCount
        let wasTraining = model.Training
        model.Training <- false
        try
            let tensorsBefore = created ()
            let clock = Stopwatch.StartNew()
            use window = new ContextWindow(model, prompts, options.UseKvCache)
            let mutable first = nan
            let ids = ResizeArray<int>(options.MaxNewTokens)
            for step in 1 .. options.MaxNewTokens do
                use scope = torch.NewDisposeScope()
                let logits = window.NextLogits()
                let chosen = (Sampling.greedy logits).data<int64>().ToArray() |> Array.map int
                if step = 1 then first <- clock.Elapsed.TotalSeconds
                ids.Add chosen[0]
                if step < options.MaxNewTokens then window.Append chosen
            let seconds = clock.Elapsed.TotalSeconds
            options.MaxNewTokens, first, seconds, float (created () - tensorsBefore), ids.ToArray()
        finally
            if wasTraining then model.Training <- true

    /// The median of timed runs (by time; for an even count, the faster of the middle two).
    let private summarise (promptTokens: int) (newTokens: int) (useKvCache: bool) (batch: int) (timed: (int * float * float * float * int[])[]) =
        let ordered = timed |> Array.sortBy (fun (_, _, seconds, _, _) -> seconds)
        let generated, first, seconds, tensors, ids = ordered[(timed.Length - 1) / 2]
        let tokens = float (newTokens * batch)
        { PromptTokens = promptTokens
          NewTokens = generated
          UsedKvCache = useKvCache
          FirstTokenSeconds = first
          Seconds = seconds
          TokensPerSecond = tokens / seconds
          RunTokensPerSecond = timed |> Array.map (fun (_, _, s, _, _) -> tokens / s)
          TensorsPerToken = tensors / tokens
          BatchSize = batch
          DecodeTokensPerSecond = if newTokens > 1 then float ((newTokens - 1) * batch) / (seconds - first) else nan
          Ids = ids }

    /// Prompts of a batch: different ids, the same length (a batch shares every position).
    let private prompts (model: ILanguageModel) (prompt: int[]) (batch: int) =
        Array.init batch (fun row -> prompt |> Array.mapi (fun i id -> if row = 0 then id else (id + row * (31 + i)) % model.VocabSize))

    /// Greedy generation of newTokens tokens (no end-of-text stop) for `batch` prompts of promptTokens tokens each,
    /// timed `runs` times after a warm-up run of up to 32 tokens; the result is the median run. For
    /// `gpt bench generate`; the caller chooses the model and the sizes.
    let measureBatch (model: ILanguageModel) (promptTokens: int) (newTokens: int) (useKvCache: bool) (batch: int) (runs: int) : Throughput =
        if batch < 1 then Errors.fail "the benchmark batch needs at least 1 sequence, found %d" batch
        let prompt, options = benchmarkSetup model promptTokens newTokens runs
        let options = { options with UseKvCache = useKvCache }
        let batchPrompts = prompts model prompt batch
        timedRun model { options with MaxNewTokens = min 32 newTokens } batchPrompts |> ignore // warm-up
        Array.init runs (fun _ -> timedRun model options batchPrompts) |> summarise promptTokens newTokens useKvCache batch

    /// measureBatch for one prompt.
    let measureTokensPerSecond (model: ILanguageModel) (promptTokens: int) (newTokens: int) (useKvCache: bool) (runs: int) : Throughput =
        measureBatch model promptTokens newTokens useKvCache 1 runs

    /// The KV cache's speed-up, measured as a paired comparison: `runs` runs with the cache and `runs` without,
    /// alternating, so that both see the same machine (this one's speed drifts by ±10% over minutes). Returns the
    /// median with the cache, the median without, and their ratio.
    let compareKvCache (model: ILanguageModel) (promptTokens: int) (newTokens: int) (runs: int) : Throughput * Throughput * float =
        let prompt, options = benchmarkSetup model promptTokens newTokens runs
        let cached, uncached = { options with UseKvCache = true }, { options with UseKvCache = false }
        let single = [| prompt |]
        timedRun model { cached with MaxNewTokens = min 32 newTokens } single |> ignore
        timedRun model { uncached with MaxNewTokens = min 32 newTokens } single |> ignore
        let pairs = Array.init runs (fun _ -> timedRun model cached single, timedRun model uncached single)
        let withCache = pairs |> Array.map fst |> summarise promptTokens newTokens true 1
        let withoutCache = pairs |> Array.map snd |> summarise promptTokens newTokens false 1
        withCache, withoutCache, withCache.TokensPerSecond / withoutCache.TokensPerSecond

    /// Bytes of weights one decoding step reads in `dtype`: every matrix of the blocks and the head once (the
    /// embedding row, biases and LayerNorms are noise). A step serves every sequence of a batch.
    let bytesPerStep (config: Gpt.Model.GptConfig) (dtype: Gpt.Kernels.Dtype) : int64 =
        let embedding = int64 config.EmbeddingDim
        (12L * embedding * embedding * int64 config.Layers + int64 config.VocabSize * embedding) * int64 dtype.Bytes

    /// The language model `gpt bench generate` runs: the decoder in `dtype` (f32: LanguageModel.ofGpt, reading the
    /// model's own weights; f16/bf16: a copy), or (torch = true) the TorchSharp path alone, for comparison.
    let languageModel (model: Gpt.Model.GptModel) (dtype: Gpt.Kernels.Dtype) (torchPath: bool) : ILanguageModel =
        match dtype, torchPath with
        | Gpt.Kernels.Dtype.Float32, false -> LanguageModel.ofGpt model
        | Gpt.Kernels.Dtype.Float32, true -> LanguageModel.ofGptTorch model
        | _, false -> LanguageModel.ofGptIn dtype model
        | _, true -> Errors.fail "the TorchSharp path runs float32 weights only, found --dtype %s" dtype.Name

    /// The model a generation benchmark runs: any model source (ModelSource.load: a folder, a file, a Hugging Face id),
    /// or (None) a freshly initialised gpt2-small with random weights (seed 1, tied head). The caller disposes it.
    let loadModel (source: string option) : Gpt.Model.GptModel =
        match source with
        | Some source -> Gpt.Weights.ModelSource.load source
        | None -> new Gpt.Model.GptModel(Gpt.Model.GptConfig.gpt2Small, 1L)
