"""Benchmarks against peers measured in the same run: our Transformer versus a `torch.nn.Transformer` of the same
dimensions, on the same batches, in the same process.

`bench_train` times training steps (forward, loss, backward, clip, Adam) of both models. Fairness rules: the same
batches in the same order, both models in train mode, warmup steps untimed, and ours/peer alternating in
interleaved rounds (the side that goes first alternates too) so that machine noise hits both; each batch's time is
the median over rounds. Thread settings are left as the caller has them. Throughput counts non-pad target tokens.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qkvtrace.config import ModelConfig, TrainConfig
from qkvtrace.errors import QkvtraceError
from qkvtrace.model import Transformer
from qkvtrace.train import make_optimizer, train_step
from qkvtrace.vocab import PAD_ID, Vocab

Progress = Callable[[dict], None]

MULTI30K_MODEL = ModelConfig(d_model=256, n_layers=3, n_heads=8, d_ff=512, dropout=0.1, max_len=128)
BENCH_CONFIGS = ("study", "multi30k")


class PeerTransformer(nn.Module):
    """The translation model a typical user writes on `torch.nn.Transformer` (as in the PyTorch tutorial).

    Token embedding * sqrt(d_model) plus a learned positional embedding, dropout; `nn.Transformer` (post-norm,
    ReLU, batch_first); a Linear head over every target position.
    """

    def __init__(self, cfg: ModelConfig, d_vocab_src: int, d_vocab_tgt: int, seed: int = 0):
        super().__init__()
        self.src_tok = nn.Embedding(d_vocab_src, cfg.d_model)
        self.tgt_tok = nn.Embedding(d_vocab_tgt, cfg.d_model)
        self.src_pos = nn.Embedding(cfg.max_len, cfg.d_model)
        self.tgt_pos = nn.Embedding(cfg.max_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.scale = math.sqrt(cfg.d_model)
        self.transformer = nn.Transformer(d_model=cfg.d_model, nhead=cfg.n_heads, num_encoder_layers=cfg.n_layers,
                                          num_decoder_layers=cfg.n_layers, dim_feedforward=cfg.d_ff,
                                          dropout=cfg.dropout, batch_first=True)
        self.generator = nn.Linear(cfg.d_model, d_vocab_tgt)
        g = torch.Generator().manual_seed(seed)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p, generator=g)

    def _embed(self, tok: nn.Embedding, pos: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.drop(tok(ids) * self.scale + pos(positions))  # (batch, pos, d_model)

    def loss(self, src: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Mean cross-entropy over the non-pad next tokens of `tgt` (batch, tgt_pos); returns (loss, n_tokens)."""
        tgt_in, gold = tgt[:, :-1], tgt[:, 1:]
        T = tgt_in.shape[1]
        # The tutorial's masks, all bool (mixing its float causal mask with bool padding masks is deprecated):
        # True = may NOT attend, torch's polarity, the opposite of ours.
        src_pad = src == PAD_ID  # (batch, src_pos)
        tgt_pad = tgt_in == PAD_ID  # (batch, tgt_pos)
        causal = torch.ones(T, T, dtype=torch.bool, device=src.device).triu(1)  # (tgt_pos, tgt_pos)
        hidden = self.transformer(
            self._embed(self.src_tok, self.src_pos, src), self._embed(self.tgt_tok, self.tgt_pos, tgt_in),
            tgt_mask=causal, src_key_padding_mask=src_pad, tgt_key_padding_mask=tgt_pad,
            memory_key_padding_mask=src_pad)  # (batch, tgt_pos, d_model)
        logits = self.generator(hidden)  # (batch, tgt_pos, d_vocab_tgt)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), gold.reshape(-1), ignore_index=PAD_ID)
        return loss, int((gold != PAD_ID).sum())


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _batches(corpus, cfg: ModelConfig, batch_size: int, n: int, seed: int):
    """(src_vocab, tgt_vocab, list of n (src, tgt) id tensors): one bucketed epoch, cycled if shorter than n."""
    from qkvtrace.train import bucket_batches, encode_pairs, pad

    src_vocab = Vocab.build(p.src for p in corpus.train)
    tgt_vocab = Vocab.build(p.tgt for p in corpus.train)
    src_ids, tgt_ids, _ = encode_pairs(corpus.train, src_vocab, tgt_vocab, cfg.max_len)
    order = bucket_batches(src_ids, tgt_ids, batch_size, np.random.default_rng([seed, 1]))
    chosen = [order[i % len(order)] for i in range(n)]
    batches = [(pad([src_ids[i] for i in idx]), pad([tgt_ids[i] for i in idx])) for idx in chosen]
    return src_vocab, tgt_vocab, batches


def _peer_step(model, opt, src, tgt, clip: float) -> None:
    """The training step a typical user writes: loss, backward, torch's clip_grad_norm_, Adam."""
    loss = model.loss(src, tgt)[0]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()


def _time_steps(step: Callable, batches, device) -> list[float]:
    """Seconds of each `step(src, tgt)` over `batches`."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for src, tgt in batches:
        sync()
        t0 = time.perf_counter()
        step(src, tgt)
        sync()
        times.append(time.perf_counter() - t0)
    return times


def _bench_one(name: str, cfg: ModelConfig, corpus, batch_size: int, steps: int, warmup: int, rounds: int,
               device: torch.device, seed: int, progress: Progress | None) -> dict:
    train_cfg = TrainConfig()
    row = {"config": name, "d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
           "d_ff": cfg.d_ff, "dropout": cfg.dropout, "batch_size": batch_size, "steps": steps, "rounds": rounds,
           "warmup": warmup, "device": str(device)}
    src_vocab, tgt_vocab, batches = _batches(corpus, cfg, batch_size, max(steps, warmup), seed)
    batches = [(s.to(device), t.to(device)) for s, t in batches]
    timed = batches[:steps]
    tokens = sum(int((t[:, 1:] != PAD_ID).sum()) for _, t in timed)

    ours = Transformer(cfg, len(src_vocab), len(tgt_vocab), seed=seed).to(device).train()
    peer = PeerTransformer(cfg, len(src_vocab), len(tgt_vocab), seed=seed).to(device).train()
    # Ours trains as `qkvtrace train` does (its train_step, fused Adam); the peer as a typical user writes it.
    ours_opt = make_optimizer(ours, train_cfg.lr)
    peer_opt = torch.optim.Adam(peer.parameters(), lr=train_cfg.lr)
    sides = {"ours": lambda src, tgt: train_step(ours, ours_opt, src, tgt, train_cfg.clip),
             "peer": lambda src, tgt: _peer_step(peer, peer_opt, src, tgt, train_cfg.clip)}
    for step in sides.values():
        for src, tgt in batches[:warmup]:
            step(src, tgt)

    per_step: dict[str, list[list[float]]] = {"ours": [], "peer": []}
    for r in range(rounds):
        # Alternate who goes first, so a slow spell at a round boundary does not always hit the same side.
        for side in (("ours", "peer") if r % 2 == 0 else ("peer", "ours")):
            per_step[side].append(_time_steps(sides[side], timed, device))
            if progress:
                progress({"event": "round", "config": name, "round": r + 1, "rounds": rounds, "side": side,
                          "seconds": sum(per_step[side][-1])})
    # Each batch's time is its median over rounds; a step's time is their mean.
    seconds = {side: sum(statistics.median(ts) for ts in zip(*runs)) for side, runs in per_step.items()}
    row.update({
        "n_batches": len(timed), "tokens": tokens,
        "ours_tokens_per_s": tokens / seconds["ours"], "peer_tokens_per_s": tokens / seconds["peer"],
        "ratio": seconds["peer"] / seconds["ours"],
        "ours_ms_per_step": 1000 * seconds["ours"] / len(timed), "peer_ms_per_step": 1000 * seconds["peer"] / len(timed),
        "n_params_ours": n_params(ours), "n_params_peer": n_params(peer), "note": None,
    })
    return row


def bench_train(config: str = "both", steps: int = 30, warmup: int = 5, device: str = "cpu", seed: int = 0,
                corpus_dir: str | Path = "data/multi30k", rounds: int = 3,
                progress: Progress | None = None) -> list[dict]:
    """Training throughput of our Transformer vs a `torch.nn.Transformer` peer of the same dimensions.

    Parameters
    ----------
    config : {"study", "multi30k", "both"}
        study: `ModelConfig()` defaults on the built-in corpus, batch 64. multi30k: d_model 256, 3 layers, 8 heads,
        d_ff 512, batch 128 on `corpus_dir` (the PyTorch tutorial's size).
    steps : int
        Batches timed per round: the first `steps` batches of one bucketed epoch (cycled if the epoch is shorter).
    warmup : int
        Untimed steps per model before the first round.
    device : str
        auto | cpu | cuda | mps.
    seed : int
        Seeds initialisation, batch order and dropout (inside a forked RNG: the caller's state is untouched).
    corpus_dir : str or Path
        Multi30k directory (train.en / train.de), relative to the current directory; if missing, the multi30k row
        carries a `note` and no timings.
    rounds : int
        Interleaved ours/peer rounds; each batch's time is its median over rounds.
    progress : callable, optional
        Receives {"event": "round", "config", "round", "rounds", "side", "seconds"} after each timed pass.

    Returns
    -------
    list of dict
        One per config: config, d_model, n_layers, n_heads, d_ff, dropout, batch_size, n_batches, tokens,
        ours_tokens_per_s, peer_tokens_per_s, ratio (ours / peer throughput), ours_ms_per_step, peer_ms_per_step,
        n_params_ours, n_params_peer, note (None, or why the config was skipped).
    """
    from qkvtrace.corpus import builtin_corpus, load_corpus
    from qkvtrace.train import resolve_device

    if config not in (*BENCH_CONFIGS, "both"):
        raise QkvtraceError(f"config {config!r}: expected study, multi30k or both")
    if steps < 1 or warmup < 0 or rounds < 1:
        raise QkvtraceError(f"steps {steps}, warmup {warmup}, rounds {rounds}: need steps >= 1, warmup >= 0, "
                            "rounds >= 1")
    dev = resolve_device(device)
    names = BENCH_CONFIGS if config == "both" else (config,)
    rows = []
    devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for name in names:
            if name == "study":
                cfg, corpus, batch_size = ModelConfig(), builtin_corpus(seed), TrainConfig().batch_size
            else:
                cfg, batch_size = MULTI30K_MODEL, 128
                path = Path(corpus_dir)
                if not (path / "train.en").exists() or not (path / "train.de").exists():
                    rows.append(_skipped(name, cfg, batch_size, f"no Multi30k at {path.resolve()} "
                                                                "(train.en/train.de); skipped"))
                    continue
                corpus = load_corpus(str(path))
            rows.append(_bench_one(name, cfg, corpus, batch_size, steps, warmup, rounds, dev, seed, progress))
    return rows


def _skipped(name: str, cfg: ModelConfig, batch_size: int, note: str) -> dict:
    row = {"config": name, "d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
           "d_ff": cfg.d_ff, "dropout": cfg.dropout, "batch_size": batch_size}
    for k in ("n_batches", "tokens", "ours_tokens_per_s", "peer_tokens_per_s", "ratio", "ours_ms_per_step",
              "peer_ms_per_step", "n_params_ours", "n_params_peer"):
        row[k] = None
    row["note"] = note
    return row


# --- extraction ---

def scratch_run(cfg: ModelConfig, corpus, run_dir: Path, seed: int = 0):
    """A run directory holding an untrained model as its epoch-1 checkpoint: enough to time extraction."""
    from qkvtrace.config import to_dict
    from qkvtrace.files import atomic_write_json
    from qkvtrace.train import Run, save_weights

    run_dir = Path(run_dir)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    src_vocab = Vocab.build(p.src for p in corpus.train)
    tgt_vocab = Vocab.build(p.tgt for p in corpus.train)
    src_vocab.save(run_dir / "src_vocab.json")
    tgt_vocab.save(run_dir / "tgt_vocab.json")
    model = Transformer(cfg, len(src_vocab), len(tgt_vocab), seed=seed)
    save_weights(run_dir / "checkpoints" / "epoch-001.safetensors", model, 1)
    atomic_write_json(run_dir / "run.json", {"model": to_dict(cfg), "train": to_dict(TrainConfig(epochs=1)),
                                             "corpus": corpus.describe(), "complete": True})
    return Run(run_dir)


def bench_extract(config: str = "study", n_sentences: int = 512, batch_size: int = 64, rounds: int = 3,
                  corpus_dir: str | Path = "data/multi30k", seed: int = 0) -> dict:
    """Cost of capturing every hook, relative to a plain batched forward over the same sentences.

    Three ways over the same teacher-forced batches, interleaved for `rounds` rounds (median per way):
    plain (eval forward, no hooks), capture (the same forward with every hook point kept by reference), and
    extract (qkvtrace.extract end to end: capture plus building the table's rows in memory, patterns off).

    Returns
    -------
    dict with seconds per way, capture_ratio, extract_ratio, n_sentences, n_tokens, n_rows, bytes_per_token.
    """
    import tempfile

    from qkvtrace.corpus import builtin_corpus, load_corpus
    from qkvtrace.extract import capture, extract
    from qkvtrace.train import pad

    if config == "study":
        cfg, corpus = ModelConfig(), builtin_corpus(seed)
    elif config == "multi30k":
        if not (Path(corpus_dir) / "train.en").exists():
            raise QkvtraceError(f"--corpus-dir {corpus_dir}: no Multi30k train.en there")
        cfg, corpus = MULTI30K_MODEL, load_corpus(str(corpus_dir))
    else:
        raise QkvtraceError(f"--config {config!r}: expected study or multi30k")
    pairs = corpus.train[:n_sentences]
    with tempfile.TemporaryDirectory() as tmp:
        run = scratch_run(cfg, corpus, Path(tmp) / "run", seed)
        model = run.model(1)
        sents = [(p.src, p.tgt) for p in pairs]
        ids = [(run.src_vocab.encode(s), run.tgt_vocab.encode(t)) for s, t in sents]
        ids = [(s, t) for s, t in ids if len(s) <= cfg.max_len and len(t) <= cfg.max_len]
        batches = [(pad([s for s, _ in ids[i:i + batch_size]]), pad([t[:-1] for _, t in ids[i:i + batch_size]]))
                   for i in range(0, len(ids), batch_size)]
        names = model.hook_names()

        def plain():
            with torch.no_grad():
                for src, tgt in batches:
                    model(src, tgt)

        def captured():
            with torch.no_grad():
                for src, tgt in batches:
                    with capture(model, names) as cache:
                        model(src, tgt)
                    assert len(cache) == len(names)

        table = {}

        def extracted():
            table["t"] = extract(run, sents, epochs=[1], batch_size=batch_size, patterns=False)

        ways = {"plain": plain, "capture": captured, "extract": extracted}
        for fn in ways.values():
            fn()  # warm-up
        times: dict[str, list[float]] = {k: [] for k in ways}
        for _ in range(rounds):
            for name, fn in ways.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    sec = {k: statistics.median(v) for k, v in times.items()}
    n_tokens = sum(len(s) - 2 + len(t) - 1 for s, t in ids)
    t = table["t"]
    return {"config": config, "n_sentences": len(ids), "n_tokens": n_tokens, "n_rows": len(t),
            "plain_s": sec["plain"], "capture_s": sec["capture"], "extract_s": sec["extract"],
            "capture_ratio": sec["capture"] / sec["plain"], "extract_ratio": sec["extract"] / sec["plain"],
            "bytes_per_token": t.X.nbytes / n_tokens}


def extract_peak_memory(config: str, n_sentences: int, max_memory_mb: float,
                        corpus_dir: str | Path = "data/multi30k") -> dict:
    """Peak resident memory (MB) of a fresh process that streams `n_sentences` to disk, every kind and site."""
    import json
    import subprocess
    import sys

    # The child's own peak: VmHWM of its address space. ru_maxrss would not do: Linux carries it over from the
    # parent across fork + exec, so a parent that had held a large table made every child look as large.
    code = f"""
import json, resource, sys, tempfile
from pathlib import Path

def peak_mb():
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

from qkvtrace.bench import scratch_run, MULTI30K_MODEL
from qkvtrace.config import ModelConfig
from qkvtrace.corpus import builtin_corpus, load_corpus
from qkvtrace.extract import extract
config = {config!r}
corpus = builtin_corpus() if config == "study" else load_corpus({str(corpus_dir)!r})
cfg = ModelConfig() if config == "study" else MULTI30K_MODEL
with tempfile.TemporaryDirectory() as tmp:
    run = scratch_run(cfg, corpus, Path(tmp) / "run")
    before = peak_mb()
    t = extract(run, [(p.src, p.tgt) for p in corpus.train[:{n_sentences}]], epochs=[1], out=Path(tmp) / "v",
                patterns=False, max_memory_mb={max_memory_mb}, load=False)
    size = (Path(tmp) / "v" / "X.npy").stat().st_size
    peak = peak_mb()
    rows = json.loads((Path(tmp) / "v" / "manifest.json").read_text())["n_rows"]
print(json.dumps({{"rows": rows, "x_mb": size / 2**20, "rss_before_mb": before, "rss_peak_mb": peak}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {"config": config, "n_sentences": n_sentences, "max_memory_mb": max_memory_mb,
            **json.loads(out.stdout.strip().splitlines()[-1])}
