using System.Text.Json;
using Xunit;

namespace Gpt.CSharp.Tests;

/// <summary>Generation stops at the model's own end-of-text token unless told otherwise: config.json's eos_token_id,
/// else 50256 when the vocabulary has it, else none (issue 14).</summary>
public class EndOfTextTests
{
    private static readonly GptConfiguration Small = new()
    {
        VocabularySize = 97, ContextLength = 12, EmbeddingDim = 16, Heads = 4, Layers = 2, DropRate = 0,
    };

    /// <summary>A saved 97-token model, and the token its greedy continuation of [1, 2] starts with.</summary>
    private static (string Directory, int FirstGreedy) SmallModel(Fixtures.TempDir temp)
    {
        using var model = GptModel.Create(Small, 1);
        var directory = temp.File("small");
        model.Save(directory);
        return (directory, model.Generate([1, 2], new GenerationSettings { MaxNewTokens = 1, EndOfTextId = null }).NewIds[0]);
    }

    private static void SetEndOfText(string directory, int id)
    {
        var path = Path.Combine(directory, "config.json");
        File.WriteAllText(path, File.ReadAllText(path).Replace("\"eos_token_id\": null", $"\"eos_token_id\": {id}"));
    }

    [Fact]
    public void TheDefaultSettingsUseTheModelsEndOfTextToken()
    {
        using var temp = new Fixtures.TempDir();
        var (directory, first) = SmallModel(temp);
        Assert.True(new GenerationSettings().UsesModelEndOfText);
        Assert.Null(new GenerationSettings().EndOfTextId);
        Assert.False((new GenerationSettings() with { EndOfTextId = null }).UsesModelEndOfText);
        Assert.True((new GenerationSettings() with { MaxNewTokens = 3 }).UsesModelEndOfText);

        // No eos_token_id and no 50256 in the vocabulary: no end-of-text token, and no error although nothing was set.
        using (var model = GptModel.Load(directory))
        {
            Assert.Null(model.EndOfTextId);
            var result = model.Generate([1, 2], new GenerationSettings { MaxNewTokens = 5 });
            Assert.Equal(5, result.NewIds.Length);
            var error = Assert.Throws<GptException>(() => model.Generate([1, 2], new GenerationSettings { MaxNewTokens = 5, EndOfTextId = 50256 }));
            Assert.Contains("end-of-text id 50256 is outside the model's vocabulary (0..96)", error.Message);
        }

        // The config's eos_token_id: the greedy first token, so generation stops at once.
        SetEndOfText(directory, first);
        using (var model = GptModel.Load(directory))
        {
            Assert.Equal(first, model.EndOfTextId);
            var result = model.Generate([1, 2], new GenerationSettings { MaxNewTokens = 5 });
            Assert.Empty(result.NewIds);
            Assert.True(result.StoppedAtEndOfText);
            Assert.Equal(5, model.Generate([1, 2], new GenerationSettings { MaxNewTokens = 5, EndOfTextId = null }).NewIds.Length);
        }

        using var gpt2 = GptModel.Load(Fixtures.TinyGpt2);
        Assert.Equal(50256, gpt2.EndOfTextId);
        using var fresh = GptModel.Create(Small with { VocabularySize = 50257 }, 1);
        Assert.Equal(50256, fresh.EndOfTextId);
    }

    [Fact]
    public void GenerateAndRespondUseTheModelsEndOfTextToken()
    {
        using var temp = new Fixtures.TempDir();
        var (directory, first) = SmallModel(temp);
        // Before: "the end-of-text id 50256 is outside the model's vocabulary" although nothing was asked for.
        var (code, output, error) = Cli.Run(null, "generate", "--model", directory, "--ids", "1,2", "--max-new-tokens", "4", "--format", "json");
        Assert.True(code == 0, error);
        using (var json = JsonDocument.Parse(output))
        {
            Assert.Equal(6, json.RootElement.GetProperty("ids").GetArrayLength());
            Assert.Equal("max_new_tokens", json.RootElement.GetProperty("stop_reason").GetString());
        }
        var (info, infoOutput, infoError) = Cli.Run(null, "info", "--model", directory, "--format", "json");
        Assert.True(info == 0, infoError);
        Assert.Contains("\"end_of_text_id\":null", infoOutput);

        SetEndOfText(directory, first);
        (code, output, error) = Cli.Run(null, "generate", "--model", directory, "--ids", "1,2", "--max-new-tokens", "4", "--format", "json");
        Assert.True(code == 0, error);
        using (var json = JsonDocument.Parse(output)) Assert.Equal("eos", json.RootElement.GetProperty("stop_reason").GetString());
        (code, output, error) = Cli.Run(null, "generate", "--model", directory, "--ids", "1,2", "--max-new-tokens", "4", "--no-eos", "--format", "json");
        Assert.True(code == 0, error);
        using (var json = JsonDocument.Parse(output)) Assert.Equal("max_new_tokens", json.RootElement.GetProperty("stop_reason").GetString());
        (info, infoOutput, infoError) = Cli.Run(null, "info", "--model", directory, "--format", "json");
        Assert.True(info == 0, infoError);
        Assert.Contains($"\"end_of_text_id\":{first}", infoOutput);
        (code, _, error) = Cli.Run(null, "generate", "--model", directory, "--ids", "1,2", "--eos", "50256");
        Assert.Equal(1, code);
        Assert.Contains("end-of-text id 50256 is outside the model's vocabulary", error);
    }

    [Fact]
    public void RespondStopsAtTheModelsEndOfTextToken()
    {
        using var temp = new Fixtures.TempDir();
        var directory = temp.File("instruct");
        var entry = new InstructionEntry("Give the plural of the noun.", "boat");
        int first;
        using (var model = InstructionModel.Load(Fixtures.TinyGpt2))
        {
            first = model.Model.Generate(model.Prompt(entry), new GenerationSettings { MaxNewTokens = 1, EndOfTextId = null }).NewIds[0];
            Assert.NotEqual(50256, first);
            model.Model.Save(directory);
        }
        var path = Path.Combine(directory, "config.json");
        File.WriteAllText(path, File.ReadAllText(path).Replace("\"eos_token_id\": 50256", $"\"eos_token_id\": {first}"));
        using (var model = InstructionModel.Load(directory))
        {
            Assert.Equal(first, model.Model.EndOfTextId);
            Assert.Equal("", model.Respond(entry, new GenerationSettings { MaxNewTokens = 3 }));
            Assert.NotEqual("", model.Respond(entry, new GenerationSettings { MaxNewTokens = 3, EndOfTextId = null }));
        }
        var (code, output, error) = Cli.Run(null, "respond", "--model", directory, "--instruction", entry.Instruction, "--input", entry.Input,
            "--max-new-tokens", "3", "--format", "json");
        Assert.True(code == 0, error);
        using var json = JsonDocument.Parse(output);
        Assert.Equal("", json.RootElement.GetProperty("response").GetString());
    }
}
