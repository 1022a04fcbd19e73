"""Golden files and round trips for every wire message type."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest

from erllama.protocol.codec import PROTOCOL_ID, Decoder, encode
from erllama.protocol.messages import ClientReply, ClientRequest, ControlMessage, Msg

from .samples import all_message_classes, sample_struct

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("ERLLAMA_UPDATE_GOLDEN") == "1"
CLASSES = all_message_classes()


def test_every_channel_message_is_collected() -> None:
    tags = {c.__struct_config__.tag for c in CLASSES}
    for union in (ClientRequest, ClientReply, ControlMessage):
        for cls in union.__args__:
            assert cls.__struct_config__.tag in tags


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__struct_config__.tag)
def test_golden_encoding(cls: type[Msg]) -> None:
    msg = sample_struct(cls)
    frames = encode(msg)
    assert frames[0] == PROTOCOL_ID
    body = bytes(frames[1])
    path = GOLDEN / f"{cls.__struct_config__.tag}.msgpack"
    if UPDATE or not path.exists():
        if not UPDATE and os.environ.get("CI"):
            pytest.fail(f"golden file {path.name} missing (run with ERLLAMA_UPDATE_GOLDEN=1)")
        path.write_bytes(body)
    assert body == path.read_bytes(), f"wire encoding of {cls.__name__} changed"
    decoded = Decoder(cls).decode([PROTOCOL_ID, path.read_bytes()])
    assert decoded == msg


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__struct_config__.tag)
def test_every_message_has_request_id_and_is_frozen(cls: type[Msg]) -> None:
    msg = sample_struct(cls)
    assert msg.request_id == "req-1"
    with pytest.raises(AttributeError):
        msg.request_id = "other"  # type: ignore[misc]


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    from erllama.protocol.messages import Tokenize

    raw = msgspec.msgpack.encode(
        {"t": "tokenize", "request_id": "r", "model": "m", "text": "hi", "new_field": [1, 2]}
    )
    msg = Decoder(ClientRequest).decode([PROTOCOL_ID, raw])
    assert msg == Tokenize(request_id="r", model="m", text="hi")
