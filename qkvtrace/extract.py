"""Capture and extraction: temporary hooks on the model (`capture`) and `extract()` -> VectorTable.

For each checkpoint epoch, each sentence, each attention site (encoder.self, decoder.self, decoder.cross), layer and
head, the exact vectors the model computed: q, k, v, z (softmax(QKᵀ/√d_head + mask)·V before out_proj; alias x1),
attn_out (after out_proj; alias x4) and layer_out (the layer's output). The decoder runs on a given target
(teacher forcing) or on the model's own greedy translation at that epoch, as the study did.

Rows: queries (q, z, attn_out) and layer_out live at the query side's positions; k and v at the key side's, which for
cross-attention is the source. Large extractions stream to disk in chunks bounded by `max_memory_mb`.
"""

from __future__ import annotations

import json
import logging
import os
import string
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from qkvtrace.errors import QkvtraceError, closest
from qkvtrace.files import atomic_write_json, prepare_out_dir
from qkvtrace.table import COLUMNS, VectorTable, write_meta_csv, write_patterns
from qkvtrace.vocab import EOS_ID, PAD_ID, SOS_ID, tokenize

SITES = ("encoder.self", "decoder.self", "decoder.cross")
KINDS = ("q", "k", "v", "z", "attn_out", "layer_out")
ALIASES = {"x1": "z", "x4": "attn_out"}
# Which side's positions a kind's rows belong to, per site: (query side, key side).
SIDES = {"encoder.self": ("src", "src"), "decoder.self": ("tgt", "tgt"), "decoder.cross": ("tgt", "src")}
KEY_KINDS = ("k", "v")
HEADED_KINDS = ("q", "k", "v", "z")
DEFAULT_LABEL = "{word}@{kind}@{epoch}"
log = logging.getLogger("qkvtrace")


@contextmanager
def capture(model: torch.nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Attach forward hooks to the hook points `names`; yield a dict name -> the last output seen there.

    The hooks keep references (no copies) and are removed on exit, also when an error interrupts the block.
    """
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise QkvtraceError(f"unknown hook {unknown[0]!r}; hooks are e.g. {', '.join(closest(unknown[0], modules, 3))}")
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


@dataclass(frozen=True)
class Sentence:
    """A source sentence, an optional target to teacher-force, and where it came from (for error messages)."""
    src: str
    tgt: str | None = None
    origin: str = ""


def read_sentences(path: Path | str) -> list[Sentence]:
    """One source sentence a line, optionally `source<TAB>target`; empty files and empty lines are errors."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")  # an editor's byte-order mark would read as an <unk> word
    except FileNotFoundError:
        raise QkvtraceError(f"--sentences {path}: no such file") from None
    except UnicodeDecodeError:
        raise QkvtraceError(f"--sentences {path}: not UTF-8 text") from None
    except OSError as e:
        raise QkvtraceError(f"--sentences {path}: cannot read ({e.strerror})") from None
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()  # a trailing blank line is the usual end of a file, not an empty sentence
    if not lines:
        raise QkvtraceError(f"--sentences {path}: the file is empty; write one sentence a line")
    out = []
    for i, line in enumerate(lines, 1):
        if line.count("\t") > 1:
            raise QkvtraceError(f"{path}:{i}: {line.count(chr(9)) + 1} tab-separated columns; write source or "
                                "source<TAB>target")
        src, _, tgt = line.partition("\t")
        if not tokenize(src):
            raise QkvtraceError(f"{path}:{i}: empty sentence; write one sentence a line (source<TAB>target optional)")
        if "\t" in line and not tokenize(tgt):
            raise QkvtraceError(f"{path}:{i}: empty target after the tab; remove the tab or write the target")
        out.append(Sentence(src.strip(), tgt.strip() if tgt.strip() else None, f"{path}:{i}"))
    return out


def as_sentences(sentences) -> list[Sentence]:
    """Accept Sentence objects, plain strings, or (src, tgt) tuples; one string alone is one sentence."""
    if isinstance(sentences, (str, Sentence)):
        sentences = [sentences]  # not one sentence per character
    out = []
    for s in sentences:
        if isinstance(s, Sentence):
            out.append(s)
        elif isinstance(s, str):
            out.append(Sentence(s))
        else:
            src, tgt = s
            out.append(Sentence(src, tgt))
    if not out:
        raise QkvtraceError("no sentences given; pass -s SENTENCE or --sentences FILE")
    return out


def parse_selection(value, valid: Sequence, option: str, aliases: dict | None = None) -> list:
    """'q,k,v', a list or one number (layers=0) -> validated list; unknown entries are a one-line error listing the
    valid ones."""
    if isinstance(value, (int, np.integer)):
        value = [value]
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v) for v in value]
    items = [v for v in items if v]
    allowed = [str(v) for v in valid] + list(aliases or {})
    for v in items:
        if v not in allowed:
            raise QkvtraceError(f"{option} {v!r}: unknown; valid: {', '.join(allowed)}")
    if not items:
        raise QkvtraceError(f"{option}: empty; valid: {', '.join(allowed)}")
    return items


LABEL_FIELDS = ("word", "token", "kind", "epoch", "site", "layer", "head", "position", "sentence_id", "transition")


# A value of each field's type (text or whole number), to try a template on before any row is built.
LABEL_SAMPLE = {"word": "eat", "token": "eat", "kind": "q", "epoch": 1, "site": "encoder.self", "layer": 0,
                "head": "concat", "position": 1, "sentence_id": 0, "transition": "sos->wir"}


def check_label(label: str, option: str = "--label") -> str:
    """`label` if it formats with the row fields (LABEL_FIELDS), else a one-line error naming what is wrong.

    {epoch}, {layer}, {position} and {sentence_id} are whole numbers; the other fields are text.
    """
    try:
        # Plain field names only: {word.upper} or {0} would format, but into no useful label.
        for _, name, _, _ in string.Formatter().parse(label):
            if name is not None and name not in LABEL_FIELDS:
                raise QkvtraceError(f"{option} {label!r}: unknown field {name!r}; fields: {', '.join(LABEL_FIELDS)}")
        label.format(**LABEL_SAMPLE)
    except (IndexError, ValueError, AttributeError, TypeError, KeyError) as e:
        raise QkvtraceError(f"{option} {label!r}: not a usable template ({e}); write fields by name, e.g. "
                            f"{DEFAULT_LABEL}; fields: {', '.join(LABEL_FIELDS)}") from None
    return label


def _layers(value, n_layers: int) -> list[int]:
    if value is None or value == "all":
        return list(range(n_layers))
    items = parse_selection(value, range(n_layers), "--layers")
    return [int(v) for v in items]


def _heads(value, n_heads: int) -> list[str]:
    """'concat' | 'all' | '0,3' | 'concat,0' -> head labels ('concat' or '0', '1', ...)."""
    if value is None:
        return ["concat"]
    items = parse_selection(value, ["concat", "all", *range(n_heads)], "--heads")
    out = []
    for v in items:
        for h in ([str(i) for i in range(n_heads)] if v == "all" else [v]):
            if h not in out:
                out.append(h)
    return out


def _strip(token: str) -> str:
    return token[1:-1] if token.startswith("<") and token.endswith(">") else token


class _Sink:
    """Collects rows in memory, or streams them to `out` in chunks of at most `max_bytes`.

    Streaming writes hidden partial files (`.meta.csv.partial`, `.X.raw`, `.patterns.jsonl.partial`) and moves them
    into place only in `finish`, so a failed extraction into an existing directory (--force) leaves the table that
    was there whole, and a finished one never shares the directory with a previous table's leftovers.
    """

    PARTIAL = {"meta.csv": ".meta.csv.partial", "patterns.jsonl": ".patterns.jsonl.partial", "X.npy": ".X.raw"}

    def __init__(self, out: Path | None, dim_max: int, dtype: str, max_bytes: int):
        self.out, self.dim_max, self.dtype, self.max_bytes = out, dim_max, np.dtype(dtype), max_bytes
        self.meta: dict[str, list] = {}
        self.blocks: list[np.ndarray] = []
        self.patterns: list[dict] = []
        self.n_rows = 0
        self.buffered = 0
        self.wrote_header = False
        if out is not None:
            for name in self.PARTIAL.values():  # left by an extraction that was killed
                (out / name).unlink(missing_ok=True)
            self.raw = open(out / self.PARTIAL["X.npy"], "wb")

    def add(self, meta: dict[str, np.ndarray], X: np.ndarray) -> None:
        block = np.zeros((X.shape[0], self.dim_max), dtype=self.dtype)
        block[:, : X.shape[1]] = X
        for k, v in meta.items():
            self.meta.setdefault(k, []).append(v)
        self.blocks.append(block)
        self.n_rows += X.shape[0]
        self.buffered += block.nbytes
        if self.out is not None and self.buffered >= self.max_bytes:
            self.flush()

    def _columns(self) -> dict[str, np.ndarray]:
        return {k: np.concatenate(v) for k, v in self.meta.items()}

    def flush(self) -> None:
        if self.blocks:
            write_meta_csv(self.out / self.PARTIAL["meta.csv"], self._columns(), append=self.wrote_header)
            self.wrote_header = True
            for b in self.blocks:
                self.raw.write(b.tobytes())
        if self.patterns:
            write_patterns(self.out / self.PARTIAL["patterns.jsonl"], self.patterns, append=True)
        self.meta, self.blocks, self.patterns, self.buffered = {}, [], [], 0

    def discard(self) -> None:
        """Remove what streaming wrote so far (the extraction failed); files already in `out` stay as they were."""
        if self.out is not None:
            self.raw.close()
            for name in self.PARTIAL.values():
                (self.out / name).unlink(missing_ok=True)

    def finish(self, manifest: dict, load: bool = True) -> VectorTable | None:
        if self.out is None:
            X = np.concatenate(self.blocks) if self.blocks else np.zeros((0, self.dim_max), self.dtype)
            return VectorTable(self._columns(), X, manifest, self.patterns)
        self.flush()
        self.raw.close()
        # X.npy = a .npy header for the final shape + the raw rows, copied in chunks: memory stays bounded.
        header_path = self.out / ".X.npy.tmp"
        raw_path = self.out / self.PARTIAL["X.npy"]
        with open(header_path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                     "fortran_order": False, "shape": (self.n_rows, self.dim_max)})
            with open(raw_path, "rb") as raw:
                while chunk := raw.read(1 << 24):
                    f.write(chunk)
        raw_path.unlink()
        os.replace(header_path, self.out / "X.npy")
        os.replace(self.out / self.PARTIAL["meta.csv"], self.out / "meta.csv")
        # A previous table's patterns or projector files (--force) would not match the new rows.
        stale = ["vectors.tsv", "metadata.tsv"]
        if (self.out / self.PARTIAL["patterns.jsonl"]).exists():
            os.replace(self.out / self.PARTIAL["patterns.jsonl"], self.out / "patterns.jsonl")
        else:
            stale.append("patterns.jsonl")
        for name in stale:
            (self.out / name).unlink(missing_ok=True)
        atomic_write_json(self.out / "manifest.json", dict(manifest, n_rows=self.n_rows, dim_max=self.dim_max,
                                                          dtype=self.dtype.name))
        return VectorTable.load(self.out) if load else None


def extract(run, sentences, words: Sequence[str] | str | None = None, epochs: Sequence[int] | None = None,
            sites: Sequence[str] | str = SITES, kinds: Sequence[str] | str = KINDS, layers="all", heads="concat",
            label: str = DEFAULT_LABEL, out: Path | str | None = None, force: bool = False, dtype: str = "float32",
            specials: bool = False, patterns: bool = True, batch_size: int = 64, max_memory_mb: float = 256,
            device: str = "cpu", progress: Callable[[dict], None] | None = None, load: bool = True,
            format: str = "native") -> VectorTable | None:
    """Extract the vectors of `words` in `sentences` at each checkpoint `epoch` of `run` into a VectorTable.

    Parameters
    ----------
    run : Run or path of a run directory.
    sentences : list of str, (src, tgt) tuples or Sentence; a target is teacher-forced, else greedy decoding.
    words : tokens to keep, on either side (all occurrences); None keeps every token.
    epochs : checkpoint epoch(s); None = all that exist.
    sites, kinds, layers, heads : what to capture; kinds accept the study's aliases x1 (z) and x4 (attn_out), and
        rows are labelled with the name given. Each is a comma-separated string, a list, or (layers, heads) one
        number. heads: "concat" (d_model wide), "all" or "0,3" (d_head wide);
        they apply to q, k, v, z; attn_out and layer_out have no heads and are always d_model wide.
    label : row label template; fields {word} (token, or transition on the decoder side), {token}, {kind},
        {epoch}, {site}, {layer}, {head}, {position}, {sentence_id}, {transition}.
    out : directory to stream the table to (meta.csv, X.npy, manifest.json, patterns.jsonl); None = in memory.
        Nothing in it changes unless the extraction succeeds.
    dtype : "float32" or "float16" for X.
    specials : keep the source side's <sos>/<eos> rows (the decoder's <sos> input is always kept).
    load : with `out`, read the written table back (metadata in memory, X memory-mapped); False returns None so
        that memory stays bounded by `batch_size` and `max_memory_mb` however large the extraction.
    format : "native", or "projector" to also write vectors.tsv + metadata.tsv into `out` (the selection must
        give one vector width).

    Returns
    -------
    VectorTable with one row per vector; X has shape (n_rows, dim_max).
    """
    from qkvtrace.train import Run, pad, versions

    run = run if isinstance(run, Run) else Run(run)
    sents = as_sentences(sentences)
    cfg = run.model_cfg
    if isinstance(epochs, (int, np.integer)):
        epochs = [epochs]
    epochs = _unique([run.check_epoch(e, "--epochs") for e in epochs]) if epochs else run.checkpoint_epochs()
    if not epochs:
        raise QkvtraceError(f"{run.path}: has no checkpoints yet; train it first")
    site_list = _unique(parse_selection(sites, SITES, "--sites"))
    kind_list = _unique(parse_selection(kinds, KINDS, "--kinds", ALIASES))
    layer_list = _unique(_layers(layers, cfg.n_layers))
    head_list = _heads(heads, cfg.n_heads)
    if dtype not in ("float32", "float16"):
        raise QkvtraceError(f"--dtype {dtype!r}: expected float32 or float16")
    if not max_memory_mb > 0:
        raise QkvtraceError(f"--max-memory {max_memory_mb}: expected a positive number of MB, e.g. 256")
    if format not in ("native", "projector"):
        raise QkvtraceError(f"--format {format!r}: expected native or projector")
    if format == "projector" and out is None:
        raise QkvtraceError("--format projector: needs --out DIR to write vectors.tsv and metadata.tsv into")
    check_label(label)
    word_set = _check_words(run, words)
    src_ids = [run.encode_source(s.src, f"sentence {s.origin or i + 1}") for i, s in enumerate(sents)]
    forced = [_encode_target(run, s, i) if s.tgt else None for i, s in enumerate(sents)]
    categories = _categories(run, sents)

    widths = {cfg.d_model if (h == "concat" or ALIASES.get(k, k) not in HEADED_KINDS) else cfg.d_head
              for k in kind_list for h in head_list}
    if format == "projector" and len(widths) > 1:
        raise QkvtraceError(
            f"--format projector: the Embedding Projector takes one vector width, but --heads {','.join(head_list)} "
            f"with --kinds {','.join(kind_list)} gives widths {', '.join(map(str, sorted(widths)))}; use "
            "--heads concat, or single heads with --kinds among q,k,v,z")
    dim_max = max(widths)
    out_dir, created = None, False
    if out is not None:
        created = not Path(out).exists()
        out_dir = prepare_out_dir(out, force)
    # Notes only once the input is known to be good: a bad input gets its one error line alone.
    _note_unknown(run, sents)
    if any(h != "concat" for h in head_list) and any(ALIASES.get(k, k) not in HEADED_KINDS for k in kind_list):
        log.warning("--heads %s applies to q, k, v, z; attn_out and layer_out have no heads and are kept d_model "
                    "wide (head=concat)", ",".join(head_list))
    sink = _Sink(out_dir, dim_max, dtype, int(max_memory_mb * 2**20))
    hooks = _hook_names(site_list, kind_list, layer_list, patterns)

    total = len(epochs) * ((len(sents) + batch_size - 1) // batch_size)
    done = 0
    seen: dict[str, set[str]] = {"src": set(), "tgt": set()}
    try:
        for epoch in epochs:
            model = run.model(epoch, device)
            for start in range(0, len(sents), batch_size):
                idx = list(range(start, min(start + batch_size, len(sents))))
                src = pad([src_ids[i] for i in idx], device)
                # Decoder input: <sos> + target (forced), or <sos> + the model's greedy output at this epoch.
                # Encoder sites alone need no decoder input beyond <sos>: greedy decoding is skipped then.
                decode = any(forced[i] is None for i in idx) and set(site_list) != {"encoder.self"}
                greedy = model.greedy(src) if decode else None
                tgt_full = [forced[i] if forced[i] is not None else [SOS_ID] + (greedy[j] if decode else [])
                            for j, i in enumerate(idx)]
                # The last input is the one that predicts <eos>: "essen->eos", as the study labelled it.
                tgt_in = pad([t[:-1] if t[-1] == EOS_ID else t for t in tgt_full], device)
                with torch.no_grad(), capture(model, hooks) as cache:
                    logits = model(src, tgt_in)
                # (batch, tgt_pos): the token after each decoder input, which names its transition `wir->wollen`:
                # the greedy output (= the model's prediction) or the forced target; argmax past a target's end.
                nxt = logits.argmax(-1).cpu()
                for j, t in enumerate(tgt_full):
                    n = min(len(t) - 1, nxt.shape[1])
                    nxt[j, :n] = torch.tensor(t[1: n + 1])
                for side, found in _rows(sink, run, cache, epoch, idx, sents, categories, src.cpu(), tgt_in.cpu(),
                                         nxt, site_list, kind_list, layer_list, head_list, word_set, specials, label,
                                         patterns).items():
                    seen[side] |= found
                done += 1
                if progress:
                    progress({"event": "batch", "done": done, "total": total, "epoch": epoch})
        if word_set is not None:
            _check_found(word_set, seen, site_list, kind_list)
        if sink.n_rows == 0:
            raise QkvtraceError("nothing to extract: the selection matched no token")
        manifest = {"format": "qkvtrace-vectors/1", "run": str(run.path), "epochs": epochs, "sites": site_list,
                    "kinds": kind_list, "layers": layer_list, "heads": head_list, "words": sorted(word_set or []),
                    "label": label, "sentences": [{"src": s.src, "tgt": s.tgt} for s in sents],
                    "model": dict(run.info["model"]), "corpus": run.info.get("corpus", {}).get("name"),
                    "versions": versions()}
        table = sink.finish(manifest, load or format == "projector")
    except BaseException:
        sink.discard()
        if created and out_dir is not None and not any(out_dir.iterdir()):
            out_dir.rmdir()  # leave no empty directory behind for a failed first extraction
        raise
    if format == "projector":
        write_projector(table, out_dir)
    return table if load else None


def _unique(items: list) -> list:
    """`items` without repeats, in order: `--epochs 1,1` or `--kinds q,q` must not duplicate rows."""
    return list(dict.fromkeys(items))


def _encode_target(run, s: Sentence, i: int) -> list[int]:
    """The teacher-forced target's ids with <sos>/<eos>; one that the model cannot hold is a one-line error."""
    ids = run.tgt_vocab.encode(s.tgt)
    if len(ids) > run.model_cfg.max_len:
        shown = s.tgt if len(s.tgt) <= 60 else s.tgt[:57] + "..."
        raise QkvtraceError(f"target of sentence {s.origin or i + 1} {shown!r}: {len(ids)} tokens with <sos>/<eos>, "
                            f"the model holds at most {run.model_cfg.max_len}; shorten it")
    return ids


def _note_unknown(run, sents: list[Sentence]) -> None:
    """Say which words the model reads as <unk>: their rows carry the token `<unk>`, not the word typed."""
    for i, s in enumerate(sents):
        for side, text, vocab in (("source", s.src, run.src_vocab), ("target", s.tgt, run.tgt_vocab)):
            unknown = [t for t in tokenize(text or "") if t not in vocab]
            if unknown:
                log.warning("sentence %s: not in the %s vocabulary, read as <unk>: %s", s.origin or i + 1, side,
                            ", ".join(dict.fromkeys(unknown)))


def _check_found(word_set: set[str], seen: dict[str, set[str]], sites, kinds) -> None:
    """Every word in --words must give rows: it occurs in a sentence, on a side the selected sites and kinds reach."""
    missing = sorted(w for w in word_set if not any(w in found for found in seen.values()))
    if missing:
        raise QkvtraceError(f"--words {','.join(missing)}: occurs in none of the given sentences")
    reached = {SIDES[site][1 if ALIASES.get(k, k) in KEY_KINDS else 0] for site in sites for k in kinds}
    for side in ("src", "tgt"):
        unreached = sorted(w for w in word_set if w in seen[side] and not any(w in seen[r] for r in reached))
        if unreached:
            where = ("encoder.self, or k, v of decoder.cross" if side == "src"
                     else "decoder.self, or q, z, attn_out, layer_out of decoder.cross")
            raise QkvtraceError(
                f"--words {','.join(unreached)}: occurs only on the {'source' if side == 'src' else 'target'} side, "
                f"which --sites {','.join(sites)} with --kinds {','.join(kinds)} does not capture; that side's "
                f"vectors come from {where}")


def _check_words(run, words) -> set[str] | None:
    if words is None:
        return None
    items = [w.strip().lower() for w in (words.split(",") if isinstance(words, str) else words) if w.strip()]
    if not items:
        raise QkvtraceError("--words: empty; name words like eat,apple or leave the option out for every token")
    for w in items:
        if "->" in w:
            continue  # a decoder transition such as sos->wir
        if w not in run.src_vocab and w not in run.tgt_vocab:
            near = closest(w, dict.fromkeys(run.src_vocab.itos[4:] + run.tgt_vocab.itos[4:]), 5)  # once each
            raise QkvtraceError(f"--words {w!r}: not in the vocabulary; closest: {', '.join(near)}")
    return set(items)


def _categories(run, sents: list[Sentence]) -> list[str] | None:
    if run.info.get("corpus", {}).get("name") != "builtin":
        return None
    from qkvtrace.corpus import category_of

    cats = [category_of(s.src) or "" for s in sents]
    return cats if any(cats) else None


def _hook_names(sites, kinds, layers, patterns: bool) -> list[str]:
    names = []
    for site in sites:
        stack, attn = {"encoder.self": ("encoder", "self_attn"), "decoder.self": ("decoder", "self_attn"),
                       "decoder.cross": ("decoder", "cross_attn")}[site]
        for layer in layers:
            for kind in kinds:
                kind = ALIASES.get(kind, kind)
                names.append(f"{stack}.layers.{layer}.hook_out" if kind == "layer_out"
                             else f"{stack}.layers.{layer}.{attn}.hook_{kind}")
            if patterns:
                names.append(f"{stack}.layers.{layer}.{attn}.hook_pattern")
    return list(dict.fromkeys(names))


def _side_arrays(run, ids: torch.Tensor, next_ids: torch.Tensor | None, idx, side: str, specials: bool):
    """Per-side positions to keep: (batch_rows, positions, tokens, transitions) as flat arrays."""
    vocab = run.src_vocab if side == "src" else run.tgt_vocab
    itos = np.array(vocab.itos, dtype=object)
    ids_np = ids.numpy()
    keep = ids_np != PAD_ID
    if side == "src" and not specials:
        keep &= ids_np >= 4  # drop <sos>/<eos> (ids 1, 2); <unk> (3) stays, it is a real word
        keep |= (ids_np == 3)
    b, p = np.nonzero(keep)
    tokens = itos[ids_np[b, p]]
    if next_ids is None:
        transitions = np.full(len(b), "", dtype=object)
    else:
        nxt = itos[next_ids.numpy()[b, p]]
        transitions = np.array([f"{_strip(a)}->{_strip(c)}" for a, c in zip(tokens, nxt)], dtype=object)
    return b, p, tokens, transitions


def _labels(label: str, block: dict, words, tokens, positions, sentence_ids, transitions) -> np.ndarray:
    """The label of each row of one block (one kind, epoch, site, layer, head), as object array (n,).

    The block's fields are formatted into the template once; when only a plain {word} is left (the default
    "{word}@{kind}@{epoch}"), labels are joined as strings instead of formatted one by one, which cost more than
    the forward pass at the study's size.
    """
    template = ""
    for literal, name, spec, conversion in string.Formatter().parse(label):
        template += literal.replace("{", "{{").replace("}", "}}")
        if name is None:
            continue
        if name in block:
            value = block[name]
            value = {"r": repr, "s": str, "a": ascii}[conversion](value) if conversion else value
            template += format(value, spec).replace("{", "{{").replace("}", "}}")
        else:
            template += "{" + name + ("!" + conversion if conversion else "") + (":" + spec if spec else "") + "}"
    parts = template.split("{word}")
    if len(parts) == 2 and not any("{" in part.replace("{{", "").replace("}}", "") for part in parts):
        before, after = (part.replace("{{", "{").replace("}}", "}") for part in parts)
        return np.array([before + w + after for w in words], dtype=object)
    return np.array([template.format(word=w, token=tk, position=pp, sentence_id=sid, transition=tr)
                     for w, tk, pp, sid, tr in zip(words, tokens, positions, sentence_ids, transitions)], dtype=object)


def _rows(sink, run, cache, epoch, idx, sents, categories, src, tgt_in, next_ids, sites, kinds, layers, heads,
          word_set, specials, label, patterns):
    sides = {"src": _side_arrays(run, src, None, idx, "src", specials),
             "tgt": _side_arrays(run, tgt_in, next_ids, idx, "tgt", specials)}
    found: dict[str, set[str]] = {"src": set(), "tgt": set()}  # side -> the words of word_set it holds
    if word_set is not None:
        wanted = list(word_set)
        for side, (b, p, tok, tr) in list(sides.items()):
            m = np.isin(tok, wanted) | np.isin(tr, wanted)
            sides[side] = (b[m], p[m], tok[m], tr[m])
            found[side] = (set(tok[m].tolist()) | set(tr[m].tolist())) & word_set
    sent_ids = np.array(idx)
    texts = np.array([sents[i].src for i in idx], dtype=object)
    for site in sites:
        stack, attn = ("encoder", "self_attn") if site == "encoder.self" else (
            ("decoder", "self_attn") if site == "decoder.self" else ("decoder", "cross_attn"))
        q_side, k_side = SIDES[site]
        for layer in layers:
            for kind_name in kinds:
                kind = ALIASES.get(kind_name, kind_name)
                side = k_side if kind in KEY_KINDS else q_side
                b, p, tok, tr = sides[side]
                if len(b) == 0:
                    continue
                hook = (f"{stack}.layers.{layer}.hook_out" if kind == "layer_out"
                        else f"{stack}.layers.{layer}.{attn}.hook_{kind}")
                t = cache[hook].cpu().numpy()  # zero-copy; numpy fancy indexing is far cheaper than torch's
                for head in (heads if kind in HEADED_KINDS else ["concat"]):
                    if kind in HEADED_KINDS:
                        v = t[b, p]  # (n, head, d_head)
                        X = v.reshape(len(b), -1) if head == "concat" else v[:, int(head)]
                    else:
                        X = t[b, p]  # (n, d_model)
                    words = np.where(tr != "", tr, tok) if side == "tgt" else tok
                    meta = {"epoch": np.full(len(b), epoch), "sentence_id": sent_ids[b], "sentence": texts[b],
                            "side": np.full(len(b), side, dtype=object), "position": p, "token": tok,
                            "transition": tr, "site": np.full(len(b), site, dtype=object),
                            "layer": np.full(len(b), layer), "head": np.full(len(b), head, dtype=object),
                            "kind": np.full(len(b), kind_name, dtype=object),
                            "label": _labels(label, dict(kind=kind_name, epoch=epoch, site=site, layer=layer,
                                                         head=head), words, tok, p, sent_ids[b], tr),
                            "dim": np.full(len(b), X.shape[1])}
                    if categories is not None:
                        meta["category"] = np.array([categories[i] for i in sent_ids[b]], dtype=object)
                    sink.add(meta, X)
            if patterns:
                pat = cache[f"{stack}.layers.{layer}.{attn}.hook_pattern"].cpu()  # (batch, head, query_pos, key_pos)
                q_ids = src if q_side == "src" else tgt_in
                k_ids = src if k_side == "src" else tgt_in
                qv = run.src_vocab if q_side == "src" else run.tgt_vocab
                kv = run.src_vocab if k_side == "src" else run.tgt_vocab
                for j, i in enumerate(idx):
                    nq = int((q_ids[j] != PAD_ID).sum())
                    nk = int((k_ids[j] != PAD_ID).sum())
                    q_tokens = qv.decode(q_ids[j, :nq].tolist())
                    if q_side == "tgt":
                        q_tokens = [f"{_strip(a)}->{_strip(c)}" for a, c in
                                    zip(q_tokens, run.tgt_vocab.decode(next_ids[j, :nq].tolist()))]
                    sink.patterns.append({"epoch": epoch, "sentence_id": i, "sentence": sents[i].src, "site": site,
                                          "layer": layer, "query_tokens": q_tokens,
                                          "key_tokens": kv.decode(k_ids[j, :nk].tolist()),
                                          "pattern": pat[j, :, :nq, :nk].numpy()})
    return found


def write_projector(table: VectorTable, out: Path | str) -> tuple[Path, Path]:
    """vectors.tsv + metadata.tsv (header row) for the TensorBoard Embedding Projector; one vector width only."""
    from qkvtrace.files import atomic_write_text

    out = Path(out)
    X = table.vectors()
    atomic_write_text(out / "vectors.tsv", "".join("\t".join(f"{v:.6g}" for v in row) + "\n" for row in X))
    cols = [c for c in table.columns if c != "dim"]

    def cell(value) -> str:  # a tab or line break inside a value would shift the projector's columns or rows
        return " ".join(str(value).replace("\t", " ").splitlines())

    lines = ["\t".join(cols)] + ["\t".join(cell(table.meta[c][i]) for c in cols) for i in range(len(table))]
    atomic_write_text(out / "metadata.tsv", "\n".join(lines) + "\n")
    return out / "vectors.tsv", out / "metadata.tsv"
