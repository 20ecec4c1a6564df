namespace Gpt.Cli;

internal static class CliApp
{
    public static int Run(string[] args) => 0;
}
