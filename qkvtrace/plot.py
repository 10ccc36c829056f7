"""Figures: labelled 2-D/3-D scatter plots with trajectories across epochs, small multiples, heatmaps, attention
grids, and atomic saving; `plot_table` goes from a vector table to a figure file (interactive .html pages are
drawn by `qkvtrace.web` on plotly).

Functions draw on an `ax=None` and return it, or return a `matplotlib.figure.Figure`; nothing touches pyplot's
global state or chooses a backend, and matplotlib is imported inside the functions so `qkvtrace --help` stays fast.
"""

from __future__ import annotations

import html
import io
import logging
import weakref
from pathlib import Path

import numpy as np

from qkvtrace.errors import QkvtraceError
from qkvtrace.files import atomic_write, os_errors
from qkvtrace.project import identity_keys

log = logging.getLogger("qkvtrace")

DEFAULT_LABEL = "{word}@{kind}@{epoch}"
LABEL_MODES = ("auto", "all", "ends", "none")
MAX_LABELS = 300  # drawing costs ~1.6 s per 1000 labels, and more than a few hundred can't be read anyway
FORMATS = (".png", ".svg", ".pdf", ".html")
MARKERS = ("o", "^", "s", "D", "v", "P", "X", "*", "<", ">")
NUMERIC_COLUMNS = ("epoch", "sentence_id", "position", "layer", "dim")


# --- selection text and row fields ---

def _ordered(values) -> list:
    """Unique values: numeric ones sorted, text in order of first appearance."""
    values = np.asarray(values)
    if values.dtype.kind in "iuf":
        return sorted(np.unique(values).tolist())
    seen = dict.fromkeys(values.tolist())
    return list(seen)


def _join(values, limit: int = 6) -> str:
    values = [str(v) for v in values]
    return ", ".join(values[:limit]) + (f" (+{len(values) - limit})" if len(values) > limit else "")


def _wrap(text: str, fig, fontsize: float) -> str:
    """`text` broken into lines that fit the figure's width: a centred title wider than the figure loses both ends
    (its left end is cut off at the figure's edge)."""
    import textwrap

    chars = max(30, int(fig.get_figwidth() * 72 / (fontsize * 0.62)))
    return "\n".join(textwrap.fill(line, chars, break_long_words=False) for line in text.split("\n"))


def describe_selection(table, method: str | None = None, frame: str | None = None) -> str:
    """A title naming what a figure shows, e.g.
    "encoder.self · layer 0 · q, k, v · epochs 1, 15, 30 · PCA, joint frame · 96 points"."""
    meta = table.meta
    parts = [_join(_ordered(meta["site"]))]
    layers = _ordered(meta["layer"])
    parts.append(("layer " if len(layers) == 1 else "layers ") + _join(layers))
    heads = _ordered(meta["head"])
    if heads != ["concat"]:
        parts.append(("head " if len(heads) == 1 else "heads ") + _join(heads))
    parts.append(_join(_ordered(meta["kind"]), limit=8))
    epochs = _ordered(meta["epoch"])
    parts.append(("epoch " if len(epochs) == 1 else "epochs ") + _join(epochs))
    if method:
        parts.append(method.upper() if method in ("pca", "umap") else "t-SNE" if method == "tsne" else method)
        if frame:
            parts[-1] += f", {frame} frame"
    parts.append(f"{len(table)} points")
    return " · ".join(parts)


def _fields(table, i: int) -> dict:
    meta = table.meta
    row = {name: meta[name][i] for name in meta}
    word = row["token"]
    if row.get("side") == "tgt" and row.get("transition"):
        word = row["transition"]
    return dict(row, word=word)


def format_labels(table, template: str = DEFAULT_LABEL) -> list[str]:
    """The label text of every row: `template` formatted with the row's columns plus {word} (the token, or the
    transition such as "sos->wir" for target-side rows)."""
    try:
        return [template.format(**_fields(table, i)) for i in range(len(table))]
    except (KeyError, IndexError, ValueError) as e:
        fields = ", ".join(["word", *table.columns])
        raise QkvtraceError(f"{template!r}: bad field {e}; fields are: {fields}", param="label") from None


def _check_coords(table, coords: np.ndarray) -> np.ndarray:
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] not in (2, 3) or len(coords) != len(table):
        raise QkvtraceError(f"coords must be (n_rows, 2 or 3) for the table's {len(table)} rows, "
                            f"got shape {coords.shape}")
    return coords


def _group_values(table, color_by: str) -> np.ndarray:
    if color_by not in table.meta:
        raise QkvtraceError(f"color by {color_by!r}: no such column; columns are: {', '.join(table.columns)}")
    return table.meta[color_by]


def palette(values) -> dict:
    """Group value -> colour (tab10, tab20, then evenly spaced turbo), in `_ordered` order."""
    from matplotlib import colormaps

    groups = _ordered(values)
    n = len(groups)
    if n <= 10:
        colors = [colormaps["tab10"](i) for i in range(n)]
    elif n <= 20:
        colors = [colormaps["tab20"](i) for i in range(n)]
    else:
        colors = [colormaps["turbo"](x) for x in np.linspace(0.05, 0.95, n)]
    return dict(zip(groups, colors))


# --- labels without pile-ups ---

OFFSETS = ((1, 1), (1, -1), (-1, 1), (-1, -1), (0, 1), (0, -1), (1, 0), (-1, 0))
# 3-D text can't be offset in points; its alignment (ha/va) still puts it in any of the four quadrants.
OFFSETS_3D = ((1, 1), (-1, 1), (1, -1), (-1, -1))


def _text_width(fontsize: float):
    """A function giving a text's width in points at `fontsize`, measured from the font's glyphs (no renderer)."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextToPath

    measure, font = TextToPath(), FontProperties(size=fontsize)
    return lambda text: measure.get_text_width_height_descent(str(text), font, ismath=False)[0]


def _place_labels(points_px: np.ndarray, texts: list[str], fontsize: float, dpi: float,
                  offsets=OFFSETS, bounds=None) -> list[tuple[int, float, float]]:
    """Greedy placement: for each label, in order, the first of `offsets` (directions around its point) whose box
    overlaps no label placed so far and, when `bounds` (x0, y0, x1, y1 in pixels, the axes) is given, lies inside
    it, so that labels never run into the legend, tick labels or title; labels with no free offset are skipped.
    Returns (index, dx, dy) in points."""
    width = _text_width(fontsize)
    px_per_pt = dpi / 72
    h, gap = 1.25 * fontsize * px_per_pt, 3 * px_per_pt
    boxes = np.empty((0, 4))  # (x0, y0, x1, y1) in pixels
    placed = []
    shown: dict[str, list[np.ndarray]] = {}  # text -> points already carrying it
    for i, (xy, text) in enumerate(zip(points_px, texts)):
        # Coinciding points with the same text (e.g. can@q@30 in five sentences) need the label once.
        if any(np.hypot(*(xy - other)) < h for other in shown.get(text, ())):
            continue
        w = (width(text) + 2) * px_per_pt
        for ox, oy in offsets:
            x0 = xy[0] + (gap if ox > 0 else -gap - w if ox < 0 else -w / 2)
            y0 = xy[1] + (gap if oy > 0 else -gap - h if oy < 0 else -h / 2)
            box = np.array([x0, y0, x0 + w, y0 + h])
            if bounds is not None and not (bounds[0] <= box[0] and box[2] <= bounds[2] and
                                           bounds[1] <= box[1] and box[3] <= bounds[3]):
                continue
            if not len(boxes) or not ((boxes[:, 0] < box[2]) & (boxes[:, 2] > box[0]) &
                                      (boxes[:, 1] < box[3]) & (boxes[:, 3] > box[1])).any():
                boxes = np.vstack([boxes, box])
                shown.setdefault(text, []).append(xy)
                placed.append((i, (x0 - xy[0]) * 72 / dpi, (y0 - xy[1]) * 72 / dpi))
                break
    return placed


def _label_rows(table, label_mode: str, identity: np.ndarray) -> tuple[np.ndarray, str]:
    """Row indices to label, ends of trajectories first, and a note when "auto" had to cut down."""
    if label_mode not in LABEL_MODES:
        raise QkvtraceError(f"label mode {label_mode!r}: choose one of {', '.join(LABEL_MODES)}")
    n = len(table)
    if label_mode == "none" or n == 0:
        return np.array([], dtype=int), ""
    epochs = table.meta["epoch"]
    order = np.lexsort((epochs, identity))  # rows grouped by identity, each group in epoch order
    first = np.ones(n, dtype=bool)
    first[1:] = identity[order][1:] != identity[order][:-1]
    last = np.ones(n, dtype=bool)
    last[:-1] = first[1:]
    ends = np.unique(np.concatenate([order[last], order[first]]))
    ends_first = np.concatenate([ends, np.setdiff1d(np.arange(n), ends)])
    if label_mode == "all":
        return ends_first, ""
    if label_mode == "ends":
        return ends, ""
    if n <= MAX_LABELS:
        return ends_first, ""
    if len(ends) <= MAX_LABELS:
        note = f"labels on first and last epoch only ({n} points)"
    else:
        ends, note = np.array([], dtype=int), f"labels off ({n} points)"
    log.info("%s; pass label_mode='all' to label every point", note)
    return ends, note


def _freeze_layout(fig) -> None:
    """Keep the positions of the layout pass just run: the labels placed next go inside their axes, so another
    constrained-layout pass when the figure is saved would find the same positions at the cost of a draw."""
    fig.set_layout_engine("none")


def _draw_labels(ax, table, coords, rows, template, fontsize=7, laid_out: bool = False) -> int:
    """Label `rows` where the labels fit; `laid_out` says the figure's layout pass has already run."""
    if not len(rows):
        return 0
    texts = format_labels(table.rows(rows), template)
    ax.autoscale_view()
    if ax.figure.get_layout_engine() is not None and not laid_out:
        ax.figure.draw_without_rendering()
        _freeze_layout(ax.figure)
    if coords.shape[1] == 3:
        from mpl_toolkits.mplot3d import proj3d

        x, y, _ = proj3d.proj_transform(*coords[rows].T, ax.get_proj())
        px = ax.transData.transform(np.column_stack([x, y]))
    else:
        px = ax.transData.transform(coords[rows])
    box = ax.get_window_extent()
    placed = _place_labels(px, texts, fontsize, ax.figure.dpi, OFFSETS_3D if coords.shape[1] == 3 else OFFSETS,
                           bounds=(box.x0, box.y0, box.x1, box.y1))
    for i, dx, dy in placed:
        if coords.shape[1] == 3:
            # Anchored at the 3-D point (so it follows rotation), on the side _place_labels chose.
            right, up = dx >= 0, dy >= 0
            ax.text(*coords[rows[i]], " " + texts[i] if right else texts[i] + " ", fontsize=fontsize,
                    ha="left" if right else "right", va="bottom" if up else "top")
        else:
            ax.annotate(texts[i], coords[rows[i]], xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                        ha="left", va="bottom", annotation_clip=False)
    if len(placed) < len(rows):
        log.info("%d of %d labels skipped where they would overlap others", len(rows) - len(placed), len(rows))
    return len(placed)


# --- scatter ---

def _trajectory_segments(table, coords, identity) -> tuple[np.ndarray, np.ndarray]:
    """Segments joining each identity's points in epoch order: (n_segments, 2, dims) and the row they start at."""
    order = np.lexsort((table.meta["epoch"], identity))
    same = identity[order][1:] == identity[order][:-1]
    start, end = order[:-1][same], order[1:][same]
    return np.stack([coords[start], coords[end]], axis=1), start


def _new_axes(dims: int, figsize=(8, 6)):
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    return fig.add_subplot(projection="3d") if dims == 3 else fig.add_subplot()


def scatter(table, coords: np.ndarray, ax=None, color_by: str = "sentence", label: str = DEFAULT_LABEL,
            label_mode: str = "auto", trajectories: bool = False, title: str | None = None, colors: dict | None = None,
            legend: bool = True, markers: dict | None = None):
    """Scatter the table's rows at `coords`, coloured by a column, one marker per kind, labelled.

    Parameters
    ----------
    table : VectorTable
        The rows plotted; coords[i] is row i.
    coords : np.ndarray
        Shape (n_rows, 2) or (n_rows, 3); with 3 columns the plot is 3-D (`ax` must then be a 3-D axes).
    ax : matplotlib Axes, optional
        Drawn on and returned; a new Figure's axes when None.
    color_by : str
        Column whose values get one colour each (sentence, kind, epoch, category, token, site, ...).
    label : str
        Template over the row's columns plus {word}; "{word}@{kind}@{epoch}" gives the study's "eat@k@30".
    label_mode : {"auto", "all", "ends", "none"}
        ends: only the first and last epoch of each vector's trajectory. auto: all up to 300 points, then ends,
        then none, saying so in the title. Overlapping labels are skipped rather than piled up.
    trajectories : bool
        Join each vector's points across epochs (same `identity_keys`) with arrows in epoch order.
    title : str, optional
        Defaults to `describe_selection(table)`.
    colors : dict, optional
        Value -> colour, to keep colours fixed across several axes (see `palette`).
    markers : dict, optional
        Kind -> matplotlib marker, to keep markers fixed across several axes (see `kind_markers`).

    Returns
    -------
    The axes.
    """
    ax, pending = _scatter(table, coords, ax=ax, color_by=color_by, label=label, label_mode=label_mode,
                           trajectories=trajectories, title=title, colors=colors, legend=legend, markers=markers)
    # Labels last, after a layout pass, so that overlap is judged where the points will finally be drawn.
    _draw_labels(ax, *pending)
    return ax


def _scatter(table, coords: np.ndarray, ax=None, color_by: str = "sentence", label: str = DEFAULT_LABEL,
             label_mode: str = "auto", trajectories: bool = False, title: str | None = None,
             colors: dict | None = None, legend: bool = True, markers: dict | None = None):
    """`scatter` without its labels: returns the axes and the arguments of the `_draw_labels` call still owed."""
    coords = _check_coords(table, coords)
    dims = coords.shape[1]
    if ax is None:
        ax = _new_axes(dims)
        if dims == 3:
            ax.view_init(elev=20, azim=-60)
    elif dims == 3 and not hasattr(ax, "zaxis"):
        raise QkvtraceError("3-D coordinates need a 3-D axes (projection='3d')")
    groups = _group_values(table, color_by)
    colors = colors or palette(groups)
    kinds = _ordered(table.meta["kind"])
    markers = markers or kind_markers(table)
    group_text = groups.astype(str)
    kind_col = table.meta["kind"]
    identity = identity_keys(table) if len(table) else np.array([], dtype=object)

    if trajectories and len(table):
        segments, start = _trajectory_segments(table, coords, identity)
        if len(segments):
            seg_colors = [colors[v] for v in groups[start]]
            delta = segments[:, 1] - segments[:, 0]
            if dims == 3:
                _arrows_3d(ax, segments, seg_colors)
            else:
                ax.quiver(*segments[:, 0].T, *delta.T, color=seg_colors, angles="xy", scale_units="xy", scale=1,
                          width=0.0025, headwidth=5, headlength=6, alpha=0.5, zorder=1, gid="trajectories")

    for value, color in colors.items():
        in_group = group_text == str(value)
        for kind in kinds:
            rows = in_group & (kind_col == kind)
            if rows.any():
                extra = {"depthshade": False} if dims == 3 else {}
                ax.scatter(*coords[rows].T, color=color, marker=markers[kind], s=28, edgecolors="white",
                           linewidths=0.4, zorder=2, **extra)

    rows, note = _label_rows(table, label_mode, identity)
    if legend and len(table):
        _legend(ax, colors, markers, color_by, groups)
    text = title if title is not None else describe_selection(table)
    ax.set_title(_wrap(text, ax.figure, 10) + (f"\n({note})" if note else ""), fontsize=10)
    ax.set_xlabel("component 1")
    ax.set_ylabel("component 2")
    if dims == 3:
        ax.set_zlabel("component 3")
    return ax, (table, coords, rows, label)


def kind_markers(table) -> dict:
    """Kind -> marker, in order of first appearance (one marker per kind: q, k, v, x1 ...)."""
    return {k: MARKERS[i % len(MARKERS)] for i, k in enumerate(_ordered(table.meta["kind"]))}


def _arrows_3d(ax, segments: np.ndarray, colors) -> None:
    """Trajectory arrows in 3-D: the lines, plus heads of one size (4% of the box diagonal) at each end.

    Axes3D.quiver sizes a head as a fraction of its own arrow, so on short moves the head vanished; here each
    head is a short quiver of fixed length ending at the segment's end. segments: (n_segments, 2, 3).
    """
    start, end = segments[:, 0], segments[:, 1]
    delta = end - start
    ax.quiver(*start.T, *delta.T, colors=colors, arrow_length_ratio=0.0, linewidths=0.8, alpha=0.6,
              gid="trajectories")
    points = segments.reshape(-1, 3)
    span = np.maximum(points.max(axis=0) - points.min(axis=0), 1e-12)  # (3,): per-axis range
    # Head length measured in the box-normalised space, so heads look alike whatever each axis's range.
    unit = delta / span
    length = np.linalg.norm(unit, axis=1)
    moving = length > 1e-9
    if not moving.any():
        return
    head = np.minimum(0.04 * np.sqrt(3), 0.5 * length[moving])[:, None] * unit[moving] / length[moving, None] * span
    head_colors = [c for c, m in zip(colors, moving) if m]
    ax.quiver(*(end[moving] - head).T, *head.T, colors=head_colors, arrow_length_ratio=1.0, linewidths=0.8,
              alpha=0.8, gid="trajectory-heads")


def _legend(ax, colors, markers, color_by, groups, figure: bool = False):
    """The colour groups (those present in `groups`) and, unless colours already are kinds, the kind markers.
    With `figure`, one legend for the whole figure, right of all panels (small multiples)."""
    from matplotlib.lines import Line2D

    present = set(np.asarray(groups).astype(str).tolist())
    by_kind = color_by == "kind"  # then one entry per kind, in its colour and marker
    handles = [Line2D([], [], marker=markers.get(v, "o") if by_kind else "o", linestyle="", color=c,
                      label=str(v)[:40]) for v, c in colors.items() if str(v) in present][:30]
    if len(markers) > 1 and not by_kind:
        handles += [Line2D([], [], marker=m, linestyle="", color="0.3", label=f"kind {k}") for k, m in markers.items()]
    style = dict(handles=handles, title=color_by, fontsize="small", title_fontsize="small", frameon=False)
    if figure:
        ax.figure.legend(loc="outside right upper", **style)
    else:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, **style)


def scatter_figure(table, coords: np.ndarray, facet: str | None = None, **scatter_kwargs):
    """One scatter, or small multiples with one panel per value of `facet` ("epoch", "kind", or any column),
    sharing axis limits and colours, under one suptitle. Returns a matplotlib Figure."""
    from matplotlib.figure import Figure

    coords = _check_coords(table, coords)
    dims = coords.shape[1]
    title = scatter_kwargs.pop("title", None)
    if facet is None:
        ax = scatter(table, coords, title=title, **scatter_kwargs)
        return ax.figure
    if facet not in table.meta:
        raise QkvtraceError(f"facet {facet!r}: no such column; columns are: {', '.join(table.columns)}")
    values = _ordered(table.meta[facet])
    ncols = min(len(values), 3)
    nrows = -(-len(values) // ncols)
    fig = Figure(figsize=(5.5 * ncols + 1.5, 4.5 * nrows + 0.6), layout="constrained")
    color_by = scatter_kwargs.get("color_by", "sentence")
    colors = scatter_kwargs.pop("colors", None) or palette(_group_values(table, color_by))
    markers = scatter_kwargs.pop("markers", None) or kind_markers(table)
    scatter_kwargs.pop("legend", None)
    lo, hi = coords.min(axis=0), coords.max(axis=0)
    pad = 0.05 * np.maximum(hi - lo, 1e-9)
    lo, hi = lo - pad, hi + pad
    pending = []
    for j, value in enumerate(values):
        ax = fig.add_subplot(nrows, ncols, j + 1, **({"projection": "3d"} if dims == 3 else {}))
        if dims == 3:
            ax.view_init(elev=20, azim=-60)
        rows = np.flatnonzero(table.meta[facet].astype(str) == str(value))
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        if dims == 3:
            ax.set_zlim(lo[2], hi[2])
        ax.set_autoscale_on(False)
        pending.append(_scatter(table.rows(rows), coords[rows], ax=ax, colors=colors, markers=markers,
                                title=f"{facet} {value}", legend=False, **scatter_kwargs))
    if len(table):
        # One legend for all panels, listing every group and kind (a panel may hold only some of them).
        _legend(ax, colors, markers, color_by, _group_values(table, color_by), figure=True)
    fig.suptitle(_wrap(title if title is not None else describe_selection(table), fig, 12))
    # One layout pass for all panels, then their labels (one pass per panel cost a whole figure draw each).
    fig.draw_without_rendering()
    _freeze_layout(fig)
    for panel, labels in pending:
        _draw_labels(panel, *labels, laid_out=True)
    return fig


# --- heatmaps ---

def heatmap(matrix: np.ndarray, row_labels, col_labels, ax=None, vmin: float | None = None,
            vmax: float | None = None, title: str | None = None, annotate: bool = True, fmt: str = "{:.2f}",
            cmap: str = "viridis"):
    """A (n_rows, n_cols) matrix as coloured cells with row/column labels, a colorbar and, when `annotate`, the
    value in each cell (skipped above 900 cells). Returns the axes."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape != (len(row_labels), len(col_labels)):
        raise QkvtraceError(f"heatmap matrix {matrix.shape} does not match {len(row_labels)} row labels and "
                            f"{len(col_labels)} column labels")
    if ax is None:
        n_rows, n_cols = matrix.shape
        ax = _new_axes(2, figsize=(min(2 + 0.6 * n_cols, 20), min(1.5 + 0.45 * n_rows, 20)))
    im = ax.imshow(matrix, vmin=vmin, vmax=vmax, cmap=cmap, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(col_labels)), [str(c) for c in col_labels], rotation=45, ha="right",
                  rotation_mode="anchor", fontsize=8)
    ax.set_yticks(range(len(row_labels)), [str(r) for r in row_labels], fontsize=8)
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if annotate and matrix.size <= 900:
        norm = im.norm
        for (r, c), value in np.ndenumerate(matrix):
            if np.isfinite(value):
                dark = norm(value) < 0.5 if cmap in ("viridis", "magma", "inferno", "plasma", "cividis") else False
                ax.text(c, r, fmt.format(value), ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")
    if title:
        ax.set_title(title, fontsize=10)
    return ax


_LAID_OUT: "weakref.WeakSet" = weakref.WeakSet()  # figures whose margins were measured for their labels


def attention_grid(patterns: list[np.ndarray], query_labels, key_labels, titles, vmin: float = 0.0,
                   vmax: float = 1.0, annotate: bool = False, query_axis: str | None = None,
                   key_axis: str | None = None):
    """Attention weights, one row of panels per epoch and one column per head, on one colour scale.

    Parameters
    ----------
    patterns : list of np.ndarray
        One per epoch, shape (head, query_pos, key_pos) each.
    query_labels, key_labels : sequence of str
        Tokens along query_pos and key_pos.
    titles : sequence of str
        One per epoch, e.g. "epoch 30".
    query_axis, key_axis : str, optional
        Axis titles, on the left column and the bottom row, e.g. "query: target token", "key: source token".

    Returns
    -------
    matplotlib Figure with one shared colorbar.
    """
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    if not patterns or len(titles) != len(patterns):
        raise QkvtraceError(f"attention grid needs one title per pattern: {len(patterns)} patterns, "
                            f"{len(titles)} titles")
    shapes = {np.shape(p) for p in patterns}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise QkvtraceError(f"attention patterns must all be (head, query_pos, key_pos); got {sorted(shapes)}")
    n_heads, n_query, n_key = next(iter(shapes))
    if (n_query, n_key) != (len(query_labels), len(key_labels)):
        raise QkvtraceError(f"attention patterns are {n_query} x {n_key} but there are {len(query_labels)} query "
                            f"and {len(key_labels)} key labels")
    cell = 0.38
    width, height = n_heads * (1.2 + cell * n_key) + 1.2, len(patterns) * (1.0 + cell * n_query) + 0.5
    fig = Figure(figsize=(width, height))
    # Margins measured from the labels' own extents rather than by constrained layout, which measured every
    # panel's tick labels twice per save (half the drawing time of a 3 x 4 grid). Sizes in inches.
    width7 = _text_width(7)
    key_w, query_w = (max(map(width7, labels), default=0) / 72 for labels in (key_labels, query_labels))
    line7, line8, line9 = 1.25 * 7 / 72, 1.25 * 8 / 72, 1.25 * 9 / 72  # a line of text at 7, 8 and 9 points
    pad = 0.08
    left = pad + query_w + 0.06 + (line8 + 0.06 if query_axis else 0)
    bottom = pad + (key_w + line7) * 0.7072 + 0.06 + (line8 + 0.06 if key_axis else 0)  # tick labels at 45°
    top = pad + 2 * line9 + 0.1  # a two-line suptitle fits
    right = 1.0  # the colorbar and its label
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
                        wspace=0.15, hspace=(line9 + 0.12) / max((height - top - bottom) / len(patterns), 0.1))
    axes = fig.subplots(len(patterns), n_heads, squeeze=False)
    norm = Normalize(vmin=vmin, vmax=vmax)
    for r, (pattern, epoch_title) in enumerate(zip(patterns, titles)):
        for h in range(n_heads):
            ax = axes[r, h]
            im = ax.imshow(np.asarray(pattern[h]), norm=norm, cmap="viridis", interpolation="nearest")
            # Every panel shares the tokens: label them on the left column and the bottom row only.
            ax.set_xticks(range(n_key), [str(k) for k in key_labels] if r == len(patterns) - 1 else [],
                          rotation=45, ha="right", rotation_mode="anchor", fontsize=7)
            ax.set_yticks(range(n_query), [str(q) for q in query_labels] if h == 0 else [], fontsize=7)
            ax.set_title(f"{epoch_title} · head {h}", fontsize=9)
            if query_axis and h == 0:
                ax.set_ylabel(query_axis, fontsize=8)
            if key_axis and r == len(patterns) - 1:
                ax.set_xlabel(key_axis, fontsize=8)
            if annotate:
                for (q, k), value in np.ndenumerate(np.asarray(pattern[h])):
                    ax.text(k, q, f"{value:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if norm(value) < 0.5 else "black")
    right_edge = axes[0, -1].get_position().x1
    bar = fig.add_axes([right_edge + 0.2 / width, axes[-1, 0].get_position().y0, 0.15 / width,
                        axes[0, 0].get_position().y1 - axes[-1, 0].get_position().y0])
    fig.colorbar(im, cax=bar, label="attention weight")
    _LAID_OUT.add(fig)
    return fig


# --- saving ---

def save_figure(fig, path: Path | str, option: str | None = None) -> Path:
    """Write a Figure to .png, .svg, .pdf or .html (the SVG inside a page) atomically; returns the path.

    SVG text stays text (svg.fonttype none), so labels can be searched and edited; no timestamps are embedded.
    """
    from matplotlib import rc_context

    path = Path(path)
    ext = path.suffix.lower()
    if ext not in FORMATS:
        raise QkvtraceError(f"{path}: unsupported figure extension {ext or '(none)'!r}; "
                            f"use one of {', '.join(FORMATS)}")
    fmt = "svg" if ext == ".html" else ext[1:]
    metadata = {"png": {"Software": None}, "svg": {"Date": None}, "pdf": {"CreationDate": None}}[fmt]
    # A constrained layout, or margins measured by hand, already keep everything inside the figure; "tight" would
    # cost one more full draw.
    bbox = None if fig.get_layout_engine() is not None or fig in _LAID_OUT else "tight"
    with rc_context({"svg.fonttype": "none", "svg.hashsalt": "qkvtrace"}):
        if ext == ".html":
            buffer = io.StringIO()
            fig.savefig(buffer, format="svg", bbox_inches=bbox, metadata=metadata)
            svg = buffer.getvalue()
            svg = svg[svg.find("<svg"):]
            head = f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(path.stem)}</title></head>"
            data: bytes | str = f"{head}\n<body style='margin:0'>\n{svg}</body></html>\n"
        else:
            buffer = io.BytesIO()
            fig.savefig(buffer, format=fmt, dpi=150, bbox_inches=bbox, metadata=metadata)
            data = buffer.getvalue()
    # Drawn in memory first: a figure that fails to draw never touches the file system.
    with os_errors(path, option):
        path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data, option)
    return path


# --- one call from a vector table to a figure file ---

def parse_where(conditions) -> dict[str, list[str]]:
    """["kind=q,k,v", "layer=0"] -> {"kind": ["q", "k", "v"], "layer": ["0"]}; a malformed one is an error."""
    out: dict[str, list[str]] = {}
    for cond in conditions or ():
        column, sep, values = cond.partition("=")
        items = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not column.strip() or not items:
            raise QkvtraceError(f"{cond!r}: expected COLUMN=VALUE[,VALUE...], e.g. kind=q,k,v", param="where")
        out.setdefault(column.strip(), []).extend(items)
    return out


def _empty_selection(table, conditions: dict) -> str:
    """Why conditions that each match rows match none together, with what one of them could be instead."""
    def said(conds, sep):
        return sep.join(f"{k}={','.join(map(str, [v] if isinstance(v, (str, int)) else v))}" for k, v in conds.items())

    for name in conditions:
        others = {k: v for k, v in conditions.items() if k != name}
        rest = table.where(**others) if others else table
        if len(rest):
            return (f"{said(conditions, ', ')}: no row matches all of them; where {said(others, ' ')}, "
                    f"{name} has: {_join(_ordered(rest.meta[name]), limit=30)}")
    return f"{said(conditions, ', ')}: no row matches all of them"


def plot_table(table, out, method: str = "pca", dims: int = 2, where=None, color_by: str = "sentence",
               label: str = DEFAULT_LABEL, label_mode: str = "auto", trajectories: bool = False,
               frame: str = "joint", facet: str | None = None, seed: int = 0, title: str | None = None,
               overwrite: bool = True, qk_joint: bool = False, plotlyjs: str = "embed"):
    """Select rows of `table`, project them into one frame across epochs and write a labelled scatter to `out`.

    where : dict column -> values, or a list of "column=v1,v2" strings (rows matching all conditions).
    out : a path or a list of paths, all drawn from one projection: .png, .svg, .pdf (static; 3-D as a
        matplotlib 3-D view) or .html (interactive, on plotly, with the epochs as an animation; one panel, so
        `facet` does not apply to it).
    qk_joint : plot queries and keys of one site, layer and head together (`project.qk_joint`, per epoch): the
        selection must hold kinds q and k only.
    plotlyjs : for .html, "embed" (one self-contained file) or "directory" (plotly.min.js written once beside it).
    overwrite : with False an existing `out` is an error, raised before any work is done.
    Returns the path written, or the list of paths when `out` is a list.
    """
    import contextlib

    from qkvtrace.files import check_new_files, lock
    from qkvtrace.project import FRAMES, METHODS

    if dims not in (2, 3):
        raise QkvtraceError(f"{dims}: must be 2 or 3", param="dims")
    if method not in METHODS:
        raise QkvtraceError(f"{method!r}: choose one of {', '.join(METHODS)}", param="method")
    if frame not in FRAMES:
        raise QkvtraceError(f"{frame!r}: choose one of {', '.join(FRAMES)}", param="frame")
    outs = [Path(p) for p in out] if isinstance(out, (list, tuple)) else [Path(out)]
    for path in outs:
        if path.suffix.lower() not in FORMATS:
            raise QkvtraceError(f"{path}: unsupported extension {path.suffix or '(none)'!r}; use one of "
                                f"{', '.join(FORMATS)}", param="out")
    if any(p.suffix.lower() == ".html" for p in outs):
        from qkvtrace.web import plotly_modules

        plotly_modules()  # a missing plotly fails now, not after the projection
    if not overwrite:
        check_new_files(outs)
    with contextlib.ExitStack() as locks:
        for path in outs:  # a second command writing the same figure refuses, naming this process
            locks.enter_context(lock(path, "--out"))
        if not overwrite:
            check_new_files(outs)
        return _plot_table(table, out, outs, method, dims, where, color_by, label, label_mode, trajectories, frame,
                           facet, seed, title, qk_joint, plotlyjs)


def _plot_table(table, out, outs, method, dims, where, color_by, label, label_mode, trajectories, frame, facet, seed,
                title, qk_joint, plotlyjs):
    from qkvtrace.project import describe_qk_joint, project_epochs, qk_joint_epochs

    for param, column in (("color_by", color_by), ("facet", facet)):
        if column is not None and column not in table.meta:
            raise QkvtraceError(f"{column!r}: no such column; columns are: {', '.join(table.columns)}", param=param)
    conditions = parse_where(where) if not isinstance(where, dict) else where
    sub = table.where(**conditions) if conditions else table
    if conditions and not len(sub):
        raise QkvtraceError(_empty_selection(table, conditions), param="where")
    if len(sub):
        format_labels(sub.rows([0]), label)  # a bad template fails now, not after the projection
    X = sub.vectors()
    joined = ""
    if qk_joint:
        is_query = _check_qk(sub) == "q"
        extracted, X = X, qk_joint_epochs(X, is_query, sub.meta["epoch"])
        said, short = describe_qk_joint(extracted, X, is_query, sub.meta)
        log.warning(said)
        joined = " · " + short
    coords = project_epochs(X, sub.meta["epoch"], identity_keys(sub), method=method, dims=dims, frame=frame,
                            seed=seed)
    title = title or describe_selection(sub, method, frame) + joined
    written, static = [], None
    for path in outs:
        if path.suffix.lower() == ".html":
            from qkvtrace.web import scatter_page

            if facet is not None and all(p.suffix.lower() == ".html" for p in outs):
                # (beside a static file that draws the panels, the page is its one-panel companion: no note)
                log.warning("facet %r is not drawn in %s: the .html scatter is one panel", facet, path.name)
            written.append(scatter_page(sub, coords, path, color_by=color_by, label=label, label_mode=label_mode,
                                        trajectories=trajectories, title=title, plotlyjs=plotlyjs))
        else:
            static = static or scatter_figure(sub, coords, facet=facet, color_by=color_by, label=label,
                                              label_mode=label_mode, trajectories=trajectories, title=title)
            written.append(save_figure(static, path, "--out"))
    return written if isinstance(out, (list, tuple)) else written[0]


def _check_qk(table) -> np.ndarray:
    """The kind column of a selection fit for qk-joint: kinds q and k only, one site, layer and head."""
    kinds = set(table.meta["kind"].tolist())
    if kinds != {"q", "k"}:
        raise QkvtraceError(f"draws queries and keys together: select kinds q and k only (where kind=q,k), "
                            f"not {', '.join(sorted(kinds))}", param="qk_joint")
    for column in ("site", "layer", "head"):
        values = _ordered(table.meta[column])
        if len(values) > 1:
            raise QkvtraceError(f"needs one {column}, the selection has {_join(values)}: "
                                f"select where {column}={values[0]}", param="qk_joint")
    if table.meta["head"][0] == "concat":
        raise QkvtraceError("needs one attention head, not the concatenated heads: extract with heads all "
                            "(or e.g. 0,1) and select where head=0", param="qk_joint")
    return table.meta["kind"]
