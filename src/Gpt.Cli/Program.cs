// A failure anywhere, even on another thread, is one line "gpt: error: ..." and exit code 1, never a stack trace.
AppDomain.CurrentDomain.UnhandledException += (_, e) =>
{
    Console.Error.WriteLine($"gpt: error: {Gpt.Cli.CliApp.Describe(e.ExceptionObject as Exception)}");
    Environment.Exit(1);
};

// .NET replaces invalid UTF-8 in arguments before the program sees them: check the bytes the process was given.
if (Gpt.Cli.StrictInput.InvalidArgument(args) is { } invalid)
{
    Console.Error.WriteLine($"gpt: error: {invalid}");
    return 1;
}

// Before libtorch loads and before anything allocates: OpenMP threads that wait without spinning, and glibc that
// reuses freed tensor memory (see GptRuntime); both make
// training several times faster on a shared 2-core machine.
Gpt.GptRuntime.PreferPassiveThreadWaiting();
Gpt.GptRuntime.TuneNativeAllocator();
// Standard input is read as strict UTF-8, like every file: invalid bytes are an error with their offset.
var input = Console.IsInputRedirected ? new Gpt.Cli.StrictInput(Console.OpenStandardInput()) : Console.In;
return Gpt.Cli.CliApp.Run(args, input, Console.Out, Console.Error, Console.IsInputRedirected);
