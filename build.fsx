// The build pipeline: dotnet fsi build.fsx [-t Target]   (default target: Test)
// Targets: Clean, Restore, Build, Test, Train (the README's main job), Bench (gpt bench, every part), All.
#r "nuget: FSharp.Control.Reactive, 4.4.2"
#r "nuget: Fake.Core.Target, 6.2.0"
#r "nuget: Fake.DotNet.Cli, 6.2.0"
#r "nuget: Fake.IO.FileSystem, 6.2.0"

open Fake.Core
open Fake.Core.TargetOperators
open Fake.DotNet
open Fake.IO
open Fake.IO.Globbing.Operators

// FAKE expects its runner's execution context; plain F# Interactive has to create one.
let arguments = fsi.CommandLineArgs |> Array.skip 1 |> List.ofArray
Context.FakeExecutionContext.Create false "build.fsx" arguments
|> Context.RuntimeContext.Fake
|> Context.setExecutionContext

let solution = "Gpt.sln"
let cli = "src/Gpt.Cli"

let run (command: string) (args: string) =
    let result = DotNet.exec id command args
    if not result.OK then failwithf "dotnet %s %s failed (exit code %d)" command args result.ExitCode

Target.create "Clean" (fun _ ->
    !! "src/*/bin" ++ "src/*/obj" ++ "tests/*/bin" ++ "tests/*/obj" |> Shell.cleanDirs)

Target.create "Restore" (fun _ ->
    run "tool" "restore"
    run "paket" "restore"
    run "restore" solution)

Target.create "Build" (fun _ -> run "build" (solution + " --no-restore -c Release"))

Target.create "Test" (fun _ -> run "test" (solution + " --no-restore"))

Target.create "Train" (fun _ -> run "run" (sprintf "--project %s -c Release --no-restore -- train" cli))

Target.create "Bench" (fun _ -> run "run" (sprintf "--project %s -c Release --no-restore -- bench all" cli))

Target.create "All" ignore

"Clean" ?=> "Restore"
"Restore" ==> "Build" ==> "All"
"Restore" ==> "Test" ==> "All"
"Build" ==> "Train"
"Build" ==> "Bench"

Target.runOrDefaultWithArguments "Test"
