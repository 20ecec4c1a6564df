module Gpt.Tests.TestUtil

open System
open System.IO
open Expecto

/// The repository root (where Gpt.sln is), found from the test binary's folder.
let repositoryRoot =
    let rec up (dir: DirectoryInfo) =
        if isNull dir then failwith "Gpt.sln not found above the test binary"
        elif File.Exists(Path.Combine(dir.FullName, "Gpt.sln")) then dir.FullName
        else up dir.Parent
    up (DirectoryInfo AppContext.BaseDirectory)

/// A path under tests/fixtures.
let fixture (relative: string) = Path.Combine(repositoryRoot, "tests", "fixtures", relative)

/// A fresh temporary folder, deleted on dispose.
type TempDir() =
    let path = Path.Combine(Path.GetTempPath(), "gpt-tests-" + Guid.NewGuid().ToString("N"))
    do Directory.CreateDirectory path |> ignore
    member _.Path = path
    member _.File(name: string) = Path.Combine(path, name)
    interface IDisposable with
        member _.Dispose() = try Directory.Delete(path, true) with _ -> ()

/// Expects a GptException whose message contains every fragment.
let throwsGpt (fragments: string list) (action: unit -> unit) (message: string) =
    try
        action ()
        failtestf "%s: expected a GptException, none was raised" message
    with
    | :? Gpt.GptException as e ->
        for fragment in fragments do
            Expect.stringContains e.Message fragment (sprintf "%s: message '%s'" message e.Message)

/// FsCheck configuration for property tests.
let propertyConfig = { FsCheckConfig.defaultConfig with maxTest = 200 }
