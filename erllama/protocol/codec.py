"""Frames <-> typed messages.

A message on any socket is ``[PROTOCOL_ID, body, *blobs]`` after the routing
frames a ROUTER adds or strips. ``PROTOCOL_ID`` names the protocol and its
major version (checked on every message, as Majordomo does); ``body`` is
msgpack of one tagged Struct; blobs are optional raw frames (unused by the
control channels: KV payloads never travel through ZeroMQ).

Decoding never raises anything but ``ProtocolError`` (codes ``malformed``,
``unsupported_version``, ``too_large``), so a receive loop can answer bad
input with an ``ErrorReply`` and keep going.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Generic, TypeVar

import msgspec

from erllama.protocol.errors import ErrorCode, ProtocolError
from erllama.protocol.messages import ErrorReply, Msg, Reply

PROTOCOL_ID = b"ERL1"
MAX_BODY_BYTES = 16 * 1024 * 1024

T = TypeVar("T")

_encoder = msgspec.msgpack.Encoder()


def encode(msg: Msg, *blobs: bytes | memoryview) -> list[bytes | memoryview]:
    """Encode a message into its frames (without routing frames)."""
    return [PROTOCOL_ID, _encoder.encode(msg), *blobs]


def encode_result(result: Any) -> msgspec.Raw:
    """Encode an op result for ``Reply.result``."""
    return msgspec.Raw(_encoder.encode(result))


def reply(request_id: str, result: Any = None) -> Reply:
    return Reply(request_id=request_id, result=encode_result(result))


def error_reply(
    request_id: str,
    code: str,
    message: str,
    *,
    retryable: bool = False,
    remote_traceback: str | None = None,
    detail: Any = None,
) -> ErrorReply:
    return ErrorReply(
        request_id=request_id,
        code=str(code),
        message=message,
        retryable=retryable,
        remote_traceback=remote_traceback,
        detail=detail,
    )


class Decoder(Generic[T]):
    """A typed decoder for one channel, built once per socket owner."""

    def __init__(self, type_: Any, *, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self._decoder: msgspec.msgpack.Decoder[T] = msgspec.msgpack.Decoder(type_)
        self.max_body_bytes = max_body_bytes

    def decode_body(self, body: bytes | memoryview) -> T:
        if len(body) > self.max_body_bytes:
            raise ProtocolError(
                f"message body of {len(body)} bytes exceeds {self.max_body_bytes}",
                code=ErrorCode.TOO_LARGE,
            )
        try:
            return self._decoder.decode(body)
        except msgspec.ValidationError as exc:
            raise ProtocolError(f"invalid message: {exc}", code=ErrorCode.MALFORMED) from None
        except msgspec.DecodeError as exc:
            raise ProtocolError(f"undecodable message: {exc}", code=ErrorCode.MALFORMED) from None
        except Exception as exc:  # defensive: nothing but ProtocolError leaves a decoder
            raise ProtocolError(f"undecodable message: {exc!r}", code=ErrorCode.MALFORMED) from None

    def decode(self, frames: Sequence[bytes | memoryview]) -> T:
        """Decode ``[PROTOCOL_ID, body, *blobs]``; blobs are ignored here."""
        if len(frames) < 2:
            raise ProtocolError(
                f"expected >= 2 frames, got {len(frames)}", code=ErrorCode.MALFORMED
            )
        proto = bytes(frames[0])
        if proto != PROTOCOL_ID:
            if proto[:3] == PROTOCOL_ID[:3]:
                raise ProtocolError(
                    f"protocol {proto!r} not supported (this side speaks {PROTOCOL_ID!r})",
                    code=ErrorCode.UNSUPPORTED_VERSION,
                )
            raise ProtocolError(f"bad protocol frame {proto[:16]!r}", code=ErrorCode.MALFORMED)
        return self.decode_body(frames[1])


def decode_result(raw: msgspec.Raw | bytes, type_: type[T]) -> T:
    """Decode ``Reply.result`` into the op's result type."""
    try:
        return msgspec.msgpack.decode(raw, type=type_)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ProtocolError(f"bad result payload: {exc}", code=ErrorCode.MALFORMED) from None


def peek_request_id(body: bytes | memoryview) -> str:
    """Best-effort request id of an undecodable body, so the error reply can echo it."""
    try:
        obj = msgspec.msgpack.decode(body)
    except Exception:
        return ""
    if isinstance(obj, dict):
        rid = obj.get("request_id", "")
        if isinstance(rid, str) and len(rid) <= 256:
            return rid
    return ""
