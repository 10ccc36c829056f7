"""VectorTable: captured vectors as rows of metadata plus a float matrix aligned by row, and its on-disk format.

On disk a table is a directory holding `meta.csv` (one row per vector, header row), `X.npy` (float32 or float16,
shape (n_rows, dim); rows of different widths, e.g. per-head d_head next to concatenated d_model, are zero-padded
on the right and the true width is the `dim` column) and `manifest.json` (run, config, versions, shapes). Everything
is readable without qkvtrace: `numpy.load("X.npy")` and any CSV reader. The manifest records the sha256 of
meta.csv, X.npy and patterns.jsonl; `load` checks the files against each other and against those checksums.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qkvtrace import files
from qkvtrace.errors import QkvtraceError
from qkvtrace.files import atomic_save_npy, atomic_write_text

# Columns every table has, in this order; extra columns (e.g. category) follow.
COLUMNS = ("epoch", "sentence_id", "sentence", "side", "position", "token", "transition", "site", "layer", "head",
           "kind", "label", "dim")
INT_COLUMNS = ("epoch", "sentence_id", "position", "layer", "dim", "piece_index")


@dataclass
class VectorTable:
    """Rows of metadata and a matrix of vectors aligned by row.

    Parameters
    ----------
    meta : dict of str -> np.ndarray
        Column name -> array of shape (n_rows,). Integer columns are int64, the others object arrays of str.
        `head` is a str: "concat" for the heads concatenated (d_model wide) or the head index as text.
    X : np.ndarray
        Shape (n_rows, dim_max), float32 (or float16 when stored so). Row i's vector is X[i, :meta["dim"][i]].
    manifest : dict
        Provenance: run directory, config, versions, shapes.
    patterns : list of dict
        Attention patterns kept for heatmaps: each {"epoch", "sentence_id", "site", "layer", "query_tokens",
        "key_tokens", "pattern"} with pattern of shape (head, query_pos, key_pos) as nested lists or an array.
    """

    meta: dict[str, np.ndarray]
    X: np.ndarray
    manifest: dict = field(default_factory=dict)
    patterns: list = field(default_factory=list)

    def __post_init__(self):
        n = self.X.shape[0]
        for name, col in self.meta.items():
            if len(col) != n:
                raise ValueError(f"column {name!r} has {len(col)} rows, X has {n}")

    def __len__(self) -> int:
        return self.X.shape[0]

    def __repr__(self) -> str:
        # The generated dataclass repr would print every row and pattern: megabytes in a notebook cell.
        return (f"VectorTable({len(self)} rows, X {tuple(self.X.shape)} {self.X.dtype}, "
                f"columns {', '.join(self.columns)}; {len(self.patterns)} attention patterns)")

    @property
    def columns(self) -> list[str]:
        return list(self.meta)

    def rows(self, mask: np.ndarray) -> "VectorTable":
        """The rows where `mask` (bool, shape (n_rows,)) is True, or the rows at the integer indices `mask`."""
        meta = {name: col[mask] for name, col in self.meta.items()}
        return VectorTable(meta, self.X[mask], dict(self.manifest), self.patterns)

    def vectors(self) -> np.ndarray:
        """The vectors as float32, shape (n_rows, dim); all selected rows must share one width."""
        dims = np.unique(self.meta["dim"]) if len(self) else np.array([self.X.shape[1]])
        if len(dims) > 1:
            raise QkvtraceError(
                f"the selected vectors have different widths {sorted(int(d) for d in dims)}: "
                "select one head mode (head=concat or single heads), e.g. {where} head=concat",
                mentions=("where",))
        return np.ascontiguousarray(self.X[:, : int(dims[0])], dtype=np.float32)

    def where(self, **conditions) -> "VectorTable":
        """Rows whose column equals one of the given values, e.g. `where(kind=["q", "k"], layer=0)`.

        Values are compared as text, so `layer=0` and `layer="0"` are the same. An unknown column or a value that
        matches no row raises QkvtraceError listing what exists.
        """
        mask = np.ones(len(self), dtype=bool)
        for name, wanted in conditions.items():
            if name not in self.meta:
                raise QkvtraceError(f"{name}=...: unknown column {name!r}; columns are: {', '.join(self.columns)}",
                                    param="where")
            values = [wanted] if isinstance(wanted, (str, int, np.integer)) else list(wanted)
            text = self.meta[name].astype(str)
            present = sorted(set(text.tolist()))
            missing = [str(v) for v in values if str(v) not in present]
            if missing:
                shown = ", ".join(present[:30]) + (" ..." if len(present) > 30 else "")
                raise QkvtraceError(f"{name}={','.join(missing)}: matches no row; {name} has: {shown}",
                                    param="where")
            mask &= np.isin(text, [str(v) for v in values])
        return self.rows(mask)

    def save(self, out_dir: Path | str, dtype: str = "float32", force: bool = False) -> Path:
        """Write meta.csv, X.npy, manifest.json (and patterns.jsonl) as the folder `out_dir`, in one step.

        An existing non-empty `out_dir` is an error unless `force`, which replaces it whole.
        """
        out = Path(out_dir)
        with files.publish_dir(out, force=force) as stage:
            write_meta_csv(stage / "meta.csv", self.meta)
            digests = {"meta.csv": files.sha256_file(stage / "meta.csv"),
                       "X.npy": atomic_save_npy(stage / "X.npy", self.X.astype(dtype, copy=False))}
            if self.patterns:
                digests["patterns.jsonl"] = write_patterns(stage / "patterns.jsonl", self.patterns)
            manifest = dict(self.manifest, n_rows=len(self), dim_max=int(self.X.shape[1]), dtype=dtype,
                            columns=self.columns, files=digests)
            atomic_write_text(stage / "manifest.json", json.dumps(manifest, indent=2, default=str) + "\n")
        return out

    @classmethod
    def load(cls, directory: Path | str) -> "VectorTable":
        """Read a table written by `save` (or by streaming extraction); a damaged or mismatched file is a one-line
        error naming it and what is wrong."""
        d = files.settled(Path(directory))
        for name in ("meta.csv", "X.npy"):
            if not (d / name).is_file():
                raise QkvtraceError(f"{d}: not a vector table directory (missing {name}); "
                                    "make one with `qkvtrace extract RUN ... --out DIR`")
        fix = "extract the table again"
        manifest = {}
        if (d / "manifest.json").is_file():
            try:
                manifest = json.loads((d / "manifest.json").read_text(encoding="utf-8"))
                if not isinstance(manifest, dict):
                    raise ValueError(f"expected a JSON object, found {type(manifest).__name__}")
            except (ValueError, UnicodeDecodeError) as e:
                raise QkvtraceError(f"{d / 'manifest.json'}: unreadable ({e}); {fix}") from None
        meta = read_meta_csv(d / "meta.csv")
        try:
            X = np.load(d / "X.npy", mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            # numpy's own text suggests allow_pickle=True for object data: never, so it is not repeated here.
            why = "object data, which is never loaded" if "pickle" in str(e) else str(e).splitlines()[0]
            raise QkvtraceError(f"{d / 'X.npy'}: not a readable .npy matrix ({why}); {fix}") from None
        if X.ndim != 2:
            raise QkvtraceError(f"{d / 'X.npy'}: shape {tuple(X.shape)}, expected (rows, dim); {fix}")
        n_meta = len(next(iter(meta.values()))) if meta else 0
        if n_meta != X.shape[0]:
            raise QkvtraceError(f"{d / 'meta.csv'}: {n_meta} rows, but X.npy has {X.shape[0]}: the two files are "
                                f"not one table; {fix}")
        if "dim" in meta and n_meta and int(meta["dim"].max()) > X.shape[1]:
            raise QkvtraceError(f"{d / 'meta.csv'}: dim up to {int(meta['dim'].max())}, but X.npy is only "
                                f"{X.shape[1]} wide; {fix}")
        recorded = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
        for name, digest in recorded.items():
            files.verify(d / name, digest, "manifest.json", fix)
        try:
            patterns = read_patterns(d / "patterns.jsonl")
        except (ValueError, KeyError, TypeError) as e:
            raise QkvtraceError(f"{d / 'patterns.jsonl'}: unreadable ({e}); {fix}") from None
        return cls(meta, X, manifest, patterns)


def is_table_dir(directory: Path | str) -> bool:
    """Whether `directory` holds a vector table: a manifest.json as `extract` and `VectorTable.save` write it."""
    try:
        manifest = json.loads((Path(directory) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(manifest, dict) and ("n_rows" in manifest or
                                           str(manifest.get("format", "")).startswith("qkvtrace-vectors/"))


def load_vectors(directory: Path | str) -> VectorTable:
    """Load a VectorTable saved by `qkvtrace extract` (meta.csv + X.npy + manifest.json)."""
    return VectorTable.load(directory)


def write_meta_csv(path: Path, meta: dict[str, np.ndarray], append: bool = False) -> None:
    """Write (or append, without a header) the metadata columns as CSV."""
    names = list(meta)
    with open(path, "a" if append else "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if not append:
            writer.writerow(names)
        # Whole columns zipped into rows: one C-level loop instead of a list per row. Text and whole numbers as
        # Python values (the same text, faster); other dtypes as numpy scalars, whose text tolist() would change
        # (a float32 0.1 would read 0.10000000149011612).
        cols = [np.asarray(meta[c]) for c in names]
        writer.writerows(zip(*(c.tolist() if c.dtype.kind in "iubOU" else list(c) for c in cols)))


def read_meta_csv(path: Path) -> dict[str, np.ndarray]:
    """The columns of a meta.csv; a malformed file is a one-line error naming its line."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as e:
        raise QkvtraceError(f"{path}: not a CSV table ({e})") from None
    if not header:
        raise QkvtraceError(f"{path}: empty (no header row)")
    for i, r in enumerate(rows, 2):
        if len(r) != len(header):
            raise QkvtraceError(f"{path}:{i}: {len(r)} fields, the header has {len(header)}")
    meta = {}
    for j, name in enumerate(header):
        values = [r[j] for r in rows]
        if name in INT_COLUMNS:
            try:
                meta[name] = np.array([int(v) for v in values], dtype=np.int64)
            except ValueError:
                i = next(i for i, v in enumerate(values, 2) if not v.lstrip("-").isdigit())
                raise QkvtraceError(f"{path}:{i}: column {name} holds {values[i - 2]!r}, not a whole number") from None
        else:
            meta[name] = np.array(values, dtype=object)
    return meta



def write_patterns(path: Path, patterns: list[dict], append: bool = False) -> str | None:
    """Attention patterns as JSON lines (one per epoch, sentence, site and layer); floats rounded to 6 places."""
    def line(p: dict) -> str:
        return json.dumps(dict(p, pattern=np.round(np.asarray(p["pattern"], dtype=np.float64), 6).tolist()),
                          ensure_ascii=False) + "\n"

    if append:  # streaming: a line at a time, never a whole chunk's text at once
        with open(path, "a", encoding="utf-8") as f:
            for p in patterns:
                f.write(line(p))
        return None
    return atomic_write_text(path, "".join(line(p) for p in patterns))


def read_patterns(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                p = json.loads(line)
                p["pattern"] = np.asarray(p["pattern"], dtype=np.float32)  # (head, query_pos, key_pos)
                out.append(p)
    return out
