namespace Gpt.Kernels

#nowarn "9"

open System
open System.Diagnostics
open System.Runtime.InteropServices
open System.Threading
open Microsoft.FSharp.NativeInterop

/// A piece of parallel work cut into numbered chunks, each run once, in any order, on any thread. Subclasses keep
/// their inputs in mutable fields, so that one object serves every call (no allocation per call).
///
/// A plain job runs Execute(chunk), which reads its inputs and writes its results. A Speculative job splits the two:
/// Compute(chunk) takes a copy of the job's parameters, checks with the pool that the run is still current, and
/// computes the chunk's results into scratch memory private to its thread, touching nothing shared; Commit(chunk)
/// then writes them out, exactly once per chunk. Why: on a shared machine a worker can lose its core for
/// milliseconds in the middle of a chunk; the caller of a speculative job does not wait for it, it computes the chunk
/// again itself and commits first (the late worker's results are dropped).
[<AbstractClass; AllowNullLiteral>]
type ParallelJob() =
    /// A plain job's chunk: read the inputs, write the results.
    abstract Execute: chunk: int -> unit
    default _.Execute(_: int) = ()

    /// Whether chunks are computed apart from writing their results (Compute, then Commit).
    abstract Speculative: bool
    default _.Speculative = false

    /// Bytes of thread-private scratch one chunk's results need (speculative jobs).
    abstract ScratchBytes: int
    default _.ScratchBytes = 0

    /// A speculative job's chunk: copies the job's parameters, returns false without touching memory unless
    /// pool.IsCurrent(generation) still holds after the copy, then computes the results into `scratch`.
    abstract Compute: chunk: int * scratch: nativeint * pool: WorkerPool * generation: int -> bool
    default _.Compute(_: int, _: nativeint, _: WorkerPool, _: int) = false

    /// Writes a computed chunk's results out of `scratch` (runs once per chunk, while the run is current).
    abstract Commit: chunk: int * scratch: nativeint -> unit
    default _.Commit(_: int, _: nativeint) = ()

/// Thread-private scratch memory, grown as needed (native, 64-byte aligned; freed with its thread... never, as the
/// threads live as long as the process; the caller's threads keep theirs in a thread-static slot).
and [<Sealed; AllowNullLiteral>] internal Scratch() =
    let mutable address = 0n
    let mutable bytes = 0
    member _.Ensure(needed: int) =
        if needed > bytes then
            if address <> 0n then NativeMemory.AlignedFree(NativePtr.toVoidPtr (NativePtr.ofNativeInt<byte> address))
            let size = max needed (2 * bytes)
            address <- NativePtr.toNativeInt (NativePtr.ofVoidPtr<byte> (NativeMemory.AlignedAlloc(unativeint size, 64un)))
            bytes <- size
        address

/// A few threads that stay alive and share out the chunks of one job at a time with the calling thread.
///
/// Why not Parallel.For or Task: generating a token runs ~60 parallel regions of 0.05–1 ms each (one per matrix
/// product); Parallel.For costs a few microseconds and several allocations per region, and its threads go back to
/// the thread pool in between. Here the workers spin for a short while after each job (the next region starts
/// microseconds later), then block, so an idle pool costs no CPU. Chunks are claimed one at a time from a shared
/// counter: when another process takes a core away from a worker, the calling thread simply does more chunks, and
/// for a speculative job it also redoes a chunk a worker claimed but has not finished within ~30 µs.
///
/// Each chunk's results come from one thread's computation, so they do not depend on how chunks were shared out. A
/// job that is started while the pool is busy with another caller's job (two generations at once), or from inside a
/// job, runs on the calling thread alone.
and [<Sealed; AllowNullLiteral>] WorkerPool(workers: int) =
    do if workers < 0 then invalidArg (nameof workers) (sprintf "worker count must be >= 0, found %d" workers)
    [<ThreadStatic; DefaultValue>]
    static val mutable private callerScratch: Scratch
    let gate = obj ()
    let wake = new ManualResetEventSlim(false, 1)
    /// (generation <<< 32) ||| next chunk to claim. A finished job's state is poisoned (next = Int32.MaxValue): a late
    /// worker can never claim a chunk of a job that is over, and a speculative Compute sees that it is stale.
    let mutable state = 0L
    let mutable generation = 0
    let mutable job: ParallelJob = null
    let mutable count = 0
    let mutable finished = 0
    let mutable failure: exn = null
    let mutable sleeping = 0
    /// Workers inside a job (between reading the state and leaving their chunk).
    let mutable active = 0
    /// Speculative chunks: (generation <<< 2) ||| 0 open, 1 being committed, 2 done.
    let mutable chunkStates: int64[] = Array.zeroCreate 64
    /// How long a worker spins for the next job before it blocks (~100 µs), and the least the caller waits for a
    /// worker's unfinished speculative chunk before computing it itself (~30 µs; twice a chunk's time when longer).
    let spinTicks = Stopwatch.Frequency / 10_000L
    let takeOverTicks = max 1L (Stopwatch.Frequency * 30L / 1_000_000L)

    static let openState (g: int) = int64 g <<< 2
    static let committingState (g: int) = (int64 g <<< 2) ||| 1L
    static let doneState (g: int) = (int64 g <<< 2) ||| 2L

    /// Computes and commits chunk `index` of a speculative job unless someone else commits it first. A chunk whose
    /// Compute or Commit fails counts as finished, with the failure kept for Run to raise.
    let speculate (task: ParallelJob) (states: int64[]) (index: int) (mine: int) (scratch: Scratch) (owner: WorkerPool) =
        let memory = scratch.Ensure(task.ScratchBytes)
        let mutable computed = false
        let mutable error: exn = null
        try
            computed <- task.Compute(index, memory, owner, mine)
        with e ->
            error <- e
        if (computed || not (isNull error))
           && Interlocked.CompareExchange(&states[index], committingState mine, openState mine) = openState mine then
            try
                try
                    if isNull error then task.Commit(index, memory)
                with e ->
                    error <- e
            finally
                if not (isNull error) then Interlocked.CompareExchange(&failure, error, null) |> ignore
                Volatile.Write(&states[index], doneState mine)
                Interlocked.Increment(&finished) |> ignore

    /// Claims and runs chunks of generation `mine` until none is left; returns how many it ran.
    let work (mine: int) (scratch: Scratch) (owner: WorkerPool) =
        let mutable claimed = true
        let mutable ran = 0
        while claimed do
            let current = Volatile.Read(&state)
            let next = int (current &&& 0xFFFFFFFFL)
            if int (current >>> 32) <> mine || next >= Volatile.Read(&count) then claimed <- false
            elif Interlocked.CompareExchange(&state, current + 1L, current) = current then
                ran <- ran + 1
                match Volatile.Read(&job) with
                | null -> ()
                | task ->
                    try
                        if task.Speculative then speculate task (Volatile.Read(&chunkStates)) next mine scratch owner
                        else
                            try task.Execute next
                            finally Interlocked.Increment(&finished) |> ignore
                    with error ->
                        Interlocked.CompareExchange(&failure, error, null) |> ignore
        ran

    let loop (owner: WorkerPool) () =
        let scratch = Scratch()
        let mutable seen = 0
        while true do
            let started = Stopwatch.GetTimestamp()
            let mutable current = int (Volatile.Read(&state) >>> 32)
            while current = seen && Stopwatch.GetTimestamp() - started < spinTicks do
                Thread.SpinWait 20
                current <- int (Volatile.Read(&state) >>> 32)
            if current = seen then
                Interlocked.Increment(&sleeping) |> ignore
                // Re-check after announcing the sleep: a job published in between has already called Set.
                if int (Volatile.Read(&state) >>> 32) = seen then wake.Wait()
                Interlocked.Decrement(&sleeping) |> ignore
            else
                seen <- current
                Interlocked.Increment(&active) |> ignore
                try work current scratch owner |> ignore
                finally Interlocked.Decrement(&active) |> ignore

    let mutable threads: Thread[] = [||]

    member private this.Start() =
        threads <-
            Array.init workers (fun index ->
                let thread = Thread(loop this, 256 * 1024, IsBackground = true, Name = sprintf "gpt-decode-%d" (index + 1))
                thread.Start()
                thread)

    /// Threads besides the caller's.
    member _.Workers = workers

    /// Whether run `generation` is still the current one (for a speculative Compute, after copying its parameters).
    member _.IsCurrent(generation: int) =
        Interlocked.MemoryBarrier()
        let current = Volatile.Read(&state)
        int (current >>> 32) = generation && int (current &&& 0xFFFFFFFFL) <> Int32.MaxValue

    /// Waits until no worker is inside a job. Owners of memory that speculative jobs read call it before freeing it:
    /// a worker that lost its core may still be reading a job's inputs after Run returned.
    member _.WaitIdle() =
        let mutable spinner = SpinWait()
        while Volatile.Read(&active) > 0 do
            spinner.SpinOnce(-1)

    /// Runs the job's chunks 0 .. chunks - 1 on the calling thread and the workers; returns when all are done.
    /// An exception from a chunk is raised here (the first one, after every chunk has finished).
    member this.Run(task: ParallelJob, chunks: int) =
        if isNull task then nullArg "task"
        let alone () =
            if task.Speculative then
                if isNull WorkerPool.callerScratch then WorkerPool.callerScratch <- Scratch()
                let memory = WorkerPool.callerScratch.Ensure(task.ScratchBytes)
                for chunk in 0 .. chunks - 1 do
                    task.Compute(chunk, memory, null, 0) |> ignore
                    task.Commit(chunk, memory)
            else
                for chunk in 0 .. chunks - 1 do
                    task.Execute chunk
        if chunks <= 1 || workers = 0 || Monitor.IsEntered gate || not (Monitor.TryEnter gate) then alone ()
        else
            try
                if threads.Length = 0 then this.Start()
                if isNull WorkerPool.callerScratch then WorkerPool.callerScratch <- Scratch()
                let scratch = WorkerPool.callerScratch
                generation <- generation + 1
                let mine = generation
                if task.Speculative then
                    if chunkStates.Length < chunks then chunkStates <- Array.zeroCreate (max chunks (2 * chunkStates.Length))
                    for chunk in 0 .. chunks - 1 do
                        chunkStates[chunk] <- openState mine
                job <- task
                count <- chunks
                finished <- 0
                failure <- null
                // A full fence between publishing the job and reading `sleeping` (a worker increments `sleeping`,
                // then reads the state): otherwise both could miss the other and the worker would sleep through it.
                Interlocked.Exchange(&state, int64 mine <<< 32) |> ignore
                if Volatile.Read(&sleeping) > 0 then wake.Set()
                let started = Stopwatch.GetTimestamp()
                let ran = work mine scratch this
                if task.Speculative then
                    // Give the workers' last chunks about twice as long as a chunk took here (at least ~30 µs), then
                    // compute whatever is still open on this thread.
                    let stopped = Stopwatch.GetTimestamp()
                    let patience = if ran = 0 then 10L * takeOverTicks else max takeOverTicks (2L * (stopped - started) / int64 ran)
                    while Volatile.Read(&finished) < chunks && Stopwatch.GetTimestamp() - stopped < patience do
                        Thread.SpinWait 10
                    if Volatile.Read(&finished) < chunks then
                        for chunk in 0 .. chunks - 1 do
                            if Volatile.Read(&chunkStates[chunk]) = openState mine then speculate task chunkStates chunk mine scratch this
                let mutable spinner = SpinWait()
                while Volatile.Read(&finished) < chunks do
                    spinner.SpinOnce(-1)
                Interlocked.Exchange(&state, (int64 mine <<< 32) ||| int64 Int32.MaxValue) |> ignore
                wake.Reset()
                match failure with
                | null -> ()
                | error -> raise (AggregateException("a parallel chunk failed", error))
            finally
                Monitor.Exit gate

    /// The process's pool: one worker per logical core beyond the first (none on a single core), started on first use.
    static member val Shared: Lazy<WorkerPool> = lazy (new WorkerPool(max 0 (Environment.ProcessorCount - 1)))
