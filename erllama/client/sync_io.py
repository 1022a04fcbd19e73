"""The IO of the blocking client: one DEALER socket, a Poller and deadlines; and ``Stream``.

``SyncIO`` is the base of ``Client`` (sync.py, the public methods). It
belongs to one thread: ZeroMQ sockets are not thread-safe.

Sockets (in the client's own ``zmq.Context``, created on first use):
    connects  DEALER to the daemon's client endpoint (``ZMQ_IMMEDIATE``: a
              request waits up to ``Timeout.connect`` for the daemon, never
              queues for an absent one)
    binds     inproc PAIR, the DEALER's socket monitor (handshake and
              disconnect events only)

Every request carries a fresh request id; whichever call is waiting reads the
socket and puts each reply in its request's inbox (the ``pending`` table), so
several streams can be read alternately in one thread. A reply whose request
id is not pending (a stream that was cancelled or abandoned, a request that
timed out) is dropped. When the monitor reports a lost connection, every
pending request fails with ``DaemonUnavailableError``: a daemon that dies
never leaves a caller hanging.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
from types import TracebackType
from typing import Self, TypeVar

import zmq

from erllama.client._core import Exchange, deadline_after, remaining_ms
from erllama.client.base import BaseClient, StreamBase
from erllama.client.models import ClientState, Event, Timeout
from erllama.client.pending import Item, Pending
from erllama.client.requests import Call
from erllama.protocol.errors import ErllamaError, RequestTimeoutError
from erllama.protocol.messages import Msg

log = logging.getLogger(__name__)

T = TypeVar("T")
_Inbox = collections.deque[Item]


class Stream(StreamBase["SyncIO"]):
    """The events of one ``stream`` or ``infer`` request.

    Iterate it to get ``Event`` objects; the ``done`` event is the last one.
    An ``error`` event is not yielded: iteration raises the mapped
    ``ErllamaError`` (for example ``WorkerCrashedError``) and the stream ends.

    Leaving early cancels the request on the daemon: ``close()``, leaving a
    ``with`` block, or dropping the last reference to an unfinished stream
    sends ``Cancel`` for its request id (events still in flight are dropped
    on arrival, never waited for).

    Attributes:
        request_id: the request id of the stream (what ``Client.cancel`` takes).
    """

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> Event:
        """The next event.

        Raises:
            StopIteration: after the ``done`` event (or after an error was raised).
            ErllamaError: the stream's ``error`` event, mapped.
            RequestTimeoutError: ``Timeout.request`` passed before the first
                event, or ``Timeout.stream_idle`` between two events (the
                request is cancelled).
            DaemonUnavailableError: the daemon went away.
        """
        if self._finished:
            raise StopIteration
        try:
            msg = self._client._wait(self.request_id, self._deadline())
        except ErllamaError as exc:
            self._failed(exc)
            raise
        return self._event(msg)

    def close(self) -> None:
        """Stop the stream: cancel it on the daemon if it has not finished."""
        self._close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class SyncIO(BaseClient["zmq.Socket[bytes]", _Inbox]):
    """The blocking half of ``Client``: sockets, sends, and waits with deadlines."""

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        timeout: float | Timeout | None = None,
        curve_server_key: str | bytes | os.PathLike[str] | None = None,
        curve_secret_key: str | bytes | os.PathLike[str] | None = None,
        curve_public_key: str | bytes | None = None,
    ):
        table: Pending[_Inbox] = Pending(collections.deque, collections.deque.append)
        keys = (curve_server_key, curve_secret_key, curve_public_key)
        super().__init__(endpoint, timeout, *keys, table=table)
        self._poller = zmq.Poller()
        self._owner = threading.get_ident()
        self._busy = 0  # calls of this thread inside _wait (abandoned streams wait for them)

    # ================================================================ lifecycle
    def __enter__(self) -> Self:
        self._open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._close()

    def _open(self) -> None:
        self._refuse_closed()
        if self._state is ClientState.OPENED:
            return
        self._connect(zmq.Context)
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._owner = threading.get_ident()
        self._state = ClientState.OPENED

    def _close(self) -> None:
        if self._mark_closed():
            self._table.clear()
            self._teardown(linger=None)

    def __del__(self) -> None:
        if self._warn_unclosed("close() or `with`"):
            with contextlib.suppress(Exception):
                self._state = ClientState.CLOSED
                self._teardown(linger=0)

    # ================================================================ IO
    def _send(self, msg: Msg) -> None:
        assert self._sock is not None
        self._flush_abandoned()
        self._drain_monitor()
        timeout_ms = remaining_ms(deadline_after(self._core.timeout.connect))
        if not self._sock.poll(timeout_ms, zmq.POLLOUT):
            raise self._core.unreachable()
        try:
            self._sock.send_multipart(self._core.frames(msg), zmq.NOBLOCK)
        except zmq.Again:
            raise self._core.unreachable() from None

    def _send_cancel_nowait(self, target: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.send_multipart(self._core.frames(self._core.cancel_msg(target)), zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # no daemon: nothing to cancel there
            log.debug("cancel of %s not sent: %s", target, exc)

    def _start(self, msg: Msg, *, cancellable: bool) -> str:
        """Open if needed, register the request id, send."""
        rid = self._register(msg, cancellable=cancellable)
        try:
            self._send(msg)
        except BaseException:
            self._table.forget(rid)
            raise
        return rid

    def _wait(self, rid: str, deadline: float | None) -> Msg:
        """The next reply for ``rid``, dispatching others to their inboxes."""
        if self._state is not ClientState.OPENED:
            raise RuntimeError("the client has been closed")
        assert self._sock is not None and self._monitor is not None
        self._busy += 1
        try:
            while True:
                inbox = self._table.box(rid)
                if inbox:
                    item = inbox.popleft()
                    if isinstance(item, ErllamaError):
                        raise item
                    return item
                self._flush_abandoned()
                timeout_ms = remaining_ms(deadline)
                if timeout_ms == 0:
                    raise RequestTimeoutError(f"no reply to request {rid} within the deadline")
                ready = dict(self._poller.poll(timeout_ms))
                if self._monitor in ready:
                    self._drain_monitor()
                if self._sock in ready:
                    self._drain_socket()
        finally:
            self._busy -= 1

    def _drain_socket(self) -> None:
        assert self._sock is not None
        while True:
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._table.deliver(*self._core.decode(frames))

    def _drain_monitor(self) -> None:
        assert self._monitor is not None
        while True:
            try:
                frames = self._monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if self._core.monitor_disconnected(frames):
                # what was in flight on the lost connection will never be answered
                self._table.fail_all(self._core.daemon_gone)

    def _abandon(self, rid: str) -> None:
        if self._state is not ClientState.OPENED:
            return
        self._table.abandon(rid)
        if threading.get_ident() == self._owner and not self._busy:
            self._flush_abandoned()

    # ================================================================ exchanges
    def _run(self, ex: Exchange[T]) -> T:
        """Send ``ex.msg`` and feed ``ex`` its replies until it is done."""
        rid = self._start(ex.msg, cancellable=ex.cancellable)
        deadline = deadline_after(ex.timeout_s)
        try:
            while True:
                try:
                    reply = self._wait(rid, deadline)
                except RequestTimeoutError as exc:
                    raise ex.timed_out(exc) from None
                if ex.feed(reply):
                    return ex.value
        finally:
            self._forget(rid, cancel=ex.cancellable and not ex.ended)

    def _call(self, call: Call[T]) -> T:
        return self._run(self._core.unary(call))

    def _stream(self, msg: Msg) -> Stream:
        return Stream(self, self._start(msg, cancellable=True))
