"""Running an experiment: train the model, or reuse a finished run with the same training configuration from the
run cache, then draw every figure and write the report:

    OUT/run/                   a copy of the run (config, vocabularies, metrics, checkpoints)
    OUT/vectors/<figure>/      the vector table behind each scatter figure
    OUT/figures/               figures; similarity tables (CSV, Markdown, PNG) in figures/<figure>/
    OUT/config.resolved.toml   the experiment with every default filled in (loadable as an experiment)
    OUT/report.md, index.html  everything above with captions
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

from qkvtrace.errors import QkvtraceError
from qkvtrace.experiment.schema import (AttentionFigure, Experiment, Figure, ScatterFigure, SimilarityFigure,
                                        check_vocabulary, load_experiment)
from qkvtrace.experiment.writer import resolved_toml

Say = Callable[[str], None]

def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise QkvtraceError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise QkvtraceError(f"--out {out}: already exists; pass --force to overwrite it (and retrain) or choose "
                            "another --out")


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
    """Copy the run's description, vocabularies, metrics and epoch checkpoints (not the resume state) to `dest`."""
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "checkpoints").mkdir(parents=True)
    for name in ("run.json", "src_vocab.json", "tgt_vocab.json", "metrics.jsonl"):
        if (run.path / name).is_file():
            shutil.copy2(run.path / name, dest / name)
    for f in (run.path / "checkpoints").glob("epoch-*.safetensors"):
        shutil.copy2(f, dest / "checkpoints" / f.name)


def run_experiment(path: Path | str, overrides: Sequence[str] = (), out: Path | str | None = None,
                   force: bool = False, progress: Say | None = None, cache: Path | str | None = None) -> Path:
    """Run the experiment file `path` end to end; returns the output directory (default outputs/<name>).

    The whole file is validated, the output directory checked and the requested words looked up in the corpus
    vocabulary before anything is trained. A finished run with the same training configuration in the run cache
    (`cache`, else $QKVTRACE_CACHE, else outputs/runs) is reused; `force` retrains it and allows writing over an existing output directory. `progress` receives one
    line per stage.
    """
    exp = load_experiment(path, overrides)
    return _run(exp, Path(out) if out is not None else Path("outputs") / exp.name, force, progress, cache)


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
            raise QkvtraceError(f"--out {out}: not allowed with a directory of experiments; each writes "
                                "outputs/<name>/")
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
        _check_out(o, force)
    fresh: set[str] = set()  # with --force, a run shared by several experiments is retrained once
    return [_run(e, o, force, progress, cache, fresh) for e, o in zip(exps, outs)]


def _run(exp: Experiment, out: Path, force: bool, progress: Say | None, cache: Path | str | None,
         fresh: set[str] | None = None) -> Path:
    from qkvtrace.corpus import load_corpus
    from qkvtrace.files import atomic_write_text, prepare_out_dir
    from qkvtrace.train import Run, train_or_reuse, training_hash

    say = progress or (lambda line: None)
    t_start = time.perf_counter()
    _check_out(out, force)
    cfg = exp.train
    try:
        corpus = load_corpus(cfg.corpus, src_lang=cfg.src_lang, tgt_lang=cfg.tgt_lang, seed=cfg.seed,
                             val_fraction=cfg.val_fraction)
    except QkvtraceError as e:
        raise QkvtraceError(f"{exp.path} [corpus] spec = {cfg.corpus!r}: {e}") from None
    check_vocabulary(exp, corpus)
    digest = training_hash(exp.model, cfg, corpus)
    say(f"{exp.name}: {exp.path} -> {out}")
    if not exp.corpus_given:
        say(f"{exp.name}: {exp.path} has no [corpus] table: using the built-in corpus")
    t0 = time.perf_counter()
    fresh = set() if fresh is None else fresh
    cached, reused = train_or_reuse(exp.model, cfg, cache, retrain=force and digest not in fresh,
                                    progress=_train_lines(say))
    fresh.add(digest)
    train_seconds = time.perf_counter() - t0
    if reused:
        say(f"training: reused {cached.path} (same corpus, model and train config; --force retrains)")
    else:
        say(f"training: trained {cached.path} in {train_seconds:.1f}s")

    out = prepare_out_dir(out, force)
    _copy_run(cached, out / "run")
    run = Run(out / "run")
    sections = [_training_section(exp, run, reused, digest, cached.path, train_seconds),
                _translation_section(exp, run)]
    figure_items: list = []
    for n, fig in enumerate(exp.figures, 1):
        t0 = time.perf_counter()
        items = _draw(fig, exp, run, out)
        say(f"figure {n}/{len(exp.figures)} {fig.name} ({fig.type}): {len(items)} item(s), "
            f"{time.perf_counter() - t0:.1f}s")
        figure_items.append((fig, items))
    for fig, items in figure_items:
        sections.append(_section_for(fig, items))

    comment = (f"Resolved from {exp.path}" + (f" with --set {' '.join(exp.overrides)}" if exp.overrides else "")
               + f"\ntraining hash {digest} (run {cached.path})")
    atomic_write_text(out / "config.resolved.toml", resolved_toml(exp, comment))
    sections.append(_files_section(out))
    from qkvtrace.report import write_report

    intro = exp.description + ("\n\n" if exp.description else "") + (
        f"Experiment `{exp.path}`" + (f" with `--set {' '.join(exp.overrides)}`" if exp.overrides else "")
        + f"; corpus `{cfg.corpus}`" + ("" if exp.corpus_given else " (the file has no [corpus] table, so the "
                                        "built-in corpus was used)") + f"; run {'reused' if reused else 'trained'}.")
    write_report(out, f"qkvtrace experiment: {exp.name}", sections, intro)
    say(f"{exp.name}: wrote {out / 'index.html'} in {time.perf_counter() - t_start:.1f}s")
    return out


# ----------------------------------------------------------------------------------------------------------------
# figures and report sections

def _epochs(run, epochs) -> list[int]:
    return list(epochs) if epochs else run.checkpoint_epochs()


def _draw(fig: Figure, exp: Experiment, run, out: Path) -> list:
    from qkvtrace.report import Item

    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    if isinstance(fig, ScatterFigure):
        from qkvtrace.extract import extract
        from qkvtrace.plot import plot_table

        o = fig.extract
        items = exp.sentences[fig.sentences]
        table = extract(run, [(s.src, s.tgt) if s.tgt else s.src for s in items], words=list(o.words) if o.words
                        else None, epochs=_epochs(run, o.epochs), sites=list(o.sites), kinds=list(o.kinds),
                        layers=list(o.layers) if o.layers is not None else "all", heads=list(o.heads),
                        label=o.label, out=out / "vectors" / fig.name, force=True, specials=o.specials)
        caption = _scatter_caption(fig, exp, run, len(table))
        # The interactive page is always written next to the static files, from the same projection.
        formats = list(fig.format) + ([] if "html" in fig.format else ["html"])
        paths = plot_table(table, [figures / f"{fig.name}.{fmt}" for fmt in formats], method=fig.method,
                           dims=fig.dims, color_by=fig.color_by, label=o.label, label_mode=fig.label_mode,
                           trajectories=fig.trajectories, frame=fig.frame, facet=fig.facet, seed=fig.seed,
                           plotlyjs="directory")
        return [Item(caption if i == 0 else "Interactive version of the figure above (hover, legend, epoch slider)"
                     if fmt == "html" else f"{fmt.upper()} version of the figure above", path)
                for i, (fmt, path) in enumerate(zip(formats, paths))]
    if isinstance(fig, SimilarityFigure):
        from qkvtrace.compare import similarity, write_similarity

        targets = [fig.a.tgt, fig.b.tgt] if (fig.a.tgt or fig.b.tgt) else None
        tables = similarity(run, fig.a.src, fig.b.src, kind=fig.kind, site=fig.site, layer=fig.layer,
                            epochs=_epochs(run, fig.epochs), head=fig.head, targets=targets)
        write_similarity(tables, figures / fig.name)
        items = []
        for t in tables:
            rel = f"figures/{fig.name}/{t.stem}"
            items.append(Item(f"{t.title}: rows \"{t.sentence_a}\", columns \"{t.sentence_b}\"",
                              figures / fig.name / f"{t.stem}.png", t.markdown() + f"\n[{t.stem}.csv]({rel}.csv)\n"))
        return items
    from qkvtrace.compare import attention

    items = []
    for j, s in enumerate(fig.items):
        pats = attention(run, s.src, epochs=_epochs(run, fig.epochs), site=fig.site, layer=fig.layer, target=s.tgt)
        stem = fig.name if len(fig.items) == 1 else f"{fig.name}-{j + 1}"
        for i, fmt in enumerate(fig.format):
            path = pats.save(figures / f"{stem}.{fmt}", plotlyjs="directory")
            caption = (f"Attention weights at {fig.site} layer {fig.layer} for \"{s.src}\" "
                       f"({'target ' + repr(s.tgt) if s.tgt else 'decoder fed the newest checkpoint’s translation'}): "
                       f"one row per epoch ({', '.join(map(str, pats.epochs))}), one column per head; rows are "
                       f"queries ({' '.join(pats.query_tokens)}), columns keys ({' '.join(pats.key_tokens)}).")
            items.append(Item(caption if i == 0 else f"{fmt.upper()} version of the figure above", path))
    return items


def _scatter_caption(fig: ScatterFigure, exp: Experiment, run, n_points: int) -> str:
    o = fig.extract
    sents = exp.sentences[fig.sentences]
    words = ", ".join(o.words) if o.words else "every token"
    layers = ", ".join(map(str, o.layers if o.layers is not None else range(run.model_cfg.n_layers)))
    heads = "" if o.heads == ("concat",) else f", heads {', '.join(o.heads)}"
    method = {"pca": "PCA", "umap": "UMAP", "tsne": "t-SNE"}[fig.method]
    text = (f"{', '.join(o.kinds)} vectors of {words} in {len(sents)} sentence(s) "
            f"({'; '.join(repr(s.src) for s in sents[:5])}{' …' if len(sents) > 5 else ''}) at "
            f"{', '.join(o.sites)} layer {layers}{heads}, epochs {', '.join(map(str, _epochs(run, o.epochs)))}: "
            f"{n_points} points projected with {method} to {fig.dims}-D in a {fig.frame} frame; colour = "
            f"{fig.color_by}, marker = kind"
            + ("; arrows join each vector across epochs" if fig.trajectories else "")
            + (f"; one panel per {fig.facet}" if fig.facet else "") + ".")
    return (fig.caption.rstrip(".") + ". " + text) if fig.caption else text


def _section_for(fig: Figure, items: list):
    from qkvtrace.report import Section

    text = fig.caption if fig.caption and not isinstance(fig, ScatterFigure) else ""
    if isinstance(fig, SimilarityFigure):
        text = (text + "\n\n" if text else "") + (
            f"Cosine similarity of `{fig.kind}` at {fig.site} layer {fig.layer} between every token of "
            f"\"{fig.a.src}\" (rows) and of \"{fig.b.src}\" (columns); decoder tokens are named by their transition "
            "(`sos->wir`). One table per epoch, then the change between consecutive epochs.")
    return Section(f"{fig.name} ({fig.type})", text, items)


def _training_section(exp: Experiment, run, reused: bool, digest: str, cache_path: Path, seconds: float):
    from qkvtrace.report import Item, Section
    from qkvtrace.train import read_metrics

    info = run.info
    corpus = info.get("corpus", {})
    sizes = ", ".join(f"{k} {v}" for k, v in corpus.get("sizes", {}).items())
    how = f"reused from `{cache_path}`" if reused else f"trained into `{cache_path}` in {seconds:.1f} s"
    m = exp.model
    text = (f"Run {how} (training hash `{digest[:12]}`; a copy is in `run/`).\n\n"
            f"- corpus `{corpus.get('name')}` ({sizes}; vocabulary {info['vocab']['src']} source, "
            f"{info['vocab']['tgt']} target tokens)\n"
            f"- model d_model {m.d_model}, n_layers {m.n_layers}, n_heads {m.n_heads}, d_ff {m.d_ff}, "
            f"dropout {m.dropout}\n"
            f"- {exp.train.epochs} epochs, checkpoints {', '.join(map(str, exp.train.checkpoints))}, "
            f"seed {exp.train.seed}, batch_size {exp.train.batch_size}, lr {exp.train.lr}")
    metrics = [r for r in read_metrics(run.path) if r["epoch"] in exp.train.checkpoints]
    rows = ["| epoch | train_loss | val_loss | val_token_acc | val_exact_match | val_bleu |",
            "|---:|---:|---:|---:|---:|---:|"]
    rows += [f"| {r['epoch']} | {r['train_loss']:.4f} | {r['val_loss']:.4f} | {r['val_token_acc']:.3f} | "
             f"{r['val_exact_match']:.3f} | {r['val_bleu']:.1f} |" for r in metrics]
    return Section("Training", text, [Item("Metrics at the checkpoints", None, "\n".join(rows)),
                                      Item("Metrics of every epoch (JSON lines)", Path("run/metrics.jsonl"))])


def _translation_section(exp: Experiment, run):
    from qkvtrace.report import Item, Section

    epochs = run.checkpoint_epochs()
    items = []
    for name, sents in exp.sentences.items():
        by_epoch = {e: run.translate([s.src for s in sents], e) for e in epochs}
        header = "| sentence | given target | " + " | ".join(f"epoch {e}" for e in epochs) + " |"
        rows = [header, "|---|---|" + "---|" * len(epochs)]
        for i, s in enumerate(sents):
            cells = [_shorten(by_epoch[e][i].tokens) for e in epochs]
            rows.append(f"| {s.src} | {s.tgt or ''} | " + " | ".join(f"`{c}`" for c in cells) + " |")
        items.append(Item(f"Sentence set {name!r}", None, "\n".join(rows)))
    return Section("Translations", "Greedy translations of every sentence set at each checkpoint. Where a target is "
                   "given it is teacher-forced in the figures instead.", items)


def _shorten(tokens: list[str], limit: int = 16) -> str:
    """A translation for a table cell: an untrained model babbles up to max_len tokens."""
    return " ".join(tokens[:limit]) + (f" … (+{len(tokens) - limit})" if len(tokens) > limit else "")


def _files_section(out: Path):
    from qkvtrace.report import Item, Section

    items = [Item("The experiment with every default filled in (runs again with `qkvtrace run`)",
                  Path("config.resolved.toml")),
             Item("The training run: run.json, vocabularies, metrics, checkpoints", Path("run/run.json"))]
    for d in sorted((out / "vectors").glob("*/manifest.json")):
        items.append(Item(f"Vector table {d.parent.name} (meta.csv, X.npy, manifest.json)",
                          d.relative_to(out)))
    return Section("Files", "", items)
