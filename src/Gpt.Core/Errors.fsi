namespace Gpt

/// The exception the library raises for bad input or bad files. Its message says what was expected, what was
/// found, and where, so that a user can act on it without a debugger.
type GptException =
    inherit System.Exception

    new: message: string -> GptException

    new: message: string * inner: exn -> GptException

/// Helpers that raise GptException with formatted messages.
[<RequireQualifiedAccess>]
module Errors =

    /// Raise a GptException with a printf-style message.
    val fail: format: Printf.StringFormat<'a,'b> -> 'a

    /// Raise a GptException when the condition does not hold.
    val require:
      condition: bool -> format: Printf.StringFormat<'a,unit> -> 'a

    /// Formats a shape as "[8, 4, 256]".
    val shapeText: shape: int64 seq -> string
