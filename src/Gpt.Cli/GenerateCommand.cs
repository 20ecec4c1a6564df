using System.CommandLine;
using System.Text.Json.Nodes;
using Gpt.Bench;
using Gpt.Generation;

namespace Gpt.Cli;

/// <summary><c>gpt generate</c>: continue prompts with a model.</summary>
internal static class GenerateCommand
{
    public static Command Create(CliContext context)
    {
        var modelPath = ModelCommands.ModelOption();
        var adapter = ModelCommands.AdapterOption();
        var prompts = new Option<string[]>("--prompt") { Description = "Text prompt; repeat for several prompts (each stops on its own)." };
        var ids = new Option<string[]>("--ids") { Description = "Prompt as comma-separated token ids (1,2,3); repeatable. Instead of --prompt." };
        var generation = new GenerationOptions(50);
        var stream = new Option<bool>("--stream") { Description = "Stream text as it is generated (the default for text output)." };
        var noStream = new Option<bool>("--no-stream") { Description = "Print the text only when generation is done." };
        var format = Commands.FormatOption();
        var allowNonFinite = Commands.AllowNonFiniteOption();
        var device = Commands.DeviceOption();
        var command = new Command("generate", "Generate text from a model (greedy by default; temperature, top-k, top-p sampling). " +
                                              "JSON output: one object per prompt {\"ids\": [prompt ids then new ids], \"text\": ...}.")
        {
            modelPath, adapter, prompts, ids, stream, noStream, device, format, allowNonFinite,
        };
        generation.AddTo(command);
        command.SetAction(parse => CliApp.Guard(context, () =>
        {
            var textPrompts = parse.GetValue(prompts) ?? [];
            var idPrompts = parse.GetValue(ids) ?? [];
            if (textPrompts.Length > 0 && idPrompts.Length > 0) throw new GptException("give prompts either as --prompt text or as --ids, not both");
            if (textPrompts.Length == 0 && idPrompts.Length == 0) throw new GptException("no prompt: pass --prompt \"text\" or --ids 1,2,3");
            var settings = generation.Read(parse);
            var tokenizer = Tokenizer.Gpt2;
            var promptIds = textPrompts.Length > 0
                ? textPrompts.Select(p => (IReadOnlyList<int>)tokenizer.Encode(p)).ToList()
                : idPrompts.Select((s, i) => (IReadOnlyList<int>)ModelCommands.ParseIdList(s, $"--ids #{i + 1}")).ToList();
            using var model = ModelCommands.LoadModel(context, parse.GetValue(modelPath), parse.GetValue(adapter), parse.GetValue(allowNonFinite), parse.GetValue(device)!);
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
        var modelPath = new Option<string?>("--model") { Description = "Model directory (default: a freshly initialised gpt2-small, tied head)." };
        var promptTokens = new Option<int>("--prompt-tokens") { Description = "Prompt length.", DefaultValueFactory = _ => 8 };
        var newTokens = new Option<int>("--new-tokens") { Description = "Tokens to generate.", DefaultValueFactory = _ => 64 };
        var noCache = new Option<bool>("--no-kv-cache") { Description = "Measure without the KV cache." };
        var runs = new Option<int>("--runs") { Description = "Timed runs; the figure is their median.", DefaultValueFactory = _ => 3 };
        var device = Commands.DeviceOption();
        var compare = new Option<bool>("--compare-kv-cache")
        {
            Description = "Runs with and without the KV cache, alternating, and reports both and the speed-up (kv_cache_speedup).",
        };
        var dtype = GenerationOptions.DtypeOption();
        var batch = new Option<int>("--batch") { Description = "Prompts generated together (batch throughput: tokens/s counts all of them).", DefaultValueFactory = _ => 1 };
        var torchPath = new Option<bool>("--torch") { Description = "Measure the TorchSharp path (the model's own KV cache) instead of the decoder, for comparison (f32 only)." };
        var bandwidth = new Option<double?>("--bandwidth-gbps")
        {
            Description = "Memory read bandwidth for bandwidth_fraction (default: measured here and now, as gpt bench machine's read_bandwidth_gbps).",
        };
        var command = BenchCommand.Part(context, "generate",
            "Generation speed in tokens/s (greedy, after a warm-up; median of several runs): time to the first token, decoding alone, " +
            "and the fraction of the memory-bandwidth ceiling (every weight is read once per step).", parse =>
        {
            var path = parse.GetValue(modelPath);
            var where = Gpt.Model.DeviceModule.parse(parse.GetValue(device));
            Gpt.Model.DeviceModule.resolve(where); // a device that is not there fails before the model is built
            var weights = GenerationOptions.ParseDtype(parse.GetValue(dtype));
            var torch = parse.GetValue(torchPath);
            using var model = GenerationBench.loadModel(path is null ? null : Microsoft.FSharp.Core.FSharpOption<string>.Some(path));
            var placed = Gpt.Model.DeviceModule.place(where, model);
            var language = GenerationBench.languageModel(model, weights, torch);
            var bytesPerStep = GenerationBench.bytesPerStep(model.Config, weights);
            JsonObject Figures(Throughput t) => new()
            {
                ["tokens_per_s"] = Math.Round(t.TokensPerSecond, 2), ["decode_tokens_per_s"] = Math.Round(t.DecodeTokensPerSecond, 2),
                ["first_token_s"] = Math.Round(t.FirstTokenSeconds, 4), ["prompt_tokens"] = t.PromptTokens, ["new_tokens"] = t.NewTokens,
                ["batch"] = t.BatchSize, ["kv_cache"] = t.UsedKvCache, ["seconds"] = Math.Round(t.Seconds, 3),
                ["runs"] = t.RunTokensPerSecond.Length, ["tensors_per_token"] = Math.Round(t.TensorsPerToken, 1),
                ["run_tokens_per_s"] = new JsonArray(t.RunTokensPerSecond.Select(r => (JsonNode?)Math.Round(r, 2)).ToArray()),
                ["ids"] = new JsonArray(t.Ids.Select(id => (JsonNode?)id).ToArray()),
            };
            var (parallelBefore, serialBefore) = Decoder.stepCounts();
            JsonObject result;
            double decodeStepsPerSecond;
            if (parse.GetValue(compare))
            {
                var (cached, uncached, speedup) = GenerationBench.compareKvCache(language, parse.GetValue(promptTokens), parse.GetValue(newTokens), parse.GetValue(runs)).ToValueTuple();
                result = Figures(cached);
                result["no_cache_tokens_per_s"] = Math.Round(uncached.TokensPerSecond, 2);
                result["no_cache_run_tokens_per_s"] = new JsonArray(uncached.RunTokensPerSecond.Select(r => (JsonNode?)Math.Round(r, 2)).ToArray());
                result["kv_cache_speedup"] = Math.Round(speedup, 2);
                decodeStepsPerSecond = cached.DecodeTokensPerSecond;
            }
            else
            {
                var t = GenerationBench.measureBatch(language, parse.GetValue(promptTokens), parse.GetValue(newTokens), !parse.GetValue(noCache),
                    parse.GetValue(batch), parse.GetValue(runs));
                result = Figures(t);
                decodeStepsPerSecond = t.DecodeTokensPerSecond / t.BatchSize;
            }
            var (parallelAfter, serialAfter) = Decoder.stepCounts();
            var decoderSteps = parallelAfter - parallelBefore + serialAfter - serialBefore;
            // The decoder times its steps on the worker pool and on one thread and takes the faster (it depends on how
            // busy the machine is): the share of steps that ran on the pool.
            if (decoderSteps > 0) result["parallel_steps_fraction"] = Math.Round((double)(parallelAfter - parallelBefore) / decoderSteps, 3);
            var gigabytesPerSecond = parse.GetValue(bandwidth) ?? MachineBench.readBandwidthGbps(512, 7);
            result["dtype"] = weights.Name;
            result["path"] = torch ? "torch" : "decoder";
            result["weight_bytes_per_step"] = bytesPerStep;
            result["bandwidth_gbps"] = Math.Round(gigabytesPerSecond, 2);
            // Every step reads every weight once: bandwidth / bytes is the most steps a second memory allows.
            result["ceiling_steps_per_s"] = Math.Round(gigabytesPerSecond * 1e9 / bytesPerStep, 2);
            result["bandwidth_fraction"] = Math.Round(decodeStepsPerSecond * bytesPerStep / (gigabytesPerSecond * 1e9), 3);
            result["model"] = path ?? "gpt2-small (random weights)";
            result["parameters"] = model.ParameterCount;
            result["device"] = Gpt.Model.DeviceModule.describe(placed);
            return result;
        });
        foreach (var option in new Option[] { modelPath, promptTokens, newTokens, noCache, runs, compare, device, dtype, batch, torchPath, bandwidth })
            command.Add(option);
        return command;
    }
}
