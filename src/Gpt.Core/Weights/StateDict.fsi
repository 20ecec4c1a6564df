namespace Gpt.Weights

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
    type Slot =
        {
          Name: string
          Destination: TorchSharp.torch.Tensor
          Layout: Layout
        }

    /// The slots of a module's state_dict, under its own names.
    val slotsOf:
      layout: (string -> Layout) ->
        model: TorchSharp.torch.nn.Module -> Slot list

    /// Everything wrong with `stored` for `slots`, in order: each slot's tensor problem, then the missing names, then
    /// the unexpected ones ("missing <noun>: a, b"). `display` turns a stored name into the one a user knows.
    val problems:
      noun: string ->
        display: (string -> string) ->
        slots: Slot list ->
        stored: System.Collections.Generic.IReadOnlyDictionary<string,
                                                               TorchSharp.torch.Tensor> ->
        string list

    /// Checks `stored` against `slots` (failing with "<where>: problem; problem") and copies every tensor into its
    /// destination, without gradients.
    val copy:
      where: string ->
        noun: string ->
        display: (string -> string) ->
        slots: Slot list ->
        stored: System.Collections.Generic.IReadOnlyDictionary<string,
                                                               TorchSharp.torch.Tensor> ->
        unit
