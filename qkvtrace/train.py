"""Training: the loop, checkpoints (safetensors + JSON), resume, metrics; and `Run`, a finished run directory.

A run directory holds:
    run.json                     resolved config, corpus description and hash, vocabulary sizes, seed, versions;
                                 the finished epochs, and the sha256 of every vocabulary and listed checkpoint
    src_vocab.json, tgt_vocab.json
    metrics.jsonl                one JSON line per finished epoch
    checkpoints/epoch-NNN.safetensors   weights at each chosen epoch (metadata: epoch, config)
    checkpoints/resume-NNN.safetensors  weights + Adam state after the last finished epoch NNN (what --resume needs)
Crash consistency (see files.py): a new run (or --force) is published as a whole folder with its vocabularies and
no epoch; then each epoch writes its files atomically and commits them by rewriting run.json last. A file that
run.json does not list does not exist for readers, so a kill at any moment leaves the run as of its last committed
epoch, and `--resume` removes the uncommitted leftovers. `train` (rank 0) holds the run directory's lock
throughout; readers (translate, extract, similarity) take none and see the committed checkpoints, each verified
against its sha256.

Determinism without global seeding of the caller's state: epoch e shuffles with numpy's Generator seeded by
(seed, e), and its dropout draws from torch's generator re-seeded with (seed, e) inside `torch.random.fork_rng`.
So the state at an epoch boundary is a function of (seed, epoch), and a resumed run is bit-identical on CPU.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import itertools
import json
import logging
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from qkvtrace import dist, files
from qkvtrace.config import ModelConfig, TrainConfig, from_dict, to_dict
from qkvtrace.errors import QkvtraceError
from qkvtrace.files import atomic_write, atomic_write_json, atomic_write_text
from qkvtrace.dist import SINGLE, Dist
from qkvtrace.model import Transformer
from qkvtrace.tokenizer import TOKENIZER_FILE, build_vocabs, load_vocabs, save_vocabs, vocab_state, vocabs_from_state
from qkvtrace.vocab import EOS_ID, PAD_ID, Vocab, tokenize

log = logging.getLogger("qkvtrace")

Progress = Callable[[dict], None]


def resolve_device(name: str) -> torch.device:
    """'auto' picks cuda, then mps, then cpu; an explicit device that isn't available is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise QkvtraceError("cuda: no CUDA device is available here; use auto or cpu", param="device")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise QkvtraceError("mps: no MPS device is available here; use auto or cpu", param="device")
    return torch.device(name)


@functools.lru_cache(maxsize=1)
def _versions() -> tuple:
    import qkvtrace

    return (("qkvtrace", qkvtrace.__version__), ("torch", torch.__version__), ("numpy", np.__version__),
            ("sklearn", importlib.metadata.version("scikit-learn")), ("click", importlib.metadata.version("click")),
            ("python", platform.python_version()))


def versions() -> dict:
    """Library versions for run.json and manifests; read from package metadata (once a process: each read scans
    the installed packages), so sklearn (1.2 s to import here) is not loaded by commands that never use it."""
    return dict(_versions())


# ----------------------------------------------------------------------------------------------------------------
# data

def encode_pairs(pairs, src_vocab: Vocab, tgt_vocab: Vocab, max_len: int) -> tuple[list[list[int]], list[list[int]], int]:
    """Id lists of the pairs that fit `max_len` (with <sos>/<eos>); returns (src_ids, tgt_ids, n_dropped)."""
    src_ids, tgt_ids, dropped = [], [], 0
    for p in pairs:
        s, t = src_vocab.encode(p.src), tgt_vocab.encode(p.tgt)
        if len(s) > max_len or len(t) > max_len:
            dropped += 1
            continue
        src_ids.append(s)
        tgt_ids.append(t)
    return src_ids, tgt_ids, dropped


def pad(seqs, device=None) -> torch.Tensor:
    """Right-pad id sequences (lists, or arrays of a token cache) into (batch, pos) with <pad>."""
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    out = np.full((len(seqs), int(lengths.max())), PAD_ID, dtype=np.int64)
    # One flat copy instead of a tensor per sequence; a row-major mask visits the slots in the ids' order.
    out[np.arange(out.shape[1]) < lengths[:, None]] = np.fromiter(itertools.chain.from_iterable(seqs),
                                                                  dtype=np.int64, count=int(lengths.sum()))
    out = torch.from_numpy(out)
    return out.to(device) if device is not None else out


def _lengths(seqs) -> np.ndarray:
    """Lengths of id sequences: a token cache's Ragged knows them; lists are measured."""
    return seqs.lengths if hasattr(seqs, "lengths") else np.fromiter((len(s) for s in seqs), np.int64, len(seqs))


def bucket_batches(src_ids, tgt_ids, batch_size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    """Batches of indices of similar lengths (little padding, often none), in shuffled order when `rng` is given.

    Sorting by (source length, target length, random key) groups equal source lengths, so most batches need no
    encoder mask at all, and the random key varies the grouping from epoch to epoch.
    """
    n = len(src_ids)
    noise = rng.random(n) if rng is not None else np.zeros(n)
    order = np.lexsort((noise, _lengths(tgt_ids), _lengths(src_ids)))
    batches = [order[i: i + batch_size] for i in range(0, n, batch_size)]
    if rng is not None:
        rng.shuffle(batches)
    return batches


# ----------------------------------------------------------------------------------------------------------------
# checkpoints

def save_weights(path: Path, model: Transformer, epoch: int, extra: dict[str, torch.Tensor] | None = None,
                 metadata: dict | None = None) -> str:
    """Write the model's weights (and `extra` tensors) as safetensors, atomically; returns the file's sha256."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update(extra or {})
    meta = {"epoch": str(epoch), "model_config": json.dumps(to_dict(model.cfg)), **(metadata or {})}
    return atomic_write(path, canonical_safetensors(save(tensors, metadata=meta)))


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted: the library writes its metadata in an order
    that changes from call to call, so equal weights would otherwise give files (and sha256s) that differ."""
    import struct

    n = struct.unpack("<Q", data[:8])[0]
    header = json.dumps(json.loads(data[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data that follows stays 8-byte aligned
    return struct.pack("<Q", len(header)) + header + data[8 + n:]


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a checkpoint; a truncated or corrupt file is a one-line error."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise QkvtraceError(f"{path}: no such checkpoint") from None
    except Exception as e:  # safetensors raises its own error types for truncation and bad headers
        raise QkvtraceError(f"{path}: truncated or corrupt checkpoint ({str(e).splitlines()[0]}); "
                            "train the run again with {force}", mentions=("force=True",)) from None
    return tensors, meta


def load_weights(model: Transformer, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Load checkpoint tensors into `model`; a checkpoint of another shape is a one-line error."""
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        # torch's first line is only a header ("Error(s) in loading state_dict ..."); the next one names the tensor.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise QkvtraceError(f"{path}: does not fit the model in run.json ({lines[min(1, len(lines) - 1)]})") from None


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], str]:
    """Adam's state as flat tensors `optim.{param}.{key}` plus its param_groups as JSON: no pickle."""
    sd = opt.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"optim.{idx}.{key}"] = t.detach().cpu().contiguous()
    return tensors, json.dumps(sd["param_groups"])


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups_json: str) -> None:
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = t
    opt.load_state_dict({"state": state, "param_groups": json.loads(groups_json)})


# ----------------------------------------------------------------------------------------------------------------
# evaluation

@torch.no_grad()
def evaluate(model: Transformer, src_ids, tgt_ids, tgt_vocab: Vocab, device, batch_size: int = 128,
             d: Dist = SINGLE) -> dict:
    """Validation loss, perplexity, token accuracy (teacher-forced), exact match and BLEU (greedy).

    Distributed, each rank translates its contiguous share of the pairs and the sums (and hypotheses, for BLEU)
    are combined across ranks, so every rank returns the metrics of the whole validation split.
    """
    import sacrebleu

    if not src_ids:
        # Nothing to measure: NaN says so, where 0.0 would read as a perfect validation loss.
        return dict.fromkeys(("val_loss", "val_ppl", "val_token_acc", "val_exact_match", "val_bleu"), math.nan)
    model.eval()
    mine = dist.shard(np.arange(len(src_ids)), d)
    my_src, my_tgt = [src_ids[i] for i in mine], [tgt_ids[i] for i in mine]
    total_loss = n_tok = n_ok = exact = 0.0
    hyps: list[str] = [""] * len(my_src)
    for idx in (bucket_batches(my_src, my_tgt, batch_size, None) if my_src else []):
        src = pad([my_src[i] for i in idx], device)
        tgt = pad([my_tgt[i] for i in idx], device)
        loss, n, ok = model.loss(src, tgt)
        total_loss += float(loss) * n
        n_tok += n
        n_ok += ok
        for i, pred in zip(idx, model.greedy(src, max_len=tgt.shape[1] + 10)):
            words = [t for t in pred if t != EOS_ID]
            exact += words == my_tgt[i][1:-1]
            hyps[i] = tgt_vocab.text(words)
    total_loss, n_tok, n_ok, exact = dist.all_sum(d, [total_loss, n_tok, n_ok, exact], device)
    # Shards are contiguous and in rank order, so the gathered hypotheses line up with the references.
    hyps = [h for part in dist.all_gather_json(d, hyps, device) for h in part]
    refs = [tgt_vocab.text(t[1:-1]) for t in tgt_ids]
    val_loss = total_loss / max(n_tok, 1)
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)), "val_token_acc": n_ok / max(n_tok, 1),
            "val_exact_match": exact / max(len(src_ids), 1),
            "val_bleu": sacrebleu.corpus_bleu(hyps, [refs], force=True).score}


# ----------------------------------------------------------------------------------------------------------------
# training

def make_optimizer(model: Transformer, lr: float) -> torch.optim.Optimizer:
    """Adam with the fused kernel (one kernel for all parameters instead of a dozen ops per tensor): about 17% of
    a training step at the study's size."""
    return torch.optim.Adam(model.parameters(), lr=lr, fused=True)


@dataclass
class Precision:
    """How a step computes: autocast dtype (None = fp32 throughout) and, for fp16, the gradient scaler."""

    name: str = "fp32"
    device_type: str = "cpu"
    dtype: torch.dtype | None = None
    scaler: "torch.amp.GradScaler | None" = None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


FP32 = Precision()


def make_precision(name: str, device: torch.device) -> Precision:
    """`--precision` for `device`: bf16 where the hardware has it, fp16 (with gradient scaling) on CUDA only."""
    if name == "fp32":
        return Precision("fp32", device.type)
    if name == "fp16":
        if device.type != "cuda":
            raise QkvtraceError(f"fp16: needs a CUDA device (gradient scaling), here {device.type}; "
                                "use {precision} bf16 or fp32", param="precision", mentions=("precision",))
        return Precision("fp16", "cuda", torch.float16, torch.amp.GradScaler("cuda"))
    if name == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise QkvtraceError("bf16: this GPU has no bfloat16 support; use {precision} fp16 or fp32",
                                param="precision", mentions=("precision",))
        if device.type == "cpu" and not cpu_has_bf16():
            raise QkvtraceError("bf16: this CPU has no bfloat16 instructions (AVX512-BF16 or AMX); "
                                "use {precision} fp32", param="precision", mentions=("precision",))
        if device.type not in ("cpu", "cuda"):
            raise QkvtraceError(f"bf16: runs on cpu or cuda, not {device.type}; use {{precision}} fp32",
                                param="precision", mentions=("precision",))
        return Precision("bf16", device.type, torch.bfloat16)
    raise QkvtraceError(f"{name!r}: expected fp32, bf16 or fp16", param="precision")


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (torch's own probe; without it bf16 is emulated and slow)."""
    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(p is not None and p() for p in probes)


class LossModule(torch.nn.Module):
    """The model's training loss as a module's forward: DistributedDataParallel synchronises the gradients of what
    its wrapped forward computed, and our step calls `Transformer.loss`, not `forward`."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, src: torch.Tensor, tgt: torch.Tensor):
        return self.model.loss(src, tgt)


def train_step(model, opt: torch.optim.Optimizer, src: torch.Tensor, tgt: torch.Tensor, clip: float,
               weight: float | None = None, precision: Precision = FP32) -> tuple[torch.Tensor, int]:
    """One step: loss, backward, gradient clipping, Adam. Returns (loss, n_tokens).

    `model` is a Transformer, or its LossModule wrapped in DistributedDataParallel. DDP averages the ranks'
    gradients, so each rank's mean loss is weighted by `weight` = world * (its tokens / all ranks' tokens): the
    average is then the gradient of the per-token mean over the whole global batch, as one process computes it.
    """
    with precision.autocast():
        loss, n, _ = model.loss(src, tgt) if isinstance(model, Transformer) else model(src, tgt)
    scaled = loss if weight is None else loss * weight
    opt.zero_grad(set_to_none=True)
    if precision.scaler is None:
        scaled.backward()
        clip_grad_norm(opt_params(opt), clip)
        opt.step()
    else:
        precision.scaler.scale(scaled).backward()
        precision.scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
        clip_grad_norm(opt_params(opt), clip)
        precision.scaler.step(opt)
        precision.scaler.update()
    return loss, n


def opt_params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in opt.param_groups for p in group["params"]]


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_'s arithmetic (the 2-norm of the per-tensor 2-norms; scale by
    max_norm / (norm + 1e-6) when that is below 1) in two foreach calls, which it uses on CUDA only: on CPU it
    runs a norm, a copy and a multiply per tensor. Returns the total norm before clipping."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    return norm


def _run_record(model_cfg, train_cfg, corpus, src_vocab, tgt_vocab, dropped, d: Dist) -> dict:
    return {"format": "qkvtrace-run/2", "model": to_dict(model_cfg), "train": to_dict(train_cfg),
            "corpus": corpus.describe(), "vocab": {"src": len(src_vocab), "tgt": len(tgt_vocab)},
            "pairs_dropped_too_long": dropped, "seed": train_cfg.seed, "versions": versions(),
            "distributed": {"world_size": d.world, "batch_per_rank": train_cfg.batch_size,
                            "global_batch": train_cfg.batch_size * d.world, "backend": d.backend},
            "complete": False, "epochs_done": 0, "files": {}, "checkpoints": [], "resume": None}


def resume_entry(run_dir: Path | str) -> dict | None:
    """{"epoch", "file", "sha256"} of the state `--resume` continues from, or None (no epoch finished).

    Runs written before checksums were recorded name their state checkpoints/resume.safetensors."""
    run_dir = Path(run_dir)
    try:
        info = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict):
        return None
    if "resume" in info:
        return info["resume"]
    legacy = run_dir / "checkpoints" / "resume.safetensors"
    return {"epoch": None, "file": "checkpoints/resume.safetensors", "sha256": None} if legacy.is_file() else None


def _drop_unlisted(run_dir: Path, record: dict) -> None:
    """Remove checkpoints a killed run wrote but never committed to run.json (they are not part of the run)."""
    listed = {c["file"] for c in record.get("checkpoints", [])} | {(record.get("resume") or {}).get("file")}
    for f in (run_dir / "checkpoints").glob("*"):
        if f.is_file() and f"checkpoints/{f.name}" not in listed and (
                f.name.startswith(".") or f.name.startswith(("epoch-", "resume"))):
            f.unlink()


# What a run directory holds; --force refuses a directory with anything else in it.
RUN_FILES = {"run.json", "src_vocab.json", "tgt_vocab.json", TOKENIZER_FILE, "metrics.jsonl", "checkpoints", "tokens"}


def _check_run_dir(run_dir: Path, resume: bool, force: bool) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise QkvtraceError(f"{run_dir}: exists and is not a directory; choose another path", param="run_dir")
    exists = (run_dir / "run.json").exists() or (run_dir.is_dir() and any(run_dir.iterdir()))
    if exists and not (resume or force):
        raise QkvtraceError(f"run directory {run_dir} already exists; pass {{resume}} to continue it or {{force}} "
                            "to start it over", mentions=("resume=True", "force=True"))
    if force and exists:
        # --force starts a run over; it must never clear a folder of other files that only happens to be named.
        foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_FILES and not p.name.startswith("."))
        if foreign:
            raise QkvtraceError(f"{run_dir}: not a qkvtrace run (holds {', '.join(foreign[:5])}"
                                f"{', ...' if len(foreign) > 5 else ''}); force only starts a run over, "
                                "choose an empty or new directory", param="run_dir")
    if resume and not (run_dir / "run.json").is_file():
        raise QkvtraceError(f": {run_dir} is not a run (no run.json) and there is nothing to resume; "
                            "leave {resume} out to start it", param="resume", mentions=("resume=True",))
    if resume and resume_entry(run_dir) is None:
        raise QkvtraceError(f": {run_dir} has no checkpoint to resume from (no epoch finished: run.json "
                            "lists none); start it over with {force}", param="resume", mentions=("force=True",))


def _check_resumable(old: "Run", model_cfg: ModelConfig, train_cfg: TrainConfig, corpus, d: Dist) -> None:
    """--resume continues only the run that was started: same options, corpus and number of ranks."""
    run_dir = old.path
    mine = {"model": to_dict(model_cfg), "train": to_dict(replace(train_cfg, device="auto")),
            "corpus_hash": corpus.content_hash()}
    # Through the config class, so a run made before a field existed reads as that field's default.
    theirs = {"model": to_dict(old.model_cfg), "train": to_dict(replace(old.train_cfg, device="auto")),
              "corpus_hash": old.info["corpus"]["content_hash"]}
    if mine != theirs:
        diff = [f"{k} {mine[part].get(k)!r} here, {theirs[part].get(k)!r} in the run"
                for part in ("model", "train") for k in sorted(set(mine[part]) | set(theirs[part]))
                if mine[part].get(k) != theirs[part].get(k)]
        if mine["corpus_hash"] != theirs["corpus_hash"]:
            diff.append("the corpus content changed")
        raise QkvtraceError(f": the options differ from those {run_dir} was started with "
                            f"({'; '.join(diff)}); resume with the same options, or start over with {{force}}",
                            param="resume", mentions=("force=True",))
    world = old.info.get("distributed", {}).get("world_size", 1)
    if world != d.world:
        raise QkvtraceError(f": {run_dir} was trained by {world} process(es), here {d.world}: the global "
                            f"batch would change; resume with {{nproc}} {world} (torchrun --nproc-per-node)",
                            param="resume", mentions=("nproc",))


def _prepare(model_cfg, train_cfg, run_dir: Path, resume: bool, force: bool, corpus, d: Dist,
             held: contextlib.ExitStack) -> dict:
    """Rank 0's setup: lock and check the run directory, build or load the vocabularies, read the resume
    checkpoint, publish a new run's first files. Returns what every rank needs (JSON-able), plus "resume_bytes"
    for the checkpoint. The lock stays on `held` until training ends."""
    held.enter_context(files.lock(run_dir, "--run-dir"))
    files.cleanup(run_dir)  # a swap that a kill interrupted is finished before anything looks at the run
    for p in (run_dir / "tokens").glob(".*.tmp-*"):  # a token cache entry a killed rank 0 was building
        shutil.rmtree(p, ignore_errors=True)
    _check_run_dir(run_dir, resume, force)
    state: dict = {"start_epoch": 1, "metrics": [], "param_groups": None, "resume_bytes": None, "carry": {}}
    if resume:
        old = Run(run_dir)
        _check_resumable(old, model_cfg, train_cfg, corpus, d)
        src_vocab, tgt_vocab = old.src_vocab, old.tgt_vocab
        entry = resume_entry(run_dir)
        resume_path = run_dir / entry["file"]
        _, meta = read_safetensors(resume_path)  # one-line error if truncated or corrupt
        files.verify(resume_path, entry["sha256"], "run.json", "start the run over with {force}",
                     mentions=("force=True",))
        state["resume_file"] = entry["file"]
        try:
            state["param_groups"] = meta["param_groups"]
            state["start_epoch"] = int(meta["epoch"]) + 1
        except (KeyError, ValueError) as e:
            raise QkvtraceError(f"{resume_path}: not a resume checkpoint (optimizer state unreadable: {e}); "
                                "start the run over with {force}", mentions=("force=True",)) from None
        state["resume_bytes"] = resume_path.read_bytes()
        state["metrics"] = [m for m in read_metrics(run_dir) if m["epoch"] < state["start_epoch"]]
        carry = {k: old.info[k] for k in ("files", "checkpoints", "resume") if k in old.info}
        carry["checkpoints"] = [c for c in carry.get("checkpoints", []) if c["epoch"] < state["start_epoch"]]
        _drop_unlisted(run_dir, carry)
        state["carry"] = carry
    else:
        src_vocab, tgt_vocab = build_vocabs(train_cfg.tokenizer, (p.src for p in corpus.train),
                                            (p.tgt for p in corpus.train), train_cfg.min_freq)
        # The new run appears whole (run.json, vocabularies, no epoch) in one step; with --force it replaces the
        # old run in that same step, so a kill before it leaves the old run as it was. The stage holds only this
        # run's own kind of vocabulary (two word vocabularies, or one tokenizer.json) and no token cache.
        with files.publish_dir(run_dir, force=True, option="--run-dir") as stage:
            (stage / "checkpoints").mkdir()
            save_vocabs(stage, src_vocab, tgt_vocab)
            state["carry"] = {"files": {name: files.sha256_file(stage / name)
                                        for name in ("src_vocab.json", "tgt_vocab.json", TOKENIZER_FILE)
                                        if (stage / name).is_file()}}
            atomic_write_text(stage / "metrics.jsonl", "")
            record = _run_record(model_cfg, train_cfg, corpus, src_vocab, tgt_vocab, None, d)
            atomic_write_json(stage / "run.json", dict(record, **state["carry"]))
        files.fault("train.published")
    state["vocab"] = vocab_state(src_vocab, tgt_vocab)
    return state


def _token_arrays(corpus, src_vocab, tgt_vocab, max_len: int, run_dir: Path, d: Dist, device):
    """The training split's ids, memory-mapped from the run's token cache (`run_dir/tokens/<key>/`), built once
    by rank 0; a rank that cannot see rank 0's directory (another machine) builds its own copy."""
    import tempfile

    from qkvtrace import token_cache

    key = token_cache.cache_key(corpus.content_hash(), "train", json.dumps(vocab_state(src_vocab, tgt_vocab)),
                                max_len)
    path = run_dir / "tokens" / key
    if d.is_main:
        token_cache.build(corpus.train, src_vocab, tgt_vocab, max_len, path)
    dist.barrier(d)
    if not (path / "meta.json").is_file():
        path = Path(tempfile.mkdtemp(prefix="qkvtrace-tokens-")) / key
        token_cache.build(corpus.train, src_vocab, tgt_vocab, max_len, path)
    return token_cache.open_arrays(path)


def _fault_point(d: Dist, epoch: int) -> None:
    """For fault-injection tests: QKVTRACE_INJECT_FAULT=RANK:EPOCH makes that rank fail as that epoch starts."""
    spec = os.environ.get("QKVTRACE_INJECT_FAULT")
    if spec and spec == f"{d.rank}:{epoch}":
        raise RuntimeError(f"injected fault at epoch {epoch}")


def train(model_cfg: ModelConfig, train_cfg: TrainConfig, run_dir: Path | str, resume: bool = False,
          force: bool = False, progress: Progress | None = None, corpus=None) -> "Run | None":
    """Train the Transformer on `train_cfg.corpus`, keeping checkpoints at `train_cfg.checkpoints`.

    Returns the finished `Run`. `resume` continues an interrupted run from its last finished epoch; `force`
    starts an existing run directory over. `progress` receives dicts: {"event": "step"|"epoch"|"start", ...}.

    Under torchrun every rank calls this: each trains on its share of every global batch of
    `train_cfg.batch_size * world` pairs with DistributedDataParallel; only rank 0 writes the run directory,
    reports progress and returns the Run (the other ranks return None).
    """
    with contextlib.ExitStack() as held:  # rank 0's lock on the run directory, until training ends
        return _train(model_cfg, train_cfg, Path(run_dir), resume, force, progress, corpus, held)


def _train(model_cfg, train_cfg, run_dir: Path, resume: bool, force: bool, progress, corpus,
           held: contextlib.ExitStack) -> "Run | None":
    from qkvtrace.corpus import load_corpus

    if resume and force:
        raise QkvtraceError("contradict each other: choose one", param=("resume", "force"))
    d, device = dist.setup(resolve_device(train_cfg.device))
    precision = make_precision(train_cfg.precision, device)
    if corpus is None:
        corpus = load_corpus(train_cfg.corpus, src_lang=train_cfg.src_lang, tgt_lang=train_cfg.tgt_lang,
                             seed=train_cfg.seed, val_fraction=train_cfg.val_fraction)

    # Rank 0 checks and prepares the run directory; the others receive the outcome, or its error, from it.
    state, error = None, None
    if d.is_main:
        try:
            state = _prepare(model_cfg, train_cfg, run_dir, resume, force, corpus, d, held)
        except QkvtraceError as e:
            error = e
            if not d.distributed:
                raise
    if d.distributed:
        head = None
        if d.is_main:
            head = str(error) if error is not None else {k: v for k, v in state.items() if k != "resume_bytes"}
        head = dist.share_json(d, head, device)
        if error is not None:
            raise error  # as raised, so the CLI names its parameters as options
        if isinstance(head, str):
            raise QkvtraceError(f"(after another rank failed) {head}")
        head["resume_bytes"] = dist.share_bytes(d, state and state["resume_bytes"], device) or None
        state = head
    src_vocab, tgt_vocab = vocabs_from_state(state["vocab"])
    start_epoch, metrics = state["start_epoch"], state["metrics"]

    arrays = _token_arrays(corpus, src_vocab, tgt_vocab, model_cfg.max_len, run_dir, d, device)
    train_src, train_tgt, dropped = arrays.src, arrays.tgt, arrays.dropped
    val_src, val_tgt, _ = encode_pairs(corpus.val, src_vocab, tgt_vocab, model_cfg.max_len)
    if not train_src:
        raise QkvtraceError(f"corpus {corpus.name}: no training pair fits max_len {model_cfg.max_len}")
    if d.is_main and dropped:
        log.warning("%d training pairs longer than max_len %d tokens were left out", dropped, model_cfg.max_len)
    if d.is_main and not val_src:
        log.warning("corpus %s: no validation pair%s; the val_* metrics will be NaN", corpus.name,
                    " fits max_len" if corpus.val else "")

    model = Transformer(model_cfg, len(src_vocab), len(tgt_vocab), seed=train_cfg.seed).to(device)
    opt = make_optimizer(model, train_cfg.lr)
    if state["resume_bytes"]:
        from safetensors.torch import load as load_safetensors_bytes

        resume_path = run_dir / state["resume_file"]
        tensors = load_safetensors_bytes(state["resume_bytes"])
        load_weights(model, {k: v for k, v in tensors.items() if not k.startswith("optim.")}, resume_path)
        try:
            load_optimizer(opt, tensors, state["param_groups"])
        except (KeyError, ValueError) as e:
            raise QkvtraceError(f"{resume_path}: not a resume checkpoint (optimizer state unreadable: {e}); "
                                "start the run over with {force}", mentions=("force=True",)) from None
    step_model = model
    if d.distributed:
        from torch.nn.parallel import DistributedDataParallel

        step_model = DistributedDataParallel(LossModule(model), device_ids=[device] if device.type == "cuda" else None)
    record = _run_record(model_cfg, train_cfg, corpus, src_vocab, tgt_vocab, dropped, d)
    record["device"] = str(device)
    record["precision"] = precision.name
    record.update(state["carry"], epochs_done=start_epoch - 1)
    if d.is_main:
        atomic_write_json(run_dir / "run.json", record)
    else:
        progress = None

    global_batch = train_cfg.batch_size * d.world
    n_steps = math.ceil(len(train_src) / global_batch)
    if progress:
        progress({"event": "start", "epochs": train_cfg.epochs, "start_epoch": start_epoch, "steps": n_steps,
                  "pairs": len(train_src), "device": str(device), "world_size": d.world})
    devices = [device.index or 0] if device.type == "cuda" else []
    for epoch in range(start_epoch, train_cfg.epochs + 1):
        _fault_point(d, epoch)
        t0 = time.perf_counter()
        rng = np.random.default_rng([train_cfg.seed, epoch])
        loss_sum = tokens = 0.0
        model.train()
        with torch.random.fork_rng(devices=devices):
            # Rank r draws its own dropout masks; a single process (rank 0 of 1) seeds as it always did.
            torch.manual_seed((train_cfg.seed * 1_000_003 + epoch) * d.world + d.rank)
            for step, idx in enumerate(bucket_batches(train_src, train_tgt, global_batch, rng), 1):
                mine, weight = dist.shard(idx, d), None
                if d.distributed:
                    n_mine = sum(len(train_tgt[i]) - 1 for i in mine)
                    (n_all,) = dist.all_sum(d, [n_mine], device)
                    weight = n_mine * d.world / n_all
                    if not len(mine):
                        # A short last batch leaves this rank nothing; it still joins DDP's gradient average,
                        # with one pair weighted 0.
                        mine = idx[:1]
                src = pad([train_src[i] for i in mine], device)
                tgt = pad([train_tgt[i] for i in mine], device)
                loss, n = train_step(step_model, opt, src, tgt, train_cfg.clip, weight, precision)
                if weight != 0:
                    loss_sum += loss.item() * n
                    tokens += n
                if progress:
                    progress({"event": "step", "epoch": epoch, "step": step, "steps": n_steps,
                              "loss": loss_sum / tokens, "tokens_per_s": tokens / (time.perf_counter() - t0)})
        seconds = time.perf_counter() - t0
        loss_sum, tokens = dist.all_sum(d, [loss_sum, tokens], device)
        row = {"epoch": epoch, "train_loss": loss_sum / tokens,
               **evaluate(model, val_src, val_tgt, tgt_vocab, device, d=d),
               "seconds": seconds, "tokens_per_s": tokens / seconds,
               "eval_seconds": time.perf_counter() - t0 - seconds}
        metrics.append(row)
        if d.is_main:
            commit_epoch(run_dir, record, model, opt, epoch, epoch in train_cfg.checkpoints, metrics)
        if progress:
            progress({"event": "epoch", **row})
    if not d.is_main:
        dist.barrier(d)  # rank 0 finishes the directory; the others leave together with it
        return None
    record["complete"] = True
    atomic_write_json(run_dir / "run.json", record)
    dist.barrier(d)
    return Run(run_dir)


def commit_epoch(run_dir: Path, record: dict, model: Transformer, opt, epoch: int, keep: bool,
                 metrics: list[dict], metadata: dict | None = None) -> None:
    """Write epoch `epoch`'s files, then commit them by rewriting run.json (which lists them with their sha256).
    Runs of our own and fine-tuning runs (finetune.py, `metadata` = its tied-weight aliases) commit alike."""
    if keep:
        name = f"checkpoints/epoch-{epoch:03d}.safetensors"
        record["checkpoints"].append({"epoch": epoch, "file": name,
                                      "sha256": save_weights(run_dir / name, model, epoch, metadata=metadata)})
    optim, groups = optimizer_tensors(opt)
    previous = record["resume"]
    name = f"checkpoints/resume-{epoch:03d}.safetensors"
    record["resume"] = {"epoch": epoch, "file": name,
                        "sha256": save_weights(run_dir / name, model, epoch, optim,
                                               {"param_groups": groups, **(metadata or {})})}
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))
    files.fault("train.epoch-written")
    record["epochs_done"] = epoch
    atomic_write_json(run_dir / "run.json", record)  # the commit: the epoch's files exist for readers now
    files.fault("train.committed")
    if previous and previous["file"] != name:
        (run_dir / previous["file"]).unlink(missing_ok=True)


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of `run_dir/metrics.jsonl` ([] if absent); a damaged line is a one-line error naming it."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise QkvtraceError(f"{path}:{n}: not a metrics line ({e}); start the run over with {{force}}",
                                mentions=("force=True",)) from None
        if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
            raise QkvtraceError(f"{path}:{n}: not a metrics line (no epoch); start the run over with {{force}}",
                                mentions=("force=True",))
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# a finished run

@dataclass
class Translation:
    source: str
    tokens: list[str]        # predicted target tokens (subword pieces with a tokenizer), <eos> included if predicted
    unknown: list[str]       # source words not in the vocabulary (encoded as <unk>)
    epoch: int
    text: str                # the predicted words joined by spaces, <eos> left out


class Run:
    """A run directory: its config, vocabularies and checkpoints."""

    def __init__(self, path: Path | str):
        self.path = files.settled(Path(path))
        info_path = self.path / "run.json"
        if not info_path.is_file():
            raise QkvtraceError(f"{self.path}: not a qkvtrace run directory (no run.json); "
                                "make one with `qkvtrace train --run-dir DIR`")
        try:
            self.info = json.loads(info_path.read_text())
            if not isinstance(self.info, dict):
                raise ValueError(f"expected a JSON object, found {type(self.info).__name__}")
            self.model_cfg = from_dict(ModelConfig, self.info["model"], f"{info_path} [model]")
            self.train_cfg = from_dict(TrainConfig, self.info["train"], f"{info_path} [train]")
            # Format 2 lists the committed checkpoints with their sha256; format 1 had no list (found by name).
            self.listed = ({int(c["epoch"]): c for c in self.info["checkpoints"]}
                           if isinstance(self.info.get("checkpoints"), list) else None)
        except (ValueError, KeyError, TypeError) as e:
            raise QkvtraceError(f"{info_path}: unreadable run description ({type(e).__name__}: {e})") from None
        self.src_vocab, self.tgt_vocab = load_vocabs(self.path)
        # After the readable-format checks, whose messages say more; this catches what still parses.
        for name, digest in (self.info.get("files") or {}).items():
            files.verify(self.path / name, digest, "run.json", "train the run again with {force}",
                         mentions=("force=True",))
        self._models: dict[tuple[int, str], Transformer] = {}
        self._translations: dict[tuple, list] = {}  # (sentences, epoch, device) -> translate()'s answer

    @property
    def subword(self) -> bool:
        """Whether the run's vocabulary is a subword tokenizer (tokenizer.json) rather than words."""
        return self.train_cfg.tokenizer != "word"

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, epochs={self.checkpoint_epochs()})"

    def checkpoint_epochs(self) -> list[int]:
        """Epochs that have a committed checkpoint (listed in run.json), ascending."""
        if self.listed is not None:
            return sorted(self.listed)
        out = []
        for f in (self.path / "checkpoints").glob("epoch-*.safetensors"):
            try:
                out.append(int(f.stem.split("-")[1]))
            except ValueError:
                continue
        return sorted(out)

    def check_epoch(self, epoch: int | None, param: str = "epoch") -> int:
        """`epoch` if it has a checkpoint (None -> the newest), else a one-line error naming `param` and listing
        the epochs that have one."""
        have = self.checkpoint_epochs()
        if not have:
            raise QkvtraceError(f"{self.path}: has no checkpoints yet; train it first")
        if epoch is None:
            return have[-1]
        if epoch not in have:
            raise QkvtraceError(f"{epoch}: {self.path} has no checkpoint for epoch {epoch}; "
                                f"epochs with checkpoints: {', '.join(map(str, have))}", param=param)
        path = self.checkpoint_path(epoch)
        if not path.is_file():
            # No silent fallback to an older epoch: the run is damaged and the user must know which part is gone.
            raise QkvtraceError(f"{path}: the checkpoint of epoch {epoch} is missing (run.json lists it); restore "
                                "the file or train the run again with {force}", mentions=("force=True",))
        return epoch

    def checkpoint_path(self, epoch: int) -> Path:
        if self.listed is not None and epoch in self.listed:
            return self.path / self.listed[epoch]["file"]
        return self.path / "checkpoints" / f"epoch-{epoch:03d}.safetensors"

    def model(self, epoch: int | None = None, device: str | torch.device = "cpu") -> Transformer:
        """The model at `epoch` (newest by default), in eval mode, cached per (epoch, device)."""
        epoch = self.check_epoch(epoch)
        key = (epoch, str(device))
        if key not in self._models:
            path = self.checkpoint_path(epoch)
            tensors, _ = read_safetensors(path)
            if self.listed is not None:
                files.verify(path, self.listed[epoch].get("sha256"), "run.json",
                             "train the run again with {force}", mentions=("force=True",))
            model = Transformer(self.model_cfg, len(self.src_vocab), len(self.tgt_vocab))
            load_weights(model, tensors, path)
            self._models[key] = model.to(device).eval()
        return self._models[key]

    def encode_source(self, sentence: str, option: str = "sentence") -> list[int]:
        ids = self.src_vocab.encode(sentence)
        if len(ids) == 2:  # <sos> <eos> alone
            raise QkvtraceError(f"{option} {sentence!r}: empty; give a sentence with at least one word, "
                                "e.g. \"i can eat apple\"")
        if len(ids) > self.model_cfg.max_len:
            shown = sentence if len(sentence) <= 60 else sentence[:57] + "..."  # the line stays one line
            raise QkvtraceError(f"{option} {shown!r}: {len(ids)} tokens with <sos>/<eos>, the model holds at most "
                                f"{self.model_cfg.max_len}; shorten it")
        return ids

    def translate(self, sentences: list[str], epoch: int | None = None, device: str = "cpu") -> list[Translation]:
        """Greedy translations of `sentences` with the checkpoint at `epoch` (newest by default); remembered per
        batch, so asking again for the same sentences (the study asks for one pair many times) decodes once."""
        epoch = self.check_epoch(epoch)
        if not sentences:
            return []
        key = (tuple(sentences), epoch, str(device))
        if key not in self._translations:
            model = self.model(epoch, device)
            ids = [self.encode_source(s) for s in sentences]
            out = []
            for s, src_ids, pred in zip(sentences, ids, model.greedy(pad(ids, device))):
                words = self.tgt_vocab.text(t for t in pred if t != EOS_ID)
                out.append(Translation(s, self.tgt_vocab.decode(pred), self.src_vocab.unknown(s), epoch, words))
            self._translations[key] = out
        return list(self._translations[key])


def open_run(path: Path | str) -> Run:
    """Open a run directory written by `train`."""
    return Run(path)


# TrainConfig fields added after runs were first cached, with the value every earlier run had. (precision is not
# here: runs have been cached with "precision": "fp32" in their hash since it was added, and keep that hash.)
LATER_FIELDS = {"tokenizer": "word"}


def training_hash(model_cfg: ModelConfig, train_cfg: TrainConfig, corpus) -> str:
    """sha256 over what decides the weights: corpus content, model config, train config (not the device)."""
    import hashlib

    train = to_dict(replace(train_cfg, device="auto"))
    for name, default in LATER_FIELDS.items():  # runs cached before these fields existed keep their hash
        if train.get(name) == default:
            del train[name]
    key = {"corpus": corpus.content_hash(), "model": to_dict(model_cfg), "train": train}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


CACHE_ENV = "QKVTRACE_CACHE"
DEFAULT_CACHE = "outputs/runs"


def run_cache(cache_root: Path | str | None = None) -> Path:
    """The one run cache shared by `study` and `run`: `cache_root` if given, else $QKVTRACE_CACHE, else
    outputs/runs (relative to the current directory)."""
    return Path(cache_root or os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def train_or_reuse(model_cfg: ModelConfig, train_cfg: TrainConfig, cache_root: Path | str | None = None,
                   retrain: bool = False, progress: Progress | None = None) -> tuple[Run, bool]:
    """The finished run for this exact training configuration, trained now or found in the run cache.

    Runs live in `run_cache(cache_root)/<hash[:12]>/`; a complete one with the same hash is reused (returns
    (run, True)). An interrupted one is resumed; `retrain` starts it over.
    """
    from qkvtrace.corpus import load_corpus

    corpus = load_corpus(train_cfg.corpus, src_lang=train_cfg.src_lang, tgt_lang=train_cfg.tgt_lang,
                         seed=train_cfg.seed, val_fraction=train_cfg.val_fraction)
    run_dir = run_cache(cache_root) / training_hash(model_cfg, train_cfg, corpus)[:12]
    info = run_dir / "run.json"
    if not retrain and info.is_file() and json.loads(info.read_text()).get("complete"):
        return Run(run_dir), True
    resume = not retrain and resume_entry(run_dir) is not None
    return train(model_cfg, train_cfg, run_dir, resume=resume, force=not resume, progress=progress,
                 corpus=corpus), False
