namespace Gpt.Model

open System
open TorchSharp
open Gpt

/// Where a model's tensors live (`--device`, RunSettings.Device, GptModel.ToDevice).
[<RequireQualifiedAccess>]
type Device =
    /// The CPU (the default).
    | Cpu
    /// A CUDA GPU: its number (cuda:N), or None for the first (cuda).
    | Cuda of index: int option
    /// CUDA when torch sees a CUDA device, else the CPU.
    | Auto

/// Parsing a device, resolving it against the machine and the build, and putting modules and tensors on it.
[<RequireQualifiedAccess>]
module Device =
    /// The TorchSharp package this build was compiled against: "cpu" (TorchSharp-cpu, this repository's default) or
    /// "cuda" (built with -p:TorchBackend=cuda, which references TorchSharp-cuda-linux or -windows instead).
    let backend =
#if TORCH_CUDA
        "cuda"
#else
        "cpu"
#endif

    let private expected = "expected cpu, cuda, cuda:N (N a GPU number such as 0) or auto"

    /// "cpu", "cuda", "cuda:N" or "auto" (any case, white space around ignored); errors name what was expected and
    /// what was found.
    let parse (text: string) : Device =
        let trimmed = if isNull text then "" else text.Trim().ToLowerInvariant()
        match trimmed with
        | "" -> Errors.fail "no device given: %s" expected
        | "cpu" -> Device.Cpu
        | "cuda" | "gpu" -> Device.Cuda None
        | "auto" -> Device.Auto
        | _ when trimmed.StartsWith "cuda:" ->
            let number = trimmed.Substring "cuda:".Length
            match Int32.TryParse(number, Globalization.NumberStyles.None, Globalization.CultureInfo.InvariantCulture) with
            | true, index -> Device.Cuda(Some index)
            | _ -> Errors.fail "device '%s': expected a GPU number after 'cuda:', such as cuda:0, found '%s'" (text.Trim()) number
        | _ -> Errors.fail "unknown device '%s': %s" (text.Trim()) expected

    /// The text `parse` reads back: cpu, cuda, cuda:N or auto.
    let name (device: Device) =
        match device with
        | Device.Cpu -> "cpu"
        | Device.Cuda None -> "cuda"
        | Device.Cuda(Some index) -> sprintf "cuda:%d" index
        | Device.Auto -> "auto"

    /// Whether torch sees a CUDA device (always false with TorchSharp-cpu).
    let cudaAvailable () =
        Gpt.Kernels.NativeLibraries.install ()
        torch.cuda.is_available ()

    /// The torch device for a setting: Auto is CUDA when available, else the CPU. Asking for CUDA where there is none is
    /// a GptException that says why (this build's TorchSharp, or the machine) and what to do, never a native crash.
    let resolve (device: Device) : torch.Device =
        let cuda (asked: string) (index: int) =
            if not (cudaAvailable ()) then
                if backend = "cpu" then
                    Errors.fail
                        "CUDA was asked for (device %s) but this build uses TorchSharp-cpu, which has no CUDA: build with -p:TorchBackend=cuda (TorchSharp-cuda-linux or -windows, an NVIDIA GPU and its driver; see the README, 'Devices'), or use --device cpu (or auto)"
                        asked
                else
                    Errors.fail
                        "CUDA was asked for (device %s) but torch sees no CUDA device: check the NVIDIA driver (nvidia-smi) and CUDA_VISIBLE_DEVICES, or use --device cpu (or auto)"
                        asked
            let count = torch.cuda.device_count ()
            if index >= count then
                Errors.fail "device %s does not exist: torch sees %d CUDA device%s (cuda:0%s)" asked count (if count = 1 then "" else "s")
                    (if count > 1 then sprintf "..cuda:%d" (count - 1) else "")
            torch.Device(DeviceType.CUDA, index)
        match device with
        | Device.Cpu -> torch.CPU
        | Device.Cuda index -> cuda (name device) (defaultArg index 0)
        | Device.Auto -> if cudaAvailable () then torch.Device(DeviceType.CUDA, 0) else torch.CPU

    /// A device's short text as torch writes it: cpu, cuda:0, ...
    let describe (device: torch.Device) =
        if device.``type`` = DeviceType.CPU then "cpu" else sprintf "%s:%d" (device.``type``.ToString().ToLowerInvariant()) device.index

    /// Moves a module's parameters and buffers to the device (resolved first, so a device that is not there fails
    /// before anything moves) and returns the torch device. Moving to where it already is changes nothing.
    /// Parameters captured before the move are stale afterwards (TorchSharp replaces them), so a run places its model
    /// before it lists what to train and makes its optimizer.
    let place (device: Device) (model: torch.nn.Module) : torch.Device =
        let target = resolve device
        let elsewhere (tensor: torch.Tensor) = tensor.device_type <> target.``type`` || (target.``type`` <> DeviceType.CPU && tensor.device_index <> target.index)
        if Seq.exists elsewhere (model.parameters ()) || Seq.exists elsewhere (model.buffers ()) then model.``to``(target) |> ignore
        target
