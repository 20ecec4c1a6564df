using System.CommandLine;

namespace Gpt.Cli;

/// <summary>The options of every command that generates (<c>gpt generate</c>, <c>gpt respond</c>).</summary>
internal sealed class GenerationOptions
{
    public GenerationOptions(int maxNewTokens)
    {
        MaxNewTokens = new("--max-new-tokens") { Description = "Tokens to generate at most.", DefaultValueFactory = _ => maxNewTokens };
        Temperature = new("--temperature") { Description = "Sampling temperature; 0 = greedy.", DefaultValueFactory = _ => 0.0 };
        TopK = new("--top-k") { Description = "Sample only from the k most likely tokens." };
        TopP = new("--top-p") { Description = "Nucleus sampling: only from the smallest set of tokens whose probability reaches p." };
        Seed = new("--seed") { Description = "Seed for sampling: same seed, same text." };
        Eos = new("--eos")
        {
            Description = "Stop at this token id. Default: the model's end-of-text token (eos_token_id of its config.json, else 50256 when the vocabulary has it, else none).",
        };
        NoEos = new("--no-eos") { Description = "Never stop before --max-new-tokens." };
        NoCache = new("--no-kv-cache") { Description = "Recompute every position at every step (slower; same result)." };
        Dtype = DtypeOption();
    }

    /// <summary><c>--dtype f32|f16|bf16</c>: the type the weights are read in for generation.</summary>
    public static Option<string> DtypeOption()
    {
        var option = new Option<string>("--dtype")
        {
            Description = "Weights for generation: f32 (as trained), f16 or bf16 (a copy in half precision: half the bytes to read " +
                          "per token, products still summed in float32).",
            DefaultValueFactory = _ => "f32",
        };
        option.AcceptOnlyFromAmong("f32", "f16", "bf16");
        return option;
    }

    /// <summary>The core's dtype for a <c>--dtype</c> value.</summary>
    public static Gpt.Kernels.Dtype ParseDtype(string? text) => Gpt.Kernels.DtypeModule.parse(text ?? "f32");

    /// <summary>The façade's dtype for a <c>--dtype</c> value.</summary>
    public static Gpt.Dtype ToDtype(string? text) => (text ?? "f32") switch
    {
        "f16" => Gpt.Dtype.Float16,
        "bf16" => Gpt.Dtype.BFloat16,
        _ => Gpt.Dtype.Float32,
    };

    public Option<int> MaxNewTokens { get; }
    public Option<double> Temperature { get; }
    public Option<int?> TopK { get; }
    public Option<double?> TopP { get; }
    public Option<long?> Seed { get; }
    public Option<int?> Eos { get; }
    public Option<bool> NoEos { get; }
    public Option<bool> NoCache { get; }
    public Option<string> Dtype { get; }

    public void AddTo(Command command)
    {
        foreach (var option in new Option[] { MaxNewTokens, Temperature, TopK, TopP, Seed, Eos, NoEos, NoCache, Dtype }) command.Add(option);
    }

    /// <summary>The settings the options give; the end-of-text token stays the model's own unless --eos or --no-eos
    /// is given.</summary>
    public GenerationSettings Read(ParseResult parse)
    {
        var settings = new GenerationSettings
        {
            MaxNewTokens = parse.GetValue(MaxNewTokens), Temperature = parse.GetValue(Temperature), TopK = parse.GetValue(TopK),
            TopP = parse.GetValue(TopP), Seed = parse.GetValue(Seed), UseKvCache = !parse.GetValue(NoCache),
            Dtype = ToDtype(parse.GetValue(Dtype)),
        };
        if (parse.GetValue(NoEos)) return settings with { EndOfTextId = null };
        return parse.GetValue(Eos) is { } eos ? settings with { EndOfTextId = eos } : settings;
    }
}
