"""``draft_tokens`` and ``verify`` on both clients against a fake router (sync, async)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from erllama import (
    AsyncClient,
    Client,
    ConflictError,
    InvalidRequestError,
    RequestTimeoutError,
    WorkerCrashedError,
)
from erllama.protocol.codec import error_reply, reply
from erllama.protocol.messages import Cancel, Complete, Msg, Verify, VerifyResult
from erllama.protocol.tokens import unpack_tokens

from .fake_router import Conn, FakeDaemon, FakeRouter, gen_tokens

pytestmark = pytest.mark.timeout(30)


class SpecDaemon(FakeDaemon):
    """FakeDaemon plus ``verify``: accepts candidates equal to ``gen_tokens``; ``busy`` model."""

    def __call__(self, conn: Conn, msg: Msg) -> None:
        if not isinstance(msg, Verify):
            super().__call__(conn, msg)
            return
        if msg.model == "busy":
            conn.send(error_reply(msg.request_id, "busy", "a request is running"))
            return
        cands = unpack_tokens(msg.candidates)[: msg.k]
        want = gen_tokens(len(cands) + 1)
        accepted = 0
        while accepted < len(cands) and cands[accepted] == want[accepted]:
            accepted += 1
        eos = accepted == 3  # this fake "model" ends after three tokens
        result = VerifyResult(accepted=accepted, next_token=2 if eos else want[accepted], eos=eos)
        conn.send(reply(msg.request_id, result))


@pytest.fixture
def router(endpoint: str) -> Iterator[FakeRouter]:
    with FakeRouter(endpoint, SpecDaemon()) as r:
        yield r


def _cancel_of(rid: str) -> Callable[[Msg], bool]:
    return lambda m: isinstance(m, Cancel) and m.target == rid


BAD_DRAFTS: list[tuple[dict[str, Any], str]] = [
    ({"prefix": []}, "empty_prefix"),
    ({"max": 0}, "badarg"),
    ({"max": -1}, "badarg"),
    ({"max": "3"}, "bad_request"),
    ({"max": True}, "bad_request"),
    ({"prefix": "abc"}, "bad_request"),
]
BAD_VERIFIES: list[tuple[dict[str, Any], str]] = [
    ({"k": 0}, "badarg"),
    ({"k": -2}, "badarg"),
    ({"k": 1.5}, "bad_request"),
    ({"k": True}, "bad_request"),
    ({"prefix": []}, "empty_prefix"),
    ({"candidates": [1, "x"]}, "invalid_token"),
]


# ================================================================ sync
def test_draft_tokens_collects_every_token_id(router: FakeRouter, endpoint: str) -> None:
    with Client(endpoint) as c:
        assert c.draft_tokens("m1", [1, 2, 3], 5) == gen_tokens(5)
        assert c.draft_tokens("m1", [1, 2, 3]) == gen_tokens(64)
    sent = router.of_type(Complete)
    assert [m.mode for m in sent] == ["infer", "infer"]
    assert [m.options.response_tokens for m in sent] == [5, 64]
    assert unpack_tokens(sent[0].tokens) == [1, 2, 3]


@pytest.mark.parametrize(("kw", "code"), BAD_DRAFTS)
def test_draft_tokens_bad_input(
    router: FakeRouter, endpoint: str, kw: dict[str, Any], code: str
) -> None:
    args = {"prefix": [1, 2], "max": 4, **kw}
    with Client(endpoint) as c:
        with pytest.raises(InvalidRequestError) as ei:
            c.draft_tokens("m1", args["prefix"], args["max"])
        assert ei.value.code == code
    assert router.of_type(Complete) == []  # refused before sending


def test_draft_tokens_times_out_and_cancels(router: FakeRouter, endpoint: str) -> None:
    with Client(endpoint) as c:
        c._core.draft_timeout_s = 0.3
        with pytest.raises(RequestTimeoutError) as ei:
            c.draft_tokens("hold", [1, 2], 8)
        assert ei.value.code == "timeout"
        (req,) = router.of_type(Complete)
        router.wait_for(_cancel_of(req.request_id))
        assert c._pending() == []


def test_draft_tokens_reraises_an_error_event(router: FakeRouter, endpoint: str) -> None:
    with Client(endpoint) as c, pytest.raises(WorkerCrashedError):
        c.draft_tokens("crash", [1, 2], 8)


def test_verify(router: FakeRouter, endpoint: str) -> None:
    with Client(endpoint) as c:
        assert c.verify("m1", [1, 2], gen_tokens(2), 2) == (2, gen_tokens(3)[2])
        assert c.verify("m1", [1, 2], [100, 7, 102], 3) == (1, 101)
        assert c.verify("m1", [1, 2], gen_tokens(5), 3) == (3, "eos")
        with pytest.raises(ConflictError) as ei:
            c.verify("busy", [1], [2], 1)
        assert ei.value.code == "busy"
    (first, *_) = router.of_type(Verify)
    assert unpack_tokens(first.prefix) == [1, 2] and first.k == 2


@pytest.mark.parametrize(("kw", "code"), BAD_VERIFIES)
def test_verify_bad_input(router: FakeRouter, endpoint: str, kw: dict[str, Any], code: str) -> None:
    args = {"prefix": [1, 2], "candidates": [3], "k": 1, **kw}
    with Client(endpoint) as c:
        with pytest.raises(InvalidRequestError) as ei:
            c.verify("m1", args["prefix"], args["candidates"], args["k"])
        assert ei.value.code == code
    assert router.of_type(Verify) == []


# ================================================================ async
def test_async_draft_and_verify(router: FakeRouter, endpoint: str) -> None:
    async def main() -> None:
        async with AsyncClient(endpoint) as c:
            assert await c.draft_tokens("m1", [1, 2, 3], 4) == gen_tokens(4)
            assert await c.verify("m1", [1], gen_tokens(3), 3) == (3, "eos")
            with pytest.raises(WorkerCrashedError):
                await c.draft_tokens("crash", [1], 2)
            with pytest.raises(ConflictError):
                await c.verify("busy", [1], [2], 1)
            c._core.draft_timeout_s = 0.3
            with pytest.raises(RequestTimeoutError):
                await c.draft_tokens("hold", [1, 2], 8)
            assert c._pending() == []

    asyncio.run(main())
    held = [m for m in router.of_type(Complete) if m.model == "hold"]
    router.wait_for(_cancel_of(held[0].request_id))


@pytest.mark.parametrize(("kw", "code"), BAD_DRAFTS)
def test_async_draft_tokens_bad_input(
    router: FakeRouter, endpoint: str, kw: dict[str, Any], code: str
) -> None:
    args = {"prefix": [1, 2], "max": 4, **kw}

    async def main() -> None:
        async with AsyncClient(endpoint) as c:
            with pytest.raises(InvalidRequestError) as ei:
                await c.draft_tokens("m1", args["prefix"], args["max"])
            assert ei.value.code == code

    asyncio.run(main())
    assert router.of_type(Complete) == []


@pytest.mark.parametrize(("kw", "code"), BAD_VERIFIES)
def test_async_verify_bad_input(
    router: FakeRouter, endpoint: str, kw: dict[str, Any], code: str
) -> None:
    args = {"prefix": [1, 2], "candidates": [3], "k": 1, **kw}

    async def main() -> None:
        async with AsyncClient(endpoint) as c:
            with pytest.raises(InvalidRequestError) as ei:
                await c.verify("m1", args["prefix"], args["candidates"], args["k"])
            assert ei.value.code == code

    asyncio.run(main())
    assert router.of_type(Verify) == []
