"""The typed Init payloads (erllama/inits.py): golden encodings, round trips, bad payloads."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest

from erllama.inits import (
    ChildInit,
    GatewayInit,
    MetaInit,
    RouterInit,
    SchedulerInit,
    WorkerInit,
    decode_init,
    encode_init,
)
from erllama.protocol.errors import ProtocolError

from .samples import sample_struct

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("ERLLAMA_UPDATE_GOLDEN") == "1"
INITS: list[type[ChildInit]] = [MetaInit, RouterInit, SchedulerInit, GatewayInit, WorkerInit]


@pytest.mark.parametrize("cls", INITS, ids=lambda c: c.__name__)
def test_golden_encoding_and_round_trip(cls: type[ChildInit]) -> None:
    init = sample_struct(cls)
    body = msgspec.msgpack.encode(encode_init(init))
    path = GOLDEN / f"init_{cls.__name__.removesuffix('Init').lower()}.msgpack"
    if UPDATE or not path.exists():
        if not UPDATE and os.environ.get("CI"):
            pytest.fail(f"golden file {path.name} missing (run with ERLLAMA_UPDATE_GOLDEN=1)")
        path.write_bytes(body)
    assert body == path.read_bytes(), f"the Init payload of {cls.__name__} changed"
    assert decode_init(msgspec.msgpack.decode(path.read_bytes()), cls) == init


def test_a_bad_payload_is_one_clear_bad_request() -> None:
    with pytest.raises(ProtocolError) as ei:
        decode_init({"cache": {"tiers": "ram"}, "daemon_id": "d"}, MetaInit)
    assert ei.value.code == "bad_request" and "cache.tiers" in ei.value.message
    with pytest.raises(ProtocolError) as ei:
        decode_init({"model": {"backend": "llama"}}, WorkerInit)
    assert "model_id" in ei.value.message
    # unknown keys are ignored (an older child under a newer root)
    init = decode_init({"http": {}, "endpoint": "ipc:///x", "later": 1}, GatewayInit)
    assert init.endpoint == "ipc:///x"
