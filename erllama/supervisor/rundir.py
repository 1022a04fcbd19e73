"""The root's ownership of its run directory: pid-file lock, stale sockets, ram tier dir.

``RunDir`` is what ``serve`` holds for the life of the root: ``claim`` (private
directory, pid-file lock), ``prepare`` (stale files of a dead daemon, a fresh ram
tier dir) and ``release`` (our files, the ram dir, the lock). Binds no socket.

* ``erllama.pid`` in the run directory is locked with ``flock`` for the life of
  the root. A second daemon on the same run directory fails to take the lock
  and refuses to start. The lock dies with its process, so the pid file of a
  SIGKILLed daemon is stale: the next daemon takes it over and removes the
  socket files the dead one left behind.
* ``daemon_id = sha256(realpath(run_dir))[:16]`` names the ram tier directory
  ``/dev/shm/erllama-<daemon_id>``, wiped and created at start, removed at stop.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
from pathlib import Path

from erllama.protocol.sockets import (
    CLIENT_SOCK,
    CONTROL_SOCK,
    EVENTS_SOCK,
    META_SOCK,
    SCHEDULER_SOCK,
    SCHEDULER_STATE,
    WORKERS_SOCK,
    ensure_private_dir,
)

log = logging.getLogger(__name__)

PID_FILE = "erllama.pid"
SOCKET_FILES = (CLIENT_SOCK, WORKERS_SOCK, CONTROL_SOCK, META_SOCK, EVENTS_SOCK, SCHEDULER_SOCK)
STATE_FILES = (SCHEDULER_STATE,)  # run-time state of one daemon's life
SHM_ROOT = Path("/dev/shm")


class RunDirBusyError(RuntimeError):
    """Another live daemon holds the run directory."""


def daemon_id_for(run_dir: Path | str) -> str:
    return hashlib.sha256(os.path.realpath(run_dir).encode()).hexdigest()[:16]


def ram_tier_dir(daemon_id: str) -> Path:
    return SHM_ROOT / f"erllama-{daemon_id}"


class RunDirLock:
    """The flock-held pid file of one root process."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / PID_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock and write our pid.

        Raises:
            RunDirBusyError: another live daemon holds it.
        """
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunDirBusyError(
                    f"{self.path}: {self._holder()} holds the run directory"
                ) from None
            # the previous owner may have unlinked the file between our open and our lock
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self._fd = fd
                return
            os.close(fd)
        raise RunDirBusyError(f"{self.path}: could not take the lock")

    def _holder(self) -> str:
        try:
            return f"daemon pid {self.path.read_text().strip() or '?'}"
        except OSError:
            return "another daemon"

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None


def remove_socket_files(run_dir: Path, extra: tuple[str, ...] = ()) -> list[str]:
    """Remove the daemon's socket and state files (stale ones at start, ours at stop)."""
    removed = []
    for name in (*SOCKET_FILES, *STATE_FILES, *extra):
        p = run_dir / name
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(name)
    return removed


def reset_ram_dir(path: Path) -> None:
    """Wipe and create the ram tier directory (mode 0700)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o700, parents=False, exist_ok=False)


def remove_ram_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def ipc_path(endpoint: str) -> Path | None:
    """The file behind an ``ipc://`` endpoint (None for tcp and the like)."""
    if endpoint.startswith("ipc://"):
        return Path(endpoint[len("ipc://") :])
    return None


class RunDir:
    """One root's run directory for the life of ``serve``.

    Args:
        path: the absolute run directory.
        endpoint: the client endpoint; an ``ipc://`` file outside ``path`` is
            removed at start and at stop as the socket files are.
        ram_tier: the cache has a ram tier (its directory is wiped and created).
    """

    def __init__(self, path: Path, endpoint: str, *, ram_tier: bool) -> None:
        self.path = path
        self.daemon_id = daemon_id_for(path)
        self._lock = RunDirLock(path)
        endpoint_file = ipc_path(endpoint)
        self._extra = (
            [endpoint_file] if endpoint_file is not None and endpoint_file.parent != path else []
        )
        self._ram_dir = ram_tier_dir(self.daemon_id) if ram_tier else None

    def claim(self) -> None:
        """Make the directory private and take the pid-file lock.

        Raises:
            RunDirBusyError: another live daemon holds it.
            OSError: the directory is not usable.
        """
        ensure_private_dir(self.path)
        self._lock.acquire()

    def prepare(self) -> None:
        """Remove a dead daemon's files; create a fresh ram tier dir."""
        stale = remove_socket_files(self.path)
        self._remove_extra()
        if stale:
            log.warning("removed stale socket files of a dead daemon: %s", ", ".join(stale))
        if self._ram_dir is not None:
            reset_ram_dir(self._ram_dir)

    def release(self) -> None:
        """Remove our socket files and the ram tier dir, then drop the lock."""
        remove_socket_files(self.path)
        self._remove_extra()
        if self._ram_dir is not None:
            remove_ram_dir(self._ram_dir)
        self._lock.release()

    def _remove_extra(self) -> None:
        for p in self._extra:
            p.unlink(missing_ok=True)
