"""Downloading public corpora with checksums: `qkvtrace corpus fetch multi30k [--to DIR]`.

Multi30k (task 1, the raw English-German captions) comes from its canonical repository, github.com/multi30k/
dataset, which serves each split gzip-compressed (`data/task1/raw/train.en.gz`, ...; the test split is
test_2016_flickr). The sha256 sums below are of the *decompressed* text files (the layout `load_corpus` reads:
train/val/test.{en,de}); a gzip stream's bytes depend on its compressor, so what is checked is the text itself.
A mirror (`mirror=`, e.g. a file:// URL of a directory) may serve the same files plain or gzipped.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

from qkvtrace.errors import QkvtraceError

MULTI30K_URL = "https://github.com/multi30k/dataset/raw/master/data/task1/raw/"

# local name -> (file under MULTI30K_URL, sha256 of the decompressed text)
MULTI30K = {
    "train.en": ("train.en.gz", "4b4d37e774976ef44fecca1738cdeb3b3ba384851a59a755b9c5e6aa7d87b13c"),
    "train.de": ("train.de.gz", "695df46f6fd14567e69970408a2c129a50e778a910ecb1585a92eb25b2c7accc"),
    "val.en": ("val.en.gz", "40cd20974079d9afb0e3d27c659a8e059cc2fcf850b4bc23ede13fc36dd8a865"),
    "val.de": ("val.de.gz", "fd0fc009db2446cfc12d96a382aff0d3122cb47577b352d0f7e0bb3a38e2e552"),
    "test.en": ("test_2016_flickr.en.gz", "399a4382932c1aadd3ceb9bef1008d388a64c76d4ae4e9d4728c6f4301cac182"),
    "test.de": ("test_2016_flickr.de.gz", "4be6b5b3236b79c25475c6bb829800a7ce559e9ba7a1f6c2394fe4d40be46d16"),
}
CORPORA = {"multi30k": (MULTI30K_URL, MULTI30K)}


def _download(url: str) -> bytes:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=60) as r:  # noqa: S310 - http(s) or a file:// mirror, by design
            data = r.read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise QkvtraceError(f"{url}: cannot download ({reason})") from None
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def fetch(name: str = "multi30k", to: Path | str = "data/multi30k", mirror: str | None = None,
          progress=None) -> list[Path]:
    """Download corpus `name` into directory `to`, each file checked against its sha256 before it is published.

    Parameters
    ----------
    name : "multi30k"
    to : directory for train/val/test.{en,de}; files already there with the right checksum are kept.
    mirror : base URL serving the files under their local names (train.en, ...), plain or gzipped, e.g.
        "file:///data/multi30k/"; default the canonical location (gzipped, canonical names).
    progress : called with each local file name before it is fetched.

    Returns the paths of the files, in the table's order. A wrong checksum is an error and writes nothing.
    """
    if name not in CORPORA:
        raise QkvtraceError(f"corpus {name!r}: can fetch {', '.join(CORPORA)}")
    base, files = CORPORA[name]
    to = Path(to)
    if to.exists() and not to.is_dir():
        raise QkvtraceError(f"{to}: exists and is not a directory", param="to")
    to.mkdir(parents=True, exist_ok=True)
    out = []
    for local, (remote, sha) in files.items():
        path = to / local
        out.append(path)
        if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == sha:
            continue
        if progress:
            progress(local)
        url = (mirror.rstrip("/") + "/" + local) if mirror else base + remote
        data = _download(url)
        got = hashlib.sha256(data).hexdigest()
        if got != sha:
            raise QkvtraceError(f"{url}: sha256 {got[:16]}... is not the expected {sha[:16]}... for {local}; "
                                "the file changed or the download broke; nothing was written for it")
        tmp = path.with_name(f".{local}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return out
