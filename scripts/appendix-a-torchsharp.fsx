// Appendix A of "Build a Large Language Model (From Scratch)", "Introduction to PyTorch", in F# Interactive over
// TorchSharp (the same libtorch, with .NET names):
//   dotnet build src/Gpt.Cli && dotnet fsi scripts/appendix-a-torchsharp.fsx
#load "check-build.fsx" // "build first" when the library is not built
#load "load.fsx"

open System
open TorchSharp
open TorchSharp.Modules
open type TorchSharp.torch.nn.functional

// A.2 Tensors: scalars, vectors, matrices and 3D tensors; their data types; reshaping and multiplying.
let tensor0d = torch.tensor 1L
let tensor1d = torch.tensor [| 1L; 2L; 3L |]
let tensor2d = torch.tensor([| 1L; 2L; 3L; 4L |]).view(2L, 2L)
let tensor3d = torch.tensor([| 1L; 2L; 3L; 4L; 5L; 6L; 7L; 8L |]).view(2L, 2L, 2L)
printfn "dimensions: %d %d %d %d" (tensor0d.dim ()) (tensor1d.dim ()) (tensor2d.dim ()) (tensor3d.dim ())
printfn "integer tensors are %O; a float one is %O; converted: %O" tensor1d.dtype (torch.tensor([| 1.0f; 2.0f |]).dtype) (tensor1d.to_type(torch.float32).dtype)
let matrix = torch.tensor([| 1L; 2L; 3L; 4L; 5L; 6L |]).view(2L, 3L)
printfn "shape %A, reshaped %A, viewed %A, transposed %A" matrix.shape (matrix.reshape(3L, 2L).shape) (matrix.view(3L, 2L).shape) (matrix.T.shape)
let product = matrix.matmul(matrix.T)
printfn "matrix @ matrix.T = %A (the book: [[14, 32], [32, 77]])" (product.data<int64>().ToArray())

// A.3-A.4 Autograd: a logistic regression unit, its loss, and the gradients of the loss with respect to w1 and b.
let y = torch.tensor [| 1.0f |]
let x1 = torch.tensor [| 1.1f |]
let w1 = torch.tensor([| 2.2f |], requires_grad = true)
let b = torch.tensor([| 0.0f |], requires_grad = true)
let z = x1 * w1 + b
let a = torch.sigmoid z
let loss = binary_cross_entropy (a, y)
// torch.autograd.grad(loss, w1, retain_graph=True) in PyTorch; TorchSharp takes the lists.
let gradients = torch.autograd.grad([| loss |], [| w1; b |], retain_graph = true)
printfn "autograd.grad: dL/dw1 = %.4f, dL/db = %.4f (the book: -0.0898, -0.0817)" (gradients[0].item<float32> ()) (gradients[1].item<float32> ())
loss.backward ()
printfn "loss.backward(): w1.grad = %.4f, b.grad = %.4f" (w1.grad.item<float32> ()) (b.grad.item<float32> ())

// A.5 A multilayer network: two hidden layers with ReLU (the book's NeuralNetwork), as a TorchSharp Module.
type NeuralNetwork(inputs: int64, outputs: int64) as this =
    inherit torch.nn.Module<torch.Tensor, torch.Tensor>("NeuralNetwork")
    let layers =
        torch.nn.Sequential(
            torch.nn.Linear(inputs, 30L), torch.nn.ReLU(),   // first hidden layer
            torch.nn.Linear(30L, 20L), torch.nn.ReLU(),      // second hidden layer
            torch.nn.Linear(20L, outputs))                   // output layer: logits
    do this.RegisterComponents()
    override _.forward x = layers.forward x

let big = new NeuralNetwork(50L, 3L)
let count = big.parameters () |> Seq.filter _.requires_grad |> Seq.sumBy (fun p -> p.numel ())
printfn "NeuralNetwork(50, 3): %d trainable parameters (the book: 2213)" count

// A.6 A tiny data set, shuffled into batches of two (the book's DataLoader), the same order for the same seed.
let trainX = torch.tensor([| -1.2f; 3.1f; -0.9f; 2.9f; -0.5f; 2.6f; 2.3f; -1.1f; 2.7f; -1.5f |]).view(5L, 2L)
let trainY = torch.tensor [| 0L; 0L; 0L; 1L; 1L |]
let testX = torch.tensor([| -0.8f; 2.8f; 2.6f; -1.6f |]).view(2L, 2L)
let testY = torch.tensor [| 0L; 1L |]
let batches (generator: torch.Generator) =
    let order = torch.randperm(5L, generator = generator).data<int64>().ToArray()
    // drop_last=True, as the book's train_loader: two batches of two, the fifth example left out this epoch.
    [ for i in 0 .. 1 -> torch.tensor order[2 * i .. 2 * i + 1] ]

// A.7 The training loop: forward, loss, zero the gradients, backward, step.
torch.manual_seed 123L |> ignore
let model = new NeuralNetwork(2L, 2L)
let optimizer = torch.optim.SGD(model.parameters (), 0.5)
let generator = new torch.Generator(123UL)
let epochs = 3
for epoch in 1 .. epochs do
    model.train ()
    for index, batch in List.indexed (batches generator) do
        let logits = model.forward (trainX.index_select(0L, batch))
        let batchLoss = cross_entropy (logits, trainY.index_select(0L, batch))
        optimizer.zero_grad ()
        batchLoss.backward ()
        optimizer.step () |> ignore
        printfn "Epoch: %03d/%03d | Batch %03d/%03d | Train Loss: %.2f" epoch epochs index 2 (batchLoss.item<float32> ())

// Predictions, probabilities and accuracy (the book's compute_accuracy), without gradients in eval mode.
model.eval ()
let accuracy (x: torch.Tensor) (labels: torch.Tensor) =
    use _ = torch.no_grad ()
    let predictions = model.forward(x).argmax(1L)
    (predictions.eq(labels).sum().item<int64> () |> float) / float labels.shape[0]
let probabilities =
    use _ = torch.no_grad ()
    softmax(model.forward trainX, 1L)
printfn "probabilities of class 1: %s" (String.Join(", ", probabilities.select(1L, 1L).data<float32>().ToArray() |> Array.map (sprintf "%.4f")))
printfn "training accuracy %.1f, test accuracy %.1f" (accuracy trainX trainY) (accuracy testX testY)

// A.8 Saving and loading: the state dict round trip gives the same predictions.
let path = IO.Path.Combine(IO.Path.GetTempPath(), sprintf "appendix-a-%d.pt" Environment.ProcessId)
model.save path |> ignore
let reloaded = new NeuralNetwork(2L, 2L)
reloaded.load path |> ignore
reloaded.eval ()
let same =
    use _ = torch.no_grad ()
    model.forward(testX).allclose(reloaded.forward testX)
printfn "reloaded model gives the same logits: %b" same
IO.File.Delete path
