using System.CommandLine;
using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace Gpt.Cli;

/// <summary><c>gpt classify</c>: label texts with a fine-tuned classifier.</summary>
internal static class ClassifyCommand
{
    public static Command Create(CliContext context)
    {
        var modelPath = new Option<string?>("--model") { Description = "A classifier folder (gpt finetune classify writes OUT/NAME/model); with --adapter, the base (default: the one the adapter names)." };
        var adapter = ModelCommands.AdapterOption();
        var texts = new Option<string[]>("--text") { Description = "A text to classify; repeat for several. Without --text: JSON Lines {\"text\": ...} on standard input." };
        var format = Commands.FormatOption();
        var device = Commands.DeviceOption();
        var allowNonFinite = Commands.AllowNonFiniteOption();
        var dtype = GenerationOptions.DtypeOption();
        dtype.Description = "Weights of the classifier's body: f32 (as trained; through the CPU decoder where the weights allow it, " +
                            "else TorchSharp on --device), f16 or bf16 (a half-precision copy, on the CPU: half the bytes to read).";
        var command = new Command("classify", "Label texts with a classifier. JSON output: one object per text {\"text\", \"label\", \"label_id\", \"probabilities\": {label: p}, \"logits\": [...]}.")
        {
            modelPath, adapter, texts, device, dtype, format, allowNonFinite,
        };
        command.SetAction(parse => CliApp.Guard(context, () =>
        {
            var given = parse.GetValue(texts) ?? [];
            var inputs = given.Length > 0 ? given : ReadJsonLines(context);
            if (inputs.Count == 0) throw new GptException("no text to classify: pass --text \"...\" or JSON Lines {\"text\": ...} on standard input");
            GptRuntime.ResolveDevice(parse.GetValue(device)!); // before a model is read
            var options = new ModelLoadOptions { AllowNonFinite = parse.GetValue(allowNonFinite) };
            using var classifier = parse.GetValue(adapter) is { } adapterDirectory
                ? Adapter.LoadClassifier(adapterDirectory, parse.GetValue(modelPath), merge: false, options)
                : TextClassifier.Load(parse.GetValue(modelPath) ?? throw new GptException("no classifier: pass --model (a classifier folder) or --adapter"),
                    options);
            classifier.ToDevice(parse.GetValue(device)!);
            var json = parse.GetValue(format) == "json";
            foreach (var p in classifier.ClassifyBatch(inputs, dtype: GenerationOptions.ToDtype(parse.GetValue(dtype))))
            {
                if (json)
                {
                    var probabilities = new JsonObject();
                    foreach (var (label, probability) in p.Probabilities) probabilities[label] = probability;
                    context.Output.WriteLine(Json.Line(new JsonObject
                    {
                        ["text"] = p.Text, ["label"] = p.Label, ["label_id"] = p.LabelId, ["probabilities"] = probabilities,
                        ["logits"] = new JsonArray(p.Logits.Select(l => (JsonNode?)l).ToArray()),
                    }));
                }
                else
                    context.Output.WriteLine(string.Create(CultureInfo.InvariantCulture, $"{p.Label} ({p.Probabilities[p.Label]:P1})\t{RunDisplay.OneLine(p.Text)}"));
            }
            return 0;
        }));
        return command;
    }

    /// <summary>JSON Lines {"text": ...} from standard input, with a clear error naming the line.</summary>
    private static IReadOnlyList<string> ReadJsonLines(CliContext context)
    {
        if (!context.InputRedirected) return [];
        var result = new List<string>();
        var number = 0;
        while (context.Input.ReadLine() is { } line)
        {
            number++;
            if (string.IsNullOrWhiteSpace(line)) continue;
            try
            {
                var node = JsonNode.Parse(line);
                result.Add(node?["text"]?.GetValue<string>() ?? throw new GptException($"standard input line {number}: expected {{\"text\": ...}}"));
            }
            catch (Exception e) when (e is JsonException or InvalidOperationException or FormatException)
            {
                throw new GptException($"standard input line {number}: expected a JSON object {{\"text\": ...}} ({e.Message})");
            }
        }
        return result;
    }
}
