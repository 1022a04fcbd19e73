"""Signals as poller events: handlers only enqueue, a socketpair wakes the loop.

``signal.set_wakeup_fd`` writes a byte to the pair when a signal arrives, so
the root's ``zmq.Poller`` returns at once; the Python-level handler only
appends the signal number. The loop then takes the numbers with ``drain()``.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)


class SignalWakeup:
    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self._signals = signals
        self._pending: list[int] = []
        self._old_handlers: dict[int, Any] = {}
        self._old_fd = -1
        self._r: socket.socket | None = None
        self._w: socket.socket | None = None

    @property
    def fd(self) -> int | None:
        """The fd to poll (None when not installed: not on the main thread)."""
        return self._r.fileno() if self._r is not None else None

    def install(self) -> bool:
        if threading.current_thread() is not threading.main_thread():
            log.warning("not on the main thread: SIGTERM/SIGINT are not handled")
            return False
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        self._old_fd = signal.set_wakeup_fd(self._w.fileno(), warn_on_full_buffer=False)
        for sig in self._signals:
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        return True

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._pending.append(signum)  # only enqueue: the loop does the work

    def drain(self) -> list[int]:
        """The signals received since the last call (and empty the pair)."""
        if self._r is not None:
            with contextlib.suppress(BlockingIOError):
                while self._r.recv(512):
                    pass
        out, self._pending = self._pending, []
        return out

    def restore(self) -> None:
        if self._r is None or self._w is None:
            return
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        signal.set_wakeup_fd(self._old_fd)
        self._r.close()
        self._w.close()
        self._r = self._w = None
