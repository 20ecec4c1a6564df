"""Checks that a model saved by Gpt (`gpt init ... --out DIR`, or a trained `runs/<name>/model`) is read by an
independent implementation exactly as Gpt reads it: the reference forward pass of make_tiny_gpt2.py, fed from our
config.json and model.safetensors, must give the logits `gpt logits` printed.

    gpt init --config gpt2-small --layers 2 --emb-dim 64 --heads 4 --context-length 32 --seed 3 --out /tmp/exported
    gpt logits --model /tmp/exported --ids 15496,11,995 --ids 1,2,3 > /tmp/exported-logits.json
    /usr/bin/python3 -B reference/check_export.py /tmp/exported /tmp/exported-logits.json "15496,11,995" "1,2,3"

Needs Debian's python3-torch and python3-numpy. Prints the largest difference and exits 1 above 1e-4.
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_tiny_gpt2 import forward, read_safetensors  # noqa: E402


def main(directory, logits_path, *sequences):
    with open(os.path.join(directory, "config.json")) as f:
        cfg = json.load(f)
    tensors, meta = read_safetensors(os.path.join(directory, "model.safetensors"))
    assert meta is None or meta.get("format") == "pt", meta
    params = {name: torch.from_numpy(array.astype("float64")) for name, (_dtype, array) in tensors.items()}
    assert "lm_head.weight" not in params or torch.equal(params["lm_head.weight"], params["wte.weight"]), \
        "this check covers tied heads only"
    ids = [[int(x) for x in s.split(",")] for s in sequences]
    expected = forward(params, ids, cfg)
    with open(logits_path) as f:
        ours = torch.tensor(json.load(f)["logits"], dtype=torch.float64)
    assert ours.shape == expected.shape, (ours.shape, expected.shape)
    difference = (ours - expected).abs().max().item()
    print(f"config: n_layer={cfg['n_layer']} n_embd={cfg['n_embd']} n_head={cfg['n_head']} "
          f"n_positions={cfg['n_positions']} vocab_size={cfg['vocab_size']}; tensors: {len(tensors)}")
    print(f"max |gpt logits - reference| = {difference:.3g}")
    sys.exit(0 if difference < 1e-4 else 1)


if __name__ == "__main__":
    main(*sys.argv[1:])
