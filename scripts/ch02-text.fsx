// Chapter 2 of "Build a Large Language Model (From Scratch)", in F# Interactive:
//   dotnet build src/Gpt.Cli && dotnet fsi scripts/ch02-text.fsx
#load "check-build.fsx" // "build first" when the library is not built
#load "load.fsx"

open TorchSharp
open Gpt.Text
open Gpt.Model

let story = Corpus.builtIn.Value.Text
printfn "Total number of characters: %d" story.Length
printfn "%s" (story.Substring(0, 99))

// 2.2-2.3: the simple tokenizer and its vocabulary
let words = SimpleTokenizer.split story
printfn "%d tokens; first 30: %A" words.Length words[..29]
let vocabulary = SimpleTokenizer.vocabularyV1 story
printfn "vocabulary size: %d" vocabulary.Size
let ids = SimpleTokenizer.encodeV1 vocabulary "\"It's the last he painted, you know,\" said Ida."
printfn "V1 ids: %A -> %s" ids (SimpleTokenizer.decode vocabulary ids)

// 2.4: special tokens
let vocabularyV2 = SimpleTokenizer.vocabularyV2 story
let text = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of the palace."
printfn "V2: %s" (SimpleTokenizer.decode vocabularyV2 (SimpleTokenizer.encodeV2 vocabularyV2 text))

// 2.5: byte-pair encoding
let gpt2 = Tokenizers.gpt2 ()
let bpe = gpt2.Encode "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace."
printfn "BPE: %A" bpe
printfn "Akwirw ier -> %A -> %A" (gpt2.Encode "Akwirw ier") (Gpt2PreTokenizer.splitToStrings "Akwirw ier")

// 2.6: sliding windows
let encoded = Corpus.encode gpt2 4 [ Corpus.builtIn.Value ]
printfn "story tokens: %d" encoded.Length
let windows = Dataset.create encoded 4 1
for i in 0 .. 2 do
    let input, target = Dataset.item windows i
    printfn "x: %A  y: %A" input target
let loaderWindows = Dataset.create encoded 4 4
let inputs, targets = Dataset.batches loaderWindows { Dataset.defaultLoader with BatchSize = 8; Shuffle = false } 0 |> Seq.head
printfn "inputs:\n%s\ntargets:\n%s" (inputs.ToString(TensorStringStyle.Julia)) (targets.ToString(TensorStringStyle.Julia))

// 2.7-2.8: token and positional embeddings
torch.manual_seed 123L |> ignore
let embedding = new TokenAndPositionEmbedding(50257, 4, 256)
let vectors = embedding.forward inputs
printfn "input embeddings: %A" vectors.shape // [8; 4; 256]
