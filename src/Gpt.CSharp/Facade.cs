using System.Runtime.InteropServices;

namespace Gpt;

/// <summary>The façade's one error path: whatever fails below a public entry point (a file system error, a native
/// libtorch error, running out of memory) reaches the caller as a <see cref="GptException"/> whose message says what
/// happened and whose inner exception is the original. Cancellation and argument errors pass through unchanged.</summary>
internal static class Facade
{
    internal static T Guard<T>(Func<T> body)
    {
        try
        {
            return body();
        }
        catch (Exception e) when (ShouldWrap(e))
        {
            throw Wrap(e);
        }
    }

    internal static void Guard(Action body) => Guard(() =>
    {
        body();
        return 0;
    });

    private static bool ShouldWrap(Exception e) =>
        e is not (GptException or OperationCanceledException or ArgumentNullException);

    /// <summary>A GptException for any other exception, with it as the inner exception.</summary>
    internal static GptException Wrap(Exception e) => new(Describe(e), e);

    /// <summary>One line for an exception that is not a GptException: what kind of failure, and the first line of its
    /// message (libtorch's messages carry a C++ stack after the first line).</summary>
    internal static string Describe(Exception e)
    {
        var first = (e.Message ?? "").Split('\n', 2)[0].Trim();
        return e switch
        {
            OutOfMemoryException => $"out of memory ({first}): use a smaller model, batch or context",
            InsufficientExecutionStackException => $"the input nests too deeply ({first})",
            UnauthorizedAccessException => $"access denied: {first}",
            IOException => $"file system error: {first}",
            ExternalException => $"libtorch failed: {first}",
            System.Text.Json.JsonException => $"invalid JSON: {first}",
            System.Text.DecoderFallbackException => $"invalid UTF-8: {first}",
            _ => $"{e.GetType().Name}: {first}",
        };
    }
}
