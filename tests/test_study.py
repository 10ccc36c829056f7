"""The study's verdict functions on hand-made tables (each verdict follows its numbers and rule), the bootstrap and
probe helpers against independent computations, and the whole study end to end on a tiny model: report sections
with their numbers, two fresh trainings giving identical verdicts, and several seeds compared."""

import json
from pathlib import Path

import numpy as np
import pytest

from qkvtrace.compare import SimilarityTable
from qkvtrace.errors import QkvtraceError
from qkvtrace.study import (IDENTICAL, KEEPS, _cosine_distances, _silhouette_purity, bootstrap_scores,
                            control_labels, spread, verdict_context_clustering, verdict_decoder_scatter,
                            verdict_five_sentences, verdict_permutation, verdict_same_position)
from qkvtrace.table import VectorTable

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ("epoch", "sentence_id", "sentence", "side", "position", "token", "transition", "site", "layer", "head",
           "kind", "label", "dim", "category")


def table(rows: list[dict], X) -> VectorTable:
    """A VectorTable from row dicts (missing columns get neutral values) and their vectors."""
    base = dict(epoch=1, sentence_id=0, sentence="s", side="src", position=0, token="w", transition="",
                site="encoder.self", layer=0, head="concat", kind="q", label="x", dim=np.shape(X)[1], category="")
    meta = {c: [dict(base, **r)[c] for r in rows] for c in COLUMNS}
    return VectorTable({c: np.array(v, dtype=object if isinstance(v[0], str) else np.int64) for c, v in meta.items()},
                       np.asarray(X, dtype=np.float32))


def test_same_position_verdict_uses_measured_cosines(tiny_run):
    from qkvtrace.extract import extract

    t = extract(tiny_run, ["we want to eat apple", "we want to eat bread"], words="eat", epochs=[2, 4],
                sites="encoder.self", kinds="q,k,v,x1,x4,layer_out")
    v = verdict_same_position(t)
    q = t.where(kind="q", layer=0, epoch=4)
    a, b = q.where(sentence_id=0).vectors()[0], q.where(sentence_id=1).vectors()[0]
    assert v.numbers["epoch 4 layer 0 q"] == pytest.approx(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)),
                                                          abs=1e-6)
    assert v.numbers["epoch 4 layer 0 q"] >= IDENTICAL
    post = [v.numbers[f"epoch 4 layer 0 {k}"] for k in ("x1", "x4", "layer_out")]
    assert v.verdict == ("holds" if max(post) < IDENTICAL else "partly")
    assert str(IDENTICAL) in v.rule and f"x1 {post[0]:.4f}" in v.evidence


def test_decoder_scatter_spread_and_rule():
    rng = np.random.default_rng(0)
    rows, X = [], []
    for site, scale in (("encoder.self", 0.1), ("decoder.self", 3.0)):
        for kind in ("q", "k", "v", "x1"):
            for i in range(6):
                rows.append(dict(site=site, kind=kind, position=i))
                X.append(np.ones(8) + scale * rng.normal(size=8))
    t = table(rows, X)
    v = verdict_decoder_scatter(t)
    enc_q = np.array(X[:6])
    unit = enc_q / np.linalg.norm(enc_q, axis=1, keepdims=True)
    by_hand = np.mean([1 - unit[i] @ unit[j] for i in range(6) for j in range(i + 1, 6)])
    assert v.numbers["encoder"]["q"] == pytest.approx(by_hand, abs=1e-4) == pytest.approx(spread(enc_q), abs=1e-4)
    assert v.verdict == "holds" and all(v.numbers["decoder"][k] > v.numbers["encoder"][k] for k in "qkv")
    swapped = table([dict(r, site={"encoder.self": "decoder.self", "decoder.self": "encoder.self"}[r["site"]])
                     for r in rows], X)
    assert verdict_decoder_scatter(swapped).verdict == "does not hold"


def sim(kind, rows, cols, matrix, layer=0):
    return SimilarityTable(4, kind, "decoder.cross", layer, "concat", "we can eat apple", "apple eat can we",
                           rows, cols, np.asarray(matrix, dtype=float))


def test_permutation_sub_claims_are_decided_separately():
    words = ["we", "can", "eat", "apple"]
    steps = ["sos->wir", "wir->können", "können->apfel", "apfel->essen", "essen->eos"]
    diag = np.eye(5) * 0.95 + 0.01
    reverse = np.full((4, 4), 0.2)
    for i, w in enumerate(words):
        reverse[i, words[::-1].index(w)] = 0.99 if w != "can" else 0.85   # "can" keeps its k/v only partly
    tables = {("q", 0): sim("q", steps, steps, diag), ("k", 0): sim("k", words, words[::-1], reverse),
              ("v", 0): sim("v", words, words[::-1], np.where(reverse > 0.5, 0.99, 0.1)),
              ("x4", 0): sim("x4", steps, steps, np.eye(5) * 0.5), ("pattern", 0): sim("pattern", steps, steps, diag)}
    verdicts = {v.key: v for v in verdict_permutation(tables, ("wir können apfel essen",) * 2)}
    assert [verdicts[k].verdict for k in ("c1", "c2", "c3", "c4")] == ["holds", "partly", "does not hold", "holds"]
    assert verdicts["c2"].numbers["k layer 0"] == {"mean": pytest.approx((0.99 * 3 + 0.85) / 4, abs=1e-4),
                                                   "min": 0.85}
    assert verdicts["c3"].numbers["x4 layer 0"]["mean"] == 0.5 and verdicts["c1"].numbers["same_translation"]
    assert str(KEEPS) in verdicts["c2"].rule


def test_five_sentences_verdict():
    rng = np.random.default_rng(1)
    base = rng.normal(size=16)
    rows, X = [], []
    for i in range(5):
        for kind, layer, noise in (("q", 0, 0), ("k", 0, 0), ("v", 0, 0), ("x1", 0, 2), ("x4", 0, 2),
                                   ("layer_out", 1, 2)):
            rows.append(dict(sentence_id=i, kind=kind, layer=layer, token="eat"))
            X.append(base + noise * rng.normal(size=16))
    v = verdict_five_sentences(table(rows, X))
    assert v.verdict == "holds" and v.numbers["q"] == pytest.approx(1.0)
    x1 = np.array(X[3::6])
    assert v.numbers["x1"] == pytest.approx(1 - spread(x1), abs=1e-4) and v.numbers["x1"] < KEEPS
    same = table([dict(r, kind=r["kind"]) for r in rows], [base] * len(rows))
    assert verdict_five_sentences(same).verdict == "does not hold"   # q, k, v similar, but nothing scatters


def synthetic(separate_post: bool, seed=0):
    """Rows of "buy" in 60 sentences with 12 objects in three categories; post-attention kinds separate if asked."""
    rng = np.random.default_rng(seed)
    objects = {c: [f"{c}{i}" for i in range(4)] for c in ("food", "drink", "reading")}
    centers = {c: rng.normal(size=8) * 5 for c in objects}
    rows, X = [], []
    for kind in ("q", "k", "v", "x1", "x4", "layer_out"):
        for i in range(60):
            c = ("food", "drink", "reading")[i % 3]
            post = kind in ("x1", "x4", "layer_out")
            rows.append(dict(sentence_id=i, sentence=f"i buy {objects[c][i % 4]}", token="buy", kind=kind,
                             category=c))
            X.append(centers[c] + rng.normal(size=8) if post and separate_post else rng.normal(size=8))
    return table(rows, X)


def test_context_clustering_verdict_intervals_and_probe():
    good = verdict_context_clustering(synthetic(True), n_bootstrap=50)
    assert good.verdict == "holds"
    x1 = good.numbers["x1"]
    assert x1["silhouette"][1] <= x1["silhouette"][0] <= x1["silhouette"][2] and x1["silhouette"][0] > 0.5
    assert x1["purity"][0] == pytest.approx(1.0) and x1["probe"]["accuracy"] == pytest.approx(1.0)
    # The control task can be learnt only by memorising objects, which random q vectors do not allow.
    assert good.numbers["q"]["probe"]["selectivity"] < 0.3 and "Hewitt & Liang" in good.rule
    assert verdict_context_clustering(synthetic(False), n_bootstrap=20).verdict == "does not hold"


def test_probe_is_sklearns_pipeline_same_folds_and_accuracies():
    """probe() is cross_val_score(make_pipeline(StandardScaler(), LogisticRegression()), StratifiedKFold(shuffle,
    seed)) over numpy: the same folds for uneven classes, the same weights, the same accuracy and control accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from qkvtrace.study import FOLDS, fit_logistic, probe, stratified_folds

    rng = np.random.default_rng(4)
    y = np.array(["food"] * 29 + ["drink"] * 23 + ["reading"] * 35, dtype=object)
    rng.shuffle(y)
    for seed in (0, 3):
        ours = stratified_folds(y.astype(str), FOLDS, seed)
        theirs = np.empty(len(y), dtype=int)
        for f, (_, test) in enumerate(StratifiedKFold(FOLDS, shuffle=True, random_state=seed).split(y, y)):
            theirs[test] = f
        assert np.array_equal(ours, theirs)

    X = rng.normal(size=(len(y), 12))
    W, b = fit_logistic(X, np.unique(y, return_inverse=True)[1], 3)
    reference = LogisticRegression(tol=1e-10, max_iter=10_000).fit(X, np.unique(y, return_inverse=True)[1])
    np.testing.assert_allclose(W, reference.coef_.T, atol=1e-5)
    centres = {c: rng.normal(size=12) for c in ("food", "drink", "reading")}
    control = rng.permutation(y)
    for shift in (0.0, 0.6, 3.0):   # from chance to separable
        Xs = X + shift * np.array([centres[c] for c in y])
        got = probe(Xs, y, control, seed=1)
        pipeline = make_pipeline(StandardScaler(), LogisticRegression(tol=1e-10, max_iter=10_000))
        cv = StratifiedKFold(FOLDS, shuffle=True, random_state=1)
        expect = [float(np.mean(cross_val_score(pipeline, Xs, labels.astype(str), cv=cv))) for labels in (y, control)]
        assert (got["accuracy"], got["control"]) == pytest.approx(expect, abs=1e-12), shift
        assert got["selectivity"] == pytest.approx(expect[0] - expect[1])
    assert probe(X, y, control)["accuracy"] < 0.6 < probe(X + 3.0 * np.array([centres[c] for c in y]), y, control)[
        "accuracy"]


def test_bootstrap_scores_without_copies_equal_the_project_scores():
    from qkvtrace.project import neighbour_purity, silhouette

    rng = np.random.default_rng(2)
    X, y = rng.normal(size=(45, 6)), np.repeat(["a", "b", "c"], 15)
    X[:15] += 1.5
    s, p = _silhouette_purity(_cosine_distances(X), y, np.arange(45), 5)
    assert s == pytest.approx(silhouette(X, y), abs=1e-9) and p == pytest.approx(neighbour_purity(X, y, 5))
    a, b = bootstrap_scores(X, y, n=40, seed=3), bootstrap_scores(X, y, n=40, seed=3)
    assert a == b and a["silhouette"][0] == pytest.approx(s) and a["silhouette"][1] < s < a["silhouette"][2]


def test_control_labels_are_one_random_label_per_word_type():
    objects = np.array(["apple", "beer", "apple", "book", "bread", "beer"], dtype=object)
    labels = np.array(["food", "drink", "food", "reading", "food", "drink"], dtype=object)
    c = control_labels(objects, labels, seed=0)
    assert c[0] == c[2] and c[1] == c[5]                                     # one label per type
    assert sorted(c[[0, 1, 3, 4]]) == sorted(labels[[0, 1, 3, 4]])           # the types' labels, permuted
    assert any(not np.array_equal(control_labels(objects, labels, seed=s), labels) for s in range(5))


def test_packaged_study_file_is_the_user_copy_and_the_sentence_sets_live_there():
    from qkvtrace.corpus import STUDY_FILE, STUDY_SENTENCES, builtin_corpus
    from qkvtrace.experiment import load_experiment

    assert STUDY_FILE.read_bytes() == (ROOT / "experiments" / "study.toml").read_bytes()
    exp = load_experiment(STUDY_FILE)
    items = [s.src for name in ("pair", "permuted", "five") for s in exp.sentences[name]]
    assert list(STUDY_SENTENCES) == list(dict.fromkeys(items))
    train = {p.src for p in builtin_corpus(seed=3).train}
    assert {"we want to eat apple", "we can eat apple", "i can eat bread"} <= train
    assert [v.type for v in exp.verdicts] == ["same_position", "decoder_scatter", "permutation", "five_sentences",
                                              "context_clustering", "movement"]
    assert len(exp.sentences["buy"]) == 90


TINY = ["model.d_model=16", "model.n_heads=2", "model.n_layers=1", "model.d_ff=32", "model.max_len=16",
        "model.dropout=0.0"]


def test_study_end_to_end_tiny_deterministic_and_per_seed(tmp_path):
    from qkvtrace.study import run_study

    from qkvtrace.experiment.schema import load_experiment
    from qkvtrace.study import study_file
    from qkvtrace.train import train_or_reuse

    kw = dict(epochs=(1, 2), overrides=TINY)
    a = run_study(tmp_path / "a", seeds=(0, 1), cache_root=tmp_path / "cache-a", **kw)
    assert not a["reused"]
    ja = json.loads((tmp_path / "a" / "verdicts.json").read_text())
    assert ja["seeds"] == [0, 1]
    # training is deterministic: the seed-0 run trained again from nothing into another cache has the same bytes
    exp = load_experiment(study_file(), ["train.epochs=2", "train.checkpoints=[1,2]", *TINY, "train.seed=0"])
    again, reused = train_or_reuse(exp.model, exp.train, tmp_path / "cache-b")
    first = json.loads((tmp_path / "a" / "run" / "run.json").read_text())
    assert not reused and (tmp_path / "cache-a" / again.path.name).is_dir()  # the same training hash
    assert [c["sha256"] for c in json.loads((again.path / "run.json").read_text())["checkpoints"]] == \
        [c["sha256"] for c in first["checkpoints"]]
    keys = [v["key"] for v in ja["by_seed"]["0"]]
    assert keys == ["a", "b", "c1", "c2", "c3", "c4", "d", "e", "f"]
    assert [x["key"] for x in ja["agreement"]] == keys
    assert all(x["agree"] == (x["verdicts"]["0"] == x["verdicts"]["1"]) for x in ja["agreement"])

    out = tmp_path / "a"
    # A verdict number recomputed from the saved vectors of the "pair" set.
    from qkvtrace.table import load_vectors

    pair = load_vectors(out / "vectors" / "pair").where(site="encoder.self", token="eat", kind="x1", layer=0,
                                                         epoch=2)
    x, y = pair.where(sentence_id=0).vectors()[0], pair.where(sentence_id=1).vectors()[0]
    a_numbers = ja["by_seed"]["0"][0]["numbers"]
    assert a_numbers["epoch 2 layer 0 x1"] == pytest.approx(float(x @ y / np.linalg.norm(x) / np.linalg.norm(y)),
                                                            abs=1e-5)
    md, html = (out / "report.md").read_text(), (out / "index.html").read_text()
    headings = [line for line in md.splitlines() if line.startswith("## ")]
    assert len(headings) == len(set(headings)) and headings[0] == "## Verdicts"
    for v in ja["by_seed"]["0"]:
        assert f"| {v['key']} |" in md and f"**{v['verdict']}**" in md
        assert f"<strong>{v['verdict']}</strong>" in html
    assert "seed 1" in md and "claims agree across seeds" in html
    for name in ("encoder-eat-3d.png", "encoder-eat-3d.html", "context-buy-x1.png", "attention-permuted-1.png"):
        assert (out / "figures" / name).stat().st_size > 1000, name
    assert (out / "figures" / "encoder-eat-3d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 'href="figures/encoder-eat-2d.html"' in html                    # interactive page beside the PNG
    with pytest.raises(QkvtraceError, match="already exists"):
        run_study(out, seeds=(0,), cache_root=tmp_path / "cache-a", **kw)


def test_cli_study_errors_name_options(capsys):
    from qkvtrace.cli import main

    for args, option in ((["--epochs", "3,1"], "--epochs 3,1"), (["--seeds", "1,1"], "--seeds 1,1")):
        with pytest.raises(SystemExit) as e:
            main(["study", *args])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {option}:") and err.count("\n") == 1
