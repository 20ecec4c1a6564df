module Gpt.Tests.NativeLibrariesTests

open System
open System.IO
open Expecto
open Gpt
open Gpt.Kernels

/// TorchSharp's own libLibTorchSharp.so in the NuGet cache (read only: the tests patch copies in memory).
let originalLibrary =
    lazy
        let packages =
            match Environment.GetEnvironmentVariable "NUGET_PACKAGES" with
            | null | "" -> Path.Combine(Environment.GetFolderPath Environment.SpecialFolder.UserProfile, ".nuget", "packages")
            | dir -> dir
        let path = Path.Combine(packages, "torchsharp", "0.107.0", "runtimes", "linux-x64", "native", "libLibTorchSharp.so")
        if not (File.Exists path) then failtestf "TorchSharp's native library is not in the NuGet cache at %s" path
        File.ReadAllBytes path

let private weaken = ElfVersionNeeds.weaken NativeLibraries.GlibcxxVersion NativeLibraries.MarkerSymbol

[<Tests>]
let tests =
    testList "native libraries (the libstdc++ fix at run time)" [
        testCase "TorchSharp's library: the GLIBCXX_3.4.32 need marked weak, one flag bit and nothing else" <| fun () ->
            let original = originalLibrary.Value
            match weaken original with
            | ElfVersionNeeds.Weakened copy ->
                Expect.equal copy.Length original.Length "same size"
                let changed = [ for i in 0 .. original.Length - 1 do if copy[i] <> original[i] then i ]
                Expect.hasLength changed 1 "one byte changes (the Vernaux flags)"
                Expect.equal (int copy[changed.Head] - int original[changed.Head]) 2 "the VER_FLG_WEAK bit set"
                Expect.equal (weaken copy) ElfVersionNeeds.AlreadyWeak "the copy is recognised as patched"
            | other -> failtestf "expected a weakened copy, found %A" other

        testCase "refused when any symbol besides the marker is bound to the version" <| fun () ->
            // Declaring another marker makes the real one an "other" symbol: exactly the case the rule guards against.
            match ElfVersionNeeds.weaken NativeLibraries.GlibcxxVersion "someOtherMarker" originalLibrary.Value with
            | ElfVersionNeeds.Refused others -> Expect.equal others [ NativeLibraries.MarkerSymbol ] "names the bound symbol"
            | other -> failtestf "expected a refusal, found %A" other

        testCase "a version the library does not need is left alone" <| fun () ->
            let verdict = ElfVersionNeeds.weaken "GLIBCXX_9.9.99" NativeLibraries.MarkerSymbol originalLibrary.Value
            Expect.equal verdict ElfVersionNeeds.NotRequired "not required"

        testCase "a file that is not an ELF library, or is cut short, is an InvalidDataException" <| fun () ->
            let invalid (bytes: byte[]) what =
                Expect.throwsT<InvalidDataException> (fun () -> weaken bytes |> ignore) what
            invalid (Text.Encoding.ASCII.GetBytes "#!/bin/sh\necho not a library\n") "a script"
            invalid Array.empty "an empty file"
            invalid originalLibrary.Value[.. 4095] "the first 4 KB of the library"
            invalid originalLibrary.Value[.. originalLibrary.Value.Length / 2] "half the library"

        testCase "the per-user cache follows XDG_CACHE_HOME's layout" <| fun () ->
            let dir = NativeLibraries.cacheDirectory ()
            Expect.isTrue (dir.EndsWith(Path.Combine("gpt-dotnet", "native"))) dir
            Expect.isFalse (dir.Contains(Path.Combine(".nuget", "packages"))) "never under the NuGet cache"
    ]
