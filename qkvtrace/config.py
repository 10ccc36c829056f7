"""Frozen configuration dataclasses (model, train) and TOML/dict loading with unknown keys rejected.

Every field has a default and a one-line comment. `from_dict` turns a mapping (from TOML or `--set`) into a config,
refusing unknown keys with the valid neighbours named, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, fields

from qkvtrace.errors import QkvtraceError, closest

@dataclass(frozen=True)
class ModelConfig:
    d_model: int = 64      # width of embeddings and of every residual stream
    n_layers: int = 2      # encoder layers, and as many decoder layers
    n_heads: int = 4       # attention heads; d_head = d_model // n_heads
    d_ff: int = 128        # hidden width of the feed-forward sublayer
    dropout: float = 0.1   # on embeddings, sublayer outputs, attention patterns and after the feed-forward ReLU
    max_len: int = 64      # longest sequence (tokens incl. <sos>/<eos>) the positional table holds

    def __post_init__(self):
        for name in ("d_model", "n_layers", "n_heads", "d_ff", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)}: must be a positive whole number")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model}: must be divisible by n_heads ({self.n_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout {self.dropout}: must be in [0, 1)")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads


PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class TrainConfig:
    corpus: str = "builtin"               # "builtin", a .tsv/.jsonl file, or a directory with train.en/train.de
    src_lang: str = "en"                  # source language key (JSONL keys, paired-file suffix)
    tgt_lang: str = "de"                  # target language key
    val_fraction: float = 0.1             # held-out share when the corpus has no validation split
    min_freq: int = 1                     # tokens seen fewer times map to <unk>
    epochs: int = 30                      # passes over the training pairs
    checkpoints: tuple[int, ...] | None = None  # epochs whose weights are kept; None -> first, middle, last
    seed: int = 0                         # seeds init, batching and dropout; same seed -> same weights on CPU
    batch_size: int = 64                  # sentence pairs per step
    lr: float = 1e-3                      # Adam learning rate
    clip: float = 1.0                     # gradient-norm clipping
    device: str = "auto"                  # auto (cuda, then mps, then cpu) | cpu | cuda | mps
    precision: str = "fp32"               # fp32 | bf16 (autocast) | fp16 (autocast + gradient scaling, CUDA only)
    tokenizer: str = "word"               # word | bpe:SIZE | unigram:SIZE (one subword vocabulary for both sides)

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"epochs {self.epochs}: must be at least 1")
        if self.checkpoints is None:
            # Frozen dataclass: resolve the default once, here, so the stored config names real epochs.
            object.__setattr__(self, "checkpoints", default_checkpoints(self.epochs))
        cps = tuple(self.checkpoints)
        bad = [c for c in cps if not 1 <= c <= self.epochs]
        if bad or list(cps) != sorted(set(cps)) or not cps:
            raise ValueError(f"checkpoints {','.join(map(str, cps)) or '(none)'}: expected increasing distinct "
                             f"epochs in 1..{self.epochs}, e.g. {','.join(map(str, default_checkpoints(self.epochs)))}")
        if not 0 <= self.seed < 2**32:  # numpy's seed range; torch and random take these too
            raise ValueError(f"seed {self.seed}: must be a whole number in 0..{2**32 - 1}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size {self.batch_size}: must be at least 1")
        if not 0 < self.lr < math.inf:  # also refuses nan, which Adam rejects only after setup
            raise ValueError(f"lr {self.lr}: must be a positive finite number, e.g. 1e-3")
        if not 0 < self.clip < math.inf:
            raise ValueError(f"clip {self.clip}: must be a positive finite number, e.g. 1.0")
        if self.device not in ("auto", "cpu", "cuda", "mps"):
            raise ValueError(f"device {self.device!r}: expected auto, cpu, cuda or mps")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: expected {', '.join(PRECISIONS)}")
        from qkvtrace.tokenizer import parse_spec

        parse_spec(self.tokenizer)
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction {self.val_fraction}: must be in (0, 1)")
        if self.min_freq < 1:
            raise ValueError(f"min_freq {self.min_freq}: must be at least 1")


def default_checkpoints(epochs: int) -> tuple[int, ...]:
    """First, middle and last epoch: 30 -> (1, 15, 30), the study's choice."""
    return tuple(sorted({1, max(1, epochs // 2), epochs}))


def from_dict(cls, values: dict, where: str):
    """Build the dataclass `cls` from `values`; `where` names the source (file, table) in error messages.

    Unknown keys and values of the wrong type raise QkvtraceError naming the key and its valid neighbours.
    """
    names = {f.name: f for f in fields(cls)}
    unknown = [k for k in values if k not in names]
    if unknown:
        k = unknown[0]
        raise QkvtraceError(f"{where}: unknown key {k!r}; did you mean {', '.join(closest(k, names, 3))}? "
                            f"(valid: {', '.join(names)})")
    kwargs = {}
    for k, v in values.items():
        default = getattr(cls(), k) if _has_defaults(cls) else None
        if isinstance(default, tuple):
            if not isinstance(v, (list, tuple)) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
                raise QkvtraceError(f"{where}: {k} = {v!r} should be a list of integers, e.g. [1, 15, 30]")
            v = tuple(v)
        elif isinstance(default, bool) != isinstance(v, bool) or (
                default is not None and not isinstance(v, type(default))
                and not (isinstance(default, float) and isinstance(v, int))):
            what = _TYPE_WORDS.get(type(default), f"a {type(default).__name__}")
            raise QkvtraceError(f"{where}: {k} = {v!r} should be {what}")
        kwargs[k] = float(v) if isinstance(default, float) else v
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise QkvtraceError(f"{where}: {e}") from None


# How a value of each config type is named in "should be ..." messages.
_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _has_defaults(cls) -> bool:
    return all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
               for f in fields(cls))


def to_dict(cfg) -> dict:
    """A config as a JSON/TOML-ready dict (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def load_toml(path) -> dict:
    """Parse a TOML file; a syntax error is a one-line QkvtraceError `FILE:LINE:COLUMN: message`."""
    import re
    import tomllib
    from pathlib import Path

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise QkvtraceError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise QkvtraceError(f"{path}: cannot read ({e})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(e))
        where = f"{path}:{m.group(1)}:{m.group(2)}" if m else str(path)
        message = re.sub(r" \(at .*\)$", "", str(e))
        raise QkvtraceError(f"{where}: TOML syntax error: {message}") from None


# A table header, [table] or [[table]], as opposed to a line that starts a multi-line list.
TOML_HEADER = re.compile(r"^\[\[?\s*[A-Za-z0-9_.-]+\s*\]\]?\s*(#.*)?$")


def toml_line(text: str, table: str, key: str | None = None, index: int | None = None) -> int | None:
    """Line number (1-based) in TOML `text` of `key = ...` inside `[table]`, or inside the `index`-th (0-based)
    `[[table]]` block; of the header itself when `key` is None. For error messages; None if not found."""
    header = f"[{table}]" if index is None else f"[[{table}]]"
    count, start = -1, None
    for i, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if TOML_HEADER.match(s):
            if start is not None:
                break
            if s.split("#")[0].replace(" ", "") == header:
                count += 1
                if count == (index or 0):
                    start = i
                    if key is None:
                        return i
        elif start is not None and s.split("=", 1)[0].strip() == key:
            return i
    return start if key is None else None
