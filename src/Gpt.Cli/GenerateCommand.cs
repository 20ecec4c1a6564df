using System.CommandLine;
using System.Text.Json.Nodes;

namespace Gpt.Cli;

/// <summary><c>gpt generate</c>: continue prompts with a model.</summary>
internal static class GenerateCommand
{
    public static Command Create(CliContext context)
    {
        var modelPath = ModelCommands.ModelOption();
        var prompts = new Option<string[]>("--prompt") { Description = "Text prompt; repeat for several prompts (each stops on its own)." };
        var ids = new Option<string[]>("--ids") { Description = "Prompt as comma-separated token ids (1,2,3); repeatable. Instead of --prompt." };
        var maxNew = new Option<int>("--max-new-tokens") { Description = "Tokens to generate at most.", DefaultValueFactory = _ => 50 };
        var temperature = new Option<double>("--temperature") { Description = "Sampling temperature; 0 = greedy.", DefaultValueFactory = _ => 0.0 };
        var topK = new Option<int?>("--top-k") { Description = "Sample only from the k most likely tokens." };
        var topP = new Option<double?>("--top-p") { Description = "Nucleus sampling: only from the smallest set of tokens whose probability reaches p." };
        var seed = new Option<long?>("--seed") { Description = "Seed for sampling: same seed, same text." };
        var eos = new Option<int>("--eos") { Description = "Stop at this token id.", DefaultValueFactory = _ => 50256 };
        var noEos = new Option<bool>("--no-eos") { Description = "Never stop before --max-new-tokens." };
        var stream = new Option<bool>("--stream") { Description = "Stream text as it is generated (the default for text output)." };
        var noStream = new Option<bool>("--no-stream") { Description = "Print the text only when generation is done." };
        var noCache = new Option<bool>("--no-kv-cache") { Description = "Recompute every position at every step (slower; same result)." };
        var format = Commands.FormatOption();
        var command = new Command("generate", "Generate text from a model (greedy by default; temperature, top-k, top-p sampling). " +
                                              "JSON output: one object per prompt {\"ids\": [prompt ids then new ids], \"text\": ...}.")
        {
            modelPath, prompts, ids, maxNew, temperature, topK, topP, seed, eos, noEos, stream, noStream, noCache, format,
        };
        command.SetAction(parse => CliApp.Guard(context, () =>
        {
            var textPrompts = parse.GetValue(prompts) ?? [];
            var idPrompts = parse.GetValue(ids) ?? [];
            if (textPrompts.Length > 0 && idPrompts.Length > 0) throw new GptException("give prompts either as --prompt text or as --ids, not both");
            if (textPrompts.Length == 0 && idPrompts.Length == 0) throw new GptException("no prompt: pass --prompt \"text\" or --ids 1,2,3");
            var settings = new GenerationSettings
            {
                MaxNewTokens = parse.GetValue(maxNew), Temperature = parse.GetValue(temperature), TopK = parse.GetValue(topK),
                TopP = parse.GetValue(topP), Seed = parse.GetValue(seed), UseKvCache = !parse.GetValue(noCache),
                EndOfTextId = parse.GetValue(noEos) ? null : parse.GetValue(eos),
            };
            var tokenizer = Tokenizer.Gpt2;
            var promptIds = textPrompts.Length > 0
                ? textPrompts.Select(p => (IReadOnlyList<int>)tokenizer.Encode(p)).ToList()
                : idPrompts.Select((s, i) => (IReadOnlyList<int>)ModelCommands.ParseIdList(s, $"--ids #{i + 1}")).ToList();
            using var model = ModelCommands.LoadModel(context, parse.GetValue(modelPath)!);
            var json = parse.GetValue(format) == "json";
            var streaming = !json && !parse.GetValue(noStream) && promptIds.Count == 1 && textPrompts.Length == 1;
            if (streaming)
            {
                context.Output.Write(textPrompts[0]);
                model.Stream(textPrompts[0], piece => { context.Output.Write(piece); context.Output.Flush(); }, settings, tokenizer, context.Cancellation);
                context.Output.WriteLine();
                return 0;
            }
            var results = model.Generate(promptIds, settings, tokenizer);
            for (var i = 0; i < results.Count; i++)
            {
                var r = results[i];
                if (json)
                {
                    var obj = new JsonObject
                    {
                        ["ids"] = new JsonArray(r.AllIds.Select(x => (JsonNode)x).ToArray()),
                        ["text"] = tokenizer.Decode(r.AllIds),
                        ["new_text"] = r.Text,
                        ["stop_reason"] = r.StoppedAtEndOfText ? "eos" : "max_new_tokens",
                    };
                    context.Output.WriteLine(obj.ToJsonString(Json.Options));
                }
                else
                {
                    if (results.Count > 1) context.Output.WriteLine($"--- prompt {i + 1}");
                    context.Output.WriteLine(tokenizer.Decode(r.AllIds));
                }
            }
            return 0;
        }));
        return command;
    }

    /// <summary><c>gpt bench generate</c>.</summary>
    public static Command Bench(CliContext context)
    {
        var modelPath = new Option<string?>("--model") { Description = "Model: a folder, a .pth file or a Hugging Face id (default: a freshly initialised gpt2-small, tied head)." };
        var promptTokens = new Option<int>("--prompt-tokens") { Description = "Prompt length.", DefaultValueFactory = _ => 8 };
        var newTokens = new Option<int>("--new-tokens") { Description = "Tokens to generate.", DefaultValueFactory = _ => 64 };
        var noCache = new Option<bool>("--no-kv-cache") { Description = "Measure without the KV cache." };
        var runs = new Option<int>("--runs") { Description = "Timed runs; the figure is their median.", DefaultValueFactory = _ => 3 };
        var compare = new Option<bool>("--compare-kv-cache")
        {
            Description = "Runs with and without the KV cache, alternating, and reports both and the speed-up (kv_cache_speedup).",
        };
        var command = BenchCommand.Part(context, "generate", "Generation speed in tokens/s (greedy, after a warm-up; median of several runs).", parse =>
        {
            var path = parse.GetValue(modelPath);
            using var model = path is null ? GptModel.Create(GptConfiguration.Gpt2Small, seed: 1) : ModelCommands.LoadModel(context, path);
            JsonObject Figures(GenerationBenchmark t) => new()
            {
                ["tokens_per_s"] = Math.Round(t.TokensPerSecond, 2), ["prompt_tokens"] = t.PromptTokens, ["new_tokens"] = t.NewTokens,
                ["kv_cache"] = t.UsedKvCache, ["seconds"] = Math.Round(t.Seconds, 3), ["first_token_s"] = Math.Round(t.FirstTokenSeconds, 4),
                ["runs"] = t.RunTokensPerSecond.Count, ["tensors_per_token"] = Math.Round(t.TensorsPerToken, 1),
                ["run_tokens_per_s"] = new JsonArray(t.RunTokensPerSecond.Select(r => (JsonNode?)Math.Round(r, 2)).ToArray()),
            };
            JsonObject result;
            if (parse.GetValue(compare))
            {
                var (cached, uncached, speedup) = model.CompareKvCache(parse.GetValue(promptTokens), parse.GetValue(newTokens), parse.GetValue(runs));
                result = Figures(cached);
                result["no_cache_tokens_per_s"] = Math.Round(uncached.TokensPerSecond, 2);
                result["no_cache_run_tokens_per_s"] = new JsonArray(uncached.RunTokensPerSecond.Select(r => (JsonNode?)Math.Round(r, 2)).ToArray());
                result["kv_cache_speedup"] = Math.Round(speedup, 2);
            }
            else
                result = Figures(model.MeasureGeneration(parse.GetValue(promptTokens), parse.GetValue(newTokens), !parse.GetValue(noCache), parse.GetValue(runs)));
            result["model"] = path ?? "gpt2-small (random weights)";
            result["parameters"] = model.ParameterCount;
            return result;
        });
        command.Add(modelPath);
        command.Add(promptTokens);
        command.Add(newTokens);
        command.Add(noCache);
        command.Add(runs);
        command.Add(compare);
        return command;
    }
}
