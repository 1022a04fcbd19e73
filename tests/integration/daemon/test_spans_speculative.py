"""Spans, draft_tokens and verify through a real daemon with stub models, on both clients."""

from __future__ import annotations

import asyncio
import hashlib
import hmac

import pytest

from erllama import AsyncClient, Client, ConflictError, InvalidRequestError
from erllama.protocol.codec import decode_result
from erllama.protocol.messages import ErrorReply, Reply, Verify, VerifyResult
from erllama.protocol.tokens import pack_tokens
from tests.support.daemon import Daemon, DaemonFactory

pytestmark = pytest.mark.timeout(90)

SCRIPT = '<think>plan it</think>Sure. <tool>{"f": 2}</tool> done'
KEY = "k3y"


def thinker(model_id: str) -> dict[str, object]:
    return {
        "id": model_id,
        "backend": "stub",
        "stub": {"script": SCRIPT},
        "thinking_markers": {"start": "<think>", "end": "</think>"},
        "tool_call_markers": {"start": "<tool>", "end": "</tool>"},
        "thinking_signing_key": KEY,
    }


@pytest.fixture
def spans_daemon(daemon_factory: DaemonFactory) -> Daemon:
    return daemon_factory(
        [
            thinker("think"),
            {"id": "draft", "backend": "stub"},
            {"id": "target", "backend": "stub"},
            {"id": "slow", "backend": "stub", "stub": {"token_delay_ms": 50}},
        ]
    )


def test_span_events_reach_both_clients(spans_daemon: Daemon) -> None:
    signature = hmac.new(KEY.encode(), b"plan it", hashlib.sha256).digest()
    with Client(spans_daemon.endpoint, timeout=30) as c:
        events = list(c.stream("think", "Q?", thinking="enabled"))
        kinds = [e.kind for e in events]
        assert kinds[-1] == "done" and "error" not in kinds
        assert "".join(e.text or "" for e in events if e.kind == "thinking_delta") == "plan it"
        assert [e.signature for e in events if e.kind == "thinking_end"] == [signature]
        assert kinds.index("thinking_end") < kinds.index("token", kinds.index("thinking_end"))
        assert "".join(e.text or "" for e in events if e.kind == "tool_call_delta") == '{"f": 2}'
        assert [e.text for e in events if e.kind == "tool_call_end"] == ['{"f": 2}']
        assert "".join(e.text or "" for e in events if e.kind == "token") == "Sure.  done"
        done = c.complete("think", "Q?", thinking="enabled")
        assert done.reply == 'Sure. <tool>{"f": 2}</tool> done'
        assert c.detokenize("think", done.context_tokens) == "Q?" + SCRIPT
        with pytest.raises(InvalidRequestError) as ei:
            list(c.stream("think", "Q?"))
        assert ei.value.code == "thinking_not_enabled"

    async def main() -> list[str]:
        async with AsyncClient(spans_daemon.endpoint, timeout=30) as ac:
            stream = await ac.stream("think", "Q?", thinking="enabled")
            return [e.kind async for e in stream]

    assert asyncio.run(main()) == kinds


def test_draft_on_one_model_verify_on_another(spans_daemon: Daemon) -> None:
    with Client(spans_daemon.endpoint, timeout=30) as c:
        prefix = c.tokenize("draft", "speculate about this")
        draft = c.draft_tokens("draft", prefix, 8)
        assert len(draft) == 8
        greedy = [
            e.token_id for e in c.infer("target", prefix, response_tokens=9) if e.kind == "token"
        ]
        accepted, nxt = c.verify("target", prefix, draft, 8)
        assert (accepted, nxt) == (8, greedy[8])
        bad = [*draft[:5], 280, *draft[6:]]
        assert c.verify("target", prefix, bad, 8) == (5, draft[5])

    async def main() -> tuple[int, int | str]:
        async with AsyncClient(spans_daemon.endpoint, timeout=30) as ac:
            d = await ac.draft_tokens("draft", prefix, 4)
            return await ac.verify("target", prefix, d, 4)

    assert asyncio.run(main()) == (4, draft[4])


def test_verify_is_refused_while_the_model_works(spans_daemon: Daemon) -> None:
    with Client(spans_daemon.endpoint, timeout=30) as c:
        with c.stream("slow", "go on", response_tokens=200) as stream:
            assert next(stream).kind == "token"
            with pytest.raises(ConflictError) as ei:
                c.verify("slow", [1, 50, 60], [70], 1)
            assert ei.value.code == "busy"
        # the worker answers bad input itself too (the client checks k first)
        raw = spans_daemon.client()
        try:
            rep = raw.call(Verify(model="target", prefix=pack_tokens([1, 50]), candidates=b"", k=0))
            assert isinstance(rep, ErrorReply) and rep.code == "badarg"
            rep = raw.call(Verify(model="target", prefix=b"", candidates=b"", k=1))
            assert isinstance(rep, ErrorReply) and rep.code == "empty_prefix"
            rep = raw.call(Verify(model="target", prefix=pack_tokens([1, 50]), candidates=b"", k=3))
            assert isinstance(rep, Reply)
            assert decode_result(rep.result, VerifyResult).accepted == 0
        finally:
            raw.close()
