"""Reads a run folder prepared by gpt (RUN/torchrun) with gpt_run.py and checks it against what gpt says it wrote.

    python3 scale/test_formats.py RUN/torchrun EXPECTED.json

EXPECTED.json (written by the F# test DistributedTests): the training and validation ids, the batch order of every
epoch, the training options and counts. Needs only Python 3 (no PyTorch, no numpy): the F# test runs it wherever a
python3 is found. Prints one line per check and exits 1 on the first failure.
"""
import hashlib
import json
import os
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpt_run  # noqa: E402


def check(condition, message):
    if not condition:
        print(f"FAILED: {message}")
        sys.exit(1)
    print(f"ok: {message}")


def main(folder, expected_path):
    with open(expected_path, encoding="utf-8") as f:
        expected = json.load(f)
    options = gpt_run.read_options(os.path.join(folder, "options.json"))
    check(options["run_directory"] == os.path.normpath(expected["run_directory"]),
          f"run_directory resolves to {options['run_directory']}")
    check(options["total_steps"] == expected["total_steps"], f"total_steps {options['total_steps']}")
    check(options["stop_file"] == os.path.join(folder, "STOP"), "the stop file is in the torchrun folder")
    check(options["model"]["initial_weights"] == os.path.join(folder, "init") and options["model"]["resume_from"] is None,
          "a new run starts from init/")
    training = options["training"]
    for key, value in expected["training"].items():
        check(training[key] == value, f"training.{key} = {value!r}")
    config = options["model_configuration"]
    for key, value in expected["model_configuration"].items():
        check(config[key] == value, f"model_configuration.{key} = {value!r}")

    data = options["data"]
    for split in ("train", "validation"):
        tokens = gpt_run.read_split(options, split)
        check(list(tokens) == expected[split], f"{split}: {len(tokens)} tokens over {len(data[split]['shards'])} shard(s), id for id")
        windows = gpt_run.window_count(len(tokens), training["context_length"], training["stride"])
        check(windows == data[split]["windows"], f"{split}: {windows} windows")
    ids = gpt_run.read_split(options, "train")
    fingerprint = hashlib.sha256(struct.pack(f"<{len(ids)}i", *ids)).hexdigest()
    check(fingerprint == data["train"]["fingerprint"], "the training fingerprint is the SHA-256 of the ids as int32")

    indices, (epochs, per_epoch, batch_size) = gpt_run.read_order(data["order"])
    check((epochs, per_epoch, batch_size) == (len(expected["order"]), data["batches_per_epoch"], training["batch_size"]),
          f"order: {epochs} epochs x {per_epoch} batches x {batch_size}")
    flat = [i for epoch in expected["order"] for batch in epoch for i in batch]
    check(list(indices) == flat, "order: every window index of every batch")

    header, metadata, _start = gpt_run.safetensors_header(os.path.join(folder, "init", "model.safetensors"))
    width = config["n_embd"]
    check(header["h.0.attn.c_attn.weight"]["shape"] == [width, 3 * width], "init/: Conv1D weights [in, out] (Hugging Face)")
    check(header["wte.weight"]["shape"] == [config["vocab_size"], width], "init/: wte [vocab, width]")

    bad = os.path.join(folder, "bad-shard.bin")
    with open(os.path.join(folder, data["train"]["shards"][0]), "rb") as f:
        truncated = f.read()[:-1]
    with open(bad, "wb") as f:
        f.write(truncated)
    try:
        gpt_run.shard_info(bad)
        check(False, "a truncated shard is refused")
    except gpt_run.FormatError as e:
        check("expected" in str(e), f"a truncated shard is refused: {e}")
    finally:
        os.remove(bad)
    print("all checks passed")


if __name__ == "__main__":
    main(*sys.argv[1:])
