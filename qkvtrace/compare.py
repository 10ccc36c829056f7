"""Comparisons between sentences and checkpoints: cosine-similarity tables and attention patterns.

`similarity(run, a, b, ...)` gives the study's tables: the cosine between every token of sentence a (rows) and
every token of sentence b (columns) for one kind of vector, per epoch; decoder tokens are named by their transition
(`sos->wir`). `attention(run, sentence, ...)` gives the attention weights per epoch on shared axes.

Across several epochs the decoder is teacher-forced on the newest checkpoint's translation, so that every epoch's
table and heatmap has the same rows and columns and their change can be read cell by cell.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qkvtrace.errors import QkvtraceError
from qkvtrace.files import atomic_write_text, check_new_files, publish_dir
from qkvtrace.sites import SIDE_NAMES, SITE


@dataclass
class SimilarityTable:
    """Cosine similarity between the tokens of two sentences for one kind of vector at one epoch (or a change)."""
    epoch: int | str          # an epoch, or "15-1" for the change from epoch 1 to 15
    kind: str
    site: str
    layer: int
    head: str
    sentence_a: str
    sentence_b: str
    rows: list[str]           # tokens of sentence a (transitions on the decoder side)
    cols: list[str]           # tokens of sentence b
    matrix: np.ndarray        # (len(rows), len(cols)) cosines, or their change

    @property
    def title(self) -> str:
        if isinstance(self.epoch, str):
            after, before = self.epoch.split("-")
            what = f"change from epoch {before} to {after}"
        else:
            what = f"epoch {self.epoch}"
        head = "" if self.head == "concat" else f" head {self.head}"
        return f"cosine {self.kind} · {self.site} layer {self.layer}{head} · {what}"

    @property
    def stem(self) -> str:
        head = "" if self.head == "concat" else f"-h{self.head}"
        return f"similarity-{self.kind}-{self.site}-L{self.layer}{head}-e{self.epoch}"

    def text(self) -> str:
        """The table as the study printed it: rows = tokens of a, columns = tokens of b, two decimals."""
        width = max(6, *(len(c) for c in self.cols))
        first = max(len(r) for r in self.rows)
        lines = [" " * first + "  " + "  ".join(c.rjust(width) for c in self.cols)]
        for r, row in zip(self.rows, self.matrix):
            lines.append(r.ljust(first) + "  " + "  ".join(f"{v:+.2f}".rjust(width) for v in row))
        return "\n".join(lines)

    def markdown(self) -> str:
        esc = [c.replace("|", "\\|") for c in self.cols]
        lines = [f"| {self.sentence_a} \\ {self.sentence_b} | " + " | ".join(esc) + " |",
                 "|---|" + "---:|" * len(self.cols)]
        for r, row in zip(self.rows, self.matrix):
            cell = r.replace("|", "\\|")
            lines.append(f"| {cell} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow([""] + self.cols)
        for r, row in zip(self.rows, self.matrix):
            w.writerow([r] + [f"{v:.6f}" for v in row])
        return buf.getvalue()


def _check_layer(run, layer: int) -> None:
    if not 0 <= layer < run.model_cfg.n_layers:
        raise QkvtraceError(f"{layer}: the model has layers 0..{run.model_cfg.n_layers - 1}", param="layer")


def _check_one(value, valid, param: str) -> str:
    """`value` if it is one of `valid`: a table or a heatmap shows one kind, site and head (a list such as "k,v"
    would mix rows of several into one table)."""
    valid = [str(v) for v in valid]
    if str(value) not in valid:
        raise QkvtraceError(f"{value!r}: expected one of {', '.join(valid)}", param=param)
    return str(value)


def _targets(run, sentences: list[str], epochs: list[int], site: str, targets) -> list[str | None]:
    """Decoder targets: given ones, else (several epochs, decoder site) the newest checkpoint's translations."""
    targets = list(targets) if targets else [None] * len(sentences)
    if site.startswith("decoder") and len(epochs) > 1 and None in targets:
        newest = run.translate([s for s, t in zip(sentences, targets) if t is None], max(epochs))
        it = iter(newest)
        targets = [t if t is not None else _fitting(run, next(it).text) for t in targets]
    return targets


def _fitting(run, text: str) -> str:
    """A translation cut at the model's length (no <eos>) is too long to be teacher-forced once <sos>/<eos> are
    added: keep the words that fit (the decoder read no more of its own translation either)."""
    vocab, limit = getattr(run, "tgt_vocab", None), getattr(getattr(run, "model_cfg", None), "max_len", None)
    if vocab is None or not limit:
        return text
    words = text.split()
    while len(words) > 1 and len(vocab.encode(" ".join(words))) > limit:
        words.pop()
    return " ".join(words)


def _token_labels(sub) -> list[str]:
    tr = sub.meta["transition"]
    return [t if t else tok for t, tok in zip(tr, sub.meta["token"])]


def similarity(run, a: str, b: str, kind: str = "k", site: str = "encoder.self", layer: int = 0,
               epochs: list[int] | None = None, head: str = "concat", targets=None) -> list[SimilarityTable]:
    """Cosine tables between the tokens of sentences `a` and `b`, one per epoch, then one per change between
    consecutive epochs.

    kind: q, k, v, z (x1), attn_out (x4), layer_out, or `pattern` for attention weights (each query's weights over
    the keys, keys matched by token so that permuted sentences compare item by item; heads side by side).
    """
    from qkvtrace.extract import extract
    from qkvtrace.sites import ALIASES, KINDS, SITES
    from qkvtrace.project import cosine_matrix
    from qkvtrace.sources import open_source

    run = open_source(run, "run")
    _check_one(kind, [*KINDS, *ALIASES, "pattern"], "kind")
    _check_one(site, SITES, "site")
    _check_one(head, ["concat", *range(run.model_cfg.n_heads)], "head")
    if kind == "pattern" and head != "concat":
        raise QkvtraceError("pattern compares all heads side by side; leave head at concat", param="kind")
    epochs = ([run.check_epoch(e, "epochs" if len(epochs) > 1 else "epoch") for e in epochs] if epochs
              else [run.check_epoch(None)])
    _check_layer(run, layer)
    tg = _targets(run, [a, b], epochs, site, targets)
    sents = [(s, t) if t else s for s, t in zip([a, b], tg)]
    want = "q" if kind == "pattern" else kind
    table = extract(run, sents, epochs=epochs, sites=site, kinds=want, layers=str(layer), heads=head,
                    patterns=kind == "pattern")
    out: list[SimilarityTable] = []
    for epoch in epochs:
        ta, tb = (table.where(epoch=epoch, sentence_id=i) for i in (0, 1))
        ta, tb = (t.rows(np.argsort(t.meta["position"], kind="stable")) for t in (ta, tb))
        if kind == "pattern":
            A, B, rows, cols = _pattern_vectors(table.patterns, epoch, site, layer)
        else:
            A, B, rows, cols = ta.vectors(), tb.vectors(), _token_labels(ta), _token_labels(tb)
        out.append(SimilarityTable(epoch, kind, site, layer, head, a, b, rows, cols, cosine_matrix(A, B)))
    for before, after in zip(out[:-1], out[1:]):
        if before.matrix.shape == after.matrix.shape:
            out.append(SimilarityTable(f"{after.epoch}-{before.epoch}", kind, site, layer, head, a, b, after.rows,
                                       after.cols, after.matrix - before.matrix))
    return out


def _pattern_vectors(patterns, epoch, site, layer):
    """Attention rows of both sentences with keys put in one shared token order (sentence a's)."""
    pa, pb = (next(p for p in patterns if p["epoch"] == epoch and p["sentence_id"] == i and p["site"] == site
                   and p["layer"] == layer) for i in (0, 1))
    ka, kb = list(pa["key_tokens"]), list(pb["key_tokens"])
    if sorted(ka) != sorted(kb):
        raise QkvtraceError("pattern compares attention item by item, so the two sentences' "
                            f"{SIDE_NAMES[SITE[site].key_side]} tokens must be the same words in any "
                            f"order; got {' '.join(ka)} vs {' '.join(kb)}", param="kind")
    # For each key token of a, the matching position in b (repeated words are matched in order).
    used, order = set(), []
    for tok in ka:
        j = next(j for j, t in enumerate(kb) if t == tok and j not in used)
        used.add(j)
        order.append(j)
    A = np.asarray(pa["pattern"])                 # (head, query_pos, key_pos)
    B = np.asarray(pb["pattern"])[:, :, order]    # keys of b reordered to a's token order
    flat = lambda p: p.transpose(1, 0, 2).reshape(p.shape[1], -1)  # (query_pos, head * key_pos)
    return flat(A), flat(B), list(pa["query_tokens"]), list(pb["query_tokens"])


def write_similarity(tables: list[SimilarityTable], out_dir: Path | str, overwrite: bool = True) -> list[Path]:
    """For each table: CSV, Markdown and a heatmap PNG in `out_dir`; returns the paths written.

    With overwrite=False, any of those files already in `out_dir` is an error raised before anything is written
    (other files in the directory are left alone). A run directory or a vector table's folder is refused."""
    from qkvtrace.table import is_table_dir

    out = Path(out_dir)
    if (out / "run.json").is_file():  # swapping a run directory for a copy could lose a training run's next epoch
        raise QkvtraceError(f"{out}: a run directory; write the tables to a folder of their own, e.g. "
                            f"{out / 'similarity'}", param="out")
    if is_table_dir(out):  # its CSV and Markdown files would make `extract --force` refuse the folder after
        raise QkvtraceError(f"{out}: holds a vector table; write the tables to a folder of their own, e.g. "
                            f"{out.with_name(out.name + '-similarity')}", param="out")
    # The tables share `out` with other files: the new folder is the old one plus these files, put in place at once.
    with publish_dir(out, merge=True) as stage:
        if not overwrite:
            check_new_files([out / f"{t.stem}{ext}" for t in tables for ext in (".csv", ".md", ".png")])
        for t in tables:
            _write_table(t, stage)
    return [out / f"{t.stem}{ext}" for t in tables for ext in (".csv", ".md", ".png")]


def _write_table(t: SimilarityTable, out: Path) -> None:
    from qkvtrace.plot import heatmap, save_figure
    from matplotlib.figure import Figure

    atomic_write_text(out / f"{t.stem}.csv", t.csv())
    atomic_write_text(out / f"{t.stem}.md", f"**{t.title}**\n\n" + t.markdown())
    change = isinstance(t.epoch, str)
    fig = Figure(figsize=(1.8 + 0.75 * len(t.cols), 1.4 + 0.5 * len(t.rows)), layout="constrained")
    ax = fig.add_subplot()
    heatmap(t.matrix, t.rows, t.cols, ax=ax, vmin=-1, vmax=1, title=f"{t.title}\n{t.sentence_a} vs {t.sentence_b}",
            cmap="RdBu_r" if change else "viridis")
    ax.set_xlabel(t.sentence_b)
    ax.set_ylabel(t.sentence_a)
    save_figure(fig, out / f"{t.stem}.png")


@dataclass
class AttentionPatterns:
    """Attention weights of one sentence at one site and layer for several epochs, on shared axes."""
    sentence: str
    site: str
    layer: int
    epochs: list[int]
    query_tokens: list[str]
    key_tokens: list[str]
    patterns: list[np.ndarray]  # one per epoch, each (head, query_pos, key_pos)

    def figure(self):
        from qkvtrace.plot import attention_grid

        side = self._sides()
        fig = attention_grid(self.patterns, self.query_tokens, self.key_tokens,
                             [f"epoch {e}" for e in self.epochs], vmin=0.0, vmax=1.0,
                             query_axis=f"query: {side[0]} token" if side else None,
                             key_axis=f"key: {side[1]} token" if side else None)
        fig.suptitle(self.title())
        return fig

    def title(self) -> str:
        return f"attention · {self.site} layer {self.layer} · \"{self.sentence}\""

    def save(self, path, plotlyjs: str = "embed"):
        """Write the figure to `path`: .html as an interactive plotly page (see `web.write_page` for plotlyjs),
        .png/.svg/.pdf with matplotlib. Returns the path."""
        from pathlib import Path

        if Path(path).suffix.lower() == ".html":
            from qkvtrace.web import attention_figure, write_page

            side = self._sides()
            fig = attention_figure(self.patterns, self.query_tokens, self.key_tokens,
                                   [f"epoch {e}" for e in self.epochs], title=self.title(),
                                   query_axis=f"query: {side[0]} token" if side else None,
                                   key_axis=f"key: {side[1]} token" if side else None)
            return write_page(fig, path, plotlyjs=plotlyjs, title=self.title())
        from qkvtrace.plot import save_figure

        return save_figure(self.figure(), path)

    def _sides(self) -> tuple[str, str] | None:
        """Axis names (query side, key side) of this site; decoder queries are named by their transition."""
        site = SITE.get(self.site)
        if site is None:
            return None
        name = {"src": "source", "tgt": "target (input->next)"}
        return name[site.query_side], SIDE_NAMES[site.key_side]


def attention(run, sentence: str, epochs: list[int] | None = None, site: str = "decoder.cross", layer: int = 0,
              target: str | None = None) -> AttentionPatterns:
    """Attention patterns of `sentence` at `site`/`layer` for each epoch (all checkpoints by default)."""
    from qkvtrace.extract import extract
    from qkvtrace.sites import SITES
    from qkvtrace.sources import open_source

    if target is not None and not target.strip():
        raise QkvtraceError(f"{target!r}: empty; give the translation to teacher-force, or leave it out for the "
                            "newest checkpoint's", param="target")
    run = open_source(run, "run")
    _check_one(site, SITES, "site")
    epochs = [run.check_epoch(e, "epochs") for e in epochs] if epochs else run.checkpoint_epochs()
    _check_layer(run, layer)
    tgt = _targets(run, [sentence], epochs, site, [target])[0]
    table = extract(run, [(sentence, tgt) if tgt else sentence], epochs=epochs, sites=site, kinds="q",
                    layers=str(layer), specials=True)
    pats = [next(p for p in table.patterns if p["epoch"] == e) for e in epochs]
    return AttentionPatterns(sentence, site, layer, epochs, list(pats[-1]["query_tokens"]), list(pats[-1]["key_tokens"]),
                             [np.asarray(p["pattern"]) for p in pats])
