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


def test_run_dir_claim_prepare_release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rundir, "SHM_ROOT", tmp_path / "shm")
    (tmp_path / "shm").mkdir()
    run_dir, outside = tmp_path / "run", tmp_path / "elsewhere"
    outside.mkdir()
    endpoint_file = outside / "client.sock"
    owned = rundir.RunDir(run_dir, f"ipc://{endpoint_file}", ram_tier=True)
    owned.claim()
    with pytest.raises(rundir.RunDirBusyError):
        rundir.RunDir(run_dir, "tcp://127.0.0.1:1", ram_tier=False).claim()
    (run_dir / "control.sock").write_text("")  # a dead daemon's
    endpoint_file.write_text("")
    ram_dir = rundir.ram_tier_dir(owned.daemon_id)
    ram_dir.mkdir()
    (ram_dir / "old.kvc").write_bytes(b"x")
    owned.prepare()
    assert not (run_dir / "control.sock").exists() and not endpoint_file.exists()
    assert ram_dir.is_dir() and not list(ram_dir.iterdir())
    (run_dir / "events.sock").write_text("")
    owned.release()
    assert sorted(p.name for p in run_dir.iterdir()) == []
    assert not ram_dir.exists()
    again = rundir.RunDir(run_dir, "tcp://127.0.0.1:1", ram_tier=False)
    again.claim()
    again.release()
