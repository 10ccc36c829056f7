"""Subword vocabularies: BPE or unigram trained with the Hugging Face `tokenizers` library, behind `Vocab`'s
interface (encode, decode, text, len, save/load), so training, translation and evaluation need not ask which
kind they hold.

One tokenizer serves both languages (trained jointly on the training split's source and target sentences) and
is saved in the run as `tokenizer.json`. Words are those of `vocab.tokenize` (lowercase, a run of letters or
digits, or one punctuation character); pieces never cross a word, and each word's first piece carries the
`▁` marker, so decoding gives the words joined by single spaces (as word-level runs are scored) and every piece
knows its word (`word_index`), which is how extraction pools pieces back to words.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

from qkvtrace.errors import QkvtraceError
from qkvtrace.files import atomic_write_text
from qkvtrace.vocab import EOS_ID, SOS_ID, SPECIALS, Vocab, tokenize

TOKENIZER_FILE = "tokenizer.json"
KINDS = ("bpe", "unigram")
_SPEC = re.compile(r"^(bpe|unigram):(\d+)$")


def parse_spec(spec: str) -> tuple[str, int]:
    """'word' -> ('word', 0); 'bpe:8000' -> ('bpe', 8000); anything else is an error naming `tokenizer`."""
    if spec == "word":
        return "word", 0
    m = _SPEC.match(spec)
    if not m or int(m.group(2)) < len(SPECIALS) + 1:
        raise ValueError(f"tokenizer {spec!r}: expected word, bpe:SIZE or unigram:SIZE with SIZE > {len(SPECIALS)}, "
                         "e.g. bpe:8000")
    return m.group(1), int(m.group(2))


class SubwordVocab:
    """A trained HF tokenizer with ids 0..3 = `<pad> <sos> <eos> <unk>`, used like `Vocab`."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        if [tokenizer.id_to_token(i) for i in range(len(SPECIALS))] != list(SPECIALS):
            raise QkvtraceError(f"tokenizer must start with {', '.join(SPECIALS)}")
        self.itos = [tokenizer.id_to_token(i) for i in range(tokenizer.get_vocab_size())]

    @classmethod
    def train(cls, spec: str, sentences: Iterable[str]) -> "SubwordVocab":
        """Train `spec` ('bpe:SIZE' or 'unigram:SIZE') on `sentences`."""
        from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

        kind, size = parse_spec(spec)
        if kind == "bpe":
            tok = Tokenizer(models.BPE(unk_token=SPECIALS[3]))
            trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=list(SPECIALS), show_progress=False)
        else:
            tok = Tokenizer(models.Unigram())
            trainer = trainers.UnigramTrainer(vocab_size=size, special_tokens=list(SPECIALS), unk_token=SPECIALS[3],
                                              show_progress=False)
        tok.normalizer = normalizers.Lowercase()
        # The words of vocab.tokenize (the pattern's matches are kept, the rest dropped), each marked with ▁.
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"\w+|[^\w\s]"), behavior="removed", invert=True),
            pre_tokenizers.Metaspace(prepend_scheme="always")])
        tok.decoder = decoders.Metaspace(prepend_scheme="always")
        tok.train_from_iterator(sentences, trainer)
        return cls(tok)

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, token: str) -> bool:
        return self.tok.token_to_id(token) is not None

    def encode(self, text: str, add_specials: bool = True) -> list[int]:
        """Piece ids of `text`, wrapped in <sos> ... <eos> unless add_specials is False."""
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return [SOS_ID, *ids, EOS_ID] if add_specials else ids

    def word_index(self, text: str) -> tuple[list[int], list[str]]:
        """(word number of each piece of `encode(text, add_specials=False)`, the words): for pooling."""
        enc = self.tok.encode(text, add_special_tokens=False)
        return list(enc.word_ids), tokenize(text)

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Pieces of `ids` (specials included)."""
        return [self.itos[i] for i in ids]

    def text(self, ids: Iterable[int]) -> str:
        """The words of `ids` joined by spaces (specials dropped): what BLEU scores."""
        return self.tok.decode([i for i in ids if i >= len(SPECIALS)]).strip()

    def unknown(self, text: str) -> list[str]:
        """Words of `text` with a piece outside the vocabulary (encoded as <unk>)."""
        enc = self.tok.encode(text, add_special_tokens=False)
        words = tokenize(text)
        bad = {w for w, i in zip(enc.word_ids, enc.ids) if i == SPECIALS.index("<unk>") and w is not None}
        return list(dict.fromkeys(words[w] for w in sorted(bad) if w < len(words)))

    def to_json(self) -> str:
        return self.tok.to_str()

    @classmethod
    def from_json(cls, text: str, where: str = TOKENIZER_FILE) -> "SubwordVocab":
        from tokenizers import Tokenizer

        try:
            return cls(Tokenizer.from_str(text))
        except Exception as e:  # tokenizers raises its own exception type for a malformed file
            raise QkvtraceError(f"{where}: not a tokenizer file ({str(e).splitlines()[0]})") from None

    def save(self, path: Path | str) -> None:
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: Path | str) -> "SubwordVocab":
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise QkvtraceError(f"{path}: cannot read ({e.strerror or e})") from None
        return cls.from_json(text, str(path))


def build_vocabs(spec: str, src_sentences: Iterable[str], tgt_sentences: Iterable[str], min_freq: int = 1):
    """(src_vocab, tgt_vocab) for `spec`: two word vocabularies, or one subword tokenizer trained on both sides.
    The sentences are streamed once (generators do: a corpus on disk is never held)."""
    import itertools

    kind, _ = parse_spec(spec)
    if kind == "word":
        return Vocab.build(src_sentences, min_freq), Vocab.build(tgt_sentences, min_freq)
    joint = SubwordVocab.train(spec, itertools.chain(src_sentences, tgt_sentences))
    return joint, joint


def vocab_state(src_vocab, tgt_vocab) -> dict:
    """The vocabularies as JSON-able data (what rank 0 sends the other ranks)."""
    if isinstance(src_vocab, SubwordVocab):
        return {"kind": "subword", "json": src_vocab.to_json()}
    return {"kind": "word", "src": src_vocab.itos, "tgt": tgt_vocab.itos}


def vocabs_from_state(state: dict):
    if state["kind"] == "subword":
        joint = SubwordVocab.from_json(state["json"])
        return joint, joint
    return Vocab(state["src"]), Vocab(state["tgt"])


def save_vocabs(run_dir: Path, src_vocab, tgt_vocab) -> None:
    if isinstance(src_vocab, SubwordVocab):
        src_vocab.save(run_dir / TOKENIZER_FILE)
    else:
        src_vocab.save(run_dir / "src_vocab.json")
        tgt_vocab.save(run_dir / "tgt_vocab.json")


def load_vocabs(run_dir: Path):
    """A run's (src_vocab, tgt_vocab): its tokenizer.json if it has one, else its two word vocabularies."""
    if (run_dir / TOKENIZER_FILE).is_file():
        joint = SubwordVocab.load(run_dir / TOKENIZER_FILE)
        return joint, joint
    return Vocab.load(run_dir / "src_vocab.json"), Vocab.load(run_dir / "tgt_vocab.json")
