"""One child OS process as the root sees it: spawn, sentinel, signal, kill group, reap.

The process is started from ``multiprocess.get_context("spawn")`` (never fork:
llama.cpp, OpenMP and ZeroMQ start threads) with the target
``erllama.supervisor.entry.run_child(module, run_dir, child_id)``. The child
calls ``os.setsid()`` first thing, so its pid is also its process-group id and
``kill_group`` reaches whatever it started.

``sentinel`` is a file descriptor that becomes readable when the process
exits; the root registers it in its ``zmq.Poller`` and so learns of an exit
at once, without polling on a timer. Exit codes follow ``multiprocess``: a
death by signal N is ``-N`` (as circus reports it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
from typing import Any

import multiprocess

from erllama.supervisor.entry import run_child
from erllama.supervisor.tree import ChildSpec

log = logging.getLogger(__name__)

_SPAWN: Any = multiprocess.get_context("spawn")


def describe_exit(code: int) -> str:
    """A human reason for an exit code: ``exit code 3`` or ``killed by SIGKILL``."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}"
    return f"exit code {code}"


class ChildProcess:
    """A handle on one incarnation of a child."""

    def __init__(self, spec: ChildSpec, run_dir: str) -> None:
        self.spec = spec
        self.run_dir = run_dir
        self._proc: Any = None
        self.pid: int = 0
        self.sentinel: int = -1
        self.exitcode: int | None = None

    def start(self) -> None:
        """Spawn the process (returns once it exists; the handshake comes later)."""
        proc = _SPAWN.Process(
            target=run_child,
            args=(self.spec.module, self.run_dir, self.spec.child_id),
            kwargs={"parent_pid": os.getpid()},
            name=self.spec.child_id,
            daemon=False,
        )
        proc.start()
        self._proc = proc
        self.pid = int(proc.pid)
        self.sentinel = int(proc.sentinel)

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the child process itself (no-op once it is gone)."""
        if self.exitcode is None and self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the child's whole process group.

        Safe until the child is reaped: a zombie's pid (= its group id) cannot
        be reused. If the child has not called ``setsid`` yet, there is no
        such group and the child alone is signalled.
        """
        if not self.pid or self.exitcode is not None:
            return
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
        except PermissionError:  # pragma: no cover - group id taken by someone else
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def is_exited(self) -> bool:
        """Non-blocking: has the process exited (its sentinel is readable)?

        Does not reap, so ``kill_group`` stays safe until ``reap``.
        """
        if self.exitcode is not None:
            return True
        if self.sentinel < 0:
            return False
        readable, _, _ = select.select([self.sentinel], [], [], 0)
        return bool(readable)

    def reap(self) -> int:
        """Collect the exit code of an exited child (call after the sentinel fired).

        Any process left in the child's group is killed first, while the
        group id still cannot be reused.
        """
        if self.exitcode is not None:
            return self.exitcode
        self.kill_group(signal.SIGKILL)
        self._proc.join()
        code = self._proc.exitcode
        self.exitcode = int(code) if code is not None else -signal.SIGKILL
        with contextlib.suppress(Exception):
            self._proc.close()
        return self.exitcode

    def wait(self, timeout_s: float | None) -> int | None:
        """Block up to ``timeout_s`` for the exit (used only at the end of a shutdown)."""
        if self.exitcode is not None:
            return self.exitcode
        readable, _, _ = select.select([self.sentinel], [], [], timeout_s)
        if not readable:
            return None
        return self.reap()
