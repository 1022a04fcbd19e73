"""Client-side checks of request arguments: option names and types, strings, token lists.

Each check raises ``InvalidRequestError`` with the code the daemon would give, so a bad
argument fails before anything is sent. The daemon checks ranges and contents again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from erllama.protocol.errors import ErrorCode, InvalidRequestError
from erllama.protocol.messages import MAX_ADAPTER_SCALE, RequestOptions
from erllama.protocol.tokens import pack_tokens

OPTION_NAMES: tuple[str, ...] = tuple(RequestOptions.__struct_fields__)
CHAT_REQUEST_KEYS = ("messages", "system", "tools")


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


def check_str(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidRequestError(
            f"{name} must be a str, not {type(value).__name__}", code=ErrorCode.BAD_REQUEST
        )
    return value


def check_tokens(tokens: Sequence[int]) -> bytes:
    if isinstance(tokens, str | bytes) or not isinstance(tokens, Sequence):
        raise InvalidRequestError(
            f"tokens must be a list of ints, not {type(tokens).__name__}",
            code=ErrorCode.BAD_REQUEST,
        )
    if any(isinstance(t, bool) or not isinstance(t, int) for t in tokens):
        raise InvalidRequestError("tokens must be ints", code=ErrorCode.INVALID_TOKEN)
    return pack_tokens(tokens)


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


def check_scale(scale: object) -> float:
    if isinstance(scale, bool) or not isinstance(scale, int | float) or scale != scale:
        raise InvalidRequestError(
            f"scale must be a finite number, not {scale!r}", code=ErrorCode.BADARG
        )
    if abs(scale) > MAX_ADAPTER_SCALE:
        raise InvalidRequestError(
            f"scale must be within +-{MAX_ADAPTER_SCALE:g}, not {scale!r}", code=ErrorCode.BADARG
        )
    return float(scale)


def check_threshold(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequestError(
            f"{name} must be a number in [0, 1], not {value!r}", code=ErrorCode.BAD_THRESHOLDS
        )
    return float(value)
