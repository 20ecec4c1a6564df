// Chapters 3 and 4 of "Build a Large Language Model (From Scratch)", in F# Interactive:
//   dotnet build src/Gpt.Cli && dotnet fsi scripts/ch03-04-model.fsx
#load "check-build.fsx" // "build first" when the library is not built
#load "load.fsx"

open TorchSharp
open Gpt.Model
open Gpt.Text

let show (title: string) (t: torch.Tensor) = printfn "%s %A\n%s" title t.shape (t.ToString(TensorStringStyle.Julia))

// 3.3: simplified self-attention on "Your journey starts with one step"
let inputs =
    torch.tensor([| 0.43f; 0.15f; 0.89f; 0.55f; 0.87f; 0.66f; 0.57f; 0.85f; 0.64f
                    0.22f; 0.58f; 0.33f; 0.77f; 0.25f; 0.10f; 0.05f; 0.80f; 0.55f |]).view(6L, 3L)
show "attention weights (simplified):" (SimplifiedAttention.weights inputs)
show "context vectors (simplified), 'journey' = [0.4419, 0.6515, 0.5683]:" (SimplifiedAttention.context inputs)

// 3.4: trainable weights, as Parameters (V1) and as Linear layers (V2)
let generator = new torch.Generator(123UL, torch.CPU)
let v1 = new SelfAttentionV1(3, 2, generator)
show "SelfAttentionV1 (seed 123), book: [[0.2996, 0.8053], ...]:" (v1.forward inputs)
let v2 = new SelfAttentionV2(3, 2)
show "SelfAttentionV2:" (v2.forward inputs)

// 3.5-3.6: causal attention with dropout, then several heads
let batch = torch.stack([| inputs; inputs |]) // (2, 6, 3)
let causal = new CausalAttention(3, 2, 6, 0.0)
show "causal attention weights (zero above the diagonal):" (causal.AttentionWeights batch)
let wrapper = new MultiHeadAttentionWrapper(3, 2, 6, 0.0, 2)
show "multi-head wrapper, 2 heads -> (2, 6, 4):" (wrapper.forward batch)
let efficient = new MultiHeadAttention(3, 2, 6, 0.0, 2)
show "efficient multi-head attention -> (2, 6, 2):" (efficient.forward batch)

// 4.1-4.6: the GPT model
let book = { GptConfig.gpt2Small with QkvBias = false; TiedHead = false }
printfn "book's GPT_CONFIG_124M: %d parameters (%.2f MB); tied head: %d; released GPT-2: %d"
    (GptConfig.parameterCount book) (GptConfig.memoryMegabytes book)
    (GptConfig.parameterCount { book with TiedHead = true }) (GptConfig.parameterCount GptConfig.gpt2Small)

// A small model to keep the script quick; gpt2-small works the same way (and takes a few seconds to initialise).
let config = { book with ContextLength = 64; EmbeddingDim = 128; Heads = 4; Layers = 2 }
let model = new GptModel(config, 123L)
model.eval ()
let gpt2 = Tokenizers.gpt2 ()
let ids =
    torch.tensor(Array.append (gpt2.Encode "Every effort moves you" |> Array.map int64) (gpt2.Encode "Every day holds a" |> Array.map int64)).view(2L, 4L)
let logits =
    use _ = torch.no_grad ()
    model.forward ids
printfn "logits: %A (batch, tokens, vocabulary)" logits.shape

// 4.7: greedy generation (untrained: gibberish, as in the book)
let prompt = torch.tensor(gpt2.Encode "Hello, I am" |> Array.map int64).view(1L, -1L)
let output = Gpt.Generation.Generator.generateTextSimple model prompt 6 config.ContextLength
let generated = output.data<int64>().ToArray() |> Array.map int
printfn "ids: %A\ntext: %s" generated (gpt2.Decode generated)
