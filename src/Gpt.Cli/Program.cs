// Reuse freed tensor memory (glibc): large buffers would otherwise be mapped and zeroed afresh at every training step.
Gpt.GptRuntime.TuneNativeAllocator();
return Gpt.Cli.CliApp.Run(args, Console.In, Console.Out, Console.Error, Console.IsInputRedirected);
