"""The IO of the asyncio client (``zmq.asyncio``, one reader task, a queue per request).

Also ``AsyncStream``.

``AsyncIO`` is the base of ``AsyncClient`` (aio.py, the public methods). It
belongs to one event loop. Any number of coroutines of that loop may use it
at once: one reader task owns the receiving side and demultiplexes replies by
request id into one ``asyncio.Queue`` per pending request (the ``pending``
table); senders put whole messages on the DEALER (a send is atomic).

Sockets (in the client's own ``zmq.asyncio.Context``, created on first use):
    connects  DEALER to the daemon's client endpoint (``ZMQ_IMMEDIATE``)
    binds     inproc PAIR, the DEALER's socket monitor (handshake and
              disconnect events only)

The reader task is created on open and cancelled and awaited by
``aclose()``. A reply whose request id is not pending is dropped. A lost
connection fails every pending request with ``DaemonUnavailableError``. If
the reader itself fails, every pending request gets ``InternalError`` and
later requests raise it too (nothing hangs on a dead reader).

Cancellation: a coroutine cancelled while it waits (``asyncio.wait_for``,
``TaskGroup`` teardown) forgets its request and, for ``complete``, sends
``Cancel`` for it without awaiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Awaitable
from types import TracebackType
from typing import Any, Self, TypeVar, cast

import zmq
import zmq.asyncio

from erllama.client._core import Exchange, deadline_after, remaining_s
from erllama.client.base import BaseClient, StreamBase
from erllama.client.models import ClientState, Event, Timeout
from erllama.client.pending import Item, Pending
from erllama.client.requests import Call
from erllama.protocol.errors import (
    DaemonUnavailableError,
    ErllamaError,
    ErrorCode,
    InternalError,
    RequestTimeoutError,
)
from erllama.protocol.messages import Msg

log = logging.getLogger(__name__)

T = TypeVar("T")
_Inbox = asyncio.Queue[Item]


def _now(op: Awaitable[T]) -> T:
    """The result of a NOBLOCK ``zmq.asyncio`` receive, which is resolved on return.

    The sockets are only ever used through their ``zmq.asyncio`` wrappers (never
    a raw shadow): the wrapper re-checks ``ZMQ_EVENTS`` after each operation,
    and a raw send could swallow the edge-triggered wake-up of the reader
    task (a hang that was seen with concurrent senders).
    """
    fut = cast("asyncio.Future[T]", op)
    assert fut.done(), "a NOBLOCK zmq.asyncio receive resolves at once"
    return fut.result()


def _log_send_failure(fut: asyncio.Future[Any], target: str) -> None:
    if fut.cancelled():
        log.debug("cancel of %s not sent: the client closed", target)
    elif (exc := fut.exception()) is not None:  # no daemon: nothing to cancel there
        log.debug("cancel of %s not sent: %s", target, exc)


class AsyncStream(StreamBase["AsyncIO"]):
    """The events of one ``stream`` or ``infer`` request (an async iterator; see ``Stream``).

    ``async for event in stream`` yields ``Event`` objects; ``done`` is the
    last. An ``error`` event raises the mapped ``ErllamaError`` instead.

    Leaving early cancels the request: ``await aclose()``, leaving an
    ``async with`` block, or dropping the last reference to an unfinished
    stream sends ``Cancel`` for its request id. (``break`` out of a bare
    ``async for`` does not close an async iterator by itself: the cancel is
    then sent when the stream is garbage-collected, so prefer ``async with``.)

    Attributes:
        request_id: the request id of the stream.
    """

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> Event:
        """Async twin of ``Stream.__next__`` (``StopAsyncIteration`` at the end)."""
        if self._finished:
            raise StopAsyncIteration
        try:
            msg = await self._client._wait(self.request_id, self._deadline())
        except (ErllamaError, asyncio.CancelledError) as exc:
            # a cancelled awaiting task: the stream cannot be resumed reliably, so it is cancelled
            self._failed(exc)
            raise
        return self._event(msg)

    async def aclose(self) -> None:
        """Stop the stream: cancel it on the daemon if it has not finished."""
        self._close()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class AsyncIO(BaseClient[zmq.asyncio.Socket, _Inbox]):
    """The asyncio half of ``AsyncClient``: sockets, the reader task, sends and waits."""

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        timeout: float | Timeout | None = None,
        curve_server_key: str | bytes | os.PathLike[str] | None = None,
        curve_secret_key: str | bytes | os.PathLike[str] | None = None,
        curve_public_key: str | bytes | None = None,
    ):
        table: Pending[_Inbox] = Pending(asyncio.Queue, asyncio.Queue.put_nowait)
        keys = (curve_server_key, curve_secret_key, curve_public_key)
        super().__init__(endpoint, timeout, *keys, table=table)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._reader: asyncio.Task[None] | None = None

    # ================================================================ lifecycle
    async def __aenter__(self) -> Self:
        self._open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._aclose()

    def _open(self) -> None:
        self._refuse_closed()
        loop = asyncio.get_running_loop()
        if self._state is ClientState.OPENED:
            if loop is not self._loop:
                raise RuntimeError("an AsyncClient belongs to the event loop that opened it")
            return
        self._connect(zmq.asyncio.Context)
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._state = ClientState.OPENED
        self._reader = loop.create_task(self._read_loop(), name=f"erllama-client-reader {self}")

    async def _aclose(self) -> None:
        if not self._mark_closed():
            return
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        # whoever still waits learns that the client is gone
        self._table.fail_all(lambda: DaemonUnavailableError("the client was closed while waiting"))
        self._table.clear()
        self._teardown(linger=None)

    def __del__(self) -> None:
        self._warn_unclosed("aclose() or `async with`")

    # ================================================================ reader
    async def _read_loop(self) -> None:
        assert self._sock is not None and self._monitor is not None
        poller = zmq.asyncio.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        try:
            while True:
                ready = dict(await poller.poll())
                if self._monitor in ready:
                    self._drain_monitor()
                if self._sock in ready:
                    self._drain_socket()
                self._flush_abandoned()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("erllama client reader failed")
            reason = f"the client's reader failed: {exc!r}"
            self._broken = InternalError(reason)
            self._table.fail_all(lambda: InternalError(reason))

    def _drain_socket(self) -> None:
        while self._sock is not None:
            try:
                frames: list[bytes] = _now(self._sock.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            self._table.deliver(*self._core.decode(frames))

    def _drain_monitor(self) -> None:
        while self._monitor is not None:
            try:
                frames: list[bytes] = _now(self._monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            if self._core.monitor_disconnected(frames):
                self._table.fail_all(self._core.daemon_gone)

    # ================================================================ requests
    async def _send(self, msg: Msg) -> None:
        assert self._sock is not None
        self._flush_abandoned()
        self._drain_monitor()
        try:
            # ZMQ_IMMEDIATE: the send waits for a live connection; a send
            # cancelled by the deadline is dropped by zmq.asyncio, never sent late
            async with asyncio.timeout(self._core.timeout.connect):
                await self._sock.send_multipart(self._core.frames(msg))
        except TimeoutError:
            raise self._core.unreachable() from None

    def _send_cancel_nowait(self, target: str) -> None:
        """Send a Cancel without waiting (from ``finally`` blocks and callbacks)."""
        if self._sock is None:
            return
        frames = self._core.frames(self._core.cancel_msg(target))
        fut = cast("asyncio.Future[Any]", self._sock.send_multipart(frames, zmq.NOBLOCK))
        if fut.done():
            _log_send_failure(fut, target)
        else:  # queued behind another send
            fut.add_done_callback(lambda f: _log_send_failure(f, target))

    async def _start(self, msg: Msg, *, cancellable: bool) -> str:
        rid = self._register(msg, cancellable=cancellable)
        try:
            await self._send(msg)
        except BaseException:
            self._table.forget(rid)
            raise
        return rid

    async def _wait(self, rid: str, deadline: float | None) -> Msg:
        if self._state is not ClientState.OPENED:
            raise RuntimeError("the client has been closed")
        q = self._table.box(rid)
        timeout = remaining_s(deadline)
        if timeout is not None and timeout <= 0 and q.empty():
            raise RequestTimeoutError(f"no reply to request {rid} within the deadline")
        try:
            async with asyncio.timeout(timeout):
                item = await q.get()
        except TimeoutError:
            raise RequestTimeoutError(
                f"no reply to request {rid} within the deadline", code=ErrorCode.TIMEOUT
            ) from None
        if isinstance(item, ErllamaError):
            raise item
        return item

    def _abandon(self, rid: str) -> None:
        if self._state is not ClientState.OPENED or self._loop is None:
            return
        self._table.abandon(rid)
        if threading.get_ident() != self._loop_thread:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to cancel
                self._loop.call_soon_threadsafe(self._flush_abandoned)
        else:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon(self._flush_abandoned)

    # ================================================================ exchanges
    async def _run(self, ex: Exchange[T]) -> T:
        """Async twin of ``SyncIO._run``."""
        rid = await self._start(ex.msg, cancellable=ex.cancellable)
        deadline = deadline_after(ex.timeout_s)
        try:
            while True:
                try:
                    reply = await self._wait(rid, deadline)
                except RequestTimeoutError as exc:
                    raise ex.timed_out(exc) from None
                if ex.feed(reply):
                    return ex.value
        finally:
            self._forget(rid, cancel=ex.cancellable and not ex.ended)

    async def _call(self, call: Call[T]) -> T:
        return await self._run(self._core.unary(call))

    async def _stream(self, msg: Msg) -> AsyncStream:
        return AsyncStream(self, await self._start(msg, cancellable=True))
