"""The study on a model you bring (`qkvtrace study --model REF`): a Hugging Face encoder-decoder, a fine-tuning run,
checkpoint-N folders, or a run of our own.

It runs the study's own experiment file (the same sentence sets, verdicts, figures and report as `qkvtrace study`)
with `[model] source = REF` instead of training. Claims that cannot be judged on the model are left out and listed
with the reason (movement needs two checkpoints or more). With relative positions only (T5), a token's layer-0 q, k
and v do not depend on its position at all; that is checked on the permuted sentences and reported as a finding.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable


def study_model(ref, out: Path | str, force: bool = False, progress: Callable[[str], None] | None = None,
                src_lang: str | None = None, tgt_lang: str | None = None, method: str = "pca",
                overrides=()) -> dict:
    """Run every claim of the study that applies to the model `ref` into `out` (report.md, index.html,
    verdicts.json, figures/, vectors/). `overrides`: `--set KEY=VALUE` items applied to the study's file (e.g. a
    smaller sentence sample).

    Returns {"out": Path, "verdicts": {0: [Verdict]}, "agreement": [...], "not_applicable": [(claim, reason)],
    "seconds": float}.
    """
    from qkvtrace.experiment.run import run_loaded
    from qkvtrace.experiment.schema import ScatterFigure, VerdictEntry, load_experiment
    from qkvtrace.sites import ALIASES, HEADED_KINDS
    from qkvtrace.sources import open_source
    from qkvtrace.study import study_file

    t0 = time.perf_counter()
    refs = ",".join(map(str, ref)) if isinstance(ref, (list, tuple)) else str(ref)
    source = open_source(refs, "ref", src_lang, tgt_lang)  # a bad reference or code: an error naming `ref`
    extra = [f"model.source={json.dumps(refs)}"]
    extra += [f"model.{k}={json.dumps(v)}" for k, v in (("src_lang", src_lang), ("tgt_lang", tgt_lang)) if v]
    exp = load_experiment(study_file(), [*overrides, *list(extra)])
    epochs = exp.train.checkpoints
    kept, not_applicable = [], []
    for entry in exp.verdicts:
        if entry.type == "movement" and len(epochs) < 2:
            not_applicable.append(("Movement during training", f"one checkpoint ({epochs[-1]}): movement needs two or "
                                   "more (pass a fine-tuning run, a folder of checkpoint-N folders, or several "
                                   "references joined by commas)"))
        else:
            kept.append(entry)
    if source.info.get("model", {}).get("positions") == "relative":
        kept.append(VerdictEntry("relative_positions", "permuted", (("word", "eat"),)))
    figures = []
    cfg = source.model_cfg
    inner = cfg.n_heads * getattr(cfg, "d_head", cfg.d_model // cfg.n_heads)
    for f in exp.figures:
        if isinstance(f, ScatterFigure):
            headed = {ALIASES.get(k, k) in HEADED_KINDS for k in f.extract.kinds}
            if inner != cfg.d_model and len(headed) == 2:
                not_applicable.append((f"Figure {f.name}", f"it projects q/k/v/z ({inner} wide: {cfg.n_heads} heads "
                                       f"x {inner // cfg.n_heads}) together with attn_out/layer_out ({cfg.d_model} "
                                       "wide, d_model) in one frame, which vectors of two widths cannot share"))
                continue
            f = replace(f, method=method)
        figures.append(f)
    exp = replace(exp, verdicts=tuple(kept), not_applicable=tuple(not_applicable), figures=tuple(figures),
                  description=f"The word-context clustering study on {refs}: every claim that applies, decided by "
                              "the study's numbers and rules on its English sentence sets.")
    result = run_loaded(exp, Path(out), force, progress)
    return dict(result, not_applicable=not_applicable, seconds=time.perf_counter() - t0)
