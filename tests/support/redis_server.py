"""A real Redis-protocol server for the remote-tier tests: ``redis-server`` on loopback.

``redis_server`` (a pytest fixture) starts ``redis-server --port <free> --save ''
--appendonly no --dir <tmp>`` bound to 127.0.0.1, waits until it answers PING, and
stops it at teardown (SIGTERM, then SIGKILL past a deadline), so no process is left
for the suite's leftover check. ``stop()`` / ``kill()`` / ``start()`` take the same
server down and up again on the same port (the fault tests).

Without ``redis-server`` on PATH a test that needs it FAILS (as the real-model tests do
without the model). ``ERLLAMA_SKIP_REDIS=1`` is the one explicit opt-out: the tests
are then skipped with a loud reason. ``scripts/setup`` installs the Debian package.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SKIP_REDIS_ENV = "ERLLAMA_SKIP_REDIS"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


def redis_missing(why: str) -> None:
    if os.environ.get(SKIP_REDIS_ENV) == "1":
        pytest.skip(f"REMOTE TIER TESTS SKIPPED ({SKIP_REDIS_ENV}=1): {why}")
    pytest.fail(
        f"{why}: the remote-tier tests need it (apt-get install redis-server, or set "
        f"{SKIP_REDIS_ENV}=1 to skip them instead)",
        pytrace=False,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(port: int, password: str | None = None) -> bool:
    """One PING over a raw socket (no client library needed), after AUTH if given."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            if password is not None:
                s.sendall(f"AUTH {password}\r\n".encode())
                if not s.recv(16).startswith(b"+OK"):
                    return False
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1:``port`` with its data under ``dir``."""

    def __init__(
        self, binary: str, dir: Path, *, maxmemory: str | None = None, password: str | None = None
    ) -> None:
        self.binary = binary
        self.dir = dir
        self.port = free_port()
        self.maxmemory = maxmemory
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self.dir),
                "--daemonize", "no", "--logfile", str(self.dir / "redis.log")]  # fmt: skip
        if self.maxmemory:
            args += ["--maxmemory", self.maxmemory, "--maxmemory-policy", "allkeys-lru"]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        delay = 0.005
        while not _answers(
            self.port, self.password
        ):  # no event to wait on: poll PING with a backoff
            if self.proc.poll() is not None or time.monotonic() >= deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            threading.Event().wait(delay)
            delay = min(delay * 2, 0.1)

    def stop(self) -> None:
        """SIGTERM and wait (SIGKILL past the deadline)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL (the store lost in the middle of traffic)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(STOP_TIMEOUT_S)
        self.proc = None


@contextlib.contextmanager
def running_redis(tmp_path: Path, *, password: str | None = None) -> Iterator[RedisServer]:
    """A running redis-server on a free loopback port (``password``: AUTH required),
    stopped on exit."""
    binary = shutil.which("redis-server")
    if binary is None:
        redis_missing("redis-server is not on PATH")
        raise AssertionError("unreachable")
    data = tmp_path / "redis"
    data.mkdir()
    server = RedisServer(binary, data, password=password)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A running redis-server on a free loopback port, stopped at teardown."""
    with running_redis(tmp_path) as server:
        yield server


__all__ = ["SKIP_REDIS_ENV", "RedisServer", "free_port", "redis_server", "running_redis"]
