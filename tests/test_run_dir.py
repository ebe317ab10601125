"""util/run_dir.py: run names, the run lock, stale temporaries, finding the newest run."""
import errno
import os
import socket
import subprocess
import sys

import pytest

from conftest import REPO
from util.run_dir import (RunDirectoryError, find_latest_run, lock_run_directory, release_run_directory,
                          remove_stale_temporaries)


def touch_checkpoint(run_dir, name, mtime):
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / name
    path.write_bytes(b"")
    os.utime(path, (mtime, mtime))


def test_find_latest_run_by_checkpoint_time(tmp_path):
    exp = tmp_path / "exp"
    touch_checkpoint(exp / "old", "best.pth", 1_000)
    touch_checkpoint(exp / "new", "latest.pth", 3_000)
    touch_checkpoint(exp / "middle", "best.pth", 2_000)
    (exp / "no_checkpoint").mkdir()
    os.utime(exp / "no_checkpoint", (9_000, 9_000))
    assert find_latest_run(exp) == exp / "new"
    touch_checkpoint(exp / "old", "latest.pth", 4_000)
    assert find_latest_run(exp) == exp / "old"


def test_find_latest_run_without_runs(tmp_path):
    assert find_latest_run(tmp_path / "absent") is None
    (tmp_path / "exp" / "empty_run").mkdir(parents=True)
    assert find_latest_run(tmp_path / "exp") is None


def test_find_latest_run_in_dataset_split_layout(tmp_path):
    older = tmp_path / "exp" / "pascal" / "1_16" / "default"
    newer = tmp_path / "exp" / "synthetic" / "1_8" / "lr=0.01"
    for run, stamp in ((older, 1_000_000_000), (newer, 2_000_000_000)):
        run.mkdir(parents=True)
        (run / "latest.pth").write_bytes(b"x")
        os.utime(run / "latest.pth", (stamp, stamp))
    assert find_latest_run(tmp_path / "exp") == newer


def dead_pid():
    """The pid of a process that has ended."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_second_lock_of_a_live_run_is_refused_in_one_line(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
sys.path.insert(0, {REPO!r})
from util.run_dir import lock_run_directory
lock_run_directory({str(tmp_path / "run")!r})
print("locked", flush=True)
time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirectoryError) as caught:
            lock_run_directory(tmp_path / "run")
        assert str(caught.value) == (f"{tmp_path / 'run'} is in use by process {holder.pid} on {socket.gethostname()} "
                                     "(see its run.lock): wait for that run to end, or give this one another run_name")
    finally:
        holder.kill()
        holder.wait()
    # Its owner gone (SIGKILL: it could not clean up), the lock is taken over and says so.
    descriptor, note = lock_run_directory(tmp_path / "run")
    assert note == f"took over {tmp_path / 'run' / 'run.lock'} from process {holder.pid} on {socket.gethostname()}, " \
                   "which no longer runs"
    assert (tmp_path / "run" / "run.lock").read_text() == f"{os.getpid()} {socket.gethostname()}\n"
    release_run_directory(descriptor)
    assert (tmp_path / "run" / "run.lock").read_text() == ""
    descriptor, note = lock_run_directory(tmp_path / "run")  # after a clean end: nothing to report
    assert note is None
    release_run_directory(descriptor)


def test_a_dead_owners_lock_file_is_taken_over(tmp_path):
    (tmp_path / "run").mkdir()
    pid = dead_pid()
    (tmp_path / "run" / "run.lock").write_text(f"{pid} {socket.gethostname()}\n")
    descriptor, note = lock_run_directory(tmp_path / "run")
    assert note.endswith(f"from process {pid} on {socket.gethostname()}, which no longer runs")
    release_run_directory(descriptor)


def test_a_file_system_without_locks_trains_on_and_says_so(tmp_path, monkeypatch):
    def no_locks(*args):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr("fcntl.lockf", no_locks)
    descriptor, note = lock_run_directory(tmp_path / "run")
    assert descriptor is None
    assert note == (f"{tmp_path / 'run' / 'run.lock'}: cannot lock the run directory (No locks available), so a "
                    "second launch of this run would not be refused")


def test_an_unwritable_run_directory_is_one_line(tmp_path, monkeypatch):
    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).endswith("run.lock"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(RunDirectoryError) as caught:
        lock_run_directory(tmp_path / "run")
    assert str(caught.value) == (f"{tmp_path / 'run' / 'run.lock'}: cannot create the run directory or its lock "
                                 "(Read-only file system)")


def test_temporaries_of_dead_writers_are_removed(tmp_path):
    dead = dead_pid()
    for name in (f".latest.pth.{dead}.tmp", f".best.pth.{dead}.tmp", f".best.pth.{os.getpid()}.tmp", "latest.pth",
                 "notes.tmp"):
        (tmp_path / name).write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == [f".best.pth.{dead}.tmp", f".latest.pth.{dead}.tmp"]
    assert sorted(os.listdir(tmp_path)) == [f".best.pth.{os.getpid()}.tmp", "latest.pth", "notes.tmp"]


def test_under_the_run_lock_every_temporary_is_stale(tmp_path):
    """A temporary written on another node (after a job moved hosts) names a pid that may run here: the lock's owner
    is the only writer, so under the lock none of them is live."""
    (tmp_path / ".latest.pth.1.tmp").write_bytes(b"x")  # pid 1 runs on every host
    assert remove_stale_temporaries(tmp_path) == []
    assert remove_stale_temporaries(tmp_path, locked=True) == [".latest.pth.1.tmp"]
    assert os.listdir(tmp_path) == []
