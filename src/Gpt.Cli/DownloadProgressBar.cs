using System.Globalization;

namespace Gpt.Cli;

/// <summary>Shows model downloads on standard error: a bar redrawn in place on a terminal; otherwise (redirected, CI,
/// tests) one line per finished file, so logs stay readable.</summary>
internal sealed class DownloadProgressBar : IProgress<ModelDownloadProgress>
{
    private readonly TextWriter _error;
    private readonly bool _terminal;
    private readonly DateTime _started = DateTime.UtcNow;
    private readonly object _gate = new();

    private DownloadProgressBar(TextWriter error, bool terminal)
    {
        _error = error;
        _terminal = terminal;
    }

    /// <summary>The bar for a command's standard error.</summary>
    public static DownloadProgressBar For(CliContext context) =>
        new(context.Error, ReferenceEquals(context.Error, Console.Error) && !Console.IsErrorRedirected
                           && string.IsNullOrEmpty(Environment.GetEnvironmentVariable("CI")));

    public void Report(ModelDownloadProgress value)
    {
        lock (_gate)
        {
            if (_terminal)
            {
                const int width = 30;
                var fraction = value.TotalBytes is > 0 and var total ? Math.Clamp((double)value.BytesReceived / total, 0, 1) : 0;
                var filled = (int)Math.Round(fraction * width);
                var seconds = Math.Max((DateTime.UtcNow - _started).TotalSeconds, 1e-3);
                var line = string.Create(CultureInfo.InvariantCulture,
                    $"\r{value.FileName} [{new string('#', filled)}{new string('.', width - filled)}] {fraction * 100,3:0}% {Megabytes(value.BytesReceived)}{(value.TotalBytes is { } t ? "/" + Megabytes(t) : "")} MB {Megabytes((long)(value.BytesReceived / seconds))} MB/s ");
                _error.Write(line);
                if (value.Completed) _error.WriteLine();
                _error.Flush();
            }
            else if (value.Completed)
            {
                _error.WriteLine(string.Create(CultureInfo.InvariantCulture, $"downloaded {value.FileName} ({Megabytes(value.BytesReceived)} MB)"));
            }
        }
    }

    private static string Megabytes(long bytes) => (bytes / (1024.0 * 1024.0)).ToString("0.0", CultureInfo.InvariantCulture);
}
