namespace Gpt.Training

open System
open System.IO
open System.Threading
open Gpt

/// The lock of a run folder, held while a run writes into it: a second writer (two `gpt train --resume` of one run,
/// or a new run into a folder in use) fails at once, naming the holder's process id, instead of deleting the other's
/// temporary folders and checkpoints. It is an operating-system lock on `run.lock` (flock on Linux and macOS, a
/// sharing mode on Windows), so it ends with its process however that ends: after a kill -9 the next run simply
/// takes it. Because .NET cannot read a file another process holds so locked, the holder's id is also written to
/// `run.lock.holder`.
[<Sealed>]
type RunLock internal (directory: string, stream: FileStream, holderPath: string, createdDirectory: bool, createdLock: bool) =
    let mutable released = 0

    /// The run folder (full path).
    member _.Directory = directory

    /// Releases the lock. A run that never got to write anything leaves nothing behind: the lock file goes when it is
    /// alone in the folder, and the folder when the lock created it and it is empty.
    member _.Release() =
        if Interlocked.Exchange(&released, 1) = 0 then
            (try File.Delete holderPath with _ -> ())
            let lockPath = stream.Name
            stream.Dispose()
            try
                if createdLock && Directory.GetFileSystemEntries(directory) |> Array.forall (fun e -> e = lockPath) then
                    File.Delete lockPath
                    if createdDirectory && Directory.GetFileSystemEntries(directory).Length = 0 then Directory.Delete directory
            with
            | :? IOException
            | :? UnauthorizedAccessException -> ()

    interface IDisposable with
        member this.Dispose() = this.Release()

[<RequireQualifiedAccess>]
module RunLock =
    /// The locked file in a run folder.
    let fileName = "run.lock"

    /// The file that says who holds the lock: "pid 1234 on host since 2026-12-01T10:00:00Z".
    let holderFileName = "run.lock.holder"

    /// Who holds a run folder's lock, as its holder file says (None when there is no such file).
    let holder (directory: string) : string option =
        let path = Path.Combine(directory, holderFileName)
        try
            if File.Exists path then
                match File.ReadAllText(path).Trim() with
                | "" -> None
                | text -> Some(if text.Length > 200 then text.Substring(0, 200) else text)
            else None
        with
        | :? IOException
        | :? UnauthorizedAccessException -> None

    let private inUse (directory: string) (who: string) =
        Errors.fail "the run folder '%s' is in use: another run holds it (%s). Two runs writing one folder would destroy each other's checkpoints: wait for that run to end or stop it, or use another --name"
            directory who

    /// Who holds a run folder's lock now, if anyone does (nothing is created or written: a folder without run.lock is
    /// free).
    let heldBy (directory: string) : string option =
        let lockPath = Path.Combine(directory, fileName)
        if not (File.Exists lockPath) then None
        else
            try
                (new FileStream(lockPath, FileMode.Open, FileAccess.ReadWrite, FileShare.None)).Dispose()
                None
            with
            | :? UnauthorizedAccessException -> None
            | :? IOException as e -> Some(holder directory |> Option.defaultValue e.Message)

    /// Fails as acquire does when another run holds the folder's lock; takes nothing.
    let requireFree (directory: string) =
        match heldBy directory with
        | Some who -> inUse (Path.GetFullPath directory) who
        | None -> ()

    /// Takes a run folder's lock (creating the folder), or fails at once when another run holds it, naming that run's
    /// process. Dispose the result (or call Release) when the run is done.
    let acquire (directory: string) : RunLock =
        let directory = Path.GetFullPath directory
        let createdDirectory = not (Directory.Exists directory)
        let lockPath = Path.Combine(directory, fileName)
        let holderPath = Path.Combine(directory, holderFileName)
        try
            Directory.CreateDirectory directory |> ignore
        with
        | :? IOException
        | :? UnauthorizedAccessException as e -> Errors.fail "cannot create the run folder '%s': %s" directory e.Message
        let createdLock = not (File.Exists lockPath)
        let stream =
            try
                new FileStream(lockPath, FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.None)
            with
            | :? UnauthorizedAccessException as e -> Errors.fail "cannot lock the run folder '%s': %s" directory e.Message
            | :? IOException as e ->
                // The holder writes its id right after taking the lock: give it a moment.
                let rec wait attempts =
                    match holder directory with
                    | Some text -> Some text
                    | None when attempts > 0 -> Thread.Sleep 50; wait (attempts - 1)
                    | None -> None
                inUse directory (wait 20 |> Option.defaultValue e.Message)
        let text =
            sprintf "pid %d on %s since %s" Environment.ProcessId Environment.MachineName (DateTime.UtcNow.ToString "yyyy-MM-ddTHH:mm:ssZ")
        try
            stream.SetLength 0L
            let bytes = Text.Encoding.UTF8.GetBytes(text + "\n")
            stream.Write(bytes, 0, bytes.Length)
            stream.Flush()
            let temporary = holderPath + ".tmp-" + Guid.NewGuid().ToString "N"
            File.WriteAllText(temporary, text + "\n")
            File.Move(temporary, holderPath, true)
        with
        | :? IOException
        | :? UnauthorizedAccessException as e ->
            stream.Dispose()
            Errors.fail "cannot write the lock of the run folder '%s': %s" directory e.Message
        new RunLock(directory, stream, holderPath, createdDirectory, createdLock)
