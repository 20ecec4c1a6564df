// llama.cpp's side of issue 18's comparison: greedy generation from a GGUF through LLamaSharp, timed the way
// `gpt bench generate` times ours (a warm-up, then the median of timed runs), printed as one JSON object.
using System.Diagnostics;
using System.Text.Json;
using System.Text.Json.Nodes;
using LLama;
using LLama.Common;
using LLama.Native;

var options = Options.Parse(args);
NativeLibraryConfig.All.WithLogCallback((level, message) =>
{
    if (level >= LLamaLogLevel.Warning && options.Verbose) Console.Error.Write(message);
});

var parameters = new ModelParams(options.Model)
{
    ContextSize = (uint)(options.Prompt.Length + options.NewTokens + 8),
    GpuLayerCount = 0,
    Threads = options.Threads,
    BatchThreads = options.Threads,
    BatchSize = 512,
};
using var weights = LLamaWeights.LoadFromFile(parameters);

// One greedy generation in a fresh context (created before the clock starts): the prompt in one batch, then one token
// per step; argmax of the last position's logits, as our Sampling.greedy (the first maximum on ties).
(int[] Ids, double First, double Seconds) Run(int newTokens)
{
    using var context = weights.CreateContext(parameters);
    var vocabulary = weights.Vocab.Count;
    var batch = new LLamaBatch();
    var ids = new int[newTokens];
    var clock = Stopwatch.StartNew();
    var first = double.NaN;
    for (var i = 0; i < options.Prompt.Length; i++)
        batch.Add(options.Prompt[i], i, LLamaSeqId.Zero, i == options.Prompt.Length - 1);
    var position = options.Prompt.Length;
    for (var step = 0; step < newTokens; step++)
    {
        var status = context.NativeHandle.Decode(batch);
        if (status != DecodeResult.Ok) throw new InvalidOperationException($"llama_decode failed at step {step}: {status}");
        var logits = context.NativeHandle.GetLogitsIth(batch.TokenCount - 1);
        var best = 0;
        for (var v = 1; v < vocabulary; v++) if (logits[v] > logits[best]) best = v;
        ids[step] = best;
        if (step == 0) first = clock.Elapsed.TotalSeconds;
        batch.Clear();
        batch.Add(best, position++, LLamaSeqId.Zero, true);
    }
    return (ids, first, clock.Elapsed.TotalSeconds);
}

Run(Math.Min(32, options.NewTokens)); // warm-up, as gpt bench generate
var runs = Enumerable.Range(0, options.Runs).Select(_ => Run(options.NewTokens)).ToArray();
var median = runs.OrderBy(r => r.Seconds).ElementAt((runs.Length - 1) / 2);
var result = new JsonObject
{
    ["part"] = "llama.cpp",
    ["tokens_per_s"] = Math.Round(options.NewTokens / median.Seconds, 2),
    ["decode_tokens_per_s"] = options.NewTokens > 1 ? Math.Round((options.NewTokens - 1) / (median.Seconds - median.First), 2) : null,
    ["first_token_s"] = Math.Round(median.First, 4),
    ["prompt_tokens"] = options.Prompt.Length,
    ["new_tokens"] = options.NewTokens,
    ["runs"] = runs.Length,
    ["run_tokens_per_s"] = new JsonArray(runs.Select(r => (JsonNode)Math.Round(options.NewTokens / r.Seconds, 2)).ToArray()),
    ["threads"] = options.Threads,
    ["model"] = options.Model,
    ["ids"] = new JsonArray(median.Ids.Select(id => (JsonNode)id).ToArray()),
    ["same_ids_every_run"] = runs.All(r => r.Ids.SequenceEqual(runs[0].Ids)),
};
Console.WriteLine(result.ToJsonString(new JsonSerializerOptions { WriteIndented = false }));

internal sealed record Options(string Model, int[] Prompt, int NewTokens, int Runs, int Threads, bool Verbose)
{
    // The prompt `gpt bench generate` uses (GenerationBench.benchmarkSetup): id i = (i · 7919 + 13) mod vocabulary.
    private static int[] BenchPrompt(int tokens) => Enumerable.Range(0, tokens).Select(i => (i * 7919 + 13) % 50257).ToArray();

    public static Options Parse(string[] args)
    {
        string? model = null;
        int[]? prompt = null;
        int promptTokens = 8, newTokens = 64, runs = 3, threads = 2;
        var verbose = false;
        for (var i = 0; i < args.Length; i++)
        {
            string Next() => i + 1 < args.Length ? args[++i] : throw new ArgumentException($"{args[i]} needs a value");
            switch (args[i])
            {
                case "--model": model = Next(); break;
                case "--ids": prompt = Next().Split(',').Select(int.Parse).ToArray(); break;
                case "--prompt-tokens": promptTokens = int.Parse(Next()); break;
                case "--new-tokens": newTokens = int.Parse(Next()); break;
                case "--runs": runs = int.Parse(Next()); break;
                case "--threads": threads = int.Parse(Next()); break;
                case "--verbose": verbose = true; break;
                default: throw new ArgumentException($"unknown option {args[i]}: expected --model FILE.gguf [--ids 1,2,3 | --prompt-tokens N] [--new-tokens N] [--runs N] [--threads N] [--verbose]");
            }
        }
        if (model is null) throw new ArgumentException("--model FILE.gguf is required");
        if (newTokens < 1 || runs < 1 || threads < 1) throw new ArgumentException("--new-tokens, --runs and --threads must be at least 1");
        return new Options(model, prompt ?? BenchPrompt(promptTokens), newTokens, runs, threads, verbose);
    }
}
