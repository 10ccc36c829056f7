"""The one write path: atomic files, atomic publication of whole folders, locks, checksums, OS-error messages.

Every command that writes goes through here, so a kill at any moment leaves each output either as it was or
completely replaced, two commands never write one output at once, and what was written can be verified later.

- `atomic_write(path, data)`: a temporary file beside `path`, fsync'ed, then `os.replace`d onto it. Returns the
  sha256 of what was written.
- `publish_dir(dest)`: a context manager yielding a staging folder `.NAME.new-PID` beside `dest`; on success the
  staging folder takes `dest`'s place in one step. On Linux that step is `renameat2(RENAME_EXCHANGE)`, which swaps
  the two names atomically, so `dest` always names a complete folder (the old one, then the new one). Elsewhere
  it is two renames (`dest` -> `.NAME.old-PID`, staging -> `dest`); readers that meet the missing `dest` in that
  short window wait for it (`settled`), and the next writer rolls a killed swap forward. We chose the swap over a
  generation folder plus a pointer symlink because `dest` stays an ordinary folder that users copy, move and
  delete as they expect.
- `lock(path)`: an exclusive `flock` on `.NAME.lock` beside `path`, held for the whole command; the kernel
  releases it when the process dies, so a crash never blocks the next run. A refusal names the holder's pid.
- `sha256_file`, `verify`: checksums recorded in run.json / manifest.json when written, verified when loading.
- `os_error`: turns an OSError into one line naming the path and the OS reason.
- `fault(point)`: named points where `QKVTRACE_FAULT` kills or stops the process, for the fault-injection tests.

Leftovers of killed commands (`.NAME.tmp-PID`, `.NAME.new-PID`, `.NAME.old-PID`) are removed by the next command
that writes the same output; it holds the lock, so no live process owns them.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from qkvtrace.errors import QkvtraceError

# ----------------------------------------------------------------------------------------------------------------
# OS errors as one line

_REASONS = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted (immutable or protected?)",
            errno.EROFS: "read-only file system", errno.ENOTDIR: "a part of the path is a file, not a directory",
            errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
            errno.EISDIR: "is a directory", errno.ENAMETOOLONG: "file name too long",
            errno.EEXIST: "already exists", errno.ENOENT: "no such file or directory",
            errno.EIO: "input/output error", errno.EMFILE: "too many open files",
            errno.EXDEV: "on another file system", errno.ENOTEMPTY: "directory not empty",
            errno.EINVAL: "not a valid path here", errno.ELOOP: "too many symbolic links"}


def os_reason(e: OSError) -> str:
    """'read-only file system (EROFS)': the OS reason of `e` in words, with its errno name."""
    name = errno.errorcode.get(e.errno, "")
    words = _REASONS.get(e.errno) or (e.strerror or str(e)).lower()
    return f"{words} ({name})" if name else words


def _param(option: str | None) -> str | None:
    """The library parameter of an option name ("--run-dir" -> "run_dir"); the CLI turns it back into the option."""
    return option.lstrip("-").replace("-", "_") if option else None


def os_error(e: OSError, path: Path | str | None = None, option: str | None = None) -> QkvtraceError:
    """A QkvtraceError of one line naming the path the user gave (as `option`'s value), the file that failed and
    why."""
    failed = e.filename if e.filename is not None else path
    given = str(path if path is not None else failed)
    where = f"{given}: cannot write {failed}" if str(failed) != given else f"{given}: cannot write there"
    return QkvtraceError(f"{where}: {os_reason(e)}", param=_param(option) if path is not None else None)


@contextmanager
def os_errors(path: Path | str, option: str | None = None) -> Iterator[None]:
    """Turn any OSError raised inside the block into `os_error(e, path, option)`."""
    try:
        yield
    except OSError as e:
        raise os_error(e, path, option) from None


# ----------------------------------------------------------------------------------------------------------------
# fault injection

_FAULT_HITS: dict[str, int] = {}
_FAULT_SCOPE = ""


def fault_scope(scope: str) -> None:
    """Name the points this process reaches from now on `scope/point`, each counted from 1. A forked figure worker
    calls it for every job, so that a point's name and count depend on the job, not on which worker the pool gave
    it to (otherwise `publish.swapped@8` of one run may never be reached in the next)."""
    global _FAULT_SCOPE
    _FAULT_SCOPE = scope


def fault(point: str) -> None:
    """A named point where the fault-injection tests stop or kill this process.

    `QKVTRACE_FAULT="point[@n][:action],..."` acts at the n-th time (default 1st) `point` is reached: action
    `kill` (default) sends SIGKILL to this process, `stop` sends SIGSTOP (the test resumes it with SIGCONT).
    `QKVTRACE_FAULT_TRACE=FILE` appends every point reached to FILE, so a test can list the points of a command.
    Without either variable this is a dictionary lookup.
    """
    spec = os.environ.get("QKVTRACE_FAULT")
    trace = os.environ.get("QKVTRACE_FAULT_TRACE")
    if not spec and not trace:
        return
    if _FAULT_SCOPE:
        point = f"{_FAULT_SCOPE}/{point}"
    n = _FAULT_HITS[point] = _FAULT_HITS.get(point, 0) + 1
    if trace:
        with open(trace, "a", encoding="utf-8") as f:
            f.write(f"{point}@{n}\n")
    for item in (spec or "").split(","):
        where, _, action = item.strip().partition(":")
        name, _, count = where.partition("@")
        if name == point and int(count or 1) == n:
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGSTOP if action == "stop" else signal.SIGKILL)


# ----------------------------------------------------------------------------------------------------------------
# checksums

def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file's bytes, read in 16 MB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path | str, expected: str | None, record: str = "its record", fix: str = "",
           mentions: tuple[str, ...] = ()) -> None:
    """Raise a one-line error if `path` is missing or its sha256 differs from `expected` (None: not recorded).
    `fix` is the remedy, whose `{name}` placeholders are the parameters in `mentions` (see QkvtraceError)."""
    path = Path(path)
    if not path.is_file():
        raise QkvtraceError(f"{path}: missing, but listed in {record}" + (f"; {fix}" if fix else ""),
                            mentions=mentions)
    if expected is None:
        return
    actual = sha256_file(path)
    if actual != expected:
        raise QkvtraceError(f"{path}: damaged or replaced: sha256 {actual[:12]}, {record} recorded {expected[:12]}"
                            + (f"; {fix}" if fix else ""), mentions=mentions)


class _Hashing:
    """A write-only file wrapper that hashes what passes through (np.save writes through `write`)."""

    def __init__(self, f):
        self.f, self.h = f, hashlib.sha256()

    def write(self, data) -> int:
        self.h.update(data)
        return self.f.write(data)


# ----------------------------------------------------------------------------------------------------------------
# atomic files

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid_of(name: str, marker: str) -> int | None:
    """The pid at the end of a leftover name `.NAME{marker}PID`, or None."""
    tail = name.rpartition(marker)[2]
    return int(tail) if marker in name and tail.isdigit() else None


def _fsync_dir(path: Path) -> None:
    # The rename itself must reach the disk for the new name to survive a power cut; a kill needs only the rename.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path | str, data: bytes | str | Callable, option: str | None = None) -> str:
    """Write `data` to `path` so that `path` is always the old file or the whole new one; returns the sha256.

    `data` is bytes, text (UTF-8) or a function that writes to a binary file object. The temporary file
    `.NAME.tmp-PID` is removed if the write fails (e.g. a full disk); those of killed processes go the next time
    `path` is written. An OSError becomes a one-line QkvtraceError naming `path` (with `option`) and the reason.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if path.parent.is_dir():
            for old in path.parent.glob(f".{path.name}.tmp-*"):
                pid = _pid_of(old.name, ".tmp-")
                if pid is not None and pid != os.getpid() and not _alive(pid):
                    old.unlink(missing_ok=True)
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        try:
            with open(tmp, "wb") as f:
                w = _Hashing(f)
                if callable(data):
                    data(w)
                else:
                    w.write(data.encode("utf-8") if isinstance(data, str) else data)
                fault("write.tmp")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)
    except OSError as e:
        raise os_error(e, path, option) from None
    return w.h.hexdigest()


def atomic_write_text(path: Path | str, text: str, option: str | None = None) -> str:
    """Write `text` (UTF-8) to `path` atomically; returns its sha256."""
    return atomic_write(path, text, option)


def atomic_write_json(path: Path | str, obj, option: str | None = None) -> str:
    """Write `obj` as indented JSON atomically; returns its sha256."""
    return atomic_write(path, json.dumps(obj, indent=2, default=str) + "\n", option)


def atomic_save_npy(path: Path | str, array, option: str | None = None) -> str:
    """np.save `array` atomically, never pickled; returns its sha256."""
    import numpy as np

    return atomic_write(path, lambda f: np.save(f, array, allow_pickle=False), option)


# ----------------------------------------------------------------------------------------------------------------
# locks

_HELD: dict[str, list] = {}  # lock file -> [fd, depth]: re-entrant within one process (train inside run)


def _lock_path(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    return path.with_name(f".{path.name}.lock")


@contextmanager
def lock(path: Path | str, option: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock on the output `path` (a file or folder) for the block, or refuse at once.

    The lock is `flock` on `.NAME.lock` beside `path`, which holds the owner's pid and command line; the kernel
    drops it when the process ends in any way. The file is removed on release; a waiter that locked a file
    removed meanwhile notices (another inode at the path) and tries again. Creates `path`'s parent folders.
    """
    import fcntl

    lock_file = _lock_path(Path(path))
    key = str(lock_file)
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    created: list[Path] = []
    try:
        for parent in reversed(lock_file.parents):
            if not parent.exists():
                parent.mkdir()
                created.append(parent)
        while True:
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 4096).decode("utf-8", "replace").split("\n")
                os.close(fd)
                pid = holder[0].strip() or "?"
                what = f" ({holder[1].strip()})" if len(holder) > 1 and holder[1].strip() else ""
                raise QkvtraceError(f"{path}: in use by process {pid}{what}, which is writing it; wait for it to "
                                    "finish or choose another path", param=_param(option)) from None
            try:
                same = os.stat(lock_file).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed this file as we opened it: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\nqkvtrace {' '.join(sys.argv[1:3])}\n".encode())
    except OSError as e:
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:
                pass
        if e.filename == str(lock_file):
            e.filename = str(lock_file.parent)  # the user knows the folder, not our lock file's name
        raise os_error(e, path, option) from None
    _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        del _HELD[key]
        try:
            os.unlink(lock_file)
        except OSError:
            pass
        os.close(fd)
        for d in reversed(created):  # folders made for an output that was never written
            try:
                d.rmdir()
            except OSError:
                break


# ----------------------------------------------------------------------------------------------------------------
# folders

def _exchange(a: Path, b: Path) -> bool:
    """Swap the names `a` and `b` atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def cleanup(dest: Path | str) -> None:
    """Remove what killed writers of `dest` left beside it; finish a swap that a kill interrupted.

    Call only while holding `lock(dest)`: then no live process owns these leftovers.
    """
    dest = Path(os.path.abspath(dest))
    parent = dest.parent
    if not parent.is_dir():
        return
    news = sorted(parent.glob(f".{dest.name}.new-*"))
    olds = sorted(parent.glob(f".{dest.name}.old-*"))
    if not dest.exists() and olds:
        # Killed between the two renames of the fallback swap: the new folder was complete, so roll forward.
        pid = olds[-1].name.rpartition("-")[2]
        done = parent / f".{dest.name}.new-{pid}"
        os.rename(done if done.exists() else olds[-1], dest)
    for p in parent.glob(f".{dest.name}.new-*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    for p in parent.glob(f".{dest.name}.old-*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    for p in parent.glob(f".{dest.name}.tmp-*"):
        p.unlink(missing_ok=True)


def settled(path: Path | str, timeout: float = 2.0) -> Path:
    """`path`, after waiting out the instant of a two-rename swap in which it is missing (see module docstring)."""
    path = Path(path)
    deadline = time.monotonic() + timeout
    while not path.exists() and any(path.parent.glob(f".{path.name}.old-*")) and time.monotonic() < deadline:
        time.sleep(0.02)
    return path


def check_replaceable(dest: Path, force: bool, option: str, expected: Iterable[str] | None) -> None:
    """Refuse to replace an existing non-empty `dest` unless `force`; with `force`, refuse a folder holding names
    outside the glob patterns `expected` (a folder of other files that only happens to be named)."""
    if dest.exists() and not dest.is_dir():
        raise QkvtraceError(f"{dest}: exists and is not a directory", param=_param(option))
    if not dest.is_dir():
        return
    names = sorted(p.name for p in dest.iterdir())
    if names and not force:
        raise QkvtraceError(f"{dest}: already exists; pass {{force}} to replace it or choose another path",
                            param=_param(option), mentions=("force=True",))
    if names and expected is not None:
        import fnmatch

        pats = list(expected)
        foreign = [n for n in names if not any(fnmatch.fnmatch(n, p) for p in pats)]
        if foreign:
            raise QkvtraceError(f"{dest}: holds files qkvtrace did not write ({', '.join(foreign[:5])}"
                                f"{', ...' if len(foreign) > 5 else ''}); {{force}} replaces the whole folder, "
                                "so choose an empty or new directory", param=_param(option), mentions=("force=True",))


class Publication:
    """A new version of the folder `dest`, built in a staging folder and put in place by `commit()` in one step.

    Creating it takes `lock(dest)`, cleans the leftovers of killed writers and checks that `dest` may be replaced
    (an existing non-empty `dest` needs `force`, see `check_replaceable`). Write into `.path`, then `commit()`;
    `abort()` (or any failure) removes the staging folder and leaves `dest` as it was. With `merge` the staging
    folder starts as a hard-linked copy of `dest` (files are never modified in place, so the old folder stays
    intact) and the writer adds or replaces files: for outputs that share a folder, such as similarity tables.
    OSErrors become one-line errors naming `dest` and the OS reason. `publish_dir` is the same as a `with` block.
    """

    def __init__(self, dest: Path | str, force: bool = False, option: str = "--out",
                 expected: Iterable[str] | None = None, merge: bool = False):
        self.dest, self.option = Path(dest), option
        self.path = self.dest.with_name(f".{self.dest.name}.new-{os.getpid()}")
        self._lock = lock(self.dest, option)
        self._lock.__enter__()
        try:
            cleanup(self.dest)
            if not merge:
                check_replaceable(self.dest, force, option, expected)
            elif self.dest.exists() and not self.dest.is_dir():
                raise QkvtraceError(f"{self.dest}: exists and is not a directory", param=_param(option))
            if merge and self.dest.is_dir():
                shutil.copytree(self.dest, self.path, copy_function=os.link, symlinks=True)
            else:
                self.path.mkdir()
        except BaseException as e:
            self._end(e)
            if isinstance(e, OSError):
                raise os_error(e, self.dest, option) from None
            raise

    def commit(self) -> Path:
        """Put the staging folder in place of `dest`; returns `dest`."""
        try:
            fault("publish.staged")
            _fsync_dir(self.path)
            _swap(self.path, self.dest)
        except BaseException as e:
            self._end(e)
            if isinstance(e, OSError):
                raise os_error(e, self.dest, self.option) from None
            raise
        self._end(None)
        return self.dest

    def abort(self) -> None:
        """Remove the staging folder; `dest` stays as it was."""
        self._end(None)

    def _end(self, error) -> None:
        if self._lock is None:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        lock_cm, self._lock = self._lock, None
        lock_cm.__exit__(None, None, None)


@contextmanager
def publish_dir(dest: Path | str, force: bool = False, option: str = "--out", expected: Iterable[str] | None = None,
                merge: bool = False) -> Iterator[Path]:
    """`with publish_dir(dest) as staging:` write the new folder; it replaces `dest` when the block succeeds."""
    pub = Publication(dest, force, option, expected, merge)
    try:
        yield pub.path
    except BaseException:
        pub.abort()
        raise
    pub.commit()


def _swap(staging: Path, dest: Path) -> None:
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        if _exchange(staging, dest):
            fault("publish.swapped")
            _fsync_dir(dest.parent)
            shutil.rmtree(staging, ignore_errors=True)  # now the old folder
            return
        os.rename(dest, old)
        fault("publish.half-swapped")
    os.rename(staging, dest)
    fault("publish.swapped")
    _fsync_dir(dest.parent)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# checks before work (cheap, no lock)

def check_writable(path: Path | str, option: str = "--out", inside: bool = False) -> None:
    """Fail now, before any work, if `path` (a file or folder to be written or replaced, existing or not; with
    `inside`, a folder to write into) could not be written: a part of it is a file, or the nearest existing folder
    above it (or, with `inside`, at it) refuses a new file (read-only, immutable, /proc, no permission). Creates
    and removes one empty probe file there; creates no folder."""
    import tempfile

    path = Path(path)
    above = path.absolute() if inside else path.absolute().parent
    while not above.exists() and above != above.parent:
        above = above.parent
    try:
        if not above.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(above))
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.probe-", dir=above)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise os_error(type(e)(e.errno, e.strerror, str(above)), path, option) from None


def check_new_files(paths, force: bool = False, option: str = "--out") -> None:
    """Refuse to overwrite: an error naming the first of `paths` that exists, unless `force`."""
    if force:
        return
    for path in map(Path, paths):
        if path.exists():
            raise QkvtraceError(f"{path}: already exists; pass {{force}} to overwrite it or choose another path",
                                param=_param(option), mentions=("force=True",))
