using System.CommandLine;

namespace Gpt.Cli;

/// <summary>What a command reads and writes: the process console, or strings in tests.</summary>
public sealed record CliContext(TextReader Input, TextWriter Output, TextWriter Error, bool InputRedirected, CancellationToken Cancellation);

/// <summary>The <c>gpt</c> command line, built only on the C# façade.</summary>
public static class CliApp
{
    /// <summary>Runs the command line; returns the process exit code (0 success, 1 bad input or any failure,
    /// 2 usage: an unknown option or command, a missing or malformed value; 130 cancelled). Every failure is one line
    /// <c>gpt: error: …</c> on standard error, never a stack trace.</summary>
    public static int Run(string[] args, TextReader input, TextWriter output, TextWriter error, bool inputRedirected,
        CancellationToken cancellation = default)
    {
        var context = new CliContext(input, output, error, inputRedirected, cancellation);
        try
        {
            var root = new RootCommand("gpt: build, train and run GPT-2-class language models in .NET (TorchSharp).")
            {
                TokenizeCommand.Create(context),
            };
            foreach (var command in Commands.Extra(context)) root.Add(command);
            var parse = root.Parse(args);
            if (parse.Errors.Count > 0) return UsageError(parse, error);
            // Exceptions that escape a command's own Guard come here, not to System.CommandLine's handler (which prints
            // the stack trace).
            var configuration = new InvocationConfiguration { Output = output, Error = error, EnableDefaultExceptionHandler = false };
            return parse.Invoke(configuration);
        }
        catch (Exception e)
        {
            return Report(context, e);
        }
    }

    /// <summary>Parse errors: one <c>gpt: error:</c> line each, where to find the usage, exit code 2.</summary>
    private static int UsageError(ParseResult parse, TextWriter error)
    {
        foreach (var e in parse.Errors) error.WriteLine($"gpt: error: {e.Message}");
        var path = new List<string>();
        for (var result = parse.CommandResult; result is not null; result = result.Parent as System.CommandLine.Parsing.CommandResult)
            if (result.Command is not RootCommand) path.Insert(0, result.Command.Name);
        error.WriteLine($"Run 'gpt {string.Join(' ', path.Append("--help"))}' for usage.");
        return 2;
    }

    /// <summary>Runs a command body, turning every failure into a message on stderr and exit code 1 (130 when
    /// cancelled).</summary>
    internal static int Guard(CliContext context, Func<int> body)
    {
        try
        {
            return body();
        }
        catch (Exception e)
        {
            return Report(context, e);
        }
    }

    private static int Report(CliContext context, Exception e)
    {
        if (e is OperationCanceledException)
        {
            context.Error.WriteLine("gpt: cancelled");
            return 130;
        }
        context.Error.WriteLine($"gpt: error: {Describe(e)}");
        return 1;
    }

    /// <summary>One line for any exception: a GptException's message as it is; any other the kind of failure and the
    /// first line of its message (libtorch appends a C++ stack to its own).</summary>
    public static string Describe(Exception? e)
    {
        if (e is null) return "unknown failure";
        if (e is AggregateException { InnerExceptions.Count: 1 } aggregate) return Describe(aggregate.InnerExceptions[0]);
        if (e is System.Reflection.TargetInvocationException { InnerException: { } inner }) return Describe(inner);
        return e is GptException ? OneLine(e.Message ?? "") : Facade.Describe(e);
    }

    private static string OneLine(string text) => string.Join(" ", text.Split('\n', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries));
}
