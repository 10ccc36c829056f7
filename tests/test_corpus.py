"""Tests of qkvtrace.corpus: the built-in corpus, the TSV / JSONL / directory loaders, export and the CLI command."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from qkvtrace.cli import cli
from qkvtrace.corpus import (BUILTIN_CATEGORIES, STUDY_SENTENCES, Corpus, Pair, builtin_corpus, category_of,
                             export_tsv, load_corpus)
from qkvtrace.errors import QkvtraceError

REPO = Path(__file__).parents[1]
MULTI30K = REPO / ".." / "shared" / "data" / "multi30k"


@pytest.fixture(scope="module")
def builtin():
    return builtin_corpus(seed=0)


def translations(corpus: Corpus) -> dict[str, str]:
    return {p.src: p.tgt for p in corpus.train + corpus.val + corpus.test}


# --- built-in corpus ---

def test_builtin_size_and_distinct(builtin):
    pairs = builtin.train + builtin.val
    assert 1500 <= len(pairs) <= 2600
    assert len({p.src for p in pairs}) == len(pairs)
    assert builtin.test == []
    assert (builtin.name, builtin.src_lang, builtin.tgt_lang) == ("builtin", "en", "de")
    assert len(builtin.val) == pytest.approx(0.1 * len(pairs), abs=5)


def test_builtin_deterministic_and_seeded(builtin):
    again = builtin_corpus(seed=0)
    assert again == builtin
    assert again.content_hash() == builtin.content_hash()
    other = builtin_corpus(seed=1)
    assert {p.src for p in other.val} != {p.src for p in builtin.val}
    assert other.content_hash() != builtin.content_hash()
    assert len(builtin_corpus(val_fraction=0.0).val) == 0


def test_builtin_train_val_disjoint(builtin):
    assert not {(p.src, p.tgt) for p in builtin.train} & {(p.src, p.tgt) for p in builtin.val}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_study_sentences_in_train(seed):
    corpus = builtin_corpus(seed=seed)
    train_words = {w for p in corpus.train for w in p.src.split()}
    for sentence in STUDY_SENTENCES:
        assert set(sentence.split()) <= train_words, sentence
    train = {p.src: p.tgt for p in corpus.train}
    assert train["we want to eat apple"] == "wir wollen apfel essen"
    assert train["we want to eat bread"] == "wir wollen brot essen"
    assert train["we can eat apple"] == "wir können apfel essen"
    assert train["i can eat apple"] == "ich kann apfel essen"
    assert train["i can eat bread"] == "ich kann brot essen"
    # every word of the corpus, both sides, is seen in training
    all_words = {w for p in corpus.train + corpus.val for w in (p.src + " " + p.tgt).split()}
    assert all_words == {w for p in corpus.train for w in (p.src + " " + p.tgt).split()}


def test_builtin_conjugation(builtin):
    t = translations(builtin)
    assert t["eat apple"] == "apfel essen"
    assert t["drink water"] == "wasser trinken"
    assert t["read book"] == "buch lesen"
    assert t["he eats apple"] == "er isst apfel"
    assert t["i eat apple"] == "ich esse apfel"
    assert t["she reads book"] == "sie liest buch"
    assert t["she drinks water"] == "sie trinkt wasser"
    assert t["you read newspaper"] == "du liest zeitung"
    assert t["they write letter"] == "sie schreiben brief"
    assert t["you can eat apple"] == "du kannst apfel essen"
    assert t["they can buy beer"] == "sie können bier kaufen"
    assert t["he wants to eat cake"] == "er will kuchen essen"
    assert t["you want to drink tea"] == "du willst tee trinken"
    assert t["we must cook soup"] == "wir müssen suppe kochen"
    assert t["you must read poem"] == "du musst gedicht lesen"
    assert t["i will eat apple"] == "ich werde apfel essen"
    assert t["you will drink milk"] == "du wirst milch trinken"
    assert t["she will write note"] == "sie wird notiz schreiben"
    assert t["we buy pasta"] == "wir kaufen nudeln"
    # nonsense combinations and the study's nonsense sentences are not in the corpus
    for src in ("cook newspaper", "eat book", "i can eat book", "drink bread", "apple eat can we"):
        assert src not in t


def test_builtin_metadata(builtin):
    pairs = builtin.train + builtin.val
    assert {p.meta["category"] for p in pairs} == set(BUILTIN_CATEGORIES)
    p = next(p for p in pairs if p.src == "we want to eat apple")
    assert p.meta == {"category": "food", "verb": "eat", "object": "apple", "subject": "we", "frame": "want"}
    bare = next(p for p in pairs if p.src == "read book")
    assert bare.meta["frame"] == "bare" and bare.meta["subject"] is None
    buys = {p.meta["category"] for p in pairs if p.meta["verb"] == "buy"}
    assert buys == set(BUILTIN_CATEGORIES)
    for p in pairs:
        assert category_of(p.src) == p.meta["category"]
        assert category_of(p.tgt) == p.meta["category"]
    d = builtin.describe()
    json.dumps(d)
    assert d["sizes"] == {"train": len(builtin.train), "val": len(builtin.val), "test": 0}
    assert sum(d["categories"].values()) == len(pairs)
    assert len(d["content_hash"]) == 64


def test_category_of():
    assert category_of("i can eat apple book") == "food"
    assert category_of("i can eat book") == "reading"
    assert category_of("drink water") == "drink"
    assert category_of("we want to") is None
    assert category_of("") is None


def test_builtin_reversed():
    c = load_corpus("builtin", src_lang="de", tgt_lang="en")
    assert (c.src_lang, c.tgt_lang) == ("de", "en")
    assert translations(c)["wir wollen apfel essen"] == "we want to eat apple"
    with pytest.raises(QkvtraceError, match="^src_lang and tgt_lang fr/de: the builtin corpus is English-German") as e:
        load_corpus("builtin", src_lang="fr")
    assert e.value.param == ("src_lang", "tgt_lang")


def test_bad_val_fraction():
    with pytest.raises(QkvtraceError, match="^val_fraction 1.0: expected a number from 0") as e:
        builtin_corpus(val_fraction=1.0)
    assert e.value.param == "val_fraction"


# --- user corpora ---

def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_tsv(tmp_path):
    lines = "".join(f"Sentence {i}.\tSatz {i}.\r\n" for i in range(20)) + "\n"
    path = write(tmp_path / "pairs.tsv", lines)
    c = load_corpus(str(path))
    assert c.name == str(path)
    assert len(c.train) == 18 and len(c.val) == 2 and c.test == []
    assert c.train[0] == Pair("Sentence 0.", "Satz 0.") and c.train[0].meta == {}
    assert load_corpus(str(path)) == c
    # a file of any suffix with tabs is read as TSV; columns are taken as given
    other = write(tmp_path / "pairs.data", "a b\tc d\n")
    assert load_corpus(str(other), src_lang="de", tgt_lang="en").train == [Pair("a b", "c d")]


def test_duplicates_stay_on_one_side(tmp_path):
    path = write(tmp_path / "dups.tsv", "".join(f"s{i % 5}\tt{i % 5}\n" for i in range(50)))
    c = load_corpus(str(path), val_fraction=0.4)
    assert len(c.train) + len(c.val) == 50
    assert not {p.src for p in c.train} & {p.src for p in c.val}


@pytest.mark.parametrize("text, line, words", [
    ("a\tb\nno tab here\n", 2, "expected 'source<TAB>target'"),
    ("a\tb\nx\ty\tz\n", 2, "3 columns"),
    ("a\tb\n\nc\td\n", 2, "empty line; expected 'source<TAB>target'"),
    ("a\tb\n  \td\n", 2, "empty source"),
    ("a\tb\nc\t \n", 2, "empty target"),
    (b"a\tb\nc\td\n\xff\xfe\tx\n", 3, "not UTF-8"),
])
def test_tsv_errors(tmp_path, text, line, words):
    path = write(tmp_path / "bad.tsv", text)
    with pytest.raises(QkvtraceError) as e:
        load_corpus(str(path))
    msg = str(e.value)
    assert f"bad.tsv:{line}:" in msg and words in msg and "\n" not in msg


def test_jsonl(tmp_path):
    rows = [{"en": f" Hello {i} ", "de": f"Hallo {i}", "fr": f"Salut {i}"} for i in range(10)]
    path = write(tmp_path / "p.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    c = load_corpus(str(path), val_fraction=0.0)
    assert c.train[0] == Pair("Hello 0", "Hallo 0")
    rev = load_corpus(str(path), src_lang="de", tgt_lang="en", val_fraction=0.0)
    assert rev.train[3] == Pair("Hallo 3", "Hello 3") and (rev.src_lang, rev.tgt_lang) == ("de", "en")
    fr = load_corpus(str(path), tgt_lang="fr", val_fraction=0.0)
    assert fr.train[1].tgt == "Salut 1"


@pytest.mark.parametrize("text, line, words", [
    ('{"en": "a", "de": "b"}\n{"en": "c", "de": \n', 2, "not valid JSON"),
    ('{"en": "a", "de": "b"}\n{"en": "c", "fr": "d"}\n', 2,
     "no key 'de' (keys: en, fr); choose keys with src_lang/tgt_lang"),
    ('{"en": "a", "de": "b"}\n[1, 2]\n', 2, "expected a JSON object"),
    ('{"en": "a", "de": "b"}\n{"en": "c", "de": 3}\n', 2, "expected a string"),
    ('{"en": "a", "de": "b"}\n{"en": "c", "de": "  "}\n', 2, "empty target"),
    ('{"en": "a", "de": "b"}\n\n{"en": "c", "de": "d"}\n', 2, "empty line"),
])
def test_jsonl_errors(tmp_path, text, line, words):
    path = write(tmp_path / "bad.jsonl", text)
    with pytest.raises(QkvtraceError) as e:
        load_corpus(str(path))
    msg = str(e.value)
    assert f"bad.jsonl:{line}:" in msg and words in msg and "\n" not in msg


def make_dir(root: Path, splits: dict[str, int], langs=("en", "de")) -> Path:
    root.mkdir()
    for split, n in splits.items():
        for lang in langs:
            write(root / f"{split}.{lang}", "".join(f"{split} {lang} {i}\n" for i in range(n)) + "\n")
    return root


def test_paired_dir(tmp_path):
    d = make_dir(tmp_path / "full", {"train": 30, "val": 4, "test": 3})
    c = load_corpus(str(d))
    assert (len(c.train), len(c.val), len(c.test)) == (30, 4, 3)
    assert c.train[2] == Pair("train en 2", "train de 2") and c.test[0] == Pair("test en 0", "test de 0")
    rev = load_corpus(str(d), src_lang="de", tgt_lang="en")
    assert rev.val[1] == Pair("val de 1", "val en 1")
    d2 = make_dir(tmp_path / "trainonly", {"train": 40})
    c2 = load_corpus(str(d2), seed=3)
    assert (len(c2.train), len(c2.val), len(c2.test)) == (36, 4, 0)
    assert c2 == load_corpus(str(d2), seed=3)


def test_paired_dir_errors(tmp_path):
    d = make_dir(tmp_path / "d", {"train": 5})
    write(d / "train.de", "a\nb\n")
    with pytest.raises(QkvtraceError, match=r"train\.en has 5 lines but .*train\.de has 2"):
        load_corpus(str(d))
    write(d / "train.de", "a\nb\n\nd\ne\n")
    with pytest.raises(QkvtraceError, match=r"train\.de:3: empty"):
        load_corpus(str(d))
    with pytest.raises(QkvtraceError, match=r"no train\.fr"):
        load_corpus(str(d), tgt_lang="fr")
    make_dir(tmp_path / "e", {"train": 5})
    write(tmp_path / "e" / "val.en", "x\n")
    with pytest.raises(QkvtraceError, match=r"no val\.de"):
        load_corpus(str(tmp_path / "e"))


def test_paired_dir_empty_or_missing_files(tmp_path):
    (tmp_path / "nothing").mkdir()
    with pytest.raises(QkvtraceError, match=r"no train\.en and train\.de \(files: none\)"):
        load_corpus(str(tmp_path / "nothing"))
    d = make_dir(tmp_path / "d", {"train": 5})
    write(d / "val.en", "")
    write(d / "val.de", "\n")
    # empty val files would leave the run without validation; they are refused, not read as "no val pairs"
    with pytest.raises(QkvtraceError, match=r"val\.en and val\.de hold no sentences; fill them, or remove them"):
        load_corpus(str(d))
    write(d / "train.en", "")
    write(d / "train.de", "")
    with pytest.raises(QkvtraceError, match=r"train\.en and train\.de hold no sentences"):
        load_corpus(str(d))


def test_small_corpus_still_gets_a_validation_pair(tmp_path):
    path = write(tmp_path / "four.tsv", "".join(f"s{i}\tt{i}\n" for i in range(4)))
    c = load_corpus(str(path))  # 4 x 0.1 rounds to 0: one pair is still held out
    assert (len(c.train), len(c.val)) == (3, 1)
    one = write(tmp_path / "one.tsv", "s\tt\n")
    assert (len(load_corpus(str(one)).train), len(load_corpus(str(one)).val)) == (1, 0)


def test_missing_and_empty(tmp_path):
    with pytest.raises(QkvtraceError, match="corpus nope.tsv: no such file or directory; use corpus builtin"):
        load_corpus("nope.tsv")
    empty = write(tmp_path / "empty.tsv", "\n\n")
    with pytest.raises(QkvtraceError, match="no sentence pairs"):
        load_corpus(str(empty))
    notsv = write(tmp_path / "plain.dat", "no tabs\n")
    with pytest.raises(QkvtraceError, match="unknown format"):
        load_corpus(str(notsv))


def test_unreadable(tmp_path, monkeypatch):
    path = write(tmp_path / "secret.tsv", "a\tb\n")

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    # chmod 0 does not stop root, so the refusal is simulated
    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(QkvtraceError, match=r"secret.tsv: cannot read \(Permission denied\)"):
        load_corpus(str(path))


@pytest.mark.skipif(not MULTI30K.is_dir(), reason="Multi30k not available")
def test_multi30k():
    c = load_corpus(str(MULTI30K))
    assert (len(c.train), len(c.val), len(c.test)) == (29000, 1014, 1000)
    assert all(p.src and p.tgt for p in c.train)
    rev = load_corpus(str(MULTI30K), src_lang="de", tgt_lang="en")
    assert rev.train[0] == Pair(c.train[0].tgt, c.train[0].src)


# --- export ---

def test_export_tsv(tmp_path, builtin):
    out = tmp_path / "out.tsv"
    n = export_tsv(builtin, out)
    assert n == len(builtin.train) + len(builtin.val)
    back = load_corpus(str(out), val_fraction=0.0)
    assert back.train == [Pair(p.src, p.tgt) for p in builtin.train + builtin.val]
    with pytest.raises(QkvtraceError, match="already exists; pass force=True"):
        export_tsv(builtin, out)
    assert export_tsv(builtin, out, force=True) == n
    bad = Corpus("x", [Pair("a\tb", "c")], [], [], "en", "de")
    with pytest.raises(QkvtraceError, match="tab or line break"):
        export_tsv(bad, tmp_path / "bad.tsv")


# --- CLI ---

def test_cli_corpus_builtin(builtin):
    result = CliRunner().invoke(cli, ["corpus", "builtin"])
    assert result.exit_code == 0, result.output
    assert f"train {len(builtin.train)}, val {len(builtin.val)}, test 0" in result.output
    assert "food" in result.output and "samples" in result.output


def test_cli_corpus_help():
    result = CliRunner().invoke(cli, ["corpus", "--help"])
    assert result.exit_code == 0
    assert "Example:" in result.output and "--export" in result.output


def test_cli_corpus_export(tmp_path):
    out = tmp_path / "x.tsv"
    runner = CliRunner()
    assert runner.invoke(cli, ["corpus", "builtin", "--export", str(out)]).exit_code == 0
    assert len(out.read_text(encoding="utf-8").splitlines()) == len(builtin_corpus().train + builtin_corpus().val)
    again = runner.invoke(cli, ["corpus", "builtin", "--export", str(out)])
    assert again.exit_code != 0 and isinstance(again.exception, QkvtraceError)
    assert runner.invoke(cli, ["corpus", "builtin", "--export", str(out), "--force"]).exit_code == 0


def test_cli_bad_path_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qkvtrace", "corpus", "nope.tsv"], capture_output=True,
                          text=True, cwd=tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.startswith("error:") and "nope.tsv" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
