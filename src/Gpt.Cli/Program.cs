// Before anything allocates: reuse freed tensor memory (glibc). A training step frees and reallocates hundreds of MB,
// which glibc would otherwise unmap and then page-fault in, zeroed, again (see NativeAllocator.reuseFreedMemory).
Gpt.GptRuntime.TuneNativeAllocator();
return Gpt.Cli.CliApp.Run(args, Console.In, Console.Out, Console.Error, Console.IsInputRedirected);
