"""The files `gpt train --engine torchrun` prepares, read without PyTorch (standard library only).

A prepared run is a folder RUN/torchrun/ beside the run's checkpoints/, metrics.jsonl and model/:

    options.json       what to train and how (this module's read_options checks it)
    train-NNNNN.bin    the training split's tokens, in order, cut into shards
    val-NNNNN.bin      the validation split's tokens
    order.bin          the window indices of every training batch of every epoch (gpt's seeded shuffle)
    init/              the model to start from, Hugging Face layout (config.json + model.safetensors); fresh runs only
    train.py           the torchrun script; gpt_run.py, this module

Token shard (little-endian):

    offset  size  field
    0       8     magic b"GPTTOKS\\0"
    8       4     version (1)
    12      4     header bytes (32): the tokens start here
    16      4     bytes per token (2: unsigned 16-bit ids, GPT-2's 50,257 fit)
    20      4     reserved (0)
    24      8     token count
    32      ...   the tokens

Batch order (little-endian):

    0       8     magic b"GPTORDER"
    8       4     version (1)
    12      4     header bytes (32)
    16      4     epochs
    20      4     batches per epoch
    24      4     batch size (the global batch: every process reads its share of each row)
    28      4     reserved (0)
    32      ...   epochs x batches per epoch x batch size int32 window indices

A window i of a split is tokens[i * stride : i * stride + context_length] as input and the same shifted by one as
target, exactly as gpt's Dataset makes it.
"""
import array
import json
import os
import struct
import sys

SHARD_MAGIC = b"GPTTOKS\0"
ORDER_MAGIC = b"GPTORDER"
HEADER_BYTES = 32
FORMAT_VERSION = 1
OPTIONS_FORMAT = "gpt-torchrun-run"


class FormatError(Exception):
    """A prepared file that is not what gpt writes; the message names the file."""


def _read_header(path, magic, fields):
    with open(path, "rb") as f:
        header = f.read(HEADER_BYTES)
    if len(header) < HEADER_BYTES:
        raise FormatError(f"{path}: {len(header)} bytes, shorter than the {HEADER_BYTES}-byte header")
    if header[:8] != magic:
        raise FormatError(f"{path}: magic {header[:8]!r}, expected {magic!r}")
    version, header_bytes = struct.unpack_from("<II", header, 8)
    if version != FORMAT_VERSION:
        raise FormatError(f"{path}: format version {version}, this script reads version {FORMAT_VERSION}")
    if header_bytes != HEADER_BYTES:
        raise FormatError(f"{path}: header of {header_bytes} bytes, expected {HEADER_BYTES}")
    return struct.unpack_from(fields, header, 16)


def shard_info(path):
    """(offset of the first token, token count) of a token shard, checked against the file's size."""
    token_bytes, _reserved, count = _read_header(path, SHARD_MAGIC, "<IIQ")
    if token_bytes != 2:
        raise FormatError(f"{path}: {token_bytes} bytes per token, this script reads 2")
    expected = HEADER_BYTES + 2 * count
    size = os.path.getsize(path)
    if size != expected:
        raise FormatError(f"{path}: {size} bytes, expected {expected} for {count} tokens")
    return HEADER_BYTES, count


def read_shard(path):
    """A shard's tokens as an array of unsigned 16-bit ints (native order)."""
    offset, count = shard_info(path)
    tokens = array.array("H")
    with open(path, "rb") as f:
        f.seek(offset)
        tokens.fromfile(f, count)
    if sys.byteorder == "big":
        tokens.byteswap()
    return tokens


def order_info(path):
    """(epochs, batches per epoch, batch size) of a batch-order file, checked against the file's size."""
    epochs, per_epoch, batch_size, _reserved = _read_header(path, ORDER_MAGIC, "<IIII")
    expected = HEADER_BYTES + 4 * epochs * per_epoch * batch_size
    size = os.path.getsize(path)
    if size != expected:
        raise FormatError(f"{path}: {size} bytes, expected {expected} for {epochs} epochs x {per_epoch} batches x {batch_size}")
    return epochs, per_epoch, batch_size


def read_order(path):
    """The batch order as a flat array of int32 window indices and its (epochs, batches per epoch, batch size):
    batch b of epoch e is [(e * per_epoch + b) * batch_size : ... + batch_size]."""
    epochs, per_epoch, batch_size = order_info(path)
    indices = array.array("i")
    with open(path, "rb") as f:
        f.seek(HEADER_BYTES)
        indices.fromfile(f, epochs * per_epoch * batch_size)
    if sys.byteorder == "big":
        indices.byteswap()
    return indices, (epochs, per_epoch, batch_size)


def window_count(tokens, context_length, stride):
    """Windows of context_length + 1 tokens starting every stride tokens (gpt's Dataset.windowCount)."""
    return 0 if tokens <= context_length else (tokens - context_length + stride - 1) // stride


def _require(condition, path, message):
    if not condition:
        raise FormatError(f"{path}: {message}")


def read_options(path):
    """options.json, checked, with every file path made absolute (they are stored relative to its folder)."""
    with open(path, encoding="utf-8") as f:
        options = json.load(f)
    _require(isinstance(options, dict), path, "not a JSON object")
    _require(options.get("format") == OPTIONS_FORMAT, path, f"format {options.get('format')!r}, expected {OPTIONS_FORMAT!r}")
    _require(options.get("version") == FORMAT_VERSION, path,
             f"version {options.get('version')!r}, this script reads version {FORMAT_VERSION}")
    for key in ("run_directory", "model", "data", "training", "model_configuration", "distributed", "total_steps"):
        _require(key in options, path, f"'{key}' is missing")
    folder = os.path.dirname(os.path.abspath(path))

    def resolve(relative):
        return None if relative is None else os.path.normpath(os.path.join(folder, relative))

    options["folder"] = folder
    options["run_directory"] = resolve(options["run_directory"])
    options["stop_file"] = resolve(options.get("stop_file", "STOP"))
    model = options["model"]
    model["initial_weights"] = resolve(model.get("initial_weights"))
    model["resume_from"] = resolve(model.get("resume_from"))
    _require((model["initial_weights"] is None) != (model["resume_from"] is None), path,
             "exactly one of model.initial_weights and model.resume_from must be set")
    data = options["data"]
    for split in ("train", "validation"):
        _require(split in data, path, f"data.{split} is missing")
        data[split]["shards"] = [resolve(s) for s in data[split]["shards"]]
    data["order"] = resolve(data["order"])
    training = options["training"]
    for key in ("batch_size", "context_length", "stride", "epochs", "learning_rate", "initial_learning_rate",
                "min_learning_rate", "warmup_steps", "weight_decay", "decay_all", "beta1", "beta2", "gradient_clip",
                "gradient_accumulation", "eval_interval", "eval_batches", "seed", "checkpoint_interval", "keep_last"):
        _require(key in training, path, f"training.{key} is missing")
    return options


def read_split(options, split):
    """A split's tokens, every shard in order, as one array."""
    tokens = array.array("H")
    for shard in options["data"][split]["shards"]:
        tokens.extend(read_shard(shard))
    expected = options["data"][split]["tokens"]
    if len(tokens) != expected:
        raise FormatError(f"{split} shards hold {len(tokens)} tokens, options.json says {expected}")
    return tokens


# ---- safetensors headers (the data itself is read by train.py into tensors) ----

def safetensors_header(path):
    """(entries {name: {"dtype", "shape", "data_offsets"}}, metadata, data start) of a safetensors file."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        _require(len(prefix) == 8, path, "shorter than the 8-byte header length")
        (length,) = struct.unpack("<Q", prefix)
        _require(length <= 100_000_000, path, f"header length {length} exceeds 100 MB")
        header = json.loads(f.read(length).decode("utf-8"))
    metadata = header.pop("__metadata__", None)
    return header, metadata, 8 + length
