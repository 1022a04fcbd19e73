"""``AsyncClient``: the asyncio client (``zmq.asyncio``, one reader task, futures per request).

An ``AsyncClient`` belongs to one event loop. Any number of coroutines of
that loop may use it at once: one reader task owns the receiving side and
demultiplexes replies by request id into one ``asyncio.Queue`` per pending
request; senders put whole messages on the DEALER (a send is atomic).

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
import collections
import contextlib
import logging
import os
import threading
import warnings
from collections.abc import Awaitable, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, TypeVar, cast

import zmq
import zmq.asyncio

from erllama.client._core import (
    MONITOR_EVENTS,
    Call,
    ClientCore,
    ClientState,
    Completion,
    Event,
    Timeout,
    daemon_gone,
    deadline_after,
    remaining_s,
)
from erllama.protocol.auth import client_curve
from erllama.protocol.errors import (
    DaemonUnavailableError,
    ErllamaError,
    ErrorCode,
    InternalError,
    RequestTimeoutError,
)
from erllama.protocol.messages import (
    CacheHit,
    DaemonStatus,
    ModelInfo,
    Msg,
    PrefillResult,
    SchedulerCheck,
    SchedulerStatus,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
_Item = Msg | ErllamaError


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


class AsyncStream:
    """The events of one ``stream`` or ``infer`` request (an async iterator).

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

    def __init__(self, client: AsyncClient, request_id: str) -> None:
        self._client = client
        self.request_id = request_id
        self._started = False
        self._finished = False

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> Event:
        """The next event.

        Raises:
            StopAsyncIteration: after the ``done`` event (or after an error was raised).
            ErllamaError: the stream's ``error`` event, mapped.
            RequestTimeoutError: ``Timeout.request`` before the first event or
                ``Timeout.stream_idle`` between events (the request is cancelled).
            DaemonUnavailableError: the daemon went away.
        """
        if self._finished:
            raise StopAsyncIteration
        t = self._client.timeout
        deadline = deadline_after(t.stream_idle if self._started else t.request)
        try:
            msg = await self._client._wait(self.request_id, deadline)
            self._started = True
            event = self._client._core.event(msg)
        except RequestTimeoutError:
            self._finish(cancel=True)
            raise
        except ErllamaError:
            self._finish(cancel=False)
            raise
        except asyncio.CancelledError:
            # the awaiting task was cancelled: the stream cannot be resumed reliably
            self._finish(cancel=True)
            raise
        if event.kind == "done":
            self._finish(cancel=False)
        return event

    async def aclose(self) -> None:
        """Stop the stream: cancel it on the daemon if it has not finished."""
        if not self._finished:
            self._finish(cancel=True)

    def _finish(self, *, cancel: bool) -> None:
        self._finished = True
        self._client._forget(self.request_id, cancel=cancel)

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __del__(self) -> None:
        if not getattr(self, "_finished", True):
            self._finished = True
            with contextlib.suppress(Exception):  # e.g. at interpreter shutdown
                self._client._abandon(self.request_id)


class AsyncClient:
    """An asyncio client of the erllama daemon (same methods as ``Client``, awaitable).

    Args:
        endpoint: the daemon's client endpoint; ``None`` uses
            ``$ERLLAMA_ENDPOINT``, else ``ipc://<run dir>/client.sock``.
        timeout: a ``Timeout``, a number of seconds for every phase, or
            ``None`` for the defaults (no request deadline; 5 s to connect).
        curve_server_key: for a ``tcp://`` endpoint with CURVE: the server's
            public key (z85, 40 characters) or its ``.key`` file.
        curve_secret_key: this client's ``.key_secret`` file (``erllama keys``),
            or its z85 secret key together with ``curve_public_key``. The
            public key must be in the daemon's ``curve_authorized_dir``; an
            unauthorized client gets no reply (``DaemonUnavailableError`` after
            ``Timeout.connect``).
        curve_public_key: this client's z85 public key (with a z85 secret key).

    The client opens on first use (or on ``async with``) inside a running
    loop, belongs to that loop, and cannot be reused after ``aclose()``.

    Example::

        async with erllama.AsyncClient() as c:
            async with await c.stream("default", "Hello") as s:
                async for ev in s:
                    print(ev.text or "", end="")
    """

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        timeout: float | Timeout | None = None,
        curve_server_key: str | bytes | os.PathLike[str] | None = None,
        curve_secret_key: str | bytes | os.PathLike[str] | None = None,
        curve_public_key: str | bytes | None = None,
    ):
        curve = client_curve(curve_server_key, curve_secret_key, curve_public_key)
        self._core = ClientCore(endpoint, timeout, curve)
        self._state = ClientState.UNOPENED
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._reader: asyncio.Task[None] | None = None
        self._broken: ErllamaError | None = None
        self._queues: dict[str, asyncio.Queue[_Item]] = {}
        self._cancellable: set[str] = set()
        self._abandoned: collections.deque[str] = collections.deque()

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

    # ================================================================ lifecycle
    async def __aenter__(self) -> AsyncClient:
        self._open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _open(self) -> None:
        if self._state is ClientState.CLOSED:
            raise RuntimeError("the client has been closed; create a new one")
        loop = asyncio.get_running_loop()
        if self._state is ClientState.OPENED:
            if loop is not self._loop:
                raise RuntimeError("an AsyncClient belongs to the event loop that opened it")
            return
        self._core.check_endpoint()
        ctx = zmq.asyncio.Context()
        try:
            sock = ctx.socket(zmq.DEALER)
            self._core.configure(sock)
            monitor = sock.get_monitor_socket(MONITOR_EVENTS)
            sock.connect(self._core.endpoint)
        except zmq.ZMQError as exc:
            ctx.destroy(linger=0)
            raise DaemonUnavailableError(f"cannot connect to {self._core.endpoint}: {exc}") from exc
        self._ctx, self._sock, self._monitor = ctx, sock, monitor
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._state = ClientState.OPENED
        self._reader = loop.create_task(self._read_loop(), name=f"erllama-client-reader {self}")

    async def aclose(self) -> None:
        """Cancel unfinished streams and completions, stop the reader, close the socket.

        Idempotent; the client cannot be used afterwards.
        """
        if self._state is ClientState.CLOSED:
            return
        was_open = self._state is ClientState.OPENED
        self._state = ClientState.CLOSED
        if was_open:
            for rid in [*self._abandoned, *self._cancellable]:
                self._send_cancel_nowait(rid)
        self._abandoned.clear()
        self._cancellable.clear()
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        # whoever still waits learns that the client is gone
        for q in list(self._queues.values()):
            q.put_nowait(DaemonUnavailableError("the client was closed while waiting"))
        self._queues.clear()
        self._teardown(linger=None)

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

    def __del__(self) -> None:
        if getattr(self, "_state", None) is ClientState.OPENED:
            warnings.warn(
                f"unclosed {type(self).__name__} to {self._core.endpoint}; use aclose() "
                "or `async with`",
                ResourceWarning,
                stacklevel=2,
            )

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
            self._broken = InternalError(f"the client's reader failed: {exc!r}")
            for q in list(self._queues.values()):
                q.put_nowait(InternalError(f"the client's reader failed: {exc!r}"))

    def _drain_socket(self) -> None:
        while self._sock is not None:
            try:
                frames: list[bytes] = _now(self._sock.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            rid, item = self._core.decode(frames)
            q = self._queues.get(rid)
            if q is None:
                log.debug("reply for %r dropped: not pending", rid)
                continue
            q.put_nowait(item)

    def _drain_monitor(self) -> None:
        while self._monitor is not None:
            try:
                frames: list[bytes] = _now(self._monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            if self._core.monitor_disconnected(frames):
                for q in list(self._queues.values()):
                    q.put_nowait(daemon_gone(self._core.endpoint))

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
        if self._state is ClientState.CLOSED:
            raise RuntimeError("the client has been closed; create a new one")
        self._open()
        if self._broken is not None:
            raise self._broken
        rid = msg.request_id
        self._queues[rid] = asyncio.Queue()
        if cancellable:
            self._cancellable.add(rid)
        try:
            await self._send(msg)
        except BaseException:
            self._queues.pop(rid, None)
            self._cancellable.discard(rid)
            raise
        return rid

    async def _wait(self, rid: str, deadline: float | None) -> Msg:
        if self._state is not ClientState.OPENED:
            raise RuntimeError("the client has been closed")
        q = self._queues.get(rid)
        if q is None:
            raise RuntimeError(f"request {rid} is not pending")
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

    def _forget(self, rid: str, *, cancel: bool) -> None:
        self._queues.pop(rid, None)
        self._cancellable.discard(rid)
        if cancel and self._state is ClientState.OPENED:
            self._send_cancel_nowait(rid)

    def _abandon(self, rid: str) -> None:
        """A stream was dropped unfinished (possibly from a GC in another thread)."""
        if self._state is not ClientState.OPENED or self._loop is None:
            return
        self._abandoned.append(rid)
        if threading.get_ident() != self._loop_thread:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to cancel
                self._loop.call_soon_threadsafe(self._flush_abandoned)
        else:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon(self._flush_abandoned)

    def _flush_abandoned(self) -> None:
        while self._abandoned:
            try:
                rid = self._abandoned.popleft()
            except IndexError:
                return
            self._forget(rid, cancel=True)

    async def _call(self, call: Call[T]) -> T:
        rid = await self._start(call.msg, cancellable=call.cancellable)
        deadline = deadline_after(self._core.timeout.request)
        done = False
        try:
            while True:
                msg = await self._wait(rid, deadline)
                if self._core.is_terminal(msg):
                    done = True
                    return self._core.finish(call, msg)
        finally:
            self._forget(rid, cancel=call.cancellable and not done)

    async def _stream(self, msg: Msg) -> AsyncStream:
        rid = await self._start(msg, cancellable=True)
        return AsyncStream(self, rid)

    # ================================================================ lifecycle API
    async def load_model(
        self, config: Mapping[str, Any] | None = None, model_id: str | None = None
    ) -> str:
        """Start a worker for a model and wait until it is loaded.

        Args:
            config: the model spec (REFERENCE §2); ``None`` or ``{}`` loads the bundled model.
            model_id: the id to load it under; ``None`` generates ``erllama_model_<N>``.

        Returns:
            The model id.

        Raises:
            ConflictError: ``already_loaded``.
            ModelLoadError: ``load_failed``, ``malformed_gguf``, ``oom``, ``context_failed``.
            InvalidRequestError: ``bad_request`` for an invalid config.
        """
        return await self._call(self._core.load_model(config, model_id))

    async def unload(self, model: str) -> None:
        """Stop a model's worker, saving its live KV first; returns once it has exited.

        The worker stops admitting (later requests get ``shutting_down``), lets the
        running request finish (cancelled after ``supervisor.drain_timeout_s``), takes
        the shutdown save of its live sequence and waits for its queued saves, up to
        ``cache.evict_save_timeout_ms`` (a save still unwritten then is abandoned and
        counted in ``saves_timed_out``). Its cache rows stay.

        Args:
            model: the model id.

        Raises:
            UnknownModelError: ``not_found``.
        """
        await self._call(self._core.unload(model))

    unload_model = unload

    async def list_models(self) -> list[ModelInfo]:
        """Every model the daemon knows, with its state.

        Returns:
            One ``ModelInfo`` per model.
        """
        return await self._call(self._core.list_models())

    async def model_info(self, model: str) -> ModelInfo:
        """One model's info.

        Args:
            model: the model id.

        Returns:
            The model's ``ModelInfo``.

        Raises:
            UnknownModelError: ``noproc`` for an unknown model.
        """
        return await self._call(self._core.model_info(model))

    # ================================================================ inference
    async def complete(self, model: str, prompt: str, **opts: Any) -> Completion:
        """Generate a completion and wait for it.

        Args:
            model: the model id.
            prompt: the prompt text.
            **opts: request options (see ``Client.complete``).

        Returns:
            The ``Completion``.

        Raises:
            InvalidRequestError: an unknown option or a bad value.
            UnknownModelError: the model is not loaded.
            WorkerCrashedError: the model's process died during the request.
            RequestTimeoutError: ``Timeout.request`` passed (the request is cancelled).
        """
        return await self._call(self._core.complete(model, prompt, opts))

    async def prefill_only(self, model: str, tokens: Sequence[int], **opts: Any) -> PrefillResult:
        """Prefill ``tokens`` and fire the finish save, with no sampling (``prefill_only``).

        Args:
            model: the model id.
            tokens: the prompt tokens.
            **opts: ``parent_key`` and ``session_id`` (other request options are ignored).

        Returns:
            The ``PrefillResult``: ``finish_key`` (None when the save was gated out),
            ``context_tokens``, ``committed_tokens``, ``cache_hit_kind``, ``cache_delta``.

        Raises:
            InvalidRequestError: ``empty_prefix``, ``invalid_token``, ``context_overflow``.
            UnknownModelError: the model is not loaded.
        """
        return await self._call(self._core.prefill_only(model, tokens, opts))

    async def stream(self, model: str, prompt: str, **opts: Any) -> AsyncStream:
        """Generate a completion as a stream of events.

        The request is sent before this returns; iterate the returned
        ``AsyncStream`` with ``async for``.

        Args:
            model: the model id.
            prompt: the prompt text.
            **opts: request options, as for ``complete``.

        Returns:
            The ``AsyncStream``.

        Raises:
            InvalidRequestError: an unknown option or a bad value.
        """
        return await self._stream(self._core.stream(model, prompt, opts))

    async def infer(self, model: str, tokens: Sequence[int], **params: Any) -> AsyncStream:
        """Generate from a token prompt as a stream of events.

        Args:
            model: the model id.
            tokens: the prompt tokens.
            **params: request options, as for ``complete``.

        Returns:
            The ``AsyncStream``.

        Raises:
            InvalidRequestError: an unknown option, a bad value or a bad token.
        """
        return await self._stream(self._core.infer(model, tokens, params))

    async def cancel(self, request_id: str) -> None:
        """Cancel a request of this client (idempotent; an unknown id is a no-op).

        Args:
            request_id: the ``request_id`` of a stream or completion.
        """
        await self._call(self._core.cancel(request_id))

    # ================================================================ tokenizer
    async def tokenize(self, model: str, text: str, *, parse_special: bool = False) -> list[int]:
        """Tokenize text with the model's tokenizer (special tokens added).

        Args:
            model: the model id.
            text: the text.
            parse_special: turn special-token markers in the text (``<start_of_turn>``...)
                into those special tokens; off, they are tokenized as plain text.

        Returns:
            The token ids.
        """
        return await self._call(self._core.tokenize(model, text, parse_special=parse_special))

    async def detokenize(self, model: str, tokens: Sequence[int]) -> str:
        """Turn tokens back into text.

        Args:
            model: the model id.
            tokens: the token ids.

        Returns:
            The text.
        """
        return await self._call(self._core.detokenize(model, tokens))

    # ================================================================ observability
    async def counters(self) -> dict[str, int]:
        """The cache and daemon counters.

        Returns:
            Counter name -> value.
        """
        return await self._call(self._core.counters())

    async def vram_info(self) -> dict[str, int]:
        """See ``Client.vram_info``."""
        return await self._call(self._core.vram_info())

    # ================================================================ scheduler API
    async def scheduler_status(self) -> SchedulerStatus:
        """See ``Client.scheduler_status``."""
        return await self._call(self._core.scheduler_status())

    async def enable_scheduler(self) -> SchedulerStatus:
        """See ``Client.enable_scheduler``."""
        return await self._call(self._core.enable_scheduler(True))

    async def disable_scheduler(self) -> SchedulerStatus:
        """See ``Client.disable_scheduler``."""
        return await self._call(self._core.enable_scheduler(False))

    async def set_scheduler_thresholds(self, *, high: float, low: float) -> SchedulerStatus:
        """See ``Client.set_scheduler_thresholds``."""
        return await self._call(self._core.set_scheduler_thresholds(high, low))

    async def force_scheduler_check(self) -> SchedulerCheck:
        """See ``Client.force_scheduler_check``."""
        return await self._call(self._core.force_scheduler_check())

    async def phase(self, model: str) -> str:
        """Lock-free phase of a model (``idle`` for an unknown model).

        Args:
            model: the model id.

        Returns:
            ``idle``, ``prefilling`` or ``generating``.
        """
        return (await self._call(self._core.status_row(model))).phase

    async def pending_len(self, model: str) -> int:
        """Requests waiting in the model's queue (lock-free; 0 for an unknown model).

        Args:
            model: the model id.

        Returns:
            The queue length.
        """
        return (await self._call(self._core.status_row(model))).pending_len

    async def last_cache_hit(self, model: str) -> CacheHit | None:
        """The cache hit of the model's last admitted request (lock-free).

        Args:
            model: the model id.

        Returns:
            ``CacheHit(kind, prefix_len)``, or None.
        """
        return (await self._call(self._core.status_row(model))).last_cache_hit

    async def queue_depth(self, model: str | None = None) -> int:
        """Admitted streaming requests, of one model or of all.

        Args:
            model: the model id, or None for every model.

        Returns:
            The count.
        """
        return await self._call(self._core.queue_depth(model))

    async def list_cached_prefixes(self, model: str, tokens: Sequence[int]) -> int:
        """Length of the longest cached prefix of ``tokens`` for the model.

        Args:
            model: the model id.
            tokens: the prompt tokens.

        Returns:
            The matched length.

        Raises:
            UnknownModelError: ``model_not_loaded``.
        """
        return await self._call(self._core.list_cached_prefixes(model, tokens))

    async def status(self, model: str) -> str:
        """The model's phase, asked of its worker (a round trip).

        Args:
            model: the model id.

        Returns:
            ``idle``, ``prefilling`` or ``generating``.
        """
        return await self._call(self._core.status(model))

    async def evict(self, model: str) -> None:
        """Save the live state of the model's in-flight requests (reason ``evict``).

        Args:
            model: the model id.
        """
        await self._call(self._core.evict(model))

    async def shutdown(self, model: str) -> None:
        """Like ``evict`` with save reason ``shutdown``.

        Args:
            model: the model id.
        """
        await self._call(self._core.shutdown(model))

    async def daemon_status(self) -> DaemonStatus:
        """Models, cache tiers with usage and budgets, run directory and pid.

        Returns:
            The ``DaemonStatus``.
        """
        return await self._call(self._core.daemon_status())

    # ======================================================= templates, embeddings, adapters
    async def apply_chat_template(self, model: str, request: Mapping[str, Any]) -> list[int]:
        """Render a chat with the model's own template and tokenize it (REFERENCE §1.3).

        Args:
            model: the model id.
            request: ``{"messages": [{"role": str, "content": str}, ...], "system": str,
                "tools": [{"name": str, "description": str, "schema": ...}]}``;
                ``system`` and ``tools`` are optional and are folded into one leading
                system message.

        Returns:
            The prompt tokens (the assistant prefix included, one BOS).

        Raises:
            InvalidRequestError: ``badarg``, ``invalid_content`` (a role or content that
                is not a string), ``too_large``, ``tokenize_failed``.
            NotSupportedError: ``not_supported``, ``no_template`` (the GGUF has none),
                ``template_failed``.
        """
        return await self._call(self._core.apply_chat_template(model, request))

    async def embed(self, model: str, tokens: Sequence[int]) -> list[float]:
        """The embedding of ``tokens`` (a model loaded with ``context_opts.embeddings``).

        Args:
            model: the model id.
            tokens: 1 .. n_batch token ids.

        Returns:
            ``n_embd`` floats (mean-pooled, not normalised).

        Raises:
            NotSupportedError: ``not_supported`` (not in embedding mode), ``embed_failed``.
            InvalidRequestError: ``invalid_token`` (an empty list too),
                ``context_overflow``, ``batch_overflow``.
        """
        return await self._call(self._core.embed(model, tokens))

    async def load_adapter(self, model: str, path: str | os.PathLike[str]) -> str:
        """Attach a LoRA adapter (a GGUF file on the daemon's host) at scale 1.0.

        Requests admitted afterwards run with it, and their cache rows are keyed by the
        effective fingerprint of the adapter set (REFERENCE §3.3).

        Args:
            model: the model id.
            path: the adapter file (resolved by the worker).

        Returns:
            An opaque handle.

        Raises:
            InvalidRequestError: ``enoent``, ``eacces``, ``eisdir`` (detail: the path).
            ModelLoadError: ``load_failed`` (llama.cpp refused the file).
            NotSupportedError: ``not_supported`` (the stub backend).
        """
        return await self._call(self._core.load_adapter(model, path))

    async def unload_adapter(self, model: str, handle: str) -> None:
        """Detach an adapter (idempotent: an unknown handle is fine).

        Args:
            model: the model id.
            handle: a handle from ``load_adapter``.

        Raises:
            NotSupportedError: ``not_supported`` (the stub backend).
        """
        await self._call(self._core.unload_adapter(model, handle))

    async def set_adapter_scale(self, model: str, handle: str, scale: float) -> None:
        """Change an adapter's scale; it moves to the end of the list.

        Args:
            model: the model id.
            handle: a handle from ``load_adapter``.
            scale: the new scale (a finite number).

        Raises:
            UnknownModelError: ``not_found`` (unknown handle).
            InvalidRequestError: ``badarg`` (a scale that is not a finite number).
        """
        await self._call(self._core.set_adapter_scale(model, handle, scale))

    async def list_adapters(self, model: str) -> list[dict[str, Any]]:
        """The attached adapters, in list order.

        Args:
            model: the model id.

        Returns:
            ``[{"handle": str, "scale": float}, ...]`` (``[]`` when none).
        """
        return await self._call(self._core.list_adapters(model))

    # ================================================================ speculative decoding
    async def draft_tokens(
        self, model: str, prefix: Sequence[int], max: int | None = None
    ) -> list[int]:
        """Draft tokens for speculative decoding: one greedy ``infer`` of ``prefix``.

        Every generated token id is collected (also those with no text). If no ``done``
        arrives within 30 s the draft is cancelled and ``RequestTimeoutError`` is raised
        (upstream's facade; the client's own timeouts do not apply).

        Args:
            model: the drafting model's id.
            prefix: the context tokens.
            max: how many tokens to draft (``response_tokens``); 64 if None.

        Returns:
            The draft (may be shorter than ``max``: EOG, the context's end).

        Raises:
            InvalidRequestError: ``empty_prefix``, ``badarg`` (``max <= 0``),
                ``invalid_token``, ``context_overflow``.
            RequestTimeoutError: ``timeout`` (30 s).
            ErllamaError: the draft's ``error`` event (e.g. ``WorkerCrashedError``).
        """
        msg = self._core.draft_tokens(model, prefix, max)
        rid = await self._start(msg, cancellable=True)
        deadline = deadline_after(self._core.draft_timeout_s)
        tokens: list[int] = []
        done = False
        try:
            while True:
                try:
                    reply = await self._wait(rid, deadline)
                except RequestTimeoutError:
                    raise self._core.draft_timeout() from None
                done = self._core.is_terminal(reply)
                if self._core.draft_event(reply, tokens):
                    return tokens
        finally:
            self._forget(rid, cancel=not done)

    async def verify(
        self, model: str, prefix: Sequence[int], candidates: Sequence[int], k: int
    ) -> tuple[int, int | Literal["eos"]]:
        """Check draft ``candidates`` against the model's greedy choices after ``prefix``.

        One forward pass over ``prefix + candidates[:k]`` (REFERENCE §1.6); the model's
        live KV is left as it was up to the part verify reused (workers/speculative.py).

        Args:
            model: the verifying model's id; it must be idle (no running or queued request).
            prefix: the context tokens.
            candidates: the drafted tokens.
            k: how many candidates to check (``> 0``; more than ``len(candidates)`` is fine).

        Returns:
            ``(accepted, next_token)``: the number of leading candidates the model agrees
            with, and its greedy token after them, or ``"eos"`` for an end of generation.

        Raises:
            InvalidRequestError: ``badarg`` (``k <= 0``), ``empty_prefix``, ``invalid_token``,
                ``context_overflow``; ``bad_request`` for a ``k`` that is not an int.
            ConflictError: ``busy``: a request is running or queued on the model.
            NotSupportedError: ``not_supported``: the backend cannot verify.
        """
        return await self._call(self._core.verify(model, prefix, candidates, k))

    # ================================================================ debugging
    def _pending(self) -> list[str]:
        """Request ids waiting for replies (for tests)."""
        return list(self._queues)

    def __repr__(self) -> str:
        return f"<AsyncClient {self._core.endpoint} {self._state.name}>"
