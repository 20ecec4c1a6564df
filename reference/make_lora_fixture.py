#!/usr/bin/python3
"""LoRA fixtures (the book's appendix E) for the .NET tests, computed by the book's own code, written as a
Hugging Face PEFT adapter of the classifier in tests/fixtures/classifier/initial.

Runs the book's package `llms_from_scratch` (rasbt/LLMs-from-scratch, folder pkg/; see make_classifier_fixture.py
for how to get it and set LLMS_FROM_SCRATCH; generated from commit 28c65cdfbc3338e2e040016eea4b7fdf556e4d57):
appendix_e.py's LoRALayer, LinearWithLoRA and replace_linear_with_lora, ch06.py's SpamDataset,
train_classifier_simple and calc_loss_batch, ch04.py's GPTModel. Run make_classifier_fixture.py first: this script
rebuilds the same initial classifier and checks it against classifier/initial/model.safetensors and
classifier/examples.json bit for bit.

SCALING. The appendix_e.py that was run multiplies by alpha / rank (LoRALayer.forward:
`(self.alpha / self.rank) * (x @ self.A @ self.B)`), PEFT's convention; the printed first edition of the book
multiplied by alpha alone. The script measures the factor on the adapters it built and stops unless it is
alpha / rank = 8 / 4 = 2.0; the factor is stored as `scaling` in reference.safetensors, and adapter_config.json's
r = 4, lora_alpha = 8 give PEFT the same factor (lora_alpha / r).

The adapted model. The initial classifier (make_classifier_fixture.build_initial_classifier: seed 123 GPTModel,
seed 124 bias-free 2-class head), then every parameter frozen, then torch.manual_seed(7) and the book's
replace_linear_with_lora(module, rank=4, alpha=8) on, for block 0 then block 1: a holder module whose only child is
att.out_proj (put back afterwards), then block.ff (which wraps ff.layers[0] and ff.layers[2]). So 6 adapters, their
A drawn by the book's kaiming_uniform_(a=sqrt(5)) in that order. W_query/W_key/W_value get no adapter: Hugging
Face's GPT-2 fuses them into one c_attn matrix, so separate q/k/v adapters have no one-to-one PEFT counterpart.
Then, so that the adapter is not a no-op, every B (zeros in the book) is set, in the same order, to
N(0, 0.05^2) draws from torch.Generator().manual_seed(8): this is "a saved initial adapter". out_head (HF `score`)
is then made trainable as a whole (PEFT's modules_to_save).

Trainable parameters: r * (in + out) per adapted matrix: attn.c_proj 4 * (32 + 32) = 256, mlp.c_fc
4 * (32 + 128) = 640, mlp.c_proj 4 * (128 + 32) = 640; 1,536 a block, 3,072 for the 2 blocks; plus the head
2 * 32 = 64: 3,136 in all (of 45,504 with the adapters; the base's other 42,368 are frozen).

Outputs under tests/fixtures/lora/:
  adapter/adapter_config.json         PEFT's LoraConfig: r 4, lora_alpha 8, target_modules attn.c_proj, mlp.c_fc,
                                      mlp.c_proj, fan_in_fan_out true (GPT-2's Conv1D), modules_to_save [score],
                                      base_model_name_or_path ../../classifier/initial (relative to this folder)
  adapter/adapter_model.safetensors   the initial adapter, F32, PEFT's saved key names:
      base_model.model.transformer.h.{i}.attn.c_proj.lora_A.weight [4, 32]   = the book's A [in, r] transposed
      base_model.model.transformer.h.{i}.attn.c_proj.lora_B.weight [32, 4]   = the book's B [r, out] transposed
      base_model.model.transformer.h.{i}.mlp.c_fc.lora_A.weight    [4, 32]   (the book's ff.layers[0])
      base_model.model.transformer.h.{i}.mlp.c_fc.lora_B.weight    [128, 4]
      base_model.model.transformer.h.{i}.mlp.c_proj.lora_A.weight  [4, 128]  (the book's ff.layers[2])
      base_model.model.transformer.h.{i}.mlp.c_proj.lora_B.weight  [32, 4]
      base_model.model.score.weight                                [2, 32]   the fully trained head (= out_head)
    The head's key is the one PEFT writes to disk: in memory PEFT holds it as
    score.modules_to_save.default.weight, and get_peft_model_state_dict strips "modules_to_save." and the adapter
    name ("default") before saving, as it strips ".default" from the lora_A/lora_B keys.
    PEFT's update of a Conv1D weight W [in, out]: W + scaling * (lora_B.weight @ lora_A.weight).T
    = W + scaling * (A @ B) with the book's A, B; in a forward pass x @ W + scaling * (x @ A @ B).
  trained/adapter_config.json, trained/adapter_model.safetensors
                                      the same after the 6 training steps below
  reference.safetensors:
    scaling                    F32 []         2.0, the factor the book's code applied (alpha / rank)
    last_token_logits          F32 [10, 2]    the initial adapter applied (unmerged, as the book runs it), eval mode,
                                              each of classifier/examples.json's 10 examples alone and unpadded,
                                              logits[:, -1, :]
    merged_delta_c_fc_0        F32 [32, 128]  block 0's c_fc update in the HF Conv1D orientation [in, out]:
                                              scaling * (A @ B), the book's A [32, 4], B [4, 128]
    padded_ids                 I64 [6, 14]    the first 6 examples padded with 511 to their longest (the book's
                                              SpamDataset over those 6; the longest of the 10 is among them, so
                                              these are the first 6 rows of the classifier fixture's padded_ids)
    labels                     I64 [6]
    trajectory_losses          F32 [6]        one epoch of the book's train_classifier_simple over those 6: batch 1,
                                              file order, model.train(), torch.optim.AdamW(model.parameters(),
                                              lr=1e-3, weight_decay=0.1) (the frozen base has no gradient: AdamW
                                              neither updates nor decays it; adapters and head are decayed), the
                                              book's calc_loss_batch (pooling logits[:, -1, :] at the padded last
                                              position), each loss recorded BEFORE its step's update
    last_token_logits_trained  F32 [10, 2]    last_token_logits with the trained adapter

The export is checked: a float64 forward pass of the base from classifier/initial's tensors, with PEFT's merged
update W + scaling * (lora_B @ lora_A).T and the saved head, matches the book model's float32 logits to 1e-5.
Also reruns everything in float64 and prints the largest float32-vs-float64 differences (observed: logits and
losses ~1e-7, trained adapter tensors ~1e-7; no ill-conditioned tensor here, the key bias is frozen).

Regenerate from the repository root (after make_classifier_fixture.py):
    LLMS_FROM_SCRATCH=/tmp/llms/pkg /usr/bin/python3 -B reference/make_lora_fixture.py
Deterministic: the same bytes on every run.
"""
import copy
import json
import os
import sys
import tempfile

import numpy as np
import torch

torch.set_num_threads(1)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_classifier_fixture as cls  # noqa: E402
from make_tiny_gpt2 import read_safetensors, write_safetensors  # noqa: E402

OUT = os.path.join(cls.ROOT, "tests", "fixtures", "lora")
CLASSIFIER = cls.OUT
RANK, ALPHA = 4, 8
B_STD = 0.05
N_TRAIN = 6
PREFIX = "base_model.model."

ADAPTER_CONFIG = {"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA,
                  "target_modules": ["attn.c_proj", "mlp.c_fc", "mlp.c_proj"], "fan_in_fan_out": True,
                  "base_model_name_or_path": "../../classifier/initial", "modules_to_save": ["score"],
                  "lora_dropout": 0.0, "bias": "none", "task_type": "SEQ_CLS", "inference_mode": True}


def adapters(model):
    """[(PEFT module name, the book's LoRALayer)] in creation order."""
    out = []
    for i, b in enumerate(model.trf_blocks):
        h = f"transformer.h.{i}."
        out += [(h + "attn.c_proj", b.att.out_proj.lora), (h + "mlp.c_fc", b.ff.layers[0].lora),
                (h + "mlp.c_proj", b.ff.layers[2].lora)]
    return out


def build_lora_model(book):
    model = cls.build_initial_classifier(book)
    for p in model.parameters():
        p.requires_grad = False
    e = book.appendix_e
    torch.manual_seed(7)
    for b in model.trf_blocks:
        holder = torch.nn.Module()
        holder.out_proj = b.att.out_proj
        e.replace_linear_with_lora(holder, rank=RANK, alpha=ALPHA)
        b.att.out_proj = holder.out_proj
        e.replace_linear_with_lora(b.ff, rank=RANK, alpha=ALPHA)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for _, lora in adapters(model):
            lora.B.copy_(torch.randn(lora.B.shape, generator=g) * B_STD)
    for p in model.out_head.parameters():
        p.requires_grad = True
    wrapped = [n for n, m in model.named_modules() if isinstance(m, e.LinearWithLoRA)]
    assert wrapped == [f"trf_blocks.{i}.{s}" for i in range(2) for s in ("att.out_proj", "ff.layers.0", "ff.layers.2")]
    return model


def measured_scaling(model):
    lora = adapters(model)[0][1]
    x = torch.linspace(-1, 1, lora.A.shape[0], dtype=lora.A.dtype)[None]
    with torch.no_grad():
        return (lora(x).double().sum() / (x @ lora.A @ lora.B).double().sum()).item()


def peft_tensors(model):
    out = []
    for name, lora in adapters(model):
        out += [(PREFIX + name + ".lora_A.weight", lora.A.T), (PREFIX + name + ".lora_B.weight", lora.B.T)]
    out.append((PREFIX + "score.weight", model.out_head.weight))
    return [(k, v.detach().to(torch.float32).contiguous().clone()) for k, v in out]


def peft_forward_float64(base, adapter, ids, scaling):
    """The base's HF tensors with PEFT's merge of a Conv1D (fan_in_fan_out) LoRA and the modules_to_save head."""
    merged = {k: torch.as_tensor(v).double() for k, v in base.items()}
    for key in adapter:
        if key.endswith(".lora_A.weight"):
            module = key[len(PREFIX):-len(".lora_A.weight")]
            a, b = adapter[key].double(), adapter[PREFIX + module + ".lora_B.weight"].double()
            merged[module + ".weight"] = merged[module + ".weight"] + scaling * (b @ a).T
    merged["score.weight"] = adapter[PREFIX + "score.weight"].double()
    return cls.hf_forward_float64(merged, ids)


def run(book, examples, loader, dtype):
    model = build_lora_model(book).to(dtype)
    scaling = measured_scaling(model)
    initial = copy.deepcopy(model)
    logits = cls.last_token_logits(model, examples, dtype)
    lora = adapters(model)[1][1]
    assert adapters(model)[1][0] == "transformer.h.0.mlp.c_fc"
    delta = (scaling * (lora.A @ lora.B)).detach()
    losses, _ = cls.train_one_epoch(book, model, loader)
    padded, labels = cls.padded_tensors(loader.dataset)
    return {"initial": initial, "trained": model, "scaling": scaling, "last_token_logits": logits,
            "merged_delta_c_fc_0": delta, "padded_ids": padded, "labels": labels,
            "trajectory_losses": torch.tensor(losses, dtype=torch.float64),
            "last_token_logits_trained": cls.last_token_logits(model, examples, dtype)}


def write_adapter(directory, model):
    os.makedirs(directory, exist_ok=True)
    cls.write_json(os.path.join(directory, "adapter_config.json"), ADAPTER_CONFIG)
    write_safetensors(os.path.join(directory, "adapter_model.safetensors"),
                      [(k, "F32", v.numpy()) for k, v in peft_tensors(model)])


def main():
    book = cls.load_book()
    print("book package:", book.path)
    examples = cls.make_examples()
    examples_path = os.path.join(CLASSIFIER, "examples.json")
    if not os.path.exists(examples_path):
        sys.exit("run reference/make_classifier_fixture.py first")
    with open(examples_path) as f:
        assert json.load(f) == examples, "classifier/examples.json is not this script's examples"
    base, _ = read_safetensors(os.path.join(CLASSIFIER, "initial", "model.safetensors"))
    base = {k: torch.from_numpy(v) for k, (_, v) in base.items()}
    rebuilt = dict(cls.hf_tensors(cls.build_initial_classifier(book)))
    assert rebuilt.keys() == base.keys() and all(torch.equal(rebuilt[k], base[k]) for k in base), \
        "the rebuilt initial classifier differs from classifier/initial/model.safetensors"

    with tempfile.TemporaryDirectory() as tmp:
        dataset, loader = cls.book_loader(book, examples[:N_TRAIN], tmp, "train")
        assert dataset.max_length == max(cls.LENGTHS)
        r = run(book, examples, loader, torch.float32)
        r64 = run(book, examples, loader, torch.float64)
    assert abs(r["scaling"] - ALPHA / RANK) < 1e-6, \
        f"the book's LoRALayer scales by {r['scaling']}, not alpha / rank = {ALPHA / RANK}: update the docstring " \
        "and adapter_config.json (PEFT scales by lora_alpha / r)"
    scaling = ALPHA / RANK

    initial, trained = r["initial"], r["trained"]
    trainable = sum(p.numel() for p in initial.parameters() if p.requires_grad)
    total = sum(p.numel() for p in initial.parameters())
    expected = 2 * RANK * ((32 + 32) + (32 + 128) + (128 + 32)) + 2 * 32
    assert trainable == expected, (trainable, expected)
    print(f"trainable parameters {trainable} of {total}")

    # The PEFT export reproduces the book's adapted model (unpadded last token = padded batch at len-1).
    padded10 = torch.tensor([e["ids"] + [cls.PAD] * (max(cls.LENGTHS) - len(e["ids"])) for e in examples])
    for model, key in ((initial, "last_token_logits"), (trained, "last_token_logits_trained")):
        adapter = dict(peft_tensors(model))
        logits = peft_forward_float64(base, adapter, padded10, scaling)
        gathered = torch.stack([logits[i, n - 1] for i, n in enumerate(cls.LENGTHS)])
        assert (gathered - r[key].double()).abs().max() < 1e-5, key
    # The base stays frozen through training.
    for (name, p0), (_, p1) in zip(initial.named_parameters(), trained.named_parameters()):
        moved = not torch.equal(p0, p1)
        assert moved == (".lora." in name or name.startswith("out_head.")), name

    write_adapter(os.path.join(OUT, "adapter"), initial)
    write_adapter(os.path.join(OUT, "trained"), trained)
    f32, i64 = cls.f32, cls.i64
    write_safetensors(os.path.join(OUT, "reference.safetensors"), [
        ("scaling",) + f32(torch.tensor(scaling)),
        ("last_token_logits",) + f32(r["last_token_logits"]),
        ("merged_delta_c_fc_0",) + f32(r["merged_delta_c_fc_0"]),
        ("padded_ids",) + i64(r["padded_ids"]),
        ("labels",) + i64(r["labels"]),
        ("trajectory_losses",) + f32(r["trajectory_losses"]),
        ("last_token_logits_trained",) + f32(r["last_token_logits_trained"]),
    ])
    classifier_ref, _ = read_safetensors(os.path.join(CLASSIFIER, "reference.safetensors"))
    assert np.array_equal(classifier_ref["padded_ids"][1][:N_TRAIN], r["padded_ids"].numpy())

    print("trajectory_losses", [round(x, 6) for x in r["trajectory_losses"].tolist()])
    print("float32 vs float64, largest absolute differences:")
    for key in ("last_token_logits", "merged_delta_c_fc_0", "trajectory_losses", "last_token_logits_trained"):
        print(f"  {key:26s} {(r[key].double() - r64[key]).abs().max().item():.3g}")
    a32, a64 = dict(peft_tensors(trained)), dict(peft_tensors(r64["trained"]))
    print(f"  {'trained adapter tensors':26s} {max((a32[k] - a64[k]).abs().max().item() for k in a32):.3g}"
          "  (float64 run's tensors rounded to float32)")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
