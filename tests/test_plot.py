import os

os.environ.setdefault("MPLBACKEND", "Agg")

import re

import numpy as np
import pytest

from qkvtrace.errors import QkvtraceError
from qkvtrace.plot import (attention_grid, describe_selection, format_labels, heatmap, save_figure, scatter,
                           scatter_figure)
from qkvtrace.table import VectorTable


def make_table(epochs=(1, 30), words=("we", "eat", "apple"), kinds=("q", "k"), n_sentences=1, tgt=False, dim=4):
    """A small VectorTable: one row per epoch, sentence, word and kind; target-side rows carry a transition."""
    rows = []
    for epoch in epochs:
        for s in range(n_sentences):
            for pos, word in enumerate(words):
                for kind in kinds:
                    transition = f"{word}->{words[pos + 1] if pos + 1 < len(words) else '<eos>'}" if tgt else ""
                    rows.append(dict(epoch=epoch, sentence_id=s, sentence=f"sentence {s}", side="tgt" if tgt else "src",
                                     position=pos, token=word, transition=transition,
                                     site="decoder.self" if tgt else "encoder.self", layer=0, head="concat",
                                     kind=kind, label="", dim=dim))
    meta = {c: np.array([r[c] for r in rows], dtype=np.int64 if isinstance(rows[0][c], int) else object)
            for c in rows[0]}
    return VectorTable(meta, np.random.default_rng(0).normal(size=(len(rows), dim)).astype(np.float32))


def spread_coords(n, dims=2, seed=0):
    """Points far apart on a grid (with jitter), so every label has room."""
    side = int(np.ceil(n ** (1 / dims)))
    grid = np.stack(np.meshgrid(*[np.arange(side)] * dims, indexing="ij"), -1).reshape(-1, dims)[:n]
    return grid * 10.0 + np.random.default_rng(seed).normal(scale=0.5, size=(n, dims))


def texts(ax):
    return [t.get_text().strip() for t in ax.texts]


def test_labels_use_word_or_transition():
    src = make_table()
    assert format_labels(src)[:2] == ["we@q@1", "we@k@1"]
    tgt = make_table(tgt=True, words=("sos", "wir"))
    assert format_labels(tgt, "{word}@{kind}@{epoch}")[0] == "sos->wir@q@1"
    assert format_labels(tgt, "{token}/{site}/L{layer}")[0] == "sos/decoder.self/L0"
    with pytest.raises(QkvtraceError, match="bad field 'colour'"):
        format_labels(src, "{colour}")


def test_describe_selection():
    text = describe_selection(make_table(epochs=(1, 15, 30)), "pca", "joint")
    assert text == "encoder.self · layer 0 · q, k · epochs 1, 15, 30 · PCA, joint frame · 18 points"


def test_png_holds_the_points_in_their_colours(tmp_path):
    from matplotlib.image import imread

    table = make_table()
    ax = scatter(table, spread_coords(len(table)))
    path = save_figure(ax.figure, tmp_path / "scatter.png")
    image = (imread(path)[..., :3] * 255).round().astype(int)  # (height, width, rgb)
    pixels = {tuple(c) for c in image.reshape(-1, 3)}
    colours = {tuple(int(round(255 * v)) for v in c[:3]) for coll in ax.collections for c in coll.get_facecolors()}
    assert colours
    # Every point colour is in the picture (as drawn, give or take antialiasing), on a mostly white background.
    for colour in colours:
        assert any(sum(abs(a - b) for a, b in zip(colour, px)) <= 6 for px in pixels), colour
    assert 0.5 < (image.min(axis=2) > 240).mean() < 0.995
    assert not list(tmp_path.glob(".*tmp*"))


def test_svg_keeps_label_text(tmp_path):
    table = make_table(epochs=(1, 30))
    ax = scatter(table, spread_coords(len(table)), label_mode="all")
    assert len(ax.texts) == len(table)
    svg = save_figure(ax.figure, tmp_path / "scatter.svg").read_text()
    for label in ("eat@k@30", "apple@q@1", "we@k@30"):
        assert f">{label}<" in svg
    assert "encoder.self · layer 0" in svg  # the title says what is shown
    pdf = save_figure(ax.figure, tmp_path / "scatter.pdf")
    assert pdf.read_bytes()[:5] == b"%PDF-"


def test_3d_axes_and_labels():
    table = make_table()
    ax = scatter(table, spread_coords(len(table), dims=3), trajectories=True)
    assert ax.name == "3d" and hasattr(ax, "zaxis")
    assert len(ax.texts) == len(table)
    with pytest.raises(QkvtraceError, match="3-D axes"):
        scatter(table, spread_coords(len(table), dims=3), ax=scatter(table, spread_coords(len(table))))


def test_trajectories_join_epochs_in_order():
    table = make_table(epochs=(30, 1, 15))  # rows not in epoch order
    coords = spread_coords(len(table))
    ax = scatter(table, coords, trajectories=True, label_mode="none")
    quiver = [c for c in ax.collections if c.get_gid() == "trajectories"]
    assert len(quiver) == 1
    n_ids = len(table) // 3
    assert quiver[0].N == 2 * n_ids  # two arrows per vector across three epochs
    # each arrow starts at an earlier epoch's point and ends at the next epoch's point of the same vector
    epoch_of = {tuple(np.round(c, 6)): e for c, e in zip(coords, table.meta["epoch"])}
    starts = np.column_stack([quiver[0].X, quiver[0].Y])
    ends = starts + np.column_stack([quiver[0].U, quiver[0].V])
    pairs = {(epoch_of[tuple(np.round(a, 6))], epoch_of[tuple(np.round(b, 6))]) for a, b in zip(starts, ends)}
    assert pairs == {(1, 15), (15, 30)}
    assert not [c for c in scatter(table, coords, label_mode="none").collections if c.get_gid() == "trajectories"]


def test_label_mode_ends_draws_fewer():
    table = make_table(epochs=(1, 15, 30))
    coords = spread_coords(len(table))
    n_all = len(scatter(table, coords, label_mode="all").texts)
    ends = scatter(table, coords, label_mode="ends")
    assert n_all == len(table)
    assert len(ends.texts) == 2 * len(table) // 3
    assert not any(t.endswith("@15") for t in texts(ends))
    assert len(scatter(table, coords, label_mode="none").texts) == 0


def test_auto_labels_fall_back_for_many_points():
    table = make_table(epochs=(1, 2, 3), words=tuple(f"w{i}" for i in range(60)), kinds=("q", "k"))  # 360 rows
    ax = scatter(table, spread_coords(len(table)), label_mode="auto")
    assert 0 < len(ax.texts) <= 240 and not any(t.endswith("@2") for t in texts(ax))
    assert "first and last epoch only" in ax.get_title()


def test_overlapping_labels_are_skipped():
    table = make_table(epochs=(1,), words=("a", "b", "c", "d", "e", "f", "g", "h", "i", "j"), kinds=("q", "k"))
    coords = np.zeros((len(table), 2)) + np.linspace(0, 1e-3, len(table))[:, None]  # all on one spot
    coords[0] = [1.0, 1.0]
    ax = scatter(table, coords, label_mode="all")
    assert len(ax.texts) < 10  # at most one label per free slot around the pile, never 20 stacked


def test_facet_shares_limits_and_colours():
    table = make_table(epochs=(1, 15, 30), n_sentences=2)
    coords = spread_coords(len(table))
    coords[table.meta["epoch"] == 30] *= 3  # one epoch spreads wider; all panels must still share its limits
    fig = scatter_figure(table, coords, facet="epoch", title="facets")
    axes = fig.axes
    assert len(axes) == 3
    assert all(ax.get_xlim() == axes[0].get_xlim() and ax.get_ylim() == axes[0].get_ylim() for ax in axes)
    assert axes[0].get_xlim()[1] >= coords[:, 0].max()
    assert fig.get_suptitle() == "facets"
    assert [ax.get_title() for ax in axes] == ["epoch 1", "epoch 15", "epoch 30"]
    colours = [tuple(np.round(c.get_facecolor()[0], 3)) for ax in axes for c in ax.collections]
    assert len(set(colours)) == 2  # sentence 0 and sentence 1 keep their colour in every panel
    fig3 = scatter_figure(table, spread_coords(len(table), dims=3), facet="kind")
    assert len(fig3.axes) == 2 and all(ax.name == "3d" for ax in fig3.axes)
    assert fig3.axes[0].get_zlim() == fig3.axes[1].get_zlim()


def test_unknown_colour_column():
    table = make_table()
    with pytest.raises(QkvtraceError, match="color by 'colour': no such column"):
        scatter(table, spread_coords(len(table)), color_by="colour")


def test_heatmap_annotates_values():
    ax = heatmap(np.array([[0.99, 0.1], [0.2, 0.5]]), ["we", "can"], ["can", "we"], title="cosine K")
    assert {t.get_text() for t in ax.texts} == {"0.99", "0.10", "0.20", "0.50"}
    assert [t.get_text() for t in ax.get_xticklabels()] == ["can", "we"]
    assert len(ax.figure.axes) == 2  # the heatmap and its colorbar
    with pytest.raises(QkvtraceError, match="does not match"):
        heatmap(np.zeros((2, 3)), ["a", "b"], ["x", "y"])


def test_attention_grid_shares_one_colorbar():
    rng = np.random.default_rng(0)
    patterns = [rng.dirichlet(np.ones(4), size=(2, 3)) for _ in range(3)]  # (head, query_pos, key_pos)
    fig = attention_grid(patterns, ["sos", "wir", "kennen"], ["we", "can", "eat", "apple"],
                         ["epoch 1", "epoch 15", "epoch 30"])
    images = [im for ax in fig.axes for im in ax.images]
    assert len(images) == 6
    assert len(fig.axes) == 7  # 3 epochs x 2 heads, plus one colorbar
    assert {(im.norm.vmin, im.norm.vmax) for im in images} == {(0.0, 1.0)}
    assert len({id(im.norm) for im in images}) == 1
    assert fig.axes[0].get_title() == "epoch 1 · head 0"
    with pytest.raises(QkvtraceError, match="3 x 4 but there are 2 query"):
        attention_grid(patterns, ["a", "b"], list("wxyz"), ["1", "15", "30"])


def test_bad_extension(tmp_path):
    ax = heatmap(np.eye(2), ["a", "b"], ["a", "b"])
    with pytest.raises(QkvtraceError, match=r"'\.jpg'.*\.png, \.svg, \.pdf, \.html"):
        save_figure(ax.figure, tmp_path / "figure.jpg")


def test_figure_as_html(tmp_path):
    ax = heatmap(np.eye(2), ["apfel", "brot"], ["apple", "bread"])
    page = save_figure(ax.figure, tmp_path / "heat.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and ">apfel<" in page


def test_coinciding_points_with_the_same_label_are_labelled_once():
    from qkvtrace.plot import _place_labels

    pts = np.array([[100.0, 100.0], [100.5, 100.0], [300.0, 300.0]])
    placed = _place_labels(pts, ["can@q@30", "can@q@30", "can@q@30"], 7, 100)
    assert [i for i, _, _ in placed] == [0, 2]


@pytest.mark.parametrize("dims", [2, 3])
def test_labels_stay_inside_the_axes(dims):
    # Points at the far right and top: a label placed north-east of them would run into the legend or off the
    # figure; they must go to the other side instead, and every drawn label must lie inside the axes.
    table = make_table(epochs=(1, 30), words=("we", "eat", "apple"), kinds=("q",))
    coords = spread_coords(len(table), dims=dims)
    ax = scatter(table, coords, label_mode="all")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = ax.figure
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    box = ax.get_window_extent(renderer)
    assert len(ax.texts) == len(table)
    for text in ax.texts:
        extent = text.get_window_extent(renderer)
        if dims == 3:  # a 3-D text's extent is only right while it is drawn; rebuild it from its anchor
            from mpl_toolkits.mplot3d import proj3d

            x, y, _ = proj3d.proj_transform(*text.get_position_3d(), ax.get_proj())
            px, py = ax.transData.transform((x, y))
            x0 = px if text.get_ha() == "left" else px - extent.width
            y0 = py if text.get_va() == "bottom" else py - extent.height
            extent = extent.from_bounds(x0, y0, extent.width, extent.height)
        assert box.x0 - 1 <= extent.x0 and extent.x1 <= box.x1 + 1, text.get_text()
        assert box.y0 - 1 <= extent.y0 and extent.y1 <= box.y1 + 1, text.get_text()


def test_place_labels_respects_bounds():
    from qkvtrace.plot import _place_labels

    placed = _place_labels(np.array([[195.0, 100.0]]), ["apple@k@30"], 7, 100, bounds=(0, 0, 200, 200))
    assert len(placed) == 1 and placed[0][1] < 0  # to the left of a point at the right edge
    assert _place_labels(np.array([[100.0, 100.0]]), ["x" * 80], 7, 100, bounds=(0, 0, 200, 200)) == []


def test_3d_trajectories_have_visible_heads():
    # Axes3D.quiver sizes heads as a fraction of each arrow, so short moves had none; heads are drawn separately.
    table = make_table(epochs=(1, 15, 30))
    coords = spread_coords(len(table), dims=3)
    coords[table.meta["epoch"] == 30] = coords[table.meta["epoch"] == 15] + 0.01  # a tiny last move
    ax = scatter(table, coords, trajectories=True, label_mode="none")
    gids = [c.get_gid() for c in ax.collections]
    assert "trajectories" in gids and "trajectory-heads" in gids
    heads = next(c for c in ax.collections if c.get_gid() == "trajectory-heads")
    n_arrows = 2 * len(table) // 3
    assert len(heads._segments3d) == 3 * n_arrows  # a short shaft and two barbs per arrow
    tips = {tuple(np.round(s[0], 6)) for s in heads._segments3d} | {tuple(np.round(s[1], 6)) for s in heads._segments3d}
    later = coords[table.meta["epoch"] > 1]
    assert all(tuple(np.round(p, 6)) in tips for p in later)  # every head ends on the later epoch's point


def test_facet_markers_and_legend_cover_every_panel():
    # Panel "decoder.cross" holds only k and v; k must keep the marker it has in the encoder panel, and the one
    # legend must list every sentence and kind even if the last panel lacks some.
    enc = make_table(kinds=("q", "k", "v"), n_sentences=2)
    cross = make_table(kinds=("k", "v"), n_sentences=1)
    cross.meta["site"][:] = "decoder.cross"
    table = VectorTable({c: np.concatenate([enc.meta[c], cross.meta[c]]) for c in enc.meta},
                        np.vstack([enc.X, cross.X]))
    fig = scatter_figure(table, spread_coords(len(table)), facet="site")
    ax_enc, ax_cross = fig.axes

    def marks(ax):  # one collection per (sentence, kind), in that order; its path is the marker's shape
        return [c.get_paths()[0].vertices.round(3).tobytes() for c in ax.collections]

    enc_marks, cross_marks = marks(ax_enc), marks(ax_cross)  # sentence 0 q, k, v, sentence 1 q, k, v | 0 k, v
    assert len(enc_marks) == 6 and cross_marks == enc_marks[1:3]
    assert enc_marks[0] != enc_marks[1] != enc_marks[2]
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["sentence 0", "sentence 1", "kind q", "kind k", "kind v"]


def test_attention_grid_names_its_axes():
    patterns = [np.full((2, 3, 4), 0.25)]
    fig = attention_grid(patterns, ["sos->wir", "wir->essen", "essen->eos"], ["<sos>", "we", "eat", "<eos>"],
                         ["epoch 1"], query_axis="query: target token", key_axis="key: source token")
    assert fig.axes[0].get_ylabel() == "query: target token" and fig.axes[1].get_ylabel() == ""
    assert {ax.get_xlabel() for ax in fig.axes[:2]} == {"key: source token"}


@pytest.mark.parametrize("keys,queries,heads,epochs", [
    (["<sos>", "we", "eat", "<eos>"], ["sos->wir", "wir->essen", "essen->eos"], 4, 3),
    (["<sos>", "▁internationalisation", "▁cooperation", "<eos>"] + [f"w{i}" for i in range(20)],
     ["sos->internationalisation", "internationalisation->zusammenarbeit"], 1, 1),
])
def test_attention_grid_keeps_every_label_inside_the_figure_and_off_the_panels(keys, queries, heads, epochs):
    """The grid's margins are measured from its labels (no layout engine): tick labels, axis labels, titles and
    the colorbar lie inside the figure, and no tick label overlaps a panel."""
    rng = np.random.default_rng(0)
    patterns = [rng.dirichlet(np.ones(len(keys)), size=(heads, len(queries))) for _ in range(epochs)]
    fig = attention_grid(patterns, queries, keys, [f"epoch {e}" for e in range(epochs)], query_axis="query",
                         key_axis="key: source token")
    fig.suptitle("attention · decoder.cross layer 0 · \"a sentence\"")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    page = fig.bbox
    panels = [ax.get_window_extent(renderer) for ax in fig.axes[:-1]]
    texts = [fig._suptitle, fig.axes[-1].yaxis.label] + [t for ax in fig.axes for t in
                                                         (ax.title, ax.xaxis.label, ax.yaxis.label,
                                                          *ax.get_xticklabels(), *ax.get_yticklabels())]
    shown = [t for t in texts if t.get_visible() and t.get_text()]
    assert len(shown) >= len(keys) + len(queries) + heads * epochs
    for t in shown:
        box = t.get_window_extent(renderer)
        assert page.x0 - 1 <= box.x0 and box.x1 <= page.x1 + 1 and page.y0 - 1 <= box.y0, t.get_text()
        assert box.y1 <= page.y1 + 1, t.get_text()
    for ax in fig.axes[:-1]:
        for t in [*ax.get_xticklabels(), *ax.get_yticklabels()]:
            if t.get_text():
                box = t.get_window_extent(renderer)
                assert not any(box.overlaps(p) for p in panels), t.get_text()


def test_plot_table_refuses_to_overwrite_and_explains_empty_selections(tmp_path):
    from qkvtrace.plot import plot_table

    table = make_table(epochs=(1, 30), kinds=("q", "k"), n_sentences=2)
    table.meta["site"][table.meta["kind"] == "k"] = "decoder.cross"
    out = tmp_path / "fig.png"
    out.write_bytes(b"mine")
    with pytest.raises(QkvtraceError, match="already exists; pass force=True"):
        plot_table(table, out, overwrite=False)
    assert out.read_bytes() == b"mine"
    plot_table(table, out)  # the library default (used by study and experiments) still overwrites
    assert out.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(QkvtraceError, match=r"no row matches all of them; where site=decoder.cross, kind has: k$"):
        plot_table(table, tmp_path / "empty.png", where=["kind=q", "site=decoder.cross"])
    with pytest.raises(QkvtraceError, match="bad field 'colour'"):
        plot_table(table, tmp_path / "bad.png", label="{colour}", method="tsne")


def test_3d_labels_use_both_sides_of_a_point():
    # Two points one above the other, closer than a label is tall: north-east only (as 3-D text used to be
    # placed) has room for one label; the other goes west of its point.
    table = make_table(epochs=(1,), words=("we", "eat", "apple", "bread"), kinds=("q",))
    coords = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.02], [1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
    ax = scatter(table, coords, label_mode="all")
    assert sorted(texts(ax)) == sorted(format_labels(table))
    assert {t.get_ha() for t in ax.texts} == {"left", "right"}
