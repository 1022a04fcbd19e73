"""The pending-request table of a client: which request ids wait for replies, and what to cancel.

Pure bookkeeping, shared by ``Client`` and ``AsyncClient``: no sockets, no
event loop, no clock. It answers what to do (the ``cache.ledger`` habit): the
methods that drop requests return the request ids that need a ``Cancel``, and
the twin sends them.

Each pending request has an inbox of the twin's own kind (a ``deque`` for the
blocking client, an ``asyncio.Queue`` for the async one), made and filled by
the two functions the twin passes in, so a waiting coroutine is woken by the
same ``put`` that stores its reply.

One request id goes::

    add (cancellable or not) -> deliver* -> forget
                             \\-> abandon -> take_abandoned (forgotten, to cancel)

``abandon`` may run in any thread (a stream dropped unfinished is collected
wherever the garbage collector runs): it only appends to a deque, and the
owner takes the queue at its next flush. Everything else belongs to the
owner's thread.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from typing import Generic, TypeVar

from erllama.protocol.errors import ErllamaError
from erllama.protocol.messages import Msg

log = logging.getLogger(__name__)

Item = Msg | ErllamaError
B = TypeVar("B")


class Pending(Generic[B]):
    """Request id -> inbox, the cancellable ids, and the abandoned ids not yet cancelled.

    Args:
        new_box: makes an empty inbox.
        put: stores an item in an inbox (and wakes its waiter, for an async inbox).
    """

    def __init__(self, new_box: Callable[[], B], put: Callable[[B, Item], None]) -> None:
        self._new_box = new_box
        self._put = put
        self._boxes: dict[str, B] = {}
        self._cancellable: set[str] = set()
        self._abandoned: collections.deque[str] = collections.deque()

    def add(self, rid: str, *, cancellable: bool) -> None:
        """Register a request before it is sent; a cancellable one is cancelled if dropped."""
        self._boxes[rid] = self._new_box()
        if cancellable:
            self._cancellable.add(rid)

    def box(self, rid: str) -> B:
        """The inbox of a pending request.

        Raises:
            RuntimeError: ``rid`` is not pending (it ended or was forgotten).
        """
        box = self._boxes.get(rid)
        if box is None:
            raise RuntimeError(f"request {rid} is not pending")
        return box

    def deliver(self, rid: str, item: Item) -> bool:
        """Put a reply in its inbox; False (and dropped) when ``rid`` is not pending."""
        box = self._boxes.get(rid)
        if box is None:
            log.debug("reply for %r dropped: not pending", rid)
            return False
        self._put(box, item)
        return True

    def fail_all(self, error: Callable[[], ErllamaError]) -> None:
        """Put a fresh ``error()`` in every inbox (each waiter raises its own exception)."""
        for box in list(self._boxes.values()):
            self._put(box, error())

    def forget(self, rid: str) -> None:
        """Drop a request (idempotent); later replies for it are dropped on arrival."""
        self._boxes.pop(rid, None)
        self._cancellable.discard(rid)

    def abandon(self, rid: str) -> None:
        """Queue a request for forgetting and cancelling (safe from any thread)."""
        self._abandoned.append(rid)

    def take_abandoned(self) -> list[str]:
        """Forget every abandoned request; returns their ids, each to cancel."""
        taken: list[str] = []
        while self._abandoned:
            try:  # another thread's GC may append meanwhile; only this thread pops
                rid = self._abandoned.popleft()
            except IndexError:
                break
            self.forget(rid)
            taken.append(rid)
        return taken

    def close(self) -> list[str]:
        """Stop tracking cancellation; returns the ids to cancel (abandoned, then cancellable).

        The inboxes stay, so a twin can still wake their waiters (``fail_all``)
        before ``clear``.
        """
        to_cancel = [*self._abandoned, *self._cancellable]
        self._abandoned.clear()
        self._cancellable.clear()
        return to_cancel

    def clear(self) -> None:
        """Drop every inbox."""
        self._boxes.clear()

    def ids(self) -> list[str]:
        """The pending request ids, oldest first."""
        return list(self._boxes)
