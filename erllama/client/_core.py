"""The client core: every decision of ``Client`` and ``AsyncClient`` that involves no IO.

``Client`` (sync.py) and ``AsyncClient`` (aio.py) only move frames; what
goes into a request, how a reply becomes a Python value, which exception a
wire error becomes, and which timeout applies are decided here, once, for
both (the httpx ``BaseClient`` split, STYLE §1.5).

A client operation is a ``Call``: the request message (with a fresh
request id) plus the function that turns the ``Reply.result`` payload into
the value the method returns. Streams are ``Complete`` requests in mode
``stream`` or ``infer`` whose replies become ``Event`` objects.

Errors cross one boundary (``raise_for_error``): an ``ErrorReply`` becomes
the ``ErllamaError`` subclass of its code (``protocol.errors.error_for``)
with the remote traceback, if any, as ``__cause__``. Transport failures are
``DaemonUnavailableError`` (no daemon, or it went away with requests in
flight) and ``RequestTimeoutError`` (a configured deadline passed).

Turned down: per-call ``timeout=`` keywords (they would collide with the
request options namespace of ``complete``/``stream``; set them on the
client); defaulting options on the client side (``response_tokens`` and
friends are defaulted by the worker, from the model's config).
"""

from __future__ import annotations

import enum
import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

import msgspec
import zmq

from erllama.protocol.auth import ClientCurve
from erllama.protocol.codec import Decoder, decode_result, encode, peek_request_id
from erllama.protocol.errors import (
    DaemonUnavailableError,
    ErllamaError,
    ErrorCode,
    InvalidRequestError,
    ProtocolError,
    RequestTimeoutError,
    error_for,
)
from erllama.protocol.messages import (
    MAX_ADAPTER_SCALE,
    TERMINAL_REPLIES,
    AdapterInfo,
    ApplyChatTemplate,
    CacheDelta,
    CacheHit,
    Cancel,
    ClientReply,
    Complete,
    CompletionResult,
    DaemonStatus,
    Detokenize,
    DoneEvent,
    Embed,
    EnableScheduler,
    ErrorReply,
    Evict,
    ForceSchedulerCheck,
    GetCounters,
    GetDaemonStatus,
    GetModelInfo,
    GetSchedulerStatus,
    GetStatusRow,
    GetVramInfo,
    ListAdapters,
    ListCachedPrefixes,
    ListModels,
    LoadAdapter,
    LoadModel,
    ModelInfo,
    ModelStatus,
    Msg,
    PrefillResult,
    QueueDepth,
    Reply,
    RequestOptions,
    SchedulerCheck,
    SchedulerStatus,
    SetAdapterScale,
    SetSchedulerThresholds,
    ShutdownModel,
    Stats,
    StatusRow,
    ThinkingDelta,
    ThinkingEnd,
    TokenEvent,
    Tokenize,
    ToolCallDelta,
    ToolCallEnd,
    Unload,
    UnloadAdapter,
    Verify,
    VerifyResult,
)
from erllama.protocol.sockets import LINGER_MS, MAX_MESSAGE_BYTES, default_client_endpoint
from erllama.protocol.tokens import pack_tokens, unpack_tokens

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_CONNECT_TIMEOUT_S = 5.0
# Only these connection events matter: a handshake means a live daemon, a
# disconnect fails every request in flight (the daemon cannot answer them now).
MONITOR_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED

OPTION_NAMES: tuple[str, ...] = tuple(RequestOptions.__struct_fields__)

# draft_tokens (REFERENCE §1.2): upstream's facade waits 30 s for the draft, then cancels
DRAFT_TIMEOUT_S = 30.0
DRAFT_DEFAULT_TOKENS = 64
_K_MAX = 2**31 - 1  # verify's k: K' = min(k, len(candidates)), so a larger k means the same

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


# ================================================================ results
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


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One request and how to read its successful reply."""

    msg: Msg
    parse: Callable[[msgspec.Raw], T]
    # a Complete: send Cancel(target=request_id) if the caller stops waiting
    cancellable: bool = False
    # answer a request error with a default value instead of raising (lock-free status reads)
    on_error: Callable[[ErllamaError], T] | None = None

    @property
    def request_id(self) -> str:
        return self.msg.request_id


def new_request_id() -> str:
    """A fresh request id (uuid4 hex)."""
    return uuid.uuid4().hex


# ================================================================ options
def build_options(opts: Mapping[str, Any]) -> RequestOptions:
    """Validate request options on the client side (names and types).

    Args:
        opts: the keyword options of ``complete``/``stream``/``infer``.
            ``parent_key`` may be 32 bytes or 64 hex characters; ``None``
            values mean "unset".

    Returns:
        The options struct sent on the wire.

    Raises:
        InvalidRequestError: ``bad_request`` for an unknown option name or a
            value of the wrong type or size.
    """
    unknown = sorted(set(opts) - set(OPTION_NAMES))
    if unknown:
        raise InvalidRequestError(
            f"unknown option(s) {', '.join(unknown)}; valid options: {', '.join(OPTION_NAMES)}",
            code=ErrorCode.BAD_REQUEST,
            detail={"unknown": unknown, "valid": list(OPTION_NAMES)},
        )
    raw = {k: v for k, v in opts.items() if v is not None}
    key = raw.get("parent_key")
    if isinstance(key, str):
        try:
            raw["parent_key"] = bytes.fromhex(key)
        except ValueError:
            raise InvalidRequestError(
                "parent_key must be 32 bytes or 64 hex characters", code=ErrorCode.BAD_REQUEST
            ) from None
    elif isinstance(key, bytearray | memoryview):
        raw["parent_key"] = bytes(key)
    stops = raw.get("stop_sequences")
    if isinstance(stops, str):
        raise InvalidRequestError(
            "stop_sequences must be a list of strings, not a string", code=ErrorCode.BAD_REQUEST
        )
    if isinstance(stops, tuple):
        raw["stop_sequences"] = list(stops)
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "keep_alive"):
        # an int is a fine float here (temperature=1)
        if isinstance(raw.get(name), int) and not isinstance(raw.get(name), bool):
            raw[name] = float(raw[name])
    try:
        return msgspec.convert(raw, RequestOptions, strict=True)
    except msgspec.ValidationError as exc:
        raise InvalidRequestError(f"invalid option: {exc}", code=ErrorCode.BAD_REQUEST) from None


def _check_str(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidRequestError(
            f"{name} must be a str, not {type(value).__name__}", code=ErrorCode.BAD_REQUEST
        )
    return value


def _pack(tokens: Sequence[int]) -> bytes:
    if isinstance(tokens, str | bytes) or not isinstance(tokens, Sequence):
        raise InvalidRequestError(
            f"tokens must be a list of ints, not {type(tokens).__name__}",
            code=ErrorCode.BAD_REQUEST,
        )
    if any(isinstance(t, bool) or not isinstance(t, int) for t in tokens):
        raise InvalidRequestError("tokens must be ints", code=ErrorCode.INVALID_TOKEN)
    return pack_tokens(tokens)


CHAT_REQUEST_KEYS = ("messages", "system", "tools")


def chat_request(request: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of ``ApplyChatTemplate`` from an ``apply_chat_template`` request.

    Only the shape is checked here; the worker checks roles and contents (a non-string role
    or content is ``invalid_content`` there, REFERENCE D13).

    Raises:
        InvalidRequestError: ``badarg`` for a request that is not a map, an unknown key, or
            ``messages`` / ``tools`` that are not lists of maps, or a ``system`` that is not a
            string; ``invalid_content`` for values that cannot be sent at all.
    """

    def badarg(message: str) -> InvalidRequestError:
        return InvalidRequestError(message, code=ErrorCode.BADARG)

    if not isinstance(request, Mapping):
        raise badarg(f"request must be a dict, not {type(request).__name__}")
    unknown = sorted(str(k) for k in request if k not in CHAT_REQUEST_KEYS)
    if unknown:
        raise badarg(f"unknown key(s) {', '.join(unknown)}; valid: {', '.join(CHAT_REQUEST_KEYS)}")

    def maps(name: str, value: object) -> list[dict[str, Any]]:
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise badarg(f"{name} must be a list of dicts, not {type(value).__name__}")
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, Mapping):
                raise badarg(f"{name}[{i}] must be a dict, not {type(item).__name__}")
            out.append(dict(item))
        return out

    if "messages" not in request:
        raise badarg("request needs messages: [{role, content}, ...]")
    fields: dict[str, Any] = {"messages": maps("messages", request["messages"])}
    system = request.get("system")
    if system is not None and not isinstance(system, str):
        raise badarg(f"system must be a str, not {type(system).__name__}")
    fields["system"] = system
    tools = request.get("tools")
    fields["tools"] = None if tools is None else maps("tools", tools)
    try:
        msgspec.msgpack.encode(fields)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidRequestError(
            f"the chat request cannot be sent: {exc}", code=ErrorCode.INVALID_CONTENT
        ) from None
    return fields


def _check_scale(scale: object) -> float:
    if isinstance(scale, bool) or not isinstance(scale, int | float) or scale != scale:
        raise InvalidRequestError(
            f"scale must be a finite number, not {scale!r}", code=ErrorCode.BADARG
        )
    if abs(scale) > MAX_ADAPTER_SCALE:
        raise InvalidRequestError(
            f"scale must be within +-{MAX_ADAPTER_SCALE:g}, not {scale!r}", code=ErrorCode.BADARG
        )
    return float(scale)


# ================================================================ result parsers
def _threshold(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequestError(
            f"{name} must be a number in [0, 1], not {value!r}", code=ErrorCode.BAD_THRESHOLDS
        )
    return float(value)


def _ignore(raw: msgspec.Raw) -> None:
    return None


def _decode(raw: msgspec.Raw, type_: Any) -> Any:
    return decode_result(raw, type_)


def _parser(type_: Any) -> Callable[[msgspec.Raw], Any]:
    def parse(raw: msgspec.Raw) -> Any:
        return _decode(raw, type_)

    return parse


def _parse_model_id(raw: msgspec.Raw) -> str:
    value: str | dict[str, Any] = _decode(raw, str | dict[str, Any])
    if isinstance(value, str):
        return value
    model_id = value.get("id", value.get("model_id"))
    if not isinstance(model_id, str):
        raise ProtocolError("load_model reply carries no model id", code=ErrorCode.MALFORMED)
    return model_id


def _parse_tokens(raw: msgspec.Raw) -> list[int]:
    value: bytes | list[int] = _decode(raw, bytes | list[int])
    if isinstance(value, bytes):
        try:
            return unpack_tokens(value)
        except InvalidRequestError as exc:
            raise ProtocolError(f"bad token payload: {exc.message}") from None
    return value


def _parse_adapters(raw: msgspec.Raw) -> list[dict[str, Any]]:
    return [{"handle": a.handle, "scale": a.scale} for a in _decode(raw, list[AdapterInfo])]


def completion_from(result: CompletionResult, request_id: str = "") -> Completion:
    """Turn the wire result of ``complete`` into a ``Completion``.

    Raises:
        ProtocolError: the token payloads are not packed u32.
    """
    try:
        generated = unpack_tokens(result.generated)
        context = unpack_tokens(result.context_tokens)
    except InvalidRequestError as exc:
        raise ProtocolError(f"bad token payload: {exc.message}") from None
    return Completion(
        reply=result.reply,
        generated=generated,
        context_tokens=context,
        committed_tokens=result.committed_tokens,
        finish_key=result.finish_key,
        cache_hit_kind=result.cache_hit_kind,
        finish_reason=result.finish_reason,
        stop_sequence=result.stop_sequence,
        cache_delta=result.cache_delta,
        stats=result.stats,
        request_id=request_id,
    )


# ================================================================ errors
def raise_for_error(msg: ErrorReply) -> ErllamaError:
    """The exception for an ``ErrorReply`` (remote traceback in ``__cause__``)."""
    return error_for(msg.code, msg.message, detail=msg.detail, remote_tb=msg.remote_traceback)


def daemon_gone(endpoint: str) -> DaemonUnavailableError:
    return DaemonUnavailableError(
        f"the daemon at {endpoint} went away with this request in flight",
        code=ErrorCode.DAEMON_UNAVAILABLE,
    )


# ================================================================ the core
class ClientCore:
    """Configuration and every IO-free step shared by the two clients."""

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

    # ---------------------------------------------------------------- replies
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
    def is_terminal(msg: Msg) -> bool:
        return type(msg) in TERMINAL_REPLIES

    @staticmethod
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

    @staticmethod
    def event(msg: Msg) -> Event:
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
        raise ProtocolError(
            f"unexpected {type(msg).__name__} in a stream", code=ErrorCode.MALFORMED
        )

    # ---------------------------------------------------------------- requests
    @staticmethod
    def frames(msg: Msg) -> list[bytes | memoryview]:
        return encode(msg)

    @staticmethod
    def cancel_msg(target: str) -> Cancel:
        return Cancel(request_id=new_request_id(), target=target)

    def load_model(self, config: Mapping[str, Any] | None, model_id: str | None) -> Call[str]:
        if config is None:
            config = {}
        if not isinstance(config, Mapping):
            raise InvalidRequestError(
                f"config must be a dict, not {type(config).__name__}", code=ErrorCode.BAD_REQUEST
            )
        if model_id is not None:
            _check_str("model_id", model_id)
        msg = LoadModel(request_id=new_request_id(), config=dict(config), model_id=model_id)
        return Call(msg, _parse_model_id)

    def unload(self, model: str) -> Call[None]:
        return Call(Unload(request_id=new_request_id(), model=_check_str("model", model)), _ignore)

    def list_models(self) -> Call[list[ModelInfo]]:
        return Call(ListModels(request_id=new_request_id()), _parser(list[ModelInfo]))

    def model_info(self, model: str) -> Call[ModelInfo]:
        msg = GetModelInfo(request_id=new_request_id(), model=_check_str("model", model))
        return Call(msg, _parser(ModelInfo))

    def complete(self, model: str, prompt: str, opts: Mapping[str, Any]) -> Call[Completion]:
        msg = Complete(
            request_id=new_request_id(),
            model=_check_str("model", model),
            mode="complete",
            prompt=_check_str("prompt", prompt),
            options=build_options(opts),
        )

        def parse(raw: msgspec.Raw) -> Completion:
            return completion_from(decode_result(raw, CompletionResult), msg.request_id)

        return Call(msg, parse, cancellable=True)

    def stream(self, model: str, prompt: str, opts: Mapping[str, Any]) -> Complete:
        return Complete(
            request_id=new_request_id(),
            model=_check_str("model", model),
            mode="stream",
            prompt=_check_str("prompt", prompt),
            options=build_options(opts),
        )

    def infer(self, model: str, tokens: Sequence[int], params: Mapping[str, Any]) -> Complete:
        return Complete(
            request_id=new_request_id(),
            model=_check_str("model", model),
            mode="infer",
            tokens=_pack(tokens),
            options=build_options(params),
        )

    def prefill_only(
        self, model: str, tokens: Sequence[int], opts: Mapping[str, Any]
    ) -> Call[PrefillResult]:
        msg = Complete(
            request_id=new_request_id(),
            model=_check_str("model", model),
            mode="prefill",
            tokens=_pack(tokens),
            options=build_options(opts),
        )
        return Call(msg, _parser(PrefillResult), cancellable=True)

    def cancel(self, request_id: str) -> Call[None]:
        return Call(self.cancel_msg(_check_str("request_id", request_id)), _ignore)

    def tokenize(self, model: str, text: str, *, parse_special: bool = False) -> Call[list[int]]:
        if not isinstance(parse_special, bool):
            raise InvalidRequestError("parse_special must be a bool", code=ErrorCode.BADARG)
        msg = Tokenize(
            request_id=new_request_id(),
            model=_check_str("model", model),
            text=_check_str("text", text),
            parse_special=parse_special,
        )
        return Call(msg, _parse_tokens)

    def detokenize(self, model: str, tokens: Sequence[int]) -> Call[str]:
        msg = Detokenize(
            request_id=new_request_id(), model=_check_str("model", model), tokens=_pack(tokens)
        )
        return Call(msg, _parser(str))

    def counters(self) -> Call[dict[str, int]]:
        return Call(GetCounters(request_id=new_request_id()), _parser(dict[str, int]))

    def vram_info(self) -> Call[dict[str, int]]:
        return Call(GetVramInfo(request_id=new_request_id()), _parser(dict[str, int]))

    def scheduler_status(self) -> Call[SchedulerStatus]:
        return Call(GetSchedulerStatus(request_id=new_request_id()), _parser(SchedulerStatus))

    def enable_scheduler(self, enabled: bool) -> Call[SchedulerStatus]:
        msg = EnableScheduler(request_id=new_request_id(), enabled=enabled)
        return Call(msg, _parser(SchedulerStatus))

    def set_scheduler_thresholds(self, high: object, low: object) -> Call[SchedulerStatus]:
        """Only the types are checked here; the range (``0 <= low < high <= 1``) is the
        scheduler's, with the config's own check (``bad_thresholds`` either way)."""
        msg = SetSchedulerThresholds(
            request_id=new_request_id(), high=_threshold("high", high), low=_threshold("low", low)
        )
        return Call(msg, _parser(SchedulerStatus))

    def force_scheduler_check(self) -> Call[SchedulerCheck]:
        return Call(ForceSchedulerCheck(request_id=new_request_id()), _parser(SchedulerCheck))

    def status_row(self, model: str) -> Call[StatusRow]:
        """``phase`` / ``pending_len`` / ``last_cache_hit``: an unknown model reads as idle."""
        model = _check_str("model", model)

        def default(exc: ErllamaError) -> StatusRow:
            if exc.code in (ErrorCode.MODEL_NOT_LOADED, ErrorCode.NOPROC, ErrorCode.NOT_FOUND):
                return StatusRow(model=model)
            raise exc

        msg = GetStatusRow(request_id=new_request_id(), model=model)
        return Call(msg, _parser(StatusRow), on_error=default)

    def queue_depth(self, model: str | None) -> Call[int]:
        if model is not None:
            _check_str("model", model)
        return Call(QueueDepth(request_id=new_request_id(), model=model), _parser(int))

    def list_cached_prefixes(self, model: str, tokens: Sequence[int]) -> Call[int]:
        msg = ListCachedPrefixes(
            request_id=new_request_id(), model=_check_str("model", model), tokens=_pack(tokens)
        )
        return Call(msg, _parser(int))

    def status(self, model: str) -> Call[str]:
        msg = ModelStatus(request_id=new_request_id(), model=_check_str("model", model))
        return Call(msg, _parser(str))

    def evict(self, model: str) -> Call[None]:
        return Call(Evict(request_id=new_request_id(), model=_check_str("model", model)), _ignore)

    def shutdown(self, model: str) -> Call[None]:
        msg = ShutdownModel(request_id=new_request_id(), model=_check_str("model", model))
        return Call(msg, _ignore)

    def daemon_status(self) -> Call[DaemonStatus]:
        return Call(GetDaemonStatus(request_id=new_request_id()), _parser(DaemonStatus))

    def apply_chat_template(self, model: str, request: Mapping[str, Any]) -> Call[list[int]]:
        msg = ApplyChatTemplate(
            request_id=new_request_id(), model=_check_str("model", model), **chat_request(request)
        )
        return Call(msg, _parse_tokens)

    def embed(self, model: str, tokens: Sequence[int]) -> Call[list[float]]:
        msg = Embed(
            request_id=new_request_id(), model=_check_str("model", model), tokens=_pack(tokens)
        )
        return Call(msg, _parser(list[float]))

    def load_adapter(self, model: str, path: str | os.PathLike[str]) -> Call[str]:
        if not isinstance(path, str | os.PathLike):
            raise InvalidRequestError(
                f"path must be a str or a path, not {type(path).__name__}",
                code=ErrorCode.BADARG,
            )
        msg = LoadAdapter(
            request_id=new_request_id(), model=_check_str("model", model), path=os.fspath(path)
        )
        return Call(msg, _parser(str))

    def unload_adapter(self, model: str, handle: str) -> Call[None]:
        msg = UnloadAdapter(
            request_id=new_request_id(),
            model=_check_str("model", model),
            handle=_check_str("handle", handle),
        )
        return Call(msg, _ignore)

    def set_adapter_scale(self, model: str, handle: str, scale: float) -> Call[None]:
        msg = SetAdapterScale(
            request_id=new_request_id(),
            model=_check_str("model", model),
            handle=_check_str("handle", handle),
            scale=_check_scale(scale),
        )
        return Call(msg, _ignore)

    def list_adapters(self, model: str) -> Call[list[dict[str, Any]]]:
        msg = ListAdapters(request_id=new_request_id(), model=_check_str("model", model))
        return Call(msg, _parse_adapters)

    # ---------------------------------------------------------------- speculative decoding
    # draft_tokens is client-side, over infer, as upstream's facade does it (workers/speculative.py)
    draft_timeout_s: float = DRAFT_TIMEOUT_S

    def draft_tokens(self, model: str, prefix: Sequence[int], max_tokens: object) -> Complete:
        """The greedy ``infer`` of a draft: ``response_tokens = max_tokens`` (64 if None).

        Raises:
            InvalidRequestError: ``empty_prefix``; ``badarg`` for ``max_tokens <= 0``;
                ``bad_request`` for a ``max_tokens`` that is not an int.
        """
        tokens = _pack(prefix)
        if not tokens:
            raise InvalidRequestError("the prefix is empty", code=ErrorCode.EMPTY_PREFIX)
        if max_tokens is None:
            n = DRAFT_DEFAULT_TOKENS
        elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
            raise InvalidRequestError(
                f"max must be an int or None, not {type(max_tokens).__name__}",
                code=ErrorCode.BAD_REQUEST,
            )
        elif max_tokens <= 0:
            raise InvalidRequestError(f"max must be > 0, got {max_tokens}", code=ErrorCode.BADARG)
        else:
            n = min(max_tokens, _K_MAX)
        return Complete(
            request_id=new_request_id(),
            model=_check_str("model", model),
            mode="infer",
            tokens=tokens,
            options=RequestOptions(response_tokens=n),
        )

    @staticmethod
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

    def draft_timeout(self) -> RequestTimeoutError:
        return RequestTimeoutError(
            f"draft_tokens got no done within {self.draft_timeout_s:g} s (the draft is cancelled)",
            code=ErrorCode.TIMEOUT,
        )

    def verify(
        self, model: str, prefix: Sequence[int], candidates: Sequence[int], k: object
    ) -> Call[tuple[int, int | Literal["eos"]]]:
        if isinstance(k, bool) or not isinstance(k, int):
            raise InvalidRequestError(
                f"k must be an int, not {type(k).__name__}", code=ErrorCode.BAD_REQUEST
            )
        if k <= 0:
            raise InvalidRequestError(f"k must be > 0, got {k}", code=ErrorCode.BADARG)
        packed = _pack(prefix)
        if not packed:
            raise InvalidRequestError("the prefix is empty", code=ErrorCode.EMPTY_PREFIX)
        msg = Verify(
            request_id=new_request_id(),
            model=_check_str("model", model),
            prefix=packed,
            candidates=_pack(candidates),
            k=min(k, _K_MAX),
        )

        def parse(raw: msgspec.Raw) -> tuple[int, int | Literal["eos"]]:
            r = decode_result(raw, VerifyResult)
            return r.accepted, "eos" if r.eos else r.next_token

        return Call(msg, parse)


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


__all__ = [
    "OPTION_NAMES",
    "CacheHit",
    "Call",
    "ClientCore",
    "ClientState",
    "Completion",
    "Event",
    "EventKind",
    "Timeout",
    "build_options",
    "completion_from",
    "new_request_id",
]
