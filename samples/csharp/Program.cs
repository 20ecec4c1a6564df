using Gpt;

// A one-layer model with random weights: five greedy tokens of gibberish, but every part runs (tokenizer, model,
// generation) through the packages alone.
using var model = GptModel.Create(GptConfiguration.Gpt2Small with { Layers = 1, EmbeddingDim = 64, Heads = 2, ContextLength = 32 }, 1);
var result = model.Generate("Hello, world", new GenerationSettings { MaxNewTokens = 5, EndOfTextId = null });
Console.WriteLine($"ok {model.ParameterCount} {result.NewIds.Length}");
