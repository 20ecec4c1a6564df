#!/usr/bin/python3
"""Classification fine-tuning fixtures (the book's chapter 6) for the .NET tests, computed by the book's own code.

This script imports Sebastian Raschka's package `llms_from_scratch` (repository rasbt/LLMs-from-scratch, folder
pkg/; generated from commit 28c65cdfbc3338e2e040016eea4b7fdf556e4d57) and runs its GPTModel (ch04.py) and its
chapter-6 functions (ch06.py: SpamDataset, calc_loss_batch, train_classifier_simple, calc_accuracy_loader). Nothing
of the model or of the training loop is re-implemented here. Get the package with either

    git clone https://github.com/rasbt/LLMs-from-scratch /tmp/LLMs-from-scratch
    export LLMS_FROM_SCRATCH=/tmp/LLMs-from-scratch/pkg

or, from a local mirror of that repository (a bare git directory),

    mkdir -p /tmp/llms && git -C <mirror> archive HEAD pkg | tar -x -C /tmp/llms
    export LLMS_FROM_SCRATCH=/tmp/llms/pkg

Needs Debian's python3-torch (1.13), python3-numpy and python3-pandas (SpamDataset reads a CSV); ch06.py also
imports matplotlib and requests, and ch02 would import tiktoken: any of these that is missing is replaced by an
empty stub module (nothing here uses them; the fixtures use token ids directly, there is no tokenizer).

The model. The book's GPTModel (ch. 4) with vocab_size 512, context_length 16, emb_dim 32, n_heads 4, n_layers 2,
drop_rate 0.0, qkv_bias True, built after torch.manual_seed(123) (PyTorch's default initialisation: embeddings
N(0, 1), nn.Linear Kaiming-uniform). Then, as in ch. 6: every parameter frozen, torch.manual_seed(124), out_head
replaced by torch.nn.Linear(32, 2, bias=False), and trf_blocks[-1], final_norm (and the new out_head) trainable.
NOTE: the book's new head has a bias (nn.Linear default); ours has none, as Hugging Face's
GPT2ForSequenceClassification `score`. Trainable parameters: the last block (12,704), final_norm (64), the head
(64) = 12,832 of 42,432.

Examples. 10 sequences of token ids (lengths 3..14, ids 0..510; 511 is the padding id), labels 0 = ham, 1 = spam,
in a fixed "file order". The ids are drawn from torch.Generator().manual_seed(2026): ham ids in 0..254, spam ids
in 255..510, so that the task is learnable; the file examples.json is the source of truth.

Outputs under tests/fixtures/classifier/:
  examples.json                                a JSON list of {"ids": [...], "label": 0|1}, one example a line
  initial/{config.json, model.safetensors}     the classifier before training, Hugging Face
                                               GPT2ForSequenceClassification layout, F32 (see HF LAYOUT below)
  trained/{config.json, model.safetensors}     the same after one epoch (trajectory below); frozen tensors are
                                               bit-for-bit those of initial/
  reference.safetensors:
    padded_ids            I64 [10, 14]  the examples padded with 511 to the longest (the book's SpamDataset,
                                        max_length=None, pad_token_id=511), rows in file order
    labels                I64 [10]
    last_position_logits  F32 [10, 2]   initial model, eval mode, no_grad, on padded_ids, logits[:, -1, :]: the
                                        book's pooling (the last position, a pad token for shorter examples)
    last_token_logits     F32 [10, 2]   initial model, each example alone and unpadded, logits[:, -1, :]: Hugging
                                        Face's pooling (the last non-pad token; the same numbers as the padded
                                        batch at position len-1, since attention is causal)
    batch_loss            F32 []        the book's calc_loss_batch(padded_ids, labels, model, "cpu"), all 10 in one
                                        batch: mean cross-entropy of last_position_logits
    trajectory_losses     F32 [10]      one epoch of the book's train_classifier_simple: batch size 1, file order
                                        (DataLoader shuffle=False), padded_ids rows, model.train(),
                                        torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1); each
                                        step zero_grad, calc_loss_batch, backward, step; the loss recorded is the
                                        one BEFORE that step's update. NOTE: lr 1e-3, not the book's 5e-5, so that
                                        10 steps move the weights measurably. AdamW's defaults otherwise (betas
                                        0.9/0.999, eps 1e-8, decoupled weight decay on EVERY trainable tensor,
                                        LayerNorm and biases included, as the book does); frozen tensors have no
                                        gradient, so AdamW neither updates nor decays them.
    accuracy_after        F32 []        the book's calc_accuracy_loader over the 10 padded examples (batch 1, file
                                        order) after that epoch: argmax of logits[:, -1, :] vs label

HF LAYOUT (Conv1D weights are [in, out], y = x @ W + b; nn.Linear's are [out, in]):
  transformer.wte.weight [512, 32] = tok_emb;  transformer.wpe.weight [16, 32] = pos_emb
  transformer.h.{i}.ln_1.weight/.bias [32] = norm1.scale/.shift;  ln_2 = norm2
  transformer.h.{i}.attn.c_attn.weight [32, 96] = cat([W_query.weight.T, W_key.weight.T, W_value.weight.T], dim=1)
  transformer.h.{i}.attn.c_attn.bias [96] = cat([W_query.bias, W_key.bias, W_value.bias])
  transformer.h.{i}.attn.c_proj.weight [32, 32] = att.out_proj.weight.T;  .bias [32]
  transformer.h.{i}.mlp.c_fc.weight [32, 128] = ff.layers[0].weight.T;  .bias [128]
  transformer.h.{i}.mlp.c_proj.weight [128, 32] = ff.layers[2].weight.T;  .bias [32]
  transformer.ln_f.weight/.bias [32] = final_norm.scale/.shift
  score.weight [2, 32] = out_head.weight (nn.Linear layout [num_labels, n_embd], no bias)
  (no lm_head; tie_word_embeddings is irrelevant to the classifier and kept true as GPT-2's config has it)
The export is checked: a float64 forward pass from these tensors (make_tiny_gpt2.py's building blocks) matches
the book model's float32 logits to 1e-5.

Float32 as the book runs it, torch.set_num_threads(1). The script also reruns everything in float64 (model and
optimizer cast with .double()) and prints the largest float32-vs-float64 differences (not stored), a guide to the
tolerance an independent float32 implementation can be held to. Observed: logits and losses within 2e-7, trained
weights within 4e-7, EXCEPT the key bias of the trained block, transformer.h.1.attn.c_attn.bias[32:64]: its exact
gradient is zero (adding a constant to every key shifts each query's scores by one constant, which softmax
ignores), so float32 gives rounding noise (~1e-9), and AdamW turns noise of that size into steps of up to ~0.1 lr
(g / (|g| + eps), eps 1e-8). It differed by 4.3e-4 between the float32 and float64 runs; it has no effect on any
output. Compare that slice loosely (1e-2) or not at all.

Regenerate from the repository root:
    LLMS_FROM_SCRATCH=/tmp/llms/pkg /usr/bin/python3 -B reference/make_classifier_fixture.py
Deterministic: the same bytes on every run.
"""
import copy
import csv
import json
import os
import sys
import tempfile
import types

import numpy as np
import torch

torch.set_num_threads(1)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(ROOT, "tests", "fixtures", "classifier")

sys.path.insert(0, HERE)
from make_tiny_gpt2 import attention_batched, gelu_tanh, layer_norm, read_safetensors, split_qkv, \
    write_safetensors  # noqa: E402

CFG = {"vocab_size": 512, "context_length": 16, "emb_dim": 32, "n_heads": 4, "n_layers": 2, "drop_rate": 0.0,
       "qkv_bias": True}
PAD = 511
NUM_CLASSES = 2
LR, WEIGHT_DECAY = 1e-3, 0.1

# Lengths and labels of the 10 examples in file order (the longest, 14, is among the first 6 so that the LoRA
# fixture's 6-example set pads to the same length).
LENGTHS = [9, 4, 14, 6, 3, 11, 7, 12, 5, 10]
LABELS = [1, 0, 0, 1, 1, 0, 1, 0, 0, 1]

HF_CONFIG = {"model_type": "gpt2", "architectures": ["GPT2ForSequenceClassification"], "vocab_size": 512,
             "n_positions": 16, "n_ctx": 16, "n_embd": 32, "n_head": 4, "n_layer": 2, "layer_norm_epsilon": 1e-05,
             "activation_function": "gelu_new", "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
             "tie_word_embeddings": True, "qkv_bias": True, "num_labels": 2, "id2label": {"0": "ham", "1": "spam"},
             "label2id": {"ham": 0, "spam": 1}, "pad_token_id": 511, "bos_token_id": 511, "eos_token_id": 511}


# ---- the book's package -----------------------------------------------------------------------------------------

def load_book():
    """Imports llms_from_scratch.{ch04, ch06, appendix_e} from $LLMS_FROM_SCRATCH (the repository's pkg/ folder)."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    for name in ("tiktoken", "requests", "matplotlib", "matplotlib.pyplot", "tqdm"):
        try:
            __import__(name)
        except ImportError:
            sys.modules[name] = types.ModuleType(name)
    path = os.environ.get("LLMS_FROM_SCRATCH")
    if path:
        if not os.path.isfile(os.path.join(path, "llms_from_scratch", "ch06.py")):
            sys.exit(f"LLMS_FROM_SCRATCH={path} has no llms_from_scratch/ch06.py (it should be the repository's pkg/)")
        sys.path.insert(0, path)
    try:
        from llms_from_scratch import appendix_e, ch04, ch06
    except ImportError as e:
        sys.exit(f"cannot import the book's package ({e}); set LLMS_FROM_SCRATCH, see the docstring")
    return types.SimpleNamespace(ch04=ch04, ch06=ch06, appendix_e=appendix_e, path=os.path.dirname(ch04.__file__))


# ---- examples and the book's data pipeline ----------------------------------------------------------------------

def make_examples():
    g = torch.Generator().manual_seed(2026)
    examples = []
    for n, label in zip(LENGTHS, LABELS):
        low, high = (255, 511) if label == 1 else (0, 255)
        examples.append({"ids": torch.randint(low, high, (n,), generator=g).tolist(), "label": label})
    return examples


def book_loader(book, examples, directory, name):
    """The book's SpamDataset (max_length=None: pad to the longest, with pad_token_id) over a CSV of the examples,
    the ids written as text and 'tokenized' by splitting; DataLoader batch 1, file order."""
    path = os.path.join(directory, name + ".csv")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Label", "Text"])
        for e in examples:
            w.writerow([e["label"], " ".join(str(i) for i in e["ids"])])
    tokenizer = types.SimpleNamespace(encode=lambda text: [int(t) for t in str(text).split()])
    dataset = book.ch06.SpamDataset(path, tokenizer, max_length=None, pad_token_id=PAD)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, shuffle=False, num_workers=0, drop_last=False)
    return dataset, loader


def padded_tensors(dataset):
    rows = [dataset[i] for i in range(len(dataset))]
    return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


# ---- the model --------------------------------------------------------------------------------------------------

def build_initial_classifier(book):
    """The book's GPTModel, frozen and given a 2-class head as in ch. 6 (head without bias, see the docstring)."""
    torch.manual_seed(123)
    model = book.ch04.GPTModel(CFG)
    for p in model.parameters():
        p.requires_grad = False
    torch.manual_seed(124)
    model.out_head = torch.nn.Linear(CFG["emb_dim"], NUM_CLASSES, bias=False)
    for p in model.trf_blocks[-1].parameters():
        p.requires_grad = True
    for p in model.final_norm.parameters():
        p.requires_grad = True
    for p in model.out_head.parameters():
        p.requires_grad = True
    return model


def hf_tensors(model):
    """[(name, tensor)] in the Hugging Face GPT2ForSequenceClassification layout (see the docstring)."""
    out = [("transformer.wte.weight", model.tok_emb.weight), ("transformer.wpe.weight", model.pos_emb.weight)]
    for i, b in enumerate(model.trf_blocks):
        h, att = f"transformer.h.{i}.", b.att
        out += [
            (h + "ln_1.weight", b.norm1.scale), (h + "ln_1.bias", b.norm1.shift),
            (h + "attn.c_attn.weight", torch.cat([att.W_query.weight.T, att.W_key.weight.T, att.W_value.weight.T], 1)),
            (h + "attn.c_attn.bias", torch.cat([att.W_query.bias, att.W_key.bias, att.W_value.bias])),
            (h + "attn.c_proj.weight", att.out_proj.weight.T), (h + "attn.c_proj.bias", att.out_proj.bias),
            (h + "ln_2.weight", b.norm2.scale), (h + "ln_2.bias", b.norm2.shift),
            (h + "mlp.c_fc.weight", b.ff.layers[0].weight.T), (h + "mlp.c_fc.bias", b.ff.layers[0].bias),
            (h + "mlp.c_proj.weight", b.ff.layers[2].weight.T), (h + "mlp.c_proj.bias", b.ff.layers[2].bias),
        ]
    out += [("transformer.ln_f.weight", model.final_norm.scale), ("transformer.ln_f.bias", model.final_norm.shift),
            ("score.weight", model.out_head.weight)]
    return [(k, v.detach().to(torch.float32).contiguous().clone()) for k, v in out]


def hf_forward_float64(tensors, ids):
    """Independent check of the export: GPT-2 from the Hugging Face tensors in float64, score head, all positions."""
    P = {k: torch.as_tensor(v).to(torch.float64) for k, v in tensors.items()}
    ids = torch.as_tensor(ids)
    B, T = ids.shape
    x = P["transformer.wte.weight"][ids] + P["transformer.wpe.weight"][torch.arange(T)]
    for i in range(CFG["n_layers"]):
        p = f"transformer.h.{i}."
        h = layer_norm(x, P[p + "ln_1.weight"], P[p + "ln_1.bias"], 1e-5)
        q, k, v = split_qkv(h, P[p + "attn.c_attn.weight"], P[p + "attn.c_attn.bias"], CFG["n_heads"])
        a = attention_batched(q, k, v).transpose(1, 2).reshape(B, T, -1)
        x = x + a @ P[p + "attn.c_proj.weight"] + P[p + "attn.c_proj.bias"]
        h = layer_norm(x, P[p + "ln_2.weight"], P[p + "ln_2.bias"], 1e-5)
        x = x + gelu_tanh(h @ P[p + "mlp.c_fc.weight"] + P[p + "mlp.c_fc.bias"]) @ P[p + "mlp.c_proj.weight"] \
            + P[p + "mlp.c_proj.bias"]
    x = layer_norm(x, P["transformer.ln_f.weight"], P["transformer.ln_f.bias"], 1e-5)
    return x @ P["score.weight"].T


# ---- evaluation and training through the book's functions -------------------------------------------------------

def last_token_logits(model, examples, dtype):
    model.eval()
    with torch.no_grad():
        return torch.cat([model(torch.tensor([e["ids"]]))[:, -1, :] for e in examples]).to(dtype)


def train_one_epoch(book, model, loader):
    """The book's train_classifier_simple for one epoch with AdamW(lr 1e-3, weight decay 0.1); returns the loss of
    every training step (before its update) and calc_accuracy_loader over the loader afterwards. The losses are
    recorded by wrapping ch06.calc_loss_batch (the evaluation calls of train_classifier_simple run under no_grad and
    are not recorded; they change nothing since drop_rate is 0)."""
    ch06 = book.ch06
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    original, losses = ch06.calc_loss_batch, []

    def recording(input_batch, target_batch, model, device):
        loss = original(input_batch, target_batch, model, device)
        if torch.is_grad_enabled():
            losses.append(loss.item())
        return loss

    ch06.calc_loss_batch = recording
    try:
        _, _, train_accs, _, seen = ch06.train_classifier_simple(
            model, loader, loader, optimizer, "cpu", num_epochs=1, eval_freq=10 ** 9, eval_iter=None)
    finally:
        ch06.calc_loss_batch = original
    assert len(losses) == len(loader) == seen, (len(losses), len(loader), seen)
    return losses, train_accs[0]


def manual_epoch(book, model, loader):
    """The same epoch written out (zero_grad, calc_loss_batch, backward, step): checks the reading of
    train_classifier_simple above."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    model.train()
    losses = []
    for x, y in loader:
        optimizer.zero_grad()
        loss = book.ch06.calc_loss_batch(x, y, model, "cpu")
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
    return losses


def run(book, examples, loader, dtype):
    """Everything stored in reference.safetensors, computed with the model in `dtype`."""
    model = build_initial_classifier(book).to(dtype)
    padded, labels = padded_tensors(loader.dataset)
    initial = copy.deepcopy(model)
    model.eval()
    with torch.no_grad():
        last_position = model(padded)[:, -1, :]
        batch_loss = book.ch06.calc_loss_batch(padded, labels, model, "cpu")
    last_token = last_token_logits(model, examples, dtype)
    losses, accuracy = train_one_epoch(book, model, loader)
    return {"initial": initial, "trained": model, "padded_ids": padded, "labels": labels,
            "last_position_logits": last_position, "last_token_logits": last_token, "batch_loss": batch_loss,
            "trajectory_losses": torch.tensor(losses, dtype=torch.float64), "accuracy_after": accuracy}


# ---- files ------------------------------------------------------------------------------------------------------

def write_json(path, value):
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")


def write_examples(path, examples):
    with open(path, "w") as f:
        f.write("[\n" + ",\n".join("  " + json.dumps(e) for e in examples) + "\n]\n")


def write_model(directory, model):
    os.makedirs(directory, exist_ok=True)
    write_json(os.path.join(directory, "config.json"), HF_CONFIG)
    write_safetensors(os.path.join(directory, "model.safetensors"),
                      [(k, "F32", v.numpy()) for k, v in hf_tensors(model)])


def f32(t):
    return ("F32", torch.as_tensor(t).detach().to(torch.float32).numpy())


def i64(t):
    return ("I64", torch.as_tensor(t).to(torch.int64).numpy())


def main():
    book = load_book()
    print("book package:", book.path)
    examples = make_examples()
    assert all(0 <= i < PAD for e in examples for i in e["ids"])
    os.makedirs(OUT, exist_ok=True)
    write_examples(os.path.join(OUT, "examples.json"), examples)

    with tempfile.TemporaryDirectory() as tmp:
        dataset, loader = book_loader(book, examples, tmp, "examples")
        assert dataset.max_length == max(LENGTHS) <= CFG["context_length"]
        r = run(book, examples, loader, torch.float32)
        r64 = run(book, examples, loader, torch.float64)
        check = manual_epoch(book, build_initial_classifier(book), loader)
    assert check == r["trajectory_losses"].tolist(), "train_classifier_simple must be the plain loop"

    model, initial = r["trained"], r["initial"]
    trainable = sum(p.numel() for p in initial.parameters() if p.requires_grad)
    total = sum(p.numel() for p in initial.parameters())
    print(f"trainable parameters {trainable} of {total}")

    # The export reproduces the book model; the unpadded last token equals the padded batch at len-1 (causal).
    init_hf = dict(hf_tensors(initial))
    hf_logits = hf_forward_float64(init_hf, r["padded_ids"])
    assert (hf_logits[:, -1, :] - r["last_position_logits"].double()).abs().max() < 1e-5
    gathered = torch.stack([hf_logits[i, n - 1] for i, n in enumerate(LENGTHS)])
    assert (gathered - r["last_token_logits"].double()).abs().max() < 1e-5
    # Frozen tensors unchanged bit for bit, trained ones moved.
    trained_hf = dict(hf_tensors(model))
    for name, t in init_hf.items():
        frozen = not (name.startswith("transformer.h.1.") or name.startswith("transformer.ln_f.") or name == "score.weight")
        assert torch.equal(t, trained_hf[name]) == frozen, name

    write_model(os.path.join(OUT, "initial"), initial)
    write_model(os.path.join(OUT, "trained"), model)
    write_safetensors(os.path.join(OUT, "reference.safetensors"), [
        ("padded_ids",) + i64(r["padded_ids"]),
        ("labels",) + i64(r["labels"]),
        ("last_position_logits",) + f32(r["last_position_logits"]),
        ("last_token_logits",) + f32(r["last_token_logits"]),
        ("batch_loss",) + f32(r["batch_loss"]),
        ("trajectory_losses",) + f32(r["trajectory_losses"]),
        ("accuracy_after",) + f32(torch.tensor(r["accuracy_after"])),
    ])
    written, _ = read_safetensors(os.path.join(OUT, "trained", "model.safetensors"))
    assert all(np.array_equal(written[k][1], v.numpy()) for k, v in trained_hf.items())

    print("trajectory_losses", [round(x, 6) for x in r["trajectory_losses"].tolist()])
    print("accuracy_after", r["accuracy_after"], " batch_loss", r["batch_loss"].item())
    print("float32 vs float64, largest absolute differences:")
    for key in ("last_position_logits", "last_token_logits", "batch_loss", "trajectory_losses"):
        print(f"  {key:22s} {(r[key].double() - r64[key]).abs().max().item():.3g}")
    t64 = dict(hf_tensors(r64["trained"]))
    print(f"  {'trained weights':22s} {max((trained_hf[k].double() - t64[k].double()).abs().max().item() for k in t64):.3g}"
          "  (float64 run's weights rounded to float32)")
    print(f"  {'accuracy_after':22s} {abs(r['accuracy_after'] - r64['accuracy_after'])}")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
