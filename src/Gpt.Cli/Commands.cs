using System.CommandLine;

namespace Gpt.Cli;

/// <summary>Commands added by later stages (model, generation, training, benchmarks).</summary>
internal static partial class Commands
{
    public static IEnumerable<Command> Extra(CliContext context)
    {
        yield break;
    }
}
