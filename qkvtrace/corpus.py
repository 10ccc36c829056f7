"""Parallel corpora: the built-in toy English->German corpus, and TSV / JSONL / paired-file corpora -> pairs.

Every loader returns a `Corpus` of `Pair`s split into train / val / test. Sentences are kept as written (case and
punctuation included); tokenizing and lowercasing belong to `vocab.py`. A problem the user can fix (a missing file,
a malformed line, files of different lengths) raises `QkvtraceError` naming the file and line.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from qkvtrace.errors import QkvtraceError
from qkvtrace.files import atomic_write_text, lock


@dataclass(frozen=True)
class Pair:
    """One sentence and its translation.

    `meta` describes how a built-in pair was made (category, verb, object, subject, frame); it is {} for user
    corpora. It takes no part in hashing, so a Pair can still be hashed although `meta` is a dict.
    """

    src: str
    tgt: str
    meta: dict = field(default_factory=dict, compare=True, hash=False)


@dataclass(frozen=True)
class Corpus:
    """A parallel corpus split into train / val / test (test may be empty)."""

    name: str  # "builtin" or the path as given
    train: list[Pair]
    val: list[Pair]
    test: list[Pair]
    src_lang: str  # e.g. "en"
    tgt_lang: str  # e.g. "de"

    def splits(self) -> dict[str, list[Pair]]:
        """{"train": ..., "val": ..., "test": ...}, in that order."""
        return {"train": self.train, "val": self.val, "test": self.test}

    @functools.cached_property
    def _hash(self) -> str:
        h = hashlib.sha256()
        for split, pairs in self.splits().items():
            h.update(f"[{split}]\n".encode())
            for p in pairs:
                h.update(f"{p.src}\t{p.tgt}\n".encode())
        return h.hexdigest()

    def content_hash(self) -> str:
        """sha256 hex of every split's source and target text, in order; the same corpus gives the same hash.
        Computed once per Corpus (a corpus on disk is read for it)."""
        return self._hash

    def describe(self) -> dict:
        """A JSON-able summary: name, languages, split sizes, content hash and (built-in) category counts."""
        out = {
            "name": self.name,
            "src_lang": self.src_lang,
            "tgt_lang": self.tgt_lang,
            "sizes": {split: len(pairs) for split, pairs in self.splits().items()},
            "content_hash": self.content_hash(),
        }
        categories = Counter(p.meta["category"] for pairs in self.splits().values() if isinstance(pairs, list)
                             for p in pairs if "category" in p.meta)  # files on disk carry no categories
        if categories:
            out["categories"] = {c: categories[c] for c in sorted(categories)}
        return out


# --- the built-in corpus ---

BUILTIN_CATEGORIES: tuple = ("food", "drink", "reading")

# The study's experiment file, shipped inside the package: the one place its sentence sets are written.
STUDY_FILE = Path(__file__).parent / "data" / "study.toml"


def study_sentence_sets() -> dict[str, tuple[str, ...]]:
    """The source sentences of every `items` sentence set of the study's experiment file, by set name."""
    import tomllib

    raw = tomllib.loads(STUDY_FILE.read_text(encoding="utf-8"))
    return {e["name"]: tuple(i[0] if isinstance(i, list) else i.partition("\t")[0] for i in e["items"])
            for e in raw.get("sentences", []) if "items" in e}


STUDY_SENTENCES: tuple[str, ...] = tuple(dict.fromkeys(s for v in study_sentence_sets().values() for s in v))

# English object -> (German object, category).
_OBJECTS: dict[str, tuple[str, str]] = {
    "apple": ("apfel", "food"), "bread": ("brot", "food"), "cake": ("kuchen", "food"),
    "cheese": ("käse", "food"), "soup": ("suppe", "food"), "rice": ("reis", "food"), "fish": ("fisch", "food"),
    "meat": ("fleisch", "food"), "salad": ("salat", "food"), "banana": ("banane", "food"),
    "pizza": ("pizza", "food"), "pasta": ("nudeln", "food"),
    "water": ("wasser", "drink"), "beer": ("bier", "drink"), "milk": ("milch", "drink"),
    "coffee": ("kaffee", "drink"), "tea": ("tee", "drink"), "juice": ("saft", "drink"), "wine": ("wein", "drink"),
    "lemonade": ("limonade", "drink"),
    "book": ("buch", "reading"), "newspaper": ("zeitung", "reading"), "letter": ("brief", "reading"),
    "magazine": ("zeitschrift", "reading"), "poem": ("gedicht", "reading"), "story": ("geschichte", "reading"),
    "report": ("bericht", "reading"), "note": ("notiz", "reading"),
}

_FOOD = ("apple", "bread", "cake", "cheese", "soup", "rice", "fish", "meat", "salad", "banana", "pizza", "pasta")
_DRINK = ("water", "beer", "milk", "coffee", "tea", "juice", "wine", "lemonade")
_READING = ("book", "newspaper", "letter", "magazine", "poem", "story", "report", "note")

# Only sensible verb-object combinations: nobody cooks a newspaper. "buy" spans all three categories.
_COMBOS: dict[str, tuple[str, ...]] = {
    "eat": _FOOD,
    "cook": ("soup", "rice", "fish", "meat", "pizza", "pasta"),
    "drink": _DRINK,
    "read": _READING,
    "write": ("book", "letter", "poem", "story", "report", "note"),
    "buy": _FOOD + _DRINK + ("book", "newspaper", "magazine"),
}

_SUBJECTS = ("i", "you", "he", "she", "we", "they")
_GERMAN_SUBJECTS = ("ich", "du", "er", "sie", "wir", "sie")

# English verb -> (English 3rd person singular, German infinitive, German present for the six subjects above).
_VERBS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "eat": ("eats", "essen", ("esse", "isst", "isst", "isst", "essen", "essen")),
    "cook": ("cooks", "kochen", ("koche", "kochst", "kocht", "kocht", "kochen", "kochen")),
    "buy": ("buys", "kaufen", ("kaufe", "kaufst", "kauft", "kauft", "kaufen", "kaufen")),
    "drink": ("drinks", "trinken", ("trinke", "trinkst", "trinkt", "trinkt", "trinken", "trinken")),
    "read": ("reads", "lesen", ("lese", "liest", "liest", "liest", "lesen", "lesen")),
    "write": ("writes", "schreiben", ("schreibe", "schreibst", "schreibt", "schreibt", "schreiben", "schreiben")),
}

# Frame -> (English words between subject and verb, German modal for the six subjects).
_MODAL_FRAMES: dict[str, tuple[str, tuple[str, ...]]] = {
    "can": ("can", ("kann", "kannst", "kann", "kann", "können", "können")),
    "want": ("want to", ("will", "willst", "will", "will", "wollen", "wollen")),
    "must": ("must", ("muss", "musst", "muss", "muss", "müssen", "müssen")),
    "will": ("will", ("werde", "wirst", "wird", "wird", "werden", "werden")),
}
_FRAMES = ("present",) + tuple(_MODAL_FRAMES) + ("bare",)

# The study's sentences that are built-in pairs (its meaningful ones) stay in the training split whatever the seed.
_FORCED_TRAIN = frozenset(STUDY_SENTENCES)

_CATEGORY_OF_WORD: dict[str, str] = {
    **{en: cat for en, (_, cat) in _OBJECTS.items()},
    **{de: cat for _, (de, cat) in _OBJECTS.items()},
}


def _builtin_pairs() -> list[Pair]:
    """Every built-in pair, in a fixed order: verb, object, frame, subject."""
    pairs = []
    for verb, objects in _COMBOS.items():
        third, infinitive, present = _VERBS[verb]
        for obj in objects:
            de_obj, category = _OBJECTS[obj]
            for frame in _FRAMES:
                if frame == "bare":
                    meta = {"category": category, "verb": verb, "object": obj, "subject": None, "frame": frame}
                    pairs.append(Pair(f"{verb} {obj}", f"{de_obj} {infinitive}", meta))
                    continue
                for i, subject in enumerate(_SUBJECTS):
                    if frame == "present":
                        en_verb = third if subject in ("he", "she") else verb
                        src, tgt = f"{subject} {en_verb} {obj}", f"{_GERMAN_SUBJECTS[i]} {present[i]} {de_obj}"
                    else:
                        en_modal, de_modals = _MODAL_FRAMES[frame]
                        if frame == "want" and subject in ("he", "she"):
                            en_modal = "wants to"  # "want" is a full verb in English, unlike can/must/will
                        src = f"{subject} {en_modal} {verb} {obj}"
                        tgt = f"{_GERMAN_SUBJECTS[i]} {de_modals[i]} {de_obj} {infinitive}"
                    meta = {"category": category, "verb": verb, "object": obj, "subject": subject, "frame": frame}
                    pairs.append(Pair(src, tgt, meta))
    return pairs


def _check_val_fraction(val_fraction: float) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise QkvtraceError(f"{val_fraction!r}: expected a number from 0 up to (not including) 1", param="val_fraction")


def _words(pair: Pair) -> set[str]:
    return set(pair.src.lower().split()) | set(pair.tgt.lower().split())


def builtin_corpus(seed: int = 0, val_fraction: float = 0.1) -> Corpus:
    """The deterministic toy English->German corpus of the study, with a seeded validation split.

    Parameters
    ----------
    seed : int
        Chooses the validation pairs; the same seed gives the same corpus.
    val_fraction : float
        Share of pairs held out for validation, in [0, 1). The study's meaningful sentences always stay in train,
        and a validation pair whose words would otherwise be missing from train is moved back to train.

    Returns
    -------
    Corpus
        name "builtin", en -> de, train and val disjoint, test empty.
    """
    _check_val_fraction(val_fraction)
    pairs = _builtin_pairs()
    candidates = [i for i, p in enumerate(pairs) if p.src not in _FORCED_TRAIN]
    random.Random(seed).shuffle(candidates)
    val_idx = set(candidates[: round(len(pairs) * val_fraction)])
    # Every word must be seen in training, or it would be <unk> there; move such pairs back (rarely any).
    train_words = set().union(*(_words(p) for i, p in enumerate(pairs) if i not in val_idx))
    for i in sorted(val_idx):
        if not _words(pairs[i]) <= train_words:
            val_idx.discard(i)
            train_words |= _words(pairs[i])
    train = [p for i, p in enumerate(pairs) if i not in val_idx]
    val = [p for i, p in enumerate(pairs) if i in val_idx]
    return Corpus("builtin", train, val, [], "en", "de")


def builtin_sample(verb: str, per_category: int, seed: int = 0) -> list[str]:
    """Built-in sentences with the verb `verb`, `per_category` of each object category (a seeded sample, sorted by
    category), e.g. the study's "buy" set."""
    c = builtin_corpus(seed=0)
    by_cat: dict[str, list[str]] = {}
    for p in c.train + c.val:
        if p.meta.get("verb") == verb:
            by_cat.setdefault(p.meta["category"], []).append(p.src)
    if len(by_cat) < 2:
        verbs = ", ".join(sorted(_COMBOS))
        raise QkvtraceError(f"verb {verb!r}: the built-in corpus has it with fewer than two object categories "
                            f"(verbs: {verbs})")
    rng = random.Random(seed)
    out = []
    for cat in sorted(by_cat):
        pool = sorted(set(by_cat[cat]))
        out += rng.sample(pool, min(per_category, len(pool)))
    return out


def category_of(sentence: str) -> str | None:
    """The built-in category ("food", "drink", "reading") of the first object word in `sentence`, else None.

    English and German object words are both recognised, e.g. "i can eat apple book" -> "food",
    "ich kann buch lesen" -> "reading", "we want to" -> None.
    """
    for word in sentence.lower().split():
        if word in _CATEGORY_OF_WORD:
            return _CATEGORY_OF_WORD[word]
    return None


# --- user corpora ---

_HINT = "use {corpus} builtin, a .tsv/.jsonl file or a directory with train.en/train.de"  # with mentions=("corpus",)


def _read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file, '\\r\\n' stripped, trailing blank lines dropped.

    Decoded line by line so that a bad byte is reported with its line number.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise QkvtraceError(f"{path}: cannot read ({e.strerror or e})") from None
    raw = data.split(b"\n")
    lines = []
    for n, chunk in enumerate(raw, start=1):
        try:
            line = chunk.decode("utf-8-sig" if n == 1 else "utf-8")
        except UnicodeDecodeError:
            raise QkvtraceError(f"{path}:{n}: not UTF-8 text; save the file as UTF-8") from None
        lines.append(line.rstrip("\r"))
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def _iter_lines(path: Path):
    """(line number, line) of a UTF-8 text file, streamed: `_read_lines` without holding the file."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise QkvtraceError(f"{path}: cannot read ({e.strerror or e})") from None
    blanks = []  # blank lines are held back: trailing ones are dropped, as _read_lines drops them
    with f:
        for n, chunk in enumerate(f, start=1):
            try:
                line = chunk.rstrip(b"\n").decode("utf-8-sig" if n == 1 else "utf-8").rstrip("\r")
            except UnicodeDecodeError:
                raise QkvtraceError(f"{path}:{n}: not UTF-8 text; save the file as UTF-8") from None
            if not line.strip():
                blanks.append((n, line))
                continue
            yield from blanks
            blanks = []
            yield n, line


class PairFiles:
    """The pairs of two line-aligned files, read from disk each time they are iterated, never held in memory:
    how a directory corpus with its own validation split is loaded, whatever its size.

    Iterating yields `Pair`s exactly as `_load_paired` builds them; `len` is counted (and every line checked)
    once, when the object is made. Indexing and slicing read from the start: for samples, not for training.
    """

    def __init__(self, src_path: Path, tgt_path: Path):
        self.src_path, self.tgt_path = Path(src_path), Path(tgt_path)
        n_src = n_tgt = 0
        for n_src, _ in _iter_lines(self.src_path):
            pass
        for n_tgt, _ in _iter_lines(self.tgt_path):
            pass
        if n_src != n_tgt:
            raise QkvtraceError(f"{self.src_path} has {n_src} lines but {self.tgt_path} has {n_tgt}; "
                                "the two files must be line-aligned translations")
        self._n = n_src
        for _ in self:  # the empty-line checks, once
            pass

    def __len__(self) -> int:
        return self._n

    def __iter__(self):
        for (n, s), (_, t) in zip(_iter_lines(self.src_path), _iter_lines(self.tgt_path)):
            yield Pair(_sentence(s, self.src_path, n, "line"), _sentence(t, self.tgt_path, n, "line"))

    def __getitem__(self, i):
        import itertools

        if isinstance(i, slice):
            return list(itertools.islice(self, *i.indices(self._n)))
        if not -self._n <= i < self._n:
            raise IndexError(i)
        return next(itertools.islice(self, i % self._n, None))

    def __add__(self, other):
        return list(self) + list(other)

    def __radd__(self, other):
        return list(other) + list(self)

    def __eq__(self, other):
        return isinstance(other, PairFiles) and (self.src_path, self.tgt_path) == (other.src_path, other.tgt_path)

    __hash__ = None


def _sentence(text: str, path: Path, n: int, what: str) -> str:
    text = text.strip()
    if not text:
        raise QkvtraceError(f"{path}:{n}: empty {what}; every line needs a non-empty sentence")
    return text


def _load_tsv(path: Path) -> list[Pair]:
    pairs = []
    for n, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            raise QkvtraceError(f"{path}:{n}: empty line; expected 'source<TAB>target' on every line")
        cols = line.split("\t")
        if len(cols) != 2:
            found = "no tab" if len(cols) == 1 else f"{len(cols)} columns"
            raise QkvtraceError(f"{path}:{n}: expected 'source<TAB>target', found {found}")
        pairs.append(Pair(_sentence(cols[0], path, n, "source"), _sentence(cols[1], path, n, "target")))
    return pairs


def _load_jsonl(path: Path, src_lang: str, tgt_lang: str) -> list[Pair]:
    pairs = []
    for n, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            raise QkvtraceError(f"{path}:{n}: empty line; expected one JSON object per line")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise QkvtraceError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise QkvtraceError(f"{path}:{n}: expected a JSON object like {{\"{src_lang}\": ..., \"{tgt_lang}\": ...}}")
        texts = []
        for key, what in ((src_lang, "source"), (tgt_lang, "target")):
            if key not in obj:
                raise QkvtraceError(f"{path}:{n}: no key {key!r} (keys: {', '.join(map(str, obj)) or 'none'}); "
                                    "choose keys with {src_lang}/{tgt_lang}", mentions=("src_lang", "tgt_lang"))
            if not isinstance(obj[key], str):
                raise QkvtraceError(f"{path}:{n}: {key!r} is {type(obj[key]).__name__}, expected a string")
            texts.append(_sentence(obj[key], path, n, f"{what} ({key!r})"))
        pairs.append(Pair(texts[0], texts[1]))
    return pairs


def _load_paired(src_path: Path, tgt_path: Path) -> list[Pair]:
    src_lines, tgt_lines = _read_lines(src_path), _read_lines(tgt_path)
    if len(src_lines) != len(tgt_lines):
        raise QkvtraceError(f"{src_path} has {len(src_lines)} lines but {tgt_path} has {len(tgt_lines)}; "
                            "the two files must be line-aligned translations")
    return [Pair(_sentence(s, src_path, n, "line"), _sentence(t, tgt_path, n, "line"))
            for n, (s, t) in enumerate(zip(src_lines, tgt_lines), start=1)]


def _load_dir(path: Path, src_lang: str, tgt_lang: str) -> dict[str, list[Pair] | None]:
    """{"train": pairs, "val": pairs or None, "test": pairs or None} from DIR/{split}.{lang}.

    With a validation split of its own, nothing needs drawing from train, and every split stays on disk
    (`PairFiles`); without one, train is read into memory to draw val from it.
    """
    out: dict[str, list[Pair] | None] = {}
    lazy = (path / f"val.{src_lang}").is_file() and (path / f"val.{tgt_lang}").is_file()
    for split in ("train", "val", "test"):
        src, tgt = path / f"{split}.{src_lang}", path / f"{split}.{tgt_lang}"
        if src.is_file() and tgt.is_file():
            out[split] = PairFiles(src, tgt) if lazy else _load_paired(src, tgt)
            if not out[split]:
                # Empty files are a mistake: an empty val would silently leave the run without validation.
                fix = {"train": "give them one sentence a line",
                       "val": "fill them, or remove them to have a validation split drawn from train",
                       "test": "fill them or remove them"}[split]
                raise QkvtraceError(f"corpus {path}: {src.name} and {tgt.name} hold no sentences; {fix}")
        elif src.is_file() or tgt.is_file() or split == "train":
            have = ", ".join(sorted(p.name for p in path.iterdir() if p.is_file())) or "none"
            if src.is_file() or tgt.is_file():
                missing = tgt if src.is_file() else src
                found = f"no {missing.name} next to {(src if src.is_file() else tgt).name}"
            else:
                found = f"no {src.name} and {tgt.name}"
            raise QkvtraceError(f"corpus {path}: {found} (files: {have}); "
                                "a directory corpus needs train.SRC and train.TGT, e.g. train.en and train.de; "
                                "choose the suffixes with {src_lang}/{tgt_lang}", mentions=("src_lang", "tgt_lang"))
        else:
            out[split] = None
    return out


def _split(pairs: list[Pair], seed: int, val_fraction: float) -> tuple[list[Pair], list[Pair]]:
    """Seeded (train, val) split. Identical pairs go to the same side, so val never repeats a training pair."""
    distinct = list(dict.fromkeys((p.src, p.tgt) for p in pairs))
    random.Random(seed).shuffle(distinct)
    # At least one validation pair whenever one can be spared, so that val_* metrics measure something.
    n_val = min(max(round(len(distinct) * val_fraction), 1 if val_fraction > 0 else 0), len(distinct) - 1)
    held = set(distinct[:n_val])
    return [p for p in pairs if (p.src, p.tgt) not in held], [p for p in pairs if (p.src, p.tgt) in held]


def _looks_tsv(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return b"\t" in f.read(1 << 16)
    except OSError as e:
        raise QkvtraceError(f"{path}: cannot read ({e.strerror or e})") from None


def load_corpus(spec: str = "builtin", src_lang: str = "en", tgt_lang: str = "de", seed: int = 0,
                val_fraction: float = 0.1) -> Corpus:
    """Load a parallel corpus named by `spec`.

    Parameters
    ----------
    spec : str
        "builtin"; a TSV file (.tsv/.txt, or any file with tabs) of `source<TAB>target` lines, whose columns are
        taken as given (column 1 is the source, whatever src_lang says); a JSONL file (.jsonl) of objects keyed by
        language, e.g. {"en": ..., "de": ...}; or a directory holding train.SRC/train.TGT (Multi30k layout) with
        val.* and test.* used when present.
    src_lang, tgt_lang : str
        Source and target language: JSON keys or file suffixes. en/de or de/en for the built-in corpus.
    seed : int
        Seeds the validation split when the corpus has none of its own.
    val_fraction : float
        Share of distinct pairs held out for validation when the corpus has no val split, in [0, 1).

    Returns
    -------
    Corpus
        name is `spec` as given; test is empty unless a directory has test files.
    """
    _check_val_fraction(val_fraction)
    if spec == "builtin":
        if {src_lang, tgt_lang} != {"en", "de"} or src_lang == tgt_lang:
            raise QkvtraceError(f"{src_lang}/{tgt_lang}: the builtin corpus is English-German; use en/de or de/en",
                                param=("src_lang", "tgt_lang"))
        corpus = builtin_corpus(seed, val_fraction)
        if src_lang == "de":
            def flip(pairs):
                return [Pair(p.tgt, p.src, p.meta) for p in pairs]
            corpus = Corpus("builtin", flip(corpus.train), flip(corpus.val), [], "de", "en")
        return corpus

    path = Path(spec)
    if not path.exists():
        raise QkvtraceError(f"corpus {spec}: no such file or directory; {_HINT}", mentions=("corpus",))
    if path.is_dir():
        splits = _load_dir(path, src_lang, tgt_lang)
        train, val, test = splits["train"], splits["val"], splits["test"] or []
        if val is None:
            train, val = _split(train, seed, val_fraction)
    else:
        if path.suffix.lower() == ".jsonl":
            pairs = _load_jsonl(path, src_lang, tgt_lang)
        elif path.suffix.lower() in (".tsv", ".txt") or _looks_tsv(path):
            pairs = _load_tsv(path)
        else:
            raise QkvtraceError(f"corpus {spec}: unknown format (no tabs, not .tsv/.txt/.jsonl); {_HINT}",
                                mentions=("corpus",))
        if not pairs:
            raise QkvtraceError(f"corpus {spec}: no sentence pairs in the file; {_HINT}", mentions=("corpus",))
        train, val = _split(pairs, seed, val_fraction)
        test = []
    if not train:
        raise QkvtraceError(f"corpus {spec}: no training pairs; {_HINT}", mentions=("corpus",))
    return Corpus(spec, train, val, test, src_lang, tgt_lang)


def export_tsv(corpus: Corpus, path, force: bool = False) -> int:
    """Write every pair (train, then val, then test) as `src<TAB>tgt` lines without a header; return the count.

    Refuses to overwrite an existing file unless `force`.
    """
    path = Path(path)
    if path.exists() and not force:
        raise QkvtraceError(f"{path}: already exists; pass {{force}} to overwrite it or choose another path",
                            param="export_path", mentions=("force=True",))
    if path.is_dir():
        raise QkvtraceError(f"{path}: is a directory; give a file name such as corpus.tsv", param="export_path")
    lines = []
    for split, pairs in corpus.splits().items():
        for i, p in enumerate(pairs):
            if any(c in s for s in (p.src, p.tgt) for c in "\t\n\r"):
                raise QkvtraceError(f"{path}: {split} pair {i} contains a tab or line break, "
                                    "which TSV cannot hold", param="export_path")
            lines.append(f"{p.src}\t{p.tgt}\n")
    with lock(path, "--export"):
        atomic_write_text(path, "".join(lines), "--export")
    return len(lines)
