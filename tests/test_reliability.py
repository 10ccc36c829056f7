"""Issue 9 as classes: unwritable outputs, a full disk, damaged files, concurrent commands, and the listed defects.

Every bad case must be one line `error: ...` naming the path and what is wrong, exit 2, no traceback, nothing
partial left and nothing existing changed.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from qkvtrace import files
from qkvtrace.cli import main


def cli(capsys, *argv) -> tuple[int, str, str]:
    """Run the CLI in-process as a user would (main() maps errors to exit codes); (code, stdout, stderr)."""
    capsys.readouterr()
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line(code, out, err, *needles):
    assert code == 2, (code, out, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)


def below_a_file(tmp_path) -> Path:
    (tmp_path / "plain").write_text("a file, not a folder")
    return tmp_path / "plain" / "out"


def immutable(tmp_path) -> Path:
    d = tmp_path / "imm"
    d.mkdir(exist_ok=True)
    if subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    return d


@pytest.fixture
def table(tmp_path, tiny_run):
    from qkvtrace.extract import extract

    out = tmp_path / "table"
    extract(tiny_run, ["we want to eat apple", "i can eat bread"], words="eat", epochs=[1, 4], out=out)
    return out


EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def _commands(tiny_run, table, dest: Path):
    run = str(tiny_run.path)
    return {
        "extract": ["extract", run, "-s", "i can eat apple", "--out", dest],
        "plot": ["plot", table, "--out", dest / "p.png"],
        "plot html": ["plot", table, "--out", dest / "p.html"],
        "similarity": ["similarity", run, "i can eat apple", "we can eat apple", "--out", dest],
        "attention": ["attention", run, "i can eat apple", "--out", dest / "a.png"],
        "train": ["train", "--corpus", tiny_run.train_cfg.corpus, "--epochs", "1", "--run-dir", dest],
        "corpus export": ["corpus", tiny_run.train_cfg.corpus, "--export", dest / "c.tsv"],
        "view": ["view", table, "--out", dest / "e.html"],
        # run and study check their outputs and the run cache before training, not after
        "run": ["run", EXPERIMENTS / "five_sentences.toml", "--out", dest, "--cache", Path(table).parent / "cache"],
        "study": ["study", "--out", dest, "--cache", Path(table).parent / "cache"],
        "study --cache": ["study", "--out", Path(table).parent / "study", "--cache", dest],
    }


@pytest.mark.parametrize("where", ["below a file", "/proc", "immutable"])
def test_unwritable_outputs_are_one_line_and_leave_nothing(capsys, tmp_path, tiny_run, table, where):
    if where == "below a file":
        dest, reason = below_a_file(tmp_path), "ENOTDIR"
    elif where == "/proc":
        dest, reason = Path("/proc/qkvtrace-test"), "ENOENT"
    else:
        dest, reason = immutable(tmp_path) / "out", "EPERM"
    before = sorted(p.name for p in tmp_path.rglob("*"))
    try:
        for name, argv in _commands(tiny_run, table, dest).items():
            code, out, err = cli(capsys, *argv)
            one_line(code, out, err, reason, str(dest))
            assert out == "", (name, out)  # similarity prints nothing before failing
    finally:
        if where == "immutable":
            subprocess.run(["chattr", "-i", str(tmp_path / "imm")])
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_full_disk_keeps_the_previous_table_and_run(capsys, tmp_path, tiny_run, table, monkeypatch):
    from qkvtrace.table import VectorTable

    before = {p.name: p.read_bytes() for p in table.iterdir()}
    written = {"n": 0}
    real = files._Hashing.write

    def fills_up(self, data):
        written["n"] += len(data)
        if written["n"] > 2000:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(files._Hashing, "write", fills_up)
    # Streaming writes go through open(), not atomic_write: the disk fills there too.
    monkeypatch.setattr(sys.modules["qkvtrace.extract"], "write_meta_csv", _full_disk)
    code, out, err = cli(capsys, "extract", tiny_run.path, "-s", "we can drink beer", "--out", table, "--force")
    one_line(code, out, err, "ENOSPC", str(table))
    assert {p.name: p.read_bytes() for p in table.iterdir()} == before
    assert VectorTable.load(table).manifest["words"] == ["eat"]
    assert [p.name for p in table.parent.iterdir() if p.name.startswith(".")] == []



def test_full_disk_while_training_keeps_the_finished_epochs(capsys, tmp_path, tiny_run, monkeypatch):
    from qkvtrace.train import Run

    run = tmp_path / "run"
    real = files.atomic_write

    def full_at_epoch_2(path, data, option=None):
        if "002" in Path(path).name:
            data = _full_disk
        return real(path, data, option)

    monkeypatch.setattr(sys.modules["qkvtrace.train"], "atomic_write", full_at_epoch_2)
    args = ["train", "--corpus", tiny_run.train_cfg.corpus, "--epochs", "3", "--checkpoints", "1,2,3", "--d-model",
            "16", "--n-heads", "2", "--n-layers", "1", "--d-ff", "32", "--max-len", "16", "--run-dir", run]
    code, out, err = cli(capsys, *args)
    last = err.splitlines()[-1]  # after the progress lines of epoch 1
    assert code == 2 and last.startswith("error: ") and "epoch-002.safetensors: cannot write there" in last
    assert "ENOSPC" in last and "Traceback" not in err
    assert Run(run).checkpoint_epochs() == [1] and Run(run).model(1) is not None  # verified against run.json
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    monkeypatch.undo()
    code, out, err = cli(capsys, "train", "--run-dir", run, "--resume")
    assert code == 0 and Run(run).checkpoint_epochs() == [1, 2, 3], err


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_damaged_table_files_are_named(capsys, table):
    from qkvtrace.table import VectorTable

    meta = table / "meta.csv"
    lines = meta.read_bytes().splitlines(keepends=True)
    meta.write_bytes(b"".join(lines[:-1]))  # one row short
    one_line(*cli(capsys, "plot", table, "--out", table / "p.png"), "meta.csv", "rows, but X.npy has")
    meta.write_bytes(b"".join(lines))
    X = np.load(table / "X.npy")
    np.save(table / "X.npy", np.zeros_like(X))  # a foreign matrix of the same shape
    one_line(*cli(capsys, "plot", table, "--out", table / "p.png"), "X.npy: damaged or replaced")
    (table / "X.npy").write_bytes(b"not a matrix")
    with pytest.raises(Exception, match="X.npy: not a readable .npy matrix"):
        VectorTable.load(table)
    assert not (table / "p.png").exists()


def test_damaged_run_files_are_named(capsys, tmp_path, tiny_run):
    run = tmp_path / "run"
    shutil.copytree(tiny_run.path, run)
    vocab = run / "tgt_vocab.json"
    itos = json.loads(vocab.read_text())["itos"]
    vocab.write_text(json.dumps({"itos": itos[:4] + itos[5:] + itos[4:5]}))  # still a vocabulary, not this one
    one_line(*cli(capsys, "translate", run, "i can eat apple"), "tgt_vocab.json: damaged or replaced")
    shutil.copy(tiny_run.path / "tgt_vocab.json", vocab)
    (run / "checkpoints" / "epoch-004.safetensors").unlink()
    one_line(*cli(capsys, "translate", run, "i can eat apple"), "checkpoint of epoch 4 is missing")
    one_line(*cli(capsys, "extract", run, "-s", "i can eat apple", "--out", tmp_path / "t"), "epoch 4 is missing")
    assert not (tmp_path / "t").exists()


def _stopped_child(argv, point):
    """Fork a child running `qkvtrace argv` that stops itself (SIGSTOP) at `point`; returns its pid once stopped."""
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            import torch

            torch.set_num_threads(1)
            os.environ["QKVTRACE_FAULT"] = f"{point}:stop"
            files._FAULT_HITS.clear()
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            try:
                main([str(a) for a in argv])
                code = 0
            except SystemExit as e:
                code = e.code
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), status
    return pid


def test_concurrent_writers_refuse_and_readers_read_finished_epochs(capsys, tmp_path, tiny_run):
    run = tmp_path / "run"
    corpus = tiny_run.train_cfg.corpus
    args = ["train", "--corpus", corpus, "--epochs", "3", "--checkpoints", "1,3", "--d-model", "16", "--n-heads",
            "2", "--n-layers", "1", "--d-ff", "32", "--max-len", "16", "--batch-size", "4", "--run-dir", run]
    pid = _stopped_child(args, "train.committed@1")  # paused mid-run, holding its lock, epoch 1 committed
    try:
        for argv in (args, [*args, "--force"], ["train", "--run-dir", run, "--resume"]):
            one_line(*cli(capsys, *argv), f"in use by process {pid}", str(run))
        code, out, err = cli(capsys, "translate", run, "i can eat apple")
        assert code == 0 and out.strip().startswith("i can eat apple  ->"), err
        code, out, err = cli(capsys, "extract", run, "-s", "i can eat apple", "--out", tmp_path / "t")
        assert code == 0 and json.loads((tmp_path / "t" / "manifest.json").read_text())["epochs"] == [1]
        code, out, err = cli(capsys, "similarity", run, "i can eat apple", "we can eat apple")
        assert code == 0 and "epoch 1" in out
    finally:
        os.kill(pid, signal.SIGCONT)
        _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert json.loads((run / "run.json").read_text())["complete"] is True
    code, out, err = cli(capsys, "train", "--run-dir", run, "--resume")  # the lock went with the process
    assert code == 0, err


def test_two_extractions_into_one_folder(capsys, tmp_path, tiny_run):
    out = tmp_path / "t"
    argv = ["extract", tiny_run.path, "-s", "i can eat apple", "--out", out, "--force"]
    pid = _stopped_child(argv, "extract.batch")
    try:
        one_line(*cli(capsys, *argv), f"in use by process {pid}", str(out))
    finally:
        os.kill(pid, signal.SIGCONT)
        os.waitpid(pid, 0)
    from qkvtrace.table import VectorTable

    assert len(VectorTable.load(out)) == json.loads((out / "manifest.json").read_text())["n_rows"]


# --- the defects listed in issue 9 §5 ---

def test_attention_with_a_target(capsys, tmp_path, tiny_run):
    code, out, err = cli(capsys, "attention", tiny_run.path, "i can eat apple", "--target", "ich kann apfel essen",
                         "--out", tmp_path / "a.png")
    assert code == 0 and (tmp_path / "a.png").stat().st_size > 0, err


@pytest.mark.parametrize("command", ["translate", "similarity"])
def test_epochs_given_twice_or_missing_name_the_option(capsys, tiny_run, command):
    argv = [command, tiny_run.path, "i can eat apple"] + (["we can eat apple"] if command == "similarity" else [])
    one_line(*cli(capsys, *argv, "--epochs", "1,1"), "--epochs 1,1: epoch 1 given more than once")
    one_line(*cli(capsys, *argv, "--epochs", "0"), "--epochs 0:", "epochs with checkpoints: 1, 2, 4")
    one_line(*cli(capsys, *argv, "--epoch", "3"), "--epoch 3:")


def test_config_file_errors_name_the_line(capsys, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[model]\nd_model = 16\n\n[train]\nepochs = 2\nbatch_sise = 4\n")
    one_line(*cli(capsys, "train", "--config", cfg, "--run-dir", tmp_path / "r"),
             f"{cfg}:6: [train] unknown key 'batch_sise'; did you mean batch_size")
    cfg.write_text("[model]\nn_heads = \"two\"\n")
    one_line(*cli(capsys, "train", "--config", cfg, "--run-dir", tmp_path / "r"), f"{cfg}:2: [model] n_heads")
    assert not (tmp_path / "r").exists()


def test_overlong_sentence_is_shortened(capsys, tiny_run):
    sentence = " ".join(["eat"] * 200)
    code, out, err = cli(capsys, "translate", tiny_run.path, sentence)
    one_line(code, out, err, "202 tokens", "shorten it")
    assert len(err) < 200


def test_pca_of_identical_points_is_quiet():
    from qkvtrace.project import project

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(project(np.ones((5, 4)), "pca", 2), np.zeros((5, 2)))


def test_long_title_stays_inside_the_figure(tiny_run):
    from qkvtrace.extract import extract
    from qkvtrace.plot import scatter_figure

    t = extract(tiny_run, ["i can eat apple"], epochs=[4], kinds="q", sites="encoder.self")
    fig = scatter_figure(t, np.random.default_rng(0).normal(size=(len(t), 2)), title="a very long title · " * 12)
    fig.canvas.draw() if hasattr(fig.canvas, "draw") else None
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    box = fig.axes[0].title.get_window_extent(canvas.get_renderer())
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width
