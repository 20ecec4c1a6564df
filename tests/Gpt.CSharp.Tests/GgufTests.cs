using System.Text;
using System.Text.Json;
using Xunit;

namespace Gpt.CSharp.Tests;

/// <summary><c>gpt bench gguf</c> (issue 18's llama.cpp comparison): the file read back by a minimal GGUF v3 reader written
/// here from the specification, and one weight compared with the Hugging Face fixture's own bytes.</summary>
public class GgufTests
{
    private sealed record TensorInfo(string Name, ulong[] Dims, uint Type, ulong Offset);

    private sealed record GgufFile(uint Version, Dictionary<string, object> Metadata, List<TensorInfo> Tensors, long DataStart, byte[] Bytes);

    private static string ReadString(BinaryReader reader) => Encoding.UTF8.GetString(reader.ReadBytes(checked((int)reader.ReadUInt64())));

    private static object ReadValue(BinaryReader reader, uint type) => type switch
    {
        0 => reader.ReadByte(), 1 => reader.ReadSByte(), 2 => reader.ReadUInt16(), 3 => reader.ReadInt16(),
        4 => reader.ReadUInt32(), 5 => reader.ReadInt32(), 6 => reader.ReadSingle(), 7 => reader.ReadByte() != 0,
        8 => ReadString(reader), 10 => reader.ReadUInt64(), 11 => reader.ReadInt64(), 12 => reader.ReadDouble(),
        9 => ReadArray(reader),
        _ => throw new InvalidDataException($"unknown GGUF value type {type}"),
    };

    private static object[] ReadArray(BinaryReader reader)
    {
        var type = reader.ReadUInt32();
        var count = checked((int)reader.ReadUInt64());
        return Enumerable.Range(0, count).Select(_ => ReadValue(reader, type)).ToArray();
    }

    private static GgufFile Read(string path)
    {
        var bytes = File.ReadAllBytes(path);
        using var reader = new BinaryReader(new MemoryStream(bytes));
        Assert.Equal("GGUF", Encoding.ASCII.GetString(reader.ReadBytes(4)));
        var version = reader.ReadUInt32();
        var tensorCount = reader.ReadUInt64();
        var keyCount = reader.ReadUInt64();
        var metadata = new Dictionary<string, object>();
        for (ulong i = 0; i < keyCount; i++)
        {
            var key = ReadString(reader);
            metadata.Add(key, ReadValue(reader, reader.ReadUInt32()));
        }
        var tensors = new List<TensorInfo>();
        for (ulong i = 0; i < tensorCount; i++)
        {
            var name = ReadString(reader);
            var dims = Enumerable.Range(0, (int)reader.ReadUInt32()).Select(_ => reader.ReadUInt64()).ToArray();
            tensors.Add(new TensorInfo(name, dims, reader.ReadUInt32(), reader.ReadUInt64()));
        }
        var alignment = metadata.TryGetValue("general.alignment", out var a) ? (long)(uint)a : 32;
        var dataStart = (reader.BaseStream.Position + alignment - 1) / alignment * alignment;
        return new GgufFile(version, metadata, tensors, dataStart, bytes);
    }

    /// <summary>A tensor of the Hugging Face fixture, read straight from its safetensors file (float32).</summary>
    private static (long[] Shape, float[] Values) SafetensorsTensor(string file, string name)
    {
        var bytes = File.ReadAllBytes(file);
        var headerLength = (int)BitConverter.ToUInt64(bytes, 0);
        using var header = JsonDocument.Parse(bytes.AsMemory(8, headerLength));
        var entry = header.RootElement.GetProperty(name);
        Assert.Equal("F32", entry.GetProperty("dtype").GetString());
        var shape = entry.GetProperty("shape").EnumerateArray().Select(d => d.GetInt64()).ToArray();
        var offsets = entry.GetProperty("data_offsets").EnumerateArray().Select(d => d.GetInt32()).ToArray();
        var values = new float[(offsets[1] - offsets[0]) / 4];
        Buffer.BlockCopy(bytes, 8 + headerLength + offsets[0], values, 0, values.Length * 4);
        return (shape, values);
    }

    private static GgufFile Write(Fixtures.TempDir temp, string dtype)
    {
        var path = temp.File($"tiny-{dtype}.gguf");
        var (code, output, error) = Cli.Run(null, "bench", "gguf", "--model", Fixtures.TinyGpt2, "--out", path, "--dtype", dtype, "--format", "json");
        Assert.True(code == 0, error);
        using var result = JsonDocument.Parse(output.Trim());
        Assert.Equal(29, result.RootElement.GetProperty("tensors").GetInt32());
        Assert.Equal(new FileInfo(path).Length, result.RootElement.GetProperty("bytes").GetInt64());
        Assert.Empty(Directory.GetFiles(temp.Path, "*.tmp-*"));
        return Read(path);
    }

    [Fact]
    public void TinyModelAsF32HasLlamaCppsGpt2LayoutAndTheFixturesWeights()
    {
        using var temp = new Fixtures.TempDir();
        var gguf = Write(temp, "f32");
        Assert.Equal(3u, gguf.Version);
        var m = gguf.Metadata;
        Assert.Equal("gpt2", m["general.architecture"]);
        Assert.Equal(0u, m["general.file_type"]);
        Assert.Equal(16u, m["gpt2.context_length"]);
        Assert.Equal(32u, m["gpt2.embedding_length"]);
        Assert.Equal(128u, m["gpt2.feed_forward_length"]);
        Assert.Equal(2u, m["gpt2.block_count"]);
        Assert.Equal(4u, m["gpt2.attention.head_count"]);
        Assert.Equal(1e-5f, (float)m["gpt2.attention.layer_norm_epsilon"]);
        Assert.Equal("gpt2", m["tokenizer.ggml.model"]);
        Assert.Equal(50256u, m["tokenizer.ggml.bos_token_id"]);
        Assert.Equal(50256u, m["tokenizer.ggml.eos_token_id"]);
        var tokens = (object[])m["tokenizer.ggml.tokens"];
        Assert.Equal(50257, tokens.Length);
        Assert.Equal("!", tokens[0]);
        Assert.Equal("\u0120", tokens[220]); // " ": the space byte is U+0120 in GPT-2's byte alphabet
        Assert.Equal("\u0120the", tokens[262]);
        Assert.Equal("<|endoftext|>", tokens[50256]);
        var types = (object[])m["tokenizer.ggml.token_type"];
        Assert.Equal(3, types[50256]);
        Assert.Equal(1, types[262]);
        var merges = (object[])m["tokenizer.ggml.merges"];
        Assert.Equal(50000, merges.Length);
        Assert.Equal("\u0120 t", merges[0]); // vocab.bpe's first merge
        Assert.Equal("\u0120t he", merges[6]); // " the" (id 262 = 256 + 6) from " t" + "he"

        var expectedNames = new List<string> { "token_embd.weight", "position_embd.weight" };
        for (var i = 0; i < 2; i++)
            foreach (var part in new[] { "attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down" })
                expectedNames.AddRange([$"blk.{i}.{part}.weight", $"blk.{i}.{part}.bias"]);
        expectedNames.AddRange(["output_norm.weight", "output_norm.bias", "output.weight"]);
        Assert.Equal(expectedNames, gguf.Tensors.Select(t => t.Name));
        var byName = gguf.Tensors.ToDictionary(t => t.Name);
        Assert.Equal([32ul, 50257ul], byName["token_embd.weight"].Dims);
        Assert.Equal([32ul, 16ul], byName["position_embd.weight"].Dims);
        Assert.Equal([32ul, 96ul], byName["blk.0.attn_qkv.weight"].Dims);
        Assert.Equal([96ul], byName["blk.0.attn_qkv.bias"].Dims);
        Assert.Equal([32ul, 128ul], byName["blk.1.ffn_up.weight"].Dims);
        Assert.Equal([128ul, 32ul], byName["blk.1.ffn_down.weight"].Dims);
        Assert.Equal([32ul, 50257ul], byName["output.weight"].Dims);
        Assert.All(gguf.Tensors, t => Assert.Equal(0u, t.Type));
        Assert.Equal(0, gguf.DataStart % 32);
        ulong end = 0;
        foreach (var t in gguf.Tensors)
        {
            Assert.True(t.Offset % 32 == 0, $"{t.Name} at offset {t.Offset}: not a multiple of 32");
            Assert.True(t.Offset >= end, $"{t.Name} at offset {t.Offset} overlaps the previous tensor (ending at {end})");
            end = t.Offset + t.Dims.Aggregate(4ul, (n, d) => n * d);
        }
        Assert.True(gguf.DataStart + (long)end <= gguf.Bytes.Length, "the last tensor runs past the end of the file");

        // Hugging Face stores c_attn as Conv1D [in 32, out 96]; ggml's [32, 96] is row-major [out][in]: the transpose.
        var (shape, conv1D) = SafetensorsTensor(Path.Combine(Fixtures.TinyGpt2, "model.safetensors"), "h.0.attn.c_attn.weight");
        Assert.Equal([32L, 96L], shape);
        var qkv = byName["blk.0.attn_qkv.weight"];
        var start = (int)(gguf.DataStart + (long)qkv.Offset);
        for (var output = 0; output < 96; output++)
            for (var input = 0; input < 32; input++)
            {
                var written = BitConverter.ToSingle(gguf.Bytes, start + 4 * (output * 32 + input));
                Assert.True(written == conv1D[input * 96 + output], $"blk.0.attn_qkv.weight[{output}, {input}] = {written}, expected {conv1D[input * 96 + output]}");
            }
        // The head is tied: output.weight is the embedding's copy.
        var embedding = byName["token_embd.weight"];
        var head = byName["output.weight"];
        Assert.True(gguf.Bytes.AsSpan((int)(gguf.DataStart + (long)embedding.Offset), 32 * 50257 * 4)
            .SequenceEqual(gguf.Bytes.AsSpan((int)(gguf.DataStart + (long)head.Offset), 32 * 50257 * 4)), "output.weight differs from token_embd.weight");
    }

    [Fact]
    public void TinyModelAsF16HasHalfMatricesAndFloatVectors()
    {
        using var temp = new Fixtures.TempDir();
        var gguf = Write(temp, "f16");
        Assert.Equal(1u, gguf.Metadata["general.file_type"]);
        var byName = gguf.Tensors.ToDictionary(t => t.Name);
        Assert.Equal(1u, byName["blk.0.attn_qkv.weight"].Type);
        Assert.Equal(1u, byName["token_embd.weight"].Type);
        Assert.Equal(0u, byName["blk.0.attn_qkv.bias"].Type);
        Assert.Equal(0u, byName["output_norm.weight"].Type);
        var (_, conv1D) = SafetensorsTensor(Path.Combine(Fixtures.TinyGpt2, "model.safetensors"), "h.1.mlp.c_proj.weight"); // [128, 32]
        var start = (int)(gguf.DataStart + (long)byName["blk.1.ffn_down.weight"].Offset);
        var written = (float)BitConverter.ToHalf(gguf.Bytes, start + 2 * (5 * 128 + 7)); // [out 5, in 7]
        Assert.Equal((float)(Half)conv1D[7 * 32 + 5], written);
    }

    [Fact]
    public void AnUnknownDtypeIsRefused()
    {
        using var temp = new Fixtures.TempDir();
        var (code, _, error) = Cli.Run(null, "bench", "gguf", "--model", Fixtures.TinyGpt2, "--out", temp.File("x.gguf"), "--dtype", "q4");
        Assert.NotEqual(0, code);
        Assert.Contains("expected f32 or f16", error);
        Assert.False(File.Exists(temp.File("x.gguf")));
    }
}
