"""Trains a run prepared by `gpt train --engine torchrun` with PyTorch's distributed data parallelism, and writes back
what `gpt` writes: metrics.jsonl, checkpoints in gpt's format (model.safetensors under gpt's state_dict names,
optimizer.safetensors with AdamW's moments, checkpoint.json), and the final model in the Hugging Face layout.

    torchrun --nproc_per_node N [--nnodes M --node_rank R --master_addr A --master_port P] \
        RUN/torchrun/train.py --options RUN/torchrun/options.json [--events]

`gpt` prints the exact command (`--dry-run`) and runs it itself otherwise. The meaning of every option is gpt train's:

- the batch size is the global batch: each of the world's processes takes its equal share of every batch's rows, and
  DDP averages their gradients, which equals the gradient of the whole batch's mean loss;
- the batches are gpt's (order.bin: the seeded shuffle of every epoch), gradient accumulation sums micro-batches;
- AdamW in two groups (decay on matrices only, unless decay_all), PyTorch's update being gpt's operation for operation;
- learning rate: linear warmup from the initial rate, then a cosine decay to the minimum (a function of the step);
- clipping of the global gradient norm; evaluation on the first eval_batches batches of each split in order, at the
  first step, every eval_interval steps, at the last and with every checkpoint; a greedy sample at each epoch end.

Dropout is the one thing that cannot match `gpt train` step for step: PyTorch's generator and libtorch's in gpt draw
differently, and here each process draws its own masks. With a drop rate of 0 both engines compute the same run.

--strategy fsdp in options.json shards the model with FullyShardedDataParallel (PyTorch 2.1 or later).
A file STOP in this folder (gpt writes it on Ctrl+C), SIGTERM or SIGINT stops every process after the current step
with a checkpoint and the model so far.
"""
import argparse
import base64
import bisect
import contextlib
import datetime
import hashlib
import json
import math
import os
import shutil
import signal
import struct
import sys
import time
import traceback
import uuid

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpt_run  # noqa: E402

CHECKPOINT_FORMAT = "gpt-training-checkpoint"
CHECKPOINT_VERSION = 1
CONV1D_SUFFIXES = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


# ---- the model: GPT-2 under gpt's state_dict names (nn.Linear layout, [out, in]) ----

class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        width = cfg["n_embd"]
        self.heads = cfg["n_head"]
        self.drop_rate = cfg["resid_pdrop"]
        self.c_attn = nn.Linear(width, 3 * width, bias=cfg["qkv_bias"])
        self.c_proj = nn.Linear(width, width)

    def forward(self, x):
        batch, length, width = x.shape
        q, k, v = self.c_attn(x).split(width, dim=2)
        q, k, v = (z.view(batch, length, self.heads, width // self.heads).transpose(1, 2) for z in (q, k, v))  # (B, nh, T, hs)
        p = self.drop_rate if self.training else 0.0
        if hasattr(F, "scaled_dot_product_attention"):
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:  # PyTorch 1.x
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.shape[-1]))  # (B, nh, T, T)
            visible = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
            weights = F.dropout(F.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1), p, self.training)
            y = weights @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(batch, length, width))


class Mlp(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2's tanh GELU, as gpt's


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.drop_rate = cfg["resid_pdrop"]
        self.ln_1 = nn.LayerNorm(cfg["n_embd"], eps=cfg["layer_norm_epsilon"])
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg["n_embd"], eps=cfg["layer_norm_epsilon"])
        self.mlp = Mlp(cfg["n_embd"])

    def forward(self, x):
        x = x + F.dropout(self.attn(self.ln_1(x)), self.drop_rate, self.training)
        return x + F.dropout(self.mlp(self.ln_2(x)), self.drop_rate, self.training)


class Gpt(nn.Module):
    """A tied head has no parameter of its own: the logits multiply by wte's weight (as in gpt)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg["vocab_size"], cfg["n_embd"])
        self.wpe = nn.Embedding(cfg["n_positions"], cfg["n_embd"])
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg["n_layer"]))
        self.ln_f = nn.LayerNorm(cfg["n_embd"], eps=cfg["layer_norm_epsilon"])
        if not cfg["tie_word_embeddings"]:
            self.lm_head = nn.Linear(cfg["n_embd"], cfg["vocab_size"], bias=False)

    def forward(self, ids, targets=None):
        """ids (B, T) -> logits (B, T, vocab), or the mean next-token cross-entropy against targets (B, T)."""
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = F.dropout(self.wte(ids) + self.wpe(positions), self.cfg["resid_pdrop"], self.training)
        for block in self.h:
            x = block(x)
        x = self.ln_f(x)
        logits = F.linear(x, self.wte.weight) if self.cfg["tie_word_embeddings"] else self.lm_head(x)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


def model_config(configuration):
    """The settings the model needs from a config.json object, with gpt's defaults."""
    cfg = dict(configuration)
    cfg.setdefault("n_positions", cfg.get("n_ctx"))
    cfg.setdefault("resid_pdrop", 0.1)
    cfg.setdefault("qkv_bias", True)
    cfg.setdefault("tie_word_embeddings", True)
    cfg.setdefault("layer_norm_epsilon", 1e-5)
    return cfg


# ---- safetensors ----

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8}


def read_safetensors(path):
    header, _metadata, start = gpt_run.safetensors_header(path)
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read()
    tensors = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        raw = torch.frombuffer(bytearray(data[begin:end]), dtype=torch.uint8) if end > begin else torch.empty(0, dtype=torch.uint8)
        tensors[name] = raw.view(DTYPES[entry["dtype"]]).reshape(entry["shape"]).clone()
    return tensors


def write_safetensors(path, tensors):
    """Writes tensors (float32, in the order given) as safetensors, data packed with no gap (gpt's reader checks)."""
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64", torch.int64: "I64"}
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, tensor in tensors:
        tensor = tensor.detach().cpu().contiguous()
        blob = tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        header[name] = {"dtype": names[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)
        f.flush()
        os.fsync(f.fileno())


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_hugging_face(directory, cfg):
    """A model folder in the Hugging Face layout as gpt's state_dict: Conv1D weights [in, out] transposed, the
    zero c_attn biases of a model without QKV bias and a tied head's copy of wte left out."""
    state = {}
    for name, tensor in read_safetensors(os.path.join(directory, "model.safetensors")).items():
        name = name[len("transformer."):] if name.startswith("transformer.") else name
        parts = name.split(".")
        if len(parts) == 4 and parts[0] == "h" and parts[2] == "attn" and parts[3] in ("bias", "masked_bias"):
            continue  # old causal-mask buffers
        if name.endswith(".attn.c_attn.bias") and not cfg["qkv_bias"]:
            continue
        if name == "lm_head.weight" and cfg["tie_word_embeddings"]:
            continue
        state[name] = (tensor.t() if name.endswith(CONV1D_SUFFIXES) else tensor).float().contiguous()
    return state


def hugging_face_tensors(state, cfg):
    """gpt's Pretrained.toTensors: Conv1D weights transposed; zero c_attn biases when the model has none."""
    for name, tensor in state.items():
        yield name, (tensor.t().contiguous() if name.endswith(CONV1D_SUFFIXES) else tensor)
        if not cfg["qkv_bias"] and name.endswith(".attn.c_attn.weight"):
            yield name.replace(".weight", ".bias"), torch.zeros(3 * cfg["n_embd"], dtype=tensor.dtype)


# ---- data ----

class TokenStream:
    """A split's tokens over its shards (memory-mapped), read window by window."""

    def __init__(self, shards, context_length, stride):
        self.parts, self.starts, total = [], [], 0
        for shard in shards:
            offset, count = gpt_run.shard_info(shard)
            self.parts.append(np.memmap(shard, dtype="<u2", mode="r", offset=offset, shape=(count,)))
            self.starts.append(total)
            total += count
        self.tokens, self.context_length, self.stride = total, context_length, stride
        self.windows = gpt_run.window_count(total, context_length, stride)

    def span(self, start, length):
        """Tokens start .. start + length - 1, across shard boundaries."""
        part = bisect.bisect_right(self.starts, start) - 1
        pieces = []
        while length > 0:
            offset = start - self.starts[part]
            take = min(len(self.parts[part]) - offset, length)
            pieces.append(self.parts[part][offset:offset + take])
            start, length, part = start + take, length - take, part + 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def batch(self, windows, device):
        """Inputs and targets (len(windows), T) int64 of windows by index (gpt's Dataset.toTensors)."""
        rows = np.stack([self.span(int(w) * self.stride, self.context_length + 1) for w in windows]).astype(np.int64)
        tensor = torch.from_numpy(rows).to(device)
        return tensor[:, :-1], tensor[:, 1:]


def learning_rate(training, total_steps, step):
    """gpt's Schedule.learningRate: linear warmup from the initial rate to the peak, then a cosine decay to the
    minimum by the last step."""
    initial, peak, minimum = training["initial_learning_rate"], training["learning_rate"], training["min_learning_rate"]
    warmup = training["warmup_steps"]
    if step < warmup:
        return initial + float(step) * ((peak - initial) / float(warmup))
    decay_steps = total_steps - warmup
    progress = 1.0 if decay_steps <= 0 else min(1.0, float(step - warmup) / float(decay_steps))
    return minimum + (peak - minimum) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---- output: events, metrics, checkpoints ----

def finite(value):
    return value if value is not None and math.isfinite(value) else None


class Reporter:
    """What rank 0 tells gpt (one `GPT_EVENT {json}` line per event with --events) or a person (plain lines)."""

    def __init__(self, events, active):
        self.events, self.active = events, active

    def __call__(self, event, **fields):
        if not self.active:
            return
        if self.events:
            print("GPT_EVENT " + json.dumps({"event": event, **fields}, separators=(",", ":")), flush=True)
        elif event == "step":
            print(f"step {fields['step']}/{fields['total_steps']}  loss {fields['loss']:.4f}  lr {fields['lr']:.2e}  "
                  f"{fields['tokens_per_s']:.0f} tok/s", flush=True)
        elif event == "evaluation":
            print(f"step {fields['step']}: train loss {fields['train_loss']}, val loss {fields['val_loss']}", flush=True)
        elif event in ("checkpoint", "model"):
            print(f"{event}: {fields['path']}", flush=True)
        elif event == "finished":
            print(f"finished at step {fields['steps']} of {fields['total_steps']}" + (" (stopped)" if fields["cancelled"] else ""), flush=True)


def metrics_line(record):
    """gpt's Metrics.toJson: snake_case, non-finite numbers as null."""
    keys = ("step", "epoch", "tokens_seen", "train_loss", "val_loss", "lr", "elapsed_s", "tokens_per_s")
    return json.dumps({k: (finite(record[k]) if isinstance(record[k], float) else record[k]) for k in keys}, separators=(",", ":"))


def append_metrics(path, record):
    with open(path, "a", encoding="utf-8") as f:
        f.write(metrics_line(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def keep_metrics_until(path, step):
    """A resumed run drops the log lines of evaluations after its checkpoint (they will be made again)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = [line for line in text.split("\n")[:-1] if line.strip() and json.loads(line)["step"] <= step]
    temporary = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
    os.replace(temporary, path)


def read_checkpoint(directory, check_hashes):
    path = os.path.join(directory, "checkpoint.json")
    with open(path, encoding="utf-8") as f:
        document = json.load(f)
    if document.get("format") != CHECKPOINT_FORMAT or document.get("version") != CHECKPOINT_VERSION:
        raise gpt_run.FormatError(f"{path}: not a gpt training checkpoint of version {CHECKPOINT_VERSION}")
    for name, entry in document["files"].items():
        file = os.path.join(directory, name)
        if not os.path.exists(file) or os.path.getsize(file) != entry["bytes"]:
            raise gpt_run.FormatError(f"{directory}: {name} is missing or has not {entry['bytes']} bytes")
        if check_hashes and sha256(file) != entry["sha256"]:
            raise gpt_run.FormatError(f"{directory}: {name} does not match its recorded SHA-256")
    return document


def complete_checkpoints(root):
    """(step, validation loss, directory) of the complete checkpoints under root, oldest first (gpt's Checkpoint.list)."""
    found = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        directory = os.path.join(root, name)
        if name.startswith("step-") and os.path.isdir(directory):
            try:
                document = read_checkpoint(directory, False)
            except (OSError, ValueError, KeyError, gpt_run.FormatError):
                continue
            found.append((document["step"], document.get("validation_loss"), directory))
    return sorted(found, key=lambda c: c[0])


def prune(root, keep_last):
    """Keeps the last keep_last checkpoints and the best by validation loss; removes unfinished saves."""
    for name in os.listdir(root):
        if name.startswith(".tmp-"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    complete = complete_checkpoints(root)
    keep = {c[2] for c in complete[max(0, len(complete) - keep_last):]}
    scored = sorted((c for c in complete if c[1] is not None), key=lambda c: c[1])
    if scored:
        keep.add(scored[0][2])
    for _step, _loss, directory in complete:
        if directory not in keep:
            shutil.rmtree(directory)


def save_checkpoint(root, keep_last, state, model_state, moments, groups, steps, rng_states):
    """gpt's Checkpoint.save: a temporary folder, checkpoint.json last, renamed into place; then pruning."""
    os.makedirs(root, exist_ok=True)
    name = f"step-{state['step']:08d}"
    final = os.path.join(root, name)
    temporary = os.path.join(root, f".tmp-{name}-{uuid.uuid4().hex}")
    os.makedirs(temporary)
    try:
        write_safetensors(os.path.join(temporary, "model.safetensors"), list(model_state.items()))
        write_safetensors(os.path.join(temporary, "optimizer.safetensors"), moments)
        document = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                    "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat()}
        document.update(state)
        document["model_tensors"] = "all"
        document["torch_rng_state"] = rng_states[0]
        document["optimizer"] = {"type": "AdamW", "groups": [
            {"weight_decay": g["weight_decay"], "lr": g["lr"], "beta1": g["beta1"], "beta2": g["beta2"], "eps": g["eps"],
             "steps": {n: steps[n] for n in g["names"]}} for g in groups]}
        document["files"] = {f: {"bytes": os.path.getsize(os.path.join(temporary, f)), "sha256": sha256(os.path.join(temporary, f))}
                             for f in ("model.safetensors", "optimizer.safetensors")}
        # Beyond gpt's reader: who wrote it, and every process's generator (a torchrun resume restores each).
        document["engine"] = "torchrun"
        document["torch_rng_states"] = rng_states
        with open(os.path.join(temporary, "checkpoint.json"), "w", encoding="utf-8") as f:
            json.dump(document, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(final):  # the same step saved again (a stop right after a periodic save)
            old = os.path.join(root, f".tmp-old-{name}-{uuid.uuid4().hex}")
            os.rename(final, old)
            os.rename(temporary, final)
            shutil.rmtree(old)
        else:
            os.rename(temporary, final)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    prune(root, keep_last)
    return final


def save_model(directory, state, cfg, config_text):
    """The final model in the Hugging Face layout (config.json + model.safetensors), written atomically."""
    def write_into(folder):
        write_safetensors(os.path.join(folder, "model.safetensors.tmp"), list(hugging_face_tensors(state, cfg)))
        with open(os.path.join(folder, "config.json.tmp"), "w", encoding="utf-8") as f:
            f.write(config_text)
        os.replace(os.path.join(folder, "model.safetensors.tmp"), os.path.join(folder, "model.safetensors"))
        os.replace(os.path.join(folder, "config.json.tmp"), os.path.join(folder, "config.json"))

    if os.path.isdir(directory):
        write_into(directory)
    else:
        temporary = f"{directory}.tmp-{uuid.uuid4().hex}"
        os.makedirs(temporary)
        write_into(temporary)
        os.rename(temporary, directory)


# ---- the run ----

class Stop:
    """A stop asked for by a signal or the STOP file; every process stops after the same step."""

    def __init__(self, stop_file):
        self.stop_file, self.signalled = stop_file, False
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, self.handle)

    def handle(self, _number, _frame):
        self.signalled = True

    def requested(self, device):
        flag = torch.tensor([1.0 if self.signalled or os.path.exists(self.stop_file) else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0


def environment():
    """Rank, world size and device under torchrun; the process group started on NCCL (GPUs) or gloo (CPU)."""
    if "RANK" not in os.environ:
        raise SystemExit("train.py runs under torchrun (python -m torch.distributed.run): RANK and WORLD_SIZE are not set")
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))


def start_group(backend, local_rank):
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend)
    return backend, device


def wrap(model, strategy, device):
    """DDP (every process holds the whole model) or FSDP (each holds a shard of each block)."""
    if strategy == "ddp":
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from functools import partial
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    return FullyShardedDataParallel(
        model, auto_wrap_policy=partial(transformer_auto_wrap_policy, transformer_layer_cls={Block}),
        use_orig_params=True, device_id=device if device.type == "cuda" else None)


def clean(name):
    """A parameter's name as gpt has it, without the wrappers' prefixes."""
    name = name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
    return name[len("module."):] if name.startswith("module.") else name


class Engine:
    """The wrapped model, its AdamW and what a checkpoint needs, for DDP and FSDP alike."""

    def __init__(self, options, cfg, device, strategy):
        training = options["training"]
        self.options, self.cfg, self.device, self.strategy = options, cfg, device, strategy
        self.raw = Gpt(cfg)
        # Trainable parameters by gpt's names (a tied matrix once) and gpt's decay policy, decided on the unwrapped
        # model: FSDP flattens the shapes.
        named, seen = [], set()
        for name, parameter in self.raw.named_parameters():
            if id(parameter) not in seen:
                seen.add(id(parameter))
                named.append((name, parameter.dim()))
        self.names = [n for n, _ in named]
        decayed = [n for n, d in named if training["decay_all"] or d >= 2]
        undecayed = [n for n, d in named if not (training["decay_all"] or d >= 2)]
        self.group_names = [(g, decay) for g, decay in ((decayed, training["weight_decay"]), (undecayed, 0.0)) if g]
        self.load_weights()
        self.raw.to(device)
        self.model = wrap(self.raw, strategy, device)
        by_name = {clean(n): p for n, p in self.model.named_parameters()}
        self.parameters = [by_name[n] for n in self.names]
        self.optimizer = torch.optim.AdamW(
            [{"params": [by_name[n] for n in names], "weight_decay": decay} for names, decay in self.group_names],
            lr=training["learning_rate"], betas=(training["beta1"], training["beta2"]), eps=1e-8, foreach=False)

    def load_weights(self):
        model = self.options["model"]
        if model["resume_from"] is not None:
            state = read_safetensors(os.path.join(model["resume_from"], "model.safetensors"))
        else:
            state = read_hugging_face(model["initial_weights"], self.cfg)
        self.raw.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)

    def restore_optimizer(self, directory, document):
        """AdamW's moments and step counts from a gpt checkpoint (written by gpt or by this script)."""
        moments = read_safetensors(os.path.join(directory, "optimizer.safetensors"))
        steps = {n: c for g in document["optimizer"]["groups"] for n, c in g["steps"].items()}
        missing = [n for n in self.names if n not in steps or f"{n}.exp_avg" not in moments]
        if missing:
            raise gpt_run.FormatError(f"{directory}: no optimizer state for {', '.join(missing)}")
        state = {n: {"step": torch.tensor(float(steps[n])), "exp_avg": moments[f"{n}.exp_avg"].float(),
                     "exp_avg_sq": moments[f"{n}.exp_avg_sq"].float()} for n in self.names}
        if self.strategy == "ddp":
            for name, parameter in zip(self.names, self.parameters):
                self.optimizer.state[parameter] = {k: v.to(self.device) if k != "step" else v for k, v in state[name].items()}
        else:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, StateDictType
            groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": names}
                      for g, (names, _) in zip(self.optimizer.param_groups, self.group_names)]
            with FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT):
                loadable = FSDP.optim_state_dict_to_load(self.model, self.optimizer, {"state": state, "param_groups": groups})
            self.optimizer.load_state_dict(loadable)

    def snapshot(self, optimizer):
        """The model's state_dict (gpt's names) and, when asked, AdamW's moments by name and step counts, on rank 0
        (None elsewhere). Every process must call it (FSDP gathers the shards)."""
        if self.strategy == "ddp":
            if dist.get_rank() != 0:
                return None
            state = {k: v.detach().cpu() for k, v in self.raw.state_dict().items()}
            opt = {n: self.optimizer.state[p] for n, p in zip(self.names, self.parameters)} if optimizer else None
        else:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, StateDictType, FullStateDictConfig
            from torch.distributed.fsdp import FullOptimStateDictConfig
            with FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT,
                                      FullStateDictConfig(offload_to_cpu=True, rank0_only=True),
                                      FullOptimStateDictConfig(offload_to_cpu=True, rank0_only=True)):
                state = {clean(k): v for k, v in self.model.state_dict().items()}
                opt = {clean(k): v for k, v in FSDP.optim_state_dict(self.model, self.optimizer)["state"].items()} if optimizer else None
            if dist.get_rank() != 0:
                return None
        if opt is None:
            return state, None, None
        moments = [(f"{n}.{k}", opt[n][k].detach().cpu()) for n in self.names for k in ("exp_avg", "exp_avg_sq")]
        steps = {n: int(float(opt[n]["step"])) for n in self.names}
        return state, moments, steps

    def forward_model(self):
        """The model evaluation and samples run through: DDP's own module on rank 0 alone, FSDP's wrapper on all."""
        return self.raw if self.strategy == "ddp" else self.model


def evaluate(engine, stream, batch_size, batches):
    """The mean loss of the first `batches` batches of a split in order (the last may be short), eval mode."""
    model = engine.forward_model()
    model.eval()
    losses = []
    with torch.no_grad():
        for b in range(min(batches, -(-stream.windows // batch_size))):
            inputs, targets = stream.batch(range(b * batch_size, min((b + 1) * batch_size, stream.windows)), engine.device)
            losses.append(float(model(inputs, targets)))
    model.train()
    return sum(losses) / len(losses) if losses else float("nan")


def sample(engine, prompt, tokens, end_of_text):
    """Greedy continuation of the prompt ids (gpt's sample at each epoch end), the window sliding at the context."""
    model = engine.forward_model()
    model.eval()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(tokens):
            context = torch.tensor([ids[-engine.cfg["n_positions"]:]], device=engine.device)
            token = int(torch.argmax(model(context)[0, -1]))
            if token == end_of_text:
                break
            ids.append(token)
    model.train()
    return ids


class Session:
    """One run of the loop on one process, as gpt's Trainer makes it: a step (gpt's Trainer.step), then evaluation
    (first step, every eval_interval, the last, with every checkpoint), epoch ends with their samples, checkpoint."""

    def __init__(self, options, rank, world, device, strategy, report):
        self.options, self.rank, self.world, self.device, self.report = options, rank, world, device, report
        self.training, self.data = options["training"], options["data"]
        self.cfg = model_config(options["model_configuration"])
        training, data = self.training, self.data
        self.batch_size, self.accumulation = training["batch_size"], training["gradient_accumulation"]
        if self.batch_size % world:
            raise SystemExit(f"the batch size {self.batch_size} is the global batch: it must be divisible by the {world} processes")
        self.share = self.batch_size // world
        self.context_length = training["context_length"]
        self.train_stream = TokenStream(data["train"]["shards"], self.context_length, training["stride"])
        self.validation_stream = TokenStream(data["validation"]["shards"], self.context_length, training["stride"])
        indices, (epochs, self.per_epoch, batch) = gpt_run.read_order(data["order"])
        if batch != self.batch_size or self.per_epoch != data["batches_per_epoch"]:
            raise gpt_run.FormatError(f"{data['order']}: batches of {batch} x {self.per_epoch} per epoch, options.json says "
                                      f"{self.batch_size} x {data['batches_per_epoch']}")
        self.order = np.frombuffer(indices, dtype=np.int32).reshape(epochs, self.per_epoch, batch)
        self.total_steps = options["total_steps"]
        self.tokens_per_step = self.batch_size * self.context_length * self.accumulation
        self.checkpoints = os.path.join(options["run_directory"], "checkpoints")
        self.metrics = os.path.join(options["run_directory"], "metrics.jsonl")
        self.engine = Engine(options, self.cfg, device, strategy)
        self.evaluates = rank == 0 or strategy != "ddp"  # DDP: rank 0 alone; FSDP: every shard takes part
        self.step, self.best, self.previous_elapsed, self.last_loss = 0, None, 0.0, float("nan")
        self.last_saved, self.last_checkpoint = -1, None
        self.resume(options["model"]["resume_from"])
        self.start_step, self.clock = self.step, time.monotonic()

    def resume(self, directory):
        """A new run seeds dropout (each process its own masks); a resumed one restores what its checkpoint holds."""
        seed = self.training["seed"]
        if directory is None:
            torch.manual_seed(seed + self.rank)
            if self.rank == 0 and os.path.exists(self.metrics):
                os.remove(self.metrics)
            return
        document = read_checkpoint(directory, True)
        if document["data_fingerprint"] != self.data["train"]["fingerprint"]:
            raise gpt_run.FormatError(f"checkpoint {directory} was trained on other data")
        self.engine.restore_optimizer(directory, document)
        self.step, self.best, self.previous_elapsed = document["step"], document.get("best_validation_loss"), document["elapsed_s"]
        self.last_saved, self.last_checkpoint = self.step, directory
        states = document.get("torch_rng_states") or []
        state = states[self.rank] if len(states) == self.world else document["torch_rng_state"] if self.rank == 0 else None
        if state is not None:
            torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state)), dtype=torch.uint8))
        else:
            torch.manual_seed(seed + self.rank + 7919 * self.step)
        if self.rank == 0:
            keep_metrics_until(self.metrics, self.step)

    def elapsed(self):
        return self.previous_elapsed + (time.monotonic() - self.clock)

    def tokens_per_second(self):
        seconds = time.monotonic() - self.clock
        return (self.step - self.start_step) * self.tokens_per_step / seconds if seconds > 0 else 0.0

    def train_step(self):
        """Zero the gradients; each micro-batch's share of rows forward and backward (scaled by 1 / accumulation;
        DDP averages over the processes at the last); clip; update. The loss is the whole batch's mean."""
        engine, first_micro = self.engine, self.step * self.accumulation
        rate = learning_rate(self.training, self.total_steps, self.step)
        for group in engine.optimizer.param_groups:
            group["lr"] = rate
        engine.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(first_micro, first_micro + self.accumulation):
            rows = self.order[micro // self.per_epoch, micro % self.per_epoch, self.rank * self.share:(self.rank + 1) * self.share]
            inputs, targets = self.train_stream.batch(rows, self.device)
            last = micro == first_micro + self.accumulation - 1
            with contextlib.nullcontext() if last else engine.model.no_sync():
                loss = engine.model(inputs, targets)
                (loss / self.accumulation if self.accumulation > 1 else loss).backward()
            loss_sum += loss.detach()
        dist.all_reduce(loss_sum)  # the processes' shares are equal: the mean of their means is the batch's
        total = float(loss_sum)
        if not math.isfinite(total):  # as the F# trainer: stop before the update (every process sees the same sum)
            raise SystemExit(f"step {self.step + 1} of {self.total_steps}: the training loss is {'NaN' if math.isnan(total) else 'infinite'}: "
                             "the weights diverged (or held NaN already); this step was not applied. "
                             "Lower the learning rate (--lr) or clip the gradients (--grad-clip)")
        clip, norm = self.training["gradient_clip"], None
        if clip is not None:
            norm = float(engine.model.clip_grad_norm_(clip) if engine.strategy == "fsdp"
                         else torch.nn.utils.clip_grad_norm_(engine.parameters, clip))
        engine.optimizer.step()
        self.step += 1
        self.last_loss = total / self.world / self.accumulation
        epoch = (first_micro + self.accumulation - 1) // self.per_epoch + 1
        per_step = (time.monotonic() - self.clock) / (self.step - self.start_step)
        self.report("step", step=self.step, total_steps=self.total_steps, epoch=epoch, epochs=self.training["epochs"],
                    loss=finite(self.last_loss), lr=rate, grad_norm=finite(norm), tokens_seen=self.step * self.tokens_per_step,
                    tokens_per_s=self.tokens_per_second(), elapsed_s=self.elapsed(), remaining_s=per_step * (self.total_steps - self.step))
        return first_micro, epoch, rate

    def evaluate_splits(self, epoch, rate):
        batches = self.training["eval_batches"]
        if self.evaluates:
            train_loss = evaluate(self.engine, self.train_stream, self.batch_size, batches)
            validation_loss = evaluate(self.engine, self.validation_stream, self.batch_size, batches)
        else:
            train_loss = validation_loss = float("nan")
        record = {"step": self.step, "epoch": epoch, "tokens_seen": self.step * self.tokens_per_step, "train_loss": train_loss,
                  "val_loss": validation_loss, "lr": rate, "elapsed_s": self.elapsed(), "tokens_per_s": self.tokens_per_second()}
        if self.rank == 0:
            append_metrics(self.metrics, record)
            self.report("evaluation", **json.loads(metrics_line(record)))
        if math.isfinite(validation_loss) and (self.best is None or validation_loss < self.best):
            self.best = validation_loss
        return validation_loss

    def epoch_ends(self, first_micro):
        prompt, tokens = self.data.get("sample_prompt_ids"), self.training.get("sample_tokens", 0)
        for micro in range(first_micro, first_micro + self.accumulation):
            if (micro + 1) % self.per_epoch == 0:
                ids = sample(self.engine, prompt, tokens, self.data.get("end_of_text_id")) if prompt and tokens > 0 and self.evaluates else None
                self.report("epoch_end", epoch=micro // self.per_epoch + 1, sample_ids=ids)

    def checkpoint(self, validation_loss):
        """gpt's checkpoint of the state after this step (every process takes part; rank 0 writes)."""
        snapshot = self.engine.snapshot(optimizer=True)
        rng = [None] * self.world
        dist.all_gather_object(rng, base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"))
        self.last_saved = self.step
        if snapshot is None:
            return
        state, moments, steps = snapshot
        training, following = self.training, self.step * self.accumulation
        record = {"step": self.step, "epoch": following // self.per_epoch + 1, "batch_in_epoch": following % self.per_epoch,
                  "batches_per_epoch": self.per_epoch, "tokens_seen": self.step * self.tokens_per_step, "elapsed_s": self.elapsed(),
                  "validation_loss": finite(validation_loss), "best_validation_loss": finite(self.best),
                  "data_seed": training["seed"], "data_fingerprint": self.data["train"]["fingerprint"],
                  "tokenizer": self.options.get("tokenizer", "gpt2"), "model_configuration": self.options["model_configuration"],
                  "training_options": training, "world_size": self.world}
        groups = [{"names": names, "weight_decay": decay, "lr": self.engine.optimizer.param_groups[0]["lr"], "beta1": training["beta1"],
                   "beta2": training["beta2"], "eps": 1e-8} for names, decay in self.engine.group_names]
        self.last_checkpoint = save_checkpoint(self.checkpoints, training["keep_last"], record, state, moments, groups, steps, rng)
        self.report("checkpoint", path=self.last_checkpoint)

    def run(self, stop):
        """Steps until the last or a stop; then the stop's checkpoint, the model and the summary."""
        report, parameters = self.report, {id(p): p for p in self.engine.raw.parameters()}.values()
        count = sum(p.numel() for p in parameters)
        report("started", start_step=self.step, total_steps=self.total_steps, batches_per_epoch=self.per_epoch,
               tokens_per_batch=self.batch_size * self.context_length, tokens_per_step=self.tokens_per_step, parameters=count,
               trainable_parameters=count, resumed_from=self.last_checkpoint, world_size=self.world, device=str(self.device))
        self.engine.model.train()
        cancelled = False
        while self.step < self.total_steps:
            if stop.requested(self.device):
                cancelled = True
                break
            first_micro, epoch, rate = self.train_step()
            interval = self.training["checkpoint_interval"]
            checkpoint_due = self.step == self.total_steps or (interval > 0 and self.step % interval == 0)
            validation_loss = None
            if self.step == 1 or self.step % self.training["eval_interval"] == 0 or self.step == self.total_steps or checkpoint_due:
                validation_loss = self.evaluate_splits(epoch, rate)
            self.epoch_ends(first_micro)
            if checkpoint_due:
                self.checkpoint(validation_loss)
        if cancelled and self.step > self.last_saved and self.step > 0:
            self.checkpoint(None)
        if self.step > 0:
            snapshot = self.engine.snapshot(optimizer=False)
            if snapshot is not None:
                directory = os.path.join(self.options["run_directory"], "model")
                save_model(directory, snapshot[0], self.cfg, json.dumps(self.options["model_configuration"], indent=2) + "\n")
                report("model", path=directory)
        report("finished", steps=self.step, total_steps=self.total_steps, tokens_seen=self.step * self.tokens_per_step,
               cancelled=cancelled, last_train_loss=finite(self.last_loss), best_validation_loss=finite(self.best),
               checkpoint=self.last_checkpoint)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--options", required=True, help="the options.json gpt prepared")
    parser.add_argument("--events", action="store_true", help="one GPT_EVENT JSON line per event (for gpt)")
    args = parser.parse_args(argv)
    options = gpt_run.read_options(args.options)
    rank, world, local_rank = environment()
    distributed = options["distributed"]
    _backend, device = start_group(distributed.get("backend", "auto"), local_rank)
    code = 1
    try:
        session = Session(options, rank, world, device, distributed.get("strategy", "ddp"), Reporter(args.events, rank == 0))
        session.run(Stop(options["stop_file"]))
        dist.barrier()
        code = 0
    except SystemExit as exit_request:
        code = exit_request.code if isinstance(exit_request.code, int) else (0 if exit_request.code is None else 1)
        if isinstance(exit_request.code, str):
            print(exit_request.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - reported, then the process ends with 1 as Python's own handler would
        traceback.print_exc()
    finally:
        dist.destroy_process_group()
        # Leave without the interpreter's teardown. Freeing DDP's reducer at exit frees the gloo group, which joins its
        # worker threads while holding the GIL; a worker that is freeing a tensor waits for that GIL: a deadlock that
        # left one process spinning forever (seen with Debian's torch 1.13, after the run had finished and written
        # everything). Every file is closed and renamed by now; only the standard streams need flushing.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    main()
