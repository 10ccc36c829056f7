"""The experiment file format: frozen dataclasses for every table of an `experiments/NAME.toml`, `--set`
overrides, and `load_experiment`, which reads and validates the whole file (unknown keys, unknown sentence sets,
kinds, sites, layers, epochs, plot options) so that a mistake is reported as `FILE:LINE: ...` before anything is
trained.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Sequence

from qkvtrace.config import ModelConfig, TrainConfig, from_dict, load_toml, toml_line
from qkvtrace.errors import QkvtraceError, closest

FIGURE_TYPES = ("scatter", "similarity", "attention")
FORMATS = ("png", "svg", "pdf", "html")
TOP_KEYS = ("name", "description", "corpus", "model", "train", "sentences", "extract", "figures", "verdicts")
# [corpus] key -> TrainConfig field; the corpus fields live in [corpus] only, so [train] is about training.
CORPUS_KEYS = {"spec": "corpus", "src_lang": "src_lang", "tgt_lang": "tgt_lang", "val_fraction": "val_fraction",
               "min_freq": "min_freq"}
TRAIN_KEYS = tuple(f.name for f in fields(TrainConfig) if f.name not in CORPUS_KEYS.values())
SENTENCE_KEYS = ("name", "items", "file", "sample")
# [model]: the shape of a model trained here, or `source` (a model to read instead) with a multilingual one's codes.
SOURCE_KEYS = ("source", "src_lang", "tgt_lang")
MODEL_KEYS = tuple(f.name for f in fields(ModelConfig)) + SOURCE_KEYS
SAMPLE_KEYS = {"verb": str, "per_category": int, "seed": int}  # sample = {...}: built-in sentences with a verb
EXTRACT_KEYS = ("words", "epochs", "sites", "kinds", "layers", "heads", "label", "specials")
# Singular spellings accepted in [extract] and scatter figures: site = "encoder.self", layer = 0.
SINGULAR = {"site": "sites", "layer": "layers", "kind": "kinds", "head": "heads", "word": "words"}
COMMON_KEYS = ("type", "name", "caption")
FIGURE_KEYS = {
    "scatter": COMMON_KEYS + ("sentences",) + EXTRACT_KEYS + tuple(SINGULAR) + (
        "method", "dims", "frame", "color_by", "trajectories", "label_mode", "facet", "format", "seed"),
    "similarity": COMMON_KEYS + ("sentences", "a", "b", "kind", "site", "layer", "head", "epochs"),
    "attention": COMMON_KEYS + ("sentences", "sentence", "target", "site", "layer", "epochs", "format"),
}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# ----------------------------------------------------------------------------------------------------------------
# the schema

@dataclass(frozen=True)
class SentenceItem:
    """A source sentence and an optional target that is teacher-forced (else the model's greedy translation)."""
    src: str
    tgt: str | None = None


@dataclass(frozen=True)
class ExtractOptions:
    """What a scatter figure extracts; [extract] sets the defaults, each figure may override any of them."""
    words: tuple[str, ...] | None = None      # tokens (or transitions like sos->wir) to keep; None = every token
    epochs: tuple[int, ...] | None = None     # checkpoint epochs; None = every checkpoint of the run
    sites: tuple[str, ...] = ("encoder.self",)  # encoder.self, decoder.self, decoder.cross
    kinds: tuple[str, ...] = ("q", "k", "v", "x1")  # q, k, v, z (x1), attn_out (x4), layer_out
    layers: tuple[int, ...] | None = None     # layer indices; None = every layer
    heads: tuple[str, ...] = ("concat",)      # "concat" (d_model wide), "all", or head indices as text
    label: str = "{word}@{kind}@{epoch}"      # point label template, the study's eat@k@30
    specials: bool = False                    # keep the source side's <sos>/<eos> rows


@dataclass(frozen=True)
class ScatterFigure:
    """Vectors of a sentence set projected into one labelled 2-D/3-D scatter per format."""
    name: str
    sentences: str                            # a [[sentences]] name
    extract: ExtractOptions
    caption: str = ""
    method: str = "pca"                       # pca | umap | tsne
    dims: int = 2                             # 2 or 3
    frame: str = "joint"                      # joint | procrustes | aligned-umap
    color_by: str = "sentence"                # a column of the vector table
    trajectories: bool = False                # arrows joining each vector across epochs
    label_mode: str = "auto"                  # auto | all | ends | none
    facet: str | None = None                  # small multiples by a column, e.g. epoch or kind
    format: tuple[str, ...] = ("png",)        # png, svg, pdf, html (rotatable)
    seed: int = 0                             # projection seed (UMAP, t-SNE)
    type: str = "scatter"


@dataclass(frozen=True)
class SimilarityFigure:
    """Cosine tables between every token of sentence a and of sentence b, per epoch and per change."""
    name: str
    a: SentenceItem
    b: SentenceItem
    caption: str = ""
    kind: str = "k"                           # q, k, v, z/x1, attn_out/x4, layer_out, or pattern
    site: str = "encoder.self"
    layer: int = 0
    head: str = "concat"
    epochs: tuple[int, ...] | None = None     # None = every checkpoint
    sentences: str | None = None              # the set a and b came from, if any
    type: str = "similarity"


@dataclass(frozen=True)
class AttentionFigure:
    """Attention heatmaps (heads x epochs) for each sentence."""
    name: str
    items: tuple[SentenceItem, ...]
    caption: str = ""
    site: str = "decoder.cross"
    layer: int = 0
    epochs: tuple[int, ...] | None = None
    format: tuple[str, ...] = ("png",)
    sentences: str | None = None
    type: str = "attention"


Figure = ScatterFigure | SimilarityFigure | AttentionFigure


@dataclass(frozen=True)
class VerdictEntry:
    """A claim decided by the study's verdict function `type` (qkvtrace.study.VERDICTS) on a sentence set."""
    type: str
    sentences: str
    params: tuple[tuple[str, object], ...] = ()   # (key, value) pairs, every parameter of the type filled in

    def param(self, key: str):
        return dict(self.params)[key]


@dataclass(frozen=True)
class Experiment:
    """A whole experiment file, validated, with every default filled in."""
    path: Path
    name: str
    description: str
    model: ModelConfig
    train: TrainConfig
    sentences: dict[str, tuple[SentenceItem, ...]]
    extract: ExtractOptions
    figures: tuple[Figure, ...]
    overrides: tuple[str, ...] = ()
    verdicts: tuple[VerdictEntry, ...] = ()
    corpus_given: bool = True                 # False: no [corpus] table, so the built-in corpus is used (and said)
    # [model] source: a model to read instead of training one (a run directory, hf:NAME[@REV], a save_pretrained
    # folder, checkpoint-N folders); [corpus] and [train] are then not used, and `model`/`train` hold the source's
    # shape and checkpoints so that layers, heads and epochs are checked against it.
    source: str | None = None
    languages: tuple[str | None, str | None] = (None, None)  # [model] src_lang, tgt_lang of a multilingual source
    # Claims of the file that were left out because they cannot be judged on this model: (claim, why).
    not_applicable: tuple[tuple[str, str], ...] = ()


# ----------------------------------------------------------------------------------------------------------------
# locating keys for error messages

class _Where:
    """`FILE:LINE` of a key in the experiment file, or `--set KEY` when the value came from an override."""

    def __init__(self, path: Path, text: str, overridden: set[tuple]):
        self.path, self.lines, self.overridden = path, text.splitlines(), overridden
        self.text = text

    def __call__(self, table: str | None = None, key: str | None = None, index: int | None = None) -> str:
        if (table, index, key) in self.overridden:
            name = ".".join(str(p) for p in (table, index, key) if p is not None)
            return f"--set {name}"
        line = self._line(table, key, index)
        return f"{self.path}:{line}" if line else str(self.path)

    def _line(self, table, key, index) -> int | None:
        line = toml_line(self.text, table, key, index)
        # A key missing from its [[table]] block (a default) is reported at the block's header.
        return line if line is not None or index is None else toml_line(self.text, table, None, index)


def _unknown(where: str, key: str, valid: Sequence[str], context: str) -> QkvtraceError:
    near = closest(key, valid, 1)
    hint = f"; did you mean {near[0]}?" if near else ""
    return QkvtraceError(f"{where}: unknown key {key!r} {context}{hint} (valid: {', '.join(valid)})")


# ----------------------------------------------------------------------------------------------------------------
# value helpers (each raises a located one-line error)

def _str(v, where: str, key: str) -> str:
    if not isinstance(v, str):
        raise QkvtraceError(f"{where}: {key} = {v!r} should be a string")
    return v


def _bool(v, where: str, key: str) -> bool:
    if not isinstance(v, bool):
        raise QkvtraceError(f"{where}: {key} = {v!r} should be true or false")
    return v


def _int(v, where: str, key: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise QkvtraceError(f"{where}: {key} = {v!r} should be a whole number")
    return v


def _str_list(v, where: str, key: str) -> tuple[str, ...]:
    """A list of strings, or one string of comma-separated items."""
    items = [s.strip() for s in v.split(",")] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise QkvtraceError(f"{where}: {key} = {v!r} should be a list of strings, e.g. [\"q\", \"k\"]")
    items = [s for s in items if s]
    if not items:
        raise QkvtraceError(f"{where}: {key} is empty")
    return tuple(items)


def _int_list(v, where: str, key: str) -> tuple[int, ...]:
    items = [v] if isinstance(v, int) and not isinstance(v, bool) else v
    if not isinstance(items, list) or not items or not all(isinstance(i, int) and not isinstance(i, bool)
                                                          for i in items):
        raise QkvtraceError(f"{where}: {key} = {v!r} should be a list of whole numbers, e.g. [1, 15, 30]")
    return tuple(items)


def _choice(v, valid: Sequence[str], where: str, key: str) -> str:
    v = _str(v, where, key)
    if v not in valid:
        raise QkvtraceError(f"{where}: {key} {v!r}: unknown; valid: {', '.join(valid)}")
    return v


# ----------------------------------------------------------------------------------------------------------------
# --set overrides

def parse_value(text: str):
    """A --set value parsed as a TOML value (10, 1e-3, true, [1, 2], "x"); anything else is a plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict, overrides: Sequence[str]) -> set[tuple]:
    """Apply `--set KEY=VALUE` to the parsed file in place; returns the (table, index, key) triples set.

    KEY is `name`, `TABLE.KEY` ([corpus], [model], [train], [extract]), `figures.NAME.KEY` or
    `sentences.NAME.KEY`. An unknown key is an error naming its closest neighbour.
    """
    done = set()
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise QkvtraceError(f"{item!r}: expected KEY=VALUE, e.g. train.epochs=10", param="overrides")
        value = parse_value(value.strip())
        where = f"--set {key.strip()}"
        if len(parts) == 1:
            if parts[0] not in ("name", "description"):
                raise _unknown(where, parts[0], ("name", "description"), "at the top level")
            raw[parts[0]] = value
            done.add((None, None, parts[0]))
            continue
        table = parts[0]
        valid = {"corpus": tuple(CORPUS_KEYS), "model": MODEL_KEYS,
                 "train": TRAIN_KEYS, "extract": EXTRACT_KEYS + tuple(SINGULAR)}
        if table in valid and len(parts) == 2:
            if parts[1] not in valid[table]:
                raise _unknown(where, parts[1], valid[table], f"in [{table}]")
            raw.setdefault(table, {})[parts[1]] = value
            done.add((table, None, parts[1]))
        elif table in ("figures", "sentences") and len(parts) == 3:
            entries = raw.get(table, [])
            names = [e.get("name") for e in entries if isinstance(e, dict)]
            if parts[1] not in names:
                raise QkvtraceError(f"{where}: no [[{table}]] named {parts[1]!r}; names: {', '.join(map(str, names))}")
            index = names.index(parts[1])
            entry = entries[index]
            allowed = SENTENCE_KEYS if table == "sentences" else FIGURE_KEYS.get(entry.get("type"), COMMON_KEYS)
            if parts[2] not in allowed:
                raise _unknown(where, parts[2], allowed, f"in [[{table}]] {parts[1]!r}")
            entry[parts[2]] = value
            done.add((table, index, parts[2]))
        else:
            raise _unknown(where, key.strip(), ("name", "description", "corpus.KEY", "model.KEY", "train.KEY",
                                                "extract.KEY", "figures.NAME.KEY", "sentences.NAME.KEY"), "")
    return done


# ----------------------------------------------------------------------------------------------------------------
# loading

def load_experiment(path: Path | str, overrides: Sequence[str] = ()) -> Experiment:
    """Read and validate an experiment file (plus `--set` overrides) without training or loading data.

    Every problem is a QkvtraceError `FILE:LINE: ...` (or `--set KEY: ...`) naming the key and what is valid.
    """
    path = Path(path)
    raw = load_toml(path)
    text = path.read_text(encoding="utf-8")
    where = _Where(path, text, apply_overrides(raw, overrides))

    for key in raw:
        if key not in TOP_KEYS:
            raise _unknown(where(None, key), key, TOP_KEYS, "at the top level")
    for table in ("corpus", "model", "train", "extract"):
        if not isinstance(raw.get(table, {}), dict):
            raise QkvtraceError(f"{where(None, table)}: {table} should be a table [{table}]")
    for table in ("sentences", "figures", "verdicts"):
        if not isinstance(raw.get(table, []), list) or not all(isinstance(e, dict) for e in raw.get(table, [])):
            raise QkvtraceError(f"{where(None, table)}: write {table} as [[{table}]] tables")
    name = _str(raw.get("name", path.stem), where(None, "name"), "name")
    if not _NAME.match(name):
        raise QkvtraceError(f"{where(None, 'name')}: name {name!r}: use letters, digits, '.', '_' and '-' "
                            "(it names the output directory)")
    description = _str(raw.get("description", ""), where(None, "description"), "description")

    model_values = dict(raw.get("model", {}))
    source, languages = _source(model_values, path, where)
    model = _dataclass(ModelConfig, model_values, "model", MODEL_KEYS, where)
    corpus = raw.get("corpus", {})
    for key in corpus:
        if key not in CORPUS_KEYS:
            raise _unknown(where("corpus", key), key, tuple(CORPUS_KEYS), "in [corpus]")
    train_values = dict(raw.get("train", {}))
    for key in train_values:
        if key not in TRAIN_KEYS:
            hint = f" (corpus settings go in [corpus])" if key in CORPUS_KEYS.values() else ""
            raise _unknown(where("train", key), key, TRAIN_KEYS, f"in [train]{hint}")
    train_values.update({CORPUS_KEYS[k]: v for k, v in corpus.items()})
    train = _dataclass(TrainConfig, train_values, "train", [f.name for f in fields(TrainConfig)], where,
                       {v: k for k, v in CORPUS_KEYS.items()})
    if source is not None:
        model, train = _source_shape(source, languages, model, train, where)

    sentences = _sentence_sets(raw.get("sentences", []), path, where)
    defaults = _extract_options(raw.get("extract", {}), ExtractOptions(), where, "extract", None, model, train)
    figures = []
    for i, entry in enumerate(raw.get("figures", [])):
        figures.append(_figure(entry, i, defaults, sentences, model, train, where, figures))
    verdicts = tuple(_verdict(entry, i, sentences, where) for i, entry in enumerate(raw.get("verdicts", [])))
    if not figures and not verdicts:
        what = "is empty" if not raw else "has no [[figures]]"
        raise QkvtraceError(f"{path}: {what}; an experiment needs at least one [[figures]] table with type, name "
                            "and sentences (see experiments/study.toml)")
    return Experiment(path, name, description, model, train, sentences, defaults, tuple(figures), tuple(overrides),
                      verdicts=verdicts, corpus_given="corpus" in raw, source=source, languages=languages)


def _source(values: dict, path: Path, where: _Where) -> tuple[str | None, tuple]:
    """[model] source = a model reference (and src_lang/tgt_lang codes of a multilingual one), popped from `values`;
    with it, no other [model] key may be given."""
    languages = tuple(_str(values.pop(k), where("model", k), k) if k in values else None
                      for k in ("src_lang", "tgt_lang"))
    if "source" not in values:
        given = next((k for k, v in zip(("src_lang", "tgt_lang"), languages) if v is not None), None)
        if given:
            raise QkvtraceError(f"{where('model', given)}: [model] {given} goes with source = a multilingual "
                                "Hugging Face model; a model trained here has the corpus's two languages")
        return None, languages
    at = where("model", "source")
    ref = _str(values.pop("source"), at, "source").strip()
    if values:
        other = next(iter(values))
        raise QkvtraceError(f"{where('model', other)}: [model] {other} with source: the source's own shape is "
                            "used; give either source or the shape keys (d_model, n_layers, ...), not both")
    if not ref:
        raise QkvtraceError(f"{at}: source = \"\": write a run directory, hf:NAME[@REVISION] or a folder written by "
                            "save_pretrained")
    if not ref.startswith("hf:"):
        folder = Path(ref)
        if not folder.is_absolute() and not folder.exists() and (path.parent / folder).exists():
            folder = path.parent / folder  # relative to the experiment file, as sentence files are
        if not folder.exists():
            raise QkvtraceError(f"{at}: source = {ref!r}: no such folder; write a run directory, hf:NAME[@REVISION] "
                                "or a folder written by save_pretrained")
        ref = str(folder)
    return ref, languages


def _source_shape(ref: str, languages: tuple, model: ModelConfig, train: TrainConfig, where: _Where):
    """The source's layers, heads, width and checkpoints in the shapes the rest of the file is checked against."""
    from qkvtrace.sources import open_source

    at = where("model", "source")
    try:
        source = open_source(ref)
    except (QkvtraceError, ValueError) as e:
        raise QkvtraceError(f"{at}: source = {ref!r}: {e}") from None
    for key, code in zip(("src_lang", "tgt_lang"), languages):
        if code is not None:
            try:
                open_source(source, **{key: code})
            except QkvtraceError as e:
                raise QkvtraceError(f"{where('model', key)}: {key} = {e.text()}") from None
    try:
        epochs = source.checkpoint_epochs()
        if not epochs:
            source.check_epoch(None)  # raises: no checkpoints yet
        cfg = source.model_cfg
        model = replace(model, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads)
    except (QkvtraceError, ValueError) as e:
        raise QkvtraceError(f"{at}: source = {ref!r}: {e}") from None
    train = replace(train, epochs=max(max(epochs), 1), checkpoints=None)
    # A pretrained model's one checkpoint is numbered 0, which training's own validation (epochs 1..N) refuses:
    # nothing is trained here, the numbers only name the source's checkpoints.
    object.__setattr__(train, "checkpoints", tuple(epochs))
    return model, train


def _verdict(entry: dict, i: int, sentences: dict, where: _Where) -> VerdictEntry:
    from qkvtrace.study import VERDICTS

    at = lambda key=None: where("verdicts", key, i)
    if "type" not in entry:
        raise QkvtraceError(f"{at()}: [[verdicts]] #{i + 1} has no type; add type = one of {', '.join(VERDICTS)}")
    kind = _choice(entry["type"], tuple(VERDICTS), at("type"), "type")
    spec = VERDICTS[kind]
    valid = ("type", "sentences") + tuple(spec.params)
    for key in entry:
        if key not in valid:
            raise _unknown(at(key), key, valid, f"in [[verdicts]] #{i + 1} (type {kind})")
    if "sentences" not in entry:
        raise QkvtraceError(f"{at()}: verdict {kind!r} needs sentences = a [[sentences]] name "
                            f"({', '.join(sentences) or 'none defined yet'})")
    set_name = _str(entry["sentences"], at("sentences"), "sentences")
    if set_name not in sentences:
        raise QkvtraceError(f"{at('sentences')}: verdict {kind!r}: no [[sentences]] named {set_name!r}; "
                            f"sets: {', '.join(sentences) or '(none)'}")
    if spec.n_sentences and len(sentences[set_name]) != spec.n_sentences:
        raise QkvtraceError(f"{at('sentences')}: verdict {kind!r} compares {spec.n_sentences} sentences; set "
                            f"{set_name!r} has {len(sentences[set_name])}")
    params = []
    for key, default in spec.params.items():
        value = entry.get(key, default)
        check = {str: _str, int: _int, bool: _bool}[type(default)]
        value = check(value, at(key), key)
        params.append((key, value.lower() if isinstance(value, str) else value))
    return VerdictEntry(kind, set_name, tuple(params))


def _dataclass(cls, values: dict, table: str, valid: Sequence[str], where: _Where, rename: dict | None = None):
    """from_dict with unknown keys and bad values located at their line."""
    for key in values:
        if key not in valid:
            raise _unknown(where(table, key), key, valid, f"in [{table}]")
    try:
        return from_dict(cls, values, "\0")
    except QkvtraceError as e:
        # from_dict says "\0: KEY = value ..." or "\0: KEY value: ..."; put the key's line in front.
        message = str(e).removeprefix("\0: ")
        key = re.split(r"[\s=]", message, maxsplit=1)[0]
        shown = (rename or {}).get(key, key)
        src_table = "corpus" if rename and key in rename else table
        if shown != key:
            message = shown + message[len(key):]
        raise QkvtraceError(f"{where(src_table, shown)}: {message} (in [{src_table}])") from None


def _sentence_sets(entries: list[dict], path: Path, where: _Where) -> dict[str, tuple[SentenceItem, ...]]:
    from qkvtrace.extract import read_sentences
    from qkvtrace.vocab import tokenize

    out: dict[str, tuple[SentenceItem, ...]] = {}
    for i, entry in enumerate(entries):
        at = lambda key=None: where("sentences", key, i)
        for key in entry:
            if key not in SENTENCE_KEYS:
                raise _unknown(at(key), key, SENTENCE_KEYS, f"in [[sentences]] #{i + 1}")
        if "name" not in entry:
            raise QkvtraceError(f"{at()}: [[sentences]] #{i + 1} has no name; add name = \"...\"")
        name = _str(entry["name"], at("name"), "name")
        if name in out:
            raise QkvtraceError(f"{at('name')}: a sentence set named {name!r} exists already; names must be unique")
        if sum(k in entry for k in ("items", "file", "sample")) != 1:
            raise QkvtraceError(f"{at()}: [[sentences]] {name!r}: give one of items = [...], file = \"...\" or "
                                "sample = {verb = \"buy\", per_category = 30}")
        if "sample" in entry:
            items = tuple(SentenceItem(src) for src in _sample(entry["sample"], at("sample")))
        elif "file" in entry:
            file = Path(_str(entry["file"], at("file"), "file"))
            if not file.is_absolute() and not file.exists() and (path.parent / file).exists():
                file = path.parent / file  # a file beside the experiment also works
            items = tuple(SentenceItem(s.src, s.tgt) for s in read_sentences(file))
        else:
            raw_items = entry["items"]
            if not isinstance(raw_items, list) or not raw_items:
                raise QkvtraceError(f"{at('items')}: items should be a non-empty list of sentences")
            items = []
            for item in raw_items:
                if isinstance(item, str):
                    src, _, tgt = item.partition("\t")
                elif isinstance(item, list) and len(item) == 2 and all(isinstance(s, str) for s in item):
                    src, tgt = item
                else:
                    raise QkvtraceError(f"{at('items')}: item {item!r}: write \"source\", \"source\\ttarget\" "
                                        "or [\"source\", \"target\"]")
                if not tokenize(src) or (tgt and not tokenize(tgt)):
                    raise QkvtraceError(f"{at('items')}: item {item!r}: empty sentence")
                items.append(SentenceItem(src.strip(), tgt.strip() or None))
            items = tuple(items)
        out[name] = items
    return out


def _sample(value, where: str) -> list[str]:
    """A `sample = {verb = ..., per_category = ..., seed = ...}` sentence set drawn from the built-in corpus."""
    from qkvtrace.corpus import builtin_sample

    if not isinstance(value, dict):
        raise QkvtraceError(f"{where}: sample should be a table, e.g. {{verb = \"buy\", per_category = 30}}")
    for key in value:
        if key not in SAMPLE_KEYS:
            raise _unknown(where, key, tuple(SAMPLE_KEYS), "in sample")
    if "verb" not in value:
        raise QkvtraceError(f"{where}: sample needs verb = a verb of the built-in corpus, e.g. \"buy\"")
    per_category = _int(value.get("per_category", 30), where, "per_category")
    if per_category < 1:
        raise QkvtraceError(f"{where}: per_category {per_category}: must be at least 1")
    try:
        return builtin_sample(_str(value["verb"], where, "verb"), per_category, _int(value.get("seed", 0), where,
                                                                                      "seed"))
    except QkvtraceError as e:
        raise QkvtraceError(f"{where}: {e}") from None


def _extract_options(values: dict, base: ExtractOptions, where: _Where, table: str, index: int | None,
                     model: ModelConfig, train: TrainConfig, keys: Sequence[str] | None = None) -> ExtractOptions:
    """`base` updated with the extraction keys in `values`, validated against the model and the checkpoints."""
    from qkvtrace.extract import ALIASES, KINDS, SITES

    at = lambda key: where(table, key, index)
    context = f"in [{table}]" if index is None else f"in [[{table}]] #{index + 1}"
    changes = {}
    for key, value in values.items():
        if keys is None and key not in EXTRACT_KEYS + tuple(SINGULAR):
            raise _unknown(at(key), key, EXTRACT_KEYS, context)
        if key not in EXTRACT_KEYS + tuple(SINGULAR):
            continue
        field = SINGULAR.get(key, key)
        if field in changes:
            raise QkvtraceError(f"{at(key)}: both {field} and {key} given; use one")
        w = at(key)
        if field == "words":
            changes[field] = None if value == "all" else tuple(s.lower() for s in _str_list(value, w, key))
        elif field == "epochs":
            if value in ("all", "last"):
                changes[field] = None if value == "all" else (train.checkpoints[-1],)
                continue
            epochs = _int_list(value, w, key)
            bad = [e for e in epochs if e not in train.checkpoints]
            if bad:
                raise QkvtraceError(f"{w}: {key} {bad[0]}: no checkpoint at that epoch; checkpoints (set in "
                                    f"[train] checkpoints): {', '.join(map(str, train.checkpoints))}")
            changes[field] = epochs
        elif field == "sites":
            changes[field] = tuple(_choice(s, SITES, w, key) for s in _str_list(value, w, key))
        elif field == "kinds":
            changes[field] = tuple(_choice(s, KINDS + tuple(ALIASES), w, key) for s in _str_list(value, w, key))
        elif field == "layers":
            if value == "all":
                changes[field] = None
                continue
            layers = _int_list(value, w, key)
            _check_layers(layers, model, w, key)
            changes[field] = layers
        elif field == "heads":
            heads = _str_list([str(h) for h in value] if isinstance(value, list) else str(value), w, key)
            valid = ["concat", "all"] + [str(h) for h in range(model.n_heads)]
            for h in heads:
                _choice(h, valid, w, key)
            changes[field] = heads
        elif field == "label":
            changes[field] = _check_label(_str(value, w, key), w)
        elif field == "specials":
            changes[field] = _bool(value, w, key)
    out = replace(base, **changes)
    # Resolve "every checkpoint" and "every layer" now, so that the experiment states exactly what it draws.
    return replace(out, epochs=out.epochs or tuple(train.checkpoints),
                   layers=out.layers if out.layers is not None else tuple(range(model.n_layers)))


def _check_layers(layers, model: ModelConfig, where: str, key: str) -> None:
    bad = [la for la in layers if not 0 <= la < model.n_layers]
    if bad:
        raise QkvtraceError(f"{where}: {key} {bad[0]}: the model has layers 0..{model.n_layers - 1} "
                            f"([model] n_layers = {model.n_layers})")


def _check_label(label: str, where: str) -> str:
    from qkvtrace.extract import check_label

    return check_label(label, f"{where}: label")


def _figure(entry: dict, i: int, defaults: ExtractOptions, sentences: dict, model: ModelConfig, train: TrainConfig,
            where: _Where, done: list) -> Figure:
    from qkvtrace.extract import ALIASES, KINDS, SITES
    from qkvtrace.plot import LABEL_MODES
    from qkvtrace.project import FRAMES, METHODS
    from qkvtrace.table import COLUMNS

    at = lambda key=None: where("figures", key, i)
    if "type" not in entry:
        raise QkvtraceError(f"{at()}: [[figures]] #{i + 1} has no type; add type = one of {', '.join(FIGURE_TYPES)}")
    kind = _choice(entry["type"], FIGURE_TYPES, at("type"), "type")
    if "name" not in entry:
        raise QkvtraceError(f"{at()}: [[figures]] #{i + 1} has no name; add name = \"...\" (it names the files)")
    name = _str(entry["name"], at("name"), "name")
    if not _NAME.match(name):
        raise QkvtraceError(f"{at('name')}: figure name {name!r}: use letters, digits, '.', '_' and '-'")
    if any(f.name == name for f in done):
        raise QkvtraceError(f"{at('name')}: a figure named {name!r} exists already; names must be unique")
    valid = FIGURE_KEYS[kind]
    for key in entry:
        if key not in valid:
            raise _unknown(at(key), key, valid, f"in [[figures]] {name!r} (type {kind})")
    caption = _str(entry.get("caption", ""), at("caption"), "caption")

    def sentence_set(required: bool = True):
        if "sentences" not in entry:
            if required:
                raise QkvtraceError(f"{at()}: figure {name!r} needs sentences = a [[sentences]] name "
                                    f"({', '.join(sentences) or 'none defined yet'})")
            return None
        set_name = _str(entry["sentences"], at("sentences"), "sentences")
        if set_name not in sentences:
            raise QkvtraceError(f"{at('sentences')}: figure {name!r}: no [[sentences]] named {set_name!r}; "
                                f"sets: {', '.join(sentences) or '(none)'}")
        return set_name

    def epochs_of():
        if "epochs" not in entry:
            return defaults.epochs
        return _extract_options({"epochs": entry["epochs"]}, defaults, where, "figures", i, model, train).epochs

    def formats():
        value = entry.get("format", "png")
        return tuple(_choice(f.lstrip("."), FORMATS, at("format"), "format")
                     for f in _str_list(value, at("format"), "format"))

    if kind == "scatter":
        set_name = sentence_set()
        options = _extract_options(entry, defaults, where, "figures", i, model, train, keys=valid)
        heads = options.heads
        if "concat" in heads and len(heads) > 1:
            raise QkvtraceError(f"{at('heads')}: heads {list(heads)}: a scatter needs vectors of one width; use "
                                "concat, or single heads")
        columns = COLUMNS + (("category",) if train.corpus == "builtin" else ())
        facet = entry.get("facet")
        return ScatterFigure(
            name=name, sentences=set_name, extract=options, caption=caption,
            method=_choice(entry.get("method", "pca"), METHODS, at("method"), "method"),
            dims=_choice_int(entry.get("dims", 2), (2, 3), at("dims"), "dims"),
            frame=_choice(entry.get("frame", "joint"), FRAMES, at("frame"), "frame"),
            color_by=_choice(entry.get("color_by", "sentence"), columns, at("color_by"), "color_by"),
            trajectories=_bool(entry.get("trajectories", False), at("trajectories"), "trajectories"),
            label_mode=_choice(entry.get("label_mode", "auto"), LABEL_MODES, at("label_mode"), "label_mode"),
            facet=None if facet in (None, "none") else _choice(facet, columns, at("facet"), "facet"),
            format=formats(), seed=_int(entry.get("seed", 0), at("seed"), "seed"))

    site = _choice(entry.get("site", "decoder.cross" if kind == "attention" else "encoder.self"), SITES,
                   at("site"), "site")
    layer = _int(entry.get("layer", 0), at("layer"), "layer")
    _check_layers([layer], model, at("layer"), "layer")
    epochs = epochs_of()

    if kind == "similarity":
        set_name = sentence_set(required=False)
        if set_name is not None and ("a" in entry or "b" in entry):
            raise QkvtraceError(f"{at('a')}: figure {name!r}: give sentences = SET or a = ..., b = ..., not both")
        if set_name is not None:
            pair = sentences[set_name]
            if len(pair) != 2:
                raise QkvtraceError(f"{at('sentences')}: figure {name!r}: a similarity compares two sentences; "
                                    f"set {set_name!r} has {len(pair)}")
            a, b = pair
        elif "a" in entry and "b" in entry:
            a = SentenceItem(_str(entry["a"], at("a"), "a").strip())
            b = SentenceItem(_str(entry["b"], at("b"), "b").strip())
        else:
            raise QkvtraceError(f"{at()}: figure {name!r}: give a = \"...\" and b = \"...\", or sentences = a set "
                                "of two")
        what = _choice(entry.get("kind", "k"), KINDS + tuple(ALIASES) + ("pattern",), at("kind"), "kind")
        head = str(entry.get("head", "concat"))
        _choice(head, ["concat"] + [str(h) for h in range(model.n_heads)], at("head"), "head")
        if what == "pattern" and site != "decoder.self":
            from qkvtrace.vocab import tokenize

            if sorted(tokenize(a.src)) != sorted(tokenize(b.src)):
                raise QkvtraceError(f"{at('kind')}: figure {name!r}: kind pattern compares attention item by item, "
                                    f"so a and b must be the same words in any order; got {a.src!r} vs {b.src!r}")
        return SimilarityFigure(name=name, a=a, b=b, caption=caption, kind=what, site=site, layer=layer, head=head,
                                epochs=epochs, sentences=set_name)

    set_name = sentence_set(required=False)
    if (set_name is None) == ("sentence" not in entry):
        raise QkvtraceError(f"{at()}: figure {name!r}: give sentence = \"...\" or sentences = a set name (one)")
    if set_name is not None:
        if "target" in entry:
            raise QkvtraceError(f"{at('target')}: figure {name!r}: target goes with sentence = \"...\"; a set's "
                                "items carry their own targets (\"source\\ttarget\")")
        items = sentences[set_name]
    else:
        target = entry.get("target")
        items = (SentenceItem(_str(entry["sentence"], at("sentence"), "sentence").strip(),
                              _str(target, at("target"), "target").strip() if target is not None else None),)
    return AttentionFigure(name=name, items=items, caption=caption, site=site, layer=layer, epochs=epochs,
                           format=formats(), sentences=set_name)


def _choice_int(v, valid, where: str, key: str) -> int:
    if _int(v, where, key) not in valid:
        raise QkvtraceError(f"{where}: {key} = {v}: must be {' or '.join(map(str, valid))}")
    return v




def check_vocabulary(exp: Experiment, corpus) -> None:
    """Every word a figure asks for is in the vocabulary the run will have (checked before training)."""
    from qkvtrace.vocab import Vocab

    src = Vocab.build((p.src for p in corpus.train), exp.train.min_freq)
    tgt = Vocab.build((p.tgt for p in corpus.train), exp.train.min_freq)
    wanted = [(f"figure {f.name!r}", w) for f in exp.figures
              if isinstance(f, ScatterFigure) and f.extract.words is not None for w in f.extract.words]
    wanted += [(f"verdict {v.type!r}", v.param("word")) for v in exp.verdicts if "word" in dict(v.params)]
    for what, w in wanted:
        if "->" not in w and w not in src and w not in tgt:
            near = closest(w, src.itos[4:] + tgt.itos[4:], 5)
            raise QkvtraceError(f"{exp.path}: {what}: word {w!r} is not in the vocabulary of corpus "
                                f"{exp.train.corpus}; closest: {', '.join(near)}")
