import json

import numpy as np
import pytest

from qkvtrace.config import ModelConfig
from qkvtrace.errors import QkvtraceError
from qkvtrace.extract import extract
from qkvtrace.study import (IDENTICAL, cluster_scores, context_sentences, run_study, verdict_context_clustering,
                            verdict_same_position)
from qkvtrace.table import VectorTable

PAIR = ["we want to eat apple", "we want to eat bread"]


def test_same_position_verdict_uses_measured_cosines(tiny_run):
    t = extract(tiny_run, PAIR, words="eat", epochs=[2, 4], sites="encoder.self")
    v = verdict_same_position(t)
    q = t.where(kind="q", layer=0, epoch=4)
    a, b = q.where(sentence_id=0).vectors()[0], q.where(sentence_id=1).vectors()[0]
    assert v.numbers["epoch 4 layer 0 q"] == pytest.approx(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)),
                                                          abs=1e-6)
    assert v.numbers["epoch 4 layer 0 q"] >= IDENTICAL
    z = v.numbers["epoch 4 layer 0 z"]
    assert v.verdict == ("holds" if z < IDENTICAL else "partly")
    assert str(IDENTICAL) in v.rule and "x1" in v.evidence


def synthetic(separate_post: bool, seed=0):
    """Rows of one word in 60 sentences, three categories; post-attention kinds separate when asked."""
    rng = np.random.default_rng(seed)
    cats = np.repeat(["food", "drink", "reading"], 20)
    centers = {c: rng.normal(size=8) * 5 for c in ("food", "drink", "reading")}
    meta, X = {k: [] for k in ("epoch", "sentence_id", "sentence", "side", "position", "token", "transition", "site",
                               "layer", "head", "kind", "label", "dim", "category")}, []
    for kind in ("q", "k", "v", "z", "attn_out", "layer_out"):
        for i, c in enumerate(cats):
            post = kind in ("z", "attn_out", "layer_out")
            X.append(centers[c] + rng.normal(size=8) if post and separate_post else rng.normal(size=8))
            for col, val in (("epoch", 1), ("sentence_id", i), ("sentence", f"s{i}"), ("side", "src"),
                             ("position", 1), ("token", "buy"), ("transition", ""), ("site", "encoder.self"),
                             ("layer", 0), ("head", "concat"), ("kind", kind), ("label", "x"), ("dim", 8),
                             ("category", c)):
                meta[col].append(val)
    return VectorTable({k: np.array(v, dtype=object if isinstance(v[0], str) else np.int64)
                        for k, v in meta.items()}, np.array(X, dtype=np.float32))


def test_context_clustering_verdict_follows_the_numbers():
    good = verdict_context_clustering(synthetic(True))
    assert good.verdict == "holds"
    scores = cluster_scores(synthetic(True))
    assert scores[(1, 0, "z")][0] > 0.5 and scores[(1, 0, "q")][0] < 0.05
    assert scores[(1, 0, "z")][1] == pytest.approx(1.0)
    assert verdict_context_clustering(synthetic(False)).verdict == "does not hold"


def test_context_sentences_balanced_and_seeded():
    a = context_sentences("buy", 10, seed=0)
    assert len(a) == 30 and all(" buy" in s or s.startswith("buy") for s in a)
    assert a == context_sentences("buy", 10, seed=0) and a != context_sentences("buy", 10, seed=1)


def test_study_end_to_end_tiny_and_deterministic(tmp_path):
    tiny = ModelConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32, dropout=0.0)
    kw = dict(epochs=(1, 2), cache_root=tmp_path / "runs", model=tiny)
    r1 = run_study(tmp_path / "s1", **kw)
    assert not r1["reused"]
    out = r1["out"]
    for name in ("report.md", "index.html", "verdicts.json", "figures/1-encoder-eat-3d.png",
                 "figures/1-encoder-eat-3d.html", "tables/similarity-k-encoder.self-L0-e2.csv"):
        assert (out / name).is_file(), name
    verdicts = json.loads((out / "verdicts.json").read_text())["verdicts"]
    assert len(verdicts) == 4 and all(v["verdict"] in ("holds", "partly", "does not hold") for v in verdicts)
    report = (out / "report.md").read_text()
    assert "figures/1-encoder-eat-2d.png" in report and "Verdicts" in report
    r2 = run_study(tmp_path / "s2", **kw)
    assert r2["reused"]
    assert (tmp_path / "s2" / "verdicts.json").read_text() == (out / "verdicts.json").read_text()
    with pytest.raises(QkvtraceError, match="already exists"):
        run_study(tmp_path / "s1", **kw)
