"""DistributedDataParallel on CPU (gloo, 2 processes): equivalence with one process, bit-identical resume, and a
failing rank reported in one line.

Starting a process that imports torch costs seconds, so the two ranks of the equivalence and resume runs are forked
from this test process (torch already imported) with torchrun's environment; one run goes through the real
`--nproc` launcher (torch.distributed.run) and fails on purpose.
"""

import contextlib
import io
import json
import multiprocessing
import os
import socket
from dataclasses import replace

import pytest
import torch

from qkvtrace.cli import main
from qkvtrace.config import ModelConfig, TrainConfig
from qkvtrace.train import read_safetensors, train
from tests.conftest import TINY_MODEL

pytestmark = pytest.mark.multiprocess

# 9 training pairs (val_fraction 0.25 of 12), global batch 2: 5 steps an epoch, 20 steps in 4 epochs.
EPOCHS = 4


def weights(run_dir, epoch=EPOCHS, name=None):
    return read_safetensors(run_dir / "checkpoints" / (name or f"epoch-{epoch:03d}.safetensors"))[0]


def _rank(rank, world, port, model_cfg, train_cfg, run_dir, resume):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    code = 0
    try:
        train(model_cfg, train_cfg, run_dir, resume=resume)
    except BaseException:  # noqa: BLE001 - the parent sees the exit code
        import traceback

        traceback.print_exc()
        code = 1
    os._exit(code)


def fork_ranks(world, *args):
    """Run `train(*args)` in `world` forked ranks, as torchrun would start them; returns their exit codes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_rank, args=(r, world, port, *args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    codes = [p.exitcode for p in procs]
    for p in procs:  # a rank stuck in a collective would outlive the test (gloo waits 30 minutes) and hold up exit
        if p.is_alive():
            p.kill()
            p.join()
    return codes


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_configs):
    """One process at batch 2; two ranks at batch 1 each: uninterrupted, and (through `--nproc 2`) failed as
    epoch 3 starts, then resumed."""
    model_cfg, cfg = tiny_configs
    cfg = replace(cfg, checkpoints=(2, EPOCHS), epochs=EPOCHS)
    tmp = tmp_path_factory.mktemp("dist")
    one = train(model_cfg, replace(cfg, batch_size=2), tmp / "one")
    half = replace(cfg, batch_size=1)
    assert fork_ranks(2, model_cfg, half, tmp / "two", False) == [0, 0]

    toml = tmp / "half.toml"
    toml.write_text(f"[model]\n" + "".join(f"{k} = {v!r}\n" for k, v in TINY_MODEL.items())
                    + f"[train]\ncorpus = {cfg.corpus!r}\nepochs = {EPOCHS}\ncheckpoints = [2, {EPOCHS}]\n"
                      f"batch_size = 1\nlr = {cfg.lr}\nval_fraction = {cfg.val_fraction}\ndevice = 'cpu'\n")
    mp = pytest.MonkeyPatch()
    mp.setenv("QKVTRACE_INJECT_FAULT", "1:3")  # rank 1 fails as epoch 3 starts: epochs 1 and 2 are finished
    err = io.StringIO()
    with pytest.raises(SystemExit) as failed, contextlib.redirect_stderr(err):
        main(["train", "--config", str(toml), "--run-dir", str(tmp / "cut"), "--nproc", "2"])
    mp.undo()
    cut_epochs = [json.loads(line)["epoch"] for line in (tmp / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert fork_ranks(2, model_cfg, half, tmp / "cut", True) == [0, 0]
    return {"one": one.path, "two": tmp / "two", "cut": tmp / "cut", "failed": failed.value, "cut_epochs": cut_epochs,
            "stderr": err.getvalue()}


# Key biases get no gradient in exact arithmetic (softmax ignores a constant added to every score), so theirs is
# rounding noise, which Adam scales to full-size steps: they drift apart without changing any output.
NO_GRADIENT = ("k_proj.bias",)


def test_two_ranks_at_half_batch_equal_one_rank_after_20_steps(runs, tiny_configs):
    info = json.loads((runs["two"] / "run.json").read_text())
    assert info["distributed"] == {"world_size": 2, "batch_per_rank": 1, "global_batch": 2, "backend": "gloo"}
    assert info["complete"] is True
    rows = [[json.loads(line) for line in (runs[r] / "metrics.jsonl").read_text().splitlines()] for r in ("one", "two")]
    assert len(rows[0]) == len(rows[1]) == EPOCHS and info["corpus"]["sizes"]["train"] == 9  # 5 steps x 4 epochs
    one, two = weights(runs["one"]), weights(runs["two"])
    assert one.keys() == two.keys()
    for k in one:
        if not k.endswith(NO_GRADIENT):
            rel = float((one[k] - two[k]).norm() / one[k].norm())
            assert rel < 1e-5, (k, rel)
    assert not torch.equal(one["lm_head.weight"], weights(runs["one"], 2)["lm_head.weight"])  # it trained
    # The models compute the same function, key biases included.
    model_cfg, _ = tiny_configs
    from qkvtrace.train import Run

    a, b = Run(runs["one"]).model(EPOCHS), Run(runs["two"]).model(EPOCHS)
    src, tgt = torch.tensor([[1, 5, 6, 7, 2]]), torch.tensor([[1, 8, 9, 10]])
    assert torch.allclose(a(src, tgt), b(src, tgt), rtol=1e-5, atol=1e-5)
    for x, y in zip(*rows):
        for key in ("train_loss", "val_loss", "val_token_acc"):  # reduced across ranks: the whole split's values
            assert x[key] == pytest.approx(y[key], rel=1e-5), key


def test_failed_rank_is_one_line_and_resume_is_bit_identical(runs, capsys):
    assert runs["failed"].code == 2
    assert runs["stderr"].splitlines()[-1] == "error: rank 1: RuntimeError: injected fault at epoch 3"
    assert runs["cut_epochs"] == [1, 2]
    two, cut = weights(runs["two"]), weights(runs["cut"])
    assert all(torch.equal(two[k], cut[k]) for k in two)
    a, b = (weights(runs[r], name=f"resume-{EPOCHS:03d}.safetensors") for r in ("two", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # Adam's state too
    assert [json.loads(line)["epoch"] for line in (runs["cut"] / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_root_cause_prefers_a_ranks_own_error_over_the_ranks_torchrun_stopped(tmp_path):
    """torchrun stops the surviving ranks with SIGTERM within the same second as the failure (timestamps are whole
    seconds): the line must still name the rank that failed, and a SIGKILLed rank before one torchrun stopped."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from qkvtrace.dist import _root_cause

    def failure(rank, exitcode, message=None, timestamp=100):
        path = tmp_path / f"error-{rank}.json"
        if message is not None:
            path.write_text(json.dumps({"message": message, "timestamp": str(timestamp)}))
        f = ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file=str(path))
        f.timestamp = timestamp
        return f

    own = failure(1, 1, "RuntimeError: injected fault at epoch 3")
    stopped = failure(0, -15)
    peer = failure(2, 1, "(after another rank failed) RuntimeError: Connection closed by peer", timestamp=99)
    killed = failure(3, -9)
    err = _root_cause(ChildFailedError("qkvtrace", {0: stopped, 1: own, 2: peer}))
    assert str(err) == "rank 1: RuntimeError: injected fault at epoch 3"
    assert str(_root_cause(ChildFailedError("qkvtrace", {0: stopped, 2: peer, 3: killed}))) == \
        "rank 3: Signal 9 (SIGKILL) received by PID 1003"
    assert str(_root_cause(ChildFailedError("qkvtrace", {0: stopped, 2: peer}))).startswith("rank 2: (after another")
