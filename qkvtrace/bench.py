"""Benchmarks against peers measured in the same run, on the same batches, in the same process.

`bench_train` times training steps (forward, loss, backward, clip, Adam) of our Transformer and two peers of the
same dimensions: `PeerTransformer` (on `torch.nn.Transformer`) and `TutorialPeer` (the PyTorch seq2seq tutorial's
model written by hand). Fairness rules: the same batches in the same order, every model in train mode, warmup steps
untimed, and the models taking turns in interleaved rounds (who goes first rotates) so that machine noise hits all;
each batch's time is the median over rounds. Thread settings are left as the caller has them. Throughput counts
non-pad target tokens. Each model's mean loss over the last round's steps shows that speed was not bought with
worse learning.

`bench_extract` times `extract()` against a plain forward over the same batches.
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


class _Peer(nn.Module):
    """What both peers share: token embedding * sqrt(d_model) plus a learned positional embedding, then dropout,
    for each side; Xavier init of every matrix from a generator of their own."""

    def __init__(self, cfg: ModelConfig, d_vocab_src: int, d_vocab_tgt: int):
        super().__init__()
        self.src_tok, self.tgt_tok = nn.Embedding(d_vocab_src, cfg.d_model), nn.Embedding(d_vocab_tgt, cfg.d_model)
        self.src_pos, self.tgt_pos = nn.Embedding(cfg.max_len, cfg.d_model), nn.Embedding(cfg.max_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.scale = math.sqrt(cfg.d_model)

    def _init_weights(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p, generator=g)

    def _embed(self, tok: nn.Embedding, pos: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.drop(tok(ids) * self.scale + pos(positions))  # (batch, pos, d_model)


class PeerTransformer(_Peer):
    """The translation model a typical user writes on `torch.nn.Transformer` (as in the PyTorch tutorial).

    Token embedding * sqrt(d_model) plus a learned positional embedding, dropout; `nn.Transformer` (post-norm,
    ReLU, batch_first); a Linear head over every target position.
    """

    def __init__(self, cfg: ModelConfig, d_vocab_src: int, d_vocab_tgt: int, seed: int = 0):
        super().__init__(cfg, d_vocab_src, d_vocab_tgt)
        self.transformer = nn.Transformer(d_model=cfg.d_model, nhead=cfg.n_heads, num_encoder_layers=cfg.n_layers,
                                          num_decoder_layers=cfg.n_layers, dim_feedforward=cfg.d_ff,
                                          dropout=cfg.dropout, batch_first=True)
        self.generator = nn.Linear(cfg.d_model, d_vocab_tgt)
        self._init_weights(seed)

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


class _TutorialAttention(nn.Module):
    """The tutorial's multi-head attention: separate Q/K/V layers, energy masked where mask == 0, dropout on the
    attention weights."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.fc_q, self.fc_k, self.fc_v = (nn.Linear(d_model, d_model) for _ in range(3))
        self.fc_o = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)
        self.scale = math.sqrt(self.d_head)

    def forward(self, query, key, value, mask):
        B = query.shape[0]
        # (batch, pos, d_model) -> (batch, head, pos, d_head)
        q, k, v = (fc(x).view(B, -1, self.n_heads, self.d_head).permute(0, 2, 1, 3)
                   for fc, x in ((self.fc_q, query), (self.fc_k, key), (self.fc_v, value)))
        energy = torch.matmul(q, k.permute(0, 1, 3, 2)) / self.scale  # (batch, head, query_pos, key_pos)
        energy = energy.masked_fill(mask == 0, -1e10)
        attention = torch.softmax(energy, dim=-1)
        x = torch.matmul(self.dropout(attention), v)  # (batch, head, query_pos, d_head)
        x = x.permute(0, 2, 1, 3).contiguous().view(B, -1, self.n_heads * self.d_head)  # (batch, query_pos, d_model)
        return self.fc_o(x)


class _TutorialFeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float):
        super().__init__()
        self.fc_1, self.fc_2 = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.fc_2(self.dropout(torch.relu(self.fc_1(x))))


class _TutorialEncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = _TutorialAttention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.self_attn_norm, self.ff_norm = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.ff = _TutorialFeedForward(cfg.d_model, cfg.d_ff, cfg.dropout)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, src, src_mask):
        src = self.self_attn_norm(src + self.dropout(self.self_attn(src, src, src, src_mask)))
        return self.ff_norm(src + self.dropout(self.ff(src)))


class _TutorialDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = _TutorialAttention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.cross_attn = _TutorialAttention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.self_attn_norm, self.cross_attn_norm, self.ff_norm = (nn.LayerNorm(cfg.d_model) for _ in range(3))
        self.ff = _TutorialFeedForward(cfg.d_model, cfg.d_ff, cfg.dropout)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, tgt, memory, tgt_mask, src_mask):
        tgt = self.self_attn_norm(tgt + self.dropout(self.self_attn(tgt, tgt, tgt, tgt_mask)))
        tgt = self.cross_attn_norm(tgt + self.dropout(self.cross_attn(tgt, memory, memory, src_mask)))
        return self.ff_norm(tgt + self.dropout(self.ff(tgt)))


class TutorialPeer(_Peer):
    """The model as the PyTorch seq2seq tutorial ("Attention is All You Need" notebook) writes it by hand: our
    architecture, written plainly. Separate Q/K/V nn.Linear layers, the padding and causal masks always applied,
    dropout after the feed-forward ReLU, logits over every target position and plain F.cross_entropy."""

    def __init__(self, cfg: ModelConfig, d_vocab_src: int, d_vocab_tgt: int, seed: int = 0):
        super().__init__(cfg, d_vocab_src, d_vocab_tgt)
        self.encoder = nn.ModuleList(_TutorialEncoderLayer(cfg) for _ in range(cfg.n_layers))
        self.decoder = nn.ModuleList(_TutorialDecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.fc_out = nn.Linear(cfg.d_model, d_vocab_tgt)
        self._init_weights(seed)

    def loss(self, src: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Mean cross-entropy over the non-pad next tokens of `tgt` (batch, tgt_pos); returns (loss, n_tokens)."""
        tgt_in, gold = tgt[:, :-1], tgt[:, 1:]
        T = tgt_in.shape[1]
        src_mask = (src != PAD_ID)[:, None, None, :]  # (batch, 1, 1, src_pos), True = may attend
        causal = torch.ones(T, T, dtype=torch.bool, device=src.device).tril()  # (tgt_pos, tgt_pos)
        tgt_mask = (tgt_in != PAD_ID)[:, None, None, :] & causal  # (batch, 1, tgt_pos, tgt_pos)
        x = self._embed(self.src_tok, self.src_pos, src)
        for layer in self.encoder:
            x = layer(x, src_mask)
        y = self._embed(self.tgt_tok, self.tgt_pos, tgt_in)
        for layer in self.decoder:
            y = layer(y, x, tgt_mask, src_mask)
        logits = self.fc_out(y)  # (batch, tgt_pos, d_vocab_tgt)
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


def _peer_step(model, opt, src, tgt, clip: float) -> torch.Tensor:
    """The training step a typical user writes: loss, backward, torch's clip_grad_norm_, Adam."""
    loss = model.loss(src, tgt)[0]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    return loss


def _time_steps(step: Callable, batches, device, losses: list[float] | None = None) -> list[float]:
    """Seconds of each `step(src, tgt)` over `batches`; with `losses`, each step's loss (its return value, or the
    first item of it) is appended there, outside the timed span."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for src, tgt in batches:
        sync()
        t0 = time.perf_counter()
        loss = step(src, tgt)
        sync()
        times.append(time.perf_counter() - t0)
        if losses is not None:
            losses.append((loss[0] if isinstance(loss, tuple) else loss).item())
    return times


SIDES = ("ours", "peer", "tutorial")  # peer: the nn.Transformer model; tutorial: the hand-written TutorialPeer


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

    models = {"ours": Transformer(cfg, len(src_vocab), len(tgt_vocab), seed=seed),
              "peer": PeerTransformer(cfg, len(src_vocab), len(tgt_vocab), seed=seed),
              "tutorial": TutorialPeer(cfg, len(src_vocab), len(tgt_vocab), seed=seed)}
    models = {side: m.to(device).train() for side, m in models.items()}
    # Ours trains as `qkvtrace train` does (its train_step, fused Adam); the peers as a typical user writes them.
    opts = {side: make_optimizer(m, train_cfg.lr) if side == "ours" else torch.optim.Adam(m.parameters(),
                                                                                          lr=train_cfg.lr)
            for side, m in models.items()}
    step_fns = {side: (lambda src, tgt, m=m, o=opts[side]: train_step(m, o, src, tgt, train_cfg.clip)[0])
                if side == "ours" else (lambda src, tgt, m=m, o=opts[side]: _peer_step(m, o, src, tgt, train_cfg.clip))
                for side, m in models.items()}
    for step in step_fns.values():
        for src, tgt in batches[:warmup]:
            step(src, tgt)

    per_step: dict[str, list[list[float]]] = {side: [] for side in SIDES}
    last_losses: dict[str, list[float]] = {}
    for r in range(rounds):
        # Rotate who goes first, so a slow spell at a round boundary does not always hit the same side.
        for side in SIDES[r % 3:] + SIDES[: r % 3]:
            last_losses[side] = []
            times = _time_steps(step_fns[side], timed, device, last_losses[side])
            per_step[side].append(times)
            if progress:
                progress({"event": "round", "config": name, "round": r + 1, "rounds": rounds, "side": side,
                          "seconds": sum(times)})
    # Each batch's time is its median over rounds; a step's time is their mean.
    seconds = {side: sum(statistics.median(ts) for ts in zip(*runs)) for side, runs in per_step.items()}
    row.update({"n_batches": len(timed), "tokens": tokens})
    for side in SIDES:
        row[f"{side}_tokens_per_s"] = tokens / seconds[side]
        row[f"{side}_ms_per_step"] = 1000 * seconds[side] / len(timed)
        # All three saw the same batches in the same order: their losses after the same steps compare learning.
        row[f"{side}_loss"] = statistics.fmean(last_losses[side])
        row[f"n_params_{side}"] = n_params(models[side])
    row.update({"ratio": seconds["peer"] / seconds["ours"], "ratio_tutorial": seconds["tutorial"] / seconds["ours"],
                "note": None})
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
        One per config: config, d_model, n_layers, n_heads, d_ff, dropout, batch_size, n_batches, tokens;
        for each side S in ours, peer (nn.Transformer), tutorial: S_tokens_per_s, S_ms_per_step, S_loss (mean
        loss over the last round's steps), n_params_S; ratio (ours / peer throughput), ratio_tutorial (ours /
        tutorial); note (None, or why the config was skipped).
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
    for k in ("n_batches", "tokens", "ratio", "ratio_tutorial", *(f"{side}_{what}" for side in SIDES for what in
              ("tokens_per_s", "ms_per_step", "loss")), *(f"n_params_{side}" for side in SIDES)):
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

    Four ways over the same teacher-forced batches, interleaved for `rounds` rounds (who goes first rotates):
    plain (eval forward to the logits, no hooks), hidden (the same without the output layer, which extraction does
    not need), capture (the plain forward with every hook point kept by reference), and extract
    (qkvtrace.extract end to end: capture plus building the table's rows in memory, patterns off).
    Ratios are the median over rounds of each round's ratio, so a slow spell of a shared machine that spans one
    round cancels out; their range over the rounds comes along.

    Returns
    -------
    dict with seconds per way (median), capture_ratio, extract_ratio (both against plain), extract_ratio_range
    (min, max over rounds), extract_vs_hidden_ratio, n_sentences, n_tokens, n_rows, bytes_per_token.
    """
    import tempfile

    from qkvtrace.corpus import builtin_corpus, load_corpus
    from qkvtrace.extract import capture, extract
    from qkvtrace.train import pad

    if config == "study":
        cfg, corpus = ModelConfig(), builtin_corpus(seed)
    elif config == "multi30k":
        if not (Path(corpus_dir) / "train.en").exists():
            raise QkvtraceError(f"{corpus_dir}: no Multi30k train.en there", param="corpus_dir")
        cfg, corpus = MULTI30K_MODEL, load_corpus(str(corpus_dir))
    else:
        raise QkvtraceError(f"{config!r}: expected study or multi30k", param="config")
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

        def hidden():
            with torch.no_grad():
                for src, tgt in batches:
                    mask = model.src_mask(src)
                    model.decode(model.encode(src, mask), mask, tgt)

        def captured():
            with torch.no_grad():
                for src, tgt in batches:
                    with capture(model, names) as cache:
                        model(src, tgt)
                    assert len(cache) == len(names)

        table = {}

        def extracted():
            table["t"] = extract(run, sents, epochs=[1], batch_size=batch_size, patterns=False)

        ways = {"plain": plain, "hidden": hidden, "capture": captured, "extract": extracted}
        for fn in ways.values():
            fn()  # warm-up
        times: dict[str, list[float]] = {k: [] for k in ways}
        order = list(ways)
        for r in range(rounds):
            for name in order[r % 4:] + order[: r % 4]:
                t0 = time.perf_counter()
                ways[name]()
                times[name].append(time.perf_counter() - t0)
    sec = {k: statistics.median(v) for k, v in times.items()}
    ratios = {k: [a / b for a, b in zip(times[k], times["plain"])] for k in ("capture", "extract")}
    hidden_ratio = statistics.median(a / b for a, b in zip(times["extract"], times["hidden"]))
    n_tokens = sum(len(s) - 2 + len(t) - 1 for s, t in ids)
    t = table["t"]
    return {"config": config, "n_sentences": len(ids), "n_tokens": n_tokens, "n_rows": len(t),
            "plain_s": sec["plain"], "capture_s": sec["capture"], "extract_s": sec["extract"],
            "capture_ratio": statistics.median(ratios["capture"]), "extract_ratio": statistics.median(ratios["extract"]),
            "extract_ratio_range": (min(ratios["extract"]), max(ratios["extract"])),
            "hidden_s": sec["hidden"], "extract_vs_hidden_ratio": hidden_ratio,
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


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face models

# Helsinki-NLP/opus-mt-en-de's shape: 6+6 layers, d_model 512, 8 heads, d_ff 2048, 58,101 pieces (~74M parameters).
OPUS_MT_SHAPE = dict(vocab_size=58101, decoder_vocab_size=58101, d_model=512, encoder_layers=6, decoder_layers=6,
                     encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048,
                     max_position_embeddings=512, scale_embedding=True, share_encoder_decoder_embeddings=True)


def make_random_marian(out: Path | str, corpus_dir: str | Path = "data/multi30k", seed: int = 0,
                       vocab_size: int = 8000) -> dict:
    """Save a randomly initialised MarianMTModel of opus-mt-en-de's size into `out`, with a unigram tokenizer
    trained on the corpus's training text (so nothing is downloaded). Returns {"params": ..., "pieces": ...}."""
    from qkvtrace.corpus import load_corpus
    from qkvtrace.hf import _require_transformers

    _require_transformers()
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    corpus = load_corpus(str(corpus_dir))
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator((s for p in corpus.train for s in (p.src, p.tgt)),
                            trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                                    unk_token="<unk>", show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                           unk_token="<unk>")
    config = tf.MarianConfig(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, forced_eos_token_id=1,
                             **OPUS_MT_SHAPE)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = tf.MarianMTModel(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"params": n_params(model), "pieces": tok.get_vocab_size()}


def bench_extract_hf(ref: str, n_sentences: int = 1000, batch_size: int = 32, rounds: int = 2,
                     corpus_dir: str | Path = "data/multi30k", memory: bool = True,
                     max_memory_mb: float = 256) -> dict:
    """Capture cost for a Hugging Face model: every kind (q, k, v, z, attn_out, layer_out, pattern) at every site
    and layer, against plain forwards of the library's model over the same teacher-forced batches.

    Ways, interleaved for `rounds` rounds (median per way), after one warm-up batch each:
    plain (model(...): the library's whole forward, output layer included), stacks (its encoder and decoder
    stacks only, the forward capture runs), capture (stacks with every hook). With `memory`, a fresh process then
    streams the extraction of the same sentences, every kind, to disk under `max_memory_mb`, and reports its peak
    resident memory (VmHWM).
    """
    from qkvtrace.corpus import load_corpus
    from qkvtrace.extract import KINDS, SITES
    from qkvtrace.hf import capture, forward, hook_name, pad_batch
    from qkvtrace.sources import is_hf_reference, open_source

    single = not isinstance(ref, (list, tuple)) and "," not in str(ref)
    if single and not is_hf_reference(ref):  # checked before opening: a run's messages would suggest training one
        hint = "" if Path(str(ref)).exists() else ", and no such folder exists"
        raise QkvtraceError(f"{ref}: not a Hugging Face model (hf:NAME or a save_pretrained folder){hint}; "
                            "`qkvtrace bench make-marian DIR` writes a random one", param="ref")
    source = open_source(ref, "ref")
    if not (Path(corpus_dir) / "train.en").exists():
        raise QkvtraceError(f"{corpus_dir}: no Multi30k train.en there", param="corpus_dir")
    pairs = load_corpus(str(corpus_dir)).train[:n_sentences]
    model = source.model()
    cfg = source.model_cfg
    pad_id = source.config.pad_token_id
    ids = [(source.encode_source(p.src), source.encode_target(p.tgt)[:-1]) for p in pairs]
    batches = [pad_batch([s for s, _ in ids[i:i + batch_size]], pad_id)
               + pad_batch([t for _, t in ids[i:i + batch_size]], pad_id)  # (src, src_mask, tgt, tgt_mask)
               for i in range(0, len(ids), batch_size)]
    wanted = [(site, layer, kind) for site in SITES for layer in range(cfg.n_layers)
              for kind in (*KINDS, "pattern")]

    def plain(bs):
        for src, sm, tgt, tm in bs:
            model(input_ids=src, attention_mask=sm, decoder_input_ids=tgt, decoder_attention_mask=tm, use_cache=False)

    def stacks(bs):
        for src, sm, tgt, tm in bs:
            forward(model, src, sm, tgt, tm)

    def captured(bs):
        for src, sm, tgt, tm in bs:
            with capture(model, source.layout, cfg, wanted) as cache:
                forward(model, src, sm, tgt, tm)
            assert len(cache) == n_names

    n_names = len({hook_name(*w) for w in wanted})  # decoder.self and decoder.cross share a layer's layer_out
    ways = {"plain": plain, "stacks": stacks, "capture": captured}
    times: dict[str, list[float]] = {k: [] for k in ways}
    with torch.no_grad():
        for fn in ways.values():
            fn(batches[:1])
        for _ in range(rounds):
            for name, fn in ways.items():
                t0 = time.perf_counter()
                fn(batches)
                times[name].append(time.perf_counter() - t0)
    sec = {k: statistics.median(v) for k, v in times.items()}
    out = {"model": ref, "family": cfg.family, "params": n_params(model), "n_sentences": len(ids),
           "n_pieces": sum(len(s) + len(t) for s, t in ids), "batch_size": batch_size, "rounds": rounds,
           "threads": torch.get_num_threads(), "plain_s": sec["plain"], "stacks_s": sec["stacks"],
           "capture_s": sec["capture"], "capture_vs_plain": sec["capture"] / sec["plain"],
           "capture_vs_stacks": sec["capture"] / sec["stacks"]}
    if memory:
        out.update(_hf_stream_memory(ref, corpus_dir, n_sentences, batch_size, max_memory_mb))
    return out


def _hf_stream_memory(ref: str, corpus_dir, n_sentences: int, batch_size: int, max_memory_mb: float) -> dict:
    """A fresh process streams the extraction (every kind, site and layer, words pooled) to disk; its peak RSS."""
    import json
    import subprocess
    import sys

    code = f"""
import json, sys, tempfile, time
from pathlib import Path
from qkvtrace.corpus import load_corpus
from qkvtrace.extract import extract

def peak_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

pairs = load_corpus({str(corpus_dir)!r}).train[:{n_sentences}]
with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    extract({ref!r}, [(p.src, p.tgt) for p in pairs], out=Path(tmp) / "v", patterns=True, load=False,
            max_memory_mb={max_memory_mb}, batch_size={batch_size})
    seconds = time.perf_counter() - t0
    m = json.loads((Path(tmp) / "v" / "manifest.json").read_text())
    size = (Path(tmp) / "v" / "X.npy").stat().st_size + (Path(tmp) / "v" / "meta.csv").stat().st_size
    size += (Path(tmp) / "v" / "patterns.jsonl").stat().st_size
print(json.dumps({{"stream_rows": m["n_rows"], "stream_mb_written": size / 2**20, "stream_s": seconds,
                  "stream_peak_rss_mb": peak_mb(), "max_memory_mb": {max_memory_mb}}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode:
        raise QkvtraceError(f"the streaming extraction failed: {done.stderr.strip().splitlines()[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
