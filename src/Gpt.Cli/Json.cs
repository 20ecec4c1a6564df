using System.Globalization;
using System.Text.Encodings.Web;
using System.Text.Json;

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
}
