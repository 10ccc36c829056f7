"""Extraction: a `Selection` of what to capture, and `extract()` -> VectorTable.

For each checkpoint epoch, each sentence, each attention site (encoder.self, decoder.self, decoder.cross), layer and
head, the exact vectors the model computed: q, k, v, z (softmax(QKᵀ/√d_head + mask)·V before out_proj; alias x1),
attn_out (after out_proj; alias x4) and layer_out (the layer's output). The decoder runs on a given target
(teacher forcing) or on the model's own greedy translation at that epoch, as the study did.

Extraction talks to the model only through a source (`sources.py`: encode the sentences, run a forward with named
hook points); rows are built here, a whole block (one epoch, batch, site, layer, kind and head) at a time.
Rows: queries (q, z, attn_out) and layer_out live at the query side's positions; k and v at the key side's, which for
cross-attention is the source. Large extractions stream to disk in chunks bounded by `max_memory_mb`.
"""

from __future__ import annotations

import io
import logging
import os
import string
import struct
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from qkvtrace.errors import QkvtraceError
from qkvtrace import files
from qkvtrace.files import atomic_write_json
from qkvtrace.sites import ALIASES, HEADED_KINDS, KEY_KINDS, KINDS, SIDE_NAMES, SITE, SITES
from qkvtrace.pieces import DEFAULT_POOL, POOLS
from qkvtrace.sources import Source, Tokens, as_source, capture  # noqa: F401  (capture: public API)
from qkvtrace.table import COLUMNS, VectorTable, write_meta_csv, write_patterns
from qkvtrace.vocab import tokenize

DEFAULT_LABEL = "{word}@{kind}@{epoch}"
log = logging.getLogger("qkvtrace")


@dataclass(frozen=True)
class Sentence:
    """A source sentence, an optional target to teacher-force, and where it came from (for error messages)."""
    src: str
    tgt: str | None = None
    origin: str = ""


def read_sentences(path: Path | str, param: str = "sentences") -> list[Sentence]:
    """One source sentence a line, optionally `source<TAB>target`; empty files and empty lines are errors."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")  # an editor's byte-order mark would read as an <unk> word
    except FileNotFoundError:
        raise QkvtraceError(f"{path}: no such file", param=param) from None
    except UnicodeDecodeError:
        raise QkvtraceError(f"{path}: not UTF-8 text", param=param) from None
    except OSError as e:
        raise QkvtraceError(f"{path}: cannot read ({e.strerror})", param=param) from None
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()  # a trailing blank line is the usual end of a file, not an empty sentence
    if not lines:
        raise QkvtraceError(f"{path}: the file is empty; write one sentence a line", param=param)
    out = []
    for i, line in enumerate(lines, 1):
        if line.count("\t") > 1:
            raise QkvtraceError(f"{path}:{i}: {line.count(chr(9)) + 1} tab-separated columns; write source or "
                                "source<TAB>target")
        src, _, tgt = line.partition("\t")
        if not tokenize(src):
            raise QkvtraceError(f"{path}:{i}: empty sentence; write one sentence a line (source<TAB>target optional)")
        if "\t" in line and not tokenize(tgt):
            raise QkvtraceError(f"{path}:{i}: empty target after the tab; remove the tab or write the target")
        out.append(Sentence(src.strip(), tgt.strip() if tgt.strip() else None, f"{path}:{i}"))
    return out


def as_sentences(sentences) -> list[Sentence]:
    """Accept Sentence objects, plain strings, or (src, tgt) tuples; one string alone is one sentence."""
    if isinstance(sentences, (str, Sentence)):
        sentences = [sentences]  # not one sentence per character
    out = []
    for s in sentences:
        if isinstance(s, Sentence):
            out.append(s)
        elif isinstance(s, str):
            out.append(Sentence(s))
        else:
            src, tgt = s
            out.append(Sentence(src, tgt))
    if not out:
        raise QkvtraceError(": none given; give at least one sentence", param="sentences")
    return out


# ----------------------------------------------------------------------------------------------------------------
# what to extract

def _items(value, param: str) -> list[str]:
    """'q,k,v', a list, or one number (layers=0) -> the non-empty items as text; nothing at all is an error."""
    if isinstance(value, (int, np.integer)):
        value = [value]
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v).strip() for v in value]
    items = [v for v in items if v]
    if not items:
        raise QkvtraceError(": empty", param=param)
    return items


def _choose(value, valid: Sequence[str], param: str) -> tuple[str, ...]:
    """The items of `value`, each one of `valid`, repeats dropped (`kinds=q,q` must not duplicate rows)."""
    items = _items(value, param)
    for v in items:
        if v not in valid:
            raise QkvtraceError(f"{v!r}: unknown; valid: {', '.join(valid)}", param=param)
    return tuple(dict.fromkeys(items))


def _whole(items: Sequence[str], param: str, extra: str = "") -> tuple[int, ...]:
    out = []
    for v in items:
        try:
            out.append(int(v))
        except ValueError:
            raise QkvtraceError(f"{v!r}: expected {extra}whole numbers, e.g. 0,1", param=param) from None
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class Selection:
    """What `extract` captures: one frozen value, validated here and nowhere else.

    Each field accepts a comma-separated string, a list, or (layers, heads, epochs) one number; the stored value is
    a tuple. Errors name the field (the CLI turns the name into its option, e.g. `--layers`).

    sites : encoder.self, decoder.self, decoder.cross.
    kinds : q, k, v, z, attn_out, layer_out, or the study's x1 (= z) and x4 (= attn_out); rows are labelled with
        the name given.
    layers : layer indices; None or "all" = every layer.
    heads : "concat" (d_model wide), head indices (d_head wide) or "all" (every head); they apply to q, k, v, z;
        attn_out and layer_out have no heads and are always d_model wide.
    epochs : checkpoint epochs; None = every checkpoint.
    words : tokens to keep on either side (all occurrences), or decoder transitions such as sos->wir; None = all.
    specials : keep the source side's <sos>/<eos> rows (the decoder's <sos> input is always kept).
    patterns : also keep the attention patterns of each sentence, site and layer.
    pool : how a word cut into subword pieces gives its row: mean (default), first, last, or none (a row per piece);
        see pieces.py. Hugging Face models and runs trained with --tokenizer bpe:SIZE / unigram:SIZE cut words; a
        word-level run has one piece a word: nothing changes there.

    `resolve(source)` checks the fields against a model (layers, heads, checkpoints, vocabulary) and expands
    "all"; extraction runs on the resolved selection.
    """
    sites: tuple[str, ...] = SITES
    kinds: tuple[str, ...] = KINDS
    layers: tuple[int, ...] | None = None
    heads: tuple[str, ...] = ("concat",)
    epochs: tuple[int, ...] | None = None
    words: tuple[str, ...] | None = None
    specials: bool = False
    patterns: bool = True
    pool: str | None = None

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731  (frozen: normalise once)
        set_("sites", _choose(self.sites, SITES, "sites"))
        set_("kinds", _choose(self.kinds, (*KINDS, *ALIASES), "kinds"))
        if self.layers is not None and self.layers != "all":
            set_("layers", _whole(_items(self.layers, "layers"), "layers", "all or "))
        elif self.layers == "all":
            set_("layers", None)
        heads = _items(self.heads, "heads")
        bad = [h for h in heads if h not in ("concat", "all") and not h.isdigit()]
        if bad:
            raise QkvtraceError(f"{bad[0]!r}: expected concat, all or head indices, e.g. 0,3", param="heads")
        set_("heads", tuple(dict.fromkeys(heads)))
        if self.epochs is not None:
            set_("epochs", _whole(_items(self.epochs, "epochs"), "epochs"))
        if self.words is not None:
            items = self.words.split(",") if isinstance(self.words, str) else list(self.words)
            words = tuple(dict.fromkeys(w.strip().lower() for w in items if w.strip()))
            if not words:
                raise QkvtraceError(": empty; name words like eat,apple or leave them out for every token",
                                    param="words")
            set_("words", words)
        set_("specials", bool(self.specials))
        pool = DEFAULT_POOL if self.pool is None else self.pool
        if pool not in POOLS:
            raise QkvtraceError(f"{pool!r}: expected one of {', '.join(POOLS)}", param="pool")
        set_("pool", pool)
        set_("patterns", bool(self.patterns))

    @property
    def base_kinds(self) -> tuple[str, ...]:
        """The kinds with aliases resolved (x1 -> z), in the order given."""
        return tuple(ALIASES.get(k, k) for k in self.kinds)

    def resolve(self, source: Source) -> "Selection":
        """This selection checked against `source` (layers, heads, checkpoints, words) with "all" expanded."""
        n_layers, n_heads = source.n_layers, source.n_heads
        layers = tuple(range(n_layers)) if self.layers is None else self.layers
        for layer in layers:
            if not 0 <= layer < n_layers:
                raise QkvtraceError(f"'{layer}': unknown; valid: all, {', '.join(map(str, range(n_layers)))}",
                                    param="layers")
        depth = {site: site_layers(source, site) for site in self.sites}
        if self.layers is not None and not any(layer < depth[site] for site in self.sites for layer in layers):
            stacks = ", ".join(f"{site} 0..{n - 1}" for site, n in depth.items())
            raise QkvtraceError(f"{','.join(map(str, layers))}: none of the selected sites has it ({stacks}); "
                                "the encoder and decoder of this model differ in depth", param="layers")
        heads: list[str] = []
        for h in self.heads:
            if h.isdigit() and int(h) >= n_heads:
                raise QkvtraceError(f"{h!r}: unknown; valid: concat, all, {', '.join(map(str, range(n_heads)))}",
                                    param="heads")
            for one in ([str(i) for i in range(n_heads)] if h == "all" else [str(int(h)) if h.isdigit() else h]):
                if one not in heads:
                    heads.append(one)
        if self.epochs is None:
            epochs = tuple(source.checkpoint_epochs())
            if not epochs:
                source.check_epoch(None, "epochs")  # raises: no checkpoints yet
        else:
            epochs = tuple(dict.fromkeys(source.check_epoch(e, "epochs") for e in self.epochs))
        for w in self.words or ():
            source.check_word(w, "words")
        return replace(self, layers=layers, heads=tuple(heads), epochs=epochs)

    def widths(self, d_model: int, d_head: int, n_heads: int) -> set[int]:
        """The vector widths this selection gives (heads concatenated are n_heads·d_head wide, which for T5 need
        not be d_model)."""
        return {d_model if k not in HEADED_KINDS else n_heads * d_head if h == "concat" else d_head
                for k in self.base_kinds for h in self.heads}

    def pairs(self, source: Source) -> list[tuple[str, int]]:
        """The (site, layer) pairs to read: every selected layer the site's stack has."""
        return [(site, layer) for site in self.sites for layer in self.layers if layer < site_layers(source, site)]

    def hooks(self, source: Source) -> list[str]:
        """The hook points to capture, each once."""
        names = []
        for site, layer in self.pairs(source):
            names += [source.hook(site, layer, kind) for kind in self.base_kinds]
            if self.patterns:
                names.append(source.hook(site, layer, "pattern"))
        return list(dict.fromkeys(names))


def site_layers(source: Source, site: str) -> int:
    """How many layers `site` has in `source`: its stack's depth where encoder and decoder differ, else n_layers."""
    of_site = getattr(source, "site_layers", None)
    return of_site(site) if of_site is not None else source.n_layers


LABEL_FIELDS = ("word", "token", "kind", "epoch", "site", "layer", "head", "position", "sentence_id", "transition")


# A value of each field's type (text or whole number), to try a template on before any row is built.
LABEL_SAMPLE = {"word": "eat", "token": "eat", "kind": "q", "epoch": 1, "site": "encoder.self", "layer": 0,
                "head": "concat", "position": 1, "sentence_id": 0, "transition": "sos->wir"}


def check_label(label: str, param: str = "label") -> str:
    """`label` if it formats with the row fields (LABEL_FIELDS), else a one-line error naming what is wrong.

    {epoch}, {layer}, {position} and {sentence_id} are whole numbers; the other fields are text.
    """
    try:
        # Plain field names only: {word.upper} or {0} would format, but into no useful label.
        for _, name, _, _ in string.Formatter().parse(label):
            if name is not None and name not in LABEL_FIELDS:
                raise QkvtraceError(f"{label!r}: unknown field {name!r}; fields: {', '.join(LABEL_FIELDS)}",
                                    param=param)
        label.format(**LABEL_SAMPLE)
    except (IndexError, ValueError, AttributeError, TypeError, KeyError) as e:
        raise QkvtraceError(f"{label!r}: not a usable template ({e}); write fields by name, e.g. "
                            f"{DEFAULT_LABEL}; fields: {', '.join(LABEL_FIELDS)}", param=param) from None
    return label


# ----------------------------------------------------------------------------------------------------------------
# rows

def _strip(token: str) -> str:
    return token[1:-1] if token.startswith("<") and token.endswith(">") else token


def _codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct values in first-seen order as an object array, each value's index among them) of a 1-D array;
    a dict pass, cheaper than np.unique's sort of strings at these sizes."""
    index: dict = {}
    codes = np.fromiter((index.setdefault(v, len(index)) for v in values.tolist()), dtype=np.int64,
                        count=len(values))
    distinct = np.empty(len(index), dtype=object)
    distinct[:] = list(index)
    return distinct, codes


def _transitions(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`a->b` for each pair of tokens, markers stripped (`<sos>` -> `sos`); a, b object arrays of one shape."""
    distinct, codes = _codes(np.concatenate([a.ravel(), b.ravel()]))
    stripped = np.array([_strip(u) for u in distinct.tolist()], dtype=object)
    n = a.size
    return (stripped[codes[:n]] + "->" + stripped[codes[n:]]).reshape(a.shape)


@dataclass
class _Side:
    """The rows one side (source or target) of one batch gives to every block that lives at its positions."""
    name: str                # "src" | "tgt"
    b: np.ndarray            # (n,) row of the batch
    position: np.ndarray     # (n,)
    token: np.ndarray        # (n,) object
    transition: np.ndarray   # (n,) object; "" on the source side
    sentence_id: np.ndarray  # (n,)
    sentence: np.ndarray     # (n,) object
    category: np.ndarray | None
    extra: dict[str, np.ndarray]  # the source's extra columns (Tokens.columns), each (n,)
    word: np.ndarray = field(init=False)      # the label's {word}: the transition on the decoder side
    words: np.ndarray = field(init=False)     # the distinct words, and for each row its index among them:
    word_of: np.ndarray = field(init=False)   # labels are formatted once per distinct word, not once per row

    def __post_init__(self):
        self.word = self.transition if self.name == "tgt" else self.token
        self.words, self.word_of = _codes(self.word)

    def keep(self, mask: np.ndarray) -> "_Side":
        return _Side(self.name, self.b[mask], self.position[mask], self.token[mask], self.transition[mask],
                     self.sentence_id[mask], self.sentence[mask],
                     None if self.category is None else self.category[mask],
                     {k: v[mask] for k, v in self.extra.items()})


@dataclass
class _Batch:
    """One batch as extraction sees it: which sentences, the tokens the model read, the rows of each side."""
    epoch: int
    ids: np.ndarray                 # (batch,) sentence ids
    tokens: Tokens
    transitions: np.ndarray         # (batch, tgt_pos) object: `input->next` of each decoder input
    sides: dict[str, _Side]


def _batch(epoch: int, ids: np.ndarray, tokens: Tokens, texts: np.ndarray, categories: np.ndarray | None,
           selection: Selection) -> _Batch:
    transitions = _transitions(tokens.tgt, tokens.tgt_next)
    sides = {}
    for name, tok, tr in (("src", tokens.src, None), ("tgt", tokens.tgt, transitions)):
        keep = tok != ""
        if name == "src" and not selection.specials:
            keep &= ~tokens.src_special
        b, p = np.nonzero(keep)
        sid = ids[b]
        side = _Side(name, b, p, tok[b, p], tr[b, p] if tr is not None else np.full(len(b), "", dtype=object),
                     sid, texts[sid], None if categories is None else categories[sid],
                     {k: v[b, p] for k, v in tokens.columns.get(name, {}).items()})
        if selection.words is not None:
            # Words are matched without case (a cased vocabulary reads "Apple"); a piece matches by its word.
            side = side.keep(np.isin(_lower(side.extra.get("word", side.token)), selection.words)
                             | np.isin(_lower(side.transition), selection.words))
        sides[name] = side
    return _Batch(epoch, ids, tokens, transitions, sides)


def _lower(values: np.ndarray) -> np.ndarray:
    """Each text of an object array in lower case, one call per distinct text."""
    distinct, codes = _codes(values)
    return np.array([v.lower() for v in distinct.tolist()], dtype=object)[codes] if len(values) else values


class _Labels:
    """Row labels from a template: the block's fields formatted in once; per distinct word when only {word} is left
    (the default "{word}@{kind}@{epoch}"), else row by row."""

    def __init__(self, label: str):
        self.label = label
        self._templates: dict[tuple, tuple] = {}

    def __call__(self, block: dict, side: _Side) -> np.ndarray:
        key = tuple(block.values())
        if key not in self._templates:
            self._templates[key] = self._template(block)
        template, around = self._templates[key]
        if isinstance(around, str):  # no row field in the template: one label for the whole block
            return np.full(len(side.b), around, dtype=object)
        if around is not None:  # only a plain {word} is left: text before it + word + text after it
            before, after = around
            return (before + side.words + after)[side.word_of] if len(side.words) else np.zeros(0, dtype=object)
        return np.array([template.format(word=w, token=tk, position=pp, sentence_id=sid, transition=tr)
                         for w, tk, pp, sid, tr in zip(side.word, side.token, side.position, side.sentence_id,
                                                       side.transition)], dtype=object)

    def _template(self, block: dict) -> tuple[str, str | tuple[str, str] | None]:
        """The label with the block's fields formatted in; and the finished label if no row field is left, or
        (before, after) if only a plain {word} is left."""
        template = ""
        for literal, name, spec, conversion in string.Formatter().parse(self.label):
            template += literal.replace("{", "{{").replace("}", "}}")
            if name is None:
                continue
            if name in block:
                value = block[name]
                value = {"r": repr, "s": str, "a": ascii}[conversion](value) if conversion else value
                template += format(value, spec).replace("{", "{{").replace("}", "}}")
            else:
                template += "{" + name + ("!" + conversion if conversion else "") + (":" + spec if spec else "") + "}"
        parts = list(string.Formatter().parse(template))  # literal texts come back unescaped
        left = [(name, spec, conversion) for _, name, spec, conversion in parts if name is not None]
        if not left:
            return template, template.format()
        if left == [("word", "", None)]:
            i = next(i for i, part in enumerate(parts) if part[1] == "word")
            return template, ("".join(p[0] for p in parts[: i + 1]), "".join(p[0] for p in parts[i + 1:]))
        return template, None


def _blocks(batch: _Batch, cache: dict, source: Source, selection: Selection, labels: _Labels):
    """Yield (block fields, side, labels, X) for each site, layer, kind and head of one batch; X (n, width)."""
    for site, layer in selection.pairs(source):
        for kind_name, kind in zip(selection.kinds, selection.base_kinds):
            side = batch.sides[SITE[site].side(kind)]
            if len(side.b) == 0:
                continue
            t = cache[source.hook(site, layer, kind)].cpu().numpy()  # zero-copy; numpy indexes cheaper
            v = t[side.b, side.position]  # (n, head, d_head) or (n, d_model)
            for head in (selection.heads if kind in HEADED_KINDS else ("concat",)):
                if kind in HEADED_KINDS:
                    X = v.reshape(len(side.b), -1) if head == "concat" else v[:, int(head)]
                else:
                    X = v
                block = dict(epoch=batch.epoch, site=site, layer=layer, head=head, kind=kind_name)
                yield block, side, labels(block, side), X


def _patterns(batch: _Batch, cache: dict, source: Source, selection: Selection, texts: np.ndarray) -> list[dict]:
    """Attention patterns of each sentence of the batch at each selected site and layer."""
    toks = batch.tokens
    # Per sentence, the real positions' tokens of each side (decoder queries named by their transition).
    n_src, n_tgt = (toks.src != "").sum(1), (toks.tgt != "").sum(1)
    tokens = {"src": [toks.src[j, :n].tolist() for j, n in enumerate(n_src)],
              "tgt": [toks.tgt[j, :n].tolist() for j, n in enumerate(n_tgt)],
              "tgt_query": [batch.transitions[j, :n].tolist() for j, n in enumerate(n_tgt)]}
    length = {"src": n_src, "tgt": n_tgt}
    out = []
    for site, layer in selection.pairs(source):
        q_side, k_side = SITE[site].query_side, SITE[site].key_side
        q_tokens = tokens["tgt_query" if q_side == "tgt" else "src"]
        pat = cache[source.hook(site, layer, "pattern")].cpu().numpy()  # (batch, head, query_pos, key_pos)
        for j, i in enumerate(batch.ids.tolist()):
            nq, nk = length[q_side][j], length[k_side][j]
            # A copy, not a view: a view would keep the whole padded batch array alive until the next flush,
            # and the sink counts the bytes each pattern holds.
            out.append({"epoch": batch.epoch, "sentence_id": i, "sentence": texts[i], "site": site,
                        "layer": layer, "query_tokens": q_tokens[j], "key_tokens": tokens[k_side][j],
                        "pattern": pat[j, :, :nq, :nk].copy()})  # (head, query_pos, key_pos)
    return out


class _Sink:
    """Collects blocks of rows in memory, or streams them to `out` in chunks of at most `max_bytes` (vectors and
    patterns together, overshot by at most one block or one batch's patterns).

    A block's columns are kept as its side's arrays plus its constant fields, and expanded into whole columns only
    when a chunk is written or the table is built: no per-row work before then.
    Streaming writes hidden partial files (`.meta.csv.partial`, `.X.npy.partial`, `.patterns.jsonl.partial`) and
    moves them into place only in `finish`, so a failed extraction into an existing directory (--force) leaves the
    table that was there whole, and a finished one never shares the directory with a previous table's leftovers.
    """

    PARTIAL = {"meta.csv": ".meta.csv.partial", "patterns.jsonl": ".patterns.jsonl.partial",
               "X.npy": ".X.npy.partial"}
    # X.npy's rows are written after a header sized for any row count; the real one replaces it in place at the
    # end, so the file is never copied (at 1,000 Marian sentences it is 3 GB).
    MAX_ROWS = 2**62

    def __init__(self, out: Path | None, dim_max: int, dtype: str, max_bytes: int):
        self.out, self.dim_max, self.dtype, self.max_bytes = out, dim_max, np.dtype(dtype), max_bytes
        self.blocks: list[tuple[dict, _Side, np.ndarray, np.ndarray]] = []
        self.patterns: list[dict] = []
        self.n_rows = 0
        self.buffered = 0
        self.wrote_header = False
        if out is not None:
            for name in self.PARTIAL.values():  # left by an extraction that was killed
                (out / name).unlink(missing_ok=True)
            self.raw = open(out / self.PARTIAL["X.npy"], "wb")
            self.header_size = len(self._npy_header(self.MAX_ROWS))
            self.raw.write(b"\0" * self.header_size)

    def _npy_header(self, n_rows: int, size: int | None = None) -> bytes:
        """The .npy header of an (n_rows, dim_max) array, padded to `size` bytes if given."""
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                  "fortran_order": False, "shape": (n_rows, self.dim_max)})
        header = buf.getvalue()
        if size is not None and len(header) < size:
            # The format pads its header with spaces before the final newline, counted in the 2-byte length at
            # bytes 8-9 (magic, version, length: 10 bytes); size is a multiple of 64, so the rows stay aligned.
            pad = size - len(header)
            header = header[:8] + struct.pack("<H", len(header) - 10 + pad) + header[10:-1] + b" " * pad + b"\n"
        return header

    def add(self, block: dict, side: _Side, labels: np.ndarray, X: np.ndarray) -> None:
        self.blocks.append((block, side, labels, X))
        self.n_rows += X.shape[0]
        self.buffered += X.shape[0] * self.dim_max * self.dtype.itemsize
        self._maybe_flush()

    def add_patterns(self, patterns: list[dict]) -> None:
        """Patterns count against `max_bytes` too: with every site and layer they are a large share of a table."""
        self.patterns += patterns
        self.buffered += sum(p["pattern"].nbytes for p in patterns)
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        if self.out is not None and self.buffered >= self.max_bytes:
            self.flush()

    def _columns(self) -> dict[str, np.ndarray]:
        """The metadata columns of the buffered blocks, in COLUMNS order (category last, if any)."""
        counts = np.array([len(side.b) for _, side, _, _ in self.blocks])
        const = lambda key, dtype: np.repeat(np.array([blk[key] for blk, *_ in self.blocks], dtype=dtype), counts)  # noqa: E731
        per_row = lambda key: np.concatenate([getattr(side, key) for _, side, _, _ in self.blocks])  # noqa: E731
        cols = {"epoch": const("epoch", np.int64), "sentence_id": per_row("sentence_id").astype(np.int64),
                "sentence": per_row("sentence"),
                "side": np.repeat(np.array([side.name for _, side, _, _ in self.blocks], dtype=object), counts),
                "position": per_row("position").astype(np.int64), "token": per_row("token"),
                "transition": per_row("transition"), "site": const("site", object), "layer": const("layer", np.int64),
                "head": const("head", object), "kind": const("kind", object),
                "label": np.concatenate([lab for _, _, lab, _ in self.blocks]),
                "dim": np.repeat(np.array([X.shape[1] for *_, X in self.blocks], dtype=np.int64), counts)}
        assert tuple(cols) == COLUMNS
        if self.blocks and self.blocks[0][1].category is not None:
            cols["category"] = per_row("category")
        for name in self.blocks[0][1].extra if self.blocks else ():
            cols[name] = np.concatenate([side.extra[name] for _, side, _, _ in self.blocks])
        return cols

    def _matrix(self) -> np.ndarray:
        """The buffered vectors as one (n_rows, dim_max) matrix, narrower ones zero-padded on the right."""
        X = np.empty((sum(x.shape[0] for *_, x in self.blocks), self.dim_max), dtype=self.dtype)
        at = 0
        for *_, x in self.blocks:
            X[at: at + len(x), : x.shape[1]] = x
            X[at: at + len(x), x.shape[1]:] = 0
            at += len(x)
        return X

    def flush(self) -> None:
        if self.blocks:
            write_meta_csv(self.out / self.PARTIAL["meta.csv"], self._columns(), append=self.wrote_header)
            self.wrote_header = True
            # Block by block, each padded to dim_max on its own: a whole chunk assembled first would hold the
            # buffer twice at the peak.
            for *_, x in self.blocks:
                if x.shape[1] == self.dim_max:
                    self.raw.write(np.ascontiguousarray(x, dtype=self.dtype).data)
                else:
                    padded = np.zeros((len(x), self.dim_max), dtype=self.dtype)  # (n, dim_max)
                    padded[:, : x.shape[1]] = x
                    self.raw.write(padded.data)
        if self.patterns:
            write_patterns(self.out / self.PARTIAL["patterns.jsonl"], self.patterns, append=True)
        self.blocks, self.patterns, self.buffered = [], [], 0

    def discard(self) -> None:
        """Remove what streaming wrote so far (the extraction failed); files already in `out` stay as they were."""
        if self.out is not None:
            self.raw.close()
            for name in self.PARTIAL.values():
                (self.out / name).unlink(missing_ok=True)

    def finish(self, manifest: dict, load: bool = True) -> VectorTable | None:
        if self.out is None:
            return VectorTable(self._columns(), self._matrix(), manifest, self.patterns)
        self.flush()
        header = self._npy_header(self.n_rows, self.header_size)
        assert len(header) == self.header_size, (len(header), self.header_size)
        self.raw.seek(0)
        self.raw.write(header)
        self.raw.close()
        os.replace(self.out / self.PARTIAL["X.npy"], self.out / "X.npy")
        os.replace(self.out / self.PARTIAL["meta.csv"], self.out / "meta.csv")
        # A previous table's patterns or projector files (--force) would not match the new rows.
        stale = ["vectors.tsv", "metadata.tsv"]
        if (self.out / self.PARTIAL["patterns.jsonl"]).exists():
            os.replace(self.out / self.PARTIAL["patterns.jsonl"], self.out / "patterns.jsonl")
        else:
            stale.append("patterns.jsonl")
        for name in stale:
            (self.out / name).unlink(missing_ok=True)
        written = [name for name in ("meta.csv", "X.npy", "patterns.jsonl") if (self.out / name).is_file()]
        atomic_write_json(self.out / "manifest.json", dict(manifest, n_rows=self.n_rows, dim_max=self.dim_max,
                                                          dtype=self.dtype.name,
                                                          files={n: files.sha256_file(self.out / n) for n in written}))
        return VectorTable.load(self.out) if load else None


# ----------------------------------------------------------------------------------------------------------------
# extraction

_SELECTION_FIELDS = tuple(f.name for f in fields(Selection))


def extract(source, sentences, selection: Selection | None = None, *, label: str = DEFAULT_LABEL,
            out: Path | str | None = None, force: bool = False, dtype: str = "float32", batch_size: int = 64,
            max_memory_mb: float = 256, device: str = "cpu", progress: Callable[[dict], None] | None = None,
            load: bool = True, format: str = "native", **select) -> VectorTable | None:
    """Extract the vectors a `selection` names, for `sentences`, from a model `source`, into a VectorTable.

    Example: `extract(run, ["i can eat apple"], words="eat", kinds="q,k,x1", epochs=[1, 30])`, or with a value
    built once, `extract(run, sentences, Selection(sites="encoder.self", layers=0))`.

    Parameters
    ----------
    source : a run directory, a `Run`, or any `sources.Source`.
    sentences : list of str, (src, tgt) tuples or Sentence; a target is teacher-forced, else greedy decoding.
    selection : what to capture (sites, kinds, layers, heads, epochs, words, specials, patterns); see `Selection`.
    **select : the same fields by name instead of `selection`, e.g. `words="eat", kinds="q,k"`.
    label : row label template; fields {word} (token, or transition on the decoder side), {token}, {kind},
        {epoch}, {site}, {layer}, {head}, {position}, {sentence_id}, {transition}.
    out : directory to stream the table to (meta.csv, X.npy, manifest.json, patterns.jsonl); None = in memory.
        Nothing in it changes unless the extraction succeeds.
    dtype : "float32" or "float16" for X.
    load : with `out`, read the written table back (metadata in memory, X memory-mapped); False returns None so
        that memory stays bounded by `batch_size` and `max_memory_mb` however large the extraction.
    format : "native", or "projector" to also write vectors.tsv + metadata.tsv into `out` (the selection must
        give one vector width).

    Returns
    -------
    VectorTable with one row per vector; X has shape (n_rows, dim_max).
    """
    from qkvtrace.train import versions

    unknown = [k for k in select if k not in _SELECTION_FIELDS]
    if unknown:
        raise TypeError(f"extract() got an unexpected keyword argument {unknown[0]!r}; selection fields: "
                        f"{', '.join(_SELECTION_FIELDS)}")
    if selection is not None and select:
        raise TypeError(f"extract(): give a Selection or its fields ({', '.join(select)}), not both")
    src = as_source(source, device)
    sents = as_sentences(sentences)
    sel = (selection or Selection(**select)).resolve(src)
    if dtype not in ("float32", "float16"):
        raise QkvtraceError(f"{dtype!r}: expected float32 or float16", param="dtype")
    if not max_memory_mb > 0:
        raise QkvtraceError(f"{max_memory_mb}: expected a positive number of MB, e.g. 256", param="max_memory_mb")
    if format not in ("native", "projector"):
        raise QkvtraceError(f"{format!r}: expected native or projector", param="format")
    if format == "projector" and out is None:
        raise QkvtraceError("projector: needs an output directory (out) to write vectors.tsv and metadata.tsv into",
                            param="format")
    check_label(label)
    prepared = src.prepare(sents)
    categories = src.categories(sents)
    widths = sel.widths(src.d_model, src.d_head, src.n_heads)
    if format == "projector" and len(widths) > 1:
        raise QkvtraceError(
            f"projector: the Embedding Projector takes one vector width, but heads {','.join(sel.heads)} "
            f"with kinds {','.join(sel.kinds)} gives widths {', '.join(map(str, sorted(widths)))}; use "
            "heads concat, or single heads with kinds among q,k,v,z", param="format")
    # The table is written into a staging folder that replaces `out` in one step at the end (files.py).
    publication = files.Publication(out, force=force, expected=TABLE_FILES) if out is not None else None
    out_dir = publication.path if publication else None
    # Notes only once the input is known to be good: a bad input gets its one error line alone.
    for i, s in enumerate(sents):
        for side, unknown_words in src.unknown_words(prepared[i]).items():
            log.warning("sentence %s: not in the %s vocabulary, read as <unk>: %s", s.origin or i + 1, side,
                        ", ".join(unknown_words))
    if any(h != "concat" for h in sel.heads) and any(k not in HEADED_KINDS for k in sel.base_kinds):
        log.warning("heads %s apply to q, k, v, z; attn_out and layer_out have no heads and are kept d_model "
                    "wide (head=concat)", ",".join(sel.heads))
    sink = _Sink(out_dir, max(widths), dtype, int(max_memory_mb * 2**20))
    hooks = sel.hooks(src)
    texts = np.array([s.src for s in sents], dtype=object)
    cats = None if categories is None else np.array(categories, dtype=object)
    labels = _Labels(label)

    total = len(sel.epochs) * ((len(sents) + batch_size - 1) // batch_size)
    done = 0
    seen: dict[str, set[str]] = {"src": set(), "tgt": set()}  # side -> the selected words it holds
    try:
        for epoch in sel.epochs:
            for start in range(0, len(sents), batch_size):
                ids = np.arange(start, min(start + batch_size, len(sents)))
                tokens, cache = src.forward([prepared[i] for i in ids], epoch, hooks, sel.pool)
                batch = _batch(epoch, ids, tokens, texts, cats, sel)
                if sel.words is not None:
                    for name, side in batch.sides.items():
                        seen[name] |= set(_lower(side.extra.get("word", side.token)).tolist()) & set(sel.words)
                        seen[name] |= set(_lower(side.transition).tolist()) & set(sel.words)
                for block, side, lab, X in _blocks(batch, cache, src, sel, labels):
                    sink.add(block, side, lab, X)
                if sel.patterns:
                    sink.add_patterns(_patterns(batch, cache, src, sel, texts))
                done += 1
                files.fault("extract.batch")
                if progress:
                    progress({"event": "batch", "done": done, "total": total, "epoch": epoch})
        if sel.words is not None:
            _check_found(sel, seen, src)
        if sink.n_rows == 0:
            raise QkvtraceError("nothing to extract: the selection matched no token")
        manifest = {"format": "qkvtrace-vectors/1", **src.describe(), "epochs": list(sel.epochs),
                    "sites": list(sel.sites), "kinds": list(sel.kinds), "layers": list(sel.layers),
                    "heads": list(sel.heads), "words": sorted(sel.words or []), "label": label, "pool": sel.pool,
                    "sentences": [{"src": s.src, "tgt": s.tgt} for s in sents], "versions": versions()}
        table = sink.finish(manifest, format == "projector")
        if format == "projector":
            write_projector(table, out_dir)
    except BaseException as e:
        sink.discard()
        if publication:
            publication.abort()
        if isinstance(e, OSError):  # e.g. a full disk while streaming: name the output and the reason
            raise files.os_error(e, out, "--out") from None
        raise
    if publication:
        publication.commit()
        table = VectorTable.load(out) if load else None
    return table if load else None


# What a table folder may hold when --force replaces it: the table, projector files, figures drawn from it.
TABLE_FILES = ("meta.csv", "X.npy", "manifest.json", "patterns.jsonl", "vectors.tsv", "metadata.tsv", "*.png",
               "*.svg", "*.pdf", "*.html", ".*")


def _check_found(sel: Selection, seen: dict[str, set[str]], source: Source) -> None:
    """Every selected word must give rows: it occurs in a sentence, on a side the selected sites and kinds reach."""
    missing = sorted(w for w in sel.words if not any(w in found for found in seen.values()))
    if missing:
        near = [] if "->" in missing[0] else source.closest_words(missing[0])
        raise QkvtraceError(f"{','.join(missing)}: occurs in none of the given sentences"
                            + (f"; closest words of the model's vocabulary: {', '.join(near)}" if near else ""),
                            param="words")
    reached = {SITE[site].side(k) for site in sel.sites for k in sel.base_kinds}
    for side in ("src", "tgt"):
        unreached = sorted(w for w in sel.words if w in seen[side] and not any(w in seen[r] for r in reached))
        if unreached:
            where = ("encoder.self, or k, v of decoder.cross" if side == "src"
                     else "decoder.self, or q, z, attn_out, layer_out of decoder.cross")
            raise QkvtraceError(
                f"{','.join(unreached)}: occurs only on the {SIDE_NAMES[side]} side, which sites "
                f"{','.join(sel.sites)} with kinds {','.join(sel.kinds)} do not capture; that side's vectors come "
                f"from {where}", param="words")


def write_projector(table: VectorTable, out: Path | str) -> tuple[Path, Path]:
    """vectors.tsv + metadata.tsv (header row) for the TensorBoard Embedding Projector; one vector width only."""
    from qkvtrace.files import atomic_write_text

    out = Path(out)
    X = table.vectors()
    atomic_write_text(out / "vectors.tsv", "".join("\t".join(f"{v:.6g}" for v in row) + "\n" for row in X))
    cols = [c for c in table.columns if c != "dim"]

    def cell(value) -> str:  # a tab or line break inside a value would shift the projector's columns or rows
        return " ".join(str(value).replace("\t", " ").splitlines())

    lines = ["\t".join(cols)] + ["\t".join(cell(table.meta[c][i]) for c in cols) for i in range(len(table))]
    atomic_write_text(out / "metadata.tsv", "\n".join(lines) + "\n")
    return out / "vectors.tsv", out / "metadata.tsv"
