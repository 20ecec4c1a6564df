using System.Globalization;
using System.Text.Encodings.Web;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace Gpt.Cli;

/// <summary>JSON in the shapes the CLI promises (ids as <c>[15496, 11, 466]</c>).</summary>
internal static class Json
{
    public static readonly JsonSerializerOptions Options = new()
    {
        Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping,
        WriteIndented = false,
    };

    public static string Ids(IEnumerable<int> ids) => "[" + string.Join(", ", ids.Select(i => i.ToString(CultureInfo.InvariantCulture))) + "]";

    public static string String(string text) => JsonSerializer.Serialize(text, Options);

    /// <summary>Parses a JSON string literal, with a clear error.</summary>
    public static string ParseString(string json, string where)
    {
        try
        {
            return JsonSerializer.Deserialize<string>(json)
                   ?? throw new GptException($"{where}: expected a JSON string such as \"Hello\", found null");
        }
        catch (JsonException e)
        {
            throw new GptException($"{where}: expected a JSON string such as \"Hello\", found '{Shorten(json)}' ({e.Message})");
        }
    }

    private static string Shorten(string text) => text.Length <= 60 ? text : text[..60] + "...";

    /// <summary>A number as JSON: NaN and infinities, which JSON has no word for, as null.</summary>
    public static string Number(double value) =>
        double.IsFinite(value) ? value.ToString("R", CultureInfo.InvariantCulture) : "null";

    /// <summary>The same tree with NaN and infinite numbers replaced by null, so that no JSON the CLI prints holds a
    /// bare NaN (the serializer refuses them, and other readers reject them).</summary>
    public static JsonNode? Finite(JsonNode? node)
    {
        switch (node)
        {
            case JsonObject obj:
                foreach (var key in obj.Select(p => p.Key).ToList()) obj[key] = Finite(obj[key]?.DeepClone());
                return obj;
            case JsonArray array:
                for (var i = 0; i < array.Count; i++) array[i] = Finite(array[i]?.DeepClone());
                return array;
            case JsonValue value when value.TryGetValue<double>(out var d) && !double.IsFinite(d):
            case JsonValue value2 when value2.TryGetValue<float>(out var f) && !float.IsFinite(f):
                return null;
            default:
                return node;
        }
    }

    /// <summary>One line of JSON for a tree, non-finite numbers as null.</summary>
    public static string Line(JsonNode node) => (Finite(node) ?? node).ToJsonString(Options);
}
