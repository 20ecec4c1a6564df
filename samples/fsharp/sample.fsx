// The F# core from its package, in F# Interactive (issue 14's acceptance script):
//   dotnet fsi samples/fsharp/sample.fsx
// Package sources: samples/nuget.config (the packages in artifacts/packages, then NuGet). The version is the one set
// in the repository's Directory.Build.props (the package tests check that the two agree).
#r "nuget: Gpt.Core, 0.1.0"

let config = { Gpt.Model.GptConfig.gpt2Small with Layers = 1; EmbeddingDim = 64; Heads = 2; ContextLength = 32 }
// `let` and Dispose: a `use` at a script's top level is only a `let` (warning FS0524).
let model = new Gpt.Model.GptModel(config, 1L)
let parameters = model.parameters () |> Seq.sumBy (fun p -> p.numel ())
let logits = model.forward ((TorchSharp.torch.tensor [| 15496L; 11L; 995L |]).unsqueeze 0L)
printfn "ok %d %A" parameters logits.shape
model.Dispose()
