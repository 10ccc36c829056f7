"""Table-building helpers for Hugging Face extraction (hf.extract_table): selection parsing, labels and the
streaming sink, as extract.py had them before its Selection/Source seam.

A stop-gap copy so that Hugging Face sources keep working until they move onto `sources.Source` (subword pooling
gives one row per word, which that seam's per-position `Tokens` does not express yet); fold it into extract.py then.
"""

from __future__ import annotations

import os
import string
from pathlib import Path
from typing import Sequence

import numpy as np

from qkvtrace.errors import QkvtraceError
from qkvtrace.files import atomic_write_json
from qkvtrace.sites import ALIASES, HEADED_KINDS, KEY_KINDS, KINDS, SITES
from qkvtrace.table import VectorTable, write_meta_csv, write_patterns

SIDES = {"encoder.self": ("src", "src"), "decoder.self": ("tgt", "tgt"), "decoder.cross": ("tgt", "src")}


def check_output(dtype: str, max_memory_mb: float, format: str, out) -> None:
    """The output options of an extraction, each checked with a one-line error naming it."""
    if dtype not in ("float32", "float16"):
        raise QkvtraceError(f"--dtype {dtype!r}: expected float32 or float16")
    if not max_memory_mb > 0:
        raise QkvtraceError(f"--max-memory {max_memory_mb}: expected a positive number of MB, e.g. 256")
    if format not in ("native", "projector"):
        raise QkvtraceError(f"--format {format!r}: expected native or projector")
    if format == "projector" and out is None:
        raise QkvtraceError("--format projector: needs --out DIR to write vectors.tsv and metadata.tsv into")


def _layers(value, n_layers: int) -> list[int]:
    if value is None or value == "all":
        return list(range(n_layers))
    items = parse_selection(value, range(n_layers), "--layers")
    return [int(v) for v in items]


def _heads(value, n_heads: int) -> list[str]:
    """'concat' | 'all' | '0,3' | 'concat,0' -> head labels ('concat' or '0', '1', ...)."""
    if value is None:
        return ["concat"]
    items = parse_selection(value, ["concat", "all", *range(n_heads)], "--heads")
    out = []
    for v in items:
        for h in ([str(i) for i in range(n_heads)] if v == "all" else [v]):
            if h not in out:
                out.append(h)
    return out


def parse_selection(value, valid: Sequence, option: str, aliases: dict | None = None) -> list:
    """'q,k,v', a list or one number (layers=0) -> validated list; unknown entries are a one-line error listing the
    valid ones."""
    if isinstance(value, (int, np.integer)):
        value = [value]
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v) for v in value]
    items = [v for v in items if v]
    allowed = [str(v) for v in valid] + list(aliases or {})
    for v in items:
        if v not in allowed:
            raise QkvtraceError(f"{option} {v!r}: unknown; valid: {', '.join(allowed)}")
    if not items:
        raise QkvtraceError(f"{option}: empty; valid: {', '.join(allowed)}")
    return items


def _unique(items: list) -> list:
    """`items` without repeats, in order: `--epochs 1,1` or `--kinds q,q` must not duplicate rows."""
    return list(dict.fromkeys(items))


def _labels(label: str, block: dict, words, tokens, positions, sentence_ids, transitions) -> np.ndarray:
    """The label of each row of one block (one kind, epoch, site, layer, head), as object array (n,).

    The block's fields are formatted into the template once; when only a plain {word} is left (the default
    "{word}@{kind}@{epoch}"), labels are joined as strings instead of formatted one by one, which cost more than
    the forward pass at the study's size.
    """
    template = ""
    for literal, name, spec, conversion in string.Formatter().parse(label):
        template += literal.replace("{", "{{").replace("}", "}}")
        if name is None:
            continue
        if name in block:
            value = block[name]
            value = {"r": repr, "s": str, "a": ascii}[conversion](value) if conversion else value
            template += format(value, spec).replace("{", "{{").replace("}", "}}")
        else:
            template += "{" + name + ("!" + conversion if conversion else "") + (":" + spec if spec else "") + "}"
    parts = template.split("{word}")
    if len(parts) == 2 and not any("{" in part.replace("{{", "").replace("}}", "") for part in parts):
        before, after = (part.replace("{{", "{").replace("}}", "}") for part in parts)
        return np.array([before + w + after for w in words], dtype=object)
    return np.array([template.format(word=w, token=tk, position=pp, sentence_id=sid, transition=tr)
                     for w, tk, pp, sid, tr in zip(words, tokens, positions, sentence_ids, transitions)], dtype=object)


def _check_found(word_set: set[str], seen: dict[str, set[str]], sites, kinds) -> None:
    """Every word in --words must give rows: it occurs in a sentence, on a side the selected sites and kinds reach."""
    missing = sorted(w for w in word_set if not any(w in found for found in seen.values()))
    if missing:
        raise QkvtraceError(f"--words {','.join(missing)}: occurs in none of the given sentences")
    reached = {SIDES[site][1 if ALIASES.get(k, k) in KEY_KINDS else 0] for site in sites for k in kinds}
    for side in ("src", "tgt"):
        unreached = sorted(w for w in word_set if w in seen[side] and not any(w in seen[r] for r in reached))
        if unreached:
            where = ("encoder.self, or k, v of decoder.cross" if side == "src"
                     else "decoder.self, or q, z, attn_out, layer_out of decoder.cross")
            raise QkvtraceError(
                f"--words {','.join(unreached)}: occurs only on the {'source' if side == 'src' else 'target'} side, "
                f"which --sites {','.join(sites)} with --kinds {','.join(kinds)} does not capture; that side's "
                f"vectors come from {where}")


class _Sink:
    """Collects rows in memory, or streams them to `out` in chunks of at most `max_bytes`.

    Streaming writes hidden partial files (`.meta.csv.partial`, `.X.raw`, `.patterns.jsonl.partial`) and moves them
    into place only in `finish`, so a failed extraction into an existing directory (--force) leaves the table that
    was there whole, and a finished one never shares the directory with a previous table's leftovers.
    """

    PARTIAL = {"meta.csv": ".meta.csv.partial", "patterns.jsonl": ".patterns.jsonl.partial", "X.npy": ".X.raw"}

    def __init__(self, out: Path | None, dim_max: int, dtype: str, max_bytes: int):
        self.out, self.dim_max, self.dtype, self.max_bytes = out, dim_max, np.dtype(dtype), max_bytes
        self.meta: dict[str, list] = {}
        self.blocks: list[np.ndarray] = []
        self.patterns: list[dict] = []
        self.n_rows = 0
        self.buffered = 0
        self.wrote_header = False
        if out is not None:
            for name in self.PARTIAL.values():  # left by an extraction that was killed
                (out / name).unlink(missing_ok=True)
            self.raw = open(out / self.PARTIAL["X.npy"], "wb")

    def add(self, meta: dict[str, np.ndarray], X: np.ndarray) -> None:
        block = np.zeros((X.shape[0], self.dim_max), dtype=self.dtype)
        block[:, : X.shape[1]] = X
        for k, v in meta.items():
            self.meta.setdefault(k, []).append(v)
        self.blocks.append(block)
        self.n_rows += X.shape[0]
        self.buffered += block.nbytes
        if self.out is not None and self.buffered >= self.max_bytes:
            self.flush()

    def _columns(self) -> dict[str, np.ndarray]:
        return {k: np.concatenate(v) for k, v in self.meta.items()}

    def flush(self) -> None:
        if self.blocks:
            write_meta_csv(self.out / self.PARTIAL["meta.csv"], self._columns(), append=self.wrote_header)
            self.wrote_header = True
            for b in self.blocks:
                self.raw.write(b.tobytes())
        if self.patterns:
            write_patterns(self.out / self.PARTIAL["patterns.jsonl"], self.patterns, append=True)
        self.meta, self.blocks, self.patterns, self.buffered = {}, [], [], 0

    def discard(self) -> None:
        """Remove what streaming wrote so far (the extraction failed); files already in `out` stay as they were."""
        if self.out is not None:
            self.raw.close()
            for name in self.PARTIAL.values():
                (self.out / name).unlink(missing_ok=True)

    def finish(self, manifest: dict, load: bool = True) -> VectorTable | None:
        if self.out is None:
            X = np.concatenate(self.blocks) if self.blocks else np.zeros((0, self.dim_max), self.dtype)
            return VectorTable(self._columns(), X, manifest, self.patterns)
        self.flush()
        self.raw.close()
        # X.npy = a .npy header for the final shape + the raw rows, copied in chunks: memory stays bounded.
        header_path = self.out / ".X.npy.tmp"
        raw_path = self.out / self.PARTIAL["X.npy"]
        with open(header_path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                     "fortran_order": False, "shape": (self.n_rows, self.dim_max)})
            with open(raw_path, "rb") as raw:
                while chunk := raw.read(1 << 24):
                    f.write(chunk)
        raw_path.unlink()
        os.replace(header_path, self.out / "X.npy")
        os.replace(self.out / self.PARTIAL["meta.csv"], self.out / "meta.csv")
        # A previous table's patterns or projector files (--force) would not match the new rows.
        stale = ["vectors.tsv", "metadata.tsv"]
        if (self.out / self.PARTIAL["patterns.jsonl"]).exists():
            os.replace(self.out / self.PARTIAL["patterns.jsonl"], self.out / "patterns.jsonl")
        else:
            stale.append("patterns.jsonl")
        for name in stale:
            (self.out / name).unlink(missing_ok=True)
        atomic_write_json(self.out / "manifest.json", dict(manifest, n_rows=self.n_rows, dim_max=self.dim_max,
                                                          dtype=self.dtype.name))
        return VectorTable.load(self.out) if load else None
