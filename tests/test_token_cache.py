"""Corpora at scale: a directory corpus with its own val split stays on disk, and training reads its ids from a
memory-mapped token cache."""

import json
from dataclasses import replace

import numpy as np
import pytest

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
