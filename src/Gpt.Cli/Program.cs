// Before libtorch loads and before anything allocates (see NativeThreads.preferPassiveWaiting and
// NativeMemory.retainFreedMemory): both make training several times faster on a shared 2-core machine.
Gpt.NativeThreads.preferPassiveWaiting();
Gpt.NativeMemory.retainFreedMemory();
return Gpt.Cli.CliApp.Run(args, Console.In, Console.Out, Console.Error, Console.IsInputRedirected);
