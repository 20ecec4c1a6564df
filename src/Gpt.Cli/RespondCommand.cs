using System.CommandLine;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace Gpt.Cli;

/// <summary><c>gpt respond</c>: answer instructions with an instruction-tuned model; <c>gpt judge</c>: score responses.</summary>
internal static class RespondCommand
{
    public static Command Respond(CliContext context)
    {
        var modelPath = new Option<string?>("--model") { Description = "The model (gpt finetune instruct writes OUT/NAME/model; any model source); with --adapter, the base (default: the one the adapter names)." };
        var adapter = ModelCommands.AdapterOption();
        var instruction = new Option<string?>("--instruction") { Description = "The instruction. Without it: JSON Lines {\"instruction\", \"input\"} on standard input, one response each." };
        var input = new Option<string?>("--input") { Description = "The instruction's input (optional)." };
        var style = new Option<string>("--prompt-style") { Description = "alpaca (the book's) or phi3: the style the model was fine-tuned with.", DefaultValueFactory = _ => "alpaca" };
        style.AcceptOnlyFromAmong("alpaca", "phi3");
        var generation = new GenerationOptions(256);
        var format = Commands.FormatOption();
        var allowNonFinite = Commands.AllowNonFiniteOption();
        var device = Commands.DeviceOption();
        var command = new Command("respond",
            "Answer an instruction with an instruction-tuned model (book chapter 7): the prompt formatted as in training, generation " +
            "stopping at end-of-text, the text after the response marker. JSON output: {\"instruction\", \"input\", \"response\"} per entry.")
        {
            modelPath, adapter, instruction, input, style, device, format, allowNonFinite,
        };
        generation.AddTo(command);
        command.SetAction(parse => CliApp.Guard(context, () =>
        {
            var entries = parse.GetValue(instruction) is { } text
                ? [new InstructionEntry(text, parse.GetValue(input) ?? "")]
                : ReadEntries(context);
            if (entries.Count == 0) throw new GptException("no instruction: pass --instruction \"...\" or JSON Lines {\"instruction\": ...} on standard input");
            var promptStyle = parse.GetValue(style) == "phi3" ? PromptStyle.Phi3 : PromptStyle.Alpaca;
            GptRuntime.ResolveDevice(parse.GetValue(device)!); // before a model is read
            var options = new ModelLoadOptions { AllowNonFinite = parse.GetValue(allowNonFinite) };
            using var model = parse.GetValue(adapter) is { } adapterDirectory
                ? InstructionModel.LoadWithAdapter(adapterDirectory, parse.GetValue(modelPath), promptStyle, options)
                : InstructionModel.Load(parse.GetValue(modelPath) ?? throw new GptException("no model: pass --model or --adapter"), promptStyle,
                    options);
            model.Model.ToDevice(parse.GetValue(device)!);
            var settings = generation.Read(parse);
            foreach (var entry in entries)
            {
                var response = model.Respond(entry, settings);
                if (parse.GetValue(format) == "json")
                    context.Output.WriteLine(new JsonObject { ["instruction"] = entry.Instruction, ["input"] = entry.Input, ["response"] = response }.ToJsonString(Json.Options));
                else
                    context.Output.WriteLine(response);
            }
            return 0;
        }));
        return command;
    }

    public static Command Judge(CliContext context)
    {
        var responses = new Option<string>("--responses") { Description = "Entries with \"model_response\" (gpt finetune instruct writes test-responses.json).", Required = true };
        var url = new Option<string?>("--url") { Description = "The judge's server: Ollama (http://localhost:11434, the book's) or an OpenAI-compatible endpoint. Without it: only exact match and token F1." };
        var model = new Option<string>("--model") { Description = "The judge model the server runs (the book: llama3).", DefaultValueFactory = _ => "llama3" };
        var api = new Option<string>("--api") { Description = "ollama or openai (POST /v1/chat/completions).", DefaultValueFactory = _ => "ollama" };
        api.AcceptOnlyFromAmong("ollama", "openai");
        var attempts = new Option<int>("--attempts") { Description = "Tries per response.", DefaultValueFactory = _ => 3 };
        var format = Commands.FormatOption();
        var command = new Command("judge",
            "Score responses (book section 7.8): exact match and token F1 always; with --url, a judge model's 0-100 score for each, " +
            "asked with the book's prompt. JSON output: one object per entry, then {\"summary\": ...}.")
        {
            responses, url, model, api, attempts, format,
        };
        command.SetAction(parse => CliApp.Guard(context, () =>
        {
            var json = parse.GetValue(format) == "json";
            var judge = parse.GetValue(url) is { } address
                ? new JudgeSettings(address, parse.GetValue(api)!, parse.GetValue(model)!, Environment.GetEnvironmentVariable("OPENAI_API_KEY"), parse.GetValue(attempts))
                : null;
            var summary = ResponseScores.Score(parse.GetValue(responses)!, judge, scored =>
            {
                if (json)
                    context.Output.WriteLine(new JsonObject
                    {
                        ["instruction"] = scored.Entry.Instruction, ["input"] = scored.Entry.Input, ["output"] = scored.Entry.Output,
                        ["model_response"] = scored.Response, ["exact_match"] = scored.ExactMatch, ["token_f1"] = scored.TokenF1,
                        ["score"] = scored.Score,
                    }.ToJsonString(Json.Options));
                else
                    context.Output.WriteLine($"{(scored.Score is { } s ? s.ToString() : "-"),3}  {scored.ExactMatch:0}  {scored.TokenF1:0.00}  {RunDisplay.OneLine(scored.Response)}");
            }, context.Cancellation);
            var result = new JsonObject
            {
                ["entries"] = summary.Entries, ["exact_match"] = summary.ExactMatch, ["token_f1"] = summary.TokenF1,
                ["average_score"] = summary.AverageScore, ["scored"] = summary.Scored,
            };
            if (json) context.Output.WriteLine(new JsonObject { ["summary"] = result }.ToJsonString(Json.Options));
            else
                context.Output.WriteLine($"{summary.Entries} responses: exact match {summary.ExactMatch:P1}, token F1 {summary.TokenF1:0.000}" +
                                         (summary.AverageScore is { } average ? $", judge score {average:0.0} (of {summary.Scored} scored)" : ""));
            return 0;
        }));
        return command;
    }

    /// <summary>JSON Lines {"instruction", "input"} from standard input, with a clear error naming the line.</summary>
    private static List<InstructionEntry> ReadEntries(CliContext context)
    {
        var result = new List<InstructionEntry>();
        if (!context.InputRedirected) return result;
        var number = 0;
        while (context.Input.ReadLine() is { } line)
        {
            number++;
            if (string.IsNullOrWhiteSpace(line)) continue;
            try
            {
                var node = JsonNode.Parse(line);
                result.Add(new InstructionEntry(
                    node?["instruction"]?.GetValue<string>() ?? throw new GptException($"standard input line {number}: expected {{\"instruction\": ...}}"),
                    node["input"]?.GetValue<string>() ?? ""));
            }
            catch (Exception e) when (e is JsonException or InvalidOperationException or FormatException)
            {
                throw new GptException($"standard input line {number}: expected a JSON object {{\"instruction\", \"input\"}} ({e.Message})");
            }
        }
        return result;
    }
}
