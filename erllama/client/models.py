"""The client's value types: ``ClientState``, ``Timeout``, the results ``Completion``, ``Event``.

Plain frozen dataclasses with no IO; ``erllama.client`` re-exports them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

from erllama.protocol.messages import CacheDelta, Stats

DEFAULT_CONNECT_TIMEOUT_S = 5.0

EventKind = Literal[
    "token", "thinking_delta", "thinking_end", "tool_call_delta", "tool_call_end", "done", "error"
]


class ClientState(enum.Enum):
    """Lifecycle of a client: it opens once (lazily, or on ``with``) and never reopens."""

    UNOPENED = 1
    OPENED = 2
    CLOSED = 3


@dataclass(frozen=True, slots=True)
class Timeout:
    """Deadlines of a client, in seconds; ``None`` waits forever.

    Attributes:
        request: a unary request, from send to its reply; for a stream, the
            wait for its first event. ``None`` (the default) waits as long as
            the daemon is connected: a worker crash is answered at once with
            ``worker_crashed``, and a daemon that goes away fails the request
            with ``DaemonUnavailableError``.
        connect: how long a request may wait for a connection to the daemon
            before ``DaemonUnavailableError``.
        stream_idle: the longest gap between two events of a stream.
    """

    request: float | None = None
    connect: float | None = DEFAULT_CONNECT_TIMEOUT_S
    stream_idle: float | None = None

    def __post_init__(self) -> None:
        for name in ("request", "connect", "stream_idle"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int | float) or value < 0):
                raise ValueError(f"Timeout.{name} must be None or a number >= 0, got {value!r}")

    @classmethod
    def coerce(cls, timeout: float | Timeout | None) -> Timeout:
        """``None`` -> the defaults; a number -> that many seconds for every phase."""
        if timeout is None:
            return cls()
        if isinstance(timeout, Timeout):
            return timeout
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise TypeError(f"timeout must be a number, a Timeout or None, not {timeout!r}")
        t = float(timeout)
        return cls(request=t, connect=t, stream_idle=t)


@dataclass(frozen=True, slots=True)
class Completion:
    """The result of ``complete`` (REFERENCE §1.5).

    Attributes:
        reply: the generated text, cut at the matched stop string.
        generated: tokens produced by this request (EOG and stop tokens included).
        context_tokens: prompt + generated tokens: exactly what is in the model's KV, so
            with thinking markers it also holds the thinking tokens ``generated`` leaves out.
        committed_tokens: ``len(context_tokens)``.
        finish_key: key of the full context if the finish save landed, else None.
        cache_hit_kind: ``exact``, ``partial``, ``cold`` or ``sticky``.
        finish_reason: ``stop``, ``length`` or ``cancelled``.
        stop_sequence: the stop string that fired, else None.
        cache_delta: tokens read from and created in the cache.
        stats: timings and counts (the ``done`` payload).
        request_id: the id the request travelled under.
    """

    reply: str
    generated: list[int]
    context_tokens: list[int]
    committed_tokens: int
    finish_key: bytes | None
    cache_hit_kind: str
    finish_reason: str
    stop_sequence: str | None
    cache_delta: CacheDelta
    stats: Stats
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class Event:
    """One event of a stream (REFERENCE §1.6).

    ``kind`` is ``token``, ``thinking_delta``, ``thinking_end``,
    ``tool_call_delta``, ``tool_call_end`` or ``done``. An ``error`` event is
    never yielded: the stream raises the mapped ``ErllamaError`` instead.

    Attributes:
        kind: the event kind.
        request_id: the stream's request id.
        seq: position of the event in its stream.
        text: the text fragment (token, deltas), or the whole span (``tool_call_end``).
        token_id: the token id (``token`` events).
        stats: the final stats (``done``).
        signature: the HMAC of the thinking block (``thinking_end``; empty if unsigned).
    """

    kind: EventKind
    request_id: str
    seq: int = 0
    text: str | None = None
    token_id: int | None = None
    stats: Stats | None = None
    signature: bytes | None = None
