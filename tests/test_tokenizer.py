"""Subword vocabularies (HF tokenizers, BPE and unigram) in training, the run directory and translation."""

import json
from dataclasses import replace

import numpy as np
import pytest

from qkvtrace.cli import main
from qkvtrace.errors import QkvtraceError
from qkvtrace.table import VectorTable
from qkvtrace.tokenizer import SubwordVocab, parse_spec
from qkvtrace.train import Run, train
from qkvtrace.vocab import SPECIALS, tokenize
from tests.conftest import PAIRS

SENTENCES = [s for pair in PAIRS for s in pair] + ["i eat apple, bread."]


@pytest.mark.parametrize("spec", ["bpe:60", "unigram:60"])
def test_subword_vocab_keeps_words_and_specials(spec):
    vocab = SubwordVocab.train(spec, SENTENCES)
    assert vocab.itos[:4] == list(SPECIALS) and 4 < len(vocab) <= 60
    text = "We can eat Apple, bread."
    ids = vocab.encode(text)
    assert ids[0] == 1 and ids[-1] == 2 and len(ids) > len(tokenize(text)) + 1  # pieces, not words
    word_of_piece, words = vocab.word_index(text)
    assert words == tokenize(text) == ["we", "can", "eat", "apple", ",", "bread", "."]
    assert len(word_of_piece) == len(ids) - 2 and sorted(set(word_of_piece)) == list(range(len(words)))
    assert vocab.text(ids) == " ".join(words)  # scored as word-level runs are: words joined by spaces
    assert vocab.unknown("we eat qqq") == ["qqq"]  # "q" was never seen in training
    again = SubwordVocab.from_json(vocab.to_json())
    assert again.encode(text) == ids


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory, tiny_configs):
    """A tiny run with a BPE vocabulary small enough that some words are several pieces (seconds)."""
    model, cfg = tiny_configs
    return train(replace(model, max_len=24), replace(cfg, tokenizer="bpe:70", epochs=2, checkpoints=(1, 2)),
                 tmp_path_factory.mktemp("bpe") / "run")


def test_subword_run_saves_tokenizer_json_and_translates(bpe_run):
    run = bpe_run
    names = sorted(p.name for p in run.path.iterdir())
    assert names == ["checkpoints", "metrics.jsonl", "run.json", "tokenizer.json", "tokens"]
    info = json.loads((run.path / "run.json").read_text())
    assert info["train"]["tokenizer"] == "bpe:70" and info["vocab"]["src"] == info["vocab"]["tgt"] == len(run.src_vocab)
    reopened = Run(run.path)
    assert isinstance(reopened.tgt_vocab, SubwordVocab) and reopened.subword
    assert reopened.model(2).lm_head.out_features == len(reopened.tgt_vocab)
    (t,) = reopened.translate(["i can eat apple"])
    assert isinstance(t.text, str) and "▁" not in t.text


PAIR = ("we want to eat apple", "wir wollen apfel essen")


def test_subword_extraction_pools_pieces_to_words(bpe_run, tmp_path, qkvtrace_cli):
    """Rows are words (labels eat@q@2, decoder transitions between words) pooled from their pieces as --pool says,
    with the columns word, piece and piece_index; pool none keeps a row per piece."""
    from qkvtrace.extract import extract

    sel = dict(sites="encoder.self,decoder.cross", kinds="q", layers=0, epochs=2)
    tables = {pool: extract(bpe_run, [PAIR], pool=pool, **sel) for pool in ("mean", "first", "last", "none")}
    mean = tables["mean"]
    src, tgt = mean.where(side="src"), mean.where(side="tgt")
    assert list(src.meta["token"]) == list(src.meta["word"]) == tokenize(PAIR[0])
    assert "eat@q@2" in set(src.meta["label"]) and set(mean.meta["piece_index"]) == {-1}
    assert list(tgt.meta["transition"]) == ["sos->wir", "wir->wollen", "wollen->apfel", "apfel->essen", "essen->eos"]
    assert tables["mean"].manifest["pool"] == "mean"
    pieces = tables["none"]
    assert len(pieces) > len(mean) and "▁eat@q@2" in set(pieces.meta["label"])
    # Every pooled row against its word's piece rows, for a word of several pieces on each side.
    for side, word in (("src", "want"), ("tgt", "wollen")):
        parts = pieces.where(side=side, word=word)
        order = np.argsort(parts.meta["piece_index"])
        assert len(parts) > 1 and list(parts.meta["piece_index"][order]) == list(range(len(parts)))
        assert "".join(parts.meta["piece"][order]).lstrip("▁") == word
        X = parts.vectors()[order]
        for pool, expect in (("mean", X.mean(0)), ("first", X[0]), ("last", X[-1])):
            (row,) = tables[pool].where(side=side, word=word).vectors()
            np.testing.assert_allclose(row, expect, rtol=1e-5, atol=1e-6)
        assert tables["mean"].where(side=side, word=word).meta["piece"][0] == " ".join(parts.meta["piece"][order])
    # Patterns are over words too, each query's weights still summing to 1.
    pat = next(p for p in mean.patterns if p["site"] == "decoder.cross")
    assert pat["key_tokens"] == ["<sos>", *tokenize(PAIR[0]), "<eos>"] and pat["query_tokens"][0] == "sos->wir"
    np.testing.assert_allclose(np.asarray(pat["pattern"]).sum(-1), 1, rtol=1e-5)
    # The CLI's --pool reaches runs of our own; a word with a character the vocabulary lacks is one line.
    out = tmp_path / "t"
    r = qkvtrace_cli("extract", bpe_run.path, "-s", PAIR[0], "--words", "want", "--pool", "last", "--out", out)
    assert r.returncode == 0, r.stderr
    assert set(VectorTable.load(out).meta["label"]) >= {"want@q@1", "want@k@2"}
    with pytest.raises(QkvtraceError, match="'qqq': not in the vocabulary; closest"):
        extract(bpe_run, [PAIR], words="qqq", **sel)


def test_similarity_and_attention_on_a_subword_run(bpe_run):
    from qkvtrace.compare import attention, similarity

    (table, *_) = similarity(bpe_run, "we want to eat apple", "we want to eat bread", kind="k", epochs=[2])
    assert table.rows == tokenize("we want to eat apple") and table.cols == tokenize("we want to eat bread")
    assert table.matrix.shape == (5, 5) and np.isclose(table.matrix[0, 0], 1, atol=1e-5)  # "we" is "we"
    pats = attention(bpe_run, "we want to eat apple", site="encoder.self")
    assert pats.key_tokens == ["<sos>", *tokenize("we want to eat apple"), "<eos>"]
    assert all(p.shape[-2:] == (7, 7) for p in pats.patterns)


def test_bad_tokenizer_spec_is_one_line(tmp_path, capsys):
    with pytest.raises(ValueError, match="bpe:SIZE"):
        parse_spec("bpe:x")
    with pytest.raises(SystemExit) as e:
        main(["train", "--tokenizer", "sentencepiece", "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: --tokenizer 'sentencepiece': expected word, bpe:SIZE")
    assert err.count("\n") == 1 and not (tmp_path / "r").exists()
