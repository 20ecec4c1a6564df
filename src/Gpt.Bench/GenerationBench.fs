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
      TensorsPerToken: float }

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

    /// Warm-up: a process's first few dozen tokens are slower (51 ms instead of 29 for gpt2-small's first 10 here),
    /// so a couple of tokens are not enough to measure the steady state.
    let private warmUp (model: ILanguageModel) (options: GenerationOptions) (prompt: int[]) =
        Generator.generate model { options with MaxNewTokens = min 32 options.MaxNewTokens } [ prompt ] |> ignore

    /// One timed generation through Generator.tokens: tokens generated, seconds to the first, seconds in all, tensor
    /// handles made.
    let private timedRun (model: ILanguageModel) (options: GenerationOptions) (prompt: int[]) =
        let statistics = DisposeScopeManager.Statistics
        let created () = statistics.CreatedInScopeCount + statistics.CreatedOutsideScopeCount
        let tensorsBefore = created ()
        let clock = Stopwatch.StartNew()
        use tokens = (Generator.tokens model options prompt).GetEnumerator()
        let first = if tokens.MoveNext() then clock.Elapsed.TotalSeconds else nan
        let mutable count = if Double.IsNaN first then 0 else 1
        while tokens.MoveNext() do
            count <- count + 1
        let seconds = clock.Elapsed.TotalSeconds
        count, first, seconds, float (created () - tensorsBefore)

    /// The median of timed runs (by time; for an even count, the faster of the middle two).
    let private summarise (promptTokens: int) (newTokens: int) (useKvCache: bool) (timed: (int * float * float * float)[]) =
        let ordered = timed |> Array.sortBy (fun (_, _, seconds, _) -> seconds)
        let generated, first, seconds, tensors = ordered[(timed.Length - 1) / 2]
        { PromptTokens = promptTokens
          NewTokens = generated
          UsedKvCache = useKvCache
          FirstTokenSeconds = first
          Seconds = seconds
          TokensPerSecond = float newTokens / seconds
          RunTokensPerSecond = timed |> Array.map (fun (_, _, s, _) -> float newTokens / s)
          TensorsPerToken = tensors / float newTokens }

    /// Greedy generation of newTokens tokens (no end-of-text stop) after a fixed prompt of promptTokens tokens,
    /// timed `runs` times after a warm-up run of up to 32 tokens; the result is the median run. For
    /// `gpt bench generate`; the caller chooses the model and the sizes.
    let measureTokensPerSecond (model: ILanguageModel) (promptTokens: int) (newTokens: int) (useKvCache: bool) (runs: int) : Throughput =
        let prompt, options = benchmarkSetup model promptTokens newTokens runs
        let options = { options with UseKvCache = useKvCache }
        warmUp model options prompt
        Array.init runs (fun _ -> timedRun model options prompt) |> summarise promptTokens newTokens useKvCache

    /// The KV cache's speed-up, measured as a paired comparison: `runs` runs with the cache and `runs` without,
    /// alternating, so that both see the same machine (this one's speed drifts by ±10% over minutes). Returns the
    /// median with the cache, the median without, and their ratio.
    let compareKvCache (model: ILanguageModel) (promptTokens: int) (newTokens: int) (runs: int) : Throughput * Throughput * float =
        let prompt, options = benchmarkSetup model promptTokens newTokens runs
        let cached, uncached = { options with UseKvCache = true }, { options with UseKvCache = false }
        warmUp model cached prompt
        warmUp model uncached prompt
        let pairs = Array.init runs (fun _ -> timedRun model cached prompt, timedRun model uncached prompt)
        let withCache = pairs |> Array.map fst |> summarise promptTokens newTokens true
        let withoutCache = pairs |> Array.map snd |> summarise promptTokens newTokens false
        withCache, withoutCache, withCache.TokensPerSecond / withoutCache.TokensPerSecond

    /// The model a generation benchmark runs: any model source (ModelSource.load: a folder, a file, a Hugging Face id),
    /// or (None) a freshly initialised gpt2-small with random weights (seed 1, tied head). The caller disposes it.
    let loadModel (source: string option) : Gpt.Model.GptModel =
        match source with
        | Some source -> Gpt.Weights.ModelSource.load source
        | None -> new Gpt.Model.GptModel(Gpt.Model.GptConfig.gpt2Small, 1L)
