namespace Gpt.Bench

open System
open System.Diagnostics
open TorchSharp
open Gpt
open Gpt.Generation
open Gpt.Model
open Gpt.Training

/// Whether memory stays flat over a long run: live tensor handles and resident memory over many training steps of
/// a small model, with KV-cache generation and evaluation in between (everything a training run does).
[<RequireQualifiedAccess>]
module LeakBench =
    /// The small model: GPT-2's layout at toy size (1,000 tokens, context 64, 64 dims, 4 heads, 2 layers, dropout
    /// 0.1, no QKV bias, separate head), batches of 4 × 64.
    let config =
        { VocabSize = 1000; ContextLength = 64; EmbeddingDim = 64; Heads = 4; Layers = 2; DropRate = 0.1
          QkvBias = false; TiedHead = false; LayerNormEpsilon = 1e-5 }

    let batchSize = 4

    /// Generate (with the KV cache) every this many steps.
    let generationInterval = 10

    /// Evaluate (eval mode, no gradients) every this many steps.
    let evaluationInterval = 50

    type LeakResult =
        { Steps: int
          WarmupSteps: int
          /// Resident memory after the warm-up and at the end, after a full garbage collection, in MB.
          RssAfterWarmupMb: float
          RssEndMb: float
          /// (end - after warm-up) / after warm-up, in percent. Includes the one-time settling of the allocator after the
          /// warm-up (measured: 217 -> 257 MB by step 500, then 258.5 MB at step 2,000), so it is not a leak figure.
          RssGrowthPct: float
          /// The step the slope is measured from: a quarter of the steps (N, with the slope up to 4N = Steps), not
          /// before the warm-up ends.
          SlopeStartStep: int
          /// Resident memory at SlopeStartStep, after a full garbage collection, in MB.
          RssAtSlopeStartMb: float
          /// (end - at step N) / at step N, in percent, from step N to step 4N: what keeps growing after the settling.
          /// A leak grows in proportion to the steps; settling does not.
          RssSlopePct: float
          /// Live tensor handles of this thread (TorchSharp's DisposeScopeManager statistics).
          LiveTensorsAfterWarmup: int64
          LiveTensorsEnd: int64
          LiveTensorsGrowth: int64
          /// Largest number of live tensor handles seen between two steps after the warm-up.
          LiveTensorsMax: int64
          Generations: int
          Evaluations: int
          Seconds: float }

    /// Resident memory once the garbage collector has run the finalizers of unreachable handles.
    let private settledRssMb () =
        GC.Collect()
        GC.WaitForPendingFinalizers()
        GC.Collect()
        Measure.rssMb ()

    /// Trains the small model for `steps` steps (random tokens, AdamW), generating 8 tokens through the KV cache every
    /// generationInterval steps and evaluating every evaluationInterval steps; compares live tensors and resident
    /// memory after `warmup` steps with the end, and resident memory at step N = steps / 4 (at least the warm-up) with
    /// step 4N = steps: the slope, which separates a leak from the allocator settling once.
    let run (steps: int) (warmup: int) (seed: int) : LeakResult =
        Errors.require (warmup >= 1) "warm-up steps must be at least 1, found %d" warmup
        Errors.require (steps > warmup) "steps (%d) must be more than the warm-up steps (%d)" steps warmup
        let clock = Stopwatch.StartNew()
        use model = new GptModel(config, int64 seed)
        use optimizer = Optimizer.adamW Optimizer.defaults model
        let language = LanguageModel.ofGpt model
        let random = Random(seed)
        let length = config.ContextLength
        let batch () =
            Array.init (batchSize * length) (fun _ -> int64 (random.Next config.VocabSize)),
            Array.init (batchSize * length) (fun _ -> int64 (random.Next config.VocabSize))
        let generationOptions =
            { GenerationOptions.defaults with MaxNewTokens = 8; Temperature = 0.8; TopK = Some 50; Seed = Some(int64 seed); EndOfTextId = None }
        let live () = DisposeScopeManager.Statistics.ThreadTotalLiveCount
        let mutable generations = 0
        let mutable evaluations = 0
        let mutable rssAfterWarmup = nan
        let slopeStart = max warmup (steps / 4)
        let mutable rssAtSlopeStart = nan
        let mutable liveAfterWarmup = 0L
        let mutable liveMax = 0L
        model.train ()
        for index in 1 .. steps do
            TrainBench.step model optimizer (Some 1.0) batchSize length (batch ()) |> ignore
            if index % generationInterval = 0 then
                let prompt = Array.init 5 (fun _ -> random.Next config.VocabSize)
                Generator.generate language generationOptions [ prompt ] |> ignore
                generations <- generations + 1
            if index % evaluationInterval = 0 then
                use _ = torch.no_grad ()
                use scope = torch.NewDisposeScope()
                model.eval ()
                let inputs, targets = batch ()
                let shape = [| int64 batchSize; int64 length |]
                let loss = Loss.batch model (torch.tensor(inputs, ReadOnlySpan shape)) (torch.tensor(targets, ReadOnlySpan shape))
                loss.item<float32> () |> ignore
                model.train ()
                evaluations <- evaluations + 1
            if index = warmup then
                rssAfterWarmup <- settledRssMb ()
                liveAfterWarmup <- live ()
            if index = slopeStart then rssAtSlopeStart <- settledRssMb ()
            if index >= warmup then liveMax <- max liveMax (live ())
        let rssEnd = settledRssMb ()
        let liveEnd = live ()
        { Steps = steps
          WarmupSteps = warmup
          RssAfterWarmupMb = rssAfterWarmup
          RssEndMb = rssEnd
          RssGrowthPct = 100.0 * (rssEnd - rssAfterWarmup) / rssAfterWarmup
          SlopeStartStep = slopeStart
          RssAtSlopeStartMb = rssAtSlopeStart
          RssSlopePct = 100.0 * (rssEnd - rssAtSlopeStart) / rssAtSlopeStart
          LiveTensorsAfterWarmup = liveAfterWarmup
          LiveTensorsEnd = liveEnd
          LiveTensorsGrowth = liveEnd - liveAfterWarmup
          LiveTensorsMax = liveMax
          Generations = generations
          Evaluations = evaluations
          Seconds = clock.Elapsed.TotalSeconds }
