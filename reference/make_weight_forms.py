#!/usr/bin/python3
"""Write one tiny GPT-2 in every form users bring weights in, for the .NET loaders' tests.

Independent of the .NET code: plain PyTorch (Debian's python3-torch 1.13) and the standard library; no
transformers, no safetensors package, no TensorFlow. The TensorFlow tensor bundle is written here from the format's
specification (TensorFlow's tensor_bundle.cc / tensor_bundle.proto and LevelDB's table_format.md), so the F# reader
and this writer only share the documents, not code.

The model: vocabulary 512, context 16, 32 dimensions, 4 heads, 2 layers, tied head (small enough to commit).
Weights drawn with torch.manual_seed(2024) as in make_tiny_gpt2.py (block weights N(0, 0.1) so the blocks matter).

Outputs under tests/fixtures/weights/:
  hf/{config.json, model.safetensors}            the original, Hugging Face layout (Conv1D [in, out]), QKV bias
  hf-nobias/{config.json, model.safetensors}     the same with the QKV bias removed (zero in the file, qkv_bias false)
  book/model-{separate,fused}-{bias,nobias}.pth  torch.save(model.state_dict()) of the book's GPTModel (ch. 4) with
                                                 those weights: W_query/W_key/W_value (ch. 3 MultiHeadAttention) or
                                                 one fused `qkv` Linear with `proj` (ch. 3 bonus
                                                 PyTorchMultiHeadAttention); LayerNorm scale/shift; out_head a copy
                                                 of tok_emb, as the book's load_weights_into_gpt leaves it
  book/model_and_optimizer.pth                   ch. 5's {"model_state_dict", "optimizer_state_dict"} after two AdamW
                                                 steps of the no-bias book model (lr 1e-2, weight decay 0.1, no
                                                 dropout), head untied
  hf-trained/{config.json, model.safetensors}    that trained model in the Hugging Face layout
  book/optimizer-reference.safetensors           AdamW's moments after those two steps under the .NET model's
                                                 parameter names and layout (nn.Linear [out, in]; c_attn = q|k|v
                                                 stacked), the batch of a third step, and every parameter after it
  openai/{checkpoint, hparams.json, model.ckpt.index, model.ckpt.data-00000-of-00001}
                                                 the original in OpenAI's TensorFlow checkpoint (model/h0/attn/c_attn/w
                                                 [1, in, out], ...), as the book's gpt_download.py fetches it
  reference.safetensors                          input ids and float64-computed logits of hf, hf-nobias, hf-trained

Regenerate from the repository root:  /usr/bin/python3 -B reference/make_weight_forms.py
Deterministic: the same bytes on every run.
"""
import json
import math
import os
import struct

import torch
import torch.nn as nn

torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "weights")

CFG = dict(vocab_size=512, n_positions=16, n_embd=32, n_head=4, n_layer=2)
INPUT_IDS = [[5, 17, 511, 300, 2, 99, 128, 7, 450, 3, 64, 256], [0, 1, 2, 3, 500, 400, 300, 200, 100, 50, 25, 12]]
LINEAR_STD = 0.1


# ---- safetensors (own writer of the documented format) --------------------------------------------------------------

def write_safetensors(path, tensors):
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors:
        t = t.detach().to(torch.float32).contiguous()
        data = t.numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def write_config(directory, qkv_bias=True, tied=True):
    os.makedirs(directory, exist_ok=True)
    config = {"model_type": "gpt2", "vocab_size": CFG["vocab_size"], "n_positions": CFG["n_positions"],
              "n_ctx": CFG["n_positions"], "n_embd": CFG["n_embd"], "n_head": CFG["n_head"], "n_layer": CFG["n_layer"],
              "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new", "resid_pdrop": 0.0,
              "tie_word_embeddings": tied, "qkv_bias": qkv_bias}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


# ---- the original, in the Hugging Face layout -----------------------------------------------------------------------

def make_hf_params():
    torch.manual_seed(2024)
    d, L = CFG["n_embd"], CFG["n_layer"]
    p = {"wte.weight": torch.randn(CFG["vocab_size"], d) * 0.02, "wpe.weight": torch.randn(CFG["n_positions"], d) * 0.02}
    for i in range(L):
        h = f"h.{i}."
        p[h + "ln_1.weight"] = 1 + torch.randn(d) * 0.1
        p[h + "ln_1.bias"] = torch.randn(d) * 0.05
        p[h + "attn.c_attn.weight"] = torch.randn(d, 3 * d) * LINEAR_STD
        p[h + "attn.c_attn.bias"] = torch.randn(3 * d) * 0.02
        p[h + "attn.c_proj.weight"] = torch.randn(d, d) * LINEAR_STD
        p[h + "attn.c_proj.bias"] = torch.randn(d) * 0.02
        p[h + "ln_2.weight"] = 1 + torch.randn(d) * 0.1
        p[h + "ln_2.bias"] = torch.randn(d) * 0.05
        p[h + "mlp.c_fc.weight"] = torch.randn(d, 4 * d) * LINEAR_STD
        p[h + "mlp.c_fc.bias"] = torch.randn(4 * d) * 0.02
        p[h + "mlp.c_proj.weight"] = torch.randn(4 * d, d) * LINEAR_STD
        p[h + "mlp.c_proj.bias"] = torch.randn(d) * 0.02
    p["ln_f.weight"] = 1 + torch.randn(d) * 0.1
    p["ln_f.bias"] = torch.randn(d) * 0.05
    return p


def reference_forward(p, ids):
    """GPT-2 in float64 from Hugging Face tensors (Conv1D: y = x W + b); lm_head.weight when present, else wte."""
    p = {k: v.to(torch.float64) for k, v in p.items()}
    d, nh = CFG["n_embd"], CFG["n_head"]
    ids = torch.tensor(ids)
    B, T = ids.shape

    def ln(x, w, b):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * w + b

    x = p["wte.weight"][ids] + p["wpe.weight"][torch.arange(T)]
    for i in range(CFG["n_layer"]):
        h = f"h.{i}."
        a = ln(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"])
        qkv = a @ p[h + "attn.c_attn.weight"] + p[h + "attn.c_attn.bias"]
        q, k, v = (t.view(B, T, nh, d // nh).transpose(1, 2) for t in qkv.split(d, -1))
        s = q @ k.transpose(-1, -2) / math.sqrt(d // nh)
        s = s.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
        y = (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(B, T, d)
        x = x + y @ p[h + "attn.c_proj.weight"] + p[h + "attn.c_proj.bias"]
        m = ln(x, p[h + "ln_2.weight"], p[h + "ln_2.bias"])
        m = m @ p[h + "mlp.c_fc.weight"] + p[h + "mlp.c_fc.bias"]
        m = 0.5 * m * (1 + torch.tanh(math.sqrt(2 / math.pi) * (m + 0.044715 * m ** 3)))
        x = x + m @ p[h + "mlp.c_proj.weight"] + p[h + "mlp.c_proj.bias"]
    x = ln(x, p["ln_f.weight"], p["ln_f.bias"])
    return x @ p.get("lm_head.weight", p["wte.weight"]).T


# ---- the book's GPTModel (ch. 3-4), with the book's module names ----------------------------------------------------

class LayerNorm(nn.Module):
    def __init__(self, emb_dim):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return self.scale * (x - mean) / torch.sqrt(var + self.eps) + self.shift


class GELU(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1 + torch.tanh(torch.sqrt(torch.tensor(2.0 / torch.pi)) * (x + 0.044715 * torch.pow(x, 3))))


class MultiHeadAttention(nn.Module):
    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        self.d_out, self.num_heads, self.head_dim = d_out, num_heads, d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x):
        b, n, _ = x.shape
        keys = self.W_key(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        queries = self.W_query(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        values = self.W_value(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        scores = queries @ keys.transpose(2, 3)
        scores.masked_fill_(self.mask.bool()[:n, :n], -torch.inf)
        weights = self.dropout(torch.softmax(scores / keys.shape[-1] ** 0.5, dim=-1))
        context = (weights @ values).transpose(1, 2).contiguous().view(b, n, self.d_out)
        return self.out_proj(context)


class PyTorchMultiHeadAttention(nn.Module):
    """The ch. 3 bonus attention: one fused qkv Linear, viewed as (b, n, 3, heads, head_dim)."""

    def __init__(self, d_in, d_out, num_heads, dropout=0.0, qkv_bias=False):
        super().__init__()
        self.num_heads, self.head_dim, self.d_out = num_heads, d_out // num_heads, d_out
        self.qkv = nn.Linear(d_in, 3 * d_out, bias=qkv_bias)
        self.proj = nn.Linear(d_out, d_out)
        self.dropout = dropout

    def forward(self, x):
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        queries, keys, values = qkv
        # scaled_dot_product_attention(..., is_causal=True) written out: PyTorch 1.13 does not have it.
        scores = (queries @ keys.transpose(-2, -1)) / self.head_dim ** 0.5
        scores = scores.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), float("-inf"))
        context = torch.softmax(scores, dim=-1) @ values
        return self.proj(context.transpose(1, 2).contiguous().view(b, n, self.d_out))


class FeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(cfg["emb_dim"], 4 * cfg["emb_dim"]), GELU(), nn.Linear(4 * cfg["emb_dim"], cfg["emb_dim"]))

    def forward(self, x):
        return self.layers(x)


class TransformerBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        if cfg["fused"]:
            self.att = PyTorchMultiHeadAttention(cfg["emb_dim"], cfg["emb_dim"], cfg["n_heads"], cfg["drop_rate"], cfg["qkv_bias"])
        else:
            self.att = MultiHeadAttention(cfg["emb_dim"], cfg["emb_dim"], cfg["context_length"], cfg["drop_rate"], cfg["n_heads"], cfg["qkv_bias"])
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg["emb_dim"])
        self.norm2 = LayerNorm(cfg["emb_dim"])
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x):
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class GPTModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = LayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    def forward(self, in_idx):
        x = self.tok_emb(in_idx) + self.pos_emb(torch.arange(in_idx.shape[1]))
        x = self.trf_blocks(self.drop_emb(x))
        return self.out_head(self.final_norm(x))


def book_config(fused, qkv_bias):
    return {"vocab_size": CFG["vocab_size"], "context_length": CFG["n_positions"], "emb_dim": CFG["n_embd"],
            "n_heads": CFG["n_head"], "n_layers": CFG["n_layer"], "drop_rate": 0.0, "qkv_bias": qkv_bias, "fused": fused}


def book_model_from_hf(p, fused, qkv_bias):
    """The book's load_weights_into_gpt, from Hugging Face tensors: Conv1D [in, out] becomes nn.Linear [out, in]."""
    model = GPTModel(book_config(fused, qkv_bias))
    d = CFG["n_embd"]
    with torch.no_grad():
        model.tok_emb.weight.copy_(p["wte.weight"])
        model.pos_emb.weight.copy_(p["wpe.weight"])
        for i, block in enumerate(model.trf_blocks):
            h = f"h.{i}."
            w, b = p[h + "attn.c_attn.weight"], p[h + "attn.c_attn.bias"]
            if fused:
                block.att.qkv.weight.copy_(w.T)
                if qkv_bias:
                    block.att.qkv.bias.copy_(b)
                out = block.att.proj
            else:
                for j, layer in enumerate([block.att.W_query, block.att.W_key, block.att.W_value]):
                    layer.weight.copy_(w[:, j * d:(j + 1) * d].T)
                    if qkv_bias:
                        layer.bias.copy_(b[j * d:(j + 1) * d])
                out = block.att.out_proj
            out.weight.copy_(p[h + "attn.c_proj.weight"].T)
            out.bias.copy_(p[h + "attn.c_proj.bias"])
            block.ff.layers[0].weight.copy_(p[h + "mlp.c_fc.weight"].T)
            block.ff.layers[0].bias.copy_(p[h + "mlp.c_fc.bias"])
            block.ff.layers[2].weight.copy_(p[h + "mlp.c_proj.weight"].T)
            block.ff.layers[2].bias.copy_(p[h + "mlp.c_proj.bias"])
            block.norm1.scale.copy_(p[h + "ln_1.weight"])
            block.norm1.shift.copy_(p[h + "ln_1.bias"])
            block.norm2.scale.copy_(p[h + "ln_2.weight"])
            block.norm2.shift.copy_(p[h + "ln_2.bias"])
        model.final_norm.scale.copy_(p["ln_f.weight"])
        model.final_norm.shift.copy_(p["ln_f.bias"])
        model.out_head.weight.copy_(p.get("lm_head.weight", p["wte.weight"]))
    return model.eval()


def hf_from_book(model):
    """The separate-QKV book model's weights back in the Hugging Face layout (head untied)."""
    s = {k: v.detach() for k, v in model.state_dict().items()}
    p = {"wte.weight": s["tok_emb.weight"], "wpe.weight": s["pos_emb.weight"]}
    for i in range(CFG["n_layer"]):
        b, h = f"trf_blocks.{i}.", f"h.{i}."
        p[h + "ln_1.weight"], p[h + "ln_1.bias"] = s[b + "norm1.scale"], s[b + "norm1.shift"]
        p[h + "attn.c_attn.weight"] = torch.cat([s[b + f"att.W_{n}.weight"] for n in ("query", "key", "value")]).T
        p[h + "attn.c_attn.bias"] = torch.zeros(3 * CFG["n_embd"])
        p[h + "attn.c_proj.weight"], p[h + "attn.c_proj.bias"] = s[b + "att.out_proj.weight"].T, s[b + "att.out_proj.bias"]
        p[h + "ln_2.weight"], p[h + "ln_2.bias"] = s[b + "norm2.scale"], s[b + "norm2.shift"]
        p[h + "mlp.c_fc.weight"], p[h + "mlp.c_fc.bias"] = s[b + "ff.layers.0.weight"].T, s[b + "ff.layers.0.bias"]
        p[h + "mlp.c_proj.weight"], p[h + "mlp.c_proj.bias"] = s[b + "ff.layers.2.weight"].T, s[b + "ff.layers.2.bias"]
    p["ln_f.weight"], p["ln_f.bias"] = s["final_norm.scale"], s["final_norm.shift"]
    p["lm_head.weight"] = s["out_head.weight"]
    return p


def our_name(book_key):
    """The .NET model's parameter name for a separate-QKV book parameter (W_query/W_key/W_value map to c_attn)."""
    parts = book_key.split(".")
    if parts[0] == "trf_blocks":
        h, rest = f"h.{parts[1]}.", ".".join(parts[2:])
        table = {"norm1.scale": "ln_1.weight", "norm1.shift": "ln_1.bias", "norm2.scale": "ln_2.weight",
                 "norm2.shift": "ln_2.bias", "att.out_proj.weight": "attn.c_proj.weight",
                 "att.out_proj.bias": "attn.c_proj.bias", "ff.layers.0.weight": "mlp.c_fc.weight",
                 "ff.layers.0.bias": "mlp.c_fc.bias", "ff.layers.2.weight": "mlp.c_proj.weight",
                 "ff.layers.2.bias": "mlp.c_proj.bias"}
        if rest.startswith("att.W_"):
            return h + "attn.c_attn." + parts[-1]
        return h + table[rest]
    return {"tok_emb.weight": "wte.weight", "pos_emb.weight": "wpe.weight", "final_norm.scale": "ln_f.weight",
            "final_norm.shift": "ln_f.bias", "out_head.weight": "lm_head.weight"}[book_key]


def in_our_layout(named):
    """{book key: tensor} -> {our name: tensor}, W_query/W_key/W_value stacked (nn.Linear layout, no transposes)."""
    out = {}
    for key, t in named.items():
        name = our_name(key)
        out[name] = torch.cat([out[name], t]) if name in out else t.clone()
    return out


# ---- TensorFlow tensor bundle (own writer of the documented format) -------------------------------------------------

def crc32c(data, crc=0):
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def masked_crc(data):
    crc = crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def varint(n):
    out = bytearray()
    while True:
        bits = n & 0x7F
        n >>= 7
        if n:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def proto_field(number, wire, payload):
    key = varint((number << 3) | wire)
    if wire == 0:
        return key + varint(payload)
    if wire == 2:
        return key + varint(len(payload)) + payload
    if wire == 5:
        return key + struct.pack("<I", payload)
    raise ValueError(wire)


def bundle_entry(shape, offset, size, crc):
    # BundleEntryProto: dtype=1 (DT_FLOAT), shape=2 (TensorShapeProto: repeated Dim dim=2 {int64 size=1}),
    # shard_id=3 (0, omitted as proto3 does), offset=4, size=5, crc32c=6 (fixed32, masked).
    dims = b"".join(proto_field(2, 2, proto_field(1, 0, n)) for n in shape)
    entry = proto_field(1, 0, 1) + proto_field(2, 2, dims)
    if offset:
        entry += proto_field(4, 0, offset)
    return entry + proto_field(5, 0, size) + proto_field(6, 5, crc)


def bundle_header():
    # BundleHeaderProto: num_shards=1, endianness=2 (LITTLE = 0, omitted), version=3 (VersionDef producer=1).
    return proto_field(1, 0, 1) + proto_field(3, 2, proto_field(1, 0, 1))


def table_block(items, restart_interval):
    """A LevelDB block: prefix-compressed entries, the restart offsets, their count."""
    out, restarts, previous = bytearray(), [], b""
    for i, (key, value) in enumerate(items):
        if i % restart_interval == 0:
            restarts.append(len(out))
            shared = 0
        else:
            shared = 0
            while shared < min(len(previous), len(key)) and previous[shared] == key[shared]:
                shared += 1
        out += varint(shared) + varint(len(key) - shared) + varint(len(value)) + key[shared:] + value
        previous = key
    if not restarts:
        restarts = [0]
    for r in restarts:
        out += struct.pack("<I", r)
    out += struct.pack("<I", len(restarts))
    return bytes(out)


def write_table(path, items, block_size=256):
    """LevelDB's table format (TensorFlow's table::TableBuilder, no compression): data blocks of about block_size
    bytes, an empty metaindex block, an index block (last key of each data block -> its handle), the 48-byte footer."""
    out = bytearray()

    def emit(block):
        handle = varint(len(out)) + varint(len(block))
        trailer = b"\x00"  # kNoCompression
        out.extend(block + trailer + struct.pack("<I", masked_crc(block + trailer)))
        return handle

    index, pending, pending_size = [], [], 0
    for key, value in items:
        pending.append((key, value))
        pending_size += len(key) + len(value) + 3
        if pending_size >= block_size:
            index.append((pending[-1][0], emit(table_block(pending, 16))))
            pending, pending_size = [], 0
    if pending:
        index.append((pending[-1][0], emit(table_block(pending, 16))))
    metaindex = emit(table_block([], 16))
    index_handle = emit(table_block(index, 1))
    footer = metaindex + index_handle
    footer += b"\x00" * (40 - len(footer)) + struct.pack("<Q", 0xDB4775248B80FB57)
    with open(path, "wb") as f:
        f.write(bytes(out) + footer)


def write_openai_checkpoint(directory, p):
    os.makedirs(directory, exist_ok=True)
    variables = {"model/wte": p["wte.weight"], "model/wpe": p["wpe.weight"],
                 "model/ln_f/g": p["ln_f.weight"], "model/ln_f/b": p["ln_f.bias"]}
    for i in range(CFG["n_layer"]):
        h, t = f"h.{i}.", f"model/h{i}/"
        for hf, tf in [("ln_1.weight", "ln_1/g"), ("ln_1.bias", "ln_1/b"), ("ln_2.weight", "ln_2/g"), ("ln_2.bias", "ln_2/b"),
                       ("attn.c_attn.bias", "attn/c_attn/b"), ("attn.c_proj.bias", "attn/c_proj/b"),
                       ("mlp.c_fc.bias", "mlp/c_fc/b"), ("mlp.c_proj.bias", "mlp/c_proj/b")]:
            variables[t + tf] = p[h + hf]
        for hf, tf in [("attn.c_attn.weight", "attn/c_attn/w"), ("attn.c_proj.weight", "attn/c_proj/w"),
                       ("mlp.c_fc.weight", "mlp/c_fc/w"), ("mlp.c_proj.weight", "mlp/c_proj/w")]:
            variables[t + tf] = p[h + hf].unsqueeze(0)  # OpenAI's 1x1 convolution kernels: [1, in, out]
    # The data file in reverse name order (offsets then do not follow the index's order, as in real bundles
    # written in variable-creation order); the index sorted by name with the header entry "" first.
    data, entries = bytearray(), {}
    for name in sorted(variables, reverse=True):
        raw = variables[name].to(torch.float32).contiguous().numpy().tobytes()
        entries[name] = bundle_entry(list(variables[name].shape), len(data), len(raw), masked_crc(raw))
        data += raw
    with open(os.path.join(directory, "model.ckpt.data-00000-of-00001"), "wb") as f:
        f.write(bytes(data))
    items = [(b"", bundle_header())] + [(name.encode(), entries[name]) for name in sorted(entries)]
    write_table(os.path.join(directory, "model.ckpt.index"), items)
    with open(os.path.join(directory, "hparams.json"), "w") as f:
        json.dump({"n_vocab": CFG["vocab_size"], "n_ctx": CFG["n_positions"], "n_embd": CFG["n_embd"],
                   "n_head": CFG["n_head"], "n_layer": CFG["n_layer"]}, f, indent=2)
    with open(os.path.join(directory, "checkpoint"), "w") as f:
        f.write('model_checkpoint_path: "model.ckpt"\nall_model_checkpoint_paths: "model.ckpt"\n')


# ---- main -------------------------------------------------------------------------------------------------------------

def hf_tensors(p):
    return [(k, p[k]) for k in p]


def main():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    ids = INPUT_IDS
    p = make_hf_params()
    nobias = dict(p)
    for i in range(CFG["n_layer"]):
        nobias[f"h.{i}.attn.c_attn.bias"] = torch.zeros(3 * CFG["n_embd"])

    write_config(os.path.join(OUT, "hf"))
    write_safetensors(os.path.join(OUT, "hf", "model.safetensors"), hf_tensors(p))
    write_config(os.path.join(OUT, "hf-nobias"), qkv_bias=False)
    write_safetensors(os.path.join(OUT, "hf-nobias", "model.safetensors"), hf_tensors(nobias))
    logits = reference_forward(p, ids)
    logits_nobias = reference_forward(nobias, ids)

    os.makedirs(os.path.join(OUT, "book"), exist_ok=True)
    for fused in (False, True):
        for bias in (True, False):
            model = book_model_from_hf(p if bias else nobias, fused, bias)
            with torch.no_grad():
                got = model(torch.tensor(ids)).double()
            expected = logits if bias else logits_nobias
            assert (got - expected).abs().max() < 1e-5, "the book model must compute the original's function"
            name = f"model-{'fused' if fused else 'separate'}-{'bias' if bias else 'nobias'}.pth"
            torch.save(model.state_dict(), os.path.join(OUT, "book", name))

    # ch. 5: train, then save model and optimizer together.
    model = book_model_from_hf(nobias, fused=False, qkv_bias=False).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    generator = torch.Generator().manual_seed(7)
    batches = [torch.randint(0, CFG["vocab_size"], (2, 9), generator=generator) for _ in range(3)]

    def step(batch):
        optimizer.zero_grad()
        out = model(batch[:, :-1])
        loss = nn.functional.cross_entropy(out.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        optimizer.step()

    step(batches[0])
    step(batches[1])
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict()},
               os.path.join(OUT, "book", "model_and_optimizer.pth"))
    trained = hf_from_book(model)
    write_config(os.path.join(OUT, "hf-trained"), qkv_bias=False, tied=False)
    write_safetensors(os.path.join(OUT, "hf-trained", "model.safetensors"), hf_tensors(trained))
    logits_trained = reference_forward(trained, ids)

    names = [k for k, _ in model.named_parameters()]
    state = optimizer.state_dict()["state"]
    exp_avg = in_our_layout({names[i]: state[i]["exp_avg"] for i in range(len(names))})
    exp_avg_sq = in_our_layout({names[i]: state[i]["exp_avg_sq"] for i in range(len(names))})
    step(batches[2])
    after = in_our_layout({k: v.detach() for k, v in model.named_parameters()})
    optimizer_reference = [("batch", batches[2].double())]
    optimizer_reference += [(f"exp_avg.{k}", v) for k, v in sorted(exp_avg.items())]
    optimizer_reference += [(f"exp_avg_sq.{k}", v) for k, v in sorted(exp_avg_sq.items())]
    optimizer_reference += [(f"after.{k}", v) for k, v in sorted(after.items())]
    write_safetensors(os.path.join(OUT, "book", "optimizer-reference.safetensors"), optimizer_reference)

    write_openai_checkpoint(os.path.join(OUT, "openai"), p)

    write_safetensors(os.path.join(OUT, "reference.safetensors"),
                      [("input_ids", torch.tensor(ids, dtype=torch.float64)), ("logits", logits),
                       ("logits_nobias", logits_nobias), ("logits_trained", logits_trained)])
    print("wrote", OUT)


if __name__ == "__main__":
    main()
