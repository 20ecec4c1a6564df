namespace Gpt.Kernels

open System
open System.Diagnostics
open System.Threading

/// A piece of parallel work cut into numbered chunks: Execute(chunk) for chunk = 0 .. count - 1, in any order, on any
/// thread. Subclasses keep their inputs in mutable fields, so that one object serves every call (no allocation per
/// call).
[<AbstractClass; AllowNullLiteral>]
type ParallelJob() =
    abstract Execute: chunk: int -> unit

/// A few threads that stay alive and share out the chunks of one job at a time with the calling thread.
///
/// Why not Parallel.For or Task: generating a token runs ~60 parallel regions of 0.05–1 ms each (one per matrix
/// product); Parallel.For costs a few microseconds and several allocations per region, and its threads go back to
/// the thread pool in between. Here the workers spin for a short while after each job (the next region starts
/// microseconds later), then block, so an idle pool costs no CPU. Chunks are claimed one at a time from a shared
/// counter: when another process takes a core away from a worker, the calling thread simply does more chunks.
///
/// Each chunk runs wholly on one thread, so a job's results do not depend on how chunks were shared out. A job that
/// is started while the pool is busy with another caller's job (two generations at once), or from inside a job,
/// runs on the calling thread alone.
[<Sealed; AllowNullLiteral>]
type WorkerPool(workers: int) =
    do if workers < 0 then invalidArg (nameof workers) (sprintf "worker count must be >= 0, found %d" workers)
    let gate = obj ()
    let wake = new ManualResetEventSlim(false, 1)
    /// (generation <<< 32) ||| next chunk to claim. A finished job's state is poisoned (next = Int32.MaxValue), so a
    /// late worker can never claim a chunk of a job that is over.
    let mutable state = 0L
    let mutable generation = 0
    let mutable job: ParallelJob = null
    let mutable count = 0
    let mutable finished = 0
    let mutable failure: exn = null
    let mutable sleeping = 0
    /// How long a worker spins for the next job before it blocks (Stopwatch ticks of ~100 µs).
    let spinTicks = Stopwatch.Frequency / 10_000L

    /// Claims and runs chunks of generation `mine` until none is left. Returns whether any was run.
    let work (mine: int) =
        let mutable claimed = true
        while claimed do
            let current = Volatile.Read(&state)
            let next = int (current &&& 0xFFFFFFFFL)
            if int (current >>> 32) <> mine || next >= Volatile.Read(&count) then claimed <- false
            elif Interlocked.CompareExchange(&state, current + 1L, current) = current then
                try
                    job.Execute next
                with error ->
                    Interlocked.CompareExchange(&failure, error, null) |> ignore
                Interlocked.Increment(&finished) |> ignore

    let loop () =
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
                work current

    let threads =
        Array.init workers (fun index ->
            let thread = Thread(loop, 256 * 1024, IsBackground = true, Name = sprintf "gpt-decode-%d" (index + 1))
            thread.Start()
            thread)

    /// Threads besides the caller's.
    member _.Workers = threads.Length

    /// Runs job.Execute for chunks 0 .. chunks - 1 on the calling thread and the workers; returns when all are done.
    /// An exception from a chunk is raised here (the first one, after every chunk has finished).
    member _.Run(task: ParallelJob, chunks: int) =
        if chunks <= 1 || threads.Length = 0 || Monitor.IsEntered gate || not (Monitor.TryEnter gate) then
            for chunk in 0 .. chunks - 1 do
                task.Execute chunk
        else
            try
                job <- task
                count <- chunks
                finished <- 0
                failure <- null
                generation <- generation + 1
                // A full fence between publishing the job and reading `sleeping` (a worker increments `sleeping`,
                // then reads the state): otherwise both could miss the other and the worker would sleep through it.
                Interlocked.Exchange(&state, int64 generation <<< 32) |> ignore
                if Volatile.Read(&sleeping) > 0 then wake.Set()
                work generation
                let mutable spinner = SpinWait()
                while Volatile.Read(&finished) < chunks do
                    spinner.SpinOnce(-1)
                Volatile.Write(&state, (int64 generation <<< 32) ||| int64 Int32.MaxValue)
                wake.Reset()
                job <- null
                match failure with
                | null -> ()
                | error -> raise (AggregateException("a parallel chunk failed", error))
            finally
                Monitor.Exit gate

    /// The process's pool: one worker per logical core beyond the first (none on a single core), started on first use.
    static member val Shared: Lazy<WorkerPool> = lazy (new WorkerPool(max 0 (Environment.ProcessorCount - 1)))
