"""Model sources: the narrow seam through which extraction talks to a model.

A source answers three questions, and nothing downstream asks which kind of model it holds:
- what can be selected: `n_layers`, `n_heads`, `d_model`, `d_head`, `checkpoint_epochs()`, `check_epoch()`,
  `check_word()` (and `closest_words()` to suggest one);
- how it reads sentences: `prepare(sentences)` validates and encodes them (errors before anything is written),
  `unknown_words(prepared)` names the words it reads as unknown, `categories(sentences)` labels them if it can;
- what it computed: `forward(prepared, epoch, hooks, pool)` runs one batch with the named hook points captured and
  returns the tokens it read (`Tokens`, (batch, pos) arrays aligned with the captured tensors) and the captures.
  A source whose vocabulary cuts words into subword pieces gives one position per word, its pieces pooled as
  `pool` says (pieces.py), or one per piece with pool "none"; its Tokens carry the columns word, piece and
  piece_index. A word-level vocabulary has one piece a word, so `pool` changes nothing there.
Hook names come from `hook(site, layer, kind)`; for the own Transformer they are its module paths (`sites.Site`).

`RunSource` is a trained run of the own Transformer; `hf.HFSource` a Hugging Face encoder-decoder (one or several
checkpoints). `as_source` accepts a source, a `Run`, a run directory or a Hugging Face reference (`open_source`).
"""

from __future__ import annotations

import json

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from qkvtrace.errors import QkvtraceError, closest
from qkvtrace.sites import KINDS, SITE, SITES
from qkvtrace.vocab import EOS_ID, PAD_ID, SOS_ID, UNK_ID


@contextmanager
def capture(model: torch.nn.Module, names: Sequence[str],
            modules: dict[str, torch.nn.Module] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Attach forward hooks to the hook points `names`; yield a dict name -> the last output seen there.

    The hooks keep references (no copies) and are removed on exit, also when an error interrupts the block.
    `modules`: the model's `dict(named_modules())`, if the caller keeps it (walking the model each batch costs).
    """
    modules = dict(model.named_modules()) if modules is None else modules
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise QkvtraceError(f"{unknown[0]!r}: unknown; hooks are e.g. {', '.join(closest(unknown[0], modules, 3))}",
                            param="hooks")
    cache: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name in names:
            def keep(module, inputs, output, name=name):
                cache[name] = output.detach()
            handles.append(modules[name].register_forward_hook(keep))
        yield cache
    finally:
        for h in handles:
            h.remove()


@dataclass
class Tokens:
    """The tokens a model read in one batch, as (batch, pos) arrays aligned with the captured tensors.

    Padding is the empty string. `tgt` holds the decoder's inputs, `tgt_next` the token after each input (the
    teacher-forced target, or the model's own prediction), which names the decoder rows' transitions `wir->wollen`.
    """
    src: np.ndarray          # (batch, src_pos) object array of str
    src_special: np.ndarray  # (batch, src_pos) bool: markers such as <sos>/<eos>, kept only with `specials`
    tgt: np.ndarray          # (batch, tgt_pos) object array of str
    tgt_next: np.ndarray     # (batch, tgt_pos) object array of str
    # Extra row columns per side ("src", "tgt"): name -> (batch, pos) array, e.g. word, piece, piece_index.
    columns: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


@runtime_checkable
class Source(Protocol):
    """What extraction needs from a model; see the module docstring."""

    n_layers: int
    n_heads: int
    d_model: int
    d_head: int

    def describe(self) -> dict: ...
    def checkpoint_epochs(self) -> list[int]: ...
    def check_epoch(self, epoch: int | None, param: str = "epoch") -> int: ...
    def check_word(self, word: str, param: str = "words") -> None: ...
    def closest_words(self, word: str, n: int = 5) -> list[str]: ...
    def categories(self, sentences: Sequence) -> list[str] | None: ...
    def unknown_words(self, prepared: Any) -> dict[str, list[str]]: ...
    def prepare(self, sentences: Sequence) -> list[Any]: ...
    def hook(self, site: str, layer: int, kind: str) -> str: ...
    # Optional: `site_layers(site) -> int` where encoder and decoder differ in depth (else n_layers for every site).
    def forward(self, prepared: Sequence[Any], epoch: int, hooks: Sequence[str],
                pool: str = "mean") -> tuple[Tokens, dict]: ...


@dataclass(frozen=True)
class _Encoded:
    src: list[int]                # source ids with <sos>/<eos>
    tgt: list[int] | None         # teacher-forced target ids with <sos>/<eos>, or None: greedy
    unknown: dict[str, list[str]]  # per side ("source", "target"), the words read as <unk>


class RunSource:
    """A trained run of the own Transformer (`qkvtrace train`) as a source; checkpoints are its epochs."""

    def __init__(self, run, device: str | torch.device = "cpu"):
        from qkvtrace.train import Run

        self.run = run if isinstance(run, Run) else Run(run)
        self.device = device
        cfg = self.run.model_cfg
        self.n_layers, self.n_heads, self.d_model, self.max_len = cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.max_len
        self.d_head = cfg.d_model // cfg.n_heads
        vocab = self.run.src_vocab, self.run.tgt_vocab
        self._itos = tuple(np.array(v.itos, dtype=object) for v in vocab)  # id -> token, per side
        self._modules: dict[int, dict] = {}  # the current model's named modules, for capture
        self._where = {SITE[site].hook(layer, kind): (site, kind) for site in SITES for layer in range(self.n_layers)
                       for kind in (*KINDS, "pattern")}  # hook name -> (site, kind), for pooling

    def __repr__(self) -> str:
        return f"RunSource({str(self.run.path)!r})"

    @property
    def subword(self) -> bool:
        """A subword vocabulary (train --tokenizer bpe:SIZE) reads pieces: forward pools them to words (pieces.py)."""
        return self.run.subword

    def describe(self) -> dict:
        """Provenance for a table's manifest."""
        return {"run": str(self.run.path), "model": dict(self.run.info["model"]),
                "corpus": self.run.info.get("corpus", {}).get("name")}

    def checkpoint_epochs(self) -> list[int]:
        return self.run.checkpoint_epochs()

    def check_epoch(self, epoch: int | None, param: str = "epoch") -> int:
        return self.run.check_epoch(epoch, param)

    def check_word(self, word: str, param: str = "words") -> None:
        """A word of neither vocabulary (of a subword one: a word with a character it lacks) is an error naming the
        closest words (each once)."""
        if "->" in word:
            return  # a decoder transition such as sos->wir is matched against the rows, not the vocabulary
        known = (not self.run.src_vocab.unknown(word) if self.subword
                 else word in self.run.src_vocab or word in self.run.tgt_vocab)
        if not known:
            raise QkvtraceError(f"{word!r}: not in the vocabulary; closest: {', '.join(self.closest_words(word))}",
                                param=param)

    def closest_words(self, word: str, n: int = 5) -> list[str]:
        """The words of either vocabulary closest to `word` (each once); of a subword vocabulary, its whole-word
        pieces (those that start a word), marker removed."""
        if self.subword:
            from qkvtrace.pieces import WORD_START

            return closest(word, dict.fromkeys(p[1:] for p in self.run.src_vocab.itos[4:]
                                               if p.startswith(WORD_START) and len(p) > 1), n)
        return closest(word, dict.fromkeys(self.run.src_vocab.itos[4:] + self.run.tgt_vocab.itos[4:]), n)

    def categories(self, sentences) -> list[str] | None:
        """The built-in corpus's category of each sentence's object word (None for other corpora)."""
        if self.run.info.get("corpus", {}).get("name") != "builtin":
            return None
        from qkvtrace.corpus import category_of

        cats = [category_of(s.src) or "" for s in sentences]
        return cats if any(cats) else None

    def unknown_words(self, prepared: _Encoded) -> dict[str, list[str]]:
        """Per side ("source", "target"), the words of a prepared sentence this model reads as <unk>."""
        return prepared.unknown

    def prepare(self, sentences) -> list[_Encoded]:
        """Encode every sentence (and its target, if any); one the model cannot hold is a one-line error."""
        out = []
        for i, s in enumerate(sentences):
            where = f"sentence {s.origin or i + 1}"
            src = self.run.encode_source(s.src, where)
            unknown = {}
            if UNK_ID in src:
                unknown["source"] = self.run.src_vocab.unknown(s.src)
            tgt = None
            if s.tgt:
                tgt = self.run.tgt_vocab.encode(s.tgt)
                if len(tgt) > self.max_len:
                    shown = s.tgt if len(s.tgt) <= 60 else s.tgt[:57] + "..."
                    raise QkvtraceError(f"target of {where} {shown!r}: {len(tgt)} tokens with <sos>/<eos>, the "
                                        f"model holds at most {self.max_len}; shorten it")
                if UNK_ID in tgt:
                    unknown["target"] = self.run.tgt_vocab.unknown(s.tgt)
            out.append(_Encoded(src, tgt, unknown))
        return out

    def hook(self, site: str, layer: int, kind: str) -> str:
        return SITE[site].hook(layer, kind)

    def forward(self, prepared: Sequence[_Encoded], epoch: int, hooks: Sequence[str],
                pool: str = "mean") -> tuple[Tokens, dict]:
        """Run one batch: decoder inputs are <sos> + the target (forced) or + the model's greedy translation.
        A word-level run reads one token a word and ignores `pool`; a subword run's pieces are pooled to words as
        `pool` says (pieces.pool_units), its Tokens carry the columns word, piece and piece_index."""
        from qkvtrace.pieces import pool_units
        from qkvtrace.train import pad

        model = self.run.model(epoch, self.device)
        if id(model) not in self._modules:
            self._modules = {id(model): dict(model.named_modules())}
        src = pad([e.src for e in prepared], self.device)
        # Encoder hooks alone need no decoder input beyond <sos> (or the given target): no greedy decoding then.
        greedy = model.greedy(src) if any(e.tgt is None for e in prepared) and _decoder(hooks) else None
        full = [e.tgt if e.tgt is not None else [SOS_ID] + (greedy[j] if greedy else [])
                for j, e in enumerate(prepared)]
        # The last input is the one that predicts <eos>: "essen->eos", as the study labelled it.
        tgt_in = pad([t[:-1] if t[-1] == EOS_ID else t for t in full], self.device)
        with torch.no_grad(), capture(model, hooks, self._modules[id(model)]) as cache:
            mask = model.src_mask(src)
            hidden = model.decode(model.encode(src, mask), mask, tgt_in)  # (batch, tgt_pos, d_model)
        # (batch, tgt_pos): the token after each input, the given or greedy one. Only an input whose successor
        # is not known (a greedy translation cut at max_len) needs the output layer, the costliest matmul.
        src_np, tgt_np = src.cpu().numpy(), tgt_in.cpu().numpy()
        T = tgt_np.shape[1]
        after = pad([t[1:T + 1] or [PAD_ID] for t in full]).numpy()  # (batch, <= tgt_pos)
        nxt = np.full(tgt_np.shape, PAD_ID, dtype=np.int64)
        nxt[:, : after.shape[1]] = after
        unknown = (nxt == PAD_ID) & (tgt_np != PAD_ID)
        if unknown.any():
            with torch.no_grad():
                at = torch.from_numpy(unknown).to(hidden.device)
                nxt[unknown] = model.lm_head(hidden[at]).argmax(-1).cpu().numpy()
        if self.subword:
            # Each sentence's decoder inputs and the piece after the last: the word transitions' both ends.
            n = (tgt_np != PAD_ID).sum(1)
            tgt_seqs = [tgt_np[j, :k].tolist() + [int(nxt[j, k - 1])] for j, k in enumerate(n)]
            return pool_units(self, cache, self._where, [e.src for e in prepared],
                              tgt_seqs if _decoder(hooks) else None, pool)
        src_itos, tgt_itos = self._itos
        tokens = Tokens(src=np.where(src_np != PAD_ID, src_itos[src_np], ""),
                        src_special=(src_np == SOS_ID) | (src_np == EOS_ID),
                        tgt=np.where(tgt_np != PAD_ID, tgt_itos[tgt_np], ""),
                        tgt_next=tgt_itos[nxt])
        return tokens, cache


    # what pieces.units asks of a subword source
    def pieces(self, ids: Sequence[int]) -> list[str]:
        return [self.run.src_vocab.itos[i] for i in ids]  # one vocabulary for both sides

    def words(self, ids: Sequence[int], decoder: bool = False):
        """The words of a sequence of piece ids (pieces.group_words); <sos> and <eos> are words of their own, named
        `sos` and `eos` as the study named them."""
        from qkvtrace.pieces import Word, group_words

        names = {SOS_ID: "sos", EOS_ID: "eos", PAD_ID: "pad"}
        words = group_words(self.pieces(ids), [i in names for i in ids])
        return [Word(names[ids[w.start]], w.start, w.end, w.pieces, True) if w.special else w for w in words]


def _decoder(hooks: Sequence[str]) -> bool:
    return any(h.startswith("decoder.") for h in hooks)


def as_source(source, device: str | torch.device = "cpu") -> Source:
    """A Source as given, a `RunSource` for a `Run` or a run directory, an `hf.HFSource` for a Hugging Face
    reference (see `open_source`)."""
    if isinstance(source, (str, Path, list, tuple)) and is_hf_reference(source):
        src = open_source(source)
        src.device = device
        return src
    if isinstance(source, (str, Path)) or type(source).__name__ == "Run":
        return RunSource(source, device)
    if not isinstance(source, Source):
        raise QkvtraceError(f"{type(source).__name__}: not a model source; pass a run directory, a Run or a "
                            "Source", param="source")
    return source


# --- references that may name Hugging Face models (hf.py) ---

def is_hf_reference(ref) -> bool:
    """Whether `ref` names a Hugging Face model (rather than a run of our own), without loading anything."""
    if getattr(ref, "kind", None) == "hf":
        return True
    if isinstance(ref, (list, tuple)):
        return len(ref) > 0 and all(is_hf_reference(r) for r in ref)
    if not isinstance(ref, (str, Path)):
        return False  # a Run or another source object
    s = str(ref)
    if s.startswith("hf:"):
        return True
    p = Path(s)
    if (p / "run.json").is_file():
        return _run_info(p).get("hf") is not None
    if p.is_dir():
        if (p / "config.json").is_file():
            return True
        from qkvtrace.hf import checkpoint_folders

        return bool(checkpoint_folders(p))
    return "," in s and all(is_hf_reference(r) for r in s.split(",") if r)


def _run_info(path: Path) -> dict:
    try:
        info = json.loads((path / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def open_source(ref, param: str = "ref", src_lang: str | None = None, tgt_lang: str | None = None):
    """The model source a reference names: a `Run`, or an `HFSource` (see the module docstring).

    A list, or a comma-separated string, of Hugging Face references forms one checkpoint axis. `src_lang` and
    `tgt_lang`: language codes of a multilingual model (NLLB eng_Latn, mBART en_XX, M2M100 en; see
    `HFSource.set_languages`); a model without codes, or a run of our own, refuses them in one line. `param`: the
    caller's parameter `ref` came in, which an error about it names (the CLI spells it as its option).
    """
    source = _open_source(ref, param)
    if src_lang is not None or tgt_lang is not None:
        if getattr(source, "kind", None) != "hf":
            raise QkvtraceError(f"{src_lang or tgt_lang}: a run of our own translates the one language pair it was "
                                "trained on; language codes are for multilingual Hugging Face models (NLLB, mBART, "
                                "M2M100)", param="src_lang" if src_lang is not None else "tgt_lang")
        source.set_languages(src_lang, tgt_lang)
    return source


def _open_source(ref, param: str):
    from qkvtrace.train import Run

    if isinstance(ref, Run) or getattr(ref, "kind", None) == "hf":
        return ref
    if isinstance(ref, RunSource):
        return ref.run
    refs: Sequence[str] = [str(r) for r in ref] if isinstance(ref, (list, tuple)) else None
    if refs is None:
        s = str(ref)
        refs = [r for r in s.split(",") if r] if ("," in s and not Path(s).exists()) else [s]
    if len(refs) == 1 and not is_hf_reference(refs[0]):
        path = Path(refs[0])
        if not path.exists():
            raise QkvtraceError(f"{refs[0]}: no such run directory or model folder; give a run directory (made by "
                                "`qkvtrace train --run-dir DIR`), hf:NAME or a folder written by save_pretrained",
                                param=param)
        if path.is_dir() and not (path / "run.json").is_file():
            raise QkvtraceError(f"{refs[0]}: neither a run directory (no run.json) nor a Hugging Face model folder "
                                "(no config.json); give a run directory (made by `qkvtrace train --run-dir DIR`), "
                                "hf:NAME or a folder written by save_pretrained", param=param)
        return Run(refs[0])
    bad = [r for r in refs if not is_hf_reference(r)]
    if bad:
        raise QkvtraceError(f"{bad[0]}: several references form one checkpoint axis only for Hugging Face "
                            "models (hf:NAME, save_pretrained folders, checkpoint-N folders); a run of our own "
                            "already has its checkpoints", param=param)
    from qkvtrace.hf import HFSource, finetuned_source

    if len(refs) == 1 and (Path(refs[0]) / "run.json").is_file():
        return finetuned_source(Path(refs[0]))
    return HFSource(refs)
