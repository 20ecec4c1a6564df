// Stops with a "build first" message when the library is not built. Scripts load it on its own line, before load.fsx:
//   #load "check-build.fsx"
//   #load "load.fsx"
// Why a file of its own: F# Interactive compiles a #load'ed file, with everything it loads, as a whole, so a check
// inside load.fsx could never run before its #r lines failed (error FS0078, "Unable to find the file 'Gpt.Core.dll'").
// Two #load lines of the main script (or two submissions in an interactive session) run one after the other.
// load.fsx takes the Debug build, else the Release one; this check accepts either.
open System.IO

let private gptBuilds =
    [ "Debug"; "Release" ]
    |> List.map (fun configuration -> Path.GetFullPath(Path.Combine(__SOURCE_DIRECTORY__, "..", "src", "Gpt.Cli", "bin", configuration, "net10.0")))

let private gptAssemblies =
    [ "TorchSharp.dll"; "Microsoft.ML.Tokenizers.dll"; "Gpt.Core.dll"; "Gpt.Plot.dll"; "Gpt.Bench.dll" ]

let private isComplete (directory: string) =
    gptAssemblies |> List.forall (fun name -> File.Exists(Path.Combine(directory, name)))

if not (gptBuilds |> List.exists isComplete) then
    eprintfn "The Gpt library is not built: F# Interactive scripts use the build output of src/Gpt.Cli, and neither"
    for directory in gptBuilds do eprintfn "  %s" directory
    eprintfn "holds %s." (String.concat ", " gptAssemblies)
    eprintfn "Build first: dotnet build src/Gpt.Cli   (or: dotnet build src/Gpt.Cli -c Release)"
    exit 1
