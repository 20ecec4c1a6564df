namespace Gpt.Generation

// LogitRows reads float32 logits in place.
#nowarn "9"

open System
open System.Numerics
open Microsoft.FSharp.NativeInterop
open System.Diagnostics
open System.Text
open TorchSharp
open Gpt
open Gpt.Kernels
open Gpt.Model
open Gpt.Text

/// The keys and values a model has cached for one batch of sequences (every row the same length).
type IKvCache =
    inherit IDisposable
    /// Tokens cached so far in each row: the next cached call continues at this position.
    abstract Length: int
    /// Forgets everything cached: the next cached call starts again at position 0.
    abstract Reset: unit -> unit

/// What generation needs from a model: next-token logits by recomputing a whole window, and the same logits
/// through a KV cache. LanguageModel.ofModule adapts a TorchSharp module that has a cached path (GPT: forward =
/// Logits, CreateCache and ForwardCached = the cached path).
type ILanguageModel =
    /// Number of token ids the model knows: logits have this many columns.
    abstract VocabSize: int
    /// The most tokens the model looks at (its number of absolute positions).
    abstract ContextLength: int
    /// Where the model's parameters live: token ids are sent there.
    abstract Device: torch.Device
    /// Whether dropout is active. Generation switches it off for its duration and restores it afterwards.
    abstract Training: bool with get, set
    /// ids [B, T] int64 (T ≤ ContextLength, positions 0..T-1) → logits [B, T, VocabSize].
    abstract Logits: ids: torch.Tensor -> torch.Tensor
    /// An empty cache for batchSize sequences.
    abstract CreateCache: batchSize: int -> IKvCache
    /// ids [B, Tnew] at positions cache.Length .. cache.Length + Tnew - 1 (the sum stays ≤ ContextLength) →
    /// logits [B, Tnew, VocabSize]; the cache then holds Tnew more tokens.
    abstract LogitsCached: ids: torch.Tensor * cache: IKvCache -> torch.Tensor

/// A model whose cached path can give the logits of each sequence's last new token alone, [B, VocabSize], without
/// computing the other positions' (the decoder: for a prompt, the head then runs once instead of once per token).
/// ContextWindow uses it when a model has it.
type INextTokenModel =
    /// ids [B, Tnew] as for LogitsCached → logits [B, VocabSize] of the last of them (float32, on the CPU); the cache
    /// then holds Tnew more tokens.
    abstract NextLogitsCached: ids: torch.Tensor * cache: IKvCache -> torch.Tensor

/// The cache of a model adapted by LanguageModel.ofModule.
type private ModuleCache<'Cache when 'Cache :> IDisposable>(cache: 'Cache, length: 'Cache -> int, reset: 'Cache -> unit) =
    member _.Inner = cache
    interface IKvCache with
        member _.Length = length cache
        member _.Reset() = reset cache
        member _.Dispose() = cache.Dispose()

/// Adapters from models to ILanguageModel.
[<RequireQualifiedAccess>]
module LanguageModel =
    /// A TorchSharp module whose forward maps ids [B, T] to logits [B, T, V], with a cached path: createCache
    /// makes an empty cache for a batch size, forwardCached appends ids [B, Tnew] at positions cacheLength.. and
    /// returns their logits. The device is that of the module's first parameter (the CPU when it has none);
    /// Training follows the module's train/eval mode.
    let ofModule
        (model: torch.nn.Module<torch.Tensor, torch.Tensor>)
        (vocabSize: int)
        (contextLength: int)
        (createCache: int -> 'Cache)
        (forwardCached: torch.Tensor * 'Cache -> torch.Tensor)
        (cacheLength: 'Cache -> int)
        (resetCache: 'Cache -> unit)
        : ILanguageModel =
        if isNull model then nullArg "model"
        Errors.require (vocabSize > 0) "vocabulary size must be positive, found %d" vocabSize
        Errors.require (contextLength > 0) "context length must be positive, found %d" contextLength
        { new ILanguageModel with
            member _.VocabSize = vocabSize
            member _.ContextLength = contextLength
            member _.Device =
                match model.parameters () |> Seq.tryHead with
                | Some parameter -> parameter.device
                | None -> torch.CPU
            member _.Training
                with get () = model.training
                and set (value: bool) = model.train value
            member _.Logits ids = model.forward ids
            member _.CreateCache batchSize =
                new ModuleCache<'Cache>(createCache batchSize, cacheLength, resetCache) :> IKvCache
            member _.LogitsCached(ids, cache) =
                match cache with
                | :? ModuleCache<'Cache> as cache -> forwardCached (ids, cache.Inner)
                | other -> Errors.fail "the cache passed to %s was not made by it (found %s)" (model.GetName()) (other.GetType().Name) }

    /// A module without a cached path, ids [B, T] -> logits [B, T, vocabSize]: generation recomputes the window at
    /// every step (UseKvCache = false).
    let ofForward (model: torch.nn.Module<torch.Tensor, torch.Tensor>) (vocabSize: int) (contextLength: int) : ILanguageModel =
        let noCache () = Errors.fail "%s has no key/value cache: generate with UseKvCache = false" (model.GetName())
        ofModule model vocabSize contextLength (fun (_: int) -> noCache ()) (fun (_: torch.Tensor, _: IKvCache) -> noCache ())
            (fun (_: IKvCache) -> 0) ignore

    /// The same model seen through a shorter window: it is shown at most the last `contextLength` tokens (the book's
    /// generate_text_simple takes the window as an argument).
    let withContextLength (contextLength: int) (model: ILanguageModel) : ILanguageModel =
        Errors.require (contextLength > 0 && contextLength <= model.ContextLength)
            "the generation context length must be in 1..%d (the model's), found %d" model.ContextLength contextLength
        { new ILanguageModel with
            member _.VocabSize = model.VocabSize
            member _.ContextLength = contextLength
            member _.Device = model.Device
            member _.Training
                with get () = model.Training
                and set (value: bool) = model.Training <- value
            member _.Logits ids = model.Logits ids
            member _.CreateCache batchSize = model.CreateCache batchSize
            member _.LogitsCached(ids, cache) = model.LogitsCached(ids, cache) }

    /// The GPT model through TorchSharp alone: forward for full recomputation, its preallocated KV cache
    /// (Gpt.logitsCached) for incremental decoding. What ofGpt falls back to.
    let ofGptTorch (model: Gpt.Model.GptModel) : ILanguageModel =
        if isNull (box model) then nullArg "model"
        ofModule model model.Config.VocabSize model.Config.ContextLength model.CreateCache model.ForwardCached
            (fun cache -> cache.Length) (fun cache -> cache.Reset())

    /// One decoder state kept between generations of a language model: the next cache of the same batch size takes
    /// it (rebound to its weights) instead of allocating another. Why: a fresh state's memory is paged in as the
    /// first steps touch it (its scratch rows, the KV cache's first positions): ~1,500 page faults, ~2 % of a
    /// 64-token generation of gpt2-small on this project's machine. Holds at most one state, for as long as the
    /// language model lives (its native memory is then freed by the finaliser).
    type private SpareState() =
        let mutable spare: DecoderState option = None
        let gate = obj ()

        /// A state for `weights` and `batchSize`: the spare one when it fits, else a new one.
        member _.Take(weights: DecoderWeights, batchSize: int) =
            let kept = lock gate (fun () -> let kept = spare in spare <- None; kept)
            match kept with
            | Some state when state.BatchSize = batchSize && state.Weights.Config = weights.Config ->
                state.Rebind weights
                state
            | other ->
                other |> Option.iter (fun state -> (state :> IDisposable).Dispose())
                new DecoderState(weights, batchSize)

        /// Keeps `state` for the next Take, or disposes it when a state is kept already.
        member _.Give(state: DecoderState) =
            let kept = lock gate (fun () -> if spare.IsNone then (spare <- Some state; true) else false)
            if not kept then (state :> IDisposable).Dispose()

    /// The decoder's cache: its state (given back to `spare` when done), and the weights it owns when they were made
    /// for this cache alone.
    type private DecoderCache(state: DecoderState, owned: DecoderWeights option, spare: SpareState) =
        let mutable disposed = false
        member _.State = state
        interface IKvCache with
            member _.Length = state.Length
            member _.Reset() = state.Reset()
            member _.Dispose() =
                if not disposed then
                    disposed <- true
                    spare.Give state
                    owned |> Option.iter (fun weights -> (weights :> IDisposable).Dispose())

    /// A GPT model whose cached path runs through the decoder (Decoder.fs): with `snapshot`, over those weights (any
    /// dtype, made once); otherwise over views of the model's own float32 weights, taken afresh for every cache, or
    /// through TorchSharp when the model cannot be viewed (low-rank adapters, not float32, not on the CPU).
    let private ofGptDecoder (model: Gpt.Model.GptModel) (snapshot: DecoderWeights option) : ILanguageModel =
        let torchPath = ofGptTorch model
        let spare = SpareState()
        let decoderCache (cache: IKvCache) =
            match cache with
            | :? DecoderCache as decoder ->
                if snapshot.IsNone && model.training then
                    Errors.fail "the decoder has no dropout: put the model in evaluation mode (eval()) before a cached step"
                Some decoder.State
            | _ -> None
        let viewable () =
            use scope = torch.NewDisposeScope()
            DecoderWeights.canView model.Params
        { new ILanguageModel with
            member _.VocabSize = torchPath.VocabSize
            member _.ContextLength = torchPath.ContextLength
            member _.Device = if snapshot.IsSome then torch.CPU else torchPath.Device
            member _.Training
                with get () = snapshot.IsNone && torchPath.Training
                and set (value: bool) =
                    match snapshot with
                    | None -> torchPath.Training <- value
                    | Some _ when value -> Errors.fail "a decoder over %s weights has no training mode (no dropout)" snapshot.Value.Dtype.Name
                    | Some _ -> ()
            member _.Logits ids =
                match snapshot with
                | Some weights -> Decoder.recompute weights ids
                | None -> torchPath.Logits ids
            member _.CreateCache batchSize =
                match snapshot with
                | Some weights -> new DecoderCache(spare.Take(weights, batchSize), None, spare) :> IKvCache
                | None when viewable () ->
                    let weights = DecoderWeights.ofModel model Dtype.Float32
                    new DecoderCache(spare.Take(weights, batchSize), Some weights, spare) :> IKvCache
                | None -> torchPath.CreateCache batchSize
            member _.LogitsCached(ids, cache) =
                match decoderCache cache with
                | Some state -> Decoder.logits state ids true
                | None -> torchPath.LogitsCached(ids, cache)
          interface INextTokenModel with
            member _.NextLogitsCached(ids, cache) =
                match decoderCache cache with
                | Some state -> Decoder.logits state ids false
                | None ->
                    use all = torchPath.LogitsCached(ids, cache)
                    all.select(1L, -1L).contiguous() }

    /// The GPT model: forward (TorchSharp) for full recomputation; incremental decoding through the decoder over the
    /// model's own float32 weights (no copy; taken afresh for each generation, so training in between is seen), or
    /// through TorchSharp's KV cache (ofGptTorch) where the decoder cannot read the weights as they are: low-rank
    /// adapters, another dtype, another device.
    let ofGpt (model: Gpt.Model.GptModel) : ILanguageModel =
        if isNull (box model) then nullArg "model"
        ofGptDecoder model None

    /// The GPT model with its weights copied into `dtype` for inference (f16/bf16: half the bytes to read per token),
    /// low-rank adapters merged in; products accumulate in float32. Both recomputation and the cached path run
    /// through the decoder. The copy is made now, from the weights as they are now: make another after training.
    /// Float32 makes a float32 copy only where the weights cannot be read as they are.
    let ofGptIn (dtype: Dtype) (model: Gpt.Model.GptModel) : ILanguageModel =
        if isNull (box model) then nullArg "model"
        ofGptDecoder model (Some(DecoderWeights.ofModel model dtype))

/// How to generate.
type GenerationOptions =
    { /// The most tokens added to each prompt (fewer when the end-of-text token comes first).
      MaxNewTokens: int
      /// 0 = greedy (argmax); otherwise logits are divided by it before sampling.
      Temperature: float
      /// Sample only among the k most likely tokens.
      TopK: int option
      /// Sample only among the smallest set of most likely tokens whose probability reaches p.
      TopP: float option
      /// Makes sampling reproducible: prompt i samples with its own generator seeded with Seed + i. None draws a
      /// fresh seed. The global torch seed is never used.
      Seed: int64 option
      /// The token that ends a text: generation of that prompt stops there and the token is not part of the output.
      EndOfTextId: int option
      /// Reuse cached keys and values instead of recomputing the window at every step (same results).
      UseKvCache: bool }

/// Option values and checks.
[<RequireQualifiedAccess>]
module GenerationOptions =
    /// 50 new tokens, greedy, stop at GPT-2's &lt;|endoftext|&gt; (50256), KV cache on. For a model of another
    /// vocabulary, or one whose configuration names its own end-of-text token, use `forModel`.
    let defaults =
        { MaxNewTokens = 50
          Temperature = 0.0
          TopK = None
          TopP = None
          Seed = None
          EndOfTextId = Some EndOfText.gpt2
          UseKvCache = true }

    /// The defaults with the model's own end-of-text token (GptModel.DefaultEndOfTextId): its config.json's
    /// eos_token_id, else 50256 when its vocabulary has it, else none, so that a model of a small vocabulary generates
    /// without an error when nothing was asked for.
    let forModel (model: Gpt.Model.GptModel) =
        if isNull (box model) then nullArg "model"
        { defaults with EndOfTextId = model.DefaultEndOfTextId }

    /// Raises a GptException for settings no model could use.
    let validate (options: GenerationOptions) =
        if options.MaxNewTokens < 0 then
            Errors.fail "the number of new tokens must be >= 0, found %d" options.MaxNewTokens
        Sampling.validate options.Temperature options.TopK options.TopP
        match options.EndOfTextId with
        | Some id when id < 0 -> Errors.fail "the end-of-text id must be >= 0, found %d" id
        | _ -> ()

/// Why generation of one prompt ended.
[<RequireQualifiedAccess>]
type StopReason =
    /// The model produced the end-of-text token (which is not part of the output).
    | EndOfText
    /// MaxNewTokens tokens were generated.
    | MaxNewTokens

/// The tokens generated for one prompt (the prompt itself not included).
type Completion = { Tokens: int[]; StopReason: StopReason }

/// Facts about float32 CPU logits [B, V] read where they lie. Why: a decoder step of gpt2-small takes ~7 ms, and
/// libtorch's isnan().any() and argmax over 50,257 logits took ~100 and ~70 µs of each (OpenMP regions started
/// for a few microseconds of work); a vector loop takes a few microseconds.
module internal LogitRows =
    /// Whether the tensor can be read in place: CPU, float32, contiguous, 2-D.
    let readable (logits: torch.Tensor) =
        logits.device_type = DeviceType.CPU && logits.dtype = torch.float32 && logits.dim () = 2L && logits.is_contiguous ()

    let inline private row (logits: torch.Tensor) (index: int) =
        let width = int logits.shape[1]
        ReadOnlySpan<float32>(NativePtr.toVoidPtr (NativePtr.add (NativePtr.ofNativeInt<float32> (TensorMemory.address logits)) (index * width)), width)

    /// Whether any value is NaN (readable tensors).
    let hasNaN (logits: torch.Tensor) =
        let mutable found = false
        for index in 0 .. int logits.shape[0] - 1 do
            let values = row logits index
            let width = Vector<float32>.Count
            let mutable k = 0
            while not found && k + width <= values.Length do
                let v = Vector<float32>(values.Slice(k, width))
                if not (Vector.EqualsAll(v, v)) then found <- true
                k <- k + width
            while not found && k < values.Length do
                if Single.IsNaN values[k] then found <- true
                k <- k + 1
        found

    /// Each row's argmax, the first index of its largest value, as torch.argmax gives it (readable tensors without
    /// NaN; +0 and -0 are equal, so the first of them wins, as in torch).
    let argmax (logits: torch.Tensor) : int64[] =
        Array.init (int logits.shape[0]) (fun index ->
            let values = row logits index
            let width = Vector<float32>.Count
            let mutable largest = Vector<float32>(Single.NegativeInfinity)
            let mutable k = 0
            while k + width <= values.Length do
                largest <- Vector.Max(largest, Vector<float32>(values.Slice(k, width)))
                k <- k + width
            let mutable best = Single.NegativeInfinity
            for lane in 0 .. width - 1 do
                best <- max best largest[lane]
            while k < values.Length do
                best <- max best values[k]
                k <- k + 1
            let mutable at = 0
            while values[at] <> best do
                at <- at + 1
            int64 at)

/// B token sequences of equal length and the model state that follows them. NextLogits gives the logits for the
/// token after the last one, computed from the last ContextLength tokens (the book's sliding window), either by
/// recomputing that window or through the KV cache: the same numbers either way.
///
/// Why the cache is refilled once the window slides: GPT-2 adds an absolute position embedding to every token
/// before the first layer, so every cached key and value depends on the position its token had. When the sequence
/// outgrows the context, the window drops its first token and every remaining token moves one position down:
/// all cached keys and values are then stale, and the only exact result is to prefill the cache again with the
/// last ContextLength tokens (as costly as recomputing). Until the window is full, each step feeds only the new
/// token through the cache.
type ContextWindow(model: ILanguageModel, prompts: int[][], useKvCache: bool) =
    do
        if isNull (box model) then nullArg "model"
        if isNull prompts then nullArg "prompts"
        if prompts.Length = 0 then Errors.fail "a context window needs at least one sequence, found none"
        for row in 0 .. prompts.Length - 1 do
            let prompt = prompts[row]
            if isNull prompt || prompt.Length = 0 then
                Errors.fail "sequence %d is empty: generation needs at least one token" row
            if prompt.Length <> prompts[0].Length then
                Errors.fail "sequences of one batch must have the same length: sequence 0 has %d tokens, sequence %d has %d"
                    prompts[0].Length row prompt.Length
            Inputs.checkIdArray model.VocabSize (sprintf "sequence %d" row) prompt

    let batchSize = prompts.Length
    let contextLength = model.ContextLength
    let rows = prompts |> Array.map (fun prompt -> ResizeArray<int64>(Seq.map int64 prompt))
    let cache = if useKvCache then Some(model.CreateCache batchSize) else None
    /// The index (in the whole sequence) of the token at cache position 0.
    let mutable cacheStart = 0
    let mutable length = prompts[0].Length

    /// Tokens from..until-1 of every row as ids [B, until - from] on the model's device.
    let ids (from: int) (until: int) =
        let width = until - from
        let flat = Array.zeroCreate<int64> (batchSize * width)
        for row in 0 .. batchSize - 1 do
            rows[row].CopyTo(from, flat, row * width, width)
        torch.tensor(flat, ReadOnlySpan<int64> [| int64 batchSize; int64 width |], device = model.Device)

    /// Number of sequences.
    member _.BatchSize = batchSize

    /// Tokens per sequence so far (prompt and appended tokens).
    member _.Length = length

    /// Whether this window goes through the KV cache.
    member _.UsesKvCache = cache.IsSome

    /// The whole sequence of a row.
    member _.Tokens(row: int) : int[] = rows[row] |> Seq.map int |> Array.ofSeq

    /// Logits [B, VocabSize] (float32, on the CPU) for the token that follows each row. The caller owns the result
    /// (dispose it, or let a dispose scope do it).
    member _.NextLogits() : torch.Tensor =
        use _ = torch.no_grad ()
        use scope = torch.NewDisposeScope()
        let start = max 0 (length - contextLength) // the window is tokens start..length-1
        let lastOf (logits: torch.Tensor) (fed: int) =
            let expected = [| int64 batchSize; int64 fed; int64 model.VocabSize |]
            if logits.shape <> expected then
                Errors.fail "the model returned logits of shape %s for %d new tokens, expected %s"
                    (Errors.shapeText logits.shape) fed (Errors.shapeText expected)
            // clone: the last position alone, not a view that keeps all T positions alive.
            logits.select(1L, -1L).cpu().to_type(torch.float32).clone () // (B, V)
        let last =
            match cache with
            | None -> lastOf (model.Logits(ids start length)) (length - start)
            | Some cache ->
                // The cache is usable when it holds a prefix of the current window: same start, fewer tokens.
                if cacheStart <> start || cache.Length >= length - start then
                    cache.Reset()
                    cacheStart <- start
                let from = start + cache.Length
                match model with
                | :? INextTokenModel as next ->
                    let logits = next.NextLogitsCached(ids from length, cache)
                    let expected = [| int64 batchSize; int64 model.VocabSize |]
                    if logits.shape <> expected then
                        Errors.fail "the model returned next-token logits of shape %s, expected %s"
                            (Errors.shapeText logits.shape) (Errors.shapeText expected)
                    logits.cpu().to_type(torch.float32)
                | _ -> lastOf (model.LogitsCached(ids from length, cache)) (length - from)
        let nan = if LogitRows.readable last then LogitRows.hasNaN last else last.isnan().any().item<bool> ()
        if nan then
            Errors.fail "the model produced NaN logits at sequence length %d" length
        last.MoveToOuterDisposeScope()

    /// Appends one token to every row.
    member _.Append(tokens: int[]) =
        if isNull tokens || tokens.Length <> batchSize then
            Errors.fail "expected one token per sequence (%d), found %d" batchSize (if isNull tokens then 0 else tokens.Length)
        for row in 0 .. batchSize - 1 do
            Inputs.checkIdArray model.VocabSize (sprintf "sequence %d" row) [| tokens[row] |]
            rows[row].Add(int64 tokens[row])
        length <- length + 1

    interface IDisposable with
        member _.Dispose() = cache |> Option.iter (fun cache -> cache.Dispose())

/// Generation of one batch of equal-length prompts, a step (one token per prompt) at a time. Each step runs under
/// no_grad in a dispose scope of its own; only .NET arrays and the cache live from one step to the next.
type private Run(model: ILanguageModel, options: GenerationOptions, seed: int64, prompts: (int * int[])[]) =
    let count = prompts.Length
    let window = new ContextWindow(model, Array.map snd prompts, options.UseKvCache)
    let wasTraining = model.Training
    do model.Training <- false
    // One generator per prompt, seeded from its index in the caller's list (prompt 0 uses the seed itself): a
    // prompt's text does not depend on which other prompts share its batch, and runs in parallel do not disturb
    // each other.
    let generators =
        if options.Temperature = 0.0 then [||]
        else prompts |> Array.map (fun (index, _) -> new torch.Generator(uint64 (seed + int64 index), torch.CPU))
    let outputs = Array.init count (fun _ -> ResizeArray<int>())
    let stops: StopReason option[] = Array.create count None
    let lastTokens: int option[] = Array.create count None
    /// The last token of every row: a finished row idles on it (its results are no longer read).
    let lastIds = prompts |> Array.map (fun (_, prompt) -> prompt[prompt.Length - 1])
    let mutable steps = 0

    let finishAtLimit () =
        for row in 0 .. count - 1 do
            if stops[row].IsNone then stops[row] <- Some StopReason.MaxNewTokens

    /// Advances every unfinished prompt by one token; false when there was nothing left to do.
    member _.Step() : bool =
        Array.fill lastTokens 0 count None
        if steps >= options.MaxNewTokens then
            finishAtLimit ()
            false
        elif stops |> Array.forall Option.isSome then false
        else
            use scope = torch.NewDisposeScope()
            let logits = window.NextLogits() // (B, V)
            let chosen =
                if options.Temperature = 0.0 then
                    if LogitRows.readable logits then LogitRows.argmax logits
                    else (Sampling.greedy logits).cpu().data<int64>().ToArray()
                else
                    Array.init count (fun row ->
                        if stops[row].IsSome then 0L
                        else
                            let ids = Sampling.nextToken options.Temperature options.TopK options.TopP generators[row] (logits.select(0L, int64 row))
                            ids.item<int64> ())
            for row in 0 .. count - 1 do
                if stops[row].IsNone then
                    let token = int chosen[row]
                    lastIds[row] <- token
                    if options.EndOfTextId = Some token then stops[row] <- Some StopReason.EndOfText
                    else
                        outputs[row].Add token
                        lastTokens[row] <- Some token
            steps <- steps + 1
            if steps >= options.MaxNewTokens then finishAtLimit () else window.Append lastIds
            true

    /// The token a prompt got in the last step (None when it stopped or had already stopped).
    member _.LastToken(row: int) = lastTokens[row]

    member _.Completion(row: int) : Completion =
        { Tokens = outputs[row].ToArray()
          StopReason = defaultArg stops[row] StopReason.MaxNewTokens }

    interface IDisposable with
        member _.Dispose() =
            for generator in generators do
                generator.Dispose()
            (window :> IDisposable).Dispose()
            if wasTraining then model.Training <- true

/// Text generation: greedy or sampled (temperature, top-k, top-p), stopping at an end-of-text token, for one or
/// several prompts, as ids, as text or as a stream of text pieces.
[<RequireQualifiedAccess>]
module Generator =
    let private check (model: ILanguageModel) (options: GenerationOptions) (prompts: int[][]) =
        if isNull (box model) then nullArg "model"
        GenerationOptions.validate options
        match options.EndOfTextId with
        | Some id when id >= model.VocabSize ->
            Errors.fail "the end-of-text id %d is outside the model's vocabulary (0..%d): set another id or none" id (model.VocabSize - 1)
        | _ -> ()
        for index in 0 .. prompts.Length - 1 do
            let prompt = prompts[index]
            if isNull prompt || prompt.Length = 0 then
                Errors.fail "prompt %d is empty: generation needs at least one token (GPT-2 starts unconditional text from <|endoftext|>, id 50256)" index
            Inputs.checkIdArray model.VocabSize (sprintf "prompt %d" index) prompt

    let private seedOf (options: GenerationOptions) =
        match options.Seed with
        | Some seed -> seed
        | None -> Random.Shared.NextInt64()

    /// As in the book, the model only ever sees the last ContextLength tokens: earlier prompt tokens can be dropped
    /// at once, since the window only moves forward.
    let private crop (model: ILanguageModel) (prompt: int[]) =
        if prompt.Length <= model.ContextLength then prompt else prompt[prompt.Length - model.ContextLength ..]

    /// Generates a continuation of every prompt; each stops on its own at the end-of-text token or after
    /// MaxNewTokens. Prompts of the same length (after cropping to the context) run together as one batch: they
    /// share every position, so no padding or attention mask is needed and a prompt's result does not depend on
    /// the others (up to rounding in batched matrix products). Different lengths run one batch after another.
    let generate (model: ILanguageModel) (options: GenerationOptions) (prompts: int[] seq) : Completion[] =
        if isNull prompts then nullArg "prompts"
        let prompts = Array.ofSeq prompts
        check model options prompts
        let seed = seedOf options
        let results = Array.zeroCreate prompts.Length
        let groups = prompts |> Array.map (crop model) |> Array.indexed |> Array.groupBy (fun (_, prompt) -> prompt.Length)
        for _, group in groups do
            use run = new Run(model, options, seed, group)
            while run.Step() do
                ()
            group |> Array.iteri (fun row (index, _) -> results[index] <- run.Completion row)
        results

    /// The generated token ids of one prompt, produced lazily one step at a time (the end-of-text token is not
    /// yielded). Settings are checked at once; each enumeration generates anew.
    let tokens (model: ILanguageModel) (options: GenerationOptions) (prompt: int[]) : seq<int> =
        check model options [| prompt |]
        let prompt = crop model prompt
        seq {
            use run = new Run(model, options, seedOf options, [| 0, prompt |])
            while run.Step() do
                match run.LastToken 0 with
                | Some token -> yield token
                | None -> ()
        }

    let private encode (tokenizer: ITokenizer) (prompt: string) =
        if isNull (box tokenizer) then nullArg "tokenizer"
        if isNull prompt then nullArg "prompt"
        tokenizer.Encode prompt

    /// The generated text of one prompt (without the prompt).
    let generateText (model: ILanguageModel) (tokenizer: ITokenizer) (options: GenerationOptions) (prompt: string) : string =
        let completion = (generate model options [ encode tokenizer prompt ])[0]
        tokenizer.Decode completion.Tokens

    /// The generated texts of several prompts, in order.
    let generateTexts (model: ILanguageModel) (tokenizer: ITokenizer) (options: GenerationOptions) (prompts: string seq) : string[] =
        if isNull prompts then nullArg "prompts"
        let ids = prompts |> Seq.map (encode tokenizer) |> Array.ofSeq
        generate model options ids |> Array.map (fun completion -> tokenizer.Decode completion.Tokens)

    /// The generated text of one prompt as pieces, each yielded as soon as its bytes form valid UTF-8 (never half
    /// a character). The pieces concatenate to generateText's result.
    let streamText (model: ILanguageModel) (tokenizer: ITokenizer) (options: GenerationOptions) (prompt: string) : seq<string> =
        let ids = tokens model options (encode tokenizer prompt)
        seq {
            let decoder = Tokenizers.StreamDecoder tokenizer
            for id in ids do
                let piece = decoder.Push id
                if piece.Length > 0 then yield piece
            let rest = decoder.Flush()
            if rest.Length > 0 then yield rest
        }

    /// Streams the generated text of one prompt to a callback, piece by piece; returns the whole text.
    let streamTextTo
        (model: ILanguageModel)
        (tokenizer: ITokenizer)
        (options: GenerationOptions)
        (prompt: string)
        (onPiece: string -> unit)
        : string =
        let text = StringBuilder()
        for piece in streamText model tokenizer options prompt do
            onPiece piece
            text.Append piece |> ignore
        text.ToString()

    /// The book's generate_text_simple (ch. 4): the most likely next token, `maxNewTokens` times, each time looking
    /// at the last `contextLength` tokens. ids (B, T) -> (B, T + maxNewTokens), a new tensor of the ids' type. The
    /// same greedy loop as `generate` (no end-of-text stop, recomputing the window at every step); the model's
    /// train/eval mode is restored.
    let generateTextSimple (model: GptModel) (ids: torch.Tensor) (maxNewTokens: int) (contextLength: int) : torch.Tensor =
        Errors.require (maxNewTokens >= 0) "the number of new tokens must not be negative, found %d" maxNewTokens
        let language = LanguageModel.ofGpt model |> LanguageModel.withContextLength contextLength
        Errors.require (ids.dim () = 2L) "token ids must have shape [batch, length], found %s" (Errors.shapeText ids.shape)
        let prompts =
            use all = ids.to_type(torch.int64).contiguous()
            all.data<int64>().ToArray() |> Array.map int |> Array.chunkBySize (max 1 (int ids.shape[1]))
        let options = { GenerationOptions.defaults with MaxNewTokens = maxNewTokens; EndOfTextId = None; UseKvCache = false }
        let completions = generate language options prompts
        let rows = Array.map2 (fun (prompt: int[]) completion -> Array.append prompt completion.Tokens |> Array.map int64) prompts completions
        use flat = torch.tensor(Array.concat rows)
        flat.view(ids.shape[0], int64 rows[0].Length).``to``(ids.dtype)
