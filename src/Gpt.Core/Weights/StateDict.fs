namespace Gpt.Weights

open System
open System.Collections.Generic
open TorchSharp
open Gpt

/// The one way named tensors are copied into a model or an optimizer: every name, shape and type is checked first,
/// and all that is wrong is reported in one message (missing and unexpected names, wrong shapes, wrong types) before
/// anything is copied. Used by pretrained weights, checkpoints and optimizer state.
[<RequireQualifiedAccess>]
module StateDict =
    /// How a stored tensor must relate to the tensor it is copied into.
    type Layout =
        /// The same shape and the same type.
        | Exact
        /// The same shape, any floating-point type (converted on copy).
        | AnyFloat
        /// The transposed shape of a 2-D destination, any floating-point type: GPT-2's Conv1D weights are stored
        /// [in, out] for a Linear layer's [out, in].
        | TransposedFloat

    /// A destination: the tensor a stored one is copied into, under the name it is stored by.
    type Slot = { Name: string; Destination: torch.Tensor; Layout: Layout }

    /// The slots of a module's state_dict, under its own names.
    let slotsOf (layout: string -> Layout) (model: torch.nn.Module) : Slot list =
        [ for KeyValue(name, tensor) in model.state_dict () -> { Name = name; Destination = tensor; Layout = layout name } ]

    let private problemWith (display: string -> string) (slot: Slot) (stored: torch.Tensor) : string option =
        let wanted = if slot.Layout = TransposedFloat then Array.rev slot.Destination.shape else slot.Destination.shape
        let layout = if slot.Layout = TransposedFloat then " (Conv1D layout [in, out])" else ""
        if slot.Layout <> Exact && not (stored.is_floating_point ()) then
            Some(sprintf "tensor '%s' has dtype %O, expected a floating-point dtype" (display slot.Name) stored.dtype)
        elif stored.shape <> wanted then
            Some(sprintf "tensor '%s' has shape %s, expected %s%s" (display slot.Name) (Errors.shapeText stored.shape) (Errors.shapeText wanted) layout)
        elif slot.Layout = Exact && stored.dtype <> slot.Destination.dtype then
            Some(sprintf "tensor '%s' has type %O, expected %O" (display slot.Name) stored.dtype slot.Destination.dtype)
        else None

    /// Everything wrong with `stored` for `slots`, in order: each slot's tensor problem, then the missing names, then
    /// the unexpected ones ("missing <noun>: a, b"). `display` turns a stored name into the one a user knows.
    let problems (noun: string) (display: string -> string) (slots: Slot list) (stored: IReadOnlyDictionary<string, torch.Tensor>) =
        let expected = slots |> List.map _.Name |> HashSet
        let missing = slots |> List.map _.Name |> List.filter (stored.ContainsKey >> not) |> List.sort
        let unexpected = stored.Keys |> Seq.filter (expected.Contains >> not) |> Seq.map display |> Seq.sort |> List.ofSeq
        [ for slot in slots do
              match stored.TryGetValue slot.Name with
              | true, tensor -> yield! Option.toList (problemWith display slot tensor)
              | _ -> ()
          if not missing.IsEmpty then yield sprintf "missing %s: %s" noun (String.Join(", ", missing))
          if not unexpected.IsEmpty then yield sprintf "unexpected %s: %s" noun (String.Join(", ", unexpected)) ]

    /// Checks `stored` against `slots` (failing with "<where>: problem; problem") and copies every tensor into its
    /// destination, without gradients.
    let copy (where: string) (noun: string) (display: string -> string) (slots: Slot list) (stored: IReadOnlyDictionary<string, torch.Tensor>) =
        match problems noun display slots stored with
        | [] ->
            use _ = torch.no_grad ()
            for slot in slots do
                let value = stored[slot.Name]
                if slot.Layout = TransposedFloat then
                    use transposed = value.t ()
                    slot.Destination.copy_ transposed |> ignore
                else
                    slot.Destination.copy_ value |> ignore
        | wrong -> Errors.fail "%s: %s" where (String.Join("; ", wrong))
