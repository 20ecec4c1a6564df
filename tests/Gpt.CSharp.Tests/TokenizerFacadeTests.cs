using Gpt;
using TorchSharp;
using Xunit;

namespace Gpt.CSharp.Tests;

public class TokenizerFacadeTests
{
    [Fact]
    public void Gpt2EncodesTheBookSentence()
    {
        var ids = Tokenizer.Gpt2.Encode("Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace.");
        Assert.Equal(new[] { 15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812, 2114, 286, 617, 34680, 27271, 13 }, ids);
        Assert.Equal(50257, Tokenizer.Gpt2.VocabularySize);
        Assert.Equal(50256, Tokenizer.Gpt2.EndOfTextId);
    }

    [Fact]
    public void Gpt2RoundTripsAcrossPlanes()
    {
        const string text = "naïve café 𝐀's 😀👍🏽 日本語 \t\n  end";
        Assert.Equal(text, Tokenizer.Gpt2.Decode(Tokenizer.Gpt2.Encode(text)));
    }

    [Fact]
    public void StreamDecoderNeverEmitsHalfACharacter()
    {
        const string text = "emoji 😀 and 日本";
        var decoder = Tokenizer.Gpt2.CreateStreamDecoder();
        var pieces = Tokenizer.Gpt2.Encode(text).Select(decoder.Push).Append(decoder.Flush()).ToList();
        Assert.DoesNotContain(pieces, p => p.Contains('\uFFFD'));
        Assert.Equal(text, string.Concat(pieces));
    }

    [Fact]
    public void SimpleTokenizerV1NamesUnknownWords()
    {
        var tokenizer = new SimpleTokenizerV1("the cat sat on the mat.");
        var error = Assert.Throws<GptException>(() => tokenizer.Encode("the dog"));
        Assert.Contains("'dog'", error.Message);
        Assert.Equal("the cat sat.", tokenizer.Decode(tokenizer.Encode("the cat sat.")));
    }

    [Fact]
    public void SimpleTokenizerV2MapsUnknownWords()
    {
        var tokenizer = new SimpleTokenizerV2("the cat sat on the mat.");
        Assert.Equal("the <|unk|> sat. <|endoftext|> the mat.", tokenizer.Decode(tokenizer.Encode("the dog sat. <|endoftext|> the mat.")));
        Assert.Equal("<|unk|>", tokenizer.Vocabulary[^1]);
    }

    [Fact]
    public void TokenizerByNameRejectsUnknownNames()
    {
        var error = Assert.Throws<GptException>(() => Tokenizer.FromName("bert"));
        Assert.Contains("'gpt2' or 'simple'", error.Message);
        Assert.Equal("simple", Tokenizer.FromName("simple").Name);
        Assert.Null(new SimpleTokenizerV1("a").Vocabulary.FirstOrDefault(v => v == "<|unk|>"));
    }

    [Fact]
    public void NullArgumentsAreRejected()
    {
        Assert.Throws<ArgumentNullException>(() => Tokenizer.Gpt2.Encode(null!));
        Assert.Throws<ArgumentNullException>(() => Tokenizer.Gpt2.Decode(null!));
        Assert.Throws<ArgumentNullException>(() => Corpus.Load(null!));
    }
}

public class DatasetFacadeTests
{
    [Fact]
    public void DatasetOverTheBuiltInStoryGivesShiftedWindowsAndBatches()
    {
        var ids = Corpus.Encode(Tokenizer.Gpt2, 256, [Corpus.BuiltInStory]);
        var dataset = new TextDataset(ids, 256, 128);
        Assert.True(dataset.Count > 20);
        var example = dataset[1];
        Assert.Equal(ids.Skip(128).Take(256), example.Input);
        Assert.Equal(ids.Skip(129).Take(256), example.Target);

        var batches = dataset.Batches(batchSize: 4, seed: 1).ToList();
        try
        {
            Assert.Equal(dataset.Count / 4, batches.Count);
            Assert.Equal(new long[] { 4, 256 }, batches[0].Inputs.shape);
            Assert.Equal(torch.int64, batches[0].Targets.dtype);
        }
        finally
        {
            batches.ForEach(b => b.Dispose());
        }
    }

    [Fact]
    public void SameSeedSameOrder()
    {
        var dataset = TextDataset.FromText(Corpus.BuiltInStory.Text, Tokenizer.Gpt2, 16, 16);
        long[] First(int seed)
        {
            using var batch = dataset.Batches(8, seed: seed).First();
            return batch.Inputs.data<long>().ToArray();
        }
        Assert.Equal(First(5), First(5));
        Assert.NotEqual(First(5), First(6));
    }

    [Fact]
    public void TooShortTextSaysHowManyTokensAreNeeded()
    {
        var error = Assert.Throws<GptException>(() => TextDataset.FromText("Hello world", Tokenizer.Gpt2, 256, 128));
        Assert.Contains("at least 257", error.Message);
    }

    [Fact]
    public void EmbeddingShapeIsBatchLengthDim()
    {
        using var embedding = new TokenEmbedding(50257, 4, 256);
        using var ids = torch.randint(50257, [8, 4], dtype: torch.int64);
        using var output = embedding.Forward(ids);
        Assert.Equal(new long[] { 8, 4, 256 }, output.shape);
    }

    [Fact]
    public void CorpusLoadsFoldersAndReportsInvalidUtf8()
    {
        var dir = Directory.CreateTempSubdirectory("gpt-cs-");
        try
        {
            File.WriteAllText(Path.Combine(dir.FullName, "a.txt"), "alpha");
            File.WriteAllBytes(Path.Combine(dir.FullName, "b.txt"), [0x41, 0xFF, 0x42]);
            var error = Assert.Throws<GptException>(() => Corpus.Load(dir.FullName));
            Assert.Contains("b.txt", error.Message);
            Assert.Contains("byte offset 1", error.Message);
            Assert.Equal("alpha", Corpus.Load(Path.Combine(dir.FullName, "a.txt")).Single().Text);
        }
        finally
        {
            dir.Delete(true);
        }
    }
}
