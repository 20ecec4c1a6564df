namespace Gpt

open System

/// The exception the library raises for bad input or bad files. Its message says what was expected, what was
/// found, and where, so that a user can act on it without a debugger.
type GptException(message: string, inner: exn) =
    inherit Exception(message, inner)
    new(message: string) = GptException(message, null)

/// Helpers that raise GptException with formatted messages.
[<RequireQualifiedAccess>]
module Errors =
    /// Raise a GptException with a printf-style message.
    let fail format = Printf.ksprintf (fun message -> raise (GptException message)) format

    /// Raise a GptException when the condition does not hold.
    let require condition format =
        Printf.ksprintf (fun message -> if not condition then raise (GptException message)) format

    /// Formats a shape as "[8, 4, 256]".
    let shapeText (shape: int64 seq) = "[" + (shape |> Seq.map string |> String.concat ", ") + "]"
