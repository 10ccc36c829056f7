"""Tokenizer and vocabulary: lowercasing word/punctuation tokens, `Vocab` with `<pad> <sos> <eos> <unk>`, JSON I/O."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Iterable

from qkvtrace.errors import QkvtraceError
from qkvtrace.files import atomic_write_json

PAD, SOS, EOS, UNK = "<pad>", "<sos>", "<eos>", "<unk>"
SPECIALS = (PAD, SOS, EOS, UNK)
PAD_ID, SOS_ID, EOS_ID, UNK_ID = range(4)

# A word is a run of letters/digits (Unicode-aware, so "käse" and "müssen" stay whole); any other
# non-space character is a token of its own, so "apple." -> ["apple", "."].
_TOKEN = re.compile(r"\w+|[^\w\s]")


def tokenize(text: str) -> list[str]:
    """Lowercase and split into word and punctuation tokens: "Eat apple!" -> ["eat", "apple", "!"]."""
    return _TOKEN.findall(text.lower())


class Vocab:
    """Token <-> id mapping; ids 0..3 are `<pad> <sos> <eos> <unk>`."""

    def __init__(self, itos: list[str]):
        if tuple(itos[:4]) != SPECIALS:
            raise QkvtraceError(f"vocabulary must start with {', '.join(SPECIALS)}")
        self.itos = list(itos)
        self.stoi = {t: i for i, t in enumerate(self.itos)}

    @classmethod
    def build(cls, sentences: Iterable[str], min_freq: int = 1) -> "Vocab":
        """Vocabulary of the tokens seen at least `min_freq` times, most frequent first (ties alphabetical)."""
        counts = Counter(tok for s in sentences for tok in tokenize(s))
        words = sorted((t for t, c in counts.items() if c >= min_freq), key=lambda t: (-counts[t], t))
        return cls(list(SPECIALS) + [w for w in words if w not in SPECIALS])

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, token: str) -> bool:
        return token in self.stoi

    def encode(self, text: str, add_specials: bool = True) -> list[int]:
        """Token ids of `text`, wrapped in <sos> ... <eos> unless add_specials is False."""
        ids = [self.stoi.get(t, UNK_ID) for t in tokenize(text)]
        return [SOS_ID, *ids, EOS_ID] if add_specials else ids

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Tokens of `ids` (specials included, as the study printed them)."""
        return [self.itos[i] for i in ids]

    def text(self, ids: Iterable[int]) -> str:
        """The tokens of `ids` joined by spaces: what BLEU scores."""
        return " ".join(self.decode(ids))

    def unknown(self, text: str) -> list[str]:
        """Tokens of `text` not in the vocabulary (encoded as <unk>), once each."""
        return list(dict.fromkeys(t for t in tokenize(text) if t not in self.stoi))

    def word_index(self, text: str) -> tuple[list[int], list[str]]:
        """(word number of each token of `encode(text, add_specials=False)`, the words): each token is a word."""
        words = tokenize(text)
        return list(range(len(words))), words

    def save(self, path: Path | str) -> None:
        atomic_write_json(path, {"itos": self.itos})

    @classmethod
    def load(cls, path: Path | str) -> "Vocab":
        try:
            itos = json.loads(Path(path).read_text(encoding="utf-8"))["itos"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise QkvtraceError(f"{path}: not a qkvtrace vocabulary file ({type(e).__name__}: {e})") from None
        if not isinstance(itos, list) or not all(isinstance(t, str) for t in itos):
            raise QkvtraceError(f"{path}: not a qkvtrace vocabulary file (\"itos\" must be a list of tokens)")
        try:
            return cls(itos)
        except QkvtraceError as e:
            raise QkvtraceError(f"{path}: {e}") from None
