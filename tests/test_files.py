"""files.py: atomic writes, atomic folder publication, locks, checksums, OS errors as one line, fault points."""

import errno
import os
import signal
import subprocess
import sys

import pytest

from qkvtrace import files
from qkvtrace.errors import QkvtraceError


def _no_leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_atomic_write_returns_the_sha256_of_what_is_on_disk(tmp_path):
    p = tmp_path / "a.txt"
    digest = files.atomic_write_text(p, "hello\n")
    assert p.read_text() == "hello\n"
    assert digest == files.sha256_file(p) == "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"
    assert files.atomic_save_npy(tmp_path / "x.npy", __import__("numpy").arange(3)) == files.sha256_file(tmp_path / "x.npy")
    assert _no_leftovers(tmp_path) == []


def test_full_disk_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    p = tmp_path / "a.txt"
    files.atomic_write_text(p, "old")

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files._Hashing, "write", full)
    with pytest.raises(QkvtraceError) as e:
        files.atomic_write_text(p, "new", option="--out")
    assert str(e.value) == f"out {p}: cannot write there: no space left on the device (ENOSPC)"
    assert p.read_text() == "old"
    assert _no_leftovers(tmp_path) == []


@pytest.mark.parametrize("where, reason", [("file", "ENOTDIR"), ("proc", "ENOENT"), ("sys", "EPERM")])
def test_unwritable_places_are_one_line_naming_the_path_and_reason(tmp_path, where, reason):
    if where == "file":
        (tmp_path / "f").write_text("x")
        dest = tmp_path / "f" / "out"
    elif where == "proc":
        dest = __import__("pathlib").Path("/proc/qkvtrace-test/out")
    else:
        if os.access("/sys", os.W_OK) and os.geteuid() != 0:
            pytest.skip("/sys is writable here")
        dest = __import__("pathlib").Path("/sys/qkvtrace-test")
    with pytest.raises(QkvtraceError) as e:
        with files.publish_dir(dest) as stage:
            (stage / "x").write_text("never")
    msg = str(e.value)
    assert msg.startswith(f"out {dest}") and "\n" not in msg
    assert reason in msg or (where == "sys" and ("EACCES" in msg or "EROFS" in msg))


def test_immutable_folder(tmp_path):
    d = tmp_path / "imm"
    d.mkdir()
    if subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i not available here")
    try:
        with pytest.raises(QkvtraceError, match=r"imm/out: cannot write .*\(EPERM\)|\(EACCES\)"):
            with files.publish_dir(d / "out") as stage:
                (stage / "x").write_text("never")
    finally:
        subprocess.run(["chattr", "-i", str(d)])
    assert list(d.iterdir()) == []


def test_publish_replaces_the_whole_folder_or_nothing(tmp_path):
    d = tmp_path / "out"
    with files.publish_dir(d) as stage:
        (stage / "a").write_text("1")
        (stage / "b").write_text("1")
    assert sorted(p.name for p in d.iterdir()) == ["a", "b"]
    with pytest.raises(QkvtraceError, match="already exists; pass force=True"):
        with files.publish_dir(d):
            pass
    with pytest.raises(RuntimeError):
        with files.publish_dir(d, force=True) as stage:
            (stage / "a").write_text("2")
            raise RuntimeError("failed half way")
    assert (d / "a").read_text() == "1" and (d / "b").read_text() == "1"
    with files.publish_dir(d, force=True) as stage:
        (stage / "a").write_text("2")
    assert sorted(p.name for p in d.iterdir()) == ["a"] and (d / "a").read_text() == "2"
    assert _no_leftovers(tmp_path) == []


def test_force_refuses_a_folder_of_foreign_files(tmp_path):
    d = tmp_path / "home"
    d.mkdir()
    (d / "thesis.tex").write_text("precious")
    with pytest.raises(QkvtraceError, match=r"holds files qkvtrace did not write \(thesis.tex\)"):
        with files.publish_dir(d, force=True, expected=["*.csv"]):
            pass
    assert (d / "thesis.tex").read_text() == "precious"


def test_merge_keeps_other_files_and_the_old_folder_intact(tmp_path):
    d = tmp_path / "tables"
    with files.publish_dir(d) as stage:
        (stage / "other.csv").write_text("keep")
        (stage / "t.csv").write_text("old")
    with files.publish_dir(d, merge=True) as stage:
        files.atomic_write_text(stage / "t.csv", "new")
        assert (d / "t.csv").read_text() == "old"  # hard links, never written in place
    assert (d / "other.csv").read_text() == "keep" and (d / "t.csv").read_text() == "new"


def test_leftovers_of_killed_writers_are_cleaned_and_a_half_swap_rolled_forward(tmp_path):
    d = tmp_path / "out"
    (tmp_path / ".out.new-99999999").mkdir()
    (tmp_path / ".out.new-99999999" / "big").write_bytes(b"0" * 1000)
    (tmp_path / ".out.old-99999999").mkdir()  # killed between the two renames of the fallback swap
    (tmp_path / ".out.old-99999999" / "a").write_text("old")
    (tmp_path / ".out.new-99999999" / "a").write_text("new")
    files.cleanup(d)
    assert (d / "a").read_text() == "new" and _no_leftovers(tmp_path) == []
    (tmp_path / ".out.new-99999998").mkdir()
    with files.publish_dir(d, force=True) as stage:
        (stage / "a").write_text("newer")
    assert _no_leftovers(tmp_path) == []


def test_fallback_swap_without_renameat2(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    d = tmp_path / "out"
    for v in ("1", "2"):
        with files.publish_dir(d, force=True) as stage:
            (stage / "a").write_text(v)
    assert (d / "a").read_text() == "2" and _no_leftovers(tmp_path) == []


LOCK_HOLDER = """
import sys, time
from qkvtrace import files
with files.lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_lock_refuses_with_the_holders_pid_and_is_released_by_a_kill(tmp_path):
    d = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(d)], stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=os.getcwd()))
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(QkvtraceError) as e:
            with files.lock(d, "--run-dir"):
                pass
        assert str(e.value).startswith(f"run_dir {d}: in use by process {p.pid}")
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    with files.lock(d, "--run-dir"):  # the kernel released the killed holder's lock
        with files.lock(d):  # re-entrant within one process
            pass
    assert _no_leftovers(tmp_path) == []


def test_verify_names_the_file_and_what_is_wrong(tmp_path):
    p = tmp_path / "X.npy"
    p.write_bytes(b"abc")
    files.verify(p, files.sha256_file(p), "manifest.json")
    p.write_bytes(b"abd")
    with pytest.raises(QkvtraceError, match=r"X.npy: damaged or replaced: sha256 \w{12}, manifest.json recorded"):
        files.verify(p, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", "manifest.json")
    p.unlink()
    with pytest.raises(QkvtraceError, match="X.npy: missing, but listed in manifest.json"):
        files.verify(p, None, "manifest.json")


def test_fault_point_kills_at_the_nth_hit(tmp_path):
    code = "from qkvtrace import files\nfor i in range(3):\n    print(i, flush=True)\n    files.fault('here')\n"
    env = dict(os.environ, PYTHONPATH=os.getcwd(), QKVTRACE_FAULT="here@2",
               QKVTRACE_FAULT_TRACE=str(tmp_path / "trace"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == -signal.SIGKILL and r.stdout.split() == ["0", "1"]
    assert (tmp_path / "trace").read_text().split() == ["here@1", "here@2"]


def test_fault_scope_names_and_counts_points_per_job(tmp_path, monkeypatch):
    """A figure worker names its points by job (`figure-3/publish.swapped@1`), counted afresh for each job, so a
    point traced in one run is reached again in the next whichever worker takes the job."""
    monkeypatch.setenv("QKVTRACE_FAULT_TRACE", str(tmp_path / "trace"))
    monkeypatch.setattr(files, "_FAULT_HITS", {})
    monkeypatch.setattr(files, "_FAULT_SCOPE", "")
    files.fault("here")
    for job in ("figure-3", "figure-5", "figure-3"):
        files.fault_scope(job)
        files.fault("here")
    assert (tmp_path / "trace").read_text().split() == ["here@1", "figure-3/here@1", "figure-5/here@1",
                                                        "figure-3/here@2"]
