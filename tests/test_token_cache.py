"""Corpora at scale: a directory corpus with its own val split stays on disk, and training reads its ids from a
memory-mapped token cache."""

import gzip
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from qkvtrace.cli import main
from qkvtrace.corpus import PairFiles, _load_paired, load_corpus
from qkvtrace.errors import QkvtraceError
from qkvtrace.train import encode_pairs, train
from tests.conftest import PAIRS


@pytest.fixture
def corpus_dir(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "train.en").write_text("".join(s + "\n" for s, _ in PAIRS[:9]) + "\n\n", encoding="utf-8")
    (d / "train.de").write_text("\ufeff" + "".join(t + "\r\n" for _, t in PAIRS[:9]), encoding="utf-8")
    (d / "val.en").write_text("".join(s + "\n" for s, _ in PAIRS[9:]), encoding="utf-8")
    (d / "val.de").write_text("".join(t + "\n" for _, t in PAIRS[9:]), encoding="utf-8")
    return d


def test_directory_with_val_streams_the_same_pairs(corpus_dir):
    c = load_corpus(str(corpus_dir))
    assert isinstance(c.train, PairFiles) and len(c.train) == 9 and len(c.val) == 3
    eager = _load_paired(corpus_dir / "train.en", corpus_dir / "train.de")
    assert list(c.train) == eager and c.train[2] == eager[2] and c.train[:3] == eager[:3]
    assert c.describe()["sizes"] == {"train": 9, "val": 3, "test": 0}
    (corpus_dir / "train.de").write_text("a\n\nb\n" + "c\n" * 6, encoding="utf-8")
    with pytest.raises(QkvtraceError, match=r"train.de:2: empty line"):
        load_corpus(str(corpus_dir))


def test_training_reads_ids_from_the_memory_mapped_cache(tmp_path, corpus_dir, tiny_configs):
    model, cfg = tiny_configs
    run = train(model, replace(cfg, corpus=str(corpus_dir), epochs=1, checkpoints=(1,)), tmp_path / "r")
    (entry,) = (run.path / "tokens").iterdir()
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["pairs"] == 9 and meta["dropped"] == 0
    ids = np.load(entry / "tgt.npy", mmap_mode="r", allow_pickle=False)
    offsets = np.load(entry / "tgt_offsets.npy", allow_pickle=False)
    assert ids.dtype == np.int32 and offsets.dtype == np.int64 and offsets[-1] == len(ids)
    _, expected, _ = encode_pairs(load_corpus(str(corpus_dir)).train, run.src_vocab, run.tgt_vocab, model.max_len)
    assert [ids[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])] == expected


MULTI30K = Path(__file__).resolve().parent.parent / ".." / "shared" / "data" / "multi30k"


@pytest.mark.skipif(not (MULTI30K / "train.en").is_file(), reason="no local Multi30k copy to serve as the mirror")
def test_corpus_fetch_from_a_file_mirror_checks_sha256(tmp_path, capsys):
    out = tmp_path / "m30k"
    main(["corpus", "fetch", "multi30k", "--to", str(out), "--mirror", MULTI30K.resolve().as_uri()])
    assert sorted(p.name for p in out.iterdir()) == ["test.de", "test.en", "train.de", "train.en", "val.de", "val.en"]
    assert (out / "val.de").read_bytes() == (MULTI30K / "val.de").read_bytes()
    # a gzipped mirror with one file altered: that file is refused and not written; the others are kept
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in MULTI30K.iterdir():
        data = f.read_bytes() if f.name != "val.en" else b"tampered\n"
        (bad / f.name).write_bytes(gzip.compress(data))
    (out / "val.en").unlink()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["corpus", "fetch", "multi30k", "--to", str(out), "--mirror", bad.as_uri()])
    err = capsys.readouterr().err
    last = err.splitlines()[-1]
    assert e.value.code == 2 and last.startswith("error: ") and "val.en: sha256" in last and "expected" in last
    assert not (out / "val.en").exists() and (out / "train.en").is_file()
