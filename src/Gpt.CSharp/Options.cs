using Microsoft.FSharp.Core;

namespace Gpt;

/// <summary>F# options to and from C# nullables, so that no F# type reaches a public signature.</summary>
internal static class Options
{
    public static T? ToNullable<T>(FSharpOption<T>? option) where T : struct =>
        FSharpOption<T>.get_IsSome(option) ? option!.Value : null;

    public static T? ToObject<T>(FSharpOption<T>? option) where T : class =>
        FSharpOption<T>.get_IsSome(option) ? option!.Value : null;

    public static FSharpOption<T> Some<T>(T? value) where T : struct =>
        value is { } v ? FSharpOption<T>.Some(v) : FSharpOption<T>.None;

    public static FSharpOption<T> SomeObject<T>(T? value) where T : class =>
        value is not null ? FSharpOption<T>.Some(value) : FSharpOption<T>.None;
}
