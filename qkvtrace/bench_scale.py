"""Scale-out benchmarks of our own training step, each side measured in the same run as its reference:
1 rank against N ranks at the same global batch (DistributedDataParallel, gloo on CPU), and fp32 against
autocast precisions. The fairness rules of `bench.py` hold: the same batches in the same order, warmup untimed,
interleaved rounds, each batch's time its median over rounds; throughput counts non-pad target tokens.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch

from qkvtrace.errors import QkvtraceError
from qkvtrace.vocab import PAD_ID

# Global batch of each configuration, as `bench train` uses it (the study's default, the tutorial's 128).
GLOBAL_BATCH = {"study": 64, "multi30k": 128}

# ----------------------------------------------------------------------------------------------------------------
# ranks


def _setting(config: str, corpus_dir: str | Path, seed: int):
    """(model config, corpus, global batch) of a bench configuration."""
    from qkvtrace.bench import MULTI30K_MODEL
    from qkvtrace.config import ModelConfig
    from qkvtrace.corpus import builtin_corpus, load_corpus

    if config == "study":
        return ModelConfig(), builtin_corpus(seed), GLOBAL_BATCH[config]
    if config == "multi30k":
        path = Path(corpus_dir)
        if not (path / "train.en").exists() or not (path / "train.de").exists():
            raise QkvtraceError(f"--corpus-dir {corpus_dir}: no Multi30k train.en/train.de there")
        return MULTI30K_MODEL, load_corpus(str(path)), GLOBAL_BATCH[config]
    raise QkvtraceError(f"--config {config!r}: expected study or multi30k")


def _rank_worker(config: str, corpus_dir: str, steps: int, warmup: int, seed: int) -> dict:
    """One rank of a timed DDP run (started by torch.distributed's launcher): its share of each global batch,
    `warmup` untimed steps, then the seconds of each of `steps` steps (a step ends when every rank has its
    averaged gradients and has taken its Adam step)."""
    from qkvtrace import dist
    from qkvtrace.bench import _batches
    from qkvtrace.config import TrainConfig
    from qkvtrace.model import Transformer
    from qkvtrace.train import LossModule, make_optimizer, train_step

    d, device = dist.setup(torch.device("cpu"))
    cfg, corpus, global_batch = _setting(config, corpus_dir, seed)
    src_vocab, tgt_vocab, batches = _batches(corpus, cfg, global_batch, max(steps, warmup), seed)
    tc = TrainConfig()
    model = Transformer(cfg, len(src_vocab), len(tgt_vocab), seed=seed).train()
    opt = make_optimizer(model, tc.lr)
    step_model = model
    if d.distributed:
        from torch.nn.parallel import DistributedDataParallel

        step_model = DistributedDataParallel(LossModule(model))

    def step(src, tgt):
        mine = torch.from_numpy(dist.shard(np.arange(len(src)), d))
        s, t = src[mine], tgt[mine]
        weight = None
        if d.distributed:  # as `train` weights a rank: its share of the global batch's tokens
            weight = int((t[:, 1:] != PAD_ID).sum()) * d.world / int((tgt[:, 1:] != PAD_ID).sum())
        train_step(step_model, opt, s, t, tc.clip, weight)

    with torch.random.fork_rng():
        torch.manual_seed(seed + d.rank)
        for src, tgt in batches[:warmup]:
            step(src, tgt)
        times = []
        for src, tgt in batches[:steps]:
            dist.barrier(d)
            t0 = time.perf_counter()
            step(src, tgt)
            times.append(time.perf_counter() - t0)
    tokens = sum(int((t[:, 1:] != PAD_ID).sum()) for _, t in batches[:steps])
    dist.close(d)
    return {"times": times, "tokens": tokens, "threads": torch.get_num_threads()}


def bench_ranks(nproc: int = 2, config: str = "study", steps: int = 20, warmup: int = 3, rounds: int = 2,
                corpus_dir: str | Path = "data/multi30k", seed: int = 0, progress=None) -> list[dict]:
    """Training throughput of 1 rank and of `nproc` ranks (DDP, gloo, this machine) at the same global batch.

    Each round launches a 1-rank run and an `nproc`-rank run (which goes first alternates); both time the same
    global batches, the `nproc` ranks each taking their share. Each process gets cores // ranks threads.

    Returns
    -------
    list of dict, one per rank count: ranks, batch_per_rank, global_batch, threads_per_rank, ms_per_step,
    tokens_per_s, speedup (throughput over the 1-rank run's).
    """
    from qkvtrace import dist

    if nproc < 2:
        raise QkvtraceError(f"--nproc {nproc}: compare at least 2 ranks with 1")
    if steps < 1 or warmup < 0 or rounds < 1:
        raise QkvtraceError(f"steps {steps}, warmup {warmup}, rounds {rounds}: need steps >= 1, warmup >= 0, "
                            "rounds >= 1")
    if config not in GLOBAL_BATCH:
        raise QkvtraceError(f"--config {config!r}: expected study or multi30k")
    global_batch = GLOBAL_BATCH[config]
    per: dict[int, list[list[float]]] = {1: [], nproc: []}
    meta: dict[int, dict] = {}
    for r in range(rounds):
        for world in ((1, nproc) if r % 2 == 0 else (nproc, 1)):
            out = dist.launch_function(world, _rank_worker, config, str(corpus_dir), steps, warmup, seed)
            per[world].append(out[0]["times"])
            meta[world] = out[0]
            if progress:
                progress({"event": "round", "round": r + 1, "rounds": rounds, "ranks": world,
                          "seconds": sum(out[0]["times"])})
    rows = []
    for world, runs in per.items():
        seconds = sum(statistics.median(ts) for ts in zip(*runs))
        rows.append({"config": config, "ranks": world, "batch_per_rank": global_batch / world,
                     "global_batch": global_batch, "threads_per_rank": meta[world]["threads"], "steps": steps,
                     "rounds": rounds, "ms_per_step": 1000 * seconds / steps,
                     "tokens_per_s": meta[world]["tokens"] / seconds})
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    return rows


# ----------------------------------------------------------------------------------------------------------------
# precision

def bench_precision(config: str = "study", precisions: tuple[str, ...] = ("fp32", "bf16"), steps: int = 20,
                    warmup: int = 3, rounds: int = 3, device: str = "cpu", corpus_dir: str | Path = "data/multi30k",
                    seed: int = 0, progress=None) -> list[dict]:
    """Training step time of our model at each of `precisions` (fp32 first as the reference), same batches, same
    initial weights, interleaved rounds (the order rotates each round).

    Returns
    -------
    list of dict, one per precision: precision, ms_per_step, tokens_per_s, speedup (over the first precision).
    """
    from qkvtrace.bench import _batches, _time_steps
    from qkvtrace.config import TrainConfig
    from qkvtrace.model import Transformer
    from qkvtrace.train import make_optimizer, make_precision, resolve_device, train_step

    if steps < 1 or warmup < 0 or rounds < 1:
        raise QkvtraceError(f"steps {steps}, warmup {warmup}, rounds {rounds}: need steps >= 1, warmup >= 0, "
                            "rounds >= 1")
    dev = resolve_device(device)
    cfg, corpus, global_batch = _setting(config, corpus_dir, seed)
    modes = {p: make_precision(p, dev) for p in precisions}
    src_vocab, tgt_vocab, batches = _batches(corpus, cfg, global_batch, max(steps, warmup), seed)
    batches = [(s.to(dev), t.to(dev)) for s, t in batches]
    tc = TrainConfig()
    steppers = {}
    for p, mode in modes.items():
        model = Transformer(cfg, len(src_vocab), len(tgt_vocab), seed=seed).to(dev).train()
        opt = make_optimizer(model, tc.lr)
        steppers[p] = (lambda m, o, pm: lambda s, t: train_step(m, o, s, t, tc.clip, precision=pm))(model, opt, mode)
    devices = [dev.index or 0] if dev.type == "cuda" else []
    per: dict[str, list[list[float]]] = {p: [] for p in precisions}
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for step in steppers.values():
            for s, t in batches[:warmup]:
                step(s, t)
        for r in range(rounds):
            order = list(precisions[r % len(precisions):]) + list(precisions[:r % len(precisions)])
            for p in order:
                per[p].append(_time_steps(steppers[p], batches[:steps], dev))
                if progress:
                    progress({"event": "round", "round": r + 1, "rounds": rounds, "precision": p,
                              "seconds": sum(per[p][-1])})
    tokens = sum(int((t[:, 1:] != PAD_ID).sum()) for _, t in batches[:steps])
    rows = []
    for p in precisions:
        seconds = sum(statistics.median(ts) for ts in zip(*per[p]))
        rows.append({"config": config, "precision": p, "device": str(dev), "batch_size": global_batch,
                     "steps": steps, "rounds": rounds, "ms_per_step": 1000 * seconds / steps,
                     "tokens_per_s": tokens / seconds})
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    return rows
