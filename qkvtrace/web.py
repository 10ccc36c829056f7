"""Interactive pages on plotly: the scatter of `plot --out x.html` (2-D/3-D, hover cards, trajectories with
direction marks, the checkpoints as an animation) and the explorer of `qkvtrace view` (selectors, projections,
search, nearest neighbours, attention rows).

Pages work offline. plotly.js (about 4.8 MB) is either embedded in the page (`plotlyjs="embed"`: one file that
opens anywhere; what `plot` and `view` write) or written once as `plotly.min.js` beside the page and loaded by a
relative path (`plotlyjs="directory"`: what experiments and the study write, where a folder holds many pages and
the folder is what is moved; each page still opens by itself from that folder).

plotly is imported inside the functions, so `qkvtrace --help` stays fast.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from pathlib import Path

import numpy as np

from qkvtrace.errors import QkvtraceError
from qkvtrace.files import atomic_write_text, check_writable, os_errors
from qkvtrace.plot import (DEFAULT_LABEL, _check_coords, _group_values, _label_rows, _ordered, _trajectory_segments,
                           describe_selection, format_labels, palette)
from qkvtrace.project import identity_keys

log = logging.getLogger("qkvtrace")

PLOTLYJS_MODES = ("embed", "directory")
# plotly marker symbols, one per kind in order of first appearance, as plot.MARKERS does for matplotlib.
SYMBOLS_2D = ("circle", "triangle-up", "square", "diamond", "triangle-down", "cross", "x", "star", "triangle-left",
              "triangle-right")
SYMBOLS_3D = ("circle", "diamond", "square", "cross", "x", "circle-open", "diamond-open", "square-open")
WEBGL_FROM = 5000  # 2-D scatters with more points are drawn with WebGL (scattergl), fewer as SVG
HOVER_FIELDS = ("word", "kind", "site", "layer", "head", "epoch", "sentence", "position", "token")
CONFIG = {"displaylogo": False, "responsive": True, "showTips": False}


def plotly_modules():
    """(plotly.graph_objects, plotly.io), or a one-line error saying how to install plotly."""
    try:
        import plotly.graph_objects as go
        import plotly.io as pio
    except ImportError:
        raise QkvtraceError("writing .html figures needs the plotly package: pip install plotly") from None
    return go, pio


def _hex(color) -> str:
    from matplotlib.colors import to_hex

    return to_hex(color)


# --- writing pages ---

def write_page(fig, path: Path | str, plotlyjs: str = "embed", title: str | None = None,
               post_script: str | None = None, head: str = "", body: str = "") -> Path:
    """Write a plotly figure as a page at `path` atomically; returns the path.

    plotlyjs : "embed" puts plotly.js inside the page; "directory" writes plotly.min.js once beside it and loads it
        relatively. head, body : extra HTML placed in <head> and before the figure (the explorer's controls).
    """
    _, pio = plotly_modules()
    if plotlyjs not in PLOTLYJS_MODES:
        raise QkvtraceError(f"plotlyjs {plotlyjs!r}: choose one of {', '.join(PLOTLYJS_MODES)}")
    path = Path(path)
    if path.suffix.lower() != ".html":
        raise QkvtraceError(f"{path}: an interactive page is written as .html, not {path.suffix or '(none)'!r}")
    with os_errors(path, "--out"):
        path.parent.mkdir(parents=True, exist_ok=True)
    div = pio.to_html(fig, include_plotlyjs=True if plotlyjs == "embed" else "directory", full_html=False,
                      config=CONFIG, post_script=post_script, div_id="figure", auto_play=False,
                      default_height="100%", default_width="100%")
    if plotlyjs == "directory":
        write_plotlyjs(path.parent)
    name = html.escape(title or path.stem)
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{name}</title>\n"
            "<style>html,body{height:100%;margin:0;font:13px system-ui,sans-serif}</style>\n"
            f"{head}</head>\n<body>\n{body}{div}\n</body></html>\n")
    atomic_write_text(path, page)
    return path


def write_plotlyjs(directory: Path | str) -> Path:
    """plotly.min.js (the bundle of the installed plotly) in `directory`, written when missing or different."""
    from plotly.offline import get_plotlyjs

    path = Path(directory) / "plotly.min.js"
    js = get_plotlyjs()
    if not path.is_file() or path.stat().st_size != len(js.encode()):
        atomic_write_text(path, js)
    return path


# --- the scatter page ---

def _custom(table, labels: list[str]) -> list[list]:
    """One hover record per row: label, the HOVER_FIELDS, and the row index."""
    meta = table.meta
    word = np.where((meta["side"] == "tgt") & (meta["transition"] != ""), meta["transition"], meta["token"])
    token = word
    cols = [labels, word, meta["kind"], meta["site"], meta["layer"], meta["head"], meta["epoch"], meta["sentence"],
            meta["position"], token]
    return [[c[i].item() if hasattr(c[i], "item") else c[i] for c in cols] + [i] for i in range(len(table))]


HOVER = ("<b>%{customdata[0]}</b><br>word %{customdata[1]} · kind %{customdata[2]}<br>"
         "%{customdata[3]} · layer %{customdata[4]} · head %{customdata[5]} · epoch %{customdata[6]}<br>"
         "sentence \"%{customdata[7]}\"<br>position %{customdata[8]} · token %{customdata[9]}<extra></extra>")


def scatter_figure(table, coords: np.ndarray, color_by: str = "sentence", label: str = DEFAULT_LABEL,
                   label_mode: str = "auto", trajectories: bool = False, title: str | None = None):
    """A plotly figure of the table's rows at `coords` (n_rows, 2 or 3): one colour per `color_by` value, one
    marker per kind, a hover card per point; with several epochs, a slider and a play button step through them
    (the frame is fixed: `coords` already hold every epoch), showing each epoch's points and the trajectories
    up to it. Text labels are drawn for label_mode "all" and "ends" (as in `plot.scatter`); with "auto" the hover
    card carries the label, since labels of coinciding points pile up in a browser.

    Returns a plotly.graph_objects.Figure. Traces carry `meta` {"role": "points" | "trajectory" | "heads",
    "group", "kind"} so that tests and pages can find them.
    """
    go, pio = plotly_modules()
    coords = _check_coords(table, coords)
    n, dims = coords.shape
    groups = _group_values(table, color_by)
    colors = {str(v): _hex(c) for v, c in palette(groups).items()}
    group_text = groups.astype(str)
    kinds = _ordered(table.meta["kind"])
    symbols = SYMBOLS_3D if dims == 3 else SYMBOLS_2D
    symbol = {k: symbols[i % len(symbols)] for i, k in enumerate(kinds)}
    labels = format_labels(table, label) if n else []
    identity = identity_keys(table) if n else np.array([], dtype=object)
    shown, _ = _label_rows(table, label_mode if label_mode in ("all", "ends", "none") else "none", identity)
    text = np.full(n, "", dtype=object)
    text[shown] = np.asarray(labels, dtype=object)[shown] if len(shown) else []
    custom = _custom(table, labels)
    epochs = table.meta["epoch"]
    epoch_list = _ordered(epochs)
    Scatter = go.Scatter3d if dims == 3 else (go.Scattergl if n > WEBGL_FROM else go.Scatter)
    # The traces are built here from checked values: plotly's validation of every property of every trace in
    # every frame was a third of the page's time.
    raw = {"_validate": False}
    axes = ("x", "y", "z")[:dims]
    several_kinds = len(kinds) > 1 and color_by != "kind"
    segments, start = (_trajectory_segments(table, coords, identity) if trajectories and n
                       else (np.empty((0, 2, dims)), np.array([], dtype=int)))
    seg_end_epoch = epochs[start] if len(start) else np.array([])
    if len(start):
        # the epoch a segment arrives at: the next epoch of the same identity
        order = np.lexsort((epochs, identity))
        nxt = dict(zip(order[:-1].tolist(), order[1:].tolist()))
        seg_end_epoch = np.array([epochs[nxt[s]] for s in start])
    seg_group = group_text[start] if len(start) else np.array([], dtype=object)

    present = {(v, k) for v, k in zip(group_text.tolist(), table.meta["kind"].tolist())}
    first_kind = {v: next(k for k in kinds if (v, k) in present) for v in colors}

    def points(mask) -> list:
        # One trace per (colour, kind) present, the same list in every frame so that frames can replace them.
        traces = []
        for value, color in colors.items():
            for kind in kinds:
                if (value, kind) not in present:
                    continue
                rows = np.flatnonzero(mask & (group_text == value) & (table.meta["kind"] == kind))
                first = kind == first_kind[value]
                traces.append(Scatter(
                    **{a: coords[rows, j] for j, a in enumerate(axes)},
                    mode="markers+text" if text[rows].any() else "markers", text=text[rows].tolist(),
                    textposition="top center", textfont={"size": 10},
                    name=kind if several_kinds else value, legendgroup=value,
                    legendgrouptitle={"text": value} if several_kinds and first else None,
                    marker={"color": color, "symbol": symbol[kind], "size": 5 if dims == 3 else 9,
                            "line": {"color": "white", "width": 0.5}},
                    customdata=[custom[i] for i in rows], hovertemplate=HOVER,
                    meta={"role": "points", "group": value, "kind": kind}, **raw))
        return traces

    def paths(upto) -> list:
        traces = []
        if not trajectories:
            return traces
        for value, color in colors.items():
            keep = (seg_group == value) & (seg_end_epoch <= upto) if len(start) else np.zeros(0, dtype=bool)
            seg = segments[keep]
            line = {a: _with_gaps(seg[:, :, j]) for j, a in enumerate(axes)}
            common = dict(legendgroup=value, showlegend=False, hoverinfo="skip")
            if dims == 2:
                # An arrow marker at each segment's end, turned along the segment (angleref "previous").
                size = np.tile([0, 11, 0], len(seg)).tolist()
                traces.append(go.Scatter(**line, mode="lines+markers", opacity=0.6,
                                         line={"color": color, "width": 1.2},
                                         marker={"symbol": "arrow", "angleref": "previous", "size": size,
                                                 "color": color},
                                         meta={"role": "trajectory", "group": value}, **common, **raw))
            else:
                traces.append(go.Scatter3d(**line, mode="lines", line={"color": color, "width": 3}, opacity=0.6,
                                           meta={"role": "trajectory", "group": value}, **common, **raw))
                traces.append(_cones(go, seg, coords, color, value, common))
        return traces

    everything = np.ones(n, dtype=bool)
    last = epoch_list[-1] if epoch_list else 0
    fig = go.Figure(data=points(everything) + paths(last), **raw)
    lo, hi = (coords.min(axis=0), coords.max(axis=0)) if n else (np.zeros(dims), np.ones(dims))
    pad = 0.06 * np.maximum(hi - lo, 1e-9)
    ranges = [[float(a), float(b)] for a, b in zip(lo - pad, hi + pad)]
    heading = title if title is not None else describe_selection(table)
    layout = dict(title={"text": html.escape(heading), "font": {"size": 14}}, hovermode="closest",
                  legend={"title": {"text": color_by}, "groupclick": "togglegroup", "itemsizing": "constant"},
                  margin={"l": 50, "r": 20, "t": 60, "b": 40}, uirevision="keep",
                  template=pio.templates["plotly_white"])  # an object: unvalidated, a name would stay a name
    if dims == 3:
        layout["scene"] = {f"{a}axis": {"title": {"text": f"component {j + 1}"}, "range": ranges[j],
                                        "autorange": False} for j, a in enumerate(axes)}
        layout["scene"]["aspectmode"] = "cube"
    else:
        layout["xaxis"] = {"title": {"text": "component 1"}, "range": ranges[0], "autorange": False}
        layout["yaxis"] = {"title": {"text": "component 2"}, "range": ranges[1], "autorange": False}
    if len(epoch_list) > 1:
        frames = [go.Frame(name="all", data=points(everything) + paths(last), **raw)]
        frames += [go.Frame(name=str(e), data=points(epochs == e) + paths(e), **raw) for e in epoch_list]
        fig.frames = frames
        step = {"frame": {"duration": 0, "redraw": True}, "mode": "immediate", "transition": {"duration": 0}}
        layout["sliders"] = [{
            "active": 0, "currentvalue": {"prefix": "epoch "}, "pad": {"t": 40}, "len": 0.85, "x": 0.12,
            "steps": [{"label": name, "method": "animate", "args": [[name], step]}
                      for name in ["all", *map(str, epoch_list)]]}]
        layout["updatemenus"] = [{
            "type": "buttons", "direction": "left", "x": 0.0, "y": 0, "xanchor": "left", "yanchor": "top",
            "pad": {"t": 48, "r": 10}, "showactive": False,
            "buttons": [{"label": "▶ play", "method": "animate",
                         "args": [[str(e) for e in epoch_list],
                                  {"frame": {"duration": 900, "redraw": True}, "fromcurrent": False,
                                   "mode": "immediate", "transition": {"duration": 300}}]},
                        {"label": "❚❚", "method": "animate",
                         "args": [[None], {"frame": {"duration": 0, "redraw": False}, "mode": "immediate"}]}]}]
        layout["margin"]["b"] = 110
    fig.update_layout(**layout)
    return fig


def _with_gaps(ends: np.ndarray) -> list:
    """(n_segments, 2) start/end values -> [s0, e0, None, s1, e1, None, ...] for one line trace of many pieces."""
    out = np.full((len(ends), 3), None, dtype=object)
    out[:, :2] = ends
    return out.ravel().tolist()


def _cones(go, seg: np.ndarray, coords: np.ndarray, color: str, group: str, common: dict):
    """Cone heads at the ends of 3-D segments (n_segments, 2, 3), one size: 4% of the box diagonal."""
    delta = seg[:, 1] - seg[:, 0] if len(seg) else np.zeros((0, 3))
    length = np.linalg.norm(delta, axis=1)
    moving = length > 1e-12
    end, unit = seg[moving, 1] if len(seg) else np.zeros((0, 3)), delta[moving] / np.maximum(length[moving, None],
                                                                                               1e-12)
    span = float(np.linalg.norm(coords.max(axis=0) - coords.min(axis=0))) if len(coords) else 1.0
    return go.Cone(x=end[:, 0], y=end[:, 1], z=end[:, 2], u=unit[:, 0], v=unit[:, 1], w=unit[:, 2],
                   anchor="tip", sizemode="raw", sizeref=0.04 * max(span, 1e-9),
                   colorscale=[[0, color], [1, color]], showscale=False, opacity=0.8,
                   meta={"role": "heads", "group": group}, **common)


def scatter_page(table, coords: np.ndarray, path: Path | str, color_by: str = "sentence",
                 label: str = DEFAULT_LABEL, label_mode: str = "auto", trajectories: bool = False,
                 title: str | None = None, plotlyjs: str = "embed") -> Path:
    """Write `scatter_figure` as an offline page at `path` (.html); returns the path."""
    path = Path(path)
    if path.suffix.lower() != ".html":
        raise QkvtraceError(f"{path}: the interactive scatter is written as .html, not {path.suffix or '(none)'!r}")
    fig = scatter_figure(table, coords, color_by=color_by, label=label, label_mode=label_mode,
                         trajectories=trajectories, title=title)
    return write_page(fig, path, plotlyjs=plotlyjs, title=title or describe_selection(table))


def attention_figure(patterns: list, query_labels, key_labels, titles, query_axis: str | None = None,
                     key_axis: str | None = None, title: str | None = None):
    """Attention weights as plotly heatmaps, one row per epoch and one column per head, on one 0..1 scale, with a
    hover card (query token, key token, weight); the interactive twin of `plot.attention_grid`.

    patterns : one (head, query_pos, key_pos) array per epoch; titles : one per epoch, e.g. "epoch 30".
    """
    go, _ = plotly_modules()
    from plotly.subplots import make_subplots

    shapes = {np.shape(p) for p in patterns}
    if not patterns or len(titles) != len(patterns) or len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise QkvtraceError(f"attention figure needs (head, query_pos, key_pos) patterns of one shape and one title "
                            f"each; got shapes {sorted(shapes)} and {len(titles)} titles")
    n_heads, n_query, n_key = next(iter(shapes))
    if (n_query, n_key) != (len(query_labels), len(key_labels)):
        raise QkvtraceError(f"attention patterns are {n_query} x {n_key} but there are {len(query_labels)} query "
                            f"and {len(key_labels)} key labels")
    fig = make_subplots(rows=len(patterns), cols=n_heads, horizontal_spacing=0.04, vertical_spacing=0.08,
                        subplot_titles=[f"{t} · head {h}" for t in titles for h in range(n_heads)])
    # Positions, not tokens, on the axes: a sentence may hold one token twice, which a categorical axis would merge.
    hover = [[[str(q), str(k)] for k in key_labels] for q in query_labels]
    for r, pattern in enumerate(patterns):
        for h in range(n_heads):
            fig.add_trace(go.Heatmap(z=np.asarray(pattern[h], dtype=np.float64), zmin=0, zmax=1,
                                     colorscale="Viridis", showscale=r == 0 and h == 0, customdata=hover,
                                     colorbar={"title": {"text": "weight"}},
                                     hovertemplate="query %{customdata[0]}<br>key %{customdata[1]}<br>"
                                                   "weight %{z:.3f}<extra></extra>"), row=r + 1, col=h + 1)
            fig.update_xaxes(tickvals=list(range(n_key)), ticktext=[str(k) for k in key_labels], tickangle=-45,
                             title_text=key_axis if r == len(patterns) - 1 else None, row=r + 1, col=h + 1)
            fig.update_yaxes(tickvals=list(range(n_query)), ticktext=[str(q) for q in query_labels],
                             autorange="reversed", title_text=query_axis if h == 0 else None, row=r + 1, col=h + 1)
    fig.update_layout(title={"text": html.escape(title or "attention")}, template="plotly_white",
                      height=max(320, 90 + len(patterns) * (60 + 28 * n_query)),
                      width=max(600, 160 + n_heads * (80 + 40 * n_key)))
    return fig


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")



# --- the explorer of `qkvtrace view` ---

EXPLORER_METHODS = ("pca", "umap", "tsne")
QUERY_SIDE = {"encoder.self": "src", "decoder.self": "tgt", "decoder.cross": "tgt"}


def _spaces(table) -> list[np.ndarray]:
    """Row indices of each vector space: one site, layer, head and width (the rows a projection may mix)."""
    meta = table.meta
    keys = np.array(["|".join(map(str, k)) for k in zip(meta["site"], meta["layer"], meta["head"], meta["dim"])],
                    dtype=object)
    return [np.flatnonzero(keys == key) for key in _ordered(keys)]


def method_parameters(method: str, n_distinct: int, dims: int = 2) -> str:
    """The parameters `project.project` uses for `method` on `n_distinct` distinct vectors, as text."""
    from qkvtrace.project import _umap_init

    if method == "pca":
        return "PCA: exact SVD, fitted on every row"
    if method == "umap":
        return (f"UMAP: n_neighbors {min(15, n_distinct - 1)}, min_dist 0.1, euclidean, init "
                f"{_umap_init(n_distinct, dims)}, seed fixed; fitted on {n_distinct} distinct vectors")
    return (f"t-SNE: perplexity {min(30.0, (n_distinct - 1) / 3):.1f}, init pca, Barnes-Hut, seed fixed; fitted on "
            f"{n_distinct} distinct vectors")


def nearest_neighbours(X: np.ndarray, k: int, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest other rows of X (n, d) by cosine: indices (n, k) int32, -1 where fewer exist, and cosines
    (n, k) float32, best first."""
    import torch  # topk: numpy's argpartition was 80% of writing a 100,000-point page

    X = np.asarray(X, dtype=np.float32)
    n = len(X)
    k_eff = min(k, n - 1)
    index = np.full((n, k), -1, dtype=np.int32)
    cosine = np.zeros((n, k), dtype=np.float32)
    if k_eff <= 0:
        return index, cosine
    unit = torch.from_numpy(X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12))
    for start in range(0, n, block):
        stop = min(start + block, n)
        S = unit[start:stop] @ unit.T  # (block, n)
        S[torch.arange(stop - start), torch.arange(start, stop)] = -float("inf")  # not its own neighbour
        values, top = S.topk(k_eff, dim=1)  # (block, k_eff), best first
        index[start:stop, :k_eff] = top.numpy()
        cosine[start:stop, :k_eff] = values.numpy()
    return index, cosine


def explorer_data(table, methods=EXPLORER_METHODS, k: int = 10, seed: int = 0, qk_joint: bool = True,
                  progress=None) -> dict:
    """Everything the explorer page shows, computed now: per vector space (site, layer, head) the 2-D coordinates
    of every method (and, for single heads holding q and k, of the queries and keys joined as `project.qk_joint`
    does), the k nearest neighbours by cosine within each space, kind and epoch, the columns and the attention
    patterns. Arrays are base64 of little-endian float32 / int32 / int16, ready for JavaScript typed arrays."""
    from qkvtrace.project import (QK_PAIR_COLUMNS, describe_qk_joint, min_points, project_epochs, qk_joint_epochs,
                                  unique_rows)

    say = progress or (lambda message: None)
    n = len(table)
    meta = table.meta
    if not n:
        raise QkvtraceError("the vector table has no rows")
    k = max(1, min(k, n - 1))  # a row has at most n - 1 others; a larger k would only allocate empty slots
    for m in methods:
        if m not in EXPLORER_METHODS:
            raise QkvtraceError(f"methods: unknown method {m!r}; choose from {', '.join(EXPLORER_METHODS)}")
    labels = meta["label"].astype(str) if "label" in meta else np.full(n, "", dtype=object)
    if not all(labels):
        labels = np.where(labels != "", labels, np.asarray(format_labels(table), dtype=object))
    identity = identity_keys(table)
    coords: dict[str, np.ndarray] = {}
    params: dict[str, dict[str, str]] = {}
    nbr_index = np.full((n, k), -1, dtype=np.int32)
    nbr_cos = np.zeros((n, k), dtype=np.float32)
    spaces = _spaces(table)
    for rows in spaces:
        width = int(meta["dim"][rows[0]])
        X = np.ascontiguousarray(table.X[rows, :width], dtype=np.float32)
        name = f"{meta['site'][rows[0]]} · layer {meta['layer'][rows[0]]} · head {meta['head'][rows[0]]}"
        kinds = meta["kind"][rows]
        qk_rows = np.flatnonzero(np.isin(kinds, ["q", "k"]))
        variants = [("", rows, X)]
        if (qk_joint and meta["head"][rows[0]] != "concat" and {"q", "k"} <= set(kinds.tolist())
                and all(((kinds == "q") & (meta["epoch"][rows] == e)).any() and
                        ((kinds == "k") & (meta["epoch"][rows] == e)).any() for e in np.unique(meta["epoch"][rows]))):
            joined = qk_joint_epochs(X[qk_rows], kinds[qk_rows] == "q", meta["epoch"][rows][qk_rows])
            variants.append(("|qk", rows[qk_rows], joined))
            qk_said = describe_qk_joint(X[qk_rows], joined, kinds[qk_rows] == "q",
                                        {c: meta[c][rows[qk_rows]] for c in QK_PAIR_COLUMNS})[0]
        for suffix, sub, Y in variants:
            distinct = len(unique_rows(Y)[0])
            for m in methods:
                key = m + suffix
                out = coords.setdefault(key, np.full((n, 2), np.nan, dtype=np.float32))
                if distinct < min_points(m, 2) or (m == "pca" and min(distinct, Y.shape[1]) < 2):
                    params.setdefault(key, {})[name] = f"{m}: too few distinct vectors ({distinct}), not drawn"
                    continue
                say(f"{name}{' (q and k joined)' if suffix else ''}: {m} of {len(sub)} vectors")
                out[sub] = project_epochs(Y, meta["epoch"][sub], identity[sub], method=m, dims=2, frame="joint",
                                          seed=seed)
                params.setdefault(key, {})[name] = method_parameters(m, distinct) + ("; " + qk_said if suffix else "")
        # neighbours within one kind and epoch: vectors of different kinds or checkpoints live in different spaces
        slices = {}
        for i, key in zip(rows, zip(meta["kind"][rows], meta["epoch"][rows])):
            slices.setdefault(key, []).append(i)
        for members in slices.values():
            members = np.asarray(members)
            idx, cos = nearest_neighbours(table.X[members, :width], k)
            nbr_index[members] = np.where(idx >= 0, members[np.maximum(idx, 0)], -1)
            nbr_cos[members] = cos
    columns = {}
    for name in table.columns:
        if name == "dim":
            continue
        values = _ordered(meta[name])
        lookup = {v: j for j, v in enumerate(values)}
        codes = np.array([lookup[v] for v in meta[name].tolist()], dtype="<u4")
        columns[name] = {"values": [v if isinstance(v, (int, float)) else str(v) for v in values],
                         "codes": _b64(codes)}
    patterns = [{"epoch": int(p["epoch"]), "sentence_id": int(p["sentence_id"]), "site": p["site"],
                 "layer": int(p["layer"]), "query_tokens": list(p["query_tokens"]),
                 "key_tokens": list(p["key_tokens"]),
                 "pattern": np.round(np.asarray(p["pattern"], dtype=np.float64), 3).tolist()}
                for p in table.patterns]
    return {"n": n, "labels": labels.tolist(), "columns": columns,
            "coords": {key: _b64(c.astype("<f4").ravel()) for key, c in coords.items()},
            "methods": list(methods), "parameters": params, "k": k,
            "neighbours": {"index": _b64(nbr_index.astype("<i4").ravel()),
                           "cosine": _b64(np.round(nbr_cos * 10000).astype("<i2").ravel())},
            "patterns": patterns, "query_side": QUERY_SIDE}


def explorer_page(table, path: Path | str, methods=EXPLORER_METHODS, k: int = 10, seed: int = 0,
                  qk_joint: bool = True, title: str | None = None, progress=None) -> Path:
    """Write the explorer of a vector table at `path` (.html, self-contained, offline); returns the path."""
    from plotly.offline import get_plotlyjs

    plotly_modules()
    path = Path(path)
    if path.suffix.lower() != ".html":
        raise QkvtraceError(f"{path}: the explorer is written as .html, not {path.suffix or '(none)'!r}", param="out")
    check_writable(path, "--out")  # before minutes of projections, not after
    data = explorer_data(table, methods=methods, k=k, seed=seed, qk_joint=qk_joint, progress=progress)
    heading = title or f"qkvtrace explorer · {len(table):,} vectors"
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")
    page = (_EXPLORER.replace("__TITLE__", html.escape(heading))
            .replace("__PLOTLY__", get_plotlyjs().replace("</script", "<\\/script"))
            .replace("__DATA__", payload)
            .replace("__SCRIPT__", (Path(__file__).with_name("explorer.js")).read_text(encoding="utf-8")))
    with os_errors(path, "--out"):
        path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, page)
    return path


_EXPLORER = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
html,body{height:100%;margin:0;font:13px system-ui,sans-serif;color:#222}
#bar{padding:6px 10px;border-bottom:1px solid #ddd;display:flex;flex-wrap:wrap;gap:4px 14px;align-items:center}
#bar label{white-space:nowrap}#main{display:flex;height:calc(100% - 90px)}#figure{flex:1;min-width:0}
#side{width:340px;overflow:auto;border-left:1px solid #ddd;padding:8px 10px}#params{color:#555;padding:2px 10px}
#side h3{margin:.2em 0;font-size:14px}#side table{border-collapse:collapse;font-size:12px}
#side td,#side th{padding:1px 5px;border:1px solid #eee}#side ol{padding-left:1.4em;margin:.3em 0}
.muted{color:#777}
</style></head><body>
<div id="bar"><b>__TITLE__</b>
<label>site <select id="site"></select></label><label>layer <select id="layer"></select></label>
<label>head <select id="head"></select></label><label>kind <select id="kind"></select></label>
<label>epoch <input id="epoch" type="range" min="0" value="0" step="1"> <span id="epoch-value"></span></label>
<label>projection <select id="method"></select></label>
<label><input id="qk" type="checkbox"> Q and K joined</label>
<label>colour by <select id="color"></select></label>
<label>search <input id="search" type="search" placeholder="word or label"></label> <span id="matches"></span>
</div>
<div id="params"></div>
<div id="main"><div id="figure"></div><div id="side"><p class="muted">Click a point: its nearest neighbours by
cosine in the original space, its sentence and its attention row.</p></div></div>
<script>__PLOTLY__</script>
<script type="application/json" id="data">__DATA__</script>
<script>__SCRIPT__</script>
</body></html>
"""
