namespace Gpt.Kernels

open System
open System.IO
open System.Reflection
open System.Runtime.InteropServices
open System.Runtime.Loader
open System.Security.Cryptography
open System.Text
open Gpt

/// The version needs of an ELF64 shared library (`.gnu.version_r`), read from its bytes: no external tools.
/// The run-time twin of build/WeakenGlibcxxRequirement.cs (the build step), with the same safety rule.
[<RequireQualifiedAccess>]
module ElfVersionNeeds =
    /// What marking a version need weak found.
    type Weakening =
        /// A copy of the library with the need marked weak (VER_FLG_WEAK).
        | Weakened of byte[]
        /// The need is already weak.
        | AlreadyWeak
        /// The library does not name the version.
        | NotRequired
        /// These symbols, besides the marker, are bound to the version: a weak need could leave them unresolved, so
        /// the library is left as it is.
        | Refused of otherSymbols: string list

    let private shtDynsym = 11u
    let private shtGnuVerneed = 0x6ffffffeu
    let private shtGnuVersym = 0x6fffffffu
    let private verFlgWeak = 2us

    type private Section =
        { Type: uint32; Offset: int64; Size: int64; Link: uint32; Info: uint32; EntrySize: int64 }

    /// Bounds-checked little-endian reads: a truncated or corrupt file is an InvalidDataException, never an
    /// IndexOutOfRangeException.
    type private Reader(bytes: byte[]) =
        member _.Span(offset: int64, length: int) : ReadOnlySpan<byte> =
            if offset < 0L || offset + int64 length > int64 bytes.Length then
                raise (InvalidDataException(sprintf "truncated ELF file: %d bytes at offset %d are past its end (%d bytes)" length offset bytes.Length))
            ReadOnlySpan<byte>(bytes, int offset, length)
        member r.U16(offset) = Buffers.Binary.BinaryPrimitives.ReadUInt16LittleEndian(r.Span(offset, 2))
        member r.U32(offset) = Buffers.Binary.BinaryPrimitives.ReadUInt32LittleEndian(r.Span(offset, 4))
        member r.I64(offset) = Buffers.Binary.BinaryPrimitives.ReadInt64LittleEndian(r.Span(offset, 8))
        member r.CString(offset: int64) =
            let mutable finish = offset
            while (r.Span(finish, 1))[0] <> 0uy do finish <- finish + 1L
            Encoding.ASCII.GetString(bytes, int offset, int (finish - offset))

    /// Marks the need for `version` weak in a copy of `bytes` when the only dynamic symbol bound to it is
    /// `markerSymbol`. Why that rule: a weak need tells the loader to go on when the version is missing; that is safe
    /// only when no symbol the library actually uses depends on it. (libLibTorchSharp.so binds just
    /// `_ZSt21ios_base_library_initv` to GLIBCXX_3.4.32, a marker GCC 13 emits that no relocation uses.)
    /// Raises InvalidDataException for a file that is not a well-formed little-endian ELF64 library.
    let weaken (version: string) (markerSymbol: string) (bytes: byte[]) : Weakening =
        let r = Reader bytes
        if bytes.Length < 64 || bytes[0] <> 0x7fuy || bytes[1] <> byte 'E' || bytes[2] <> byte 'L' || bytes[3] <> byte 'F' then
            raise (InvalidDataException "not an ELF file")
        if bytes[4] <> 2uy || bytes[5] <> 1uy then raise (InvalidDataException "expected a little-endian ELF64 file")
        let sectionTable = r.I64 0x28L
        let entrySize = int64 (r.U16 0x3AL)
        let sections =
            Array.init (int (r.U16 0x3CL)) (fun i ->
                let h = sectionTable + int64 i * entrySize
                { Type = r.U32(h + 4L); Offset = r.I64(h + 0x18L); Size = r.I64(h + 0x20L)
                  Link = r.U32(h + 0x28L); Info = r.U32(h + 0x2CL); EntrySize = r.I64(h + 0x38L) })
        let sectionOf kind name =
            match sections |> Array.tryFind (fun s -> s.Type = kind) with
            | Some s -> s
            | None -> raise (InvalidDataException(sprintf "no %s section" name))
        let linked (s: Section) =
            if int s.Link >= sections.Length then raise (InvalidDataException "a section links to a missing section")
            sections[int s.Link]
        let verneed = sectionOf shtGnuVerneed ".gnu.version_r"
        let strings = (linked verneed).Offset

        // The Vernaux entry naming the version: its offset and the version index symbols refer to it by.
        let mutable found = None
        let mutable need = verneed.Offset
        let mutable remaining = verneed.Info
        while remaining > 0u do
            let mutable aux = need + int64 (r.U32(need + 8L))
            for _ in 1 .. int (r.U16(need + 2L)) do
                if r.CString(strings + int64 (r.U32(aux + 8L))) = version then found <- Some(aux, r.U16(aux + 6L))
                aux <- aux + int64 (r.U32(aux + 12L))
            let next = r.U32(need + 12L)
            remaining <- if next = 0u then 0u else remaining - 1u
            need <- need + int64 next

        match found with
        | None -> NotRequired
        | Some(aux, _) when r.U16(aux + 4L) &&& verFlgWeak <> 0us -> AlreadyWeak
        | Some(aux, versionIndex) ->
            let dynsym = sectionOf shtDynsym ".dynsym"
            let versym = sectionOf shtGnuVersym ".gnu.version"
            let names = (linked dynsym).Offset
            if dynsym.EntrySize <= 0L then raise (InvalidDataException ".dynsym has no entry size")
            let bound =
                [ for i in 0L .. dynsym.Size / dynsym.EntrySize - 1L do
                      if r.U16(versym.Offset + 2L * i) &&& 0x7fffus = versionIndex then
                          r.CString(names + int64 (r.U32(dynsym.Offset + i * dynsym.EntrySize))) ]
            match bound |> List.filter (fun name -> name <> markerSymbol) with
            | [] ->
                let copy = Array.copy bytes
                let flags = r.U16(aux + 4L) ||| verFlgWeak
                Buffers.Binary.BinaryPrimitives.WriteUInt16LittleEndian(Span<byte>(copy, int aux + 4, 2), flags)
                Weakened copy
            | others -> Refused others

/// Loads TorchSharp's native library where the system's libstdc++ is older than the one it was built against.
///
/// Why: TorchSharp 0.107's `libLibTorchSharp.so` declares a need for GLIBCXX_3.4.32 (GCC 13). Debian 12's libstdc++
/// stops at 3.4.30, so the first tensor fails with "version `GLIBCXX_3.4.32' not found", although the only symbol bound
/// to that version is an unused marker. In this repository and in MSBuild projects that reference the package, a build
/// step patches the output copy (build/TorchSharpNativeFix.targets); F# Interactive (`#r "nuget: …"`), an installed
/// `gpt` tool and any build that skipped that step still get the original file. For them, `install` adds a resolver
/// that, only when loading fails for that one version need, writes once a copy with the need marked weak to a per-user
/// cache (`$XDG_CACHE_HOME/gpt-dotnet/native/<hash>/`, else `~/.cache/…`) and loads it. The NuGet cache and the
/// application's own files are never modified.
[<RequireQualifiedAccess>]
module NativeLibraries =
    [<Literal>]
    let GlibcxxVersion = "GLIBCXX_3.4.32"

    [<Literal>]
    let MarkerSymbol = "_ZSt21ios_base_library_initv"

    [<Literal>]
    let private FileName = "libLibTorchSharp.so"

    /// libtorch, in dependency order: the weak-flagged copy lives in another folder, so its $ORIGIN run path no
    /// longer finds these; loaded first by full path, the loader then finds them by their sonames.
    let private libtorchFiles = [ "libc10.so"; "libtorch_cpu.so"; "libtorch.so" ]

    let private isLibTorchSharp (name: string) =
        match name with
        | "LibTorchSharp" | "libLibTorchSharp" | "LibTorchSharp.so" | FileName -> true
        | _ -> false

    /// The folder that holds weak-flagged copies: $XDG_CACHE_HOME/gpt-dotnet/native, else ~/.cache/gpt-dotnet/native.
    let cacheDirectory () =
        let root =
            match Environment.GetEnvironmentVariable "XDG_CACHE_HOME" with
            | null | "" -> Path.Combine(Environment.GetFolderPath Environment.SpecialFolder.UserProfile, ".cache")
            | xdg -> xdg
        Path.Combine(root, "gpt-dotnet", "native")

    let private nativeRid () =
        sprintf "linux-%s" (RuntimeInformation.ProcessArchitecture.ToString().ToLowerInvariant())

    /// Folders the runtime searches for an application's native libraries (from its .deps.json).
    let private searchDirectories () =
        match AppContext.GetData "NATIVE_DLL_SEARCH_DIRECTORIES" with
        | :? string as dirs -> dirs.Split(Path.PathSeparator, StringSplitOptions.RemoveEmptyEntries) |> List.ofArray
        | _ -> []

    /// Where TorchSharp's own copy of the library can be: an application's native folders, next to TorchSharp.dll,
    /// or (F# Interactive, TorchSharp.dll in the NuGet cache: lib/<framework>/) in its package's runtimes folder.
    let private originalCandidates (torchSharp: Assembly) =
        let beside =
            match torchSharp.Location with
            | null | "" -> []
            | location ->
                let dir = Path.GetDirectoryName location
                let native = Path.Combine("runtimes", nativeRid (), "native")
                [ dir; Path.Combine(dir, native); Path.GetFullPath(Path.Combine(dir, "..", "..", native)) ]
        searchDirectories () @ beside |> List.map (fun dir -> Path.Combine(dir, FileName)) |> List.distinct

    /// The folder of a libtorch_cpu.so this process has already loaded (TorchSharp loads it before LibTorchSharp).
    let private loadedLibtorchDirectory () =
        try
            File.ReadLines "/proc/self/maps"
            |> Seq.tryPick (fun line ->
                let slash = line.IndexOf '/'
                if slash >= 0 && line.EndsWith "/libtorch_cpu.so" then Some(Path.GetDirectoryName(line.Substring slash))
                else None)
        with :? IOException | :? UnauthorizedAccessException -> None

    /// In the NuGet cache, libtorch is a sibling package of TorchSharp's: <packages>/libtorch-cpu-<rid>/<version>/.
    let private siblingPackageDirectories (original: string) =
        let native = Path.GetDirectoryName original // <packages>/torchsharp/<version>/runtimes/<rid>/native
        let packages = Path.GetFullPath(Path.Combine(native, "..", "..", "..", "..", ".."))
        let libtorch = Path.Combine(packages, sprintf "libtorch-cpu-%s" (nativeRid ()))
        if not (Directory.Exists libtorch) then []
        else
            Directory.GetDirectories libtorch
            |> Array.sortByDescending (fun dir ->
                match Version.TryParse(Path.GetFileName dir) with
                | true, v -> v
                | _ -> Version())
            |> Array.map (fun dir -> Path.Combine(dir, "runtimes", nativeRid (), "native"))
            |> List.ofArray

    let private libtorchDirectory (original: string) =
        [ yield Path.GetDirectoryName original
          yield! Option.toList (loadedLibtorchDirectory ())
          yield! searchDirectories ()
          yield! siblingPackageDirectories original ]
        |> List.tryFind (fun dir -> File.Exists(Path.Combine(dir, "libtorch_cpu.so")))

    /// An exception's message without its closing full stop, to quote inside a sentence.
    let private quoted (message: string) = message.Trim().TrimEnd '.'

    let private tryLoad (path: string) =
        try Ok(NativeLibrary.Load path)
        with :? DllNotFoundException | :? BadImageFormatException as e -> Error(quoted e.Message)

    let private remedy = sprintf "install a libstdc++ that provides %s (GCC 13 or newer)" GlibcxxVersion

    /// Writes the weak-flagged copy once, atomically (a temporary file renamed into place, so a concurrent process
    /// never loads half a file), into a folder named after the original's hash; returns its path.
    let private weakCopy (original: string) (bytes: byte[]) (weakened: byte[]) =
        let hash = Convert.ToHexString(SHA256.HashData bytes).Substring(0, 16).ToLowerInvariant()
        let dir = Path.Combine(cacheDirectory (), hash)
        let target = Path.Combine(dir, FileName)
        let upToDate () =
            File.Exists target
            && (try ElfVersionNeeds.weaken GlibcxxVersion MarkerSymbol (File.ReadAllBytes target) = ElfVersionNeeds.AlreadyWeak
                with :? InvalidDataException -> false)
        if not (upToDate ()) then
            let temporary = Path.Combine(dir, sprintf "%s.%d.%s.tmp" FileName Environment.ProcessId (Guid.NewGuid().ToString "N"))
            try
                Directory.CreateDirectory dir |> ignore
                File.WriteAllBytes(temporary, weakened)
                File.Move(temporary, target, true)
            with
            | :? IOException | :? UnauthorizedAccessException as e ->
                (try File.Delete temporary with _ -> ())
                Errors.fail "TorchSharp's native library '%s' needs %s, which this system's libstdc++ does not have, and \
                             the copy with that need marked weak could not be written to '%s' (%s). Set XDG_CACHE_HOME \
                             to a writable folder, or %s." original GlibcxxVersion dir (quoted e.Message) remedy
        target

    /// Loads `original`, or its weak-flagged copy when the only obstacle is the GLIBCXX need. 0 when the failure is
    /// something else (left to TorchSharp's own loading and error messages).
    let private loadLibTorchSharp (original: string) : nativeint =
        libtorchDirectory original
        |> Option.iter (fun dir ->
            for file in libtorchFiles do
                NativeLibrary.TryLoad(Path.Combine(dir, file)) |> ignore)
        match tryLoad original with
        | Ok handle -> handle
        | Error message when not (message.Contains GlibcxxVersion) -> 0n
        | Error message ->
            let bytes = File.ReadAllBytes original
            let verdict =
                try ElfVersionNeeds.weaken GlibcxxVersion MarkerSymbol bytes
                with :? InvalidDataException as e ->
                    Errors.fail "TorchSharp's native library '%s' could not be read as an ELF library (%s) after loading \
                                 it failed: %s" original (quoted e.Message) message
            match verdict with
            | ElfVersionNeeds.Weakened weakened ->
                let copy = weakCopy original bytes weakened
                match tryLoad copy with
                | Ok handle -> handle
                | Error copyMessage ->
                    Errors.fail "TorchSharp's native library '%s' needs %s, which this system's libstdc++ does not have; \
                                 the copy with that need marked weak, '%s', did not load either: %s. To fix it, %s."
                        original GlibcxxVersion copy copyMessage remedy
            | ElfVersionNeeds.Refused others ->
                Errors.fail "TorchSharp's native library '%s' needs %s, which this system's libstdc++ does not have, and \
                             it cannot be marked weak safely: besides %s, these symbols are bound to it: %s. To fix it, %s."
                    original GlibcxxVersion MarkerSymbol (String.concat ", " others) remedy
            | ElfVersionNeeds.AlreadyWeak
            | ElfVersionNeeds.NotRequired ->
                Errors.fail "TorchSharp's native library '%s' did not load: %s. To fix it, %s." original message remedy

    /// The loaded library (0 until resolved); a failure is kept and raised again rather than retried on every call.
    let mutable private loaded = 0n
    let mutable private failure: exn option = None
    let mutable private installed = false
    let private gate = obj ()

    let private resolve (torchSharp: Assembly) : nativeint =
        lock gate (fun () ->
            match failure with
            | Some e -> raise e
            | None when loaded <> 0n -> loaded
            | None ->
                match originalCandidates torchSharp |> List.tryFind File.Exists with
                | None -> 0n
                | Some original ->
                    try
                        let handle = loadLibTorchSharp original
                        if handle <> 0n then
                            loaded <- handle
                            // Every P/Invoke of TorchSharp resolves its library once; without this each one would
                            // first retry (and fail) the standard search before the event below answers.
                            try
                                NativeLibrary.SetDllImportResolver(torchSharp, DllImportResolver(fun name _ _ ->
                                    if isLibTorchSharp name then loaded else 0n))
                            with :? InvalidOperationException -> () // the application set its own: the event still works
                        handle
                    with :? GptException as e ->
                        failure <- Some(e :> exn)
                        reraise ())

    /// Installs the resolver (once; later calls do nothing). Call it before the first TorchSharp call; the library's
    /// entry points that create tensors (GptModel, the C# façade) call it themselves, so only code that uses
    /// TorchSharp directly before touching them needs to. Does nothing off Linux. Never loads anything itself: the
    /// resolver acts only when TorchSharp's own load of LibTorchSharp fails, and raises a GptException that says what
    /// is missing when even the weak-flagged copy cannot be loaded.
    let install () =
        // Unlocked first look: a stale false only costs the lock, inside which the flag is read again.
        if OperatingSystem.IsLinux() && not installed then
            lock gate (fun () ->
                if not installed then
                    installed <- true
                    let torchSharp = typeof<TorchSharp.torch.Tensor>.Assembly // a type token: runs no TorchSharp code
                    let context =
                        match AssemblyLoadContext.GetLoadContext torchSharp with
                        | null -> AssemblyLoadContext.Default
                        | context -> context
                    // Raised by the runtime only after its own search failed, for by-name loads: TorchSharp's
                    // NativeLibrary.TryLoad("LibTorchSharp", …) in torch.InitializeDeviceType and its P/Invokes.
                    context.add_ResolvingUnmanagedDll(fun assembly name ->
                        if obj.ReferenceEquals(assembly, torchSharp) && isLibTorchSharp name then resolve torchSharp
                        else 0n))
