"""``Handoff``: what a helper thread of meta (demoter, remote tier) hands to meta's loop.

No sockets: a deque of finished items and a non-blocking wakeup pipe whose read end
(``fd``) sits in meta's poller. ``put`` may run on any thread; ``take`` and ``close``
on the loop's.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class Handoff(Generic[T]):
    """Finished items for the loop, and a byte on ``fd`` each time one arrives."""

    def __init__(self) -> None:
        self._items: deque[T] = deque()
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    @property
    def fd(self) -> int:
        return self._r

    def put(self, item: T) -> None:
        self._items.append(item)
        with contextlib.suppress(BlockingIOError, OSError):  # full: the loop wakes anyway
            os.write(self._w, b"\0")

    def take(self) -> list[T]:
        """Everything handed over so far (drains the pipe first)."""
        with contextlib.suppress(BlockingIOError):
            while os.read(self._r, 512):
                pass
        out = []
        while self._items:
            out.append(self._items.popleft())
        return out

    def close(self) -> None:
        os.close(self._r)
        os.close(self._w)
