using System.Text.Json;

namespace Gpt.CSharp.Tests;

/// <summary>The independent PyTorch reference (reference/make_tiny_gpt2.py) and its recorded outputs.</summary>
internal static class Fixtures
{
    public static string Root
    {
        get
        {
            var root = AppContext.BaseDirectory;
            while (!File.Exists(Path.Combine(root, "Gpt.sln"))) root = Path.GetDirectoryName(root)!;
            return root;
        }
    }

    public static string TinyGpt2 => Path.Combine(Root, "tests", "fixtures", "tiny-gpt2");
    public static string TinyGpt2F16 => Path.Combine(Root, "tests", "fixtures", "tiny-gpt2-f16-prefixed");
    public static string Classifier => Path.Combine(Root, "tests", "fixtures", "classifier", "initial");

    public static Reference Load(string directory)
    {
        using var json = JsonDocument.Parse(File.ReadAllText(Path.Combine(directory, "reference.json")));
        var r = json.RootElement;
        int[] Ints(JsonElement e) => e.EnumerateArray().Select(x => x.GetInt32()).ToArray();
        return new Reference(
            r.GetProperty("input_ids").EnumerateArray().Select(Ints).ToArray(),
            Ints(r.GetProperty("greedy_prompt")),
            Ints(r.GetProperty("greedy_ids")),
            r.GetProperty("logits_first").EnumerateArray().Select(x => x.GetDouble()).ToArray(),
            r.GetProperty("logits_sum").GetDouble());
    }

    /// <summary>Whether the system's libstdc++ defines a symbol version (e.g. GLIBCXX_3.4.32).</summary>
    public static bool HostLibstdcxxHas(string version) =>
        new[] { "/usr/lib/x86_64-linux-gnu/libstdc++.so.6", "/lib/x86_64-linux-gnu/libstdc++.so.6", "/usr/lib64/libstdc++.so.6" }
            .Where(File.Exists)
            .Any(path => System.Text.Encoding.ASCII.GetString(File.ReadAllBytes(path)).Contains(version + "\0"));

    public sealed record Reference(int[][] InputIds, int[] GreedyPrompt, int[] GreedyIds, double[] LogitsFirst, double LogitsSum);

    /// <summary>A temporary folder deleted on dispose.</summary>
    public sealed class TempDir : IDisposable
    {
        public string Path { get; } = Directory.CreateTempSubdirectory("gpt-cs-").FullName;
        public string File(string name) => System.IO.Path.Combine(Path, name);
        public void Dispose() { try { Directory.Delete(Path, true); } catch (IOException) { } }
    }
}
