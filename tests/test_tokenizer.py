"""Subword vocabularies (HF tokenizers, BPE and unigram) in training, the run directory and translation."""

import json
from dataclasses import replace

import pytest

from qkvtrace.cli import main
from qkvtrace.errors import QkvtraceError
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


def test_subword_run_saves_tokenizer_json_and_translates(tmp_path, tiny_configs):
    model, cfg = tiny_configs
    run = train(model, replace(cfg, tokenizer="bpe:50", epochs=2, checkpoints=(2,)), tmp_path / "bpe")
    names = sorted(p.name for p in run.path.iterdir())
    assert names == ["checkpoints", "metrics.jsonl", "run.json", "tokenizer.json", "tokens"]
    info = json.loads((run.path / "run.json").read_text())
    assert info["train"]["tokenizer"] == "bpe:50" and info["vocab"]["src"] == info["vocab"]["tgt"] == len(run.src_vocab)
    reopened = Run(run.path)
    assert isinstance(reopened.tgt_vocab, SubwordVocab) and reopened.subword
    assert reopened.model(2).lm_head.out_features == len(reopened.tgt_vocab)
    (t,) = reopened.translate(["i can eat apple"])
    assert isinstance(t.text, str) and "▁" not in t.text
    with pytest.raises(QkvtraceError, match="subword tokenizer"):
        from qkvtrace.extract import extract

        extract(run, [("i can eat apple", None)])


def test_bad_tokenizer_spec_is_one_line(tmp_path, capsys):
    with pytest.raises(ValueError, match="bpe:SIZE"):
        parse_spec("bpe:x")
    with pytest.raises(SystemExit) as e:
        main(["train", "--tokenizer", "sentencepiece", "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: --tokenizer 'sentencepiece': expected word, bpe:SIZE")
    assert err.count("\n") == 1 and not (tmp_path / "r").exists()
