"""Subword pieces and the words they spell: grouping pieces into words and pooling per-piece vectors to one a word.

A subword tokenizer (sentencepiece unigram/BPE, byte-level BPE, WordPiece) cuts a word into pieces: `▁eat`,
`▁ap` `ple`. Rows of a vector table name the word, the piece and the piece's index within its word; `pool` turns the
pieces' vectors into one row per word. This is the one place pooling happens, for Hugging Face models and for any
subword vocabulary of our own.

Pooling (`POOLS`):
- `mean` (the default): the mean of the word's piece vectors; the piece's own vector when the word is one piece.
  Linear, so pooled z·Wₒ + b still equals pooled attn_out.
- `first` / `last`: the vector of the word's first / last piece, a vector the model itself computed. On the decoder
  side the last piece is the one that predicts the next word.
- `none`: one row per piece.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Sequence

import numpy as np

POOLS = ("mean", "first", "last", "none")
DEFAULT_POOL = "mean"
# Word-start markers: sentencepiece's "▁", byte-level BPE's "Ġ"; WordPiece marks continuations with "##" instead.
WORD_START = ("▁", "Ġ")
CONTINUATION = "##"


@dataclass(frozen=True)
class Word:
    """One word of a tokenized sequence: pieces[start:end] spell `text`."""
    text: str
    start: int                 # position of its first piece in the sequence
    end: int                   # one past its last piece
    pieces: tuple[str, ...]
    special: bool = False      # a special token (</s>, a language code), a word of its own


def _is_punctuation(piece: str) -> bool:
    core = piece.lstrip("".join(WORD_START))
    return bool(core) and all(unicodedata.category(c).startswith("P") for c in core)


def group_words(pieces: Sequence[str], special: Sequence[bool] | None = None, to_text=None) -> list[Word]:
    """Group a sequence's pieces into words.

    A word starts at a piece beginning with a word-start marker (▁ or Ġ), at the sequence's first piece, after a
    special token, and at a punctuation piece (so "apple." gives the words "apple" and ".", as the word tokenizer of
    our own runs does); a WordPiece `##` piece continues the word before it. Special tokens are words of their own.

    to_text : pieces -> the word's text (the tokenizer's own `convert_tokens_to_string`, which also undoes byte-level
        encodings); default: the pieces joined with markers removed.
    """
    special = special or [False] * len(pieces)
    to_text = to_text or (lambda ps: "".join(p.replace("##", "", 1) if p.startswith("##") else p
                                             for p in ps).replace("▁", " ").replace("Ġ", " ").strip())
    # WordPiece marks continuations only: there, every piece without ## starts a word.
    wordpiece = any(p.startswith(CONTINUATION) for p in pieces) and not any(p.startswith(WORD_START) for p in pieces)
    words: list[Word] = []
    start = None
    for i, piece in enumerate(pieces):
        starts = (start is None or special[i] or special[i - 1] or piece.startswith(WORD_START) or wordpiece
                  or _is_punctuation(piece) or (i > 0 and _is_punctuation(pieces[i - 1])))
        if piece.startswith(CONTINUATION) and start is not None and not special[i - 1]:
            starts = False
        if starts and start is not None:
            words.append(_word(pieces, start, i, special[start], to_text))
        if starts:
            start = i
    if start is not None:
        words.append(_word(pieces, start, len(pieces), special[start], to_text))
    return words


def _word(pieces, start, end, special, to_text) -> Word:
    ps = tuple(pieces[start:end])
    text = ps[0] if special else (to_text(list(ps)).strip() or "".join(ps))
    return Word(text, start, end, ps, special)


def pool(t: np.ndarray, batch: np.ndarray, starts: np.ndarray, ends: np.ndarray, how: str) -> np.ndarray:
    """One vector per word from per-piece vectors.

    t : (batch, pos, ...) per-piece vectors.
    batch, starts, ends : (n_words,) the sentence of each word and its pieces' positions [start, end).
    how : "mean", "first" or "last" (see the module docstring).

    Returns (n_words, ...) in t's dtype.
    """
    if how == "first":
        return t[batch, starts]
    if how == "last":
        return t[batch, ends - 1]
    if how != "mean":
        raise ValueError(f"pool {how!r}: expected one of mean, first, last")
    counts = ends - starts
    if len(counts) and counts.max() == 1:
        return t[batch, starts]  # every word is one piece: no arithmetic, bit-identical to the piece
    # Gather every piece in word order, then sum each word's run of pieces with one reduceat.
    rows = np.repeat(batch, counts)
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    gathered = t[rows, np.repeat(starts, counts) + offsets].astype(np.float64)
    sums = np.add.reduceat(gathered, np.concatenate([[0], np.cumsum(counts)[:-1]]), axis=0)
    return (sums / counts.reshape((-1,) + (1,) * (sums.ndim - 1))).astype(t.dtype)
