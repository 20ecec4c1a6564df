return Gpt.Cli.CliApp.Run(args);
