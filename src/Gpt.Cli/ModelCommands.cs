using System.CommandLine;
using System.Globalization;
using System.Text.Json.Nodes;

namespace Gpt.Cli;

/// <summary>Options that choose a model shape: a preset and optional overrides.</summary>
internal sealed class ConfigOptions
{
    private readonly GptConfiguration? _defaultModel;

    /// <summary>Options whose shape starts from gpt2-small, or from <paramref name="defaultModel"/> when --config is
    /// not given (the overrides apply to it).</summary>
    public ConfigOptions(GptConfiguration? defaultModel = null, string? defaultDescription = null)
    {
        _defaultModel = defaultModel;
        Preset = new("--config")
        {
            Description = "Preset: gpt2-small (124M), gpt2-medium (355M), gpt2-large (774M), gpt2-xl (1558M)." +
                          (defaultDescription is null ? "" : $" Default: {defaultDescription}."),
        };
        if (defaultModel is null) Preset.DefaultValueFactory = _ => "gpt2-small";
    }

    public Option<string?> Preset { get; }
    public Option<int?> VocabularySize { get; } = new("--vocab-size") { Description = "Override the vocabulary size." };
    public Option<int?> ContextLength { get; } = new("--context-length") { Description = "Override the context length (positions)." };
    public Option<int?> EmbeddingDim { get; } = new("--emb-dim") { Description = "Override the embedding dimension." };
    public Option<int?> Heads { get; } = new("--heads") { Description = "Override the number of attention heads." };
    public Option<int?> Layers { get; } = new("--layers") { Description = "Override the number of transformer blocks." };
    public Option<double?> DropRate { get; } = new("--drop-rate") { Description = "Override the dropout rate, in [0, 1)." };
    public Option<bool?> QkvBias { get; } = new("--qkv-bias") { Description = "Bias on the query/key/value projection (true|false)." };
    public Option<bool?> TiedHead { get; } = new("--tied-head") { Description = "Tie the output head to the token embedding (true|false)." };

    public void AddTo(Command command)
    {
        foreach (var option in All) command.Add(option);
    }

    private IEnumerable<Option> All => new Option[] { Preset, VocabularySize, ContextLength, EmbeddingDim, Heads, Layers, DropRate, QkvBias, TiedHead };

    /// <summary>The names of the options given on the command line (not defaults), those in <paramref name="except"/> left out.</summary>
    public IReadOnlyList<string> Given(ParseResult parse, params Option[] except) =>
        All.Where(o => !except.Contains(o) && parse.GetResult(o) is { Implicit: false }).Select(o => o.Name).ToList();

    /// <summary>The configuration the options describe: the preset (or <paramref name="basis"/>, or the default model)
    /// with the overrides given.</summary>
    public GptConfiguration Read(ParseResult parse, GptConfiguration? basis = null)
    {
        var preset = parse.GetValue(Preset);
        var c = preset is not null ? GptConfiguration.FromPreset(preset) : basis ?? _defaultModel ?? GptConfiguration.FromPreset("gpt2-small");
        c = c with
        {
            VocabularySize = parse.GetValue(VocabularySize) ?? c.VocabularySize,
            ContextLength = parse.GetValue(ContextLength) ?? c.ContextLength,
            EmbeddingDim = parse.GetValue(EmbeddingDim) ?? c.EmbeddingDim,
            Heads = parse.GetValue(Heads) ?? c.Heads,
            Layers = parse.GetValue(Layers) ?? c.Layers,
            DropRate = parse.GetValue(DropRate) ?? c.DropRate,
            QkvBias = parse.GetValue(QkvBias) ?? c.QkvBias,
            TiedHead = parse.GetValue(TiedHead) ?? c.TiedHead,
        };
        c.Validate();
        return c;
    }
}

/// <summary><c>gpt init</c>, <c>gpt info</c>, <c>gpt logits</c>.</summary>
internal static class ModelCommands
{
    public static Command Init(CliContext context)
    {
        var config = new ConfigOptions();
        var output = new Option<string>("--out") { Description = "Directory to write (Hugging Face GPT-2 layout: config.json + model.safetensors).", Required = true };
        var seed = new Option<long?>("--seed") { Description = "Seed for the initial weights (same seed, same weights)." };
        var format = Commands.FormatOption();
        var command = new Command("init", "Write a freshly initialised model in the Hugging Face GPT-2 layout.") { output, seed, format };
        config.AddTo(command);
        command.SetAction(parse => CliApp.Guard(context, () =>
        {
            var configuration = config.Read(parse);
            using var model = GptModel.Create(configuration, parse.GetValue(seed));
            var directory = parse.GetValue(output)!;
            model.Save(directory);
            var result = Describe(model);
            result["path"] = Path.GetFullPath(directory);
            Commands.Print(context, parse.GetValue(format)!, result);
            return 0;
        }));
        return command;
    }

    /// <summary><c>gpt merge</c>: a base plus a LoRA adapter written as a plain model folder.</summary>
    public static Command Merge(CliContext context)
    {
        var modelPath = new Option<string?>("--model") { Description = "The base model (any model source, or a classifier folder). Default: the base the adapter names." };
        var adapter = new Option<string>("--adapter") { Description = "The LoRA adapter folder (PEFT's layout; a run with --lora-rank writes OUT/NAME/adapter).", Required = true };
        var output = new Option<string>("--out") { Description = "Folder to write the merged model to (Hugging Face layout; replaced atomically).", Required = true };
        var format = Commands.FormatOption();
        var command = new Command("merge",
            "Merge a LoRA adapter into its base: every adapted weight becomes W + (alpha / r) · B A, written as a plain model folder " +
            "(a classifier when the adapter is one) that every command loads without --adapter.")
        {
            modelPath, adapter, output, format,
        };
        command.SetAction(parse => CliApp.Guard(context, () =>
        {
            using var info = Adapter.Load(parse.GetValue(adapter)!);
            var outDirectory = Path.GetFullPath(parse.GetValue(output)!);
            var classifier = Adapter.Merge(parse.GetValue(adapter)!, outDirectory, parse.GetValue(modelPath));
            Commands.Print(context, parse.GetValue(format)!, new System.Text.Json.Nodes.JsonObject
            {
                ["path"] = outDirectory, ["kind"] = classifier ? "classifier" : "language model", ["rank"] = info.Rank,
                ["alpha"] = info.Alpha, ["targets"] = string.Join(",", info.Targets),
            });
            return 0;
        }));
        return command;
    }

    public static Command Info(CliContext context)
    {
        var modelPath = ModelOption();
        var format = Commands.FormatOption();
        var adapter = AdapterOption();
        var allowNonFinite = Commands.AllowNonFiniteOption();
        var device = Commands.DeviceOption();
        var command = new Command("info", "Print a model's configuration, parameter count and memory.") { modelPath, adapter, device, format, allowNonFinite };
        command.SetAction(parse => CliApp.Guard(context, () =>
        {
            using var model = LoadModel(context, parse.GetValue(modelPath), parse.GetValue(adapter), parse.GetValue(allowNonFinite), parse.GetValue(device)!);
            var description = Describe(model);
            description["device"] = model.Device;
            Commands.Print(context, parse.GetValue(format)!, description);
            return 0;
        }));
        return command;
    }

    public static Command Logits(CliContext context)
    {
        var modelPath = ModelOption();
        var ids = new Option<string[]>("--ids")
        {
            Description = "Token ids of one sequence, comma-separated (1,2,3); repeat for a batch of equal-length sequences.",
            Required = true, AllowMultipleArgumentsPerToken = false,
        };
        var adapter = AdapterOption();
        var format = Commands.FormatOption("json");
        format.Description = "json: {\"logits\": [[[...]]]} with NaN and infinities as null (JSON has no word for them); " +
                             "text: each position's five largest logits, for people.";
        var allowNonFinite = Commands.AllowNonFiniteOption();
        var device = Commands.DeviceOption();
        var command = new Command("logits", "Print the logits {\"logits\": [[[...]]]} of shape [batch, length, vocabulary], for cross-checking against other implementations.")
        {
            modelPath, adapter, ids, device, format, allowNonFinite,
        };
        command.SetAction(parse => CliApp.Guard(context, () =>
        {
            var sequences = parse.GetValue(ids)!.Select((s, i) => ParseIdList(s, $"--ids #{i + 1}")).ToList();
            using var model = LoadModel(context, parse.GetValue(modelPath), parse.GetValue(adapter), parse.GetValue(allowNonFinite), parse.GetValue(device)!);
            var logits = model.Logits(sequences);
            if (parse.GetValue(format) == "text") PrintTopLogits(context.Output, sequences, logits);
            else PrintLogitsJson(context.Output, logits);
            return 0;
        }));
        return command;
    }

    /// <summary>{"logits": [[[...]]]}, written as it goes (a batch of long sequences is large), non-finite values as null.</summary>
    private static void PrintLogitsJson(TextWriter writer, float[][][] logits)
    {
        writer.Write("{\"logits\": [");
        for (var b = 0; b < logits.Length; b++)
        {
            writer.Write(b == 0 ? "[" : ", [");
            for (var t = 0; t < logits[b].Length; t++)
            {
                writer.Write(t == 0 ? "[" : ", [");
                writer.Write(string.Join(", ", logits[b][t].Select(v => float.IsFinite(v) ? v.ToString("R", CultureInfo.InvariantCulture) : "null")));
                writer.Write("]");
            }
            writer.Write("]");
        }
        writer.WriteLine("]}");
    }

    /// <summary>For people: per sequence and position, the input id and the five largest logits (id=logit), with how
    /// many values are NaN or infinite when there are any.</summary>
    private static void PrintTopLogits(TextWriter writer, IReadOnlyList<int[]> sequences, float[][][] logits)
    {
        for (var b = 0; b < logits.Length; b++)
            for (var t = 0; t < logits[b].Length; t++)
            {
                var row = logits[b][t];
                var top = row.Select((v, id) => (v, id)).Where(x => !float.IsNaN(x.v)).OrderByDescending(x => x.v).Take(5)
                    .Select(x => string.Create(CultureInfo.InvariantCulture, $"{x.id}={x.v:0.####}"));
                var nonFinite = row.Count(v => !float.IsFinite(v));
                var note = nonFinite > 0 ? $"  ({nonFinite} of {row.Length} not finite)" : "";
                writer.WriteLine($"sequence {b + 1}, position {t + 1} (id {sequences[b][t]}): {string.Join("  ", top)}{note}");
            }
    }

    internal static Option<string?> ModelOption() =>
        new("--model")
        {
            Description = "The model: a folder (Hugging Face layout, or OpenAI's checkpoint with hparams.json), a .pth state dict (the book's), " +
                          "or a Hugging Face id (gpt2, openai-community/gpt2-medium, user/name@revision: from the cache, else downloaded). " +
                          "Required, unless --adapter names its base.",
        };

    /// <summary><c>--adapter</c>: a LoRA adapter folder applied to the model on loading.</summary>
    internal static Option<string?> AdapterOption() =>
        new("--adapter")
        {
            Description = "A LoRA adapter folder (PEFT's layout, as a run with --lora-rank writes to OUT/NAME/adapter), applied to --model " +
                          "(default: the base the adapter names); gpt merge writes the two as one model.",
        };

    /// <summary>Loads any model source, showing downloads on standard error; with an adapter, applied to it; then on
    /// <paramref name="device"/> (checked first, so that a device that is not there fails before a model is read).</summary>
    internal static GptModel LoadModel(CliContext context, string? source, string? adapter = null, bool allowNonFinite = false, string device = "cpu")
    {
        GptRuntime.ResolveDevice(device);
        var options = new ModelLoadOptions
        {
            Progress = DownloadProgressBar.For(context), CancellationToken = context.Cancellation, AllowNonFinite = allowNonFinite,
        };
        if (adapter is not null) return Adapter.LoadModel(adapter, source, merge: false, options).ToDevice(device);
        if (source is null) throw new GptException("no model: pass --model (a folder, a .pth file or a Hugging Face id)");
        return GptModel.Load(source, options).ToDevice(device);
    }

    /// <summary>"1,2,3" (or "[1, 2, 3]") to ids, with a clear error.</summary>
    internal static int[] ParseIdList(string text, string where)
    {
        var trimmed = text.Trim().TrimStart('[').TrimEnd(']');
        if (trimmed.Length == 0) throw new GptException($"{where}: expected comma-separated token ids such as 15496,11, found an empty list");
        return trimmed.Split(',').Select(part =>
        {
            if (!int.TryParse(part.Trim(), NumberStyles.Integer, CultureInfo.InvariantCulture, out var id))
                throw new GptException($"{where}: expected comma-separated token ids such as 15496,11, found '{part.Trim()}'");
            return id;
        }).ToArray();
    }

    internal static JsonObject Describe(GptModel model)
    {
        var c = model.Configuration;
        return new JsonObject
        {
            ["parameters"] = model.ParameterCount,
            ["memory_mb"] = Math.Round(model.ParameterCount * 4.0 / (1024 * 1024), 2),
            ["end_of_text_id"] = model.EndOfTextId,
            ["config"] = new JsonObject
            {
                ["vocab_size"] = c.VocabularySize, ["context_length"] = c.ContextLength, ["emb_dim"] = c.EmbeddingDim,
                ["n_heads"] = c.Heads, ["n_layers"] = c.Layers, ["drop_rate"] = c.DropRate,
                ["qkv_bias"] = c.QkvBias, ["tied_head"] = c.TiedHead, ["layer_norm_epsilon"] = c.LayerNormEpsilon,
            },
        };
    }
}
