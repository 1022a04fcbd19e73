"""Hostile input through the decoders: only ProtocolError ever comes out."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from erllama.protocol.codec import PROTOCOL_ID, Decoder, decode_result, peek_request_id
from erllama.protocol.errors import ErrorCode, ProtocolError
from erllama.protocol.messages import (
    MAX_ID_LEN,
    ClientReply,
    ClientRequest,
    CompletionResult,
    ControlMessage,
    Tokenize,
)
from erllama.protocol.tokens import pack_tokens, unpack_tokens

from .samples import all_message_classes, sample_struct

DECODERS: list[Decoder[Any]] = [
    Decoder(ClientRequest),
    Decoder(ClientReply),
    Decoder(ControlMessage),
]
SAMPLES = [
    msgspec.msgpack.decode(msgspec.msgpack.encode(sample_struct(c))) for c in all_message_classes()
]

junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.binary(max_size=40),
    st.lists(st.integers(min_value=-(2**63), max_value=2**64 - 1), max_size=5),
    st.dictionaries(st.text(max_size=5), st.integers(min_value=0, max_value=2**40), max_size=3),
)


def _decode_all(frames: list[bytes]) -> None:
    for dec in DECODERS:
        try:
            dec.decode(frames)
        except ProtocolError as exc:
            assert exc.code in {
                ErrorCode.MALFORMED,
                ErrorCode.UNSUPPORTED_VERSION,
                ErrorCode.TOO_LARGE,
            }


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=64), max_size=4))
def test_random_frames_never_escape(frames: list[bytes]) -> None:
    _decode_all(frames)
    _decode_all([PROTOCOL_ID, *frames])


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SAMPLES), st.data())
def test_typed_messages_with_random_fields(sample: dict[str, Any], data: st.DataObject) -> None:
    msg = dict(sample)
    for field in data.draw(st.lists(st.sampled_from(sorted(msg)), max_size=3)):
        msg[field] = data.draw(junk)
    body = msgspec.msgpack.encode(msg)
    for dec in DECODERS:
        try:
            out = dec.decode([PROTOCOL_ID, body])
        except ProtocolError:
            continue
        # whatever decodes must survive a round trip unchanged
        assert dec.decode([PROTOCOL_ID, msgspec.msgpack.encode(out)]) == out


def test_wrong_version_is_its_own_code() -> None:
    body = msgspec.msgpack.encode(Tokenize(request_id="r", model="m", text="x"))
    with pytest.raises(ProtocolError) as ei:
        Decoder(ClientRequest).decode([b"ERL2", body])
    assert ei.value.code == ErrorCode.UNSUPPORTED_VERSION
    with pytest.raises(ProtocolError) as ei:
        Decoder(ClientRequest).decode([b"HTTP", body])
    assert ei.value.code == ErrorCode.MALFORMED


def test_oversized_body_rejected_before_decoding() -> None:
    dec = Decoder(ClientRequest, max_body_bytes=1024)
    with pytest.raises(ProtocolError) as ei:
        dec.decode([PROTOCOL_ID, b"\x00" * 2048])
    assert ei.value.code == ErrorCode.TOO_LARGE


def test_limits_are_checked_while_decoding() -> None:
    body = msgspec.msgpack.encode(
        {"t": "tokenize", "request_id": "r" * (MAX_ID_LEN + 1), "model": "m", "text": "x"}
    )
    with pytest.raises(ProtocolError) as ei:
        Decoder(ClientRequest).decode([PROTOCOL_ID, body])
    assert ei.value.code == ErrorCode.MALFORMED
    assert "request_id" in ei.value.message


def test_peek_request_id_is_best_effort() -> None:
    assert peek_request_id(msgspec.msgpack.encode({"request_id": "abc", "t": "nope"})) == "abc"
    assert peek_request_id(b"\xc1\xc1") == ""
    assert peek_request_id(msgspec.msgpack.encode([1, 2])) == ""


def test_bad_result_payload() -> None:
    with pytest.raises(ProtocolError):
        decode_result(msgspec.msgpack.encode({"reply": 3}), CompletionResult)


@given(st.lists(st.integers(min_value=0, max_value=2**32 - 1), max_size=200))
def test_tokens_round_trip(tokens: list[int]) -> None:
    packed = pack_tokens(tokens)
    assert len(packed) == 4 * len(tokens)
    assert unpack_tokens(packed) == tokens
    assert packed == b"".join(t.to_bytes(4, "little") for t in tokens)


def test_bad_tokens() -> None:
    from erllama.protocol.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError) as ei:
        pack_tokens([-1])
    assert ei.value.code == ErrorCode.INVALID_TOKEN
    with pytest.raises(InvalidRequestError):
        pack_tokens([2**32])
    with pytest.raises(InvalidRequestError):
        unpack_tokens(b"\x00\x01\x02")
