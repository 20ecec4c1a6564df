using System.CommandLine;

namespace Gpt.Cli;

/// <summary><c>gpt tokenize</c>: text to token ids and back.</summary>
internal static class TokenizeCommand
{
    public static Command Create(CliContext context)
    {
        var text = new Option<string?>("--text") { Description = "The text to tokenize (or, with --decode, token ids: 1,2,3 or [1, 2, 3]). Default: standard input." };
        var decode = new Option<bool>("--decode") { Description = "Turn token ids (1,2,3 or a JSON array [1, 2, 3]) back into text." };
        var jsonl = new Option<bool>("--jsonl") { Description = "Batch mode: read one JSON string per line from standard input and write one JSON id array per line (with --decode: ids in, 1,2,3 or [1, 2, 3], JSON strings out)." };
        var tokenizer = new Option<string>("--tokenizer") { Description = "gpt2 (GPT-2 byte-pair encoding, 50,257 tokens) or simple (the book's word tokenizer).", DefaultValueFactory = _ => "gpt2" };
        tokenizer.AcceptOnlyFromAmong("gpt2", "simple");
        var vocabulary = new Option<string?>("--vocabulary") { Description = "For --tokenizer simple: a text file (or folder or glob) to build the vocabulary from. Default: the built-in story." };

        var command = new Command("tokenize", "Turn text into GPT-2 token ids (a JSON array) or ids back into text.")
        {
            text, decode, jsonl, tokenizer, vocabulary,
        };
        command.SetAction(parse => CliApp.Guard(context, () =>
        {
            var vocabularyPath = parse.GetValue(vocabulary);
            var vocabularyText = vocabularyPath is null ? null : string.Join("\n", Corpus.Load(vocabularyPath).Select(d => d.Text));
            var tok = Tokenizer.FromName(parse.GetValue(tokenizer)!, vocabularyText);
            var isDecode = parse.GetValue(decode);

            if (parse.GetValue(jsonl))
            {
                if (parse.GetValue(text) is not null) throw new GptException("--jsonl reads standard input; do not combine it with --text");
                var lineNumber = 0;
                while (context.Input.ReadLine() is { } line)
                {
                    lineNumber++;
                    if (line.Length == 0) continue;
                    var where = $"standard input line {lineNumber}";
                    context.Output.WriteLine(isDecode
                        ? Json.String(tok.Decode(Tokenizer.ParseIds(line, where)))
                        : Json.Ids(tok.Encode(Json.ParseString(line, where))));
                }
                return 0;
            }

            var input = parse.GetValue(text) ?? ReadStandardInput(context);
            if (isDecode) context.Output.WriteLine(tok.Decode(Tokenizer.ParseIds(input, "--decode input")));
            else context.Output.WriteLine(Json.Ids(tok.Encode(input)));
            return 0;
        }));
        return command;
    }

    private static string ReadStandardInput(CliContext context)
    {
        if (!context.InputRedirected)
            throw new GptException("no text given: pass --text \"...\" or pipe text on standard input (see gpt tokenize --help)");
        return context.Input.ReadToEnd();
    }
}
