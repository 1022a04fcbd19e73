"""The client core: every decision of ``Client`` and ``AsyncClient`` that involves no IO.

``Client`` (sync.py) and ``AsyncClient`` (aio.py) only move frames; what
goes into a request (``requests``, ``options``), how a reply becomes a Python
value, which exception a wire error becomes, and which timeout applies are
decided here, once, for both (the httpx ``BaseClient`` split, STYLE §1.5).
Which request ids wait for replies is the ``pending`` table's.

A request from send to its end is an ``Exchange``: a twin sends its message,
feeds it every reply until it says it is done, and returns its value. A unary
``Call`` ends at its terminal reply (``Unary``); ``draft_tokens`` collects the
token ids of a stream (``Draft``). Stream replies become ``Event`` objects
(``event_of``).

Errors cross one boundary (``raise_for_error``): an ``ErrorReply`` becomes
the ``ErllamaError`` subclass of its code (``protocol.errors.error_for``)
with the remote traceback, if any, as ``__cause__``. Transport failures are
``DaemonUnavailableError`` (no daemon, or it went away with requests in
flight) and ``RequestTimeoutError`` (a configured deadline passed).

Turned down: per-call ``timeout=`` keywords (they would collide with the
request options namespace of ``complete``/``stream``; set them on the client).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

import zmq

from erllama.client.models import Event, Timeout
from erllama.client.requests import DRAFT_TIMEOUT_S, Call, Requests
from erllama.protocol.auth import ClientCurve
from erllama.protocol.codec import Decoder, encode, peek_request_id
from erllama.protocol.errors import (
    DaemonUnavailableError,
    ErllamaError,
    ErrorCode,
    ProtocolError,
    RequestTimeoutError,
    error_for,
)
from erllama.protocol.messages import (
    TERMINAL_REPLIES,
    ClientReply,
    Complete,
    DoneEvent,
    ErrorReply,
    Msg,
    Reply,
    ThinkingDelta,
    ThinkingEnd,
    TokenEvent,
    ToolCallDelta,
    ToolCallEnd,
)
from erllama.protocol.sockets import LINGER_MS, MAX_MESSAGE_BYTES, default_client_endpoint

log = logging.getLogger(__name__)

T = TypeVar("T")
S = TypeVar("S", bound="zmq.Socket[Any]")

# Only these connection events matter: a handshake means a live daemon, a
# disconnect fails every request in flight (the daemon cannot answer them now).
MONITOR_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED


# ================================================================ replies
def raise_for_error(msg: ErrorReply) -> ErllamaError:
    """The exception for an ``ErrorReply`` (remote traceback in ``__cause__``)."""
    return error_for(msg.code, msg.message, detail=msg.detail, remote_tb=msg.remote_traceback)


def is_terminal(msg: Msg) -> bool:
    return type(msg) in TERMINAL_REPLIES


def finish(call: Call[T], msg: Msg) -> T:
    """The value of a unary call from its terminal reply.

    Raises:
        ErllamaError: the mapped error of an ``ErrorReply``.
        ProtocolError: a stream event answered a unary request.
    """
    if isinstance(msg, Reply):
        return call.parse(msg.result)
    if isinstance(msg, ErrorReply):
        exc = raise_for_error(msg)
        if call.on_error is not None:
            return call.on_error(exc)
        raise exc
    raise ProtocolError(
        f"unexpected {type(msg).__name__} in reply to a {type(call.msg).__name__} request",
        code=ErrorCode.MALFORMED,
    )


def event_of(msg: Msg) -> Event:
    """The ``Event`` of a stream reply.

    Raises:
        ErllamaError: the mapped error of an ``ErrorReply`` (the stream's end).
        ProtocolError: a plain ``Reply`` answered a stream.
    """
    rid = msg.request_id
    if isinstance(msg, TokenEvent):
        return Event("token", rid, msg.seq, text=msg.text, token_id=msg.token_id)
    if isinstance(msg, ThinkingDelta):
        return Event("thinking_delta", rid, msg.seq, text=msg.text)
    if isinstance(msg, ThinkingEnd):
        return Event("thinking_end", rid, msg.seq, signature=msg.signature)
    if isinstance(msg, ToolCallDelta):
        return Event("tool_call_delta", rid, msg.seq, text=msg.text)
    if isinstance(msg, ToolCallEnd):
        return Event("tool_call_end", rid, msg.seq, text=msg.text)
    if isinstance(msg, DoneEvent):
        return Event("done", rid, msg.seq, stats=msg.stats)
    if isinstance(msg, ErrorReply):
        raise raise_for_error(msg)
    raise ProtocolError(f"unexpected {type(msg).__name__} in a stream", code=ErrorCode.MALFORMED)


def draft_event(msg: Msg, tokens: list[int]) -> bool:
    """Fold one reply of a draft into ``tokens`` (every token id); True at its end.

    Raises:
        ErllamaError: the draft's ``error`` event, mapped.
        ProtocolError: a plain ``Reply`` answered the stream.
    """
    if isinstance(msg, TokenEvent):
        tokens.append(msg.token_id)
        return False
    if isinstance(msg, DoneEvent):
        return True
    if isinstance(msg, ThinkingDelta | ThinkingEnd | ToolCallDelta | ToolCallEnd):
        return False
    if isinstance(msg, ErrorReply):
        raise raise_for_error(msg)
    raise ProtocolError(f"unexpected {type(msg).__name__} in a draft", code=ErrorCode.MALFORMED)


# ================================================================ exchanges
class Exchange(Generic[T]):
    """One request from send to its end, with no IO.

    A twin sends ``msg``, waits up to ``timeout_s`` for each reply, and feeds it
    to ``feed`` until that returns True; ``value`` is then the result. ``ended``
    says a terminal reply arrived, so there is nothing left to cancel.
    """

    value: T

    def __init__(self, msg: Msg, *, cancellable: bool, timeout_s: float | None) -> None:
        self.msg = msg
        self.cancellable = cancellable  # send Cancel if the caller stops waiting first
        self.timeout_s = timeout_s
        self.ended = False

    def feed(self, reply: Msg) -> bool:
        raise NotImplementedError

    def timed_out(self, exc: RequestTimeoutError) -> RequestTimeoutError:
        """The error to raise when no reply came within ``timeout_s``."""
        return exc


class Unary(Exchange[T]):
    """A ``Call``: replies before the terminal one are ignored; it gives the call's value."""

    def __init__(self, call: Call[T], timeout_s: float | None) -> None:
        super().__init__(call.msg, cancellable=call.cancellable, timeout_s=timeout_s)
        self.call = call

    def feed(self, reply: Msg) -> bool:
        if not is_terminal(reply):
            return False
        self.ended = True
        self.value = finish(self.call, reply)
        return True


class Draft(Exchange[list[int]]):
    """``draft_tokens``: every token id of a greedy ``infer``, with its own timeout."""

    def __init__(self, msg: Complete, timeout_s: float) -> None:
        super().__init__(msg, cancellable=True, timeout_s=timeout_s)
        self.value = []

    def feed(self, reply: Msg) -> bool:
        self.ended = is_terminal(reply)
        return draft_event(reply, self.value)

    def timed_out(self, exc: RequestTimeoutError) -> RequestTimeoutError:
        return RequestTimeoutError(
            f"draft_tokens got no done within {self.timeout_s:g} s (the draft is cancelled)",
            code=ErrorCode.TIMEOUT,
        )


# ================================================================ the core
class ClientCore(Requests):
    """Configuration, the request builders and every IO-free step shared by the two clients."""

    # draft_tokens is client-side, over infer, as upstream's facade does it (workers/speculative.py)
    draft_timeout_s: float = DRAFT_TIMEOUT_S

    def __init__(
        self,
        endpoint: str | None,
        timeout: float | Timeout | None,
        curve: ClientCurve | None = None,
    ) -> None:
        if endpoint is not None and not isinstance(endpoint, str):
            raise TypeError(f"endpoint must be a str or None, not {type(endpoint).__name__}")
        self.endpoint = endpoint if endpoint is not None else default_client_endpoint()
        self.timeout = Timeout.coerce(timeout)
        self.curve = curve  # CURVE keys for a tcp:// endpoint (protocol/auth.py)
        self.decoder: Decoder[Any] = Decoder(ClientReply)

    # ---------------------------------------------------------------- sockets
    def check_endpoint(self) -> None:
        """Fail early, with a clear message, when an ipc endpoint has no socket file.

        Raises:
            DaemonUnavailableError: the ipc socket file does not exist.
        """
        if self.endpoint.startswith("ipc://"):
            path = self.endpoint[len("ipc://") :]
            if path and not path.startswith("@") and not os.path.exists(path):
                raise DaemonUnavailableError(
                    f"no daemon at {self.endpoint}: the socket file {path} does not exist "
                    "(is `erllama serve` running? ERLLAMA_ENDPOINT selects another endpoint)",
                    code=ErrorCode.DAEMON_UNAVAILABLE,
                )

    def configure(self, sock: zmq.Socket[Any]) -> None:
        """Options of the client's DEALER (set before connect)."""
        if self.curve is not None:
            self.curve.apply(sock)
        sock.setsockopt(zmq.LINGER, LINGER_MS)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        # queue nothing for a daemon that is not there: a send waits for the
        # connection (bounded by Timeout.connect) instead of vanishing
        sock.setsockopt(zmq.IMMEDIATE, 1)

    def unreachable(self) -> DaemonUnavailableError:
        return DaemonUnavailableError(
            f"no daemon answered at {self.endpoint} within {self.timeout.connect} s "
            "(is `erllama serve` running?)",
            code=ErrorCode.DAEMON_UNAVAILABLE,
        )

    @staticmethod
    def monitor_disconnected(frames: list[bytes]) -> bool:
        """Whether a socket-monitor message reports a lost connection."""
        if not frames or len(frames[0]) < 2:
            return False
        event = int.from_bytes(frames[0][:2], "little")
        return event == zmq.EVENT_DISCONNECTED

    def connect(self, ctx: zmq.Context[S]) -> tuple[S, S]:
        """The client's DEALER, connected, and its monitor socket (``ctx`` is destroyed on failure).

        Raises:
            DaemonUnavailableError: ZeroMQ refused the socket or the endpoint.
        """
        try:
            sock = ctx.socket(zmq.DEALER)
            self.configure(sock)
            monitor = sock.get_monitor_socket(MONITOR_EVENTS)
            sock.connect(self.endpoint)
        except zmq.ZMQError as exc:
            ctx.destroy(linger=0)
            raise DaemonUnavailableError(f"cannot connect to {self.endpoint}: {exc}") from exc
        return sock, monitor

    def daemon_gone(self) -> DaemonUnavailableError:
        return DaemonUnavailableError(
            f"the daemon at {self.endpoint} went away with this request in flight",
            code=ErrorCode.DAEMON_UNAVAILABLE,
        )

    # ---------------------------------------------------------------- frames
    def decode(self, frames: list[bytes]) -> tuple[str, Msg | ErllamaError]:
        """Decode one reply; an undecodable one becomes a ProtocolError for its request id."""
        try:
            msg: Msg = self.decoder.decode(frames)
        except ProtocolError as exc:
            rid = peek_request_id(frames[1]) if len(frames) > 1 else ""
            log.warning("undecodable reply for %r: %s", rid, exc)
            return rid, exc
        return msg.request_id, msg

    @staticmethod
    def frames(msg: Msg) -> list[bytes | memoryview]:
        return encode(msg)

    # ---------------------------------------------------------------- exchanges
    def unary(self, call: Call[T]) -> Unary[T]:
        return Unary(call, self.timeout.request)

    def draft(self, model: str, prefix: Sequence[int], max_tokens: object) -> Draft:
        return Draft(self.draft_tokens(model, prefix, max_tokens), self.draft_timeout_s)


# ================================================================ deadlines
def deadline_after(seconds: float | None) -> float | None:
    """A monotonic deadline ``seconds`` from now (None: no deadline)."""
    return None if seconds is None else time.monotonic() + seconds


def remaining_ms(deadline: float | None) -> int | None:
    """Milliseconds left until ``deadline`` for a poll (None: forever; 0: expired)."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    return 0 if left <= 0 else max(1, int(left * 1000 + 0.999))


def remaining_s(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())
