module Gpt.Tests.Main

open Expecto

/// Runs every test of the assembly, then prints a last line "N passed, N failed" for CI.
[<EntryPoint>]
let main argv =
    let mutable counts = 0, 0
    let inner = defaultConfig.printer
    let printer =
        { inner with
            summary =
                fun config summary ->
                    counts <- summary.passed.Length, summary.failed.Length + summary.errored.Length
                    inner.summary config summary }
    let exitCode = runTestsInAssemblyWithCLIArgs [ CLIArguments.Printer printer; CLIArguments.No_Spinner ] argv
    let passed, failed = counts
    // Expecto leaves a colour reset without a newline: start a fresh line so the count stands alone.
    stdout.WriteLine()
    stdout.WriteLine(sprintf "%d passed, %d failed" passed failed)
    exitCode
