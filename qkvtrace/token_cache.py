"""Token ids of a corpus split, computed once and memory-mapped: a corpus of millions of pairs never becomes
Python lists of ids.

A cache entry is a directory named by a key over the corpus content hash, the vocabulary (or tokenizer) and
max_len; it holds, per side, `{side}.npy` (int32, every kept pair's ids end to end, <sos>/<eos> included) and
`{side}_offsets.npy` (int64, n_pairs + 1: pair i is ids[offsets[i]:offsets[i+1]]), and `meta.json`. It is built in
a temporary directory, streaming the pairs, and published with one rename, so a reader sees a whole entry or none.
"""

from __future__ import annotations

import array
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qkvtrace.files import atomic_write_json

_FLUSH = 1 << 20  # ids buffered before they go to disk


class Ragged:
    """Variable-length id sequences over one flat array: `r[i]` is sequence i (an int32 array view)."""

    def __init__(self, ids: np.ndarray, offsets: np.ndarray):
        self.ids, self.offsets = ids, offsets
        self.lengths = np.diff(offsets)  # (n,)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i]:self.offsets[i + 1]]


@dataclass
class TokenArrays:
    """A split's kept pairs as memory-mapped ids; `dropped` pairs were longer than max_len."""

    src: Ragged
    tgt: Ragged
    dropped: int
    path: Path

    def __len__(self) -> int:
        return len(self.src)


def cache_key(corpus_hash: str, split: str, vocab_json: str, max_len: int) -> str:
    h = hashlib.sha256()
    for part in (corpus_hash, split, vocab_json, str(max_len)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def open_arrays(path: Path) -> TokenArrays:
    def load(name):
        return np.load(path / f"{name}.npy", mmap_mode="r", allow_pickle=False)

    meta = json.loads((path / "meta.json").read_text())
    return TokenArrays(Ragged(load("src"), load("src_offsets")), Ragged(load("tgt"), load("tgt_offsets")),
                       meta["dropped"], path)


def build(pairs, src_vocab, tgt_vocab, max_len: int, path: Path) -> TokenArrays:
    """Encode `pairs` (any iterable of Pair, read once) into the cache entry `path`, unless it exists."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return open_arrays(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = {side: open(tmp / f"{side}.bin", "wb") for side in ("src", "tgt")}
    buffers = {side: array.array("i") for side in files}
    offsets = {side: array.array("q", [0]) for side in files}
    dropped = 0
    try:
        for p in pairs:
            s, t = src_vocab.encode(p.src), tgt_vocab.encode(p.tgt)
            if len(s) > max_len or len(t) > max_len:
                dropped += 1
                continue
            for side, ids in (("src", s), ("tgt", t)):
                buffers[side].extend(ids)
                offsets[side].append(offsets[side][-1] + len(ids))
                if len(buffers[side]) >= _FLUSH:
                    buffers[side].tofile(files[side])
                    buffers[side] = array.array("i")
        for side, f in files.items():
            buffers[side].tofile(f)
            f.close()
            # The raw ids become a .npy (a header in front) without holding them in memory.
            raw = np.memmap(tmp / f"{side}.bin", dtype=np.int32, mode="r") if offsets[side][-1] else np.zeros(0, np.int32)
            out = np.lib.format.open_memmap(tmp / f"{side}.npy", mode="w+", dtype=np.int32, shape=(len(raw),))
            out[:] = raw
            out.flush()
            del out, raw
            (tmp / f"{side}.bin").unlink()
            np.save(tmp / f"{side}_offsets.npy", np.frombuffer(offsets[side], dtype=np.int64), allow_pickle=False)
        atomic_write_json(tmp / "meta.json", {"format": "qkvtrace-tokens/1", "pairs": len(offsets["src"]) - 1,
                                              "dropped": dropped, "max_len": max_len})
        try:
            os.rename(tmp, path)
        except OSError:  # another process published the same entry first: theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        for f in files.values():
            f.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return open_arrays(path)
