using System.Text;

namespace Gpt.Cli;

/// <summary>Standard input as strict UTF-8: the CLI treats invalid bytes on every input path the same way (files,
/// standard input, command-line arguments): an error naming where the first bad byte is, never a silent
/// replacement character.</summary>
public sealed class StrictInput : TextReader
{
    private readonly CountingStream _stream;
    private readonly StreamReader _reader;

    /// <summary>Reads <paramref name="stream"/> (a byte-order mark is skipped).</summary>
    public StrictInput(Stream stream)
    {
        _stream = new CountingStream(stream);
        _reader = new StreamReader(_stream, new UTF8Encoding(false, throwOnInvalidBytes: true), detectEncodingFromByteOrderMarks: false, bufferSize: 4096);
    }

    private T Strict<T>(Func<T> read)
    {
        try
        {
            return read();
        }
        catch (DecoderFallbackException e)
        {
            // The reader decodes each block as soon as it has read it: the bad byte is in the last block read.
            var offset = Math.Max(0, _stream.Position - _stream.LastRead + e.Index);
            throw new GptException($"standard input is not valid UTF-8 (byte {offset})");
        }
    }

    /// <inheritdoc />
    public override int Peek() => Strict(_reader.Peek);

    /// <inheritdoc />
    public override int Read() => Strict(_reader.Read);

    /// <inheritdoc />
    public override int Read(char[] buffer, int index, int count) => Strict(() => _reader.Read(buffer, index, count));

    /// <inheritdoc />
    public override string? ReadLine() => Strict(_reader.ReadLine);

    /// <inheritdoc />
    public override string ReadToEnd() => Strict(_reader.ReadToEnd);

    /// <inheritdoc />
    protected override void Dispose(bool disposing)
    {
        if (disposing) _reader.Dispose();
        base.Dispose(disposing);
    }

    /// <summary>The first command-line argument whose bytes are not valid UTF-8, described, or null. On Linux the bytes
    /// come from <c>/proc/self/cmdline</c> (the runtime has already replaced bad bytes in <paramref name="args"/>);
    /// elsewhere the arguments arrive as UTF-16 and there is nothing to check.</summary>
    public static string? InvalidArgument(string[] args)
    {
        if (!OperatingSystem.IsLinux() || args.Length == 0) return null;
        byte[] raw;
        try
        {
            raw = File.ReadAllBytes("/proc/self/cmdline");
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return null;
        }
        var parts = new List<byte[]>();
        var start = 0;
        for (var i = 0; i < raw.Length; i++)
        {
            if (raw[i] != 0) continue;
            parts.Add(raw[start..i]);
            start = i + 1;
        }
        if (start < raw.Length) parts.Add(raw[start..]);
        if (parts.Count < args.Length) return null;
        // The program's own arguments are the last args.Length (before them: the host, perhaps the .dll).
        var first = parts.Count - args.Length;
        for (var a = 0; a < args.Length; a++)
        {
            var bytes = parts[first + a];
            if (!System.Text.Unicode.Utf8.IsValid(bytes)) return Describe(a, bytes);
        }
        return null;
    }

    private static string Describe(int index, byte[] bytes)
    {
        var offset = 0;
        try
        {
            new UTF8Encoding(false, true).GetCharCount(bytes);
        }
        catch (DecoderFallbackException e)
        {
            offset = Math.Max(0, e.Index);
        }
        var shown = Encoding.UTF8.GetString(bytes);
        if (shown.Length > 60) shown = shown[..60] + "...";
        return $"command-line argument {index + 1} ('{shown}') is not valid UTF-8 (byte {offset})";
    }

    /// <summary>A read-only stream that counts the bytes read and the size of the last read.</summary>
    private sealed class CountingStream(Stream inner) : Stream
    {
        private long _position;

        public long LastRead { get; private set; }

        public override bool CanRead => true;
        public override bool CanSeek => false;
        public override bool CanWrite => false;
        public override long Length => throw new NotSupportedException();

        public override long Position
        {
            get => _position;
            set => throw new NotSupportedException();
        }

        public override int Read(byte[] buffer, int offset, int count)
        {
            var n = inner.Read(buffer, offset, count);
            _position += n;
            LastRead = n;
            return n;
        }

        public override int Read(Span<byte> buffer)
        {
            var n = inner.Read(buffer);
            _position += n;
            LastRead = n;
            return n;
        }

        public override void Flush() { }
        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
        public override void SetLength(long value) => throw new NotSupportedException();
        public override void Write(byte[] buffer, int offset, int count) => throw new NotSupportedException();

        protected override void Dispose(bool disposing)
        {
            if (disposing) inner.Dispose();
            base.Dispose(disposing);
        }
    }
}
