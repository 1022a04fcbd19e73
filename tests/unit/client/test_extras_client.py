"""apply_chat_template, embed and the adapter calls of both clients against a fake router:
what goes on the wire, how replies are read, and what is refused before sending."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from erllama import AsyncClient, Client, ErllamaError
from erllama.protocol.codec import error_reply, reply
from erllama.protocol.messages import (
    AdapterInfo,
    ApplyChatTemplate,
    Embed,
    ListAdapters,
    LoadAdapter,
    Msg,
    SetAdapterScale,
    UnloadAdapter,
)
from erllama.protocol.tokens import pack_tokens, unpack_tokens

from .fake_router import Conn, FakeRouter

pytestmark = pytest.mark.timeout(30)


def extras_handler(conn: Conn, msg: Msg) -> None:
    rid = msg.request_id
    if isinstance(msg, ApplyChatTemplate):
        if msg.model == "nochat":
            conn.send(error_reply(rid, "no_template", "the model carries no chat template"))
            return
        conn.send(reply(rid, pack_tokens([1, len(msg.messages), len(msg.tools or [])])))
    elif isinstance(msg, Embed):
        conn.send(reply(rid, [float(t) for t in unpack_tokens(msg.tokens)]))
    elif isinstance(msg, LoadAdapter):
        if not Path(msg.path).exists():
            conn.send(error_reply(rid, "enoent", f"no {msg.path}", detail={"path": msg.path}))
            return
        conn.send(reply(rid, "lora-1"))
    elif isinstance(msg, UnloadAdapter | SetAdapterScale):
        conn.send(reply(rid, None))
    elif isinstance(msg, ListAdapters):
        conn.send(reply(rid, [AdapterInfo(handle="lora-1", scale=0.5)]))
    else:
        conn.send(error_reply(rid, "bad_request", type(msg).__name__))


@pytest.fixture
def xrouter(endpoint: str) -> Any:
    with FakeRouter(endpoint, extras_handler) as r:
        yield r


REQUEST = {
    "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
    "system": "S",
    "tools": [{"name": "f", "description": "d", "schema": {"type": "object"}}],
}

# refused by the client before anything is sent: (request, code)
BAD_REQUESTS: list[tuple[Any, str]] = [
    ("hi", "badarg"),
    ({}, "badarg"),
    ({"messages": "hi"}, "badarg"),
    ({"messages": ["hi"]}, "badarg"),
    ({"messages": [], "model": "x"}, "badarg"),
    ({"messages": [], "system": 5}, "badarg"),
    ({"messages": [], "tools": [1]}, "badarg"),
    ({"messages": [{"role": "user", "content": object()}]}, "invalid_content"),
]


def test_sync_client(xrouter: FakeRouter, endpoint: str, tmp_path: Path) -> None:
    lora = tmp_path / "a.gguf"
    lora.write_bytes(b"x")
    with Client(endpoint, timeout=10) as c:
        assert c.apply_chat_template("m", REQUEST) == [1, 2, 1]
        sent = xrouter.of_type(ApplyChatTemplate)[-1]
        assert sent.system == "S" and sent.tools[0]["schema"] == {"type": "object"}
        assert sent.messages == REQUEST["messages"]
        # roles and contents travel as given: the worker answers invalid_content for them
        assert c.apply_chat_template("m", {"messages": [{"role": 1, "content": [2]}]}) == [1, 1, 0]
        with pytest.raises(ErllamaError) as ei:
            c.apply_chat_template("nochat", REQUEST)
        assert ei.value.code == "no_template"
        for bad, code in BAD_REQUESTS:
            with pytest.raises(ErllamaError) as ei:
                c.apply_chat_template("m", bad)
            assert ei.value.code == code, bad
        assert c.embed("m", [3, 4]) == [3.0, 4.0]
        with pytest.raises(ErllamaError) as ei:
            c.embed("m", [-1])
        assert ei.value.code == "invalid_token"
        assert c.load_adapter("m", lora) == "lora-1"  # a Path is fine
        assert xrouter.of_type(LoadAdapter)[-1].path == str(lora)
        with pytest.raises(ErllamaError) as ei:
            c.load_adapter("m", str(tmp_path / "missing"))
        assert ei.value.code == "enoent" and ei.value.detail == {"path": str(tmp_path / "missing")}
        c.set_adapter_scale("m", "lora-1", 2)
        assert xrouter.of_type(SetAdapterScale)[-1].scale == 2.0
        for bad_scale in (float("nan"), float("inf"), "1", True):
            with pytest.raises(ErllamaError) as ei:
                c.set_adapter_scale("m", "lora-1", bad_scale)  # type: ignore[arg-type]
            assert ei.value.code == "badarg"
        c.unload_adapter("m", "lora-1")
        assert c.list_adapters("m") == [{"handle": "lora-1", "scale": 0.5}]
    n_sent = len(xrouter.of_type(ApplyChatTemplate))
    assert n_sent == 3  # the refused requests never left the client


def test_async_client(xrouter: FakeRouter, endpoint: str, tmp_path: Path) -> None:
    lora = tmp_path / "a.gguf"
    lora.write_bytes(b"x")

    async def main() -> None:
        async with AsyncClient(endpoint, timeout=10) as c:
            assert await c.apply_chat_template("m", REQUEST) == [1, 2, 1]
            for bad, code in BAD_REQUESTS:
                with pytest.raises(ErllamaError) as ei:
                    await c.apply_chat_template("m", bad)
                assert ei.value.code == code, bad
            assert await c.embed("m", [7]) == [7.0]
            assert await c.load_adapter("m", str(lora)) == "lora-1"
            await c.set_adapter_scale("m", "lora-1", 0.5)
            await c.unload_adapter("m", "lora-1")
            assert await c.list_adapters("m") == [{"handle": "lora-1", "scale": 0.5}]

    asyncio.run(main())
