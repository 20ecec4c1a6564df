// Before libtorch loads and before anything allocates: OpenMP threads that wait without spinning, and glibc that
// reuses freed tensor memory (see GptRuntime); both make
// training several times faster on a shared 2-core machine.
Gpt.GptRuntime.PreferPassiveThreadWaiting();
Gpt.GptRuntime.TuneNativeAllocator();
return Gpt.Cli.CliApp.Run(args, Console.In, Console.Out, Console.Error, Console.IsInputRedirected);
