using System.Collections.Concurrent;
using Gpt.Text;
using Microsoft.FSharp.Core;
using Xunit;

namespace Gpt.CSharp.Tests;

/// <summary>A synchronisation context with one thread of its own, like a UI thread: posted work runs there, in order.
/// It says whether a thread is its own.</summary>
internal sealed class SingleThreadContext : SynchronizationContext, IDisposable
{
    private readonly BlockingCollection<(SendOrPostCallback Callback, object? State)> _queue = new();
    private readonly Thread _thread;

    public SingleThreadContext()
    {
        _thread = new Thread(() =>
        {
            SetSynchronizationContext(this);
            foreach (var (callback, state) in _queue.GetConsumingEnumerable()) callback(state);
        }) { IsBackground = true, Name = "single-thread-context" };
        _thread.Start();
    }

    public int ThreadId => _thread.ManagedThreadId;

    public override void Post(SendOrPostCallback d, object? state) => _queue.Add((d, state));

    public override void Send(SendOrPostCallback d, object? state)
    {
        if (Environment.CurrentManagedThreadId == ThreadId) { d(state); return; }
        using var done = new ManualResetEventSlim();
        Post(s => { try { d(s); } finally { done.Set(); } }, state);
        done.Wait();
    }

    public override SynchronizationContext CreateCopy() => this;

    /// <summary>Runs async code on this context (as a UI event handler would) and completes with it.</summary>
    public Task<T> Run<T>(Func<Task<T>> body)
    {
        var completion = new TaskCompletionSource<T>(TaskCreationOptions.RunContinuationsAsynchronously);
        Post(async _ =>
        {
            try { completion.SetResult(await body()); }
            catch (Exception e) { completion.SetException(e); }
        }, null);
        return completion.Task;
    }

    public void Dispose() => _queue.CompleteAdding();
}

/// <summary>GPT-2's tokenizer that records the threads it is used on: the stream's computation calls it at every
/// step.</summary>
internal sealed class RecordingTokenizer : ITokenizer
{
    private static readonly ITokenizer Gpt2 = Tokenizer.Gpt2.Inner;
    public ConcurrentBag<int> Threads { get; } = new();
    private T Record<T>(T value) { Threads.Add(Environment.CurrentManagedThreadId); return value; }
    public string Name => Gpt2.Name;
    public int VocabularySize => Gpt2.VocabularySize;
    public FSharpOption<int> EndOfTextId => Gpt2.EndOfTextId;
    public int[] Encode(string text) => Record(Gpt2.Encode(text));
    public byte[] DecodeToUtf8(IEnumerable<int> ids) => Record(Gpt2.DecodeToUtf8(ids));
    public string Decode(IEnumerable<int> ids) => Record(Gpt2.Decode(ids));
}

/// <summary>Streams compute off the caller's synchronisation context, and cancelling one throws
/// OperationCanceledException (the documented behaviour).</summary>
public class StreamingTests
{
    private static readonly GptModel Model = GptModel.Load(Fixtures.TinyGpt2);
    private static readonly GenerationSettings Twenty = new() { MaxNewTokens = 20, EndOfTextId = null };

    [Fact]
    public async Task StreamComputationNeverRunsOnTheCallersSynchronizationContext()
    {
        using var context = new SingleThreadContext();
        var recording = new RecordingTokenizer();
        var tokenizer = new Tokenizer(recording);
        string expected;
        lock (Model) expected = Model.Generate("The harbor clock", Twenty).Text;
        var bodyThreads = new ConcurrentBag<int>();
        var text = await context.Run(async () =>
        {
            var pieces = new List<string>();
            await foreach (var piece in Model.StreamAsync("The harbor clock", Twenty, tokenizer))
            {
                bodyThreads.Add(Environment.CurrentManagedThreadId);
                pieces.Add(piece);
            }
            return string.Concat(pieces);
        });
        Assert.Equal(expected, text);
        Assert.NotEmpty(recording.Threads);
        Assert.DoesNotContain(context.ThreadId, recording.Threads); // encoding and every step ran elsewhere
        Assert.All(bodyThreads, id => Assert.Equal(context.ThreadId, id)); // the caller's loop body stays on its context
    }

    [Fact]
    public async Task InstructionStreamsAndResponsesRunOffTheContextToo()
    {
        using var context = new SingleThreadContext();
        using var model = InstructionModel.Load(Fixtures.TinyGpt2);
        var entry = new InstructionEntry("Give the plural of the noun.", "boat");
        var settings = new GenerationSettings { MaxNewTokens = 8 };
        var expected = model.Respond(entry, settings);
        var (streamed, responded) = await context.Run(async () =>
        {
            var pieces = new List<string>();
            await foreach (var piece in model.StreamAsync(entry, settings)) pieces.Add(piece);
            return (string.Concat(pieces), await model.RespondAsync(entry, settings));
        });
        Assert.Equal(expected, responded);
        Assert.Equal(expected, Gpt.FineTuning.InstructionData.response(Gpt.FineTuning.PromptStyle.Alpaca, streamed));
    }

    [Fact]
    public async Task CancellingThrowsOperationCanceledExceptionAndTheModelCarriesOn()
    {
        // Cancelled before the first step: nothing is yielded.
        using (var cancelled = new CancellationTokenSource())
        {
            cancelled.Cancel();
            var count = 0;
            await Assert.ThrowsAnyAsync<OperationCanceledException>(async () =>
            {
                await foreach (var _ in Model.StreamAsync("Hello", Twenty).WithCancellation(cancelled.Token)) count++;
            });
            Assert.Equal(0, count);
        }
        // Cancelled midway, through WithCancellation: the pieces so far are the start of the text.
        string full;
        lock (Model) full = Model.Generate("Hello", Twenty).Text;
        using (var cancellation = new CancellationTokenSource())
        {
            var pieces = new List<string>();
            var thrown = await Assert.ThrowsAnyAsync<OperationCanceledException>(async () =>
            {
                await foreach (var piece in Model.StreamAsync("Hello", Twenty).WithCancellation(cancellation.Token))
                {
                    pieces.Add(piece);
                    if (pieces.Count == 3) cancellation.Cancel();
                }
            });
            Assert.Equal(cancellation.Token, thrown.CancellationToken);
            Assert.Equal(3, pieces.Count);
            Assert.StartsWith(string.Concat(pieces), full);
        }
        lock (Model) Assert.Equal(full, Model.Generate("Hello", Twenty).Text); // nothing left behind

        // A response cancelled while it is generated (a long one, stopped after 200 ms).
        using var instructions = InstructionModel.Load(Fixtures.TinyGpt2);
        using var soon = new CancellationTokenSource(TimeSpan.FromMilliseconds(200));
        var clock = System.Diagnostics.Stopwatch.StartNew();
        await Assert.ThrowsAnyAsync<OperationCanceledException>(() =>
            instructions.RespondAsync(new InstructionEntry("Count to a million.", ""), new GenerationSettings { MaxNewTokens = 1_000_000, EndOfTextId = null }, soon.Token));
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(20), $"took {clock.Elapsed}");
        using var stopped = new CancellationTokenSource();
        stopped.Cancel();
        Assert.Throws<OperationCanceledException>(() => Model.Stream("Hello", _ => { }, Twenty, null, stopped.Token));
    }
}
