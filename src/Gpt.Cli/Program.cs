// Before anything allocates: training frees and reallocates hundreds of MB a step, which glibc would otherwise hand
// back to the system and page-fault in again (see NativeMemory.retainFreedMemory).
Gpt.NativeMemory.retainFreedMemory();
return Gpt.Cli.CliApp.Run(args, Console.In, Console.Out, Console.Error, Console.IsInputRedirected);
