"""Running an experiment: train the model, or reuse a finished run with the same training configuration from the
run cache, then draw every figure and write the report:

    OUT/run/                   a copy of the run (config, vocabularies, metrics, checkpoints)
    OUT/vectors/<set>/         the vector table of each sentence set a scatter figure draws (extracted once)
    OUT/figures/               figures; similarity tables (CSV, Markdown, PNG) in figures/<figure>/
    OUT/verdicts.json          with [[verdicts]]: each claim's verdict, rule and numbers, per seed
    OUT/config.resolved.toml   the experiment with every default filled in (loadable as an experiment)
    OUT/report.md, index.html  everything above with captions, rendered from the same report objects

Each sentence set is extracted once, for everything its figures and verdicts ask for; figures are then drawn in
parallel worker processes (forked, so nothing is re-imported; QKVTRACE_WORKERS=1 draws in this process).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import numpy as np

from qkvtrace.errors import QkvtraceError
from qkvtrace.experiment.schema import (Experiment, Figure, ScatterFigure, SimilarityFigure, check_vocabulary,
                                        load_experiment)
from qkvtrace.experiment.writer import resolved_toml

T = TypeVar("T")

Say = Callable[[str], None]

# What an experiment's or the study's output folder holds; --force replaces only a folder of these.
OUTPUT_FILES = ("run", "vectors", "figures", "tables", "report.md", "index.html", "config.resolved.toml",
                "verdicts.json", "*.js", "*.css", ".*")


def _check_out(out: Path, force: bool, cache=None, trains: bool = True) -> None:
    """Everything about `out` (and the run cache, when something is trained) that can fail, checked before
    training: not after it."""
    from qkvtrace.files import check_writable
    from qkvtrace.train import run_cache

    check_writable(out, "--out")
    if trains:
        check_writable(run_cache(cache), "--cache", inside=True)
    if out.exists() and not out.is_dir():
        raise QkvtraceError(f"{out}: exists and is not a directory", param="out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise QkvtraceError(f"{out}: already exists; pass {{force}} to overwrite it (and retrain) or choose "
                            "another output folder", param="out", mentions=("force=True",))
    if force:
        from qkvtrace.files import check_replaceable

        check_replaceable(out, True, "--out", OUTPUT_FILES)  # before training, not after


def _train_lines(say: Say):
    def progress(e: dict) -> None:
        if e["event"] == "start":
            say(f"training: {e['pairs']} pairs, {e['steps']} steps/epoch, epochs {e['start_epoch']}..{e['epochs']}, "
                f"device {e['device']}")
        elif e["event"] == "epoch":
            say(f"  epoch {e['epoch']:3d}  train_loss {e['train_loss']:.4f}  val_loss {e['val_loss']:.4f}  "
                f"exact {e['val_exact_match']:.3f}  bleu {e['val_bleu']:.1f}  {e['seconds']:.1f}s")
    return progress


def _copy_run(run, dest: Path) -> None:
    """Copy the run's description, vocabularies, metrics and listed epoch checkpoints (not the resume state) to
    `dest`. Checkpoints are hard-linked where possible: files are only ever replaced, never changed in place."""
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "checkpoints").mkdir(parents=True)
    for name in ("run.json", "src_vocab.json", "tgt_vocab.json", "metrics.jsonl"):
        if (run.path / name).is_file():
            shutil.copy2(run.path / name, dest / name)
    for epoch in run.checkpoint_epochs():
        src = run.checkpoint_path(epoch)
        target = dest / src.relative_to(run.path)
        try:
            os.link(src, target)
        except OSError:
            shutil.copy2(src, target)


def run_experiment(path: Path | str, overrides: Sequence[str] = (), out: Path | str | None = None,
                   force: bool = False, progress: Say | None = None, cache: Path | str | None = None) -> Path:
    """Run the experiment file `path` end to end; returns the output directory (default outputs/<name>).

    The whole file is validated, the output directory checked and the requested words looked up in the corpus
    vocabulary before anything is trained. A finished run with the same training configuration in the run cache
    (`cache`, else $QKVTRACE_CACHE, else outputs/runs) is reused; `force` retrains it and allows writing over an
    existing output directory. `progress` receives one line per stage.
    """
    exp = load_experiment(path, overrides)
    out = Path(out) if out is not None else Path("outputs") / exp.name
    return run_loaded(exp, out, force, progress, cache, retrain=force)["out"]


def run_experiments(target: Path | str, overrides: Sequence[str] = (), out: Path | str | None = None,
                    force: bool = False, progress: Say | None = None,
                    cache: Path | str | None = None) -> list[Path]:
    """Run one experiment file, or every *.toml in a directory in name order (all validated first)."""
    target = Path(target)
    if target.is_dir():
        paths = sorted(target.glob("*.toml"))
        if not paths:
            raise QkvtraceError(f"{target}: no *.toml experiment files in this directory")
        if out is not None:
            raise QkvtraceError(f"{out}: not allowed with a directory of experiments; each writes "
                                "outputs/<name>/", param="out")
    elif not target.exists():
        raise QkvtraceError(f"{target}: no such file or directory")
    else:
        paths = [target]
    exps = [load_experiment(p, overrides) for p in paths]
    outs = [Path(out) if out is not None else Path("outputs") / e.name for e in exps]
    seen: dict[Path, Path] = {}
    for e, o in zip(exps, outs):
        if o in seen:
            raise QkvtraceError(f"{e.path}: writes {o} like {seen[o]}; give one of them another name")
        seen[o] = e.path
        _check_out(o, force, cache)
    fresh: set[str] = set()  # with --force, a run shared by several experiments is retrained once
    return [run_loaded(e, o, force, progress, cache, retrain=force, fresh=fresh)["out"] for e, o in zip(exps, outs)]


def _train(exp: Experiment, cache, retrain: bool, fresh: set[str], say: Say, train_progress=None):
    """The experiment's run from the cache, trained now if needed: (Run, reused, digest, seconds)."""
    from qkvtrace.corpus import load_corpus
    from qkvtrace.train import train_or_reuse, training_hash

    cfg = exp.train
    try:
        corpus = load_corpus(cfg.corpus, src_lang=cfg.src_lang, tgt_lang=cfg.tgt_lang, seed=cfg.seed,
                             val_fraction=cfg.val_fraction)
    except QkvtraceError as e:
        raise QkvtraceError(f"{exp.path} [corpus] spec = {cfg.corpus!r}: {e}") from None
    check_vocabulary(exp, corpus)
    digest = training_hash(exp.model, cfg, corpus)
    t0 = time.perf_counter()
    cached, reused = train_or_reuse(exp.model, cfg, cache, retrain=retrain and digest not in fresh,
                                    progress=train_progress or _train_lines(say))
    fresh.add(digest)
    seconds = time.perf_counter() - t0
    if reused:
        say(f"training (seed {cfg.seed}): reused {cached.path} (same corpus, model and train config; --force "
            "retrains)")
    else:
        say(f"training (seed {cfg.seed}): trained {cached.path} in {seconds:.1f}s")
    return cached, reused, digest, seconds


def run_loaded(exp: Experiment, out: Path, force: bool = False, progress: Say | None = None, cache=None,
               retrain: bool = False, fresh: set[str] | None = None, train_progress=None,
               more_seeds: dict | None = None) -> dict:
    """Run a loaded experiment into `out`: train or reuse, extract each sentence set once, decide the verdicts,
    draw the figures (in parallel), write the report. `more_seeds`: {seed: Experiment} whose verdicts are also
    decided (one cached run each; no figures) and compared with this one's.

    Returns {"out", "verdicts": {seed: [Verdict]}, "agreement", "reused"}.
    """
    from qkvtrace.files import publish_dir

    say = progress or (lambda line: None)
    t_start = time.perf_counter()
    _check_out(out, force, cache, trains=exp.source is None)
    fresh = set() if fresh is None else fresh
    say(f"{exp.name}: {exp.path} -> {out}")
    if exp.source is not None:
        say(f"{exp.name}: model {exp.source} ([model] source; nothing is trained)")
        cached, reused, digest, train_seconds, others = None, True, "", 0.0, {}
    else:
        if not exp.corpus_given:
            say(f"{exp.name}: {exp.path} has no [corpus] table: using the built-in corpus")
        cached, reused, digest, train_seconds = _train(exp, cache, retrain, fresh, say, train_progress)
        others = {s: _train(e, cache, retrain, fresh, say, train_progress) for s, e in (more_seeds or {}).items()}

    # Everything below is written into a staging folder that replaces `out` in one step (files.py).
    with publish_dir(out, force=force, expected=OUTPUT_FILES) as stage:
        result = _write_outputs(exp, stage, cached, reused, digest, train_seconds, others, more_seeds, say)
    say(f"{exp.name}: wrote {out / 'index.html'} in {time.perf_counter() - t_start:.1f}s")
    return dict(result, out=out)


def _write_outputs(exp: Experiment, out: Path, cached, reused: bool, digest: str, train_seconds: float, others: dict,
                   more_seeds: dict | None, say: Say) -> dict:
    from qkvtrace.files import atomic_write_json, atomic_write_text
    from qkvtrace.report import Report, write_report
    from qkvtrace.sources import open_source
    from qkvtrace.train import Run

    if exp.source is not None:
        run = open_source(exp.source, src_lang=exp.languages[0], tgt_lang=exp.languages[1])
    else:
        _copy_run(cached, out / "run")
        run = Run(out / "run")
    data = Data(run, exp)
    for fig in exp.figures:
        if isinstance(fig, ScatterFigure):
            data.want(fig.sentences, **_selection(fig))

    want_verdicts(exp, data)   # before the first table(): each sentence set is extracted once, for both
    t0 = time.perf_counter()
    figures = [_prepare(fig, exp, data, out) for fig in exp.figures]
    for set_name in sorted({f.sentences for f in exp.figures if isinstance(f, ScatterFigure)}):
        for suffix, table in data.full_tables(set_name):
            table.save(out / "vectors" / (set_name + suffix))
    jobs = [job for _, fig_jobs in figures for job in fig_jobs]

    def verdicts() -> dict[int, list]:
        by_seed: dict[int, list] = {}
        if exp.verdicts:
            t1 = time.perf_counter()
            by_seed[exp.train.seed] = decide(exp, data)
            for s, (c, *_rest) in others.items():
                seed_data = Data(Run(c.path), more_seeds[s])
                want_verdicts(more_seeds[s], seed_data)
                by_seed[s] = decide(more_seeds[s], seed_data)
            say(f"verdicts: {len(by_seed[exp.train.seed])} claims x {len(by_seed)} seed(s), "
                f"{time.perf_counter() - t1:.1f}s")
        return by_seed

    by_seed = draw_all(jobs, meanwhile=verdicts)
    say(f"figures: {len(exp.figures)} drawn in {time.perf_counter() - t0:.1f}s")

    sections = []
    if by_seed:
        from qkvtrace.study import verdicts_json

        atomic_write_json(out / "verdicts.json", dict(verdicts_json(by_seed), not_applicable=[
            {"claim": c, "reason": r} for c, r in exp.not_applicable]))
        sections.append(_verdict_section(by_seed, exp.not_applicable))
    sections += [_model_section(exp, run) if exp.source is not None else
                 _training_section(exp, run, reused, digest, cached.path, train_seconds),
                 _translation_section(exp, data)]
    sections += [section for section, _ in figures]
    comment = (f"Resolved from {exp.path}" + (f" with --set {' '.join(exp.overrides)}" if exp.overrides else "")
               + (f"\nmodel {exp.source}" if exp.source is not None else
                  f"\ntraining hash {digest} (run {cached.path})"))
    atomic_write_text(out / "config.resolved.toml", resolved_toml(exp, comment))
    sections.append(_files_section(out, bool(by_seed), exp.source is None))
    write_report(out, Report(f"qkvtrace experiment: {exp.name}", sections, _intro(exp, reused)))
    from qkvtrace.study import agreement

    return {"out": out, "verdicts": by_seed, "agreement": agreement(by_seed) if by_seed else [], "reused": reused}


def want_verdicts(exp: Experiment, data: "Data") -> None:
    """Register the vectors every [[verdicts]] entry of `exp` needs with `data`."""
    from qkvtrace.study import VERDICTS

    for e in exp.verdicts:
        for sel in VERDICTS[e.type].needs(e, data.n_layers):
            data.want(e.sentences, **sel)


def decide(exp: Experiment, data: "Data") -> list:
    """Every [[verdicts]] entry of `exp` decided on `data` (one run, its needs registered with `want_verdicts`),
    in file order."""
    from qkvtrace.study import VERDICTS

    return [v for e in exp.verdicts for v in VERDICTS[e.type].decide(data, e)]


# ----------------------------------------------------------------------------------------------------------------
# vectors of each sentence set, extracted once

class Data:
    """The vectors, similarity tables and translations of an experiment's sentence sets on one run, each computed
    once. Every selection asked of a set is registered first (`want`); the first `table()` of the set extracts the
    union of all of them, and each request is a row filter of that one table."""

    def __init__(self, run, exp: Experiment):
        self.run, self.exp = run, exp
        self.last = exp.train.checkpoints[-1]
        self.n_layers = run.model_cfg.n_layers
        self.seed = exp.train.seed
        self._wanted: dict[tuple, list[dict]] = {}
        self._tables: dict[tuple, object] = {}      # (set, label, specials, heads) -> the union's table
        self._selection: dict[tuple, dict] = {}     # the same key -> the union selection it was extracted with
        self._memo: dict[tuple, object] = {}

    def _norm(self, kinds, sites, layers=None, epochs=None, words=None) -> dict:
        epochs = (tuple(self.exp.train.checkpoints) if epochs in (None, "all") else
                  (self.last,) if epochs == "last" else tuple(epochs))
        return dict(sites=tuple(sites), kinds=tuple(kinds), epochs=epochs,
                    layers=tuple(range(self.n_layers)) if layers is None else tuple(layers),
                    words=None if words is None else tuple(w.lower() for w in words))

    def want(self, set_name: str, sites, kinds, layers=None, epochs=None, words=None, label=None,
             specials: bool = False, heads=("concat",)) -> None:
        """Register a selection that will be asked of `set_name` (before its first `table`)."""
        from qkvtrace.extract import DEFAULT_LABEL

        key = (set_name, label or DEFAULT_LABEL, specials, tuple(heads))
        self._wanted.setdefault(key, []).append(self._norm(kinds, sites, layers, epochs, words))

    def table(self, set_name: str, sites, kinds, layers=None, epochs=None, words=None, label=None,
              specials: bool = False, heads=("concat",)):
        """The rows of `set_name`'s vectors matching the selection (a VectorTable)."""
        from qkvtrace.extract import DEFAULT_LABEL

        key = (set_name, label or DEFAULT_LABEL, specials, tuple(heads))
        sel = self._norm(kinds, sites, layers, epochs, words)
        if key not in self._tables:
            wanted = self._wanted.get(key, []) + [sel]
            union = {f: tuple(dict.fromkeys(v for s in wanted for v in s[f])) for f in ("sites", "kinds", "epochs",
                                                                                          "layers")}
            union["words"] = (None if any(s["words"] is None for s in wanted)
                              else tuple(dict.fromkeys(w for s in wanted for w in s["words"])))
            self._tables[key], self._selection[key] = self._extract(key, union), union
        full = self._tables[key]
        if not _covers(self._selection[key], sel):   # asked for without `want` first: its own extraction
            memo = ("table",) + key + tuple(sel.items())
            if memo not in self._memo:
                self._memo[memo] = self._extract(key, sel)
            full = self._memo[memo]
        m = full.meta
        mask = (np.isin(m["site"].astype(str), sel["sites"]) & np.isin(m["kind"].astype(str), sel["kinds"])
                & np.isin(m["epoch"], sel["epochs"]) & np.isin(m["layer"], sel["layers"]))
        if sel["words"] is not None:
            # As extraction matches them: without case, a subword piece by its word.
            names = np.char.lower(m.get("word", m["token"]).astype(str))
            mask &= np.isin(names, sel["words"]) | np.isin(np.char.lower(m["transition"].astype(str)), sel["words"])
        return full.rows(mask)

    def _extract(self, key, sel: dict):
        from qkvtrace.extract import extract

        set_name, label, specials, heads = key
        items = self.exp.sentences[set_name]
        return extract(self.run, [(s.src, s.tgt) if s.tgt else s.src for s in items],
                       words=list(sel["words"]) if sel["words"] else None, epochs=list(sel["epochs"]),
                       sites=list(sel["sites"]), kinds=list(sel["kinds"]), layers=list(sel["layers"]),
                       heads=list(heads), label=label, specials=specials, patterns=False)

    def full_tables(self, set_name: str):
        """(suffix, table) of every extraction made of `set_name` (suffix "" for the default label)."""
        for i, table in enumerate(t for k, t in self._tables.items() if k[0] == set_name):
            yield ("" if i == 0 else f"-{i + 1}"), table

    def similarity(self, set_name: str, kind: str, site: str, layer: int, epoch: int):
        """The cosine table between the set's two sentences at one epoch (memoized)."""
        a, b = self.exp.sentences[set_name]
        return self.similarity_tables(a, b, kind, site, layer, (epoch,), "concat")[0]

    def similarity_tables(self, a, b, kind: str, site: str, layer: int, epochs, head: str):
        from qkvtrace.compare import similarity

        memo = ("similarity", a, b, kind, site, layer, tuple(epochs), head)
        if memo not in self._memo:
            targets = [a.tgt, b.tgt] if (a.tgt or b.tgt) else None
            self._memo[memo] = similarity(self.run, a.src, b.src, kind=kind, site=site, layer=layer,
                                          epochs=list(epochs), head=head, targets=targets)
        return self._memo[memo]

    def translate(self, set_name: str, epoch: int, limit: int | None = None) -> list[str]:
        """Greedy translations of the set's sentences (the first `limit`) at `epoch` (memoized)."""
        items = self.exp.sentences[set_name][:limit]
        memo = ("translate", set_name, epoch, len(items))
        if memo not in self._memo:
            self._memo[memo] = [t.text for t in self.run.translate([s.src for s in items], epoch)]
        return self._memo[memo]


def _covers(union: dict, sel: dict) -> bool:
    if any(not set(sel[f]) <= set(union[f]) for f in ("sites", "kinds", "epochs", "layers")):
        return False
    return union["words"] is None or (sel["words"] is not None and set(sel["words"]) <= set(union["words"]))


# ----------------------------------------------------------------------------------------------------------------
# drawing in parallel

_JOBS: list = []


def _one_thread():
    """torch and the BLAS libraries on one thread each, for this process's lifetime or until `_threads` restores
    them. With a figure worker on every core, pools of threads that spin while they wait oversubscribe the cores:
    the study's verdicts took 3.4-4.3 s beside the workers with torch's 2 threads, 1.1-1.3 s with 1."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    return threadpool_limits(1)


def _threads(count: int, blas) -> None:
    """Undo `_one_thread` in the reverse order: restoring threadpoolctl's limits after torch's would set OpenMP
    back to the 1 thread it recorded, and the next training would split its sums differently (other bits)."""
    import torch

    blas.restore_original_limits()
    torch.set_num_threads(count)


def _draw_one(i: int) -> int:
    from qkvtrace import files

    files.fault_scope(f"figure-{i}")  # fault points named by job, whichever worker runs it
    _JOBS[i]()
    return i


def draw_all(jobs: list[Callable[[], object]], meanwhile: Callable[[], T] = lambda: None) -> T:
    """Run drawing jobs (closures that write one figure file each) in forked worker processes, one per CPU;
    matplotlib drawing is CPU-bound Python, so threads would not help. `meanwhile` runs in this process while the
    workers draw (the verdicts: their numbers need no figure and no figure needs them); its result is returned.
    Serial with QKVTRACE_WORKERS=1, one job, or no fork (Windows)."""
    global _JOBS
    import multiprocessing

    workers = min(len(jobs), int(os.environ.get("QKVTRACE_WORKERS") or os.cpu_count() or 1))
    if workers < 2 or "fork" not in multiprocessing.get_all_start_methods():
        result = meanwhile()
        for job in jobs:
            job()
        return result
    from concurrent.futures import ProcessPoolExecutor

    import gc

    _JOBS = jobs  # forked workers inherit the list; only indices cross the pipe
    # Objects inherited through fork are frozen out of the workers' garbage collection: finalising a copy of the
    # parent's objects there (a tokenizer's native handle, a thread pool) can abort the worker.
    gc.collect()
    gc.freeze()
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                 initializer=_one_thread) as pool:
            drawn = pool.map(_draw_one, range(len(jobs)))   # every worker is forked here, before `meanwhile`
            import torch

            threads, blas = torch.get_num_threads(), _one_thread()
            try:
                result = meanwhile()
            finally:
                _threads(threads, blas)
            for _ in drawn:
                pass
        return result
    finally:
        gc.unfreeze()
        _JOBS = []


# ----------------------------------------------------------------------------------------------------------------
# figures and report sections

def _prepare(fig: Figure, exp: Experiment, data: Data, out: Path):
    """(report Section, drawing jobs): the data are computed here (torch, in this process); the jobs only draw and
    write files."""
    from qkvtrace.report import Figure as FigureBlock, FileLink, Paragraph, Section, similarity_table

    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    blocks: list = []
    if fig.caption and not isinstance(fig, ScatterFigure):
        blocks.append(Paragraph(fig.caption))
    if isinstance(fig, ScatterFigure):
        table = data.table(fig.sentences, **_selection(fig))
        # The interactive page is always written next to the static files, from the same projection, and linked
        # beside each static figure.
        formats = list(fig.format) + ([] if "html" in fig.format else ["html"])
        paths = [figures / f"{fig.name}.{fmt}" for fmt in formats]
        html = paths[formats.index("html")]
        static = [p for p in paths if p != html]
        caption = _scatter_caption(fig, exp, len(table))
        blocks += [FigureBlock(p, caption if i == 0 else f"{p.suffix[1:].upper()} version of the figure above",
                               interactive=html) for i, p in enumerate(static)] or [FigureBlock(html, caption)]
        return Section(f"{fig.name} ({fig.type})", blocks), [_scatter_job(table, paths, fig)]
    if isinstance(fig, SimilarityFigure):
        from qkvtrace.compare import write_similarity

        tables = data.similarity_tables(fig.a, fig.b, fig.kind, fig.site, fig.layer,
                                        fig.epochs or exp.train.checkpoints, fig.head)
        blocks.append(Paragraph(
            f"Cosine similarity of {fig.kind} at {fig.site} layer {fig.layer} between every token of \"{fig.a.src}\" "
            f"(rows) and of \"{fig.b.src}\" (columns); decoder tokens are named by their transition (sos->wir). One "
            "table per epoch, then the change between consecutive epochs."))
        for t in tables:
            blocks.append(FigureBlock(figures / fig.name / f"{t.stem}.png",
                                      f"{t.title}: rows \"{t.sentence_a}\", columns \"{t.sentence_b}\""))
            blocks.append(similarity_table(t))
            blocks.append(FileLink(figures / fig.name / f"{t.stem}.csv", f"{t.stem}.csv"))
        return Section(f"{fig.name} ({fig.type})", blocks), [lambda: write_similarity(tables, figures / fig.name)]
    from qkvtrace.compare import attention

    jobs = []
    for j, s in enumerate(fig.items):
        pats = attention(data.run, s.src, epochs=list(fig.epochs or exp.train.checkpoints), site=fig.site,
                         layer=fig.layer, target=s.tgt)
        stem = fig.name if len(fig.items) == 1 else f"{fig.name}-{j + 1}"
        # As for scatters, an interactive page (hover a cell) is written beside the static files and linked there.
        formats = list(fig.format) + ([] if "html" in fig.format else ["html"])
        paths = [figures / f"{stem}.{fmt}" for fmt in formats]
        jobs += [lambda pats=pats, path=path: pats.save(path, plotlyjs="directory") for path in paths]
        html = paths[formats.index("html")]
        static = [p for p in paths if p != html]
        caption = (f"Attention weights at {fig.site} layer {fig.layer} for \"{s.src}\" "
                   f"({'target ' + repr(s.tgt) if s.tgt else 'decoder fed the newest checkpoint’s translation'}): "
                   f"one row per epoch ({', '.join(map(str, pats.epochs))}), one column per head; rows are "
                   f"queries ({' '.join(pats.query_tokens)}), columns keys ({' '.join(pats.key_tokens)}).")
        blocks += [FigureBlock(p, caption if i == 0 else f"{p.suffix[1:].upper()} version of the figure above",
                               interactive=html) for i, p in enumerate(static)] or [FigureBlock(html, caption)]
    return Section(f"{fig.name} ({fig.type})", blocks), jobs


def _selection(fig: ScatterFigure) -> dict:
    o = fig.extract
    return dict(sites=o.sites, kinds=o.kinds, layers=o.layers, epochs=o.epochs, words=o.words, label=o.label,
                specials=o.specials, heads=o.heads)


def _scatter_job(table, paths: list[Path], fig: ScatterFigure):
    def job():
        from qkvtrace.plot import plot_table

        o = fig.extract
        plot_table(table, paths, method=fig.method, dims=fig.dims, color_by=fig.color_by, label=o.label,
                   label_mode=fig.label_mode, trajectories=fig.trajectories, frame=fig.frame, facet=fig.facet,
                   seed=fig.seed, plotlyjs="directory")
    return job


def _scatter_caption(fig: ScatterFigure, exp: Experiment, n_points: int) -> str:
    o = fig.extract
    sents = exp.sentences[fig.sentences]
    words = ", ".join(o.words) if o.words else "every token"
    heads = "" if o.heads == ("concat",) else f", heads {', '.join(o.heads)}"
    method = {"pca": "PCA", "umap": "UMAP", "tsne": "t-SNE"}[fig.method]
    text = (f"{', '.join(o.kinds)} vectors of {words} in {len(sents)} sentence(s) "
            f"({'; '.join(repr(s.src) for s in sents[:5])}{' …' if len(sents) > 5 else ''}) at "
            f"{', '.join(o.sites)} layer {', '.join(map(str, o.layers))}{heads}, epochs "
            f"{', '.join(map(str, o.epochs))}: {n_points} points projected with {method} to {fig.dims}-D in a "
            f"{fig.frame} frame; colour = {fig.color_by}, marker = kind"
            + ("; arrows join each vector across epochs" if fig.trajectories else "")
            + (f"; one panel per {fig.facet}" if fig.facet else "") + ".")
    return (fig.caption.rstrip(".") + ". " + text) if fig.caption else text


def _intro(exp: Experiment, reused: bool) -> list:
    from qkvtrace.report import Code, Paragraph

    blocks = [Paragraph(" ".join(exp.description.split()))] if exp.description.strip() else []
    sets = [" with ", Code("--set " + " ".join(exp.overrides))] if exp.overrides else []
    if exp.source is not None:
        blocks.append(Paragraph(["Experiment ", Code(str(exp.path)), *sets, "; model ", Code(exp.source),
                                 " (nothing trained; [corpus] and [train] are not used)."]))
        return blocks
    corpus = [f"; corpus ", Code(exp.train.corpus)]
    if not exp.corpus_given:
        corpus.append(" (the file has no [corpus] table, so the built-in corpus was used)")
    blocks.append(Paragraph(["Experiment ", Code(str(exp.path)), *sets, *corpus,
                             f"; run {'reused' if reused else 'trained'}."]))
    return blocks


def _verdict_section(by_seed: dict, not_applicable=()):
    from qkvtrace.report import Paragraph, Section, Strong, Table
    from qkvtrace.study import agreement

    seeds = list(by_seed)
    first = by_seed[seeds[0]]
    blocks = [Paragraph("Each claim of the study, decided by the numbers and the stated rule"
                        + (f" (seed {seeds[0]})." if len(seeds) == 1 else f" (seed {seeds[0]}; every seed below)."))]
    blocks.append(Table(["", "claim", "verdict", "evidence", "rule"],
                        [[v.key, v.claim, Strong(v.verdict), v.evidence, v.rule] for v in first]))
    if len(seeds) > 1:
        rows = [[a["key"], a["claim"]] + [Strong(a["verdicts"][s]) for s in seeds] + ["yes" if a["agree"] else "no"]
                for a in agreement(by_seed)]
        agree = sum(r[-1] == "yes" for r in rows)
        blocks.append(Table(["", "claim"] + [f"seed {s}" for s in seeds] + ["agree"], rows,
                            caption=f"Verdicts per seed (one model trained per seed): {agree} of {len(rows)} "
                                    "claims agree across seeds"))
        for s in seeds[1:]:
            blocks.append(Table(["", "verdict", "evidence"], [[v.key, Strong(v.verdict), v.evidence]
                                                               for v in by_seed[s]], caption=f"Evidence, seed {s}"))
    if not_applicable:
        blocks.append(Table(["claim", "why it does not apply"], [list(x) for x in not_applicable],
                            caption="Claims that do not apply to this model"))
    return Section("Verdicts", blocks)


def _training_section(exp: Experiment, run, reused: bool, digest: str, cache_path: Path, seconds: float):
    from qkvtrace.report import Bullets, Code, FileLink, Paragraph, Section, Table
    from qkvtrace.train import read_metrics

    info = run.info
    corpus = info.get("corpus", {})
    sizes = ", ".join(f"{k} {v}" for k, v in corpus.get("sizes", {}).items())
    how = "reused from " if reused else "trained into "
    m = exp.model
    t = exp.train
    metrics = [r for r in read_metrics(run.path) if r["epoch"] in t.checkpoints]
    return Section("Training", [
        Paragraph([f"Run {how}", Code(str(cache_path)), ("" if reused else f" in {seconds:.1f} s")
                   + " (training hash ", Code(digest[:12]), "; a copy is in ", Code("run/"), ")."]),
        Bullets([[f"corpus ", Code(str(corpus.get("name"))), f" ({sizes}; vocabulary {info['vocab']['src']} "
                  f"source, {info['vocab']['tgt']} target tokens)"],
                 f"model d_model {m.d_model}, n_layers {m.n_layers}, n_heads {m.n_heads}, d_ff {m.d_ff}, "
                 f"dropout {m.dropout}",
                 f"{t.epochs} epochs, checkpoints {', '.join(map(str, t.checkpoints))}, seed {t.seed}, "
                 f"batch_size {t.batch_size}, lr {t.lr}"]),
        Table(["epoch", "train_loss", "val_loss", "val_token_acc", "val_exact_match", "val_bleu"],
              [[r["epoch"], r["train_loss"], r["val_loss"], r["val_token_acc"], r["val_exact_match"], r["val_bleu"]]
               for r in metrics], caption="Metrics at the checkpoints",
              number_format=["{}", "{:.4f}", "{:.4f}", "{:.3f}", "{:.3f}", "{:.1f}"]),
        FileLink(Path("run/metrics.jsonl"), "Metrics of every epoch (JSON lines)")])


TRANSLATED = 12  # sentences of a set shown in the translation table


def _translation_section(exp: Experiment, data: Data):
    from qkvtrace.report import Code, Paragraph, Section, Table

    epochs = exp.train.checkpoints
    blocks: list = [Paragraph("Greedy translations of every sentence set at each checkpoint. Where a target is "
                              "given it is teacher-forced in the figures instead.")]
    for name, sents in exp.sentences.items():
        by_epoch = {e: data.translate(name, e, TRANSLATED) for e in epochs}
        rows = [[s.src, s.tgt or ""] + [Code(_shorten(by_epoch[e][i].split())) for e in epochs]
                for i, s in enumerate(sents[:TRANSLATED])]
        more = f" (the first {TRANSLATED} of {len(sents)})" if len(sents) > TRANSLATED else ""
        blocks.append(Table(["sentence", "given target"] + [f"epoch {e}" for e in epochs], rows,
                            caption=f"Sentence set {name!r}{more}"))
    return Section("Translations", blocks)


def _shorten(tokens: list[str], limit: int = 16) -> str:
    """A translation for a table cell: an untrained model babbles up to max_len tokens."""
    return " ".join(tokens[:limit]) + (f" … (+{len(tokens) - limit})" if len(tokens) > limit else "")


def _model_section(exp: Experiment, source):
    """What the model read through [model] source is (instead of the training section)."""
    from qkvtrace.report import Bullets, Code, Section

    info = getattr(source, "info", {}).get("model", {})
    m = exp.model
    return Section("Model", [Bullets([
        ["source ", Code(exp.source), f" ({info.get('class') or info.get('family') or 'a run of our own'})"],
        f"d_model {m.d_model}, n_layers {m.n_layers}, n_heads {m.n_heads}"
        + (f", positions {info['positions']}, {info['norm']}-norm" if "positions" in info else ""),
        f"checkpoints {', '.join(map(str, exp.train.checkpoints))}"])])


def _files_section(out: Path, verdicts: bool, trained: bool = True):
    from qkvtrace.report import FileLink, Section

    blocks = [FileLink(Path("config.resolved.toml"),
                       "The experiment with every default filled in (runs again with qkvtrace run)")]
    if trained:
        blocks.append(FileLink(Path("run/run.json"), "The training run: run.json, vocabularies, metrics, checkpoints"))
    if verdicts:
        blocks.append(FileLink(Path("verdicts.json"), "Every verdict with its rule and numbers, per seed"))
    for d in sorted((out / "vectors").glob("*/manifest.json")):
        blocks.append(FileLink(d.relative_to(out), f"Vector table of sentence set {d.parent.name} (meta.csv, X.npy, "
                                                   "manifest.json)"))
    return Section("Files", blocks)
