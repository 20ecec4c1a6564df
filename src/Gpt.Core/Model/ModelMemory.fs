namespace Gpt.Model

open System
open Gpt

/// A check made before a model is built: do its weights fit in this machine's memory at all? libtorch reserves
/// memory lazily, so a model larger than memory is not refused when it is allocated: it is filled until the kernel
/// kills the process, which no handler can turn into an error message.
[<RequireQualifiedAccess>]
module ModelMemory =
    /// The memory this process can use: the machine's, or its container's limit.
    let available () : int64 = GC.GetGCMemoryInfo().TotalAvailableMemoryBytes

    let private gigabytes (bytes: int64) = float bytes / 1e9

    /// Fails, naming `what`, when the weights of a model of this shape (float32) need more than `available ()`.
    let require (what: string) (config: GptConfig) =
        let needed = GptConfig.memoryBytes config
        let available = available ()
        if available > 0L && needed > available then
            Errors.fail "%s: a model of %d parameters needs %.1f GB for its weights alone, more than the %.1f GB of memory available"
                what (GptConfig.parameterCount config) (gigabytes needed) (gigabytes available)
