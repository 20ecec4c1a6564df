using System.CommandLine;

namespace Gpt.Cli;

/// <summary>What a command reads and writes: the process console, or strings in tests.</summary>
public sealed record CliContext(TextReader Input, TextWriter Output, TextWriter Error, bool InputRedirected, CancellationToken Cancellation);

/// <summary>The <c>gpt</c> command line, built only on the C# façade.</summary>
public static class CliApp
{
    /// <summary>Runs the command line; returns the process exit code (0 success, 1 bad input, 2 usage).</summary>
    public static int Run(string[] args, TextReader input, TextWriter output, TextWriter error, bool inputRedirected,
        CancellationToken cancellation = default)
    {
        var context = new CliContext(input, output, error, inputRedirected, cancellation);
        var root = new RootCommand("gpt: build, train and run GPT-2-class language models in .NET (TorchSharp).")
        {
            TokenizeCommand.Create(context),
        };
        foreach (var command in Commands.Extra(context)) root.Add(command);
        var parse = root.Parse(args);
        var configuration = new InvocationConfiguration { Output = output, Error = error };
        return parse.Invoke(configuration);
    }

    /// <summary>Runs a command body, turning library errors into a message on stderr and exit code 1.</summary>
    internal static int Guard(CliContext context, Func<int> body)
    {
        try
        {
            return body();
        }
        catch (GptException e)
        {
            context.Error.WriteLine($"gpt: error: {e.Message}");
            return 1;
        }
        catch (OperationCanceledException)
        {
            context.Error.WriteLine("gpt: cancelled");
            return 130;
        }
    }
}
