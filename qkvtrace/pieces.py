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
    out = t[batch, starts]  # a one-piece word is its piece: no arithmetic, bit-identical
    multi = np.flatnonzero(ends - starts > 1)
    if len(multi) == 0:
        return out
    # Only words of several pieces: gather their pieces in word order, sum each word's run with one reduceat.
    batch, starts, counts = batch[multi], starts[multi], (ends - starts)[multi]
    rows = np.repeat(batch, counts)
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    gathered = t[rows, np.repeat(starts, counts) + offsets].astype(np.float64)
    sums = np.add.reduceat(gathered, np.concatenate([[0], np.cumsum(counts)[:-1]]), axis=0)
    out[multi] = (sums / counts.reshape((-1,) + (1,) * (sums.ndim - 1))).astype(t.dtype)
    return out


def pool_pattern(p: np.ndarray, q_groups, k_groups, how: str) -> np.ndarray:
    """(head, query_pos, key_pos) -> (head, query unit, key unit): queries pooled like the vectors, the weights of a
    key word's pieces summed (a row still sums to 1). `how` "none" keeps the pattern as it is."""
    if how == "none":
        return p
    k = np.stack([p[:, :, a:b].sum(-1) for a, b in k_groups], axis=-1)  # (head, query_pos, key word)
    pick = {"first": lambda a, b: k[:, a], "last": lambda a, b: k[:, b - 1],
            "mean": lambda a, b: k[:, a:b].mean(1)}[how]
    return np.stack([pick(a, b) for a, b in q_groups], axis=1)


# ----------------------------------------------------------------------------------------------------------------
# a batch of pieces -> a batch of units, for any source that can name its pieces and words

@dataclass
class Units:
    """The rows one side of a batch offers: per unit (a word, or a piece with pool none) where its pieces are and
    what it reads as; the Tokens arrays are built from these."""
    b: list[int]
    start: list[int]       # first piece position
    end: list[int]         # one past the last piece
    slot: list[int]        # the unit's position in the pooled (batch, unit) arrays
    token: list[str]       # the word (pooled) or the piece; <sos>/<eos> for the start and end markers
    nxt: list[str]         # decoder side: the next unit's token ("" when unknown); source side: ""
    word: list[str]        # the word the unit belongs to
    piece: list[str]       # the piece, or the word's pieces joined by spaces when pooled
    piece_index: list[int]  # the piece's index in its word; -1 when pooled
    special: list[bool]
    groups: list[list[tuple[int, int]]]  # per sequence, each unit's [start, end) pieces (patterns are pooled so)

    @classmethod
    def empty(cls) -> "Units":
        return cls(*([] for _ in range(10)), [])

    def width(self) -> int:
        return max((len(g) for g in self.groups), default=0)

    def grid(self, values: list, batch: int, fill, dtype=object) -> np.ndarray:
        """(batch, unit) array of one per-unit field, `fill` where a sequence has fewer units."""
        out = np.full((batch, self.width()), fill, dtype=dtype)
        out[self.b, self.slot] = values
        return out


_MARKERS = {"sos": "<sos>", "eos": "<eos>"}


def units(source, seqs: list[list[int]], decoder: bool, pool: str) -> Units:
    """Units of each sequence of ids; on the decoder side the inputs (every position but the last) and the unit after.

    source : has `words(ids, decoder)` (Words, the decoder's start word named "sos" and the end "eos") and
        `pieces(ids)`.
    """
    u = Units.empty()
    for j, ids in enumerate(seqs):
        words = source.words(ids, decoder)
        pieces = source.pieces(ids)
        n_in = len(ids) - 1 if decoder else len(ids)  # the decoder reads every position but the last (</s>)
        groups = []
        for wi, w in enumerate(words):
            if w.start >= n_in:
                continue
            if w.end > n_in:  # a generated translation cut at the length limit: its last piece is no input
                w = Word(w.text, w.start, n_in, w.pieces[: n_in - w.start], w.special)
            name = _MARKERS.get(w.text, w.text) if w.special else w.text
            spans = [(w.start, w.end)] if pool != "none" else [(i, i + 1) for i in range(w.start, w.end)]
            for a, z in spans:
                if pool == "none":
                    me = name if w.special else pieces[a]
                    nxt = ""
                    if decoder and z < len(ids):
                        after = next(x for x in words if x.start <= z < x.end)
                        nxt = _MARKERS.get(after.text, after.text) if after.special else pieces[z]
                    piece, index = pieces[a], a - w.start
                else:
                    me = name
                    after = words[wi + 1] if wi + 1 < len(words) else None
                    nxt = "" if not decoder or after is None else (
                        _MARKERS.get(after.text, after.text) if after.special else after.text)
                    piece, index = " ".join(w.pieces), -1
                u.b.append(j), u.start.append(a), u.end.append(z), u.slot.append(len(groups))
                u.token.append(me), u.nxt.append(nxt), u.word.append(w.text), u.piece.append(piece)
                u.piece_index.append(index), u.special.append(w.special)
                groups.append((a, z))
        u.groups.append(groups)
    return u


def pool_units(source, cache: dict, where: dict[str, tuple[str, str]], src_seqs: list[list[int]],
               tgt_seqs: list[list[int]] | None, how: str):
    """One batch's captures per piece -> per unit, and the Tokens naming the units.

    source : see `units`. cache : hook name -> tensor, (batch, pos, ...) or a pattern (batch, head, query_pos,
        key_pos); emptied as it is read, so that each per-piece capture is freed once pooled and a batch never holds
        all of them twice. where : hook name -> (site, kind). src_seqs : each sentence's source ids. tgt_seqs : the
        decoder's full sequences (inputs and the id after the last), None when no decoder hook ran. how : POOLS.

    Returns (sources.Tokens with the columns word, piece and piece_index; name -> tensor (batch, unit, ...)).
    """
    import torch

    from qkvtrace.sites import SITE
    from qkvtrace.sources import Tokens

    B = len(src_seqs)
    sides = {"src": units(source, src_seqs, False, how),
             "tgt": units(source, tgt_seqs, True, how) if tgt_seqs is not None else Units.empty()}
    out = {}
    for name in list(cache):
        t = cache.pop(name)
        site, kind = where[name]
        if kind == "pattern":
            q, k = sides[SITE[site].query_side], sides[SITE[site].key_side]
            p = t.cpu().numpy()  # (batch, head, query_pos, key_pos)
            pooled = np.zeros((B, p.shape[1], q.width(), k.width()), dtype=p.dtype)
            for j in range(B):
                nq, nk = len(q.groups[j]), len(k.groups[j])
                pooled[j, :, :nq, :nk] = pool_pattern(p[j, :, : q.groups[j][-1][1], : k.groups[j][-1][1]],
                                                      q.groups[j], k.groups[j], how)
            out[name] = torch.from_numpy(pooled)
            continue
        u = sides[SITE[site].side(kind)]
        if how == "none":
            out[name] = t[:, : u.width()]  # a unit is a piece: positions as they are
            continue
        v = t.cpu().numpy()
        pooled = np.zeros((B, u.width(), *v.shape[2:]), dtype=v.dtype)
        pooled[u.b, u.slot] = pool(v, np.array(u.b), np.array(u.start), np.array(u.end), how)
        out[name] = torch.from_numpy(pooled)
    s, t = sides["src"], sides["tgt"]
    tokens = Tokens(src=s.grid(s.token, B, ""), src_special=s.grid(s.special, B, False, bool),
                    tgt=t.grid(t.token, B, ""), tgt_next=t.grid(t.nxt, B, ""),
                    columns={side: {"word": u.grid(u.word, B, ""), "piece": u.grid(u.piece, B, ""),
                                    "piece_index": u.grid(u.piece_index, B, 0, np.int64)}
                             for side, u in sides.items()})
    return tokens, out
