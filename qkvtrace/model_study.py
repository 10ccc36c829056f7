"""The study's claims on a model you bring (`qkvtrace study --model REF`): a Hugging Face encoder-decoder, a
fine-tuning run, or a run of our own.

Every claim is decided by the study's own verdict functions on the study's English sentence sets (the English->German
sets). A claim that cannot be judged on the model says so and why (e.g. movement needs two checkpoints). With T5's
relative positions, a token's layer-0 q, k and v do not depend on its position at all; that is checked and reported as
a finding of its own.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np

from qkvtrace.errors import QkvtraceError

# The study's sentence sets (qkvtrace/data/study.toml): the pair and the permuted sentences.
PAIR = ("we want to eat apple", "we want to eat bread")
PERMUTED = ("we can eat apple", "apple eat can we")


def study_model(ref, out: Path | str, force: bool = False, progress: Callable[[str], None] | None = None) -> dict:
    """Run every claim that applies to the model `ref` into `out` (report.md, index.html, verdicts.json).

    Returns {"out": Path, "verdicts": [Verdict], "not_applicable": [(claim, reason)], "seconds": float}.
    """
    from qkvtrace.compare import similarity
    from qkvtrace.extract import extract
    from qkvtrace.files import atomic_write_json, prepare_out_dir
    from qkvtrace.report import Paragraph, Report, Section, Table, write_report
    from qkvtrace.sources import open_source
    from qkvtrace.corpus import builtin_sample
    from qkvtrace.study import (ALL_KINDS, Verdict, verdict_context_clustering, verdict_movement,
                                verdict_permutation, verdict_same_position)

    kinds = ",".join(ALL_KINDS)

    t0 = time.perf_counter()
    say = progress or (lambda msg: None)
    source = open_source(ref, "--model")
    out = Path(out)
    prepare_out_dir(out, force)
    epochs = source.checkpoint_epochs()
    if not epochs:
        raise QkvtraceError(f"--model {ref}: has no checkpoints yet; train it first")
    last = epochs[-1]
    n_layers = source.model_cfg.n_layers
    model_info = source.info.get("model", {})
    positions = model_info.get("positions", "learned")
    verdicts: list[Verdict] = []
    not_applicable: list[tuple[str, str]] = []

    say(f"1/4 \"eat\" in \"{PAIR[0]}\" vs \"{PAIR[1]}\"")
    enc = extract(source, list(PAIR), epochs=epochs, sites="encoder.self", kinds=kinds, patterns=False)
    same = verdict_same_position(enc.where(token="eat"))
    verdicts.append(same)
    if positions == "relative":
        say("   relative positions: layer-0 q, k, v of one word at different positions")
        verdicts.append(_position_free(source, epochs))

    say("2/4 clustering by context")
    try:
        ctx = extract(source, builtin_sample("buy", 30, 0), words="buy", epochs=epochs, sites="encoder.self",
                      kinds=kinds, patterns=False)
        verdicts.append(verdict_context_clustering(ctx, "buy"))
    except QkvtraceError as e:
        ctx = None
        not_applicable.append(("Clustering by context", f"the sentence set gives no rows for \"buy\" ({e})"))

    say("3/4 permutation")
    a, b = PERMUTED
    translations = {s: t.text for s, t in zip(PERMUTED, source.translate(list(PERMUTED), last))}
    tables = {(kind, layer): similarity(source, a, b, kind=kind, site="decoder.cross", layer=layer,
                                        epochs=[last])[0]
              for kind in ("q", "k", "v", "x4", "pattern") for layer in range(n_layers)}
    verdicts += verdict_permutation(tables, (translations[a], translations[b]))

    say("4/4 movement between checkpoints")
    if len(epochs) < 2:
        not_applicable.append(("Movement during training", f"one checkpoint ({last}): movement needs two or more "
                               "(pass a fine-tuning run, or several references joined by commas)"))
    elif ctx is not None:
        verdicts.append(verdict_movement(ctx))

    family = model_info.get("family", "qkvtrace")
    verdict_table = Table(["claim", "verdict", "evidence", "rule"],
                          [[v.claim, v.verdict, v.evidence, v.rule] for v in verdicts], "Each claim, decided by the "
                          "numbers")
    blocks = [verdict_table]
    if not_applicable:
        blocks.append(Table(["claim", "why it does not apply"], [list(x) for x in not_applicable],
                            "Claims that do not apply"))
    sections = [Section("Verdicts", blocks),
                Section("Model", [Paragraph(
                    f"{source.path}: {family}, {n_layers} layers, {source.model_cfg.n_heads} heads, d_model "
                    f"{source.model_cfg.d_model}, positions {positions}; checkpoints {', '.join(map(str, epochs))}. "
                    f"Translations of the permuted pair at checkpoint {last}: \"{translations[a]}\" / "
                    f"\"{translations[b]}\".")])]
    atomic_write_json(out / "verdicts.json", {"model": str(source.path), "checkpoints": epochs,
                                              "verdicts": [asdict(v) for v in verdicts],
                                              "not_applicable": [{"claim": c, "reason": r} for c, r in not_applicable]})
    write_report(out, Report(f"qkvtrace study of {source.path}", sections, intro=[Paragraph(
        "The word-context clustering study's claims, measured on this model with the study's English sentence "
        "sets; subword pieces are pooled to words by their mean.")]))
    return {"out": out, "verdicts": verdicts, "not_applicable": not_applicable,
            "seconds": time.perf_counter() - t0}


def _position_free(source, epochs):
    """A finding for relative-position models: the same word's layer-0 q, k, v at two different positions."""
    from qkvtrace.extract import extract
    from qkvtrace.study import IDENTICAL, Verdict, cos as _cos

    sents = ["eat apple", "i can eat apple"]
    t = extract(source, sents, words="eat", epochs=epochs, sites="encoder.self", kinds="q,k,v", layers=0,
                patterns=False)
    cos = {}
    for kind in "qkv":
        rows = t.where(kind=kind, epoch=epochs[-1])
        a, b = (rows.where(sentence_id=i).vectors()[0] for i in (0, 1))
        cos[kind] = _cos(a, b)
    pos = sorted(set(t.meta["position"].tolist()))
    holds = min(cos.values()) >= IDENTICAL
    return Verdict(
        key="t5-positions",
        claim="Relative positions (finding): \"eat\" at two different positions has the same layer-0 q, k and v, "
              "so positions reach attention only through the score bias",
        verdict="holds" if holds else "does not hold",
        rule=f"holds if the cosine of layer-0 q, k and v between the two positions is ≥ {IDENTICAL}",
        evidence=f"\"eat\" at piece positions {pos} in \"{sents[0]}\" / \"{sents[1]}\": "
                 + ", ".join(f"{k} {c:.6f}" for k, c in cos.items()),
        numbers={k: float(np.round(c, 6)) for k, c in cos.items()})
