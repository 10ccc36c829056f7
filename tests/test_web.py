"""The plotly pages (without a browser: the figure's data and the written file) and the Q/K transform."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import re

import numpy as np
import pytest

from qkvtrace.errors import QkvtraceError
from test_plot import make_table, spread_coords


def traces(fig, role):
    return [t for t in fig.data if (t.meta or {}).get("role") == role]


@pytest.mark.parametrize("dims", [2, 3])
def test_scatter_figure_groups_kinds_hover_and_animation(dims):
    from qkvtrace.web import scatter_figure

    table = make_table(epochs=(1, 15, 30), n_sentences=2, tgt=dims == 3, words=("sos", "wir", "kennen"))
    coords = spread_coords(len(table), dims=dims)
    fig = scatter_figure(table, coords, trajectories=True, title="decoder <self>")
    points = traces(fig, "points")
    # one trace per (sentence, kind); a legend click on a sentence hides its kinds and its trajectories together
    assert [(t.legendgroup, t.name) for t in points] == [("sentence 0", "q"), ("sentence 0", "k"),
                                                        ("sentence 1", "q"), ("sentence 1", "k")]
    assert {t.marker.symbol for t in points if t.name == "q"} != {t.marker.symbol for t in points if t.name == "k"}
    assert sum(len(t.x) for t in points) == len(table)
    assert {t.legendgroup for t in traces(fig, "trajectory")} == {"sentence 0", "sentence 1"}
    assert fig.layout.legend.groupclick == "togglegroup"
    # the hover card: label, word (the transition on the decoder side), kind, site, layer, head, epoch, sentence
    row = points[0].customdata[0]
    expected = "sos->wir@q@1" if dims == 3 else "sos@q@1"
    assert row[0] == expected and row[1] == ("sos->wir" if dims == 3 else "sos") and row[2] == "q"
    assert "%{customdata[7]}" in points[0].hovertemplate
    # each point at its coordinates
    i = row[-1]
    assert points[0].x[0] == pytest.approx(coords[i, 0])
    # frames: "all", then one per epoch holding that epoch's points and the trajectories up to it
    assert [f.name for f in fig.frames] == ["all", "1", "15", "30"]
    assert [s.label for s in fig.layout.sliders[0].steps] == ["all", "1", "15", "30"]
    for frame, epoch in zip(fig.frames[1:], (1, 15, 30)):
        shown = [t for t in frame.data if (t.meta or {}).get("role") == "points"]
        assert sum(len(t.x) for t in shown) == len(table) // 3
        assert {r[6] for t in shown for r in t.customdata} == {epoch}
    paths = lambda f: sum(sum(v is None for v in t.x) for t in f.data if (t.meta or {}).get("role") == "trajectory")
    assert [paths(f) for f in fig.frames] == [24, 0, 12, 24]  # segments drawn up to the current epoch


def test_scatter_page_offline_and_plotlyjs_modes(tmp_path):
    from qkvtrace.web import scatter_page

    table = make_table()
    page = scatter_page(table, spread_coords(len(table)), tmp_path / "a.html").read_text()
    assert not re.search(r"<script[^>]+src=", page) and len(page) > 1_000_000  # plotly.js inside
    sub = tmp_path / "figures"
    for name in ("b", "c"):
        scatter_page(table, spread_coords(len(table)), sub / f"{name}.html", plotlyjs="directory")
    text = (sub / "b.html").read_text()
    assert re.search(r'<script[^>]+src="plotly.min.js"', text) and len(text) < 100_000
    assert (sub / "plotly.min.js").stat().st_size > 1_000_000
    assert not re.search(r"(src|href)\s*=\s*[\"']?https?:", text)
    with pytest.raises(QkvtraceError, match=r"\.html"):
        scatter_page(table, spread_coords(len(table)), tmp_path / "x.png")


def test_plot_html_missing_plotly_is_one_line(tmp_path, monkeypatch, capsys):
    import builtins

    from qkvtrace.cli import main
    from qkvtrace.table import VectorTable

    d = tmp_path / "vec"
    make_table(n_sentences=2).save(d)
    real = builtins.__import__

    def no_plotly(name, *a, **kw):
        if name.startswith("plotly"):
            raise ImportError(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_plotly)
    with pytest.raises(SystemExit) as e:
        main(["plot", str(d), "--out", str(tmp_path / "x.html")])
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: writing .html figures needs the plotly package: pip install plotly\n"
    assert not (tmp_path / "x.html").exists()


def test_qk_joint_keeps_attention_and_coincides_centroids():
    from qkvtrace.project import qk_joint

    rng = np.random.default_rng(0)
    Q, K = rng.normal(1.0, 1.0, size=(7, 4)) * 3, rng.normal(-2.0, 0.5, size=(9, 4))
    Q2, K2 = qk_joint(Q, K)
    softmax = lambda S: np.exp(S - S.max(1, keepdims=True)) / np.exp(S - S.max(1, keepdims=True)).sum(1, keepdims=True)
    np.testing.assert_allclose(softmax(Q2 @ K2.T), softmax(Q @ K.T), atol=1e-12)
    np.testing.assert_allclose(Q2.mean(0), K2.mean(0), atol=1e-9)
    assert np.linalg.norm(Q2, axis=1).mean() == pytest.approx(np.linalg.norm(K2, axis=1).mean(), rel=1e-9)
    with pytest.raises(QkvtraceError, match="one width"):
        qk_joint(Q, K[:, :3])


# --- on a real extraction (the tiny trained run of conftest.py) ---

EAT = ["we want to eat apple", "we want to eat bread", "i can eat bread", "we can eat apple"]


@pytest.fixture(scope="module")
def eat_table(tiny_run):
    from qkvtrace.extract import extract

    return extract(tiny_run, EAT, words=["eat"], sites="encoder.self", kinds=["q", "k", "v", "z"], layers=0)


@pytest.mark.parametrize("method,frame", [("pca", "joint"), ("pca", "procrustes"), ("umap", "joint"),
                                          ("umap", "procrustes"), ("umap", "aligned-umap"), ("tsne", "joint"),
                                          ("tsne", "procrustes")])
def test_identical_vectors_get_identical_points(eat_table, method, frame, umap_compiled):
    from qkvtrace.project import identity_keys, project_epochs, unique_rows
    from qkvtrace.web import scatter_figure

    X = eat_table.vectors()
    coords = project_epochs(X, eat_table.meta["epoch"], identity_keys(eat_table), method=method, frame=frame)
    q1 = np.flatnonzero((eat_table.meta["kind"] == "q") & (eat_table.meta["epoch"] == 1))
    # layer-0 q of "eat" depends only on its position: 2 distinct vectors in 4 sentences, so 2 distinct points
    assert len(q1) == 4 and len(unique_rows(X[q1])[0]) == 2
    assert len({tuple(c) for c in coords[q1]}) == 2
    # every group of equal vectors, any kind or epoch, shares one point exactly
    U, inverse = unique_rows(X)
    assert len(U) < len(X)
    for u in range(len(U)):
        assert len({tuple(c) for c in coords[inverse == u]}) == 1
    fig = scatter_figure(eat_table, coords)
    drawn = {(x, y) for t in traces(fig, "points") for x, y, r in zip(t.x, t.y, t.customdata) if r[-1] in q1}
    assert len(drawn) == 2


def test_qk_joint_keeps_every_attention_pattern_of_a_real_extraction(tiny_run):
    from qkvtrace.extract import extract
    from qkvtrace.project import qk_joint

    sentences = [s for s, _ in __import__("conftest").PAIRS]
    table = extract(tiny_run, sentences, sites="encoder.self", kinds=["q", "k"], layers=0, heads="all",
                    specials=True, epochs=[4])
    for head in ("0", "1"):
        qrows = table.where(kind="q", head=head)
        krows = table.where(kind="k", head=head)
        Q, K = qrows.vectors().astype(np.float64), krows.vectors().astype(np.float64)
        Q2, K2 = qk_joint(Q, K)
        for p in table.patterns:
            s = p["sentence_id"]
            qs, ks = qrows.meta["sentence_id"] == s, krows.meta["sentence_id"] == s
            d = Q.shape[1]
            for A, B in ((Q[qs], K[ks]), (Q2[qs], K2[ks])):
                S = A @ B.T / np.sqrt(d)
                P = np.exp(S - S.max(1, keepdims=True))
                # the extracted attention pattern, recomputed from q and k, before and after the transform
                np.testing.assert_allclose(P / P.sum(1, keepdims=True), p["pattern"][int(head)], atol=2e-5)



def test_qk_pairs_follow_sentences_and_the_causal_mask(tiny_run):
    from qkvtrace.extract import extract
    from qkvtrace.project import qk_pairs

    sentences = [s for s, _ in __import__("conftest").PAIRS[:3]]
    for site in ("encoder.self", "decoder.self", "decoder.cross"):
        table = extract(tiny_run, sentences, sites=site, kinds=["q", "k"], layers=0, heads="0", specials=True,
                        epochs=[4])
        is_query = table.meta["kind"] == "q"
        qi, ki = qk_pairs(table.meta, is_query)
        expected = 0
        for s in range(3):
            nq = int((is_query & (table.meta["sentence_id"] == s)).sum())
            nk = int((~is_query & (table.meta["sentence_id"] == s)).sum())
            expected += nq * (nq + 1) // 2 if site == "decoder.self" else nq * nk  # the causal mask keeps j <= i
        assert len(qi) == len(ki) == expected > 0
        assert is_query[qi].all() and not is_query[ki].any()
        assert (table.meta["sentence_id"][qi] == table.meta["sentence_id"][ki]).all()
        if site == "decoder.self":
            assert (table.meta["position"][ki] <= table.meta["position"][qi]).all()


def test_qk_rank_correlation_measures_a_real_extraction_before_and_after_joining(tiny_run):
    from scipy.stats import spearmanr

    from qkvtrace.extract import extract
    from qkvtrace.project import describe_qk_joint, qk_joint_epochs, qk_rank_correlation

    sentences = [s for s, _ in __import__("conftest").PAIRS]
    table = extract(tiny_run, sentences, sites="encoder.self", kinds=["q", "k"], layers=0, heads="1",
                    specials=True, epochs=[1, 4])
    X = table.vectors().astype(np.float64)
    is_query = table.meta["kind"] == "q"
    joined = qk_joint_epochs(X, is_query, table.meta["epoch"])
    # the same numbers computed the long way: every query with every key of its sentence and epoch
    near_raw, near_joined, logits = [], [], []
    m = table.meta
    for i in np.flatnonzero(is_query):
        for j in np.flatnonzero(~is_query):
            if m["sentence_id"][i] == m["sentence_id"][j] and m["epoch"][i] == m["epoch"][j]:
                logits.append(X[i] @ X[j])
                near_raw.append(-np.linalg.norm(X[i] - X[j]))
                near_joined.append(-np.linalg.norm(joined[i] - joined[j]))
    before, pairs = qk_rank_correlation(X, X, is_query, m)
    after, _ = qk_rank_correlation(X, joined, is_query, m)
    assert pairs == len(logits)
    assert before == pytest.approx(spearmanr(near_raw, logits)[0], abs=1e-12)
    assert after == pytest.approx(spearmanr(near_joined, logits)[0], abs=1e-12)
    said, short = describe_qk_joint(X, joined, is_query, m)
    assert f"over {pairs:,} query-key pairs {before:+.2f} as extracted, {after:+.2f} joined" in said
    assert ("better than" in said) == (after > before) and f"{before:+.2f} -> {after:+.2f}" in short


def test_qk_joint_raises_the_rank_correlation_where_norms_differ_and_says_when_it_does_not():
    from qkvtrace.project import describe_qk_joint, qk_joint, qk_rank_correlation

    rng = np.random.default_rng(0)
    n, d = 40, 8
    meta = {"epoch": np.zeros(2 * n, int), "sentence_id": np.tile(np.arange(n) % 4, 2),
            "site": np.full(2 * n, "encoder.self"), "layer": np.zeros(2 * n, int), "head": np.zeros(2 * n, int),
            "position": np.tile(np.arange(n), 2)}
    is_query = np.arange(2 * n) < n
    # queries three times longer than keys: the distance follows the norms, joining makes it follow q . k
    Q, K = rng.normal(size=(n, d)) * 3, rng.normal(size=(n, d)) / 3
    X = np.vstack([Q, K])
    joined = np.vstack(qk_joint(Q, K))
    before, after = qk_rank_correlation(X, X, is_query, meta)[0], qk_rank_correlation(X, joined, is_query, meta)[0]
    assert after > before + 0.3
    assert "(nearness reflects attention better than" in describe_qk_joint(X, joined, is_query, meta)[0]
    # queries and keys far apart: shifting the keys onto the queries adds q . t, one constant per query, which
    # the attention of a query ignores but a comparison over all pairs does not
    Q, K = rng.normal(size=(n, d)) + 10 * np.eye(d)[0], rng.normal(size=(n, d)) - 10 * np.eye(d)[1]
    X = np.vstack([Q, K])
    joined = np.vstack(qk_joint(Q, K))
    assert qk_rank_correlation(X, joined, is_query, meta)[0] < qk_rank_correlation(X, X, is_query, meta)[0]
    assert "less well than" in describe_qk_joint(X, joined, is_query, meta)[0]


def test_plot_and_view_say_whether_joining_made_nearness_follow_attention(capsys, tmp_path, tiny_run):
    from qkvtrace.extract import extract

    sentences = [s for s, _ in __import__("conftest").PAIRS]
    d = tmp_path / "heads"
    extract(tiny_run, sentences, sites="decoder.cross", kinds=["q", "k"], layers=0, heads="0", specials=True,
            epochs=[1, 4]).save(d)
    capsys.readouterr()  # extraction's own notes
    code, out, err = run_main(capsys, "plot", d, "--qk-joint", "--out", tmp_path / "qk.html")
    note = re.fullmatch(r"note: queries and keys joined: rank correlation of -distance with q\.k over ([\d,]+) "
                        r"query-key pairs ([+-]\d\.\d\d) as extracted, ([+-]\d\.\d\d) joined \((.*)\)\n", err)
    assert code == 0 and note, err
    before, after = float(note[2]), float(note[3])
    assert note[4].startswith("nearness reflects attention better than" if after > before else
                              "nearness reflects attention less well than" if after < before else "as well as")
    assert f"{before:+.2f} -&gt; {after:+.2f}" in (tmp_path / "qk.html").read_text() or \
        f"{before:+.2f} -> {after:+.2f}" in (tmp_path / "qk.html").read_text()
    code, _, _ = run_main(capsys, "view", d, "--methods", "pca")
    page = (d / "explorer.html").read_text()
    assert code == 0 and f"over {note[1]} query-key pairs {note[2]} as extracted, {note[3]} joined" in page


def test_attention_figure_one_heatmap_per_epoch_and_head(tmp_path):
    from qkvtrace.web import attention_figure, write_page

    patterns = [np.full((2, 3, 4), 0.25), np.eye(3, 4)[None].repeat(2, axis=0)]
    keys = ["<sos>", "eat", "eat", "<eos>"]  # a token twice keeps two columns
    fig = attention_figure(patterns, ["sos->ich", "ich->esse", "esse->eos"], keys, ["epoch 1", "epoch 30"],
                           query_axis="query: target token", key_axis="key: source token", title="cross")
    assert len(fig.data) == 4 and [t.type for t in fig.data] == ["heatmap"] * 4
    assert list(fig.layout.xaxis.ticktext) == keys and fig.data[2].z[1][1] == 1.0
    assert fig.data[0].customdata[2][1] == ["esse->eos", "eat"]
    assert [a.text for a in fig.layout.annotations][:2] == ["epoch 1 · head 0", "epoch 1 · head 1"]
    with pytest.raises(QkvtraceError, match="4 key labels|labels"):
        attention_figure(patterns, ["a", "b"], keys, ["epoch 1", "epoch 30"])
    page = write_page(fig, tmp_path / "attention.html", plotlyjs="directory")
    assert (tmp_path / "plotly.min.js").is_file() and "heatmap" in page.read_text()


def run_main(capsys, *args):
    from qkvtrace.cli import main

    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_view_help_and_bad_options(capsys, tmp_path):
    from click.testing import CliRunner

    from qkvtrace.cli import cli

    res = CliRunner().invoke(cli, ["view", "--help"])
    assert res.exit_code == 0 and "Example" in res.output and "--neighbours" in res.output
    d = tmp_path / "vec"
    make_table(n_sentences=3, epochs=(1, 2)).save(d)
    code, _, err = run_main(capsys, "view", d, "--methods", "pca,mds")
    assert code == 2 and err == "error: --methods 'pca,mds': choose from pca, umap, tsne, e.g. pca,umap\n"
    (d / "explorer.html").write_text("mine")
    code, _, err = run_main(capsys, "view", d, "--methods", "pca")
    assert code == 2 and "already exists; pass --force" in err and (d / "explorer.html").read_text() == "mine"
    code, out, _ = run_main(capsys, "view", d, "--methods", "pca", "--force", "--neighbours", "3")
    assert code == 0 and out.startswith(f"wrote {d / 'explorer.html'}")
    page = (d / "explorer.html").read_text()
    assert "window.qkvReady" in page and not re.search(r"<script[^>]+src=", page)


def test_explorer_data_neighbours_and_spaces():
    import base64

    from qkvtrace.project import cosine_matrix
    from qkvtrace.web import explorer_data

    table = make_table(n_sentences=4, epochs=(1, 2), kinds=("q", "k"), dim=6)
    table.meta["head"] = np.full(len(table), "0", dtype=object)
    data = explorer_data(table, methods=["pca"], k=3)
    coords = np.frombuffer(base64.b64decode(data["coords"]["pca"]), dtype="<f4").reshape(-1, 2)
    assert coords.shape == (len(table), 2) and np.isfinite(coords).all()
    assert "pca|qk" in data["coords"]  # a single head holding q and k: the joined picture is offered
    index = np.frombuffer(base64.b64decode(data["neighbours"]["index"]), dtype="<i4").reshape(-1, 3)
    meta = table.meta
    for i in (0, 5, 17):
        same = np.flatnonzero((meta["kind"] == meta["kind"][i]) & (meta["epoch"] == meta["epoch"][i]))
        cos = cosine_matrix(table.X[[i]], table.X[same])[0]
        cos[same == i] = -np.inf
        assert list(index[i]) == list(same[np.argsort(-cos, kind="stable")[:3]])  # random vectors: no ties
    assert data["parameters"]["pca"]["encoder.self · layer 0 · head 0"].startswith("PCA")


def test_plot_qk_joint_checks_the_selection(capsys, tmp_path):
    d = tmp_path / "vec"
    table = make_table(n_sentences=3, epochs=(1, 2), kinds=("q", "k", "v"))
    table.save(d)
    code, _, err = run_main(capsys, "plot", d, "--qk-joint", "--out", tmp_path / "a.png")
    assert code == 2 and err.startswith("error: --qk-joint draws queries and keys together: select kinds q and k")
    code, _, err = run_main(capsys, "plot", d, "--qk-joint", "--where", "kind=q,k", "--out", tmp_path / "a.png")
    assert code == 2 and "needs one attention head" in err and not (tmp_path / "a.png").exists()
    table.meta["head"] = np.full(len(table), "1", dtype=object)
    table.save(tmp_path / "vec1")
    code, out, _ = run_main(capsys, "plot", tmp_path / "vec1", "--qk-joint", "--where", "kind=q,k", "--out",
                            tmp_path / "qk.html")
    assert code == 0 and "queries and keys joined" in (tmp_path / "qk.html").read_text()


@pytest.mark.parametrize("dims", [2, 3])
def test_scatter_figure_passes_plotlys_validation(dims):
    """The page's figure is built without plotly's per-property validation (for speed); plotly, validating
    every property of it, accepts it and changes nothing."""
    import json

    import plotly.graph_objects as go
    import plotly.io as pio

    from qkvtrace.web import scatter_figure

    table = make_table(epochs=(1, 15, 30), n_sentences=2, words=("we", "eat", "apple"))
    fig = scatter_figure(table, spread_coords(len(table), dims), trajectories=True)
    raw = json.loads(pio.to_json(fig, validate=False))
    checked = json.loads(pio.to_json(go.Figure(fig.to_plotly_json())))  # raises on any invalid property
    assert len(raw["frames"]) == 4 and raw["layout"]["template"]["layout"]["paper_bgcolor"] == "white"
    assert checked == raw
