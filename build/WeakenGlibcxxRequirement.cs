using System;
using System.Collections.Generic;
using System.IO;
using System.Runtime.InteropServices;
using System.Text;

// MSBuild inline task (see TorchSharpNativeFix.targets): marks one GLIBCXX version requirement of an ELF64
// shared library as weak, in a copy that the build owns. Reads the ELF structures directly: no external tools.
public class WeakenGlibcxxRequirement : Microsoft.Build.Utilities.Task
{
    [Microsoft.Build.Framework.Required] public Microsoft.Build.Framework.ITaskItem[] Files { get; set; }
    [Microsoft.Build.Framework.Required] public string Version { get; set; }
    [Microsoft.Build.Framework.Required] public string MarkerSymbol { get; set; }

    const uint ShtDynsym = 11, ShtGnuVerneed = 0x6ffffffe, ShtGnuVersym = 0x6fffffff;
    const ushort VerFlgWeak = 2;

    public override bool Execute()
    {
        if (!RuntimeInformation.IsOSPlatform(OSPlatform.Linux)) return true;
        if (HostDefinesVersion())
        {
            Log.LogMessage(Microsoft.Build.Framework.MessageImportance.Low,
                "Host libstdc++ defines " + Version + ": libLibTorchSharp.so left as it is.");
            return true;
        }
        foreach (var item in Files)
        {
            try { Patch(item.ItemSpec); }
            catch (Exception e) { Log.LogWarning("Could not patch '" + item.ItemSpec + "': " + e.Message); }
        }
        return !Log.HasLoggedErrors;
    }

    bool HostDefinesVersion()
    {
        var candidates = new[] {
            "/usr/lib/x86_64-linux-gnu/libstdc++.so.6", "/lib/x86_64-linux-gnu/libstdc++.so.6",
            "/usr/lib64/libstdc++.so.6", "/usr/lib/libstdc++.so.6", "/usr/lib/aarch64-linux-gnu/libstdc++.so.6" };
        var needle = Encoding.ASCII.GetBytes(Version + "\0");
        foreach (var path in candidates)
            if (File.Exists(path) && IndexOf(File.ReadAllBytes(path), needle) >= 0) return true;
        return false;
    }

    static int IndexOf(byte[] haystack, byte[] needle)
    {
        for (int i = 0; i <= haystack.Length - needle.Length; i++)
        {
            int j = 0;
            while (j < needle.Length && haystack[i + j] == needle[j]) j++;
            if (j == needle.Length) return i;
        }
        return -1;
    }

    static string CString(byte[] b, long offset)
    {
        long end = offset;
        while (b[end] != 0) end++;
        return Encoding.ASCII.GetString(b, (int)offset, (int)(end - offset));
    }

    struct Section { public uint Type; public long Offset; public long Size; public uint Link; public uint Info; public long EntSize; }

    void Patch(string path)
    {
        var bytes = File.ReadAllBytes(path);
        if (bytes.Length < 64 || bytes[0] != 0x7f || bytes[1] != (byte)'E' || bytes[2] != (byte)'L' || bytes[3] != (byte)'F')
            throw new InvalidDataException("not an ELF file");
        if (bytes[4] != 2 || bytes[5] != 1) throw new InvalidDataException("expected a little-endian ELF64 file");
        long shoff = BitConverter.ToInt64(bytes, 0x28);
        int shentsize = BitConverter.ToUInt16(bytes, 0x3A), shnum = BitConverter.ToUInt16(bytes, 0x3C);
        var sections = new Section[shnum];
        for (int i = 0; i < shnum; i++)
        {
            long h = shoff + (long)i * shentsize;
            sections[i] = new Section {
                Type = BitConverter.ToUInt32(bytes, (int)h + 4), Offset = BitConverter.ToInt64(bytes, (int)h + 0x18),
                Size = BitConverter.ToInt64(bytes, (int)h + 0x20), Link = BitConverter.ToUInt32(bytes, (int)h + 0x28),
                Info = BitConverter.ToUInt32(bytes, (int)h + 0x2C), EntSize = BitConverter.ToInt64(bytes, (int)h + 0x38) };
        }
        int verneedIndex = Array.FindIndex(sections, s => s.Type == ShtGnuVerneed);
        if (verneedIndex < 0) throw new InvalidDataException("no .gnu.version_r section");
        var verneed = sections[verneedIndex];
        long strtab = sections[verneed.Link].Offset;

        // Find the Vernaux entry naming the version.
        long auxOffset = -1; ushort versionIndex = 0;
        long vn = verneed.Offset;
        for (uint n = 0; n < verneed.Info; n++)
        {
            ushort count = BitConverter.ToUInt16(bytes, (int)vn + 2);
            long aux = vn + BitConverter.ToUInt32(bytes, (int)vn + 8);
            for (int a = 0; a < count; a++)
            {
                if (CString(bytes, strtab + BitConverter.ToUInt32(bytes, (int)aux + 8)) == Version)
                {
                    auxOffset = aux;
                    versionIndex = BitConverter.ToUInt16(bytes, (int)aux + 6);
                }
                aux += BitConverter.ToUInt32(bytes, (int)aux + 12);
            }
            uint next = BitConverter.ToUInt32(bytes, (int)vn + 12);
            if (next == 0) break;
            vn += next;
        }
        if (auxOffset < 0)
        {
            Log.LogMessage(Microsoft.Build.Framework.MessageImportance.Low, path + " does not require " + Version);
            return;
        }
        ushort flags = BitConverter.ToUInt16(bytes, (int)auxOffset + 4);
        if ((flags & VerFlgWeak) != 0) return; // already patched

        // Refuse when any dynamic symbol other than the marker is bound to the version.
        int dynsymIndex = Array.FindIndex(sections, s => s.Type == ShtDynsym);
        int versymIndex = Array.FindIndex(sections, s => s.Type == ShtGnuVersym);
        if (dynsymIndex < 0 || versymIndex < 0) throw new InvalidDataException("no .dynsym or .gnu.version section");
        var dynsym = sections[dynsymIndex];
        long dynstr = sections[dynsym.Link].Offset;
        long symbols = dynsym.Size / dynsym.EntSize;
        var bound = new List<string>();
        for (long i = 0; i < symbols; i++)
        {
            ushort v = (ushort)(BitConverter.ToUInt16(bytes, (int)(sections[versymIndex].Offset + 2 * i)) & 0x7fff);
            if (v != versionIndex) continue;
            bound.Add(CString(bytes, dynstr + BitConverter.ToUInt32(bytes, (int)(dynsym.Offset + i * dynsym.EntSize))));
        }
        var others = bound.FindAll(s => s != MarkerSymbol);
        if (others.Count > 0)
        {
            Log.LogWarning("Not patching '" + path + "': symbols other than " + MarkerSymbol + " are bound to " + Version +
                           ": " + string.Join(", ", others));
            return;
        }

        flags |= VerFlgWeak;
        bytes[auxOffset + 4] = (byte)(flags & 0xff);
        bytes[auxOffset + 5] = (byte)(flags >> 8);

        // A new file renamed over the copy: the copy may be a hard link into the NuGet cache, which must not change.
        var stamp = File.GetLastWriteTimeUtc(path);
        var temporary = path + ".gpt-patch";
        File.WriteAllBytes(temporary, bytes);
        File.SetLastWriteTimeUtc(temporary, stamp);
        File.Replace(temporary, path, null); // a rename on Unix
        Log.LogMessage(Microsoft.Build.Framework.MessageImportance.Normal,
            "Marked " + Version + " as a weak requirement in " + path + " (host libstdc++ is older).");
    }
}
