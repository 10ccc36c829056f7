"""Distributed training on PyTorch's own engine: the process group from torchrun's environment, rank and world,
sums across ranks, sharing rank 0's files, each rank's share of a batch, and the `--nproc` launcher.

`torchrun --nproc-per-node N -m qkvtrace train ...` starts N processes with RANK, WORLD_SIZE, LOCAL_RANK and the
rendezvous in their environment; `setup` joins them into one process group (gloo on CPU, nccl on CUDA).
`qkvtrace train --nproc N` runs the same through `torch.distributed.run` (what torchrun is) and turns a failed rank
into one line. Outside torchrun every function here is the single-process identity, so `train` has one code path.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from qkvtrace.errors import QkvtraceError

# Set by `launch` for its children: the launcher prints a failed rank's one line, so the child stays quiet.
LAUNCHED_ENV = "QKVTRACE_LAUNCHED"


@dataclass(frozen=True)
class Dist:
    """Where this process stands: rank in 0..world-1, `backend` None when it is the only process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run directory."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


SINGLE = Dist()


def launched() -> bool:
    """True in a process started by torchrun (or `launch`)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_rank() -> int:
    """This process's global rank as torchrun set it (0 outside torchrun)."""
    return int(os.environ.get("RANK", 0))


def setup(device: torch.device) -> tuple[Dist, torch.device]:
    """Join torchrun's process group (once per process); returns (Dist, this rank's device).

    On CUDA each rank takes the GPU numbered by its LOCAL_RANK and nccl; on CPU gloo.
    """
    if not launched():
        return SINGLE, device
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise QkvtraceError(f"{device.type}: distributed training runs on cpu (gloo) or cuda (nccl)", param="device")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return Dist(rank, world, local_rank, backend), device


def all_sum(d: Dist, values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of `values` over all ranks (float64); the values themselves on a single process."""
    if not d.distributed:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def share_bytes(d: Dist, data: bytes | None, device: torch.device) -> bytes:
    """Rank 0's `data` on every rank (the others pass None): files only rank 0's machine may hold."""
    data = data or b""
    if not d.distributed:
        return data
    import torch.distributed as dist

    n = torch.tensor([len(data) if d.is_main else 0], dtype=torch.int64, device=device)
    dist.broadcast(n, 0)
    buf = (torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device) if d.is_main and n.item()
           else torch.empty(int(n.item()), dtype=torch.uint8, device=device))
    if n.item():
        dist.broadcast(buf, 0)
    return data if d.is_main else buf.cpu().numpy().tobytes()


def share_json(d: Dist, obj, device: torch.device):
    """Rank 0's JSON-able `obj` on every rank."""
    return json.loads(share_bytes(d, json.dumps(obj).encode() if d.is_main else None, device))


def all_gather_json(d: Dist, obj, device: torch.device) -> list:
    """Every rank's JSON-able `obj`, in rank order ([obj] on a single process)."""
    if not d.distributed:
        return [obj]
    import torch.distributed as dist

    data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8).to(device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(d.world)]
    dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64, device=device))
    longest = max(int(s.item()) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[:len(data)] = data
    parts = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(d.world)]
    dist.all_gather(parts, padded)
    return [json.loads(p[:int(s.item())].cpu().numpy().tobytes()) for p, s in zip(parts, sizes)]


def barrier(d: Dist) -> None:
    if d.distributed:
        import torch.distributed as dist

        dist.barrier()


def shard(idx: np.ndarray, d: Dist) -> np.ndarray:
    """This rank's contiguous share of one global batch of indices (neighbours in length stay together).

    A batch shorter than the world leaves some ranks empty; they still take part in the step (see train_step).
    """
    return np.array_split(idx, d.world)[d.rank] if d.world > 1 else idx


def close(d: Dist) -> None:
    if d.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# failures: one line naming the rank

# What gloo's TCP transport says (as a plain RuntimeError) when the rank on the other end of a collective died:
# "Connection closed by peer", "Read error [...]: Connection reset by peer", "Broken pipe", ...
_PEER_GONE = ("closed by peer", "reset by peer", "Broken pipe", "gloo/transport/")


def _is_peer_failure(e: BaseException) -> bool:
    """An error a rank sees because another rank went away (a collective broke), not its own fault."""
    import torch.distributed as dist

    return isinstance(e, getattr(dist, "DistError", ())) or any(m in str(e) for m in _PEER_GONE)


@contextmanager
def report_failure():
    """In a torchrun worker: turn any exception into torchrun's error file plus one line `error: rank R: ...` on
    stderr (the `--nproc` launcher prints that line itself), then exit 1 (2 for a QkvtraceError)."""
    try:
        yield
    except (Exception, KeyboardInterrupt) as e:
        rank = os.environ.get("RANK", "?")
        msg = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        if not isinstance(e, QkvtraceError):
            msg = f"{type(e).__name__}: {msg}"
        if _is_peer_failure(e):
            msg = f"(after another rank failed) {msg}"
        path = os.environ.get("TORCHELASTIC_ERROR_FILE")
        if path:
            # torchrun's error-file contract (torch.distributed.elastic.multiprocessing.errors): the agent reads it.
            with open(path, "w") as f:
                json.dump({"message": msg, "timestamp": str(int(time.time()))}, f)
        if not os.environ.get(LAUNCHED_ENV):
            print(f"error: rank {rank}: {msg}", file=sys.stderr)
        raise SystemExit(2 if isinstance(e, QkvtraceError) else 1) from None


@contextmanager
def _worker_env(nproc: int):
    """Each rank gets its share of the cores (torchrun would set 1 thread and warn about it); the launcher prints
    a failed rank's line itself. The caller's environment is restored afterwards."""
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc))),
           LAUNCHED_ENV: "1"}
    saved = {k: os.environ.get(k) for k in env}
    # torchelastic turns these signals into exceptions in the launching process and leaves it so; put them back.
    signals = [getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT") if hasattr(signal, n)]
    handlers = {s: signal.getsignal(s) for s in signals}
    os.environ.update(env)
    for name in ("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)  # the agent's banners; failures come back as one line
    try:
        yield
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _root_cause(e) -> QkvtraceError:
    """One line for torchelastic's ChildFailedError. A rank's own error comes first, then a rank killed by a signal
    other than SIGTERM (the OOM killer's SIGKILL, say), then one that only saw its peer go away, and last a rank
    that torchrun itself stopped with SIGTERM because another failed; within each, the earliest, then the lowest
    rank. (Timestamps are whole seconds, so a stopped rank often ties with the one that failed.)"""
    def key(item):
        rank, failure = item
        if failure.exitcode < 0:
            kind = 3 if -failure.exitcode == signal.SIGTERM else 1
        else:
            kind = 2 if "after another rank failed" in str(failure.message) else 0
        return (kind, failure.timestamp or 0, rank)

    rank, failure = min(e.failures.items(), key=key)
    return QkvtraceError(f"rank {rank}: {failure.message}")


def launch_function(nproc: int, fn, *args) -> dict:
    """Call `fn(*args)` in `nproc` fresh processes on this machine (torchelastic, spawn); returns {rank: result}.
    `fn` must be importable at module level and `dist.setup` inside it joins the group."""
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, start_method="spawn")
    with _worker_env(nproc):
        try:
            return elastic_launch(config, fn)(*args)
        except ChildFailedError as e:
            raise _root_cause(e) from None


def launch(nproc: int, argv: list[str]) -> None:
    """Run `python -m qkvtrace *argv` in `nproc` processes on this machine through torch.distributed.run
    (torchrun --standalone); a failed rank raises QkvtraceError naming the rank and its error.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if nproc < 1:
        raise QkvtraceError(f"nproc {nproc}: must be at least 1")
    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "--module", "qkvtrace", *argv])
    with _worker_env(nproc):
        try:
            run(args)
        except ChildFailedError as e:
            raise _root_cause(e) from None
