namespace Gpt.Model

// A GPT-2 that classifies text (book chapter 6): the transformer body of Gpt.fs, and instead of the language-model
// head a small `score` matrix (labels × C, no bias) applied to the hidden state of one position. The layout is Hugging
// Face's GPT2ForSequenceClassification: the body under `transformer.` and `score.weight`.

open System
open TorchSharp
open global.Gpt

/// Which position's hidden state is classified.
[<RequireQualifiedAccess>]
type Pooling =
    /// The last real token of each sequence (Hugging Face's choice): padding added after it changes nothing, because
    /// causal attention never looks ahead.
    | LastToken
    /// The last position of the padded sequence (the book's `model(x)[:, -1, :]`): the result depends on how much
    /// padding the batch has.
    | LastPosition

    /// "last-token" | "last-position".
    member this.Name =
        match this with
        | LastToken -> "last-token"
        | LastPosition -> "last-position"

    static member Parse(name: string) =
        match (if isNull name then "" else name.Trim().ToLowerInvariant()) with
        | "last-token" -> LastToken
        | "last-position" -> LastPosition
        | _ -> Errors.fail "unknown pooling '%s': expected last-token (the last real token) or last-position (the book's)" name

/// The shape of a classifier: its body, its labels (the position is the label id), the padding id and the pooling.
type ClassifierConfig =
    { Body: GptConfig
      Labels: string[]
      /// The token batches are padded with (GPT-2's end-of-text, 50256).
      PadTokenId: int
      Pooling: Pooling }

[<RequireQualifiedAccess>]
module ClassifierConfig =
    /// Fails naming the first thing wrong.
    let validate (config: ClassifierConfig) =
        GptConfig.validate config.Body
        Errors.require (not (isNull config.Labels) && config.Labels.Length >= 2) "a classifier needs at least 2 labels, found %d"
            (if isNull config.Labels then 0 else config.Labels.Length)
        match config.Labels |> Array.countBy id |> Array.tryFind (fun (_, n) -> n > 1) with
        | Some(label, _) -> Errors.fail "label '%s' appears twice: labels must be distinct" label
        | None -> ()
        if config.Labels |> Array.exists String.IsNullOrWhiteSpace then Errors.fail "labels must not be empty"
        Errors.require (config.PadTokenId >= 0 && config.PadTokenId < config.Body.VocabSize)
            "the padding token id %d is outside the vocabulary (0..%d)" config.PadTokenId (config.Body.VocabSize - 1)

/// The classifier's parameters: the body's and the score matrix (labels, C).
type ClassifierParams = { Body: GptParams; Score: Tensor }

/// The classifier's maths as functions, like Gpt.fs's.
[<RequireQualifiedAccess>]
module Classifier =
    /// The hidden state of the position each row is classified by. hidden (B, T, C), lengths (real tokens per row)
    /// -> (B, C).
    let pool (pooling: Pooling) (hidden: Tensor) (lengths: int64[]) =
        let batch, length = hidden.shape[0], hidden.shape[1]
        Errors.require (int64 lengths.Length = batch) "expected %d sequence lengths, found %d" batch lengths.Length
        for row in 0 .. lengths.Length - 1 do
            if lengths[row] < 1L || lengths[row] > length then
                Errors.fail "sequence %d: length %d is outside 1..%d" row lengths[row] length
        match pooling with
        | Pooling.LastPosition -> hidden.select(1L, -1L)
        | Pooling.LastToken ->
            use positions = torch.tensor(lengths |> Array.map (fun n -> n - 1L), device = hidden.device).view(batch, 1L, 1L)
            use index = positions.expand(batch, 1L, hidden.shape[2])
            use picked = hidden.gather(1L, index) // (B, 1, C)
            picked.squeeze 1L

    /// ids (B, T) with each row's real length -> label logits (B, labels).
    let logits (config: ClassifierConfig) (mode: Mode) (p: ClassifierParams) (ids: Tensor) (lengths: int64[]) =
        use scope = torch.NewDisposeScope()
        let hidden = Gpt.hiddenStates config.Body mode p.Body ids // (B, T, C)
        let pooled = pool config.Pooling hidden lengths // (B, C)
        torch.nn.functional.linear(pooled, p.Score).MoveToOuterDisposeScope() // (B, labels)

    /// Mean cross-entropy of the logits against label ids (B): the book's calc_loss_batch for classification.
    let loss (config: ClassifierConfig) (mode: Mode) (p: ClassifierParams) (ids: Tensor) (lengths: int64[]) (labels: Tensor) =
        use logits = logits config mode p ids lengths
        use labels = (Inputs.onDeviceOf logits labels).alias () // labels made on the CPU, for a model on a GPU
        torch.nn.functional.cross_entropy(logits, labels)

/// A GPT classifier as a Module: the body `transformer` (a GptModel whose head is never used, so tied: it has no
/// parameter of its own) and `score`, under Hugging Face's GPT2ForSequenceClassification names.
type GptClassifier internal (config: ClassifierConfig, body: GptModel, head: Modules.Linear) as this =
    inherit torch.nn.Module<Tensor, Tensor>("GptClassifier")
    do ClassifierConfig.validate config
    // The field names are the state_dict names.
    let transformer = body
    let score = head
    do this.RegisterComponents()

    /// An untrained head for a body: N(0, 0.02) from `seed` with a private generator (Hugging Face's
    /// initializer_range; the global torch generator is untouched).
    static member internal NewHead(config: ClassifierConfig, seed: int64) =
        let head = torch.nn.Linear(int64 config.Body.EmbeddingDim, int64 config.Labels.Length, hasBias = false)
        use generator = new torch.Generator(uint64 seed, torch.CPU)
        use _ = torch.no_grad ()
        head.weight.normal_(0.0, 0.02, generator) |> ignore
        head

    /// A classifier with every weight about to be overwritten (loading).
    static member internal Uninitialised(config: ClassifierConfig) =
        let body = GptModel.Uninitialised { config.Body with TiedHead = true }
        new GptClassifier(config, body, torch.nn.Linear(int64 config.Body.EmbeddingDim, int64 config.Labels.Length, hasBias = false))

    /// A fresh classifier: GPT-2's initialisation of the body and a new head, both from `seed`.
    new(config: ClassifierConfig, seed: int64) =
        new GptClassifier(config, new GptModel({ config.Body with TiedHead = true }, seed), GptClassifier.NewHead(config, seed))

    member _.Config = config
    /// The transformer body, state_dict key `transformer`.
    member _.Body = transformer
    /// The classification head (labels, C), state_dict key `score`.
    member _.Score = score
    member _.Labels = config.Labels
    /// Number of parameters.
    member _.ParameterCount = this.parameters () |> Seq.sumBy (fun p -> p.numel ())
    member _.Mode = Mode.Of this.training

    /// The parameters as a record (call inside a dispose scope: reading an embedding's weight makes a handle).
    member _.Params : ClassifierParams = { Body = transformer.Params; Score = score.weight }

    /// Label logits (B, labels) for ids (B, T) whose rows are all real tokens (no padding).
    override this.forward(ids: Tensor) =
        this.Logits(ids, Array.create (int ids.shape[0]) ids.shape[1])

    /// Label logits (B, labels) for ids (B, T) padded after `lengths` real tokens per row.
    member this.Logits(ids: Tensor, lengths: int64[]) =
        use scope = torch.NewDisposeScope()
        (Classifier.logits config this.Mode this.Params ids lengths).MoveToOuterDisposeScope()

    /// Mean cross-entropy against label ids (B). Differentiable.
    member this.Loss(ids: Tensor, lengths: int64[], labels: Tensor) =
        use scope = torch.NewDisposeScope()
        (Classifier.loss config this.Mode this.Params ids lengths labels).MoveToOuterDisposeScope()
