using System.Diagnostics.CodeAnalysis;
using System.Runtime.CompilerServices;

namespace Gpt;

/// <summary>Runs when the façade is first used, before any of its types touches TorchSharp.</summary>
internal static class NativeSetup
{
    /// <summary>Installs the resolver that lets TorchSharp's native library load where the system's libstdc++ is
    /// older than the one it was built against (see <c>Gpt.NativeLibraries</c> in Gpt.Core). It only registers a
    /// callback: nothing is loaded until a tensor is needed, so tokenizing stays free of libtorch.</summary>
    [ModuleInitializer]
    [SuppressMessage("Usage", "CA2255:The 'ModuleInitializer' attribute should not be used in libraries",
        Justification = "The resolver must be in place before the first TorchSharp call, whichever façade type an application touches first; installing it has no other effect.")]
    internal static void Install() => Gpt.Kernels.NativeLibraries.install();
}
