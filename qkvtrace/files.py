"""Atomic file writes and output-directory checks shared by every stage that writes results.

A write goes to a temporary file beside the target and is moved into place with os.replace, so a crash or a kill
leaves either the old file or the new one, never half of either.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from qkvtrace.errors import QkvtraceError


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write `text` to `path` atomically (UTF-8)."""
    path = Path(path)
    tmp = _tmp(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def atomic_write_json(path: Path | str, obj) -> None:
    """Write `obj` as indented JSON atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def atomic_save_npy(path: Path | str, array) -> None:
    """np.save `array` atomically, never pickled."""
    import numpy as np

    path = Path(path)
    tmp = _tmp(path)
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    os.replace(tmp, path)


def prepare_out_dir(path: Path | str, force: bool, option: str = "--out") -> Path:
    """Create the output directory `path`; refuse an existing non-empty one unless `force`.

    With `force` the directory is kept and files are overwritten one by one as they are rewritten; nothing else
    in it is deleted.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise QkvtraceError(f"{option} {path}: exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise QkvtraceError(f"{option} {path}: already exists; pass --force to overwrite it or choose another path")
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_new_files(paths, force: bool = False, option: str = "--out") -> None:
    """Refuse to overwrite: an error naming the first of `paths` that exists, unless `force`."""
    if force:
        return
    for path in map(Path, paths):
        if path.exists():
            raise QkvtraceError(f"{option} {path}: already exists; pass --force to overwrite it or choose another path")
