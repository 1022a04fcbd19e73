"""The half of the twins that is the same for both: ``BaseClient`` and ``StreamBase``.

``BaseClient`` holds the core, the lifecycle state, the pending table and the
socket slots, and does every step of opening, closing and forgetting that
needs no waiting. ``StreamBase`` holds a stream's request id and turns its
replies into events. The twins add the IO: ``sync_io`` (a Poller with
deadlines) and ``aio_io`` (a reader task); ``sync`` and ``aio`` add the
public methods.

Sockets: none of its own; it closes the twin's DEALER, its monitor and their
context (``_teardown``).
"""

from __future__ import annotations

import abc
import contextlib
import os
import warnings
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import zmq

from erllama.client._core import ClientCore, deadline_after, event_of
from erllama.client.models import ClientState, Event, Timeout
from erllama.client.pending import Pending
from erllama.protocol.auth import client_curve
from erllama.protocol.errors import ErllamaError, RequestTimeoutError
from erllama.protocol.messages import Msg

S = TypeVar("S", bound="zmq.Socket[Any]")
B = TypeVar("B")
C = TypeVar("C", bound="BaseClient[Any, Any]")


class BaseClient(abc.ABC, Generic[S, B]):
    """What ``Client`` and ``AsyncClient`` share (``S``: the socket type, ``B``: the inbox)."""

    def __init__(
        self,
        endpoint: str | None,
        timeout: float | Timeout | None,
        curve_server_key: str | bytes | os.PathLike[str] | None,
        curve_secret_key: str | bytes | os.PathLike[str] | None,
        curve_public_key: str | bytes | None,
        *,
        table: Pending[B],
    ) -> None:
        curve = client_curve(curve_server_key, curve_secret_key, curve_public_key)
        self._core = ClientCore(endpoint, timeout, curve)
        self._state = ClientState.UNOPENED
        self._ctx: zmq.Context[S] | None = None
        self._sock: S | None = None
        self._monitor: S | None = None
        self._table = table
        # set when the twin's receiving side failed: every later request raises it
        self._broken: ErllamaError | None = None

    # ================================================================ properties
    @property
    def endpoint(self) -> str:
        """The endpoint this client connects to."""
        return self._core.endpoint

    @property
    def timeout(self) -> Timeout:
        """The client's deadlines."""
        return self._core.timeout

    @property
    def state(self) -> ClientState:
        """UNOPENED, OPENED or CLOSED."""
        return self._state

    # ================================================================ the twin's IO
    @abc.abstractmethod
    def _open(self) -> None:
        """Connect on first use (idempotent while open)."""

    @abc.abstractmethod
    def _send_cancel_nowait(self, target: str) -> None:
        """Send a Cancel for ``target`` without waiting (a lost one is only logged)."""

    @abc.abstractmethod
    def _abandon(self, rid: str) -> None:
        """A stream was dropped unfinished (maybe from a GC in another thread)."""

    # ================================================================ lifecycle
    def _refuse_closed(self) -> None:
        if self._state is ClientState.CLOSED:
            raise RuntimeError("the client has been closed; create a new one")

    def _connect(self, new_context: Callable[[], zmq.Context[S]]) -> None:
        """Create the context, the DEALER and its monitor (``ClientCore.connect``)."""
        self._core.check_endpoint()
        ctx = new_context()
        self._sock, self._monitor = self._core.connect(ctx)
        self._ctx = ctx

    def _mark_closed(self) -> bool:
        """CLOSED from now on; Cancel every unfinished request. False if already closed."""
        if self._state is ClientState.CLOSED:
            return False
        was_open = self._state is ClientState.OPENED
        self._state = ClientState.CLOSED
        for rid in self._table.close():
            if was_open:
                self._send_cancel_nowait(rid)
        return True

    def _teardown(self, *, linger: int | None) -> None:
        sock, monitor, ctx = self._sock, self._monitor, self._ctx
        self._sock = self._monitor = self._ctx = None
        if sock is not None:
            with contextlib.suppress(zmq.ZMQError):
                sock.disable_monitor()
            if monitor is not None:
                monitor.close(linger=0)
            sock.close(linger=linger)
        if ctx is not None:
            ctx.term()

    def _warn_unclosed(self, how: str) -> bool:
        """From ``__del__``: a ResourceWarning for a client left open; True if it was."""
        if getattr(self, "_state", None) is not ClientState.OPENED:
            return False
        warnings.warn(
            f"unclosed {type(self).__name__} to {self._core.endpoint}; use {how}",
            ResourceWarning,
            stacklevel=3,
        )
        return True

    # ================================================================ requests
    def _register(self, msg: Msg, *, cancellable: bool) -> str:
        """Open if needed and add the request to the table (before it is sent)."""
        self._refuse_closed()
        self._open()
        if self._broken is not None:
            raise self._broken
        rid = msg.request_id
        self._table.add(rid, cancellable=cancellable)
        return rid

    def _forget(self, rid: str, *, cancel: bool) -> None:
        self._table.forget(rid)
        if cancel and self._state is ClientState.OPENED:
            self._send_cancel_nowait(rid)

    def _flush_abandoned(self) -> None:
        for rid in self._table.take_abandoned():
            if self._state is ClientState.OPENED:
                self._send_cancel_nowait(rid)

    # ================================================================ debugging
    def _pending(self) -> list[str]:
        """Request ids waiting for replies (for tests)."""
        return self._table.ids()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._core.endpoint} {self._state.name}>"


class StreamBase(Generic[C]):
    """The events of one ``stream`` or ``infer`` request, without the waiting.

    Attributes:
        request_id: the request id of the stream (what ``cancel`` takes).
    """

    def __init__(self, client: C, request_id: str) -> None:
        self._client = client
        self.request_id = request_id
        self._started = False
        self._finished = False

    def _deadline(self) -> float | None:
        """``Timeout.request`` for the first event, ``Timeout.stream_idle`` after it."""
        t = self._client.timeout
        return deadline_after(t.stream_idle if self._started else t.request)

    def _event(self, msg: Msg) -> Event:
        """The event of one reply; the stream ends at ``done`` or at an error event."""
        self._started = True
        try:
            event = event_of(msg)
        except ErllamaError as exc:
            self._failed(exc)
            raise
        if event.kind == "done":
            self._finish(cancel=False)
        return event

    def _failed(self, exc: BaseException) -> None:
        """End the stream after ``exc``: a timeout or an interrupted wait cancels it on the
        daemon; an error the daemon sent has ended it there already."""
        cancel = isinstance(exc, RequestTimeoutError) or not isinstance(exc, ErllamaError)
        self._finish(cancel=cancel)

    def _finish(self, *, cancel: bool) -> None:
        self._finished = True
        self._client._forget(self.request_id, cancel=cancel)

    def _close(self) -> None:
        """Stop the stream: cancel it on the daemon if it has not finished."""
        if not self._finished:
            self._finish(cancel=True)

    def __del__(self) -> None:
        if not getattr(self, "_finished", True):
            self._finished = True
            with contextlib.suppress(Exception):  # e.g. at interpreter shutdown
                self._client._abandon(self.request_id)
