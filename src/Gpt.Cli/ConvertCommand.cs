using System.CommandLine;

namespace Gpt.Cli;

/// <summary><c>gpt convert</c>: any model source to a folder in the Hugging Face layout.</summary>
internal static class ConvertCommand
{
    public static Command Create(CliContext context)
    {
        var from = new Option<string>("--from")
        {
            Description = "The model: a .pth state dict (the book's model.pth or model_and_optimizer.pth), OpenAI's checkpoint folder " +
                          "(hparams.json, model.ckpt.*), a Hugging Face folder or id (gpt2, openai-community/gpt2-medium, user/name@revision).",
            Required = true,
        };
        var to = new Option<string>("--to") { Description = "Folder to write (Hugging Face GPT-2 layout: config.json + model.safetensors).", Required = true };
        var config = new Option<string?>("--config")
        {
            Description = "The configuration of a state dict file, which has none: a preset (gpt2-small, gpt2-medium, gpt2-large, gpt2-xl) or a JSON " +
                          "file (a Hugging Face config.json, or the book's GPT_CONFIG with emb_dim, n_heads, ...). Default: a config.json beside " +
                          "the file, else the shapes (heads = width / 64, as in every GPT-2).",
        };
        var format = Commands.FormatOption();
        var allowNonFinite = Commands.AllowNonFiniteOption();
        var command = new Command("convert",
            "Convert weights to the Hugging Face layout this tool (and transformers) reads: the book's .pth files, OpenAI's " +
            "TensorFlow checkpoint, or a model from the Hugging Face hub.") { from, to, config, format, allowNonFinite };
        command.SetAction(parse => CliApp.Guard(context, () =>
        {
            var source = parse.GetValue(from)!;
            var configuration = parse.GetValue(config) switch
            {
                null => null,
                var c when File.Exists(c) => GptModel.ReadConfiguration(c),
                var c => GptConfiguration.FromPreset(c),
            };
            var kind = GptModel.SourceKind(source);
            using var model = GptModel.Load(source, new ModelLoadOptions
            {
                Configuration = configuration, Progress = DownloadProgressBar.For(context), CancellationToken = context.Cancellation,
                AllowNonFinite = parse.GetValue(allowNonFinite),
            });
            var directory = parse.GetValue(to)!;
            model.Save(directory);
            var result = ModelCommands.Describe(model);
            result["from"] = source;
            result["kind"] = kind;
            result["path"] = Path.GetFullPath(directory);
            Commands.Print(context, parse.GetValue(format)!, result);
            return 0;
        }));
        return command;
    }
}
