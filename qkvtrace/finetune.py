"""Fine-tuning a Hugging Face encoder-decoder (or training its architecture from scratch) into a run directory.

The run directory is a run like any other (run.json, metrics.jsonl, checkpoints/epoch-NNN.safetensors and
checkpoints/resume.safetensors, every file written atomically), plus `base/` holding the model's configuration and
tokenizer (save_pretrained, no weights). Checkpoint writing, optimizer state, gradient clipping, batching and the
per-epoch seeding are train.py's own, so `--resume` continues bit for bit on CPU: epoch e shuffles with numpy's
Generator seeded by (seed, e) and its dropout draws from torch's generator re-seeded with (seed, e).

Tied weights (shared embeddings, the output layer) are stored once; the checkpoint's metadata names the aliases.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qkvtrace.errors import QkvtraceError

log = logging.getLogger("qkvtrace")


@dataclass
class _Weights:
    """What train.save_weights needs of a model: state_dict() and cfg; here with tied tensors stored once."""
    tensors: dict
    cfg: object

    def state_dict(self) -> dict:
        return self.tensors


@dataclass
class _Side:
    """One side of a tokenizer as train.encode_pairs wants a vocabulary: text -> ids."""
    encode: object


def untied_state(model) -> tuple[dict, dict]:
    """(tensors with each storage once, {alias: kept name}) of a model whose weights may be tied."""
    kept, aliases, seen = {}, {}, {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            kept[name] = t
    return kept, aliases


def load_state(model, tensors: dict, meta: dict, path: Path) -> None:
    """Load checkpoint tensors (tied ones restored from their aliases) into `model`; a misfit is one line."""
    from qkvtrace.train import load_weights

    aliases = json.loads(meta.get("tied", "{}"))
    full = {k: v for k, v in tensors.items() if not k.startswith("optim.")}
    full.update({alias: full[name] for alias, name in aliases.items()})
    load_weights(model, full, path)


def finetune(init: str, run_dir: Path | str, corpus: str = "builtin", epochs: int = 3, checkpoints=None,
             lr: float = 5e-5, batch_size: int = 16, seed: int = 0, clip: float = 1.0, from_scratch: bool = False,
             src_lang: str = "en", tgt_lang: str = "de", val_fraction: float = 0.1, max_len: int = 128,
             resume: bool = False, force: bool = False, device: str = "cpu", progress=None):
    """Fine-tune the model `init` (hf:NAME, a save_pretrained folder) on `corpus`, keeping checkpoints.

    from_scratch : train the architecture from random weights (seeded by `seed`) instead of the pretrained ones.
    max_len : pairs longer than this many pieces on either side are left out.
    Returns the run as a model source (`sources.open_source(run_dir)`).
    """
    import torch

    from qkvtrace.config import TrainConfig, default_checkpoints, to_dict
    from qkvtrace.corpus import load_corpus
    from qkvtrace.files import atomic_write_json, atomic_write_text
    from qkvtrace.hf import HFSource, load_model, model_language, pad_batch
    from qkvtrace import files
    from qkvtrace.train import (RUN_FILES, bucket_batches, clip_grad_norm, commit_epoch, encode_pairs,
                                load_optimizer, make_optimizer, read_metrics, read_safetensors, resolve_device,
                                resume_entry, versions)

    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    if resume and force:
        raise QkvtraceError("contradict each other: choose one", param=("resume", "force"))
    exists = run_dir.is_dir() and any(run_dir.iterdir())
    if exists and not (resume or force):
        raise QkvtraceError(f"run directory {run_dir} already exists; pass {{resume}} to continue it or {{force}} "
                            "to start it over", mentions=("resume=True", "force=True"))
    if force and exists:
        foreign = sorted(p.name for p in run_dir.iterdir()
                         if p.name not in RUN_FILES | {"base"} and not p.name.startswith("."))
        if foreign:
            raise QkvtraceError(f"{run_dir}: not a qkvtrace run (holds {', '.join(foreign[:5])}); force only "
                                "starts a run over, choose an empty or new directory", param="run_dir")
    if resume and resume_entry(run_dir) is None:
        raise QkvtraceError(f": {run_dir} has no checkpoint to resume from; start it over with {{force}}",
                            param="resume", mentions=("force=True",))
    train_cfg = TrainConfig(corpus=corpus, src_lang=src_lang, tgt_lang=tgt_lang, val_fraction=val_fraction,
                            epochs=epochs, checkpoints=tuple(checkpoints) if checkpoints else None, seed=seed,
                            batch_size=batch_size, lr=lr, clip=clip, device="auto")
    options = {"init": init, "from_scratch": from_scratch, "max_len": max_len, "train": to_dict(train_cfg)}
    data = load_corpus(corpus, src_lang=src_lang, tgt_lang=tgt_lang, seed=seed, val_fraction=val_fraction)
    if resume:
        old = json.loads((run_dir / "run.json").read_text())
        theirs = {k: old["hf"].get(k) for k in ("init", "from_scratch", "max_len")} | {"train": old["train"]}
        if theirs != options or old["corpus"]["content_hash"] != data.content_hash():
            diff = [k for k in options if options[k] != theirs.get(k)] + (
                ["corpus content"] if old["corpus"]["content_hash"] != data.content_hash() else [])
            raise QkvtraceError(f": the options differ from those {run_dir} was started with "
                                f"({', '.join(diff)}); resume with the same options, or start over with "
                                "{force}", param="resume", mentions=("force=True",))
    dev = resolve_device(device)

    source = HFSource([init])
    tok = source.tokenizer
    codes = source.language_codes()
    languages = None
    if codes:  # a multilingual model reads and writes the corpus's languages, not the tokenizer's defaults
        languages = {"src": model_language(data.src_lang, codes, "src_lang"),
                     "tgt": model_language(data.tgt_lang, codes, "tgt_lang")}
        source.set_languages(languages["src"], languages["tgt"])
    if from_scratch:
        from transformers import AutoModelForSeq2SeqLM

        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = AutoModelForSeq2SeqLM.from_config(source.config, attn_implementation="eager",
                                                      dtype=torch.float32)
        model = model.to(dev)
    else:
        model = load_model(init, dev)
    pad_id = source.config.pad_token_id

    # train.encode_pairs reads `.encode(text)` of a source and a target vocabulary: here the tokenizer's two sides,
    # with a multilingual model's language codes where the model expects them (HFSource.encode_target: NLLB's
    # code after the start token, mBART's code as the decoder's start).
    src_side = _Side(lambda text: tok(text)["input_ids"])
    tgt_side = _Side(source.encode_target)
    train_src, train_tgt, dropped = encode_pairs(data.train, src_side, tgt_side, max_len)
    val_src, val_tgt, _ = encode_pairs(data.val, src_side, tgt_side, max_len)
    if not train_src:
        raise QkvtraceError(f"corpus {data.name}: no training pair fits {max_len} pieces")
    if dropped:
        log.warning("%d training pairs longer than %d pieces were left out", dropped, max_len)

    opt = make_optimizer(model, lr)
    start_epoch, metrics = 1, []
    if resume:
        entry = resume_entry(run_dir)
        path = run_dir / entry["file"]
        files.verify(path, entry["sha256"], "run.json", "start the run over with {force}", mentions=("force=True",))
        tensors, meta = read_safetensors(path)
        load_state(model, tensors, meta, path)
        load_optimizer(opt, tensors, meta["param_groups"])
        start_epoch = int(meta["epoch"]) + 1
        metrics = [m for m in read_metrics(run_dir) if m["epoch"] < start_epoch]
        listed = old.get("checkpoints")
        if not isinstance(listed, list):  # written before checksums were recorded: list what is there
            listed = [{"epoch": e, "file": f"checkpoints/epoch-{e:03d}.safetensors",
                       "sha256": files.sha256_file(ckpt_dir / f"epoch-{e:03d}.safetensors")}
                      for e in range(1, start_epoch) if (ckpt_dir / f"epoch-{e:03d}.safetensors").is_file()]
        carry = {"files": old.get("files") or _base_files(run_dir), "resume": entry,
                 "checkpoints": [c for c in listed if c["epoch"] < start_epoch]}
    else:
        if force and ckpt_dir.is_dir():
            for f in ckpt_dir.glob("*.safetensors"):
                f.unlink()
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        source.config.save_pretrained(run_dir / "base")
        tok.save_pretrained(run_dir / "base")
        atomic_write_text(run_dir / "metrics.jsonl", "")
        carry = {"files": _base_files(run_dir), "checkpoints": [], "resume": None}
    # As for runs of our own (train.commit_epoch): run.json lists every committed file with its sha256, and the
    # source made from the run verifies them when it loads one.
    record = {"format": "qkvtrace-run/2", "hf": {**options, "family": source.model_cfg.family,
                                                 "class": type(model).__name__, "languages": languages},
              "model": to_dict(source.model_cfg), "train": to_dict(train_cfg), "corpus": data.describe(),
              "pairs_dropped_too_long": dropped, "seed": seed, "device": str(dev), "complete": False,
              "versions": versions(), "epochs_done": start_epoch - 1, **carry}
    atomic_write_json(run_dir / "run.json", record)

    n_steps = math.ceil(len(train_src) / batch_size)
    if progress:
        progress({"event": "start", "epochs": epochs, "start_epoch": start_epoch, "steps": n_steps,
                  "pairs": len(train_src), "device": str(dev)})
    devices = [dev.index or 0] if dev.type == "cuda" else []
    for epoch in range(start_epoch, epochs + 1):
        t0 = time.perf_counter()
        rng = np.random.default_rng([seed, epoch])
        loss_sum = tokens = 0
        model.train()
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed * 1_000_003 + epoch)
            for step, idx in enumerate(bucket_batches(train_src, train_tgt, batch_size, rng), 1):
                loss, n = _loss(model, [train_src[i] for i in idx], [train_tgt[i] for i in idx], pad_id, dev)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                clip_grad_norm(model.parameters(), clip)
                opt.step()
                loss_sum += loss.item() * n
                tokens += n
                if progress:
                    progress({"event": "step", "epoch": epoch, "step": step, "steps": n_steps,
                              "loss": loss_sum / tokens, "tokens_per_s": tokens / (time.perf_counter() - t0)})
        seconds = time.perf_counter() - t0
        model.eval()
        row = {"epoch": epoch, "train_loss": loss_sum / tokens,
               **_evaluate(model, source, val_src, val_tgt, pad_id, dev),
               "seconds": seconds, "tokens_per_s": tokens / seconds,
               "eval_seconds": time.perf_counter() - t0 - seconds}
        metrics.append(row)
        kept, aliases = untied_state(model)
        commit_epoch(run_dir, record, _Weights(kept, source.model_cfg), opt, epoch, epoch in train_cfg.checkpoints,
                     metrics, metadata={"tied": json.dumps(aliases)})
        if progress:
            progress({"event": "epoch", **row})
    record["complete"] = True
    atomic_write_json(run_dir / "run.json", record)
    from qkvtrace.sources import open_source

    return open_source(run_dir)


def _base_files(run_dir: Path) -> dict[str, str]:
    """sha256 of the architecture and tokenizer files in run_dir/base, by path relative to the run."""
    from qkvtrace.files import sha256_file

    return {f"base/{p.name}": sha256_file(p) for p in sorted((Path(run_dir) / "base").iterdir()) if p.is_file()}


def _loss(model, src_ids, tgt_ids, pad_id, device):
    """Mean cross-entropy of the next pieces of the targets (batch of id lists, start token first)."""
    import torch.nn.functional as F

    from qkvtrace.hf import pad_batch

    src, src_mask = pad_batch(src_ids, pad_id, device)
    tgt, tgt_mask = pad_batch(tgt_ids, pad_id, device)
    logits = model(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt[:, :-1],
                   decoder_attention_mask=tgt_mask[:, :-1], use_cache=False).logits  # (batch, tgt_pos-1, d_vocab)
    gold = tgt[:, 1:].masked_fill(tgt_mask[:, 1:] == 0, -100)  # -100: padding, not scored
    n = int((gold != -100).sum())
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), gold.reshape(-1), ignore_index=-100), n


def _evaluate(model, source, src_ids, tgt_ids, pad_id, device, batch_size: int = 32) -> dict:
    """Validation loss, perplexity, token accuracy (teacher-forced), exact match and BLEU of greedy `generate`."""
    import sacrebleu
    import torch

    from qkvtrace.hf import pad_batch

    if not src_ids:
        return dict.fromkeys(("val_loss", "val_ppl", "val_token_acc", "val_exact_match", "val_bleu"), math.nan)
    total = n_tok = n_ok = exact = 0
    hyps, refs = [], []
    tok = source.tokenizer
    with torch.no_grad():
        for i in range(0, len(src_ids), batch_size):
            s, t = src_ids[i:i + batch_size], tgt_ids[i:i + batch_size]
            src, src_mask = pad_batch(s, pad_id, device)
            tgt, tgt_mask = pad_batch(t, pad_id, device)
            logits = model(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt[:, :-1],
                           decoder_attention_mask=tgt_mask[:, :-1], use_cache=False).logits
            gold, keep = tgt[:, 1:], tgt_mask[:, 1:].bool()
            total += float(torch.nn.functional.cross_entropy(logits[keep], gold[keep], reduction="sum"))
            n_tok += int(keep.sum())
            n_ok += int((logits.argmax(-1)[keep] == gold[keep]).sum())
            out = model.generate(input_ids=src, attention_mask=src_mask, num_beams=1, do_sample=False,
                                 max_new_tokens=min(source.model_cfg.max_len - 1, 2 * src.shape[1] + 10))
            for pred, ref in zip(out.tolist(), t):
                hyp = tok.decode(pred, skip_special_tokens=True).strip()
                gold_text = tok.decode(ref, skip_special_tokens=True).strip()
                exact += hyp == gold_text
                hyps.append(hyp)
                refs.append(gold_text)
    val_loss = total / max(n_tok, 1)
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)), "val_token_acc": n_ok / max(n_tok, 1),
            "val_exact_match": exact / len(src_ids), "val_bleu": sacrebleu.corpus_bleu(hyps, [refs], force=True).score}
