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
from qkvtrace.train import make_optimizer
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


def _train_step(model, opt, loss_fn, src, tgt, clip: float) -> None:
    loss = loss_fn(src, tgt)[0]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()


def _time_steps(model, opt, loss_fn, batches, device, clip: float) -> list[float]:
    """Seconds of each training step over `batches`."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for src, tgt in batches:
        sync()
        t0 = time.perf_counter()
        _train_step(model, opt, loss_fn, src, tgt, clip)
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
    # Ours trains as `qkvtrace train` does (fused Adam); the peer as a typical user writes it (default Adam).
    sides = {"ours": (ours, make_optimizer(ours, train_cfg.lr), ours.loss),
             "peer": (peer, torch.optim.Adam(peer.parameters(), lr=train_cfg.lr), peer.loss)}
    for model, opt, loss_fn in sides.values():
        for src, tgt in batches[:warmup]:
            _train_step(model, opt, loss_fn, src, tgt, train_cfg.clip)

    per_step: dict[str, list[list[float]]] = {"ours": [], "peer": []}
    for r in range(rounds):
        # Alternate who goes first, so a slow spell at a round boundary does not always hit the same side.
        for side in (("ours", "peer") if r % 2 == 0 else ("peer", "ours")):
            model, opt, loss_fn = sides[side]
            per_step[side].append(_time_steps(model, opt, loss_fn, timed, device, train_cfg.clip))
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
                corpus_dir: str | Path = "../shared/data/multi30k", rounds: int = 3,
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
