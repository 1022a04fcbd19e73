"""Run-directory ownership: the flock-held pid file, stale sockets, the ram dir name."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from erllama.supervisor import rundir

pytestmark = pytest.mark.timeout(10)


def test_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    first = rundir.RunDirLock(tmp_path)
    first.acquire()
    assert (tmp_path / rundir.PID_FILE).read_text().strip() == str(os.getpid())
    with pytest.raises(rundir.RunDirBusyError, match="holds the run directory"):
        rundir.RunDirLock(tmp_path).acquire()  # flock is per open file: same process is refused
    first.release()
    assert not (tmp_path / rundir.PID_FILE).exists()
    again = rundir.RunDirLock(tmp_path)
    again.acquire()
    again.release()


def test_stale_pid_file_is_taken_over(tmp_path: Path) -> None:
    (tmp_path / rundir.PID_FILE).write_text("999999\n")  # a SIGKILLed daemon's, unlocked
    lock = rundir.RunDirLock(tmp_path)
    lock.acquire()
    assert (tmp_path / rundir.PID_FILE).read_text().strip() == str(os.getpid())
    lock.release()


def test_remove_socket_files(tmp_path: Path) -> None:
    for name in ("client.sock", "control.sock", "keep.txt"):
        (tmp_path / name).write_text("")
    removed = rundir.remove_socket_files(tmp_path)
    assert sorted(removed) == ["client.sock", "control.sock"]
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_daemon_id_and_ram_dir(tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    expected = hashlib.sha256(os.path.realpath(tmp_path).encode()).hexdigest()[:16]
    assert rundir.daemon_id_for(tmp_path) == rundir.daemon_id_for(link) == expected
    assert rundir.ram_tier_dir(expected) == Path(f"/dev/shm/erllama-{expected}")


def test_reset_ram_dir_wipes(tmp_path: Path) -> None:
    d = tmp_path / "ram"
    d.mkdir()
    (d / "old.kvc").write_bytes(b"x")
    rundir.reset_ram_dir(d)
    assert d.is_dir() and not list(d.iterdir())
    rundir.remove_ram_dir(d)
    assert not d.exists()
