namespace Gpt.Bench

open System
open System.Diagnostics
open TorchSharp
open Gpt
open Gpt.Kernels
open Gpt.Model
open Gpt.Text
open Gpt.Training

/// Training speed against the machine's own matmul ceiling: tokens/s, model FLOPs utilisation, peak memory and where
/// the time of a step goes.
[<RequireQualifiedAccess>]
module TrainBench =
    /// A model shape and the batch it trains on.
    type Preset =
        { Name: string
          Config: GptConfig
          BatchSize: int
          SequenceLength: int }

    /// Preset A: a small GPT with GPT-2's vocabulary (256 dims, 4 heads, 4 layers, context 256), no QKV bias, a
    /// separate head, batches of 8 × 256 tokens. Its 50,257 × 256 head is 80% of its matrix parameters, so the head
    /// and the softmax over the vocabulary dominate.
    let presetA =
        { Name = "A"
          Config =
            { VocabSize = 50257; ContextLength = 256; EmbeddingDim = 256; Heads = 4; Layers = 4; DropRate = 0.1
              QkvBias = false; TiedHead = false; LayerNormEpsilon = 1e-5 }
          BatchSize = 8
          SequenceLength = 256 }

    /// Preset B: gpt2-small without QKV bias and with a separate head (163M parameters), batches of 1 × 256 tokens.
    let presetB =
        { Name = "B"
          Config = { GptConfig.gpt2Small with QkvBias = false; TiedHead = false }
          BatchSize = 1
          SequenceLength = 256 }

    /// "A" or "B" (case-insensitive).
    let preset (name: string) =
        match (if isNull name then "" else name.Trim().ToUpperInvariant()) with
        | "A" -> presetA
        | "B" -> presetB
        | _ -> Errors.fail "unknown training benchmark preset '%s': expected A or B" name

    /// Parameters that take part in matrix products, the N of the 6·N FLOPs per token: per block the fused q|k|v
    /// projection (3d²), the attention output projection (d²) and the feed-forward expansion and projection (4d² each),
    /// plus the output head (vocab × d, whether tied or not). Biases, LayerNorms and the embedding tables are lookups
    /// or element-wise work and are left out.
    let matrixParameterCount (config: GptConfig) =
        let d = int64 config.EmbeddingDim
        int64 config.Layers * 12L * d * d + int64 config.VocabSize * d

    /// Training FLOPs per token (PaLM's appendix B): 6·N for the forward and backward matrix products with the
    /// weights, and 12·layers·T·d for attention's q·kᵀ and weights·v over a sequence of T tokens.
    let flopsPerToken (config: GptConfig) (sequenceLength: int) =
        6.0 * float (matrixParameterCount config)
        + 12.0 * float config.Layers * float sequenceLength * float config.EmbeddingDim

    /// Model FLOPs utilisation: the FLOP/s the model's own arithmetic needs at this throughput, as a fraction of
    /// the matrix-product FLOP/s the machine reaches.
    let mfu (config: GptConfig) (sequenceLength: int) (tokensPerSecond: float) (matmulGflops: float) =
        tokensPerSecond * flopsPerToken config sequenceLength / (matmulGflops * 1e9)

    /// Median seconds of each part of a training step.
    type StepBreakdown =
        { /// Optimizer.ZeroGrad.
          ZeroGrad: float
          /// Model forward and cross-entropy: Body + HeadAndLoss.
          Forward: float
          /// Embeddings, blocks and final norm (GptModel.HiddenStates).
          Body: float
          /// Output head and cross-entropy, fused, with the head's gradients (GptModel.LossOfHidden, HeadLoss): the head's
          /// share of the backward work is done here.
          HeadAndLoss: float
          Backward: float
          /// AdamW step.
          Optimizer: float }

    type TrainResult =
        { Preset: string
          /// The LoRA rank of the adapters trained on the frozen model (None: every parameter trains).
          LoraRank: int option
          /// Parameters the optimizer updates.
          TrainableParameters: int64
          BatchSize: int
          SequenceLength: int
          Parameters: int64
          MatrixParameters: int64
          FlopsPerToken: float
          TokensPerSecond: float
          /// Model FLOPs utilisation against MatmulGflops.
          Mfu: float
          /// The best 1024³ fp32 matmul speed measured in this process, before and after the training steps.
          MatmulGflops: float
          /// Peak resident set size since the benchmark started (VmHWM; reset first where Linux allows it).
          PeakRssMb: float
          /// Median seconds per step.
          StepSeconds: float
          /// Every timed step, in seconds.
          StepTimes: float[]
          Breakdown: StepBreakdown
          /// Tensor handles created per step: each is a .NET ↔ libtorch crossing (and an allocation of a wrapper).
          TensorsPerStep: float
          /// Minor page faults per step: fresh memory the allocator had to map (zero-filled by the kernel).
          PageFaultsPerStep: float
          WarmupSteps: int
          TimedSteps: int
          FirstLoss: float
          LastLoss: float
          /// Where it trained: cpu or cuda:N.
          Device: string }

    /// Token windows of the built-in story (GPT-2 BPE): `count` random windows of length + 1 tokens, seeded.
    let storyBatches (seed: int) (batchSize: int) (length: int) (count: int) : (int64[] * int64[])[] =
        let ids = Tokenizers.gpt2().Encode Corpus.builtIn.Value.Text
        Errors.require (ids.Length > length + 1) "the built-in story has %d tokens, %d are needed" ids.Length (length + 1)
        let random = Random(seed)
        Array.init count (fun _ ->
            let inputs = Array.zeroCreate<int64> (batchSize * length)
            let targets = Array.zeroCreate<int64> (batchSize * length)
            for row in 0 .. batchSize - 1 do
                let start = random.Next(ids.Length - length - 1)
                for t in 0 .. length - 1 do
                    inputs[row * length + t] <- int64 ids[start + t]
                    targets[row * length + t] <- int64 ids[start + t + 1]
            inputs, targets)

    let private tensorsCreated () =
        let statistics = DisposeScopeManager.Statistics
        statistics.CreatedInScopeCount + statistics.CreatedOutsideScopeCount

    /// One training step as the trainer runs it (Trainer.step: zero the gradients, forward with the fused head and
    /// loss, backward, clip when asked, AdamW), timed part by part. Returns the loss and the seconds of each part.
    let step (model: GptModel) (optimizer: NamedAdamW) (clip: float option) (batchSize: int) (length: int) (inputs: int64[], targets: int64[]) =
        let clock = Stopwatch.StartNew()
        let laps = Collections.Generic.Dictionary<string, float>()
        let lap (part: string) =
            laps[part] <- (match laps.TryGetValue part with | true, s -> s | _ -> 0.0) + clock.Elapsed.TotalSeconds
            clock.Restart()
        // The objective the trainer runs for a GptModel (Gpt.loss), in its two halves so that each is timed.
        let lossOf (_: int) =
            let shape = [| int64 batchSize; int64 length |]
            let inputs = torch.tensor(inputs, ReadOnlySpan<int64> shape)
            let targets = torch.tensor(targets, ReadOnlySpan<int64> shape)
            let parameters = model.Params
            let hidden = Gpt.hiddenStates model.Config Mode.Train parameters inputs
            lap "body"
            Gpt.lossOfHidden model.Config parameters hidden targets
        let observe (part: StepPart) = lap (string part)
        let loss, _ = Trainer.step optimizer Optimizer.defaults.LearningRate clip 1 lossOf observe
        let part name = match laps.TryGetValue name with | true, s -> s | _ -> 0.0
        loss,
        { ZeroGrad = part "ZeroGrad"; Forward = part "body" + part "Forward"; Body = part "body"; HeadAndLoss = part "Forward"
          Backward = part "Backward"; Optimizer = part "Clip" + part "Update" }

    /// Trains a fresh model of the preset (seeded) for `warmup` untimed and `steps` timed steps on built-in-story
    /// tokens, with AdamW (the book's settings: lr 4e-4, weight decay 0.1 on the matrices).
    /// Steps of a preset's model; with LoRA settings, adapters train on the frozen model (appendix E).
    /// On `device` (MFU is still against this machine's CPU matmul speed).
    let run (preset: Preset) (lora: LoraSettings option) (device: Device) (warmup: int) (steps: int) (seed: int) : TrainResult =
        let target = Device.resolve device // a device that is not there fails before the model is built
        Errors.require (warmup >= 0) "warm-up steps must not be negative, found %d" warmup
        Errors.require (steps > 0) "timed steps must be positive, found %d" steps
        // Each part of a suite run in one process reports its own peak: what earlier parts freed is given back first.
        GC.Collect()
        GC.WaitForPendingFinalizers()
        NativeAllocator.releaseFreeMemory () |> ignore
        Measure.resetPeakRss ()
        let matmulBefore = MachineBench.matmulGflops 1024 50
        use model = new GptModel(preset.Config, int64 seed)
        model.train ()
        lora |> Option.iter (fun settings ->
            Lora.attach settings (int64 seed) model |> ignore
            Lora.freezeBase (fun _ -> false) model |> ignore)
        Device.place device model |> ignore // before the optimizer takes the parameters
        use optimizer = Optimizer.adamW Optimizer.defaults model
        let batches = storyBatches seed preset.BatchSize preset.SequenceLength (warmup + steps)
        let losses = ResizeArray<float>()
        let run index = step model optimizer None preset.BatchSize preset.SequenceLength batches[index]
        for index in 0 .. warmup - 1 do
            losses.Add(fst (run index))
        let tensorsBefore = tensorsCreated ()
        let faultsBefore = Measure.minorPageFaults ()
        let timed = [| for index in warmup .. warmup + steps - 1 -> run index |]
        let tensors = float (tensorsCreated () - tensorsBefore) / float steps
        let faults = float (Measure.minorPageFaults () - faultsBefore) / float steps
        losses.AddRange(Array.map fst timed)
        let breakdowns = Array.map snd timed
        let total (b: StepBreakdown) = b.ZeroGrad + b.Forward + b.Backward + b.Optimizer
        let stepTimes = Array.map total breakdowns
        let median (part: StepBreakdown -> float) = Measure.median (Array.map part breakdowns)
        let peak = Measure.peakRssMb ()
        let matmul = max matmulBefore (MachineBench.matmulGflops 1024 50)
        let stepSeconds = Measure.median stepTimes
        let tokensPerSecond = float (preset.BatchSize * preset.SequenceLength) / stepSeconds
        // A frozen matrix needs no weight gradient: 4·N instead of 6·N (the adapters' own products are negligible).
        let flops =
            flopsPerToken preset.Config preset.SequenceLength
            - (if lora.IsSome then 2.0 * float (matrixParameterCount preset.Config) else 0.0)
        { Preset = preset.Name
          LoraRank = lora |> Option.map _.Rank
          TrainableParameters = Optimizer.trainable model |> Array.sumBy (fun (_, p) -> p.numel ())
          BatchSize = preset.BatchSize
          SequenceLength = preset.SequenceLength
          Parameters = model.ParameterCount
          MatrixParameters = matrixParameterCount preset.Config
          FlopsPerToken = flops
          TokensPerSecond = tokensPerSecond
          Mfu = tokensPerSecond * flops / (matmul * 1e9)
          MatmulGflops = matmul
          PeakRssMb = peak
          StepSeconds = stepSeconds
          StepTimes = stepTimes
          Breakdown =
            { ZeroGrad = median _.ZeroGrad; Forward = median _.Forward; Body = median _.Body
              HeadAndLoss = median _.HeadAndLoss; Backward = median _.Backward; Optimizer = median _.Optimizer }
          TensorsPerStep = tensors
          PageFaultsPerStep = faults
          WarmupSteps = warmup
          TimedSteps = steps
          FirstLoss = losses[0]
          LastLoss = losses[losses.Count - 1]
          Device = Device.describe target }
