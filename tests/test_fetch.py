"""qkvtrace corpus fetch: Multi30k from a local file:// mirror, sha256 checked; never the network."""

import gzip
from pathlib import Path

import pytest

from qkvtrace.cli import main

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
