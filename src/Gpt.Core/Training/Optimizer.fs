namespace Gpt.Training

open System
open System.Collections.Generic
open TorchSharp
open TorchSharp.Modules
open Gpt
open Gpt.Kernels
open Gpt.Weights

/// AdamW hyperparameters.
type AdamWSettings =
    { LearningRate: float
      Beta1: float
      Beta2: float
      Epsilon: float
      /// Decoupled weight decay (AdamW's, not an L2 term in the loss).
      WeightDecay: float
      /// Decay every parameter, as the book does; otherwise (nanoGPT) only tensors of two or more dimensions,
      /// the matrices, and neither biases nor layer-norm gains.
      DecayAll: bool }

/// Parameters that share a weight decay, with their state_dict names so that optimizer state can be saved by name.
type NamedParameterGroup =
    { Names: string[]
      Parameters: Parameter[]
      WeightDecay: float }

/// AdamW over named parameter groups. Dispose it to free the moment tensors.
type NamedAdamW(groups: NamedParameterGroup[], settings: AdamWSettings) =
    let adamW =
        torch.optim.AdamW(
            groups
            |> Array.map (fun g ->
                AdamW.ParamGroup(g.Parameters, settings.LearningRate, settings.Beta1, settings.Beta2, settings.Epsilon, g.WeightDecay)),
            settings.LearningRate, settings.Beta1, settings.Beta2, settings.Epsilon)

    /// The TorchSharp optimizer.
    member _.AdamW = adamW
    member _.Groups = groups
    member _.Settings = settings

    /// The learning rate of every group: set it before each step to follow a schedule.
    member _.LearningRate
        with get () = (Seq.head adamW.ParamGroups).LearningRate
        and set (value: float) =
            for group in adamW.ParamGroups do
                group.LearningRate <- value

    /// Every (name, parameter) in group order.
    member _.NamedParameters = groups |> Array.collect (fun g -> Array.zip g.Names g.Parameters)

    /// AdamW's per-parameter state (step count and the two moments), in group order, with parameter names.
    member _.States: (string * AdamW.State)[] =
        let names = groups |> Array.collect _.Names
        let states = adamW.state_dict().State |> Seq.map (fun s -> s :?> AdamW.State) |> Array.ofSeq
        if states.Length <> names.Length then
            Errors.fail "AdamW holds state for %d parameters, its groups name %d" states.Length names.Length
        Array.zip names states

    /// Clears the gradients before a step. Small ones are zeroed in place; those of parameters of 32 MB or more
    /// (NativeAllocator.mmapThresholdBytes: GPT-2's 50,257-row embedding and head) are dropped, as PyTorch's
    /// zero_grad(set_to_none=True) does. Why both: a dropped gradient takes no memory until backward makes a new
    /// one, which it then keeps as it comes (no zeroing pass, no addition, no second copy alive at once); that
    /// saves gpt2-small 460 MB at the peak. But dropping the many small gradients too would have glibc reallocate
    /// them among the activations at every step, and its heap then grew by ~80 MB a step (measured); large
    /// buffers are separate mappings and cannot fragment the heap.
    member _.ZeroGrad() =
        for group in groups do
            for parameter in group.Parameters do
                if parameter.numel () * int64 (parameter.ElementSize) >= int64 NativeAllocator.mmapThresholdBytes then
                    parameter.grad <- null
                else
                    use grad = parameter.grad
                    if not (isNull grad) then grad.zero_ () |> ignore

    /// One AdamW update. The arithmetic is TorchSharp's AdamW.step, operation for operation (so the results are the
    /// same to the bit), but each parameter is updated in slices of at most NamedAdamW.SliceElements values. Why:
    /// TorchSharp's step makes two temporaries the size of each parameter (for gpt2-small's 50,257 × 768 matrices,
    /// 154 MB each, every step), and fresh memory of that size is mapped and zeroed by the kernel each time, which
    /// made the optimizer step several times slower than its arithmetic; slices keep the temporaries small (reused by
    /// the allocator) and the five arrays of a slice in cache between the six passes over them.
    member this.Step() =
        let groups = adamW.ParamGroups |> Seq.map (fun g -> g :?> AdamW.ParamGroup) |> Array.ofSeq
        let options = groups |> Array.map (fun g -> g.Options)
        if options |> Array.exists (fun o -> o.amsgrad.GetValueOrDefault() || o.maximize.GetValueOrDefault()) then
            adamW.step () |> ignore
        else
            use _ = torch.no_grad ()
            let states = adamW.state_dict().State
            let mutable index = 0
            for group, o in Array.zip groups options do
                for parameter in group.Parameters do
                    let state = states[index] :?> AdamW.State
                    index <- index + 1
                    use grad = parameter.grad
                    if not (isNull grad) then
                        state.step <- state.step + 1L
                        NamedAdamW.Update(parameter, grad, state, o.LearningRate.Value, o.beta1.Value, o.beta2.Value, o.eps.Value,
                                          o.weight_decay.Value)

    /// Largest slice of a parameter updated at once: 2M values (8 MB per array). Measured on a 163M-value update:
    /// 256K values 0.36 s (the per-call overhead of 9 operations per slice dominates), 1M 0.23 s, 2M 0.20 s, 4M 0.21 s,
    /// 8M 0.22 s.
    static member SliceElements = 1L <<< 21

    static member private Update(parameter: torch.Tensor, grad: torch.Tensor, state: AdamW.State, lr: float, beta1: float,
                                 beta2: float, eps: float, weightDecay: float) =
        let biasCorrection1 = 1.0 - Math.Pow(beta1, float state.step)
        let biasCorrection2 = 1.0 - Math.Pow(beta2, float state.step)
        let stepSize = lr / biasCorrection1
        let tensors = [| parameter; grad; state.exp_avg; state.exp_avg_sq |]
        let total = parameter.numel ()
        let sliced = tensors |> Array.forall (fun t -> t.is_contiguous () && t.numel () = total)
        let sliceLength = if sliced then NamedAdamW.SliceElements else total
        let mutable start = 0L
        while start < total do
            use scope = torch.NewDisposeScope()
            let length = min sliceLength (total - start)
            let slice (t: torch.Tensor) = if sliced then t.view(-1L).narrow(0L, start, length) else t
            let p, g, m, v = slice parameter, slice grad, slice state.exp_avg, slice state.exp_avg_sq
            p.mul_((1.0 - lr * weightDecay).ToScalar()) |> ignore
            m.mul_(beta1.ToScalar()).add_(g, alpha = (1.0 - beta1).ToScalar()) |> ignore
            v.mul_(beta2.ToScalar()).addcmul_(g, g, value = (1.0 - beta2).ToScalar()) |> ignore
            let denominator = v.sqrt().div_((Math.Sqrt biasCorrection2).ToScalar()).add_(eps.ToScalar())
            p.addcdiv_(m, denominator, value = (-stepSize).ToScalar()) |> ignore
            start <- start + length

    interface IDisposable with
        member _.Dispose() = adamW.Dispose()

/// AdamW construction, gradient clipping, and optimizer state by parameter name.
[<RequireQualifiedAccess>]
module Optimizer =
    /// The book's chapter 5 settings (lr 4e-4, PyTorch's betas (0.9, 0.999), decay 0.1) with nanoGPT's decay policy.
    let defaults =
        { LearningRate = 4e-4; Beta1 = 0.9; Beta2 = 0.999; Epsilon = 1e-8; WeightDecay = 0.1; DecayAll = false }

    /// A module's trainable parameters by name: those that require a gradient, each tensor once. A tensor shared
    /// under two names (tied weights) is listed once, under its first name: AdamW would otherwise step it twice.
    let trainable (model: torch.nn.Module) : (string * Parameter)[] =
        let seen = HashSet<nativeint>()
        [| for struct (name, parameter) in model.named_parameters () do
               if parameter.requires_grad && seen.Add parameter.Handle then yield name, parameter |]

    /// Splits named parameters into a decayed group and a non-decayed group (empty groups are left out).
    let groupsOf (weightDecay: float) (decayAll: bool) (named: (string * Parameter)[]) : NamedParameterGroup[] =
        let group (members: (string * Parameter)[]) decay =
            { Names = Array.map fst members; Parameters = Array.map snd members; WeightDecay = decay }
        let decayed, undecayed =
            if decayAll then named, [||] else named |> Array.partition (fun (_, p) -> p.dim () >= 2L)
        [| if decayed.Length > 0 then group decayed weightDecay
           if undecayed.Length > 0 then group undecayed 0.0 |]

    /// A model's trainable parameters in a decayed and a non-decayed group.
    let parameterGroups (weightDecay: float) (decayAll: bool) (model: torch.nn.Module) : NamedParameterGroup[] =
        groupsOf weightDecay decayAll (trainable model)

    /// AdamW over named parameters with the settings' weight-decay policy. Only these parameters are stepped and get
    /// optimizer state.
    let adamWOver (settings: AdamWSettings) (named: (string * Parameter)[]) : NamedAdamW =
        Errors.require (settings.LearningRate >= 0.0) "the learning rate must not be negative, found %g" settings.LearningRate
        Errors.require (settings.Beta1 >= 0.0 && settings.Beta1 < 1.0 && settings.Beta2 >= 0.0 && settings.Beta2 < 1.0)
            "AdamW betas must be in [0, 1), found (%g, %g)" settings.Beta1 settings.Beta2
        Errors.require (settings.WeightDecay >= 0.0) "weight decay must not be negative, found %g" settings.WeightDecay
        let groups = groupsOf settings.WeightDecay settings.DecayAll named
        if groups.Length = 0 then Errors.fail "the model has no trainable parameters"
        new NamedAdamW(groups, settings)

    /// AdamW over a model's trainable parameters.
    let adamW (settings: AdamWSettings) (model: torch.nn.Module) : NamedAdamW = adamWOver settings (trainable model)

    /// The global L2 norm of the gradients, as if all were one vector (parameters without a gradient count 0).
    let gradientNorm (parameters: Parameter seq) : float =
        use _ = torch.no_grad ()
        let mutable sum = 0.0
        for parameter in parameters do
            use grad = parameter.grad
            if not (isNull grad) then
                use norm = grad.norm()
                let n = norm.item<float32> () |> float
                sum <- sum + n * n
        sqrt sum

    /// Scales every gradient by maxNorm / norm when the global norm exceeds maxNorm; returns the norm before
    /// clipping (PyTorch's clip_grad_norm_).
    let clipGradients (maxNorm: float) (parameters: Parameter seq) : float =
        Errors.require (maxNorm > 0.0) "the gradient clipping norm must be positive, found %g" maxNorm
        torch.nn.utils.clip_grad_norm_(parameters, maxNorm)

    /// AdamW's step count of every parameter, by name.
    let stepCounts (optimizer: NamedAdamW) : (string * int64)[] =
        optimizer.States |> Array.map (fun (name, state) -> name, state.step)

    /// AdamW's moments by name, "<parameter>.exp_avg" and "<parameter>.exp_avg_sq" (PyTorch's names). The tensors
    /// belong to the optimizer: do not dispose them.
    let momentTensors (optimizer: NamedAdamW) : (string * torch.Tensor)[] =
        optimizer.States
        |> Array.collect (fun (name, state) -> [| name + ".exp_avg", state.exp_avg; name + ".exp_avg_sq", state.exp_avg_sq |])

    /// Restores AdamW's state from moments and step counts by name (as written by momentTensors and stepCounts).
    /// Every parameter must be present with the right shape; `source` names the file in error messages.
    let restoreState (source: string) (optimizer: NamedAdamW) (moments: IReadOnlyDictionary<string, torch.Tensor>) (steps: IReadOnlyDictionary<string, int64>) =
        let states = optimizer.States
        let slots =
            [ for name, state in states do
                  { StateDict.Name = name + ".exp_avg"; StateDict.Destination = state.exp_avg; StateDict.Layout = StateDict.Exact }
                  { StateDict.Name = name + ".exp_avg_sq"; StateDict.Destination = state.exp_avg_sq; StateDict.Layout = StateDict.Exact } ]
        let noSteps = states |> Array.map fst |> Array.filter (steps.ContainsKey >> not)
        match StateDict.problems "tensors" id slots moments with
        | [] when noSteps.Length > 0 -> Errors.fail "optimizer state '%s': no step count for: %s" source (String.Join(", ", noSteps))
        | _ -> StateDict.copy (sprintf "optimizer state '%s'" source) "tensors" id slots moments
        for name, state in states do
            state.step <- steps[name]
