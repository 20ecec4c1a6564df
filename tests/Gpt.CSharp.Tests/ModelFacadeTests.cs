using Gpt;
using Xunit;

namespace Gpt.CSharp.Tests;

public class ModelFacadeTests
{
    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void LogitsMatchTheIndependentPyTorchReference(bool f16Prefixed)
    {
        var directory = f16Prefixed ? Fixtures.TinyGpt2F16 : Fixtures.TinyGpt2;
        var reference = Fixtures.Load(directory);
        using var model = GptModel.Load(directory);
        var logits = model.Logits(reference.InputIds);
        Assert.Equal(2, logits.Length);
        Assert.Equal(50257, logits[0][0].Length);
        for (var i = 0; i < reference.LogitsFirst.Length; i++)
            Assert.True(Math.Abs(logits[0][0][i] - reference.LogitsFirst[i]) < 1e-4, $"logit {i}: {logits[0][0][i]} vs {reference.LogitsFirst[i]}");
        var sum = logits.SelectMany(b => b).SelectMany(t => t).Sum(v => (double)v);
        Assert.True(Math.Abs(sum - reference.LogitsSum) < 1e-2, $"sum of logits {sum} vs {reference.LogitsSum}");
    }

    [Fact]
    public void GreedyContinuationMatchesTheReferenceExactly()
    {
        var reference = Fixtures.Load(Fixtures.TinyGpt2);
        using var model = GptModel.Load(Fixtures.TinyGpt2);
        var newTokens = reference.GreedyIds.Length - reference.GreedyPrompt.Length;
        Assert.Equal(reference.GreedyIds, model.GenerateGreedy(reference.GreedyPrompt, newTokens));
        foreach (var cache in new[] { true, false })
        {
            var result = model.Generate(reference.GreedyPrompt, new GenerationSettings { MaxNewTokens = newTokens, EndOfTextId = null, UseKvCache = cache });
            Assert.Equal(reference.GreedyIds, result.AllIds);
            Assert.False(result.StoppedAtEndOfText);
        }
    }

    [Theory]
    [InlineData(Dtype.Float16)]
    [InlineData(Dtype.BFloat16)]
    public void HalfPrecisionWeightsGiveTheReferenceGreedyIds(Dtype dtype)
    {
        var reference = Fixtures.Load(Fixtures.TinyGpt2);
        using var model = GptModel.Load(Fixtures.TinyGpt2);
        var newTokens = reference.GreedyIds.Length - reference.GreedyPrompt.Length;
        foreach (var cache in new[] { true, false })
        {
            var settings = new GenerationSettings { MaxNewTokens = newTokens, EndOfTextId = null, UseKvCache = cache, Dtype = dtype };
            Assert.Equal(reference.GreedyIds, model.Generate(reference.GreedyPrompt, settings).AllIds);
        }
        var streamed = model.Stream("Hello", _ => { }, new GenerationSettings { MaxNewTokens = 8, EndOfTextId = null, Dtype = dtype });
        Assert.Equal(model.Generate("Hello", new GenerationSettings { MaxNewTokens = 8, EndOfTextId = null, Dtype = dtype }).Text, streamed);
    }

    [Fact]
    public void SaveLoadRoundTripReproducesLogitsExactly()
    {
        using var dir = new Fixtures.TempDir();
        var configuration = new GptConfiguration { VocabularySize = 300, ContextLength = 12, EmbeddingDim = 16, Heads = 2, Layers = 2, QkvBias = false, TiedHead = false };
        using var model = GptModel.Create(configuration, seed: 7);
        var path = dir.File("model");
        model.Save(path);
        Assert.True(File.Exists(Path.Combine(path, "config.json")));
        Assert.True(File.Exists(Path.Combine(path, "model.safetensors")));
        using var loaded = GptModel.Load(path);
        Assert.Equal(configuration with { }, loaded.Configuration with { DropRate = configuration.DropRate });
        var ids = new[] { new[] { 1, 2, 3, 299 } };
        Assert.Equal(model.Logits(ids)[0][3], loaded.Logits(ids)[0][3]);
        Assert.Equal(model.ParameterCount, configuration.ParameterCount);
    }

    [Fact]
    public void TheBooksParameterCounts()
    {
        var book = GptConfiguration.Gpt2Small with { QkvBias = false, TiedHead = false };
        Assert.Equal(163_009_536, book.ParameterCount);
        Assert.Equal(621.83, Math.Round(book.MemoryBytes / (1024.0 * 1024.0), 2));
        Assert.Equal(124_412_160, (book with { TiedHead = true }).ParameterCount);
        Assert.Equal(124_439_808, GptConfiguration.Gpt2Small.ParameterCount);
        Assert.Equal(GptConfiguration.FromPreset("gpt2-medium"), GptConfiguration.Gpt2Medium);
    }

    [Fact]
    public void BadConfigurationsAndInputsAreClearErrors()
    {
        var error = Assert.Throws<GptException>(() => GptModel.Create(new GptConfiguration { EmbeddingDim = 770, Heads = 12 }));
        Assert.Contains("770", error.Message);
        Assert.Contains("12 heads", error.Message);
        Assert.Throws<GptException>(() => GptConfiguration.FromPreset("gpt5"));
        using var model = GptModel.Load(Fixtures.TinyGpt2);
        var tooLong = Assert.Throws<GptException>(() => model.Logits([Enumerable.Range(0, 17).ToArray()]));
        Assert.Contains("context length 16", tooLong.Message);
        var outside = Assert.Throws<GptException>(() => model.Logits([[50257]]));
        Assert.Contains("outside the vocabulary", outside.Message);
        var ragged = Assert.Throws<GptException>(() => model.Logits([[1, 2], [3]]));
        Assert.Contains("equal lengths", ragged.Message);
        var missing = Assert.Throws<GptException>(() => GptModel.Load(Path.Combine(Fixtures.Root, "no-such-model")));
        Assert.Contains("no-such-model", missing.Message);
    }
}

public class GenerationFacadeTests
{
    private static readonly GptModel Model = GptModel.Load(Fixtures.TinyGpt2);

    [Fact]
    public void SameSeedSameTextDifferentSeedsDiffer()
    {
        lock (Model)
        {
            GenerationSettings Sampling(long seed) => new() { MaxNewTokens = 12, Temperature = 1.5, TopK = 200, Seed = seed, EndOfTextId = null };
            var a = Model.Generate("Hello, I am", Sampling(1));
            var b = Model.Generate("Hello, I am", Sampling(1));
            Assert.Equal(a.NewIds, b.NewIds);
            var distinct = Enumerable.Range(2, 10).Select(s => string.Join(",", Model.Generate("Hello, I am", Sampling(s)).NewIds)).Distinct().Count();
            Assert.True(distinct >= 9, $"only {distinct} distinct samples from 10 seeds");
        }
    }

    [Fact]
    public async Task StreamingPiecesConcatenateToTheGeneratedText()
    {
        var settings = new GenerationSettings { MaxNewTokens = 20, Temperature = 1.0, Seed = 5, EndOfTextId = null };
        string expected;
        lock (Model) expected = Model.Generate("The harbor clock", settings).Text;
        var pieces = new List<string>();
        await foreach (var piece in Model.StreamAsync("The harbor clock", settings)) pieces.Add(piece);
        Assert.Equal(expected, string.Concat(pieces));
        Assert.True(pieces.Count > 1);
    }

    [Fact]
    public async Task StreamingStopsOnCancellation()
    {
        using var cancellation = new CancellationTokenSource();
        var count = 0;
        await Assert.ThrowsAnyAsync<OperationCanceledException>(async () =>
        {
            await foreach (var _ in Model.StreamAsync("Hello", new GenerationSettings { MaxNewTokens = 40, EndOfTextId = null }, cancellationToken: cancellation.Token))
            {
                if (++count == 3) cancellation.Cancel();
            }
        });
        Assert.Equal(3, count);
    }

    [Fact]
    public void SeveralPromptsEachStopOnTheirOwn()
    {
        lock (Model)
        {
            var results = Model.Generate(["Hello", "A much longer prompt than the first"], new GenerationSettings { MaxNewTokens = 5, EndOfTextId = null });
            Assert.Equal(2, results.Count);
            Assert.All(results, r => Assert.Equal(5, r.NewIds.Length));
            var single = Model.Generate("A much longer prompt than the first", new GenerationSettings { MaxNewTokens = 5, EndOfTextId = null });
            Assert.Equal(single.NewIds, results[1].NewIds);
        }
    }

    [Fact]
    public void BadSettingsAreClearErrors()
    {
        var error = Assert.Throws<GptException>(() => Model.Generate("Hi", new GenerationSettings { TopP = 1.5 }));
        Assert.Contains("1.5", error.Message);
        Assert.Throws<GptException>(() => Model.Generate("Hi", new GenerationSettings { Temperature = -1 }));
        Assert.Throws<GptException>(() => Model.Generate("Hi", new GenerationSettings { TopK = 0 }));
    }
}
