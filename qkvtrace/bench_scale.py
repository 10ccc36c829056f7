"""Scale-out benchmarks of our own training step, each side measured in the same run as its reference:
1 rank against N ranks at the same global batch (DistributedDataParallel, gloo on CPU), and fp32 against
autocast precisions. The fairness rules of `bench.py` hold: the same batches in the same order, warmup untimed,
interleaved rounds, each batch's time its median over rounds; throughput counts non-pad target tokens.

Also whole runs: one training run per precision with its final validation BLEU (`precision_runs`), and the peak
memory of `train` on a large synthetic corpus that stays on disk (`train_peak_memory`).
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

    _check_setting(config, corpus_dir)
    if config == "study":
        return ModelConfig(), builtin_corpus(seed), GLOBAL_BATCH[config]
    return MULTI30K_MODEL, load_corpus(str(corpus_dir)), GLOBAL_BATCH[config]


def _check_setting(config: str, corpus_dir: str | Path) -> None:
    """A bench configuration's name, and for multi30k its corpus directory, or an error naming the parameter."""
    if config not in GLOBAL_BATCH:
        raise QkvtraceError(f"{config!r}: expected study or multi30k", param="config")
    path = Path(corpus_dir)
    if config == "multi30k" and not ((path / "train.en").exists() and (path / "train.de").exists()):
        raise QkvtraceError(f"{corpus_dir}: no Multi30k train.en/train.de there", param="corpus_dir")


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
        raise QkvtraceError(f"{nproc}: compare at least 2 ranks with 1", param="nproc")
    if steps < 1 or warmup < 0 or rounds < 1:
        raise QkvtraceError(f"steps {steps}, warmup {warmup}, rounds {rounds}: need steps >= 1, warmup >= 0, "
                            "rounds >= 1")
    _check_setting(config, corpus_dir)  # here, not in the ranks, whose errors reach the caller as "rank R: ..."
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


# ----------------------------------------------------------------------------------------------------------------
# precision, whole runs: step time and the final validation BLEU

def precision_runs(config_file: str | Path, corpus_dir: str | Path, out: str | Path,
                   precisions: tuple[str, ...] = ("fp32", "bf16"), pairs: int | None = None,
                   val_pairs: int | None = None, epochs: int | None = None, progress=None) -> list[dict]:
    """Train one run per precision with the [model] and [train] tables of `config_file` (an experiment file such
    as experiments/multi30k_small.toml, or a train config) on `corpus_dir` (DIR/{train,val}.{en,de}), one after the
    other with the same seed, batches and initial weights; report each run's training time per step and its final
    validation BLEU.

    pairs, val_pairs : train and validate on the first `pairs` training and `val_pairs` validation pairs only (a
        subset that fits a time budget; written as a corpus directory under `out`). epochs : instead of the file's.

    Returns
    -------
    list of dict, one per precision: precision, epochs, pairs, steps (per epoch), ms_per_step (the training time
    of every epoch over every step, validation excluded), train_seconds, eval_seconds, bleu and val_loss (after the
    last epoch), speedup (the first precision's ms_per_step over this one's).
    """
    import json

    from qkvtrace.config import ModelConfig, TrainConfig, from_dict, load_toml
    from qkvtrace.train import train

    values = load_toml(config_file)
    src, tgt = TrainConfig.src_lang, TrainConfig.tgt_lang
    corpus_dir, out = Path(corpus_dir), Path(out)
    for split in ("train", "val"):
        for lang in (src, tgt):
            if not (corpus_dir / f"{split}.{lang}").is_file():
                raise QkvtraceError(f"{corpus_dir}: no {split}.{lang} there", param="corpus_dir")
    corpus = corpus_dir
    if pairs or val_pairs:
        corpus = out / "corpus"
        corpus.mkdir(parents=True, exist_ok=True)
        for split, n in (("train", pairs), ("val", val_pairs)):
            for lang in (src, tgt):
                lines = (corpus_dir / f"{split}.{lang}").read_text(encoding="utf-8").splitlines(keepends=True)
                (corpus / f"{split}.{lang}").write_text("".join(lines[:n] if n else lines), encoding="utf-8")
    train_values = dict(values.get("train", {}), corpus=str(corpus))
    if "min_freq" in values.get("corpus", {}):
        train_values["min_freq"] = values["corpus"]["min_freq"]
    train_values["epochs"] = epochs or train_values.get("epochs", TrainConfig.epochs)
    train_values["checkpoints"] = [train_values["epochs"]]  # the last epoch's weights are all a comparison needs
    model_cfg = from_dict(ModelConfig, values.get("model", {}), f"{config_file} [model]")
    rows = []
    for p in precisions:
        cfg = from_dict(TrainConfig, dict(train_values, precision=p), f"{config_file} [train]")
        started: dict = {}

        def report(event, p=p):
            if event["event"] == "start":
                started.update(event)
            if progress:
                progress(dict(event, precision=p))

        run = train(model_cfg, cfg, out / p, force=True, progress=report)
        metrics = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
        seconds = sum(m["seconds"] for m in metrics)
        rows.append({"precision": p, "epochs": len(metrics), "pairs": started["pairs"], "steps": started["steps"],
                     "ms_per_step": 1000 * seconds / (started["steps"] * len(metrics)), "train_seconds": seconds,
                     "eval_seconds": sum(m["eval_seconds"] for m in metrics), "bleu": metrics[-1]["val_bleu"],
                     "val_loss": metrics[-1]["val_loss"]})
    for row in rows:
        row["speedup"] = rows[0]["ms_per_step"] / row["ms_per_step"]
    return rows


# ----------------------------------------------------------------------------------------------------------------
# memory of training on a large corpus

def synthetic_corpus(path: str | Path, pairs: int, val_pairs: int = 1000, seed: int = 0) -> Path:
    """A corpus directory of `pairs` made-up sentence pairs (train.en/train.de, val.en/val.de; 4 to 9 words of a
    2,000-word vocabulary per side), written line by line."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = {lang: ["".join(rng.choice(letters, rng.integers(3, 8))) for _ in range(2000)] for lang in ("en", "de")}
    for split, n in (("train", pairs), ("val", val_pairs)):
        files = {lang: open(path / f"{split}.{lang}", "w", encoding="utf-8") for lang in words}
        try:
            for start in range(0, n, 10_000):
                k = min(10_000, n - start)
                lengths = rng.integers(4, 10, size=k)
                for lang, f in files.items():
                    ids = rng.integers(0, len(words[lang]), size=int(lengths.sum()))
                    cuts = np.cumsum(lengths)[:-1]
                    f.write("".join(" ".join(words[lang][i] for i in s) + "\n" for s in np.split(ids, cuts)))
        finally:
            for f in files.values():
                f.close()
    return path


def train_peak_memory(corpus_dir: str | Path, out: str | Path, steps: int = 20, batch_size: int = 512) -> dict:
    """Peak resident memory (MB) of a fresh process that trains a small model (d_model 32, 1 layer) on the corpus
    directory `corpus_dir`, stopped after `steps` steps of epoch 1; also its resident memory after the imports and
    once the data is ready (vocabularies built, token ids cached)."""
    import json
    import subprocess
    import sys

    code = f"""
import json, resource
from pathlib import Path

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

from qkvtrace.config import ModelConfig, TrainConfig
from qkvtrace.train import train
imports = rss("VmRSS")
seen = {{}}

class Stop(Exception):
    pass

def progress(e):
    if e["event"] == "start":
        seen.update(pairs=e["pairs"], ready=rss("VmRSS"))
    if e["event"] == "step" and e["step"] >= {steps}:
        raise Stop

try:
    train(ModelConfig(d_model=32, n_heads=2, n_layers=1, d_ff=64, max_len=32),
          TrainConfig(corpus={str(corpus_dir)!r}, epochs=1, checkpoints=(1,), batch_size={batch_size}),
          Path({str(out)!r}) / "run", force=True, progress=progress)
except Stop:
    pass
print(json.dumps({{"pairs": seen["pairs"], "rss_imports_mb": imports, "rss_ready_mb": seen["ready"],
                  "rss_peak_mb": rss("VmHWM")}}))
"""
    # The child's own peak (VmHWM): ru_maxrss would carry the parent's over across fork + exec.
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode:
        raise QkvtraceError(f"the training process failed: {(res.stderr.strip().splitlines() or ['?'])[-1]}")
    return {"steps": steps, "batch_size": batch_size, **json.loads(res.stdout.strip().splitlines()[-1])}
