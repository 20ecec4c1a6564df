using System.CommandLine;
using System.Globalization;
using System.Text.Json.Nodes;

namespace Gpt.Cli;

/// <summary><c>gpt finetune classify</c> (book chapter 6); <c>gpt finetune instruct</c> (chapter 7).</summary>
internal static class FinetuneCommand
{
    private static readonly CultureInfo Invariant = CultureInfo.InvariantCulture;

    public static Command Create(CliContext context)
    {
        var command = new Command("finetune", "Fine-tune a pretrained model: classify (book chapter 6) or instruct (chapter 7).");
        command.Add(Classify(context));
        command.Add(Instruct(context));
        return command;
    }

    private static Command Classify(CliContext context)
    {
        var defaults = new ClassifierTrainingOptions("model");
        var run = new RunSettingsOptions(defaults, "Texts", "--lr (a constant rate)");
        var model = new Option<string?>("--model") { Description = "Where to start: a language model (a folder such as runs/NAME/model, a .pth file, a Hugging Face id) gets a new head; a saved classifier keeps its own. Required unless --resume." };
        var train = new Option<string?>("--train") { Description = "Training texts: CSV or TSV with a header, JSON Lines {\"text\", \"label\"}, or the SMS Spam Collection file as downloaded. Default: the built-in messages, split as --split says." };
        var validation = new Option<string?>("--val") { Description = "Validation texts (with --train)." };
        var test = new Option<string?>("--test") { Description = "Test texts (with --train), measured once at the end." };
        var data = new Option<string?>("--data") { Description = "One file split into training, validation and test texts (seeded shuffle)." };
        var split = new Option<string>("--split") { Description = "Training and validation shares of --data (the rest is the test split).", DefaultValueFactory = _ => "0.7,0.1" };
        var textColumn = new Option<string>("--text-column") { Description = "The text column (JSON Lines: key).", DefaultValueFactory = _ => defaults.TextColumn };
        var labelColumn = new Option<string>("--label-column") { Description = "The label column (JSON Lines: key).", DefaultValueFactory = _ => defaults.LabelColumn };
        var labels = new Option<string?>("--labels") { Description = "The labels in id order, comma-separated (ham,spam). Default: first appearance." };
        var balance = new Option<bool>("--balance") { Description = "Undersample every label to the count of the rarest (the book's balanced data set)." };
        var pool = new Option<string?>("--pool") { Description = "Which position is classified: last-token (the last real token; default for a new head) or last-position (the book's, last position of the padded batch)." };
        pool.AcceptOnlyFromAmong("last-token", "last-position");
        var trainable = new Option<string>("--trainable") { Description = "What trains: last-block (the book: last block, final norm, head), last-N, head or all.", DefaultValueFactory = _ => defaults.Trainable };
        var maxLength = new Option<int?>("--max-length") { Description = "Pad and truncate every text to N tokens. Default: each batch to its longest (texts longer than the context are cut)." };
        var dropRate = new Option<double>("--drop-rate") { Description = "Dropout during fine-tuning.", DefaultValueFactory = _ => defaults.DropRate };
        var noShuffle = new Option<bool>("--no-shuffle") { Description = "Train in file order instead of a seeded shuffle per epoch." };
        var command = new Command("classify",
            "Fine-tune a GPT into a text classifier (book chapter 6): a new head on a language model, the last block trained. " +
            "Writes OUT/NAME/: checkpoints/, metrics.jsonl (loss and accuracy), loss.png, accuracy.png, and the classifier in " +
            "Hugging Face's GPT2ForSequenceClassification layout (model/, for gpt classify --model). Test accuracy at the end.")
        {
            model, train, validation, test, data, split, textColumn, labelColumn, labels, balance, pool, trainable, maxLength, dropRate, noShuffle,
        };
        run.AddTo(command);
        command.SetAction(parse => CliApp.Guard(context, () =>
        {
            bool Given(Option option) => parse.GetResult(option) is { Implicit: false };
            var resumePath = parse.GetValue(run.Resume);
            var options = resumePath is not null ? ClassifierTrainingOptions.FromCheckpoint(resumePath)
                : new ClassifierTrainingOptions(parse.GetValue(model) ?? throw new GptException("--model is required: the language model or classifier fine-tuning starts from (or --resume a run)"));
            var shares = ParseSplit(parse.GetValue(split)!);
            options = run.Apply(parse, options) with
            {
                Model = Given(model) ? parse.GetValue(model)! : options.Model,
                Train = Given(train) ? parse.GetValue(train) : options.Train,
                Validation = Given(validation) ? parse.GetValue(validation) : options.Validation,
                Test = Given(test) ? parse.GetValue(test) : options.Test,
                Data = Given(data) ? parse.GetValue(data) : options.Data,
                TrainFraction = Given(split) ? shares.Train : options.TrainFraction,
                ValidationFraction = Given(split) ? shares.Validation : options.ValidationFraction,
                TextColumn = Given(textColumn) ? parse.GetValue(textColumn)! : options.TextColumn,
                LabelColumn = Given(labelColumn) ? parse.GetValue(labelColumn)! : options.LabelColumn,
                Labels = Given(labels) ? parse.GetValue(labels)!.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries) : options.Labels,
                Balance = Given(balance) ? parse.GetValue(balance) : options.Balance,
                Pooling = Given(pool) ? (parse.GetValue(pool) == "last-position" ? ClassifierPooling.LastPosition : ClassifierPooling.LastToken) : options.Pooling,
                Trainable = Given(trainable) ? parse.GetValue(trainable)! : options.Trainable,
                MaxLength = Given(maxLength) ? parse.GetValue(maxLength) : options.MaxLength,
                DropRate = Given(dropRate) ? parse.GetValue(dropRate) : options.DropRate,
                Shuffle = Given(noShuffle) ? !parse.GetValue(noShuffle) : options.Shuffle,
            };
            options.Validate();
            return RunDisplay.Run(context, run.Json(parse), options.EvalInterval, "finetune classify", (progress, token) =>
            {
                var r = TextClassifier.FineTune(options, progress, token);
                var json = new JsonObject
                {
                    ["labels"] = new JsonArray(r.Labels.Select(l => (JsonNode?)l).ToArray()), ["test_accuracy"] = r.TestAccuracy,
                    ["test_loss"] = r.TestLoss, ["train_examples"] = r.TrainExamples, ["val_examples"] = r.ValidationExamples,
                    ["test_examples"] = r.TestExamples, ["truncated_texts"] = r.TruncatedTexts,
                };
                var lines = new List<string>
                {
                    string.Create(Invariant, $"labels: {string.Join(", ", r.Labels)}; texts: {r.TrainExamples} training, {r.ValidationExamples} validation, {r.TestExamples} test ({r.TruncatedTexts} truncated)"),
                };
                if (r.TestAccuracy is { } accuracy)
                    lines.Add(string.Create(Invariant, $"test accuracy {accuracy:P1} (loss {r.TestLoss:0.000}) on {r.TestExamples} texts"));
                return new RunOutcome(r.Training, json, lines, dir => CommandHints.Gpt($"classify --model {CommandHints.Quote(dir)} --text \"Congratulations! You have won a prize\""));
            });
        }));
        return command;
    }

    private static Command Instruct(CliContext context)
    {
        var defaults = new InstructionTrainingOptions("model");
        var run = new RunSettingsOptions(defaults, "Entries", "--lr (a constant rate)");
        var model = new Option<string?>("--model") { Description = "The language model to fine-tune: a folder such as runs/NAME/model, a .pth file, a Hugging Face id. Required unless --resume." };
        var train = new Option<string?>("--train") { Description = "Training entries: a JSON list (the book's instruction-data.json) or JSON Lines of {\"instruction\", \"input\", \"output\"}. Default: the built-in instructions, split as --split says." };
        var validation = new Option<string?>("--val") { Description = "Validation entries (with --train)." };
        var test = new Option<string?>("--test") { Description = "Test entries (with --train): answered after training into test-responses.json." };
        var data = new Option<string?>("--data") { Description = "One file split into training, validation and test entries (seeded shuffle)." };
        var split = new Option<string>("--split") { Description = "Training and validation shares of --data (the rest is the test split).", DefaultValueFactory = _ => "0.85,0.1" };
        var style = new Option<string>("--prompt-style") { Description = "alpaca (the book's) or phi3 (the book's exercise 7.1).", DefaultValueFactory = _ => "alpaca" };
        style.AcceptOnlyFromAmong("alpaca", "phi3");
        var mask = new Option<bool>("--mask-instruction") { Description = "Learn only the response: the prompt's targets are ignored too (the book's exercise 7.2)." };
        var maxLength = new Option<int?>("--max-length") { Description = "Cut collated batches to N tokens. Default: the model's context." };
        var dropRate = new Option<double>("--drop-rate") { Description = "Dropout during fine-tuning.", DefaultValueFactory = _ => defaults.DropRate };
        var noShuffle = new Option<bool>("--no-shuffle") { Description = "Train in file order instead of a seeded shuffle per epoch." };
        var responseTokens = new Option<int>("--response-tokens") { Description = "The most tokens of each test response generated after training.", DefaultValueFactory = _ => defaults.ResponseTokens };
        var command = new Command("instruct",
            "Fine-tune a GPT to follow instructions (book chapter 7): every parameter trained on prompt + response with the book's " +
            "collation. Writes OUT/NAME/: checkpoints/, metrics.jsonl, loss.png, the model (model/, the language-model layout) and " +
            "test-responses.json (the test entries with model_response), scored by exact match and token F1.")
        {
            model, train, validation, test, data, split, style, mask, maxLength, dropRate, noShuffle, responseTokens,
        };
        run.AddTo(command);
        command.SetAction(parse => CliApp.Guard(context, () =>
        {
            bool Given(Option option) => parse.GetResult(option) is { Implicit: false };
            var resumePath = parse.GetValue(run.Resume);
            var options = resumePath is not null ? InstructionTrainingOptions.FromCheckpoint(resumePath)
                : new InstructionTrainingOptions(parse.GetValue(model) ?? throw new GptException("--model is required: the language model instruction fine-tuning starts from (or --resume a run)"));
            var shares = ParseSplit(parse.GetValue(split)!);
            options = run.Apply(parse, options) with
            {
                Model = Given(model) ? parse.GetValue(model)! : options.Model,
                Train = Given(train) ? parse.GetValue(train) : options.Train,
                Validation = Given(validation) ? parse.GetValue(validation) : options.Validation,
                Test = Given(test) ? parse.GetValue(test) : options.Test,
                Data = Given(data) ? parse.GetValue(data) : options.Data,
                TrainFraction = Given(split) ? shares.Train : options.TrainFraction,
                ValidationFraction = Given(split) ? shares.Validation : options.ValidationFraction,
                PromptStyle = Given(style) ? (parse.GetValue(style) == "phi3" ? PromptStyle.Phi3 : PromptStyle.Alpaca) : options.PromptStyle,
                MaskInstruction = Given(mask) ? parse.GetValue(mask) : options.MaskInstruction,
                MaxLength = Given(maxLength) ? parse.GetValue(maxLength) : options.MaxLength,
                DropRate = Given(dropRate) ? parse.GetValue(dropRate) : options.DropRate,
                Shuffle = Given(noShuffle) ? !parse.GetValue(noShuffle) : options.Shuffle,
                ResponseTokens = Given(responseTokens) ? parse.GetValue(responseTokens) : options.ResponseTokens,
            };
            options.Validate();
            var styleName = options.PromptStyle == PromptStyle.Phi3 ? " --prompt-style phi3" : "";
            return RunDisplay.Run(context, run.Json(parse), options.EvalInterval, "finetune instruct", (progress, token) =>
            {
                var r = InstructionModel.FineTune(options, progress, token);
                var json = new JsonObject
                {
                    ["responses"] = r.ResponsesFile, ["exact_match"] = r.ExactMatch, ["token_f1"] = r.TokenF1,
                    ["train_examples"] = r.TrainExamples, ["val_examples"] = r.ValidationExamples, ["test_examples"] = r.TestExamples,
                };
                var lines = new List<string>
                {
                    $"entries: {r.TrainExamples} training, {r.ValidationExamples} validation, {r.TestExamples} test",
                };
                if (r.ResponsesFile is { } file)
                    lines.Add(string.Create(Invariant, $"test responses: {file} (exact match {r.ExactMatch:P1}, token F1 {r.TokenF1:0.000})"));
                return new RunOutcome(r.Training, json, lines, dir => CommandHints.Gpt($"respond --model {CommandHints.Quote(dir)}{styleName} --instruction \"Give the plural of the noun.\" --input \"boat\""));
            });
        }));
        return command;
    }

    /// <summary>"0.7,0.1": the training and validation shares.</summary>
    private static (double Train, double Validation) ParseSplit(string text)
    {
        var parts = text.Split(',', StringSplitOptions.TrimEntries);
        if (parts.Length == 2 && double.TryParse(parts[0], NumberStyles.Float, Invariant, out var train)
            && double.TryParse(parts[1], NumberStyles.Float, Invariant, out var validation))
            return (train, validation);
        throw new GptException($"--split: expected the training and validation shares such as 0.7,0.1, found '{text}'");
    }
}
