#!/usr/bin/python3
"""Generate the tiny GPT-2 golden fixtures used by the .NET tests.

Independent reference implementation (plain PyTorch tensor ops, no
transformers / safetensors packages) of the GPT-2 architecture:

    x = wte[ids] + wpe[pos]
    for each block:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))
    x = ln_f(x);     logits = x @ wte.T          (LM head tied to wte)

    attn: fused c_attn (d -> 3d, q|k|v, with bias), causal softmax(q k^T / sqrt(hd)),
          heads merged, c_proj (d -> d, with bias)
    mlp : c_fc (d -> 4d) -> GELU (tanh approximation) -> c_proj (4d -> d)
    LayerNorm: eps 1e-5, biased variance, weight and bias.

Linear weights are kept in the Hugging Face Conv1D layout [in_features, out_features]
(i.e. y = x @ W + b, transposed relative to torch.nn.Linear).

Outputs (relative to the repository root):
    tests/fixtures/tiny-gpt2/{config.json, model.safetensors, reference.safetensors, reference.json}
        F32 weights, HF names without prefix, plus h.{i}.attn.bias causal-mask buffers.
    tests/fixtures/tiny-gpt2-f16-prefixed/{same files}
        same model, every tensor name prefixed "transformer.", all tensors F16, no attn.bias
        buffers; its reference outputs are computed from the F16-rounded weights (upcast to f32).

Init (torch.manual_seed(1234), one torch.randn per tensor in param_specs order): embeddings and
all biases N(0, 0.02), block linear weights N(0, 0.1) (see LINEAR_STD for why not 0.02),
LayerNorm weight 1 + N(0, 0.1), LayerNorm bias N(0, 0.05).

Reference outputs are computed in float64 from the (float32 or float16) stored weights and
then rounded to float32 for storage, so they are as close to the exact result as possible.

Regenerate (from the repository root, Debian's python with python3-torch, python3-numpy):
    /usr/bin/python3 reference/make_tiny_gpt2.py
Output is deterministic (torch.manual_seed(1234), fixed generation order of parameters).
"""
import json
import math
import os
import struct
import sys

import numpy as np
import torch
import torch.nn.functional as F

torch.set_num_threads(1)  # determinism of the float64 reductions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")

CONFIG = dict(
    vocab_size=50257,
    n_positions=16,
    n_embd=32,
    n_head=4,
    n_layer=2,
    layer_norm_epsilon=1e-5,
)

INPUT_IDS = [
    [15496, 11, 50256, 995, 50000, 3290, 50255, 1212],
    [0, 1, 262, 49999, 50100, 12345, 31415, 50201],
]
TARGETS = [
    [11, 50256, 995, 50000, 3290, 50255, 1212, 0],
    [1, 262, 49999, 50100, 12345, 31415, 50201, 42],
]
GREEDY_PROMPT = [15496, 11, 314, 716, 50200]
GREEDY_NEW_TOKENS = 24

# Init: embeddings N(0, 0.02); all biases N(0, 0.02); LayerNorm weight 1 + N(0, 0.1), bias N(0, 0.05).
# Block linear weights (c_attn, c_proj, c_fc) use N(0, 0.1) instead of 0.02: with 0.02 the blocks
# barely move the residual stream, the tied LM head then just "copies" the last token and greedy
# decoding emits one id 24 times (11745 x 24), which would not catch a wrong context crop.  With 0.1
# the greedy continuation has 10 distinct ids, and taking the FIRST 16 tokens instead of the last 16
# changes it; the smallest top-1/top-2 logit gap met during greedy decoding is ~3.9e-3, four orders
# of magnitude above float32 forward error (~3e-7), so an f32 implementation must reproduce it.
LINEAR_STD = 0.1

# --------------------------------------------------------------------------------------
# Minimal safetensors writer / reader (own implementation of the documented format)
# --------------------------------------------------------------------------------------
_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "U8": "u1"}


def write_safetensors(path, tensors, metadata=None):
    """tensors: list of (name, dtype_str, numpy array) in the order they are laid out."""
    header = {}
    blobs = []
    offset = 0
    for name, dtype, arr in tensors:
        raw = np.ascontiguousarray(arr, dtype=np.dtype(_DTYPES[dtype])).tobytes(order="C")
        header[name] = {
            "dtype": dtype,
            "shape": [int(s) for s in arr.shape],
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    header["__metadata__"] = dict(metadata or {"format": "pt"})
    hbytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hbytes += b" " * ((-len(hbytes)) % 8)  # pad with spaces to a multiple of 8
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)))
        f.write(hbytes)
        for b in blobs:
            f.write(b)


def read_safetensors(path):
    """Returns (dict name -> (dtype_str, numpy array), metadata). Validates the layout."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n].decode("utf-8"))
    buf = data[8 + n :]
    meta = header.pop("__metadata__", None)
    out = {}
    spans = []
    for name, info in header.items():
        b, e = info["data_offsets"]
        dt = np.dtype(_DTYPES[info["dtype"]])
        count = int(np.prod(info["shape"], dtype=np.int64))
        assert e - b == count * dt.itemsize, name
        out[name] = (info["dtype"], np.frombuffer(buf[b:e], dtype=dt).reshape(info["shape"]).copy())
        spans.append((b, e))
    spans.sort()
    pos = 0
    for b, e in spans:  # contiguous, no holes, no overlap
        assert b == pos, (b, pos)
        pos = e
    assert pos == len(buf), (pos, len(buf))
    return out, meta


# --------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------
def param_specs(cfg):
    """(name, shape, kind) in a fixed generation order."""
    V, P, d, L = cfg["vocab_size"], cfg["n_positions"], cfg["n_embd"], cfg["n_layer"]
    specs = [("wte.weight", (V, d), "w"), ("wpe.weight", (P, d), "w")]
    for i in range(L):
        p = f"h.{i}."
        specs += [
            (p + "ln_1.weight", (d,), "lnw"),
            (p + "ln_1.bias", (d,), "lnb"),
            (p + "attn.c_attn.weight", (d, 3 * d), "lw"),
            (p + "attn.c_attn.bias", (3 * d,), "b"),
            (p + "attn.c_proj.weight", (d, d), "lw"),
            (p + "attn.c_proj.bias", (d,), "b"),
            (p + "ln_2.weight", (d,), "lnw"),
            (p + "ln_2.bias", (d,), "lnb"),
            (p + "mlp.c_fc.weight", (d, 4 * d), "lw"),
            (p + "mlp.c_fc.bias", (4 * d,), "b"),
            (p + "mlp.c_proj.weight", (4 * d, d), "lw"),
            (p + "mlp.c_proj.bias", (d,), "b"),
        ]
    specs += [("ln_f.weight", (d,), "lnw"), ("ln_f.bias", (d,), "lnb")]
    return specs


def make_params(cfg, seed=1234):
    torch.manual_seed(seed)
    params = {}
    for name, shape, kind in param_specs(cfg):
        r = torch.randn(shape, dtype=torch.float32)
        if kind == "w":  # embeddings
            t = r * 0.02
        elif kind == "lw":  # block linear (Conv1D) weights, see LINEAR_STD
            t = r * LINEAR_STD
        elif kind == "b":
            t = r * 0.02
        elif kind == "lnw":
            t = 1.0 + r * 0.1
        elif kind == "lnb":
            t = r * 0.05
        else:
            raise ValueError(kind)
        params[name] = t.contiguous()
    return params


# --------------------------------------------------------------------------------------
# Model (functional)
# --------------------------------------------------------------------------------------
def layer_norm(x, w, b, eps):
    mu = x.mean(dim=-1, keepdim=True)
    var = ((x - mu) ** 2).mean(dim=-1, keepdim=True)  # biased variance
    return (x - mu) / torch.sqrt(var + eps) * w + b


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def split_qkv(x, w, b, n_head):
    B, T, d = x.shape
    hd = d // n_head
    qkv = x @ w + b  # [B, T, 3d]
    q, k, v = qkv.split(d, dim=-1)
    heads = lambda t: t.view(B, T, n_head, hd).transpose(1, 2)  # [B, H, T, hd]
    return heads(q), heads(k), heads(v)


def attention_batched(q, k, v):
    T, hd = q.shape[-2], q.shape[-1]
    s = (q @ k.transpose(-2, -1)) / math.sqrt(hd)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, dim=-1) @ v  # [B, H, T, hd]


def attention_loop(q, k, v):
    """Explicit per-batch / per-head / per-query loop (independent check)."""
    B, H, T, hd = q.shape
    out = torch.zeros_like(q)
    for bb in range(B):
        for h in range(H):
            for t in range(T):
                scores = torch.stack([(q[bb, h, t] * k[bb, h, j]).sum() / math.sqrt(hd) for j in range(t + 1)])
                m = scores.max()
                e = torch.exp(scores - m)
                p = e / e.sum()
                acc = torch.zeros(hd, dtype=q.dtype)
                for j in range(t + 1):
                    acc = acc + p[j] * v[bb, h, j]
                out[bb, h, t] = acc
    return out


def forward(params, ids, cfg, dtype=torch.float64, prefix=""):
    P = lambda n: params[prefix + n].to(dtype)
    eps = cfg["layer_norm_epsilon"]
    H = cfg["n_head"]
    ids = torch.as_tensor(ids, dtype=torch.long)
    B, T = ids.shape
    assert T <= cfg["n_positions"]
    x = P("wte.weight")[ids] + P("wpe.weight")[torch.arange(T)]
    for i in range(cfg["n_layer"]):
        p = f"h.{i}."
        h = layer_norm(x, P(p + "ln_1.weight"), P(p + "ln_1.bias"), eps)
        q, k, v = split_qkv(h, P(p + "attn.c_attn.weight"), P(p + "attn.c_attn.bias"), H)
        a = attention_batched(q, k, v).transpose(1, 2).reshape(B, T, -1)
        x = x + (a @ P(p + "attn.c_proj.weight") + P(p + "attn.c_proj.bias"))
        h = layer_norm(x, P(p + "ln_2.weight"), P(p + "ln_2.bias"), eps)
        h = gelu_tanh(h @ P(p + "mlp.c_fc.weight") + P(p + "mlp.c_fc.bias"))
        x = x + (h @ P(p + "mlp.c_proj.weight") + P(p + "mlp.c_proj.bias"))
    x = layer_norm(x, P("ln_f.weight"), P("ln_f.bias"), eps)
    return x @ P("wte.weight").T  # [B, T, V]


def cross_entropy_mean(logits, targets):
    lp = torch.log_softmax(logits, dim=-1)
    t = torch.as_tensor(targets, dtype=torch.long)
    return -lp.gather(-1, t.unsqueeze(-1)).squeeze(-1).mean()


def generate_greedy(params, prompt, n_new, cfg, prefix="", wrong_crop=False):
    """Book's generate_text_simple: crop to the last n_positions tokens, argmax of last logits.
    wrong_crop=True keeps the FIRST n_positions tokens instead (only used to show the fixture
    detects that bug)."""
    ids = list(prompt)
    margins = []
    for _ in range(n_new):
        cond = ids[: cfg["n_positions"]] if wrong_crop else ids[-cfg["n_positions"] :]
        last = forward(params, [cond], cfg, prefix=prefix)[0, -1]
        top2 = torch.topk(last, 2).values
        margins.append(float(top2[0] - top2[1]))
        ids.append(int(torch.argmax(last)))
    return ids, margins


# --------------------------------------------------------------------------------------
# Self checks of the building blocks
# --------------------------------------------------------------------------------------
def check_building_blocks(params, cfg):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 7, cfg["n_embd"], generator=g, dtype=torch.float64)
    w = params["h.0.attn.c_attn.weight"].double()
    b = params["h.0.attn.c_attn.bias"].double()
    q, k, v = split_qkv(x, w, b, cfg["n_head"])
    a1 = attention_batched(q, k, v)
    if hasattr(F, "scaled_dot_product_attention"):
        a2 = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        what = "F.scaled_dot_product_attention"
    else:
        a2 = attention_loop(q, k, v)
        what = "explicit loop-over-heads attention"
    err = (a1 - a2).abs().max().item()
    assert err < 1e-12, err
    print(f"check: attention vs {what}: max abs diff {err:.3e}")

    lw, lb = params["h.0.ln_1.weight"].double(), params["h.0.ln_1.bias"].double()
    err = (layer_norm(x, lw, lb, 1e-5) - F.layer_norm(x, (cfg["n_embd"],), lw, lb, 1e-5)).abs().max().item()
    assert err < 1e-12, err
    print(f"check: layer_norm vs F.layer_norm: max abs diff {err:.3e}")

    y = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    try:
        ref = F.gelu(y, approximate="tanh")
        err = (gelu_tanh(y) - ref).abs().max().item()
        assert err < 1e-12, err
        print(f"check: gelu_tanh vs F.gelu(approximate='tanh'): max abs diff {err:.3e}")
    except TypeError:
        print("check: F.gelu has no approximate= argument, skipped")

    # Conv1D layout == nn.Linear with transposed weight
    lin = torch.nn.Linear(cfg["n_embd"], 3 * cfg["n_embd"]).double()
    with torch.no_grad():
        lin.weight.copy_(w.T)
        lin.bias.copy_(b)
    err = (lin(x) - (x @ w + b)).abs().max().item()
    assert err < 1e-12, err
    print(f"check: Conv1D layout (x @ W + b) vs nn.Linear(weight=W.T): max abs diff {err:.3e}")


# --------------------------------------------------------------------------------------
# Fixture writing
# --------------------------------------------------------------------------------------
def config_json(cfg):
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg["vocab_size"],
        "n_positions": cfg["n_positions"],
        "n_ctx": cfg["n_positions"],
        "n_embd": cfg["n_embd"],
        "n_head": cfg["n_head"],
        "n_layer": cfg["n_layer"],
        "layer_norm_epsilon": cfg["layer_norm_epsilon"],
        "activation_function": "gelu_new",
        "bos_token_id": 50256,
        "eos_token_id": 50256,
    }


def compute_reference(params, cfg, prefix=""):
    logits64 = forward(params, INPUT_IDS, cfg, prefix=prefix)
    loss64 = cross_entropy_mean(logits64, TARGETS)
    greedy, margins = generate_greedy(params, GREEDY_PROMPT, GREEDY_NEW_TOKENS, cfg, prefix=prefix)
    # float32 computation, only to report how far an f32 implementation typically lands
    logits32 = forward(params, INPUT_IDS, cfg, dtype=torch.float32, prefix=prefix)
    f32_err = (logits32.double() - logits64).abs().max().item()
    return logits64, loss64, greedy, margins, f32_err


def write_fixture(dirname, params, cfg, weight_dtype, prefix, with_mask_buffers):
    out_dir = os.path.join(FIXTURES, dirname)
    os.makedirs(out_dir, exist_ok=True)
    np_dtype = {"F32": np.float32, "F16": np.float16}[weight_dtype]

    # stored weights (possibly rounded to f16) -> the exact values the reference uses
    stored = {prefix + n: t.numpy().astype(np_dtype) for n, t in params.items()}
    eff = {n: torch.from_numpy(a.astype(np.float32)) for n, a in stored.items()}

    tensors = []
    P = cfg["n_positions"]
    for name, _, _ in param_specs(cfg):
        tensors.append((prefix + name, weight_dtype, stored[prefix + name]))
        if with_mask_buffers and name.endswith("attn.c_proj.bias"):
            i = name.split(".")[1]
            mask = np.tril(np.ones((P, P), dtype=np.float32)).reshape(1, 1, P, P)
            tensors.append((f"{prefix}h.{i}.attn.bias", "F32", mask.astype(np_dtype)))
    write_safetensors(os.path.join(out_dir, "model.safetensors"), tensors)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config_json(cfg), f, indent=2)
        f.write("\n")

    logits64, loss64, greedy, margins, f32_err = compute_reference(eff, cfg, prefix=prefix)
    logits32 = logits64.to(torch.float32).numpy()
    write_safetensors(
        os.path.join(out_dir, "reference.safetensors"),
        [
            ("input_ids", "I64", np.array(INPUT_IDS, dtype=np.int64)),
            ("logits", "F32", logits32),
            ("targets", "I64", np.array(TARGETS, dtype=np.int64)),
            ("loss", "F32", np.array([loss64.item()], dtype=np.float32)),
            ("greedy_prompt", "I64", np.array(GREEDY_PROMPT, dtype=np.int64)),
            ("greedy_ids", "I64", np.array(greedy, dtype=np.int64)),
        ],
    )
    ref = {
        "input_ids": INPUT_IDS,
        "targets": TARGETS,
        "loss": loss64.item(),
        "greedy_prompt": GREEDY_PROMPT,
        "greedy_ids": greedy,
        "logits_first": [float(v) for v in logits32[0, 0, :8]],
        "logits_sum": float(logits32.astype(np.float64).sum()),
        "notes": {
            "loss": "float64 value; reference.safetensors holds it rounded to float32",
            "logits_sum": "sum of the stored float32 logits, accumulated in float64",
            "greedy_min_top2_margin": min(margins),
            "max_abs_diff_float32_forward_vs_float64": f32_err,
            "weights": weight_dtype + (" (reference computed from the f16 values upcast to f32)" if weight_dtype == "F16" else ""),
        },
    }
    with open(os.path.join(out_dir, "reference.json"), "w") as f:
        json.dump(ref, f, indent=2)
        f.write("\n")

    # ---- self check: re-read both files with our reader and reproduce exactly ----
    w_read, meta = read_safetensors(os.path.join(out_dir, "model.safetensors"))
    assert meta == {"format": "pt"}, meta
    expected_names = {prefix + n for n, _, _ in param_specs(cfg)}
    if with_mask_buffers:
        expected_names |= {f"{prefix}h.{i}.attn.bias" for i in range(cfg["n_layer"])}
    assert set(w_read) == expected_names, set(w_read) ^ expected_names
    rebuilt = {}
    for n, (dt, a) in w_read.items():
        if n.endswith(".attn.bias"):  # NB: plain "attn.bias" would also match c_attn.bias
            assert a.shape == (1, 1, P, P) and np.array_equal(a[0, 0], np.tril(np.ones((P, P))))
            continue
        assert dt == weight_dtype, (n, dt)
        rebuilt[n] = torch.from_numpy(a.astype(np.float32))
    r_read, _ = read_safetensors(os.path.join(out_dir, "reference.safetensors"))
    logits_again = forward(rebuilt, r_read["input_ids"][1], cfg, prefix=prefix)
    assert torch.equal(logits_again, logits64), "logits not reproduced exactly from re-read weights"
    assert np.array_equal(r_read["logits"][1], logits32)
    loss_again = cross_entropy_mean(torch.from_numpy(r_read["logits"][1]).double(), r_read["targets"][1])
    assert abs(loss_again.item() - loss64.item()) < 1e-6
    assert r_read["greedy_ids"][1].tolist() == greedy
    assert greedy[: len(GREEDY_PROMPT)] == GREEDY_PROMPT and len(greedy) == len(GREEDY_PROMPT) + GREEDY_NEW_TOKENS
    assert min(margins) > 1e-3, "greedy decoding too close to a tie for an f32 implementation"
    bad, _ = generate_greedy(eff, GREEDY_PROMPT, GREEDY_NEW_TOKENS, cfg, prefix=prefix, wrong_crop=True)
    assert bad != greedy, "fixture would not detect a wrong context crop"
    print(f"[{dirname}] wrote {out_dir}")
    print(f"  loss = {loss64.item():.10f}")
    print(f"  greedy_ids = {greedy}")
    print(f"  min top-2 logit margin during greedy = {min(margins):.3e}")
    print(f"  max |f32 forward - f64 forward| logits = {f32_err:.3e}")
    print(f"  self check OK (re-read weights reproduce logits bit-exactly)")
    return loss64.item(), greedy


def main():
    cfg = CONFIG
    params = make_params(cfg, seed=1234)
    check_building_blocks(params, cfg)
    write_fixture("tiny-gpt2", params, cfg, "F32", "", True)
    write_fixture("tiny-gpt2-f16-prefixed", params, cfg, "F16", "transformer.", False)


if __name__ == "__main__":
    sys.exit(main())
