// The build pipeline: dotnet fsi build.fsx [-t Target]   (default target: Test)
// Targets: Clean, Restore, Build, Test, Train (the README's main job), Bench (gpt bench, every part), All,
// Pack (the NuGet packages and the gpt tool into artifacts/packages), PackageTest (the samples and the tool from
// those packages alone, with an empty NuGet cache), Publish (gpt for this machine into artifacts/publish/gpt).
#r "nuget: FSharp.Control.Reactive, 4.4.2"
// FAKE's dependencies at the versions this registry mirror serves. Without these direct references NuGet warns
// (NU1603) for each lower bound it cannot find and takes the next version anyway. FSharp.Control.Reactive stays a
// downgrade warning (NU1605) on a cold cache: FAKE 6 asks for >= 5.0.2, which the mirror does not serve.
#r "nuget: MSBuild.StructuredLogger, 2.3.244"
#r "nuget: Microsoft.Build.Framework, 17.7.2"
#r "nuget: Microsoft.Build.Utilities.Core, 17.6.3"
#r "nuget: NuGet.Protocol, 7.0.3"
#r "nuget: System.Reactive, 5.0.0"
#r "nuget: System.Security.Cryptography.Pkcs, 9.0.11"
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
let packages = "artifacts/packages"

let run (command: string) (args: string) =
    let result = DotNet.exec id command args
    if not result.OK then failwithf "dotnet %s %s failed (exit code %d)" command args result.ExitCode

/// Exit code of gpt stopped by Ctrl+C (or SIGTERM) after saving a checkpoint: not a failure of the build.
let interrupted = 130
let mutable exitCode = 0

/// Runs gpt through `dotnet run`, which builds only what changed. Ctrl+C reaches gpt too (the terminal signals the
/// whole process group) and gpt stops after the current step with a checkpoint (exit code 130): this script waits for
/// it and reports the stop, not a failure. The process is started here rather than through FAKE, whose own Ctrl+C
/// handler kills the processes it started, before gpt has saved anything.
let runGpt (args: string) =
    run "tool" "restore" // Paket, which dotnet run's restore calls
    use _ = System.Console.CancelKeyPress.Subscribe(fun e -> e.Cancel <- true)
    let start = System.Diagnostics.ProcessStartInfo("dotnet", sprintf "run --project %s -c Release -- %s" cli args)
    start.WorkingDirectory <- __SOURCE_DIRECTORY__
    use gpt = System.Diagnostics.Process.Start start
    gpt.WaitForExit()
    if gpt.ExitCode = interrupted then
        Trace.log (sprintf "gpt %s stopped by Ctrl+C (exit code %d); what it saved is kept" args interrupted)
        exitCode <- interrupted
    elif gpt.ExitCode <> 0 then
        failwithf "gpt %s failed (exit code %d)" args gpt.ExitCode

Target.create "Clean" (fun _ ->
    !! "src/*/bin" ++ "src/*/obj" ++ "tests/*/bin" ++ "tests/*/obj" ++ "artifacts" |> Shell.cleanDirs)

Target.create "Restore" (fun _ ->
    run "tool" "restore"
    run "paket" "restore"
    run "restore" solution)

Target.create "Build" (fun _ -> run "build" (solution + " --no-restore -c Release"))

Target.create "Test" (fun _ -> run "test" (solution + " --no-restore"))

Target.create "Train" (fun _ -> runGpt "train")

Target.create "Bench" (fun _ -> runGpt "bench all")

// Gpt.Core, Gpt.Plot, Gpt.CSharp (with .snupkg symbol packages) and the gpt tool: one small package that points to a package
// per platform (Gpt.Cli.linux-x64, .win-x64, .osx-arm64). The version is set in Directory.Build.props.
Target.create "Pack" (fun _ ->
    Shell.cleanDir packages
    run "pack" (sprintf "%s --no-restore -c Release -p:PackageOutputPath=%s/" solution (System.IO.Path.GetFullPath packages)))

// The package test of the suite (tests/Gpt.CSharp.Tests/PackageTests.cs), which the normal run skips: the C# and F#
// samples and the installed tool, from artifacts/packages alone and an empty NuGet cache.
Target.create "PackageTest" (fun _ ->
    System.Environment.SetEnvironmentVariable("GPT_PACKAGE_TESTS", "1")
    System.Environment.SetEnvironmentVariable("GPT_PACKAGE_SOURCE", System.IO.Path.GetFullPath packages)
    run "test" "tests/Gpt.CSharp.Tests --no-restore --filter FullyQualifiedName~PackageTests --logger console;verbosity=detailed")

// gpt for this machine's platform, framework-dependent, in artifacts/publish/gpt: put that folder on the PATH.
Target.create "Publish" (fun _ ->
    run "publish" (sprintf "%s -c Release --use-current-runtime --self-contained false -o artifacts/publish/gpt" cli))

Target.create "All" ignore

"Clean" ?=> "Restore"
"Restore" ==> "Build" ==> "All"
"Restore" ==> "Test" ==> "All"
"Restore" ==> "Pack" ==> "PackageTest"
"Restore" ?=> "Publish"

Target.runOrDefaultWithArguments "Test"
exit exitCode
