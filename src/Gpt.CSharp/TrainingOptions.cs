using System.Text.Json;
using System.Text.Json.Nodes;
using Gpt.Model;
using FCheckpoint = Gpt.Training.Checkpoint;
using FTrainerOptions = Gpt.Training.TrainerOptionsModule;

namespace Gpt;

/// <summary>
/// Everything that shapes a pretraining run: the data, the model, the optimisation, evaluation and output. The
/// defaults train <see cref="DefaultModel"/> (4 layers, 256 dimensions, context 128) on the built-in story for 20
/// epochs, a few minutes on two CPU cores; every <c>gpt train</c> option has a property here.
/// </summary>
/// <remarks>Text is encoded with GPT-2's tokenizer, so the model's vocabulary must hold its 50,257 tokens.</remarks>
public sealed record TrainingOptions
{
    /// <summary>The model <c>gpt train</c> trains by default: GPT-2's vocabulary and layout, 4 layers of 256
    /// dimensions with 4 heads, 128 positions, dropout 0.1, no QKV bias, head tied to the token embedding
    /// (about 16 million parameters, 80% of them the embedding).</summary>
    public static GptConfiguration DefaultModel { get; } = GptConfiguration.Gpt2Small with
    {
        ContextLength = 128, EmbeddingDim = 256, Heads = 4, Layers = 4, DropRate = 0.1, QkvBias = false,
    };

    /// <summary>The book's chapter 5 run: gpt2-small with 256 positions, no QKV bias, dropout 0.1 and a separate output
    /// head (the book's GPTModel does not tie it: 162M parameters) and PyTorch's default initialisation (the book
    /// applies none of its own; with GPT-2's, this run stalls near a loss of 5); AdamW with a
    /// constant learning rate of 4e-4 and weight decay 0.1 on every parameter; batch 2; 10 epochs; evaluation every 5
    /// steps on 5 batches; no warmup, no clipping; seed 123; the sample "Every effort moves you" at every epoch end.</summary>
    public static TrainingOptions Book { get; } = new()
    {
        Model = GptConfiguration.Gpt2Small with { ContextLength = 256, QkvBias = false, DropRate = 0.1, TiedHead = false },
        Initialization = ModelInitialization.TorchDefaults,
        BatchSize = 2, Epochs = 10, LearningRate = 4e-4, MinLearningRate = 4e-4, WarmupSteps = 0, WeightDecay = 0.1,
        DecayAll = true, GradientClip = null, EvalInterval = 5, EvalBatches = 5, SampleTokens = 50, Seed = 123,
    };

    // ---- data ----

    /// <summary>The text to train on: a file, a folder (every file, recursively) or a glob such as
    /// <c>data/*.txt</c>. Null: the built-in story (<see cref="Corpus.BuiltInStory"/>).</summary>
    public string? Data { get; init; }

    /// <summary>Share of the tokens, from the start, used for training; the rest is the validation text (the book
    /// splits 90/10 by position).</summary>
    public double TrainRatio { get; init; } = 0.9;

    // ---- model ----

    /// <summary>The shape of a fresh model. Ignored with <see cref="InitFrom"/> or <see cref="ResumeFrom"/>, which
    /// bring their own.</summary>
    public GptConfiguration Model { get; init; } = DefaultModel;

    /// <summary>How a fresh model's weights are drawn (from <see cref="Seed"/>).</summary>
    public ModelInitialization Initialization { get; init; } = ModelInitialization.Gpt2;

    /// <summary>Continue pretraining a model (any source <see cref="GptModel.Load(string)"/> takes: a Hugging Face
    /// folder or id, OpenAI's checkpoint, a <c>.pth</c>) instead of starting from random weights.</summary>
    public string? InitFrom { get; init; }

    /// <summary>Resume a run: its directory (<c>runs/NAME</c>), its <c>checkpoints</c> folder or one checkpoint. The
    /// model, the optimizer state, the data position and the random state come from the latest checkpoint, and the
    /// run continues in its own directory: N steps, a resume and N more give the same weights as 2N steps straight
    /// when the other options are the run's own (<see cref="FromCheckpoint"/> reads them back).</summary>
    public string? ResumeFrom { get; init; }

    /// <summary>Tokens per training window. Null: the model's context length.</summary>
    public int? ContextLength { get; init; }

    /// <summary>Distance between the starts of consecutive windows. Null: the context length (no overlap, as in the
    /// book).</summary>
    public int? Stride { get; init; }

    // ---- optimisation ----

    /// <summary>Windows per batch.</summary>
    public int BatchSize { get; init; } = 4;

    /// <summary>Passes over the training text.</summary>
    public int Epochs { get; init; } = 20;

    /// <summary>Stop after this many optimizer steps even if epochs remain (null: no limit).</summary>
    public int? MaxSteps { get; init; }

    /// <summary>Peak learning rate of AdamW.</summary>
    public double LearningRate { get; init; } = 1e-3;

    /// <summary>Rate the cosine decay ends at, on the last step. Null: a tenth of <see cref="LearningRate"/>. Equal to
    /// <see cref="LearningRate"/> (and no warmup): a constant rate, as in the book's chapter 5.</summary>
    public double? MinLearningRate { get; init; }

    /// <summary>Rate at the first warmup step, rising linearly to <see cref="LearningRate"/>. Null: the minimum
    /// rate.</summary>
    public double? InitialLearningRate { get; init; }

    /// <summary>Steps of linear warmup before the cosine decay (appendix D).</summary>
    public int WarmupSteps { get; init; } = 10;

    /// <summary>AdamW's decoupled weight decay.</summary>
    public double WeightDecay { get; init; } = 0.1;

    /// <summary>Decay every parameter, as the book (PyTorch's AdamW) does, instead of only the matrices (nanoGPT:
    /// no decay of biases, LayerNorm parameters).</summary>
    public bool DecayAll { get; init; }

    /// <summary>AdamW's β1.</summary>
    public double Beta1 { get; init; } = 0.9;

    /// <summary>AdamW's β2.</summary>
    public double Beta2 { get; init; } = 0.999;

    /// <summary>Clip the global gradient norm to this value before each step (null: no clipping).</summary>
    public double? GradientClip { get; init; } = 1.0;

    /// <summary>Batches whose gradients make one optimizer step (an effective batch of BatchSize × this).</summary>
    public int GradientAccumulation { get; init; } = 1;

    // ---- evaluation, samples, output ----

    /// <summary>Evaluate the training and validation loss every this many steps (and after the first and the
    /// last).</summary>
    public int EvalInterval { get; init; } = 20;

    /// <summary>Batches of each split an evaluation reads.</summary>
    public int EvalBatches { get; init; } = 5;

    /// <summary>Greedy continuation of this prompt at every epoch end (null: no samples).</summary>
    public string? SamplePrompt { get; init; } = "Every effort moves you";

    /// <summary>Tokens of each sample.</summary>
    public int SampleTokens { get; init; } = 40;

    /// <summary>Seeds the data order and the dropout draws: the same seed gives the same run on the CPU.</summary>
    public int Seed { get; init; } = 123;

    /// <summary>Folder of runs: a run writes <c>OutputDirectory/Name/</c>.</summary>
    public string OutputDirectory { get; init; } = "runs";

    /// <summary>The run's name, its folder under <see cref="OutputDirectory"/>. Null: <c>run-yyyyMMdd-HHmmss</c>.</summary>
    public string? Name { get; init; }

    /// <summary>Checkpoints kept besides the best by validation loss.</summary>
    public int KeepLast { get; init; } = 3;

    /// <summary>Write a checkpoint every this many steps (0: only at the end and on cancellation).</summary>
    public int CheckpointInterval { get; init; } = 100;

    /// <summary>The options a run was trained with, read back from a run directory or a checkpoint, with
    /// <see cref="ResumeFrom"/> set to <paramref name="path"/>: <c>TrainingOptions.FromCheckpoint("runs/x") with {
    /// MaxSteps = 500 }</c> resumes run x and extends it.</summary>
    /// <exception cref="GptException">No complete checkpoint at <paramref name="path"/>, or an unreadable one.</exception>
    public static TrainingOptions FromCheckpoint(string path)
    {
        ArgumentNullException.ThrowIfNull(path);
        var directory = FCheckpoint.resolve(path);
        var state = FCheckpoint.read(directory);
        var stored = FTrainerOptions.ofJson(state.TrainingOptions);
        var model = GptConfiguration.From(Pretrained.parseConfig(directory, state.ModelConfiguration));
        var run = RunFile.Read(RunDirectoryOf(directory));
        return new TrainingOptions
        {
            Data = run.Data,
            TrainRatio = run.TrainRatio,
            Model = model,
            ResumeFrom = path,
            ContextLength = stored.ContextLength,
            Stride = stored.Stride,
            BatchSize = stored.BatchSize,
            Epochs = stored.Epochs,
            MaxSteps = Options.ToNullable(stored.MaxSteps),
            LearningRate = stored.LearningRate,
            MinLearningRate = stored.MinLearningRate,
            InitialLearningRate = stored.InitialLearningRate,
            WarmupSteps = stored.WarmupSteps,
            WeightDecay = stored.WeightDecay,
            DecayAll = stored.DecayAll,
            Beta1 = stored.Beta1,
            Beta2 = stored.Beta2,
            GradientClip = Options.ToNullable(stored.GradientClip),
            GradientAccumulation = stored.GradientAccumulation,
            EvalInterval = stored.EvalInterval,
            EvalBatches = stored.EvalBatches,
            SamplePrompt = Options.ToObject(stored.SamplePrompt),
            SampleTokens = stored.SampleTokens,
            Seed = stored.Seed,
            OutputDirectory = Path.GetDirectoryName(RunDirectoryOf(directory)) ?? ".",
            Name = Path.GetFileName(RunDirectoryOf(directory)),
            KeepLast = stored.KeepLast,
            CheckpointInterval = stored.CheckpointInterval,
        };
    }

    /// <summary>The run directory a checkpoint directory (<c>RUN/checkpoints/step-N</c>) belongs to.</summary>
    internal static string RunDirectoryOf(string checkpointDirectory)
    {
        var full = Path.GetFullPath(checkpointDirectory).TrimEnd(Path.DirectorySeparatorChar);
        var root = Path.GetDirectoryName(full);
        return root is not null && Path.GetFileName(root) == "checkpoints" ? Path.GetDirectoryName(root)! : root ?? full;
    }
}

/// <summary>How a fresh model's weights are drawn.</summary>
public enum ModelInitialization
{
    /// <summary>GPT-2's (nanoGPT's): weights N(0, 0.02), residual projections N(0, 0.02 / sqrt(2 × layers)), biases 0.</summary>
    Gpt2,
    /// <summary>PyTorch's default for each layer, which the book's GPTModel keeps: Linear U(±1/sqrt(fan_in)),
    /// embeddings N(0, 1).</summary>
    TorchDefaults,
}

/// <summary><c>run.json</c>: what a run's checkpoints do not hold (where the text came from and how it was split).</summary>
internal static class RunFile
{
    public const string FileName = "run.json";

    public sealed record Contents(string? Data, double TrainRatio);

    public static void Write(string runDirectory, TrainingOptions options, string? initFrom)
    {
        var json = new JsonObject
        {
            ["data"] = options.Data is null ? null : Path.GetFullPath(options.Data),
            ["train_ratio"] = options.TrainRatio,
            ["tokenizer"] = "gpt2",
            ["init_from"] = initFrom is null ? null : Path.GetFullPath(initFrom),
            ["initialization"] = initFrom is null ? options.Initialization.ToString() : null,
            ["created_utc"] = DateTime.UtcNow.ToString("o"),
        };
        Directory.CreateDirectory(runDirectory);
        var path = Path.Combine(runDirectory, FileName);
        var temporary = path + ".tmp-" + Guid.NewGuid().ToString("N");
        File.WriteAllText(temporary, json.ToJsonString(new JsonSerializerOptions { WriteIndented = true }) + "\n");
        File.Move(temporary, path, overwrite: true);
    }

    /// <summary>The run's data source and split; the built-in story and 90/10 when the run has no run.json.</summary>
    public static Contents Read(string runDirectory)
    {
        var path = Path.Combine(runDirectory, FileName);
        if (!File.Exists(path)) return new Contents(null, 0.9);
        try
        {
            var json = JsonNode.Parse(File.ReadAllText(path));
            return new Contents(json?["data"]?.GetValue<string>(), json?["train_ratio"]?.GetValue<double>() ?? 0.9);
        }
        catch (Exception e) when (e is JsonException or InvalidOperationException or FormatException)
        {
            throw new GptException($"'{path}' is not a valid run file: {e.Message}", e);
        }
    }
}
