"""Fault injection: kill commands at named points and at random moments; old output or new, never a mix.

Each command runs in a forked child of this process (torch is imported once, so a kill costs a fraction of a
second, not an interpreter start) with QKVTRACE_FAULT="point@n", which SIGKILLs the child when it reaches the
n-th hit of that point (files.fault). The points of a command are listed by running it once with
QKVTRACE_FAULT_TRACE. After every kill:
  - the output that existed before is byte-for-byte what it was (its sha256 snapshot), or the new output is there
    complete (a run: every listed checkpoint verifies; a table: VectorTable.load verifies; a folder: its report);
  - rerunning the command (train: --resume where an epoch was committed) succeeds, leaves no leftovers, and a
    retrained run equals an uninterrupted one bit for bit.

The fast variant (a few points per command) runs in the normal suite. The long variant kills every point of every
command plus random moments; run it with `QKVTRACE_FAULTS_LONG=1 python -m pytest tests/test_faults.py -s`.
"""

import json
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from conftest import PAIRS

pytestmark = pytest.mark.faults
LONG = bool(os.environ.get("QKVTRACE_FAULTS_LONG"))
TINY = ["--d-model", "16", "--n-heads", "2", "--n-layers", "1", "--d-ff", "32", "--dropout", "0.0",
        "--max-len", "16", "--batch-size", "4", "--epochs", "3", "--checkpoints", "1,3"]
COUNTS: dict[str, list[int]] = {}  # command -> [kills, survived]
CHILD_TIMEOUT = 600  # seconds a forked command may take before it counts as hung


def _child(argv, env) -> int:
    """Run `qkvtrace argv` (or a callable) in a forked child; its exit code, or -signal if killed."""
    import gc

    sys.stdout.flush()
    sys.stderr.flush()
    gc.freeze()  # the child never finalises the parent's objects (see experiment.run.draw_all)
    pid = os.fork()
    if pid:
        gc.unfreeze()
    if pid == 0:
        code = 3
        try:
            os.environ.update(env)
            from qkvtrace import files
            import torch

            files._FAULT_HITS.clear()
            torch.set_num_threads(1)  # OpenMP's worker threads do not survive fork
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            if callable(argv):
                argv()
                code = 0
            else:
                from qkvtrace.cli import main

                try:
                    main(list(argv))
                    code = 0
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            code = 4
        finally:
            os._exit(code)
    deadline = time.monotonic() + CHILD_TIMEOUT
    while True:  # a child that hangs (instead of dying) fails the test instead of stalling the suite
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"{argv if not callable(argv) else 'the forked command'} hung for {CHILD_TIMEOUT} s")
        time.sleep(0.02)


def _points(argv, tmp: Path) -> list[str]:
    trace = tmp / "trace.txt"
    trace.unlink(missing_ok=True)
    assert _child(argv, {"QKVTRACE_FAULT_TRACE": str(trace)}) == 0
    return trace.read_text().split()


def _kill_at(argv, point: str) -> int:
    return _child(argv, {"QKVTRACE_FAULT": point})


def _snapshot(path: Path) -> dict:
    from qkvtrace.files import sha256_file

    if path.is_file():
        return {"": sha256_file(path)}
    if not path.exists():
        return {}
    return {str(f.relative_to(path)): sha256_file(f) for f in sorted(path.rglob("*")) if f.is_file()}


def _leftovers(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir()
                  if p.name.startswith(f".{path.name}.") or p.name.startswith(f".{path.name}"))


def _choose(points: list[str], n: int, rng: random.Random) -> list[str]:
    """All points in the long variant; else one publish or commit step and `n` others, drawn by `rng`."""
    if LONG:
        return points
    key = [p for p in points if p.startswith(("publish.", "train.committed", "train.epoch-written"))]
    rest = [p for p in points if p not in key]
    return rng.sample(key, min(1, len(key))) + rng.sample(rest, min(n, len(rest)))


def _tally(name: str, ok: bool) -> None:
    c = COUNTS.setdefault(name, [0, 0])
    c[0] += 1
    c[1] += ok
    if os.environ.get("QKVTRACE_FAULTS_LOG"):  # a running count, readable while the long variant runs
        with open(os.environ["QKVTRACE_FAULTS_LOG"], "a") as f:
            f.write(f"{name}\t{'survived' if ok else 'FAILED'}\n")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A corpus, an old run (seed 0), an uninterrupted reference run (seed 1), a table and a figure."""
    from qkvtrace.cli import main

    d = tmp_path_factory.mktemp("faults")
    corpus = d / "pairs.tsv"
    corpus.write_text("".join(f"{s}\t{t}\n" for s, t in PAIRS), encoding="utf-8")
    base = ["train", "--corpus", str(corpus), *TINY]
    assert _child([*base, "--seed", "0", "--run-dir", str(d / "old")], {}) == 0
    table = ["extract", str(d / "old"), "-s", "we want to eat apple", "-s", "i can eat bread"]
    main([*table, "--words", "eat", "--out", str(d / "table")])
    main(["plot", str(d / "table"), "--out", str(d / "fig.png"), "--where", "kind=q"])
    yield {"dir": d, "corpus": corpus, "base": base, "table": table}
    if COUNTS:
        print("\nfault injection:", ", ".join(f"{k} {v[1]}/{v[0]} survived" for k, v in COUNTS.items()),
              f"({sum(v[0] for v in COUNTS.values())} kills)")


def _check_run(path: Path) -> None:
    from qkvtrace.train import Run

    run = Run(path)
    for epoch in run.checkpoint_epochs():
        run.model(epoch)  # verifies the checksum listed in run.json


def _final_weights(path: Path) -> str:
    info = json.loads((path / "run.json").read_text())
    assert info["complete"] is True
    return {c["epoch"]: c["sha256"] for c in info["checkpoints"]}


def _rerun_train(argv, run_dir: Path) -> None:
    """Rerun a killed train: continue the new run with --resume where it committed an epoch, else run it again."""
    from qkvtrace.train import resume_entry

    info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    if "--resume" not in argv and info.get("seed") == 1 and resume_entry(run_dir) is not None:
        argv = ["train", "--run-dir", str(run_dir), "--resume"]
    elif "--resume" not in argv and "--force" not in argv and info:
        argv = [*argv, "--force"]  # killed before its first epoch: nothing to resume, so start it over
    assert _child(argv, {}) == 0, argv


@pytest.mark.parametrize("mode", ["new", "force", "resume"])
def test_kill_train(world, tmp_path, mode):
    """train into a new folder, train --force over an old run, train --resume of a half-trained run."""
    d, rng = world["dir"], random.Random(mode)
    target = tmp_path / "run"
    args = [*world["base"], "--seed", "1", "--run-dir", str(target)]

    def setup():
        shutil.rmtree(target, ignore_errors=True)
        for p in tmp_path.glob(".run*"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        if mode == "force":
            shutil.copytree(d / "old", target)
        elif mode == "resume":
            assert _kill_at(args, "train.committed@1") == -signal.SIGKILL
        return ["train", "--run-dir", str(target), "--resume"] if mode == "resume" else (
            [*args, "--force"] if mode == "force" else args)

    argv = setup()
    points = _points(argv, tmp_path)
    for point in _choose(points, 1, rng):
        argv = setup()
        before = _snapshot(target)
        code = _kill_at(argv, point)
        assert code == -signal.SIGKILL, (point, code)
        after = _snapshot(target)
        if after != before:
            _check_run(target)  # the new run is a whole run as of its last committed epoch
            assert json.loads((target / "run.json").read_text())["seed"] == 1
        _rerun_train(argv, target)
        # Forked children do not reproduce each other's low bits (torch's thread pool after fork), so the bitwise
        # equality of a resumed run is checked with real processes in test_kill_train_at_random_moments.
        assert sorted(_final_weights(target)) == [1, 3], point
        _check_run(target)
        assert _leftovers(target) == [], point
        assert not [f for f in (target / "checkpoints").iterdir() if f.name.startswith(".")]
        _tally(f"train ({mode})", True)


def test_kill_extract_force(world, tmp_path):
    from qkvtrace.table import VectorTable

    d, rng = world["dir"], random.Random(1)
    out = tmp_path / "table"
    argv = [*world["table"], "--words", "apple", "--kinds", "q,k", "--out", str(out), "--force"]
    shutil.copytree(d / "table", out)
    old = _snapshot(out)
    for point in _choose(_points(argv, tmp_path), 1, rng):
        shutil.rmtree(out)
        shutil.copytree(d / "table", out)
        assert _kill_at(argv, point) == -signal.SIGKILL, point
        t = VectorTable.load(out)  # verifies every checksum and that meta.csv and X.npy are one table
        assert _snapshot(out) == old or t.manifest["words"] == ["apple"], point
        assert _child(argv, {}) == 0
        assert VectorTable.load(out).manifest["words"] == ["apple"] and _leftovers(out) == []
        _tally("extract --force", True)


def test_kill_plot_force(world, tmp_path):
    d, rng = world["dir"], random.Random(2)
    out = tmp_path / "fig.png"
    argv = ["plot", str(d / "table"), "--out", str(out), "--where", "kind=k", "--force"]
    assert _child(argv, {}) == 0
    new = _snapshot(out)
    old = _snapshot(d / "fig.png")
    for point in _choose(_points(argv, tmp_path), 1, rng):
        shutil.copy(d / "fig.png", out)
        assert _kill_at(argv, point) == -signal.SIGKILL, point
        assert _snapshot(out) in (old, new), point
        assert _child(argv, {}) == 0 and _snapshot(out) == new and _leftovers(out) == []
        _tally("plot --force", True)


EXPERIMENT = """\
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
[extract]
words = ["eat"]
[[figures]]
type = "scatter"
name = "eat"
sentences = "eat"
"""


def test_kill_run_force(world, tmp_path):
    d, rng = world["dir"], random.Random(3)
    exp = tmp_path / "tiny.toml"
    exp.write_text(EXPERIMENT.format(corpus=world["corpus"]))
    out = tmp_path / "out"
    cache = ["--cache", str(tmp_path / "cache")]
    assert _child(["run", str(exp), "--out", str(out), *cache], {}) == 0
    good = tmp_path / "good"
    shutil.copytree(out, good)
    old = _snapshot(out)
    argv = ["run", str(exp), "--out", str(out), "--force", *cache, "--set", "train.seed=1"]
    # The fast variant kills at the publication only (listing a run's points costs one more run).
    for point in _choose(_points(argv, tmp_path), 1, rng) if LONG else ["publish.staged"]:
        shutil.rmtree(out)
        shutil.copytree(good, out)
        code = _kill_at(argv, point)
        assert code == -signal.SIGKILL or (code != 0 and _snapshot(out) == old), (point, code)  # see study below
        if _snapshot(out) != old:
            assert "train.seed=1" in (out / "config.resolved.toml").read_text() and (out / "index.html").is_file()
        assert _child(argv, {}) == 0, point
        assert "train.seed=1" in (out / "config.resolved.toml").read_text() and _leftovers(out) == []
        _tally("run --force", True)


def test_kill_study_force(world, tmp_path):
    from qkvtrace.study import run_study
    from test_study import TINY as tiny

    rng = random.Random(4)
    out, cache = tmp_path / "study", tmp_path / "cache"

    def study(seed):
        return lambda: run_study(out, epochs=(1, 2), seeds=(seed,), force=True, cache_root=cache, overrides=tiny)

    assert _child(study(0), {}) == 0
    good, good_cache = tmp_path / "good", tmp_path / "good-cache"
    shutil.copytree(out, good)
    shutil.copytree(cache, good_cache)  # holds the seed-0 run only: seed 1 trains (and is killed) each time
    old = _snapshot(out)

    def restore():
        for path, saved in ((out, good), (cache, good_cache)):
            shutil.rmtree(path)
            shutil.copytree(saved, path)

    # The fast variant kills at the publication only (listing the study's points costs one more study).
    for point in _choose(_points(study(1), tmp_path), 1, rng) if LONG else ["publish.staged"]:
        restore()
        code = _kill_at(study(1), point)
        # Figures are drawn in forked workers: a kill there fails the study, which must then leave `out` as it was.
        assert code == -signal.SIGKILL or (code != 0 and _snapshot(out) == old), (point, code)
        if _snapshot(out) != old:
            assert json.loads((out / "verdicts.json").read_text())["seeds"] == [1] and (out / "index.html").is_file()
        assert _child(study(1), {}) == 0, point
        assert json.loads((out / "verdicts.json").read_text())["seeds"] == [1] and _leftovers(out) == []
        _tally("study --force", True)


@pytest.mark.skipif(not LONG, reason="long variant: QKVTRACE_FAULTS_LONG=1")
def test_kill_train_at_random_moments(world, tmp_path):
    """Real `train` processes killed after a random delay, then resumed: bit-identical to an uninterrupted run."""
    import subprocess

    rng = random.Random(6)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    py = [sys.executable, "-m", "qkvtrace"]
    ref, target = tmp_path / "ref", tmp_path / "run"
    args = [*world["base"], "--seed", "1", "--epochs", "6", "--checkpoints", "1,3,6"]
    subprocess.run([*py, *args, "--run-dir", str(ref)], env=env, check=True, capture_output=True)
    for i in range(int(os.environ.get("QKVTRACE_FAULTS_RANDOM_TRAIN", "12"))):
        shutil.rmtree(target, ignore_errors=True)
        p = subprocess.Popen([*py, *args, "--run-dir", str(target)], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(2.0, 9.0))
        p.send_signal(signal.SIGKILL)
        p.wait()
        if target.exists():
            _check_run(target)
        from qkvtrace.train import resume_entry

        again = ["train", "--run-dir", str(target), "--resume"] if target.exists() and resume_entry(target) else \
            [*args, "--run-dir", str(target), "--force"]
        subprocess.run([*py, *again], env=env, check=True, capture_output=True)
        assert _final_weights(target) == _final_weights(ref) and _leftovers(target) == []
        _tally("train (random moment, resumed bitwise)", True)


@pytest.mark.skipif(not LONG, reason="long variant: QKVTRACE_FAULTS_LONG=1")
def test_kill_at_random_moments(world, tmp_path):
    """Real processes killed after a random delay: moments no named point covers (inside a write, a rename)."""
    import subprocess

    d, rng = world["dir"], random.Random(5)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = tmp_path / "table"
    argv = [sys.executable, "-m", "qkvtrace", *world["table"], "--words", "apple", "--out", str(out), "--force"]
    from qkvtrace.table import VectorTable

    for i in range(int(os.environ.get("QKVTRACE_FAULTS_RANDOM", "110"))):
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(d / "table", out)
        old = _snapshot(out)
        p = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5, 8.0))
        p.send_signal(signal.SIGKILL)
        p.wait()
        t = VectorTable.load(out)
        assert _snapshot(out) == old or t.manifest["words"] == ["apple"]
        _tally("extract --force (random moment)", True)
