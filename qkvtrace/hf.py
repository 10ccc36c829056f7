"""Hugging Face encoder-decoders as a model source: loading, the site -> module map, capture with hooks, translation.

Supported families and the modules their vectors are read from (forward hooks on the library's own modules; the
library's forward code runs unchanged):

    family                     layers                    self / cross attention           projections
    Marian, BART, mBART,       model.{encoder,decoder}   self_attn / encoder_attn         q_proj k_proj v_proj out_proj
    M2M100/NLLB                .layers.N
    T5, mT5                    {encoder,decoder}.block.N layer.0.SelfAttention /        q k v o
                                                         layer.1.EncDecAttention

q, k, v: the projection's output (forward hook), (batch, pos, head, d_head); Marian/BART scale q inside the attention
function, not in q_proj, and T5 does not scale at all, so q is the projection itself in every family.
z: the output projection's input (forward pre-hook), (batch, query_pos, head, d_head).
attn_out: the attention module's output[0], (batch, query_pos, d_model).
pattern: the attention module's weights output (eager attention), (batch, head, query_pos, key_pos).
layer_out: the layer's output (batch, pos, d_model); for the last layer the stack's output, after the final layer
norm of pre-norm models (mBART, M2M100, T5), which is what the decoder and the output layer read and what
`output_hidden_states` reports.

Models are loaded with eager attention (the pattern exists only there) in float32, in evaluation mode. Hub names
are read from the local cache first; with HF_HUB_OFFLINE set nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from qkvtrace.errors import QkvtraceError

log = logging.getLogger("qkvtrace")

SUPPORTED = "Marian, BART, mBART, M2M100/NLLB, T5/mT5"
# Multilingual models name their languages with codes; the first pair the tokenizer knows is the default (the
# study's English -> German): NLLB, mBART (and mBART-50), M2M100.
LANGUAGE_DEFAULTS = (("eng_Latn", "deu_Latn"), ("en_XX", "de_DE"), ("en", "de"))
_NOT_LANGUAGES = {"<s>", "</s>", "<unk>", "<pad>", "<mask>"}


@dataclass(frozen=True)
class Layout:
    """Where a family keeps its attention modules, relative to the model returned by AutoModelForSeq2SeqLM."""
    encoder: str          # the encoder stack, e.g. "model.encoder"
    decoder: str
    layers: str           # the layer list inside a stack: "layers" or "block"
    self_attn: str        # inside a layer
    cross_attn: str
    q: str
    k: str
    v: str
    o: str


BART_LIKE = Layout("model.encoder", "model.decoder", "layers", "self_attn", "encoder_attn",
                   "q_proj", "k_proj", "v_proj", "out_proj")
T5_LIKE = Layout("encoder", "decoder", "block", "layer.0.SelfAttention", "layer.1.EncDecAttention", "q", "k", "v", "o")
LAYOUTS = {"marian": BART_LIKE, "bart": BART_LIKE, "mbart": BART_LIKE, "m2m_100": BART_LIKE, "t5": T5_LIKE,
           "mt5": T5_LIKE}
# What a family's attention does beyond softmax(QKᵀ/√d_head)·V with absolute positions, for the manifest and study.
TRAITS = {"marian": {"positions": "sinusoidal", "norm": "post", "scaled": True},
          "bart": {"positions": "learned", "norm": "post", "scaled": True},
          "mbart": {"positions": "learned", "norm": "pre", "scaled": True},
          "m2m_100": {"positions": "sinusoidal", "norm": "pre", "scaled": True},
          "t5": {"positions": "relative", "norm": "pre", "scaled": False},
          "mt5": {"positions": "relative", "norm": "pre", "scaled": False}}


@dataclass(frozen=True)
class HFModelConfig:
    """The shape facts extraction needs, read from a transformers config."""
    family: str
    n_layers: int          # encoder layers
    n_dec_layers: int
    n_heads: int
    d_model: int
    d_head: int
    max_len: int

    @property
    def d_inner(self) -> int:
        """Width of q, k, v and z with heads concatenated (T5's n_heads·d_kv need not equal d_model)."""
        return self.n_heads * self.d_head

    def site_layers(self, site: str) -> int:
        """How many layers the stack of `site` has: encoder and decoder may differ in depth (distilled models)."""
        return self.n_layers if site == "encoder.self" else self.n_dec_layers


def model_config(config) -> HFModelConfig:
    family = config.model_type
    if family in ("t5", "mt5"):
        return HFModelConfig(family, config.num_layers, config.num_decoder_layers or config.num_layers,
                             config.num_heads, config.d_model, config.d_kv, getattr(config, "n_positions", 512) or 512)
    if config.encoder_attention_heads != config.decoder_attention_heads:
        raise QkvtraceError(f"{type(config).__name__}: encoder and decoder have different head counts "
                            f"({config.encoder_attention_heads}, {config.decoder_attention_heads}); not supported")
    return HFModelConfig(family, config.encoder_layers, config.decoder_layers, config.encoder_attention_heads,
                         config.d_model, config.d_model // config.encoder_attention_heads,
                         config.max_position_embeddings)


def _offline() -> bool:
    flags = [os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")]
    return any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


def _hub_unreachable() -> bool:
    """True when the Hub's host does not even resolve (no network) and no proxy is configured: then downloading is
    hopeless, and huggingface_hub would retry for about 25 s before failing."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False
    from huggingface_hub import constants

    try:
        socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname or "huggingface.co", 443)
    except OSError:
        return True
    return False


def parse_reference(ref: str) -> tuple[str, str | None]:
    """`hf:NAME[@REVISION]` -> (NAME, REVISION); a local folder -> (folder, None)."""
    if ref.startswith("hf:"):
        name, _, revision = ref[3:].partition("@")
        if not name:
            raise QkvtraceError(f"{ref!r}: no model name after hf:; write e.g. hf:Helsinki-NLP/opus-mt-en-de")
        return name, revision or None
    return ref, None


def _require_transformers():
    try:
        import transformers
    except ImportError:
        raise QkvtraceError("Hugging Face models need the transformers library: pip install 'qkvtrace[hf]'") from None
    # Progress bars and advice about generation settings would bury our own one-line messages on stderr.
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import huggingface_hub  # its retries print a line each ("Retrying in 8s [Retry 5/5]")

    huggingface_hub.utils.logging.set_verbosity_error()


def _load(what: str, ref: str, loader, **kwargs):
    """Call a from_pretrained `loader` for `ref`, from local files first; a miss while offline is one line."""
    name, revision = parse_reference(ref)
    local = not ref.startswith("hf:")
    try:
        return loader(name, revision=revision, local_files_only=True, **kwargs)
    except OSError:
        if local:
            raise QkvtraceError(f"{ref}: no {what} in this folder (expected what save_pretrained writes: "
                                "config.json, model.safetensors, tokenizer files)") from None
        if _offline():
            raise QkvtraceError(f"{ref}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; download it "
                                "once with network access, or pass a local folder written by save_pretrained "
                                "(e.g. ./opus-mt-en-de)") from None
        if _hub_unreachable():
            raise QkvtraceError(f"{ref}: not in the local Hugging Face cache, and huggingface.co cannot be reached "
                                "(offline); download it once with network access, or pass a local folder written "
                                "by save_pretrained (e.g. ./opus-mt-en-de)") from None
    try:
        return loader(name, revision=revision, **kwargs)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QkvtraceError(f"{ref}: cannot load the {what} ({first}); pass a local folder written by "
                            "save_pretrained if there is no network") from None


def load_model(ref: str, device="cpu"):
    """AutoModelForSeq2SeqLM of `ref` in float32, eager attention, evaluation mode; with its Layout checked."""
    _require_transformers()
    import torch
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    config = _load("model configuration", ref, AutoConfig.from_pretrained)
    try:
        model = _load("model", ref, AutoModelForSeq2SeqLM.from_pretrained, config=config,
                      attn_implementation="eager", dtype=torch.float32)
    except ValueError as e:  # transformers: "Unrecognized configuration class ... for AutoModelForSeq2SeqLM"
        raise QkvtraceError(f"{ref}: {type(config).__name__} is not an encoder-decoder (AutoModelForSeq2SeqLM "
                            f"cannot load it: {str(e).splitlines()[0][:120]}); supported: {SUPPORTED}") from None
    check_layout(model, ref)
    return model.to(device).eval()


def check_layout(model, ref: str = "model") -> Layout:
    """The family's Layout, or a one-line error naming the model class and the attention modules it lacks."""
    family = model.config.model_type
    layout = LAYOUTS.get(family)
    cls = type(model).__name__
    if layout is None:
        raise QkvtraceError(f"{ref}: {cls} (model_type {family!r}) is not supported: qkvtrace reads q, k, v from "
                            "q_proj/k_proj/v_proj/out_proj or q/k/v/o attention modules at known paths, which "
                            f"are not mapped for this family; supported: {SUPPORTED}")
    modules = dict(model.named_modules())
    cfg = model_config(model.config)
    missing = [p for p in (f"{layout.encoder}.{layout.layers}.0.{layout.self_attn}.{layout.q}",
                           f"{layout.decoder}.{layout.layers}.0.{layout.cross_attn}.{layout.o}",
                           f"{layout.encoder}.{layout.layers}.{cfg.n_layers - 1}") if p not in modules]
    if missing:
        raise QkvtraceError(f"{ref}: {cls} lacks the module {missing[0]} that its family {family!r} should have; "
                            f"supported: {SUPPORTED}")
    return layout


# ----------------------------------------------------------------------------------------------------------------
# site -> module map and capture

STACKS = {"encoder.self": ("encoder", "self_attn"), "decoder.self": ("decoder", "self_attn"),
          "decoder.cross": ("decoder", "cross_attn")}


def hook_name(site: str, layer: int, kind: str) -> str:
    """Our name of a vector (the own model's hook path): `encoder.layers.0.self_attn.hook_q`, `...hook_out`."""
    stack, attn = STACKS[site]
    return f"{stack}.layers.{layer}.hook_out" if kind == "layer_out" else f"{stack}.layers.{layer}.{attn}.hook_{kind}"


def module_of(layout: Layout, n_layers: int, site: str, layer: int, kind: str) -> tuple[str, str]:
    """(module path in the library's model, how it is read) for one vector kind.

    how: "out" (forward hook, the output), "in" (forward pre-hook, the first input), "attn0" / "attn-1" (the
    attention module's output tuple, element 0 or last), "layer" (a layer's output, a tensor or a tuple's first
    element), "stack" (a stack's ModelOutput.last_hidden_state).
    """
    stack, attn_key = STACKS[site]
    stack_path = getattr(layout, stack)
    layer_path = f"{stack_path}.{layout.layers}.{layer}"
    attn = f"{layer_path}.{getattr(layout, attn_key)}"
    if kind in ("q", "k", "v"):
        return f"{attn}.{getattr(layout, kind)}", "out"
    if kind == "z":
        return f"{attn}.{layout.o}", "in"
    if kind == "attn_out":
        return attn, "attn0"
    if kind == "pattern":
        return attn, "attn-1"
    if kind == "layer_out":
        return (stack_path, "stack") if layer == n_layers - 1 else (layer_path, "layer")
    raise ValueError(kind)


@contextmanager
def capture(model, layout: Layout, cfg: HFModelConfig, wanted: Sequence[tuple[str, int, str]]
            ) -> Iterator[dict[str, "torch.Tensor"]]:
    """Hooks on the library's modules for each (site, layer, kind) in `wanted`; yields name -> tensor, keyed and
    shaped as the own model's hook points: q, k, v, z (batch, pos, head, d_head), pattern (batch, head, query_pos,
    key_pos), attn_out and layer_out (batch, pos, d_model). Hooks are removed on exit, also after an error."""
    modules = dict(model.named_modules())
    cache: dict = {}
    # One hook per (module, how), feeding every name read from it.
    readers: dict[tuple[str, str], list[tuple[str, bool]]] = {}
    for site, layer, kind in wanted:
        path, how = module_of(layout, cfg.site_layers(site), site, layer, kind)
        readers.setdefault((path, how), []).append((hook_name(site, layer, kind), kind in ("q", "k", "v", "z")))
    handles = []

    def store(names, t):
        for name, headed in names:
            if headed:
                B, T, _ = t.shape
                cache[name] = t.detach().view(B, T, cfg.n_heads, cfg.d_head)  # (batch, pos, head, d_head)
            else:
                cache[name] = t.detach()

    try:
        for (path, how), names in readers.items():
            module = modules[path]
            if how == "in":
                handles.append(module.register_forward_pre_hook(
                    lambda m, inputs, names=names: store(names, inputs[0])))
            else:
                def hook(m, inputs, output, names=names, how=how):
                    if how == "out":
                        t = output
                    elif how == "attn0" or (how == "layer" and isinstance(output, tuple)):
                        t = output[0]
                    elif how == "attn-1":
                        t = output[-1]
                        if t is None:
                            raise QkvtraceError("attention weights are not returned: the model must be loaded with "
                                                "attn_implementation='eager'")
                    elif how == "stack":
                        t = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
                    else:
                        t = output
                    store(names, t)
                handles.append(module.register_forward_hook(hook))
        yield cache
    finally:
        for h in handles:
            h.remove()


def forward(model, src, src_mask, tgt_in, tgt_mask):
    """The encoder and decoder stacks on a teacher-forced batch, no output layer and no cache (every hook fires
    once, with the whole sequence). Returns the decoder's last hidden state (batch, tgt_pos, d_model)."""
    memory = model.get_encoder()(input_ids=src, attention_mask=src_mask).last_hidden_state
    return model.get_decoder()(input_ids=tgt_in, attention_mask=tgt_mask, encoder_hidden_states=memory,
                               encoder_attention_mask=src_mask, use_cache=False).last_hidden_state


# ----------------------------------------------------------------------------------------------------------------
# references and the source object

_CHECKPOINT = re.compile(r"(?:checkpoint|epoch|step)[-_]?(\d+)$")


def checkpoint_folders(folder: Path) -> list[tuple[int, Path]]:
    """A training output folder's `checkpoint-N` subfolders that hold a model, by N."""
    out = []
    for p in folder.iterdir() if folder.is_dir() else []:
        m = _CHECKPOINT.search(p.name)
        if m and (p / "config.json").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def expand_references(refs: Sequence[str]) -> list[tuple[int, str]]:
    """References -> the checkpoint axis [(number, reference)].

    A folder of `checkpoint-N` subfolders (a Trainer's output_dir) gives one checkpoint per subfolder, numbered N;
    several references are numbered by the N in their folder names when each has one, else 0, 1, 2 in the order
    given.
    """
    items: list[str] = []
    for ref in refs:
        p = Path(ref)
        if not ref.startswith("hf:") and p.is_dir() and not (p / "config.json").is_file():
            found = checkpoint_folders(p)
            if not found:
                raise QkvtraceError(f"{ref}: neither a qkvtrace run (run.json), a save_pretrained folder "
                                    "(config.json) nor a folder of checkpoint-N subfolders")
            items += [str(path) for _, path in found]
        else:
            items.append(ref)
    numbers = [_CHECKPOINT.search(Path(parse_reference(r)[0]).name) for r in items]
    if all(numbers) and len({int(m.group(1)) for m in numbers}) == len(items):
        return [(int(m.group(1)), r) for m, r in zip(numbers, items)]
    return list(enumerate(items))


@dataclass
class HFTranslation:
    """A translation by `generate`: words as the study printed them (`Ich esse Brot . <eos>`) and the text."""
    source: str
    tokens: list[str]
    unknown: list[str]
    epoch: int
    text: str


class HFSource:
    """One or several Hugging Face encoder-decoder checkpoints of one architecture and tokenizer, as a model source.

    It answers what a run answers: `checkpoint_epochs()`, `check_epoch()`, `model(epoch)`, `translate()`,
    `model_cfg` (n_layers, n_heads, d_model, d_head, max_len), `path` and `info`; plus `tokenizer` and `layout`.
    Checkpoints are numbered as `expand_references` says; a fine-tuning run of our own numbers them by epoch.
    """

    kind = "hf"

    def __init__(self, refs: Sequence[str] | str, weights: dict[int, Path] | None = None, name: str | None = None,
                 info: dict | None = None, checksums: dict[int, str | None] | None = None):
        _require_transformers()
        from transformers import AutoConfig, AutoTokenizer

        refs = [refs] if isinstance(refs, str) else list(refs)
        self.weights = weights or {}  # epoch -> a safetensors file to load into the first reference's architecture
        self.checksums = checksums or {}  # epoch -> the sha256 run.json recorded for its file
        self.refs = dict(expand_references(refs)) if not self.weights else {e: refs[0] for e in self.weights}
        first = next(iter(self.refs.values()))
        self.path = name or ",".join(refs)
        self.config = _load("model configuration", first, AutoConfig.from_pretrained)
        family = self.config.model_type
        if family not in LAYOUTS:
            from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES as S2S

            if family not in S2S:
                raise QkvtraceError(f"{first}: {type(self.config).__name__} (model_type {family!r}) is not an "
                                    f"encoder-decoder that AutoModelForSeq2SeqLM loads; supported: {SUPPORTED}")
            raise QkvtraceError(f"{first}: {S2S[family]} (model_type {family!r}) is not supported: qkvtrace reads q, "
                                "k, v from q_proj/k_proj/v_proj/out_proj or q/k/v/o attention modules at paths known "
                                f"per family, and none are mapped for {family!r}; supported: {SUPPORTED}")
        self.layout = LAYOUTS[family]
        self.model_cfg = model_config(self.config)
        self.tokenizer = _load("tokenizer", first, AutoTokenizer.from_pretrained)
        for e, ref in self.refs.items():
            if ref != first:
                other = _load("model configuration", ref, AutoConfig.from_pretrained)
                if model_config(other) != self.model_cfg:
                    raise QkvtraceError(f"{ref}: another architecture than {first} ({model_config(other)} vs "
                                        f"{self.model_cfg}); one extraction's checkpoints share one architecture")
        self.info = {"model": {"source": "hf", "family": family, "class": (self.config.architectures or [""])[0],
                               **{k: v for k, v in vars(self.model_cfg).items()}, **TRAITS[family]},
                     "checkpoints": {str(e): r for e, r in self.refs.items()}, **(info or {})}
        self._models: dict = {}
        self.src_lang = self.tgt_lang = self._tgt_style = None
        codes = self.language_codes()
        defaults = next((pair for pair in LANGUAGE_DEFAULTS if set(pair) <= set(codes)), None)
        if defaults:
            self.set_languages(*defaults)
        # sources.Source: the layers offered are those of the deeper stack; `site_layers` says what each site has.
        cfg = self.model_cfg
        self.n_layers, self.n_heads = max(cfg.n_layers, cfg.n_dec_layers), cfg.n_heads
        self.d_model, self.d_head = cfg.d_model, cfg.d_head
        self.device = "cpu"
        self._hooks = {hook_name(site, layer, kind): (site, layer, kind) for site in STACKS
                       for layer in range(max(cfg.n_layers, cfg.n_dec_layers))
                       for kind in ("q", "k", "v", "z", "attn_out", "layer_out", "pattern")}

    def __repr__(self) -> str:
        return f"HFSource({self.path!r}, checkpoints={self.checkpoint_epochs()})"

    def checkpoint_epochs(self) -> list[int]:
        return sorted(self.refs)

    def check_epoch(self, epoch: int | None, param: str = "epoch") -> int:
        have = self.checkpoint_epochs()
        if epoch is None:
            return have[-1]
        if epoch not in have:
            raise QkvtraceError(f"{epoch}: {self.path} has no checkpoint {epoch}; checkpoints: "
                                f"{', '.join(map(str, have))}", param=param)
        return epoch

    def model(self, epoch: int | None = None, device="cpu"):
        epoch = self.check_epoch(epoch)
        key = (epoch, str(device))
        if key not in self._models:
            if self.weights:
                from qkvtrace import files

                files.verify(self.weights[epoch], self.checksums.get(epoch), "run.json",
                             "fine-tune the run again with {force}", mentions=("force=True",))
                self._models[key] = load_finetuned(self.refs[epoch], self.weights[epoch], device)
            else:
                self._models[key] = load_model(self.refs[epoch], device)
        return self._models[key]

    # --- text ---

    @property
    def start_id(self) -> int:
        return self.config.decoder_start_token_id if self.config.decoder_start_token_id is not None \
            else self.config.pad_token_id

    def encode_source(self, sentence: str, option: str = "sentence") -> list[int]:
        if not sentence.strip():
            raise QkvtraceError(f"{option} {sentence!r}: empty; give a sentence with at least one word")
        ids = self.tokenizer(sentence)["input_ids"]
        if len(ids) > self.model_cfg.max_len:
            raise QkvtraceError(f"{option} {sentence!r}: {len(ids)} pieces, the model holds at most "
                                f"{self.model_cfg.max_len}")
        return ids

    # --- languages of multilingual models ---

    def language_codes(self) -> list[str]:
        """The language codes the tokenizer knows (eng_Latn, en_XX, en, ...); empty for a model of one language
        pair (Marian, BART, T5)."""
        tk = self.tokenizer
        if not hasattr(tk, "src_lang"):
            return []
        tokens = [t for t in tk.all_special_tokens if t not in _NOT_LANGUAGES and not t.startswith("<")]
        return [t[2:-2] if t.startswith("__") and t.endswith("__") else t for t in tokens]  # M2M100: __de__

    def _language_id(self, code: str) -> int:
        tk = self.tokenizer
        return tk.get_lang_id(code) if hasattr(tk, "get_lang_id") else tk.convert_tokens_to_ids(code)

    def set_languages(self, src_lang: str | None = None, tgt_lang: str | None = None) -> None:
        """Read the source as `src_lang` and write the target as `tgt_lang` (codes of the tokenizer): the tokenizer
        marks sentences with them and `generate` starts its translation with the target's code."""
        codes = self.language_codes()
        for param, code in (("src_lang", src_lang), ("tgt_lang", tgt_lang)):
            if code is None:
                continue
            if not codes:
                raise QkvtraceError(f"{code}: {self.path} ({self.info['model']['class'] or self.config.model_type}) "
                                    "has no language codes; it translates the one language pair it was trained on",
                                    param=param)
            if code not in codes:
                from qkvtrace.errors import closest

                raise QkvtraceError(f"{code!r}: not a language code of this model; e.g. "
                                    f"{', '.join(closest(code, codes, 5))}", param=param)
        if src_lang is not None:
            self.tokenizer.src_lang = self.src_lang = src_lang
        if tgt_lang is not None:
            self.tokenizer.tgt_lang = self.tgt_lang = tgt_lang
        self._tgt_style = None
        if self.tgt_lang is not None:
            # Where the tokenizer puts the target's code: first (NLLB, mBART-50, M2M100: generate is forced to
            # begin with it) or last (mBART: the code is the decoder's start token).
            ids = self.tokenizer(text_target="a")["input_ids"]
            lang = self._language_id(self.tgt_lang)
            self._tgt_style = "first" if ids[0] == lang else "last" if ids[-1] == lang else None

    def _generate_options(self) -> dict:
        if self.tgt_lang is None or self._tgt_style is None:
            return {}
        lang = self._language_id(self.tgt_lang)
        return {"forced_bos_token_id": lang} if self._tgt_style == "first" else {"decoder_start_token_id": lang}

    def encode_target(self, sentence: str, option: str = "target") -> list[int]:
        """The decoder's full sequence: the start token, the target's pieces and </s>."""
        if not sentence.strip():
            raise QkvtraceError(f"{option} {sentence!r}: empty")
        ids = self.tokenizer(text_target=sentence)["input_ids"]
        # mBART's code ends the labels and starts the decoder's inputs (its shift_tokens_right).
        ids = [ids[-1]] + ids[:-1] if getattr(self, "_tgt_style", None) == "last" else [self.start_id] + ids
        if len(ids) > self.model_cfg.max_len:
            raise QkvtraceError(f"{option} {sentence!r}: {len(ids)} pieces, the model holds at most "
                                f"{self.model_cfg.max_len}")
        return ids

    def pieces(self, ids: Sequence[int]) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens(list(ids))

    def words(self, ids: Sequence[int], decoder: bool = False):
        """The words of a sequence of ids (see pieces.group_words); on the decoder side the start token reads `sos`
        and </s> `eos`, as the study named them."""
        from qkvtrace.pieces import Word, group_words

        # <unk> stands for characters the vocabulary lacks, inside a word: it does not split the word.
        special_ids = set(self.tokenizer.all_special_ids) - {self.tokenizer.unk_token_id}
        special = [i in special_ids for i in ids]
        if decoder and ids:
            special[0] = True  # the start token, whatever it is (pad for Marian and T5, </s> for BART)
        words = group_words(self.pieces(ids), special, self.tokenizer.convert_tokens_to_string)
        eos = self.tokenizer.eos_token_id
        out = []
        for w in words:
            if decoder and w.start == 0:
                w = Word("sos", w.start, w.end, w.pieces, True)
            elif w.special and ids[w.start] == eos:
                w = Word("eos", w.start, w.end, w.pieces, True)
            out.append(w)
        return out

    def vocabulary_words(self) -> list[str]:
        """Whole-word pieces of the vocabulary (those that start a word), markers removed, for suggestions."""
        from qkvtrace.pieces import WORD_START

        return sorted({p[1:] for p in self.tokenizer.get_vocab() if p.startswith(WORD_START) and len(p) > 1})

    def generate(self, src_ids: list[list[int]], epoch: int, beams: int = 1, device="cpu") -> list[list[int]]:
        """The model's own translations with `generate` (greedy unless beams > 1): per sentence the decoder's
        sequence, start token first, up to and including </s>."""
        import torch

        model = self.model(epoch, device)
        src, mask = pad_batch(src_ids, self.config.pad_token_id, device)
        with torch.no_grad():
            # A translation is rarely more than twice its source: an untrained model stops there, not at max_len.
            limit = min(self.model_cfg.max_len - 1, 2 * src.shape[1] + 10)
            out = model.generate(input_ids=src, attention_mask=mask, num_beams=beams, do_sample=False,
                                 max_new_tokens=limit, min_new_tokens=0, num_return_sequences=1,
                                 **self._generate_options())
        eos = self.tokenizer.eos_token_id
        seqs = []
        for row in out.tolist():
            body = row[1:]
            # Padding follows </s> in a finished row; before it, even a predicted <pad> is the model's own output.
            body = body[: body.index(eos) + 1] if eos in body else body
            seqs.append(row[:1] + body)  # the decoder's start token as generate used it
        return seqs

    def translate(self, sentences: list[str], epoch: int | None = None, device: str = "cpu",
                  beams: int = 1) -> list[HFTranslation]:
        """Translations of `sentences` by the checkpoint `epoch` (the newest by default) with `generate`."""
        if beams < 1:
            raise QkvtraceError(f"{beams}: expected a whole number of at least 1", param="beams")
        epoch = self.check_epoch(epoch)
        ids = [self.encode_source(s) for s in sentences]
        out = []
        unk = self.tokenizer.unk_token_id
        for s, src, seq in zip(sentences, ids, self.generate(ids, epoch, beams, device)):
            words = [w.text for w in self.words(seq, decoder=True)[1:]]
            words = ["<eos>" if w == "eos" else w for w in words]
            unknown = [w.text for w in self.words(src) if unk is not None and unk in src[w.start:w.end]]
            text = self.tokenizer.decode(seq[1:], skip_special_tokens=True)
            out.append(HFTranslation(s, words, list(dict.fromkeys(unknown)), epoch, text))
        return out


    # --- sources.Source ---

    def describe(self) -> dict:
        """Provenance for a table's manifest."""
        return {"run": str(self.path), "model": self.info["model"],
                "checkpoints": {str(e): r for e, r in self.refs.items()}, "corpus": None,
                "languages": {"src": self.src_lang, "tgt": self.tgt_lang} if self.tgt_lang else None,
                "transformers": _version("transformers")}

    def check_word(self, word: str, param: str = "words") -> None:
        """Any word can be spelled in pieces: whether it occurs is known only once the sentences are read."""

    def closest_words(self, word: str, n: int = 5) -> list[str]:
        from qkvtrace.errors import closest

        return closest(word, self.vocabulary_words(), n)

    def categories(self, sentences) -> list[str] | None:
        """The built-in corpus's category of each sentence's object word, when the sentences are the study's."""
        from qkvtrace.corpus import category_of

        cats = [category_of(s.src) or "" for s in sentences]
        return cats if any(cats) else None

    def unknown_words(self, prepared: _Prepared) -> dict[str, list[str]]:
        return prepared.unknown

    def prepare(self, sentences) -> list[_Prepared]:
        """Encode every sentence (and its target, if any); one the model cannot hold is a one-line error."""
        out = []
        unk = self.tokenizer.unk_token_id
        for i, s in enumerate(sentences):
            where = f"sentence {s.origin or i + 1}"
            src = self.encode_source(s.src, where)
            tgt = self.encode_target(s.tgt, f"target of {where}") if s.tgt else None
            unknown = {}
            for side, ids, decoder in (("source", src, False), ("target", tgt, True)):
                if ids is not None and unk is not None and unk in ids:
                    unknown[side] = list(dict.fromkeys(w.text for w in self.words(ids, decoder)
                                                       if unk in ids[w.start:w.end]))
            out.append(_Prepared(src, tgt, unknown))
        return out

    def hook(self, site: str, layer: int, kind: str) -> str:
        return hook_name(site, layer, kind)

    def site_layers(self, site: str) -> int:
        return self.model_cfg.site_layers(site)

    def forward(self, prepared, epoch: int, hooks, pool: str = "mean"):
        """Run one batch with the library's forward and hooks on its modules (`capture`), then give every side's
        vectors and patterns per unit: a word (its pieces pooled, see pieces.py) or, with pool none, a piece.

        Returns (sources.Tokens with the extra columns word, piece and piece_index, name -> tensor) where a tensor
        is (batch, unit, ...) as the own model's are (batch, pos, ...)."""
        import torch

        from qkvtrace.pieces import pool_units

        model = self.model(epoch, self.device)
        decoder = any(h.startswith("decoder.") for h in hooks)
        src_ids = [e.src for e in prepared]
        src, src_mask = pad_batch(src_ids, self.config.pad_token_id, self.device)
        tgt_full: list[list[int]] = []
        if decoder:
            todo = [j for j, e in enumerate(prepared) if e.tgt is None]
            made = dict(zip(todo, self.generate([src_ids[j] for j in todo], epoch, 1, self.device))) if todo else {}
            tgt_full = [e.tgt if e.tgt is not None else made[j] for j, e in enumerate(prepared)]
        with torch.no_grad(), capture(model, self.layout, self.model_cfg, [self._hooks[h] for h in hooks]) as cache:
            if decoder:
                tgt, tgt_mask = pad_batch([t[:-1] for t in tgt_full], self.config.pad_token_id, self.device)
                forward(model, src, src_mask, tgt, tgt_mask)
            else:
                model.get_encoder()(input_ids=src, attention_mask=src_mask)
        return pool_units(self, cache, {h: self._hooks[h][::2] for h in cache}, src_ids,
                          tgt_full if decoder else None, pool)


def pad_batch(seqs: list[list[int]], pad_id: int, device="cpu"):
    """Right-padded (batch, pos) ids and the mask (1 = a real piece, may be attended to)."""
    import torch

    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def load_finetuned(base: str, weights: Path, device="cpu"):
    """The architecture saved in `base` (a folder) with the weights of one of our checkpoints (finetune.py)."""
    import torch
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    from qkvtrace.finetune import load_state
    from qkvtrace.train import read_safetensors

    config = AutoConfig.from_pretrained(base, local_files_only=True)
    model = AutoModelForSeq2SeqLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    tensors, meta = read_safetensors(Path(weights))
    load_state(model, tensors, meta, Path(weights))
    check_layout(model, str(weights))
    return model.to(device).eval()


def is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / "run.json").is_file()


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------------------------------
# the sources.Source seam: sentences in, word-level tokens and captures out

@dataclass(frozen=True)
class _Prepared:
    src: list[int]                 # source ids as the tokenizer gives them (with its specials)
    tgt: list[int] | None          # the decoder's full sequence (start, pieces, </s>), or None: generate
    unknown: dict[str, list[str]]  # per side ("source", "target"), the words that contain <unk>


def _version(package: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


# ISO 639-1 -> 639-3 for NLLB's codes (eng_Latn): the languages corpora are most often keyed by.
_ISO3 = {"ar": "arb", "bg": "bul", "bn": "ben", "ca": "cat", "cs": "ces", "da": "dan", "de": "deu", "el": "ell",
         "en": "eng", "es": "spa", "et": "est", "fa": "pes", "fi": "fin", "fr": "fra", "he": "heb", "hi": "hin",
         "hr": "hrv", "hu": "hun", "id": "ind", "it": "ita", "ja": "jpn", "ko": "kor", "lt": "lit", "lv": "lvs",
         "nl": "nld", "no": "nob", "pl": "pol", "pt": "por", "ro": "ron", "ru": "rus", "sk": "slk", "sl": "slv",
         "sr": "srp", "sv": "swe", "sw": "swh", "th": "tha", "tr": "tur", "uk": "ukr", "ur": "urd", "vi": "vie",
         "zh": "zho"}


def model_language(key: str, codes: Sequence[str], param: str) -> str:
    """The language code of a multilingual model for a corpus language `key` (a file suffix or JSONL key): the key
    itself if it is one of `codes` (M2M100's en, or a corpus whose files are named by the code, train.eng_Latn),
    else the one code of that language: mBART's en_XX, NLLB's eng_Latn. None or several is one line."""
    if key in codes:
        return key
    found = [c for c in codes if c.split("_")[0] in (key, _ISO3.get(key))]
    if len(found) == 1:
        return found[0]
    if found:
        raise QkvtraceError(f"{key}: this model has several codes for it ({', '.join(found)}); name the corpus "
                            f"files by the one to train, e.g. train.{found[0]}", param=param)
    from qkvtrace.errors import closest

    raise QkvtraceError(f"{key}: no language code of this model matches it (e.g. {', '.join(closest(key, codes, 5))}); "
                        "name the corpus files by the model's code, e.g. train.CODE", param=param)


def finetuned_source(run_dir: Path) -> HFSource:
    """A fine-tuning run of our own (`qkvtrace train --init`): its architecture and tokenizer in `run_dir/base`,
    one safetensors checkpoint per kept epoch, each verified against the sha256 run.json records for it."""
    from qkvtrace import files

    run_dir = Path(run_dir)
    info = read_json(run_dir / "run.json")
    listed = info.get("checkpoints")
    if isinstance(listed, list):
        weights = {int(c["epoch"]): run_dir / c["file"] for c in listed}
        checksums = {int(c["epoch"]): c.get("sha256") for c in listed}
    else:  # written before checksums were recorded: the checkpoint files there are
        weights, checksums = {}, {}
        for f in (run_dir / "checkpoints").glob("epoch-*.safetensors"):
            try:
                weights[int(f.stem.split("-")[1])] = f
            except ValueError:
                continue
    if not weights:
        raise QkvtraceError(f"{run_dir}: has no checkpoints yet; train it first")
    for name, digest in (info.get("files") or {}).items():
        files.verify(run_dir / name, digest, "run.json", "fine-tune the run again with {force}",
                     mentions=("force=True",))
    weights = dict(sorted(weights.items()))
    source = HFSource([str(run_dir / "base")], weights=weights, name=str(run_dir), info={"run": info},
                      checksums=checksums)
    languages = (info.get("hf") or {}).get("languages")
    if languages:  # the codes it was fine-tuned with: its default direction
        source.set_languages(languages["src"], languages["tgt"])
    return source
