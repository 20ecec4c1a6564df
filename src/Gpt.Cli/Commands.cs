using System.CommandLine;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace Gpt.Cli;

/// <summary>Commands beyond tokenize, and helpers they share.</summary>
internal static partial class Commands
{
    public static IEnumerable<Command> Extra(CliContext context)
    {
        yield return ModelCommands.Init(context);
        yield return ModelCommands.Info(context);
        yield return ModelCommands.Logits(context);
        yield return ConvertCommand.Create(context);
        yield return ModelCommands.Merge(context);
        yield return TrainCommand.Create(context);
        yield return FinetuneCommand.Create(context);
        yield return ClassifyCommand.Create(context);
        yield return RespondCommand.Respond(context);
        yield return RespondCommand.Judge(context);
        yield return GenerateCommand.Create(context);
        yield return BenchCommand.Create(context);
    }

    /// <summary>--device cpu|cuda|cuda:N|auto: where the model runs (checked by the core, before a model is read).</summary>
    internal static Option<string> DeviceOption()
    {
        var option = new Option<string>("--device")
        {
            Description = "Where the model runs: cpu, cuda, cuda:N or auto (cuda when torch sees a GPU, else cpu). This build uses " +
                          "TorchSharp-cpu: cuda is an error that says how to make a CUDA build (-p:TorchBackend=cuda).",
            DefaultValueFactory = _ => "cpu",
        };
        // A value that is no device at all is a usage error (exit 2); a device this build or machine does not have is
        // found when the command runs (exit 1).
        option.Validators.Add(result =>
        {
            try
            {
                Gpt.Model.DeviceModule.parse(result.GetValueOrDefault<string>());
            }
            catch (GptException e)
            {
                result.AddError($"--device: {e.Message}");
            }
        });
        return option;
    }

    /// <summary>--format text|json.</summary>
    internal static Option<string> FormatOption(string defaultFormat = "text")
    {
        var format = new Option<string>("--format") { Description = "Output format: text for people, json for scripts.", DefaultValueFactory = _ => defaultFormat };
        format.AcceptOnlyFromAmong("text", "json");
        return format;
    }

    /// <summary>--allow-nonfinite, for commands that load a model.</summary>
    internal static Option<bool> AllowNonFiniteOption() => new("--allow-nonfinite")
    {
        Description = "Load the model even if its weights hold NaN or infinities (by default an error naming the tensors).",
    };

    private static readonly JsonSerializerOptions Compact = new(Json.Options) { WriteIndented = false };

    /// <summary>Prints a result as one JSON line, or as "key: value" lines for people.</summary>
    internal static void Print(CliContext context, string format, JsonObject result)
    {
        Json.Finite(result);
        if (format == "json")
        {
            context.Output.WriteLine(result.ToJsonString(Compact));
            return;
        }
        foreach (var (key, value) in result)
        {
            if (value is JsonObject nested)
            {
                context.Output.WriteLine($"{key}:");
                foreach (var (k, v) in nested) context.Output.WriteLine($"  {k}: {Text(v)}");
            }
            else context.Output.WriteLine($"{key}: {Text(value)}");
        }
    }

    private static string Text(JsonNode? node) => node switch
    {
        null => "null",
        JsonValue v when v.TryGetValue<string>(out var s) => s,
        _ => node.ToJsonString(Compact),
    };
}
