"""The experiment file written back: an `Experiment` with every default filled in, as TOML that
`load_experiment` reads back to the same experiment (`outputs/NAME/config.resolved.toml`)."""

from __future__ import annotations

import json

from qkvtrace.config import to_dict
from qkvtrace.experiment.schema import (CORPUS_KEYS, TRAIN_KEYS, Experiment, ExtractOptions, ScatterFigure,
                                        SimilarityFigure)

def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML for {v!r}")


def _toml_table(header: str, values: dict) -> str:
    lines = [header] if header else []
    lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
    return "\n".join(lines) + "\n"


def _items_toml(items) -> list:
    return [[s.src, s.tgt] if s.tgt else s.src for s in items]


def resolved_toml(exp: Experiment, comment: str = "") -> str:
    """The experiment with every default filled in, as TOML that `load_experiment` reads back to the same thing."""
    train = to_dict(exp.train)
    parts = [f"# {line}\n" for line in comment.splitlines()] if comment else []
    parts.append(_toml_table("", {"name": exp.name, "description": exp.description}))
    if exp.source is not None:  # nothing is trained: the model is the source, its checkpoints the epochs
        parts.append(_toml_table("[model]", {"source": exp.source, "src_lang": exp.languages[0],
                                             "tgt_lang": exp.languages[1]}))
    else:
        parts.append(_toml_table("[corpus]", {k: train[v] for k, v in CORPUS_KEYS.items()}))
        parts.append(_toml_table("[model]", to_dict(exp.model)))
        parts.append(_toml_table("[train]", {k: train[k] for k in TRAIN_KEYS}))
    parts.append(_toml_table("[extract]", _extract_dict(exp.extract, exp)))
    for name, items in exp.sentences.items():
        parts.append(_toml_table("[[sentences]]", {"name": name, "items": _items_toml(items)}))
    for v in exp.verdicts:
        parts.append(_toml_table("[[verdicts]]", {"type": v.type, "sentences": v.sentences, **dict(v.params)}))
    for f in exp.figures:
        d = {"type": f.type, "name": f.name, "caption": f.caption}
        if isinstance(f, ScatterFigure):
            d.update(sentences=f.sentences, **_extract_dict(f.extract, exp), method=f.method, dims=f.dims,
                     frame=f.frame, color_by=f.color_by, trajectories=f.trajectories, label_mode=f.label_mode,
                     facet=f.facet or "none", format=list(f.format), seed=f.seed)
        elif isinstance(f, SimilarityFigure):
            d.update(a=f.a.src, b=f.b.src) if f.sentences is None else d.update(sentences=f.sentences)
            d.update(kind=f.kind, site=f.site, layer=f.layer, head=f.head,
                     epochs=list(f.epochs or exp.train.checkpoints))
        else:
            if f.sentences is None:
                d.update(sentence=f.items[0].src, target=f.items[0].tgt)
            else:
                d.update(sentences=f.sentences)
            d.update(site=f.site, layer=f.layer, epochs=list(f.epochs or exp.train.checkpoints), format=list(f.format))
        parts.append(_toml_table("[[figures]]", d))
    return "\n".join(parts)


def _extract_dict(o: ExtractOptions, exp: Experiment) -> dict:
    return {"words": list(o.words) if o.words else "all",
            "epochs": list(o.epochs or exp.train.checkpoints),
            "sites": list(o.sites), "kinds": list(o.kinds),
            "layers": list(o.layers) if o.layers is not None else list(range(exp.model.n_layers)),
            "heads": list(o.heads), "label": o.label, "specials": o.specials}
