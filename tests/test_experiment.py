"""Experiments end to end on the tiny model: outputs, report, run reuse, --force, validation messages, --set."""

import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from qkvtrace.errors import QkvtraceError

ROOT = Path(__file__).resolve().parents[1]

TINY = """\
description = "A tiny experiment."
[corpus]
spec = "{corpus}"
val_fraction = 0.25
[model]
d_model = 16
n_heads = 2
n_layers = 1
d_ff = 32
dropout = 0.0
[train]
epochs = 2
checkpoints = [1, 2]
batch_size = 4
[[sentences]]
name = "eat"
items = ["we want to eat apple", "we want to eat bread"]
[[sentences]]
name = "perm"
items = [["we can eat apple", "wir können apfel essen"], "apple eat can we"]
[extract]
words = ["eat"]
[[figures]]
type = "scatter"
name = "eat-encoder"
sentences = "eat"
kinds = ["q", "k", "v", "x1"]
trajectories = true
format = ["png", "html"]
[[figures]]
type = "similarity"
name = "perm-k"
sentences = "perm"
kind = "k"
[[figures]]
type = "attention"
name = "attn"
sentence = "we can eat apple"
"""


@pytest.fixture
def tiny_exp(tmp_path, tiny_tsv, monkeypatch):
    """A tiny experiment file in a fresh directory that is also the current one (so outputs/ lands there)."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "tiny.toml"
    path.write_text(TINY.format(corpus=tiny_tsv.as_posix()), encoding="utf-8")
    return path


def _edit(path: Path, old: str, new: str) -> Path:
    text = path.read_text(encoding="utf-8")
    assert old in text
    bad = path.with_name("bad.toml")
    bad.write_text(text.replace(old, new, 1), encoding="utf-8")
    return bad


def _line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def test_run_writes_figures_report_and_reuses_the_run(tiny_exp):
    from matplotlib.image import imread

    from qkvtrace.experiment import load_experiment, run_experiment

    lines = []
    out = run_experiment(tiny_exp, progress=lines.append)
    assert out == Path("outputs/tiny")
    assert any("trained" in line for line in lines)
    figures = sorted(p.relative_to(out).as_posix() for p in (out / "figures").rglob("*.png"))
    assert "figures/eat-encoder.png" in figures and "figures/attn.png" in figures
    assert any(f.startswith("figures/perm-k/similarity-k-encoder.self-L0-e2") for f in figures)
    for f in figures:
        image = imread(out / f)
        assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50
    assert (out / "figures" / "eat-encoder.html").read_text().startswith("<!DOCTYPE html>")
    report, index = (out / "report.md").read_text(), (out / "index.html").read_text()
    for f in figures + ["figures/eat-encoder.html"]:
        assert f in report and f in index
    assert "http://" not in index and "https://" not in index  # offline
    assert "<table>" in index and "A tiny experiment." in index
    # One vector table per sentence set, holding what its figures draw: "eat" only, q/k/v/x1, every checkpoint.
    from qkvtrace.table import load_vectors

    vectors = load_vectors(out / "vectors" / "eat")
    assert set(vectors.meta["token"]) == {"eat"} and set(vectors.meta["kind"]) == {"q", "k", "v", "x1"}
    assert sorted(set(vectors.meta["epoch"].tolist())) == [1, 2] and len(vectors) == 2 * 4 * 2
    assert report.count("\n## ") == index.count("<h2>") == 1 + 1 + 3 + 1  # training, translations, figures, files
    assert sorted(p.name for p in (out / "run" / "checkpoints").iterdir()) == ["epoch-001.safetensors",
                                                                               "epoch-002.safetensors"]
    # The resolved config reads back as the same experiment.
    a, b = load_experiment(tiny_exp), load_experiment(out / "config.resolved.toml")
    assert (a.model, a.train, a.sentences, a.extract, a.figures) == (b.model, b.train, b.sentences, b.extract,
                                                                       b.figures)

    # A second run with the same training configuration reuses the cached run: no checkpoint is rewritten.
    (cached,) = list(Path("outputs/runs").iterdir())
    ckpt = cached / "checkpoints" / "epoch-002.safetensors"
    before = ckpt.stat().st_mtime_ns
    lines.clear()
    out2 = run_experiment(tiny_exp, out="outputs/again", progress=lines.append)
    assert ckpt.stat().st_mtime_ns == before
    assert any(line.startswith("training (seed 0): reused") for line in lines)
    assert (out2 / "index.html").is_file()

    # --force retrains the run and may write over the output directory.
    lines.clear()
    run_experiment(tiny_exp, out="outputs/again", force=True, progress=lines.append)
    assert ckpt.stat().st_mtime_ns != before
    assert any("trained" in line for line in lines)


def test_existing_out_dir_without_force_is_an_error_and_untouched(tiny_exp):
    from qkvtrace.experiment import run_experiment

    out = Path("outputs/tiny")
    out.mkdir(parents=True)
    keep = out / "mine.txt"
    keep.write_text("keep me")
    with pytest.raises(QkvtraceError, match="already exists; pass force=True"):
        run_experiment(tiny_exp)
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and keep.read_text() == "keep me"
    assert not Path("outputs/runs").exists()  # nothing trained


def test_unknown_key_names_file_line_and_neighbour(tiny_exp):
    from qkvtrace.experiment import load_experiment

    bad = _edit(tiny_exp, "epochs = 2", "epoch = 2")
    with pytest.raises(QkvtraceError) as e:
        load_experiment(bad)
    assert str(e.value).startswith(f"{bad}:{_line_of(bad, 'epoch = 2')}: unknown key 'epoch' in [train]; "
                                   "did you mean epochs?")
    bad = _edit(tiny_exp, 'kind = "k"', 'kinds = "k"')
    line = _line_of(bad, 'kinds = "k"')
    with pytest.raises(QkvtraceError, match=rf"bad.toml:{line}: unknown key 'kinds' .*"
                                            "did you mean kind"):
        load_experiment(bad)


def test_toml_syntax_error_has_line_and_column(tiny_exp):
    from qkvtrace.experiment import load_experiment

    bad = _edit(tiny_exp, "[train]", "[train")
    with pytest.raises(QkvtraceError, match=rf"bad.toml:{_line_of(bad, '[train')}:\d+: TOML syntax error"):
        load_experiment(bad)


def test_figure_naming_a_missing_sentence_set_lists_the_sets(tiny_exp):
    from qkvtrace.experiment import load_experiment

    bad = _edit(tiny_exp, 'sentences = "eat"', 'sentences = "eats"')
    with pytest.raises(QkvtraceError, match=r"bad.toml:\d+: figure 'eat-encoder': no \[\[sentences\]\] named "
                                            r"'eats'; sets: eat, perm"):
        load_experiment(bad)


@pytest.mark.parametrize("old, new, message", [
    ('"q", "k", "v", "x1"', '"q", "kk"', r"kinds 'kk': unknown; valid: q, k, v, z, attn_out, layer_out, x1, x4"),
    ("trajectories = true", "trajectories = true\nlayer = 3", r"layer 3: the model has layers 0..0"),
    ("trajectories = true", "trajectories = true\nepochs = [5]", r"epochs 5: no checkpoint at that epoch"),
    ("trajectories = true", "trajectories = true\ndims = 4", r"dims = 4: must be 2 or 3"),
    ("d_model = 16", "d_model = 15", r"bad.toml:\d+: d_model 15: must be divisible by n_heads"),
])
def test_bad_values_are_refused_before_training(tiny_exp, old, new, message):
    from qkvtrace.experiment import run_experiment

    with pytest.raises(QkvtraceError, match=message):
        run_experiment(_edit(tiny_exp, old, new))
    assert not Path("outputs").exists()


def test_set_overrides_apply_and_unknown_ones_are_refused(tiny_exp):
    from qkvtrace.experiment import load_experiment

    exp = load_experiment(tiny_exp, ["train.epochs=3", "train.checkpoints=[1,3]", "figures.eat-encoder.dims=3",
                                     "name=other"])
    assert exp.train.epochs == 3 and exp.train.checkpoints == (1, 3) and exp.name == "other"
    assert exp.figures[0].dims == 3 and exp.figures[0].extract.epochs == (1, 3)
    with pytest.raises(QkvtraceError, match=r"--set train.epoch: unknown key 'epoch' in \[train\]; did you mean "
                                            "epochs"):
        load_experiment(tiny_exp, ["train.epoch=3"])
    with pytest.raises(QkvtraceError, match=r"--set train.epochs: epochs 0: must be at least 1"):
        load_experiment(tiny_exp, ["train.epochs=0", "train.checkpoints=[1]"])


def test_cli_run_help_and_errors(tiny_exp, capsys):
    from qkvtrace.cli import cli, main

    result = CliRunner().invoke(cli, ["run", "--help"])
    assert result.exit_code == 0 and "qkvtrace run experiments/study.toml" in result.output and "--set" in result.output
    bad = _edit(tiny_exp, "epochs = 2", "epoch = 2")
    with pytest.raises(SystemExit) as e:
        main(["run", str(bad)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: {bad}:") and "epoch" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as e:
        main(["run", str(tiny_exp.parent), "--out", "x"])  # a directory takes no --out
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == ("error: --out x: not allowed with a directory of experiments; each writes "
                                         "outputs/<name>/\n")


def test_cli_run_directory(tiny_exp, capsys):
    from qkvtrace.cli import main

    (tiny_exp.parent / "exps").mkdir()
    os.replace(tiny_exp, tiny_exp.parent / "exps" / "tiny.toml")
    try:
        main(["run", "exps"])
    except SystemExit as e:
        assert e.code in (0, None)
    captured = capsys.readouterr()
    assert "wrote outputs/tiny/index.html" in captured.out
    assert re.search(r"figures: 3 drawn in \d+\.\ds", captured.err)


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_experiments_parse(path, monkeypatch):
    from qkvtrace.experiment import load_experiment

    monkeypatch.chdir(ROOT)  # corpus and sentence paths are relative to the project root
    exp = load_experiment(path)
    assert exp.figures and exp.name == path.stem


@pytest.mark.parametrize("old, new, message", [
    ("epochs = 2", 'epochs = "x"', r"bad.toml:\d+: epochs = 'x' should be an integer \(in \[train\]\)$"),
    ("checkpoints = [1, 2]", "checkpoints = 2", r"checkpoints = 2 should be a list of integers, e.g. \[1, 15, 30\]"),
    ("checkpoints = [1, 2]", 'checkpoints = ["1"]', r"checkpoints = \['1'\] should be a list of integers"),
    ("dropout = 0.0", 'dropout = "none"', r"dropout = 'none' should be a number \(in \[model\]\)$"),
])
def test_type_errors_name_the_type_in_words(tiny_exp, old, new, message):
    from qkvtrace.experiment import load_experiment

    with pytest.raises(QkvtraceError, match=message) as e:
        load_experiment(_edit(tiny_exp, old, new))
    assert "\n" not in str(e.value)


def test_empty_file_is_one_line(tmp_path):
    from qkvtrace.experiment import load_experiment

    empty = tmp_path / "empty.toml"
    empty.write_text("")
    with pytest.raises(QkvtraceError) as e:
        load_experiment(empty)
    assert str(e.value) == (f"{empty}: is empty; an experiment needs at least one [[figures]] table with type, name "
                            "and sentences (see experiments/study.toml)")


def test_missing_corpus_table_is_said(tiny_exp):
    from qkvtrace.experiment import load_experiment

    text = tiny_exp.read_text()
    corpus = text[text.index("[corpus]"):text.index("[model]")]
    no_corpus = tiny_exp.with_name("nocorpus.toml")
    no_corpus.write_text(text.replace(corpus, ""))
    exp = load_experiment(no_corpus)
    assert not exp.corpus_given and exp.train.corpus == "builtin"
    assert load_experiment(tiny_exp).corpus_given


def test_run_cache_is_one_place_whatever_out(tiny_exp, monkeypatch, tmp_path):
    from qkvtrace.experiment import run_experiment
    from qkvtrace.train import run_cache

    assert run_cache() == Path("outputs/runs") and run_cache("x") == Path("x")
    monkeypatch.setenv("QKVTRACE_CACHE", str(tmp_path / "cache"))
    assert run_cache() == tmp_path / "cache"
    lines = []
    run_experiment(tiny_exp, out=tmp_path / "a" / "b", progress=lines.append)
    (cached,) = (tmp_path / "cache").iterdir()
    assert any(f"trained {cached}" in line for line in lines)
    lines.clear()
    run_experiment(tiny_exp, out=tmp_path / "elsewhere", progress=lines.append)
    assert any(line.startswith(f"training (seed 0): reused {cached}") for line in lines)
    assert not Path("outputs/runs").exists()


def test_report_markdown_and_html_come_from_the_same_objects(tmp_path):
    from qkvtrace.report import Bullets, Code, Figure, FileLink, Paragraph, Report, Section, Strong, Table, write_report

    fig = tmp_path / "figures" / "a b.png"
    report = Report("T", [
        Section("One", [Paragraph(["x ", Code("val_loss"), " and *stars*"]),
                        Table(["claim", "n"], [[Strong("holds"), 0.12345], ["a|b", 2.0]], caption="Numbers",
                              number_format=["{}", "{:.2f}"]),
                        Figure(fig, "A figure", interactive=tmp_path / "figures" / "a.html")]),
        Section("Two", [Bullets(["first", ["second ", Code("c")]]), FileLink(tmp_path / "t.csv", "the table")])])
    md_path, html_path = write_report(tmp_path, report)
    md, html = md_path.read_text(), html_path.read_text()
    assert md.count("\n## ") == 2 and html.count("<h2>") == 2
    assert "x `val_loss` and \\*stars\\*" in md and "x <code>val_loss</code> and *stars*" in html
    assert "| **holds** | 0.12 |" in md and "| a\\|b | 2.00 |" in md and "|---|---:|" in md
    assert '<td><strong>holds</strong></td><td class="r">0.12</td>' in html and "<td>a|b</td>" in html
    assert "![A figure](figures/a%20b.png)" in md and "([interactive](figures/a.html))" in md
    assert '<img src="figures/a%20b.png"' in html and '<a class="interactive" href="figures/a.html">' in html
    assert "- second `c`" in md and "<li>second <code>c</code></li>" in html and 'href="t.csv"' in html


def test_draw_all_runs_meanwhile_on_one_thread_and_restores_the_threads(tmp_path, monkeypatch):
    """The verdicts (`meanwhile`) run on one torch/BLAS thread beside the drawing workers; afterwards torch and
    OpenMP have their thread counts back (a wrong restore order left OpenMP on 1 and changed later trainings)."""
    import torch
    from threadpoolctl import threadpool_info

    from qkvtrace.experiment.run import draw_all

    monkeypatch.setenv("QKVTRACE_WORKERS", "2")
    before = torch.get_num_threads(), sorted((i["prefix"], i["num_threads"]) for i in threadpool_info())
    jobs = [lambda i=i: (tmp_path / f"{i}.txt").write_text(str(i)) for i in range(3)]
    seen = draw_all(jobs, meanwhile=torch.get_num_threads)
    assert seen == 1 and sorted(p.read_text() for p in tmp_path.iterdir()) == ["0", "1", "2"]
    assert (torch.get_num_threads(), sorted((i["prefix"], i["num_threads"]) for i in threadpool_info())) == before
