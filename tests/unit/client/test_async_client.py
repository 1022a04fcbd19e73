"""``AsyncClient`` against a fake router (real ZeroMQ sockets); mirrors test_client.py.

Each test is a coroutine run by ``asyncio.run`` (the ``aio`` decorator), so
every test gets a fresh loop and the client must clean up inside it.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import re
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq

from erllama import (
    AsyncClient,
    AsyncStream,
    CacheHit,
    ClientState,
    Completion,
    ConflictError,
    DaemonStatus,
    DaemonUnavailableError,
    ErllamaError,
    InvalidRequestError,
    ModelInfo,
    ProtocolError,
    RequestTimeoutError,
    Timeout,
    UnknownModelError,
    WorkerCrashedError,
)
from erllama.protocol.errors import RemoteTraceback
from erllama.protocol.messages import (
    Cancel,
    Complete,
    Detokenize,
    ErrorReply,
    GetStatusRow,
    ListCachedPrefixes,
    LoadModel,
    Msg,
    TokenEvent,
    Unload,
)
from erllama.protocol.sockets import ENDPOINT_ENV
from erllama.protocol.tokens import unpack_tokens

from .fake_router import REMOTE_TB, Conn, FakeDaemon, FakeRouter, gen_tokens

pytestmark = pytest.mark.timeout(30)


def aio(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run a coroutine test in a fresh event loop (fixtures pass through)."""

    @functools.wraps(fn)
    def run(**kwargs: Any) -> None:
        asyncio.run(fn(**kwargs))

    return run


def _cancel_of(rid: str) -> Callable[[Msg], bool]:
    return lambda m: isinstance(m, Cancel) and m.target == rid


async def collect(stream: AsyncStream) -> list[Any]:
    return [e async for e in stream]


# ================================================================ inference
@aio
async def test_complete_returns_a_completion(router: FakeRouter, endpoint: str) -> None:
    async with AsyncClient(endpoint) as client:
        c = await client.complete("m1", "hi", response_tokens=3, temperature=0.5, seed=7)
    assert isinstance(c, Completion)
    assert c.generated == gen_tokens(3)
    assert c.context_tokens == [ord("h"), ord("i"), *gen_tokens(3)]
    assert c.committed_tokens == 5
    assert c.reply == "t100 t101 t102"
    assert c.finish_key == b"\x01" * 32
    assert (c.cache_hit_kind, c.finish_reason, c.stop_sequence) == ("cold", "length", None)
    assert c.stats.completion_tokens == 3
    assert c.cache_delta.created == 5
    (req,) = router.of_type(Complete)
    assert req.mode == "complete" and req.prompt == "hi" and req.tokens is None
    assert (req.options.response_tokens, req.options.temperature, req.options.seed) == (3, 0.5, 7)
    assert c.request_id == req.request_id
    assert re.fullmatch(r"[0-9a-f]{32}", req.request_id)


@aio
async def test_concurrent_requests_are_demultiplexed(router: FakeRouter, endpoint: str) -> None:
    async with AsyncClient(endpoint) as client:
        texts = [f"x{i}" for i in range(20)]
        results = await asyncio.gather(*(client.tokenize("m1", t) for t in texts))
        assert results == [[ord(ch) for ch in t] for t in texts]
        completions = await asyncio.gather(
            *(client.complete("m1", "p", response_tokens=n) for n in range(1, 6))
        )
        assert [len(c.generated) for c in completions] == [1, 2, 3, 4, 5]
        assert client._pending() == []
    ids = [m.request_id for m in router.received]
    assert len(set(ids)) == len(ids) == 25


@aio
async def test_unknown_option_is_refused_locally(router: FakeRouter, endpoint: str) -> None:
    async with AsyncClient(endpoint) as client:
        with pytest.raises(InvalidRequestError) as ei:
            await client.complete("m1", "hi", max_tokens=3)
        assert ei.value.code == "bad_request"
        assert "max_tokens" in ei.value.message and "response_tokens" in ei.value.message
        assert await client.tokenize("m1", "a") == [97]
    assert [type(m).__name__ for m in router.received] == ["Tokenize"]


@pytest.mark.parametrize(
    "opts",
    [
        {"temperature": "hot"},
        {"response_tokens": 1.5},
        {"response_tokens": True},
        {"stop_sequences": "END"},
        {"stop_sequences": [1, 2]},
        {"parent_key": "zz"},
        {"parent_key": b"short"},
        {"thinking": "maybe"},
    ],
)
@aio
async def test_bad_option_types_are_refused(
    router: FakeRouter, endpoint: str, opts: dict[str, object]
) -> None:
    async with AsyncClient(endpoint) as client:
        with pytest.raises(InvalidRequestError) as ei:
            await client.complete("m1", "hi", **opts)
        assert ei.value.code == "bad_request"


@aio
async def test_options_are_normalised(router: FakeRouter, endpoint: str) -> None:
    key = bytes(range(32))
    async with AsyncClient(endpoint) as client:
        await client.complete(
            "m1", "hi", parent_key=key.hex(), temperature=1, stop_sequences=("a", "b"), top_k=None
        )
    (req,) = router.of_type(Complete)
    assert req.options.parent_key == key
    assert req.options.temperature == 1.0
    assert req.options.stop_sequences == ["a", "b"]
    assert req.options.top_k is None


@aio
async def test_keep_alive_option_is_seconds(router: FakeRouter, endpoint: str) -> None:
    async with AsyncClient(endpoint) as client:
        await client.complete("m1", "hi", keep_alive=0)
        await client.complete("m1", "hi", keep_alive=-1.5)
    assert [r.options.keep_alive for r in router.of_type(Complete)] == [0.0, -1.5]


@aio
async def test_stream_yields_events_then_stops(router: FakeRouter, endpoint: str) -> None:
    async with AsyncClient(endpoint) as client:
        stream = await client.stream("m1", "hi", response_tokens=2, thinking="enabled")
        events = await collect(stream)
        assert await collect(stream) == []
        assert client._pending() == []
    kinds = [e.kind for e in events]
    assert kinds == [
        "thinking_delta",
        "thinking_end",
        "tool_call_delta",
        "tool_call_end",
        "token",
        "token",
        "done",
    ]
    assert events[1].signature == b"sig"
    assert events[3].text == "{}"
    assert [(e.text, e.token_id) for e in events[4:6]] == [("t100 ", 100), ("t101 ", 101)]
    assert events[-1].stats is not None and events[-1].stats.completion_tokens == 2
    assert {e.request_id for e in events} == {stream.request_id}
    assert [e.seq for e in events] == list(range(7))
    (req,) = router.of_type(Complete)
    assert req.mode == "stream" and req.request_id == stream.request_id
    assert router.of_type(Cancel) == []


@aio
async def test_infer_sends_packed_tokens(router: FakeRouter, endpoint: str) -> None:
    async with AsyncClient(endpoint) as client:
        stream = await client.infer("m1", [1, 2, 3], response_tokens=1)
        async with stream:
            kinds = [e.kind async for e in stream]
    assert kinds == ["token", "done"]
    (req,) = router.of_type(Complete)
    assert req.mode == "infer" and req.prompt is None
    assert unpack_tokens(req.tokens) == [1, 2, 3]


@aio
async def test_infer_refuses_bad_tokens(router: FakeRouter, endpoint: str) -> None:
    async with AsyncClient(endpoint) as client:
        with pytest.raises(InvalidRequestError) as ei:
            await client.infer("m1", [1, -1])
        assert ei.value.code == "invalid_token"
        with pytest.raises(InvalidRequestError):
            await client.infer("m1", "abc")  # type: ignore[arg-type]


@aio
async def test_stream_error_event_raises_the_mapped_error(
    router: FakeRouter, endpoint: str
) -> None:
    async with AsyncClient(endpoint) as client:
        stream = await client.stream("crash", "hi")
        assert (await anext(stream)).kind == "token"
        with pytest.raises(WorkerCrashedError) as ei:
            await anext(stream)
        assert ei.value.code == ei.value.reason == "worker_crashed"
        assert isinstance(ei.value.__cause__, RemoteTraceback)
        assert ei.value.__cause__.tb == REMOTE_TB
        with pytest.raises(StopAsyncIteration):
            await anext(stream)
        assert client._pending() == []


@aio
async def test_break_out_of_a_stream_cancels_it(router: FakeRouter, endpoint: str) -> None:
    async with AsyncClient(endpoint) as client:
        async for event in await client.stream("hold", "hi"):
            assert event.kind == "token"
            break
        (req,) = router.of_type(Complete)
        await router.wait_for_async(_cancel_of(req.request_id))
        assert client._pending() == []
        assert await client.tokenize("m1", "ok") == [111, 107]


@aio
async def test_with_block_and_close_cancel_a_stream(router: FakeRouter, endpoint: str) -> None:
    async with AsyncClient(endpoint) as client:
        async with await client.stream("hold", "hi") as s1:
            assert (await anext(s1)).kind == "token"
        await router.wait_for_async(_cancel_of(s1.request_id))
        s2 = await client.stream("hold", "hi")
        await s2.aclose()
        await router.wait_for_async(_cancel_of(s2.request_id))
        await s2.aclose()
        assert await collect(s2) == []
    assert len(router.of_type(Cancel)) == 2


@aio
async def test_exception_in_the_loop_cancels_the_stream(router: FakeRouter, endpoint: str) -> None:
    async def consume(client: AsyncClient) -> None:
        async for _ in await client.stream("hold", "hi"):
            raise KeyError("boom")

    async with AsyncClient(endpoint) as client:
        with pytest.raises(KeyError):
            await consume(client)
        gc.collect()
        (req,) = router.of_type(Complete)
        await router.wait_for_async(_cancel_of(req.request_id))


@aio
async def test_cancel_by_request_id(router: FakeRouter, endpoint: str) -> None:
    async with AsyncClient(endpoint) as client:
        stream = await client.stream("hold", "hi")
        assert (await anext(stream)).kind == "token"
        await client.cancel(stream.request_id)
        done = await anext(stream)
        assert done.kind == "done" and done.stats is not None and done.stats.cancelled
        await client.cancel("not-a-request")


@aio
async def test_two_streams_read_concurrently(router: FakeRouter, endpoint: str) -> None:
    async with AsyncClient(endpoint) as client:
        a = await client.stream("m1", "a", response_tokens=3)
        b = await client.stream("m1", "b", response_tokens=3)
        got_a, got_b = await asyncio.gather(collect(a), collect(b))
    assert {e.request_id for e in got_a} == {a.request_id}
    assert {e.request_id for e in got_b} == {b.request_id}
    assert [e.kind for e in got_a] == ["token"] * 3 + ["done"]


@aio
async def test_cancelled_task_cancels_its_completion(router: FakeRouter, endpoint: str) -> None:
    async with AsyncClient(endpoint) as client:
        task = asyncio.create_task(client.complete("silent", "hi"))
        req = await router.wait_for_async(lambda m: isinstance(m, Complete))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await router.wait_for_async(_cancel_of(req.request_id))
        assert client._pending() == []


# ================================================================ errors
@aio
async def test_error_replies_raise_the_mapped_exception(router: FakeRouter, endpoint: str) -> None:
    async with AsyncClient(endpoint) as client:
        with pytest.raises(ConflictError) as ei:
            await client.load_model({"backend": "stub"}, "m1")
        assert ei.value.reason == "already_loaded"
        with pytest.raises(UnknownModelError) as eu:
            await client.model_info("nope")
        assert eu.value.code == "noproc"
        assert eu.value.__cause__ is None
        with pytest.raises(UnknownModelError) as en:
            await client.complete("nope", "x")
        assert en.value.code == "model_not_loaded"


@aio
async def test_unknown_error_code_is_an_erllama_error(endpoint: str) -> None:
    def handler(conn: Conn, msg: Msg) -> None:
        conn.send(ErrorReply(request_id=msg.request_id, code="brand_new", message="m", detail=[1]))

    with FakeRouter(endpoint, handler):
        async with AsyncClient(endpoint) as c:
            with pytest.raises(ErllamaError) as ei:
                await c.counters()
    assert type(ei.value) is ErllamaError
    assert (ei.value.code, ei.value.message, ei.value.detail) == ("brand_new", "m", [1])


@aio
async def test_stale_and_malformed_replies(endpoint: str) -> None:
    def handler(conn: Conn, msg: Msg) -> None:
        conn.send(TokenEvent(request_id="stale", seq=0, text="x", token_id=1))
        conn.send_raw([b"ERL1", msgspec.msgpack.encode({"t": "ok"})])
        if isinstance(msg, Detokenize):
            FakeDaemon()(conn, msg)
        else:
            bogus = {"t": "bogus", "request_id": msg.request_id}
            conn.send_raw([b"ERL1", msgspec.msgpack.encode(bogus)])

    with FakeRouter(endpoint, handler):
        async with AsyncClient(endpoint) as c:
            assert await c.detokenize("m1", [104, 105]) == "hi"
            with pytest.raises(ProtocolError) as ei:
                await c.counters()
            assert ei.value.code == "malformed"


@aio
async def test_phase_of_an_unknown_model_reads_idle(endpoint: str) -> None:
    def handler(conn: Conn, msg: Msg) -> None:
        assert isinstance(msg, GetStatusRow)
        conn.send(ErrorReply(request_id=msg.request_id, code="model_not_loaded", message="?"))

    with FakeRouter(endpoint, handler):
        async with AsyncClient(endpoint) as c:
            assert await c.phase("nope") == "idle"
            assert await c.pending_len("nope") == 0
            assert await c.last_cache_hit("nope") is None


# ================================================================ operations
@aio
async def test_model_lifecycle(router: FakeRouter, endpoint: str) -> None:
    async with AsyncClient(endpoint) as client:
        assert await client.load_model({"backend": "stub"}, "new") == "new"
        assert await client.load_model({"backend": "stub"}) == "erllama_model_2"
        models = await client.list_models()
        assert all(isinstance(m, ModelInfo) for m in models)
        assert "new" in {m.id for m in models}
        info = await client.model_info("new")
        assert (info.id, info.backend) == ("new", "stub")
        await client.unload("new")
        await client.unload_model("erllama_model_2")
        with pytest.raises(UnknownModelError) as ei:
            await client.unload("new")
        assert ei.value.code == "not_found"
    load = router.of_type(LoadModel)[0]
    assert (load.config, load.model_id) == ({"backend": "stub"}, "new")
    assert [u.model for u in router.of_type(Unload)] == ["new", "erllama_model_2", "new"]


@aio
async def test_load_model_without_config_sends_an_empty_spec(
    router: FakeRouter, endpoint: str
) -> None:
    async with AsyncClient(endpoint) as client:
        await client.load_model()
    (load,) = router.of_type(LoadModel)
    assert (load.config, load.model_id) == ({}, None)


@aio
async def test_tokenizer_and_observability(router: FakeRouter, endpoint: str) -> None:
    async with AsyncClient(endpoint) as client:
        assert await client.tokenize("m1", "hi") == [104, 105]
        assert await client.detokenize("m1", [104, 105]) == "hi"
        assert await client.counters() == {"hits_exact": 3, "saves_cold": 1}
        assert await client.phase("m1") == "generating"
        assert await client.pending_len("m1") == 2
        assert await client.last_cache_hit("m1") == CacheHit(kind="partial", prefix_len=64)
        assert await client.queue_depth() == 7
        assert await client.queue_depth("m1") == 1
        assert await client.list_cached_prefixes("m1", [1, 2, 3, 4]) == 2
        assert await client.status("m1") == "prefilling"
        await client.evict("m1")
        await client.shutdown("m1")
        st = await client.daemon_status()
    assert isinstance(st, DaemonStatus)
    assert (st.run_dir, st.pid, st.tiers[0].budget_bytes) == ("/run/x", 7, 100)
    (lcp,) = router.of_type(ListCachedPrefixes)
    assert unpack_tokens(lcp.tokens) == [1, 2, 3, 4]


# ================================================================ timeouts and transport
@aio
async def test_request_timeout_cancels_a_completion(router: FakeRouter, endpoint: str) -> None:
    async with AsyncClient(endpoint, timeout=Timeout(request=0.2)) as c:
        with pytest.raises(RequestTimeoutError) as ei:
            await c.complete("silent", "hi")
        assert ei.value.code == "timeout"
        (req,) = router.of_type(Complete)
        await router.wait_for_async(_cancel_of(req.request_id))
        with pytest.raises(RequestTimeoutError):
            await c.status("silent")
        assert c._pending() == []
        assert (await c.counters())["hits_exact"] == 3


@aio
async def test_stream_idle_timeout(router: FakeRouter, endpoint: str) -> None:
    async with AsyncClient(endpoint, timeout=Timeout(stream_idle=0.2)) as c:
        stream = await c.stream("hold", "hi")
        assert (await anext(stream)).kind == "token"
        with pytest.raises(RequestTimeoutError):
            await anext(stream)
        await router.wait_for_async(_cancel_of(stream.request_id))
        assert await collect(stream) == []


@aio
async def test_missing_socket_file_is_a_clear_error(sock_dir: Path) -> None:
    endpoint = f"ipc://{sock_dir / 'nobody.sock'}"
    c = AsyncClient(endpoint)
    with pytest.raises(DaemonUnavailableError) as ei:
        await c.counters()
    assert "nobody.sock" in ei.value.message and "does not exist" in ei.value.message
    assert ei.value.code == "daemon_unavailable"
    assert c.state is ClientState.UNOPENED
    await c.aclose()


@aio
async def test_nobody_listening_times_out_on_connect(sock_dir: Path) -> None:
    path = sock_dir / "stale.sock"
    path.touch()
    async with AsyncClient(f"ipc://{path}", timeout=Timeout(connect=0.2)) as c:
        with pytest.raises(DaemonUnavailableError) as ei:
            await c.counters()
        assert "within 0.2 s" in ei.value.message


@aio
async def test_daemon_going_away_fails_pending_requests(router: FakeRouter, endpoint: str) -> None:
    async with AsyncClient(endpoint) as c:
        assert await c.tokenize("m1", "a") == [97]
        stream = await c.stream("hold", "hi")
        assert (await anext(stream)).kind == "token"
        router.stop()
        with pytest.raises(DaemonUnavailableError) as ei:
            await anext(stream)
        assert "went away" in ei.value.message
        assert await collect(stream) == []


@aio
async def test_daemon_dying_under_a_waiting_call(endpoint: str) -> None:
    router = FakeRouter(endpoint)
    router.handler = lambda conn, msg: router.exit_soon()
    with router:
        async with AsyncClient(endpoint) as c:
            with pytest.raises(DaemonUnavailableError):
                await c.counters()


@aio
async def test_default_endpoint_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, router: FakeRouter, endpoint: str
) -> None:
    monkeypatch.setenv(ENDPOINT_ENV, endpoint)
    async with AsyncClient() as c:
        assert c.endpoint == endpoint
        assert await c.queue_depth() == 7


# ================================================================ lifecycle
@aio
async def test_closed_client_cannot_be_reused(router: FakeRouter, endpoint: str) -> None:
    c = AsyncClient(endpoint)
    assert c.state is ClientState.UNOPENED
    assert await c.counters()
    assert c.state.name == "OPENED"
    await c.aclose()
    await c.aclose()
    assert c.state.name == "CLOSED"
    with pytest.raises(RuntimeError, match="closed"):
        await c.counters()
    with pytest.raises(RuntimeError):
        async with c:
            pass


@aio
async def test_close_cancels_open_streams(router: FakeRouter, endpoint: str) -> None:
    c = AsyncClient(endpoint)
    stream = await c.stream("hold", "hi")
    assert (await anext(stream)).kind == "token"
    await c.aclose()
    await router.wait_for_async(_cancel_of(stream.request_id))
    with pytest.raises(RuntimeError):
        await anext(stream)


@aio
async def test_close_wakes_a_waiting_coroutine(router: FakeRouter, endpoint: str) -> None:
    c = AsyncClient(endpoint)
    task = asyncio.create_task(c.status("silent"))
    await router.wait_for_async(lambda m: getattr(m, "model", None) == "silent")
    await c.aclose()
    with pytest.raises(DaemonUnavailableError, match="closed"):
        await task


def test_timeout_argument_forms() -> None:
    assert AsyncClient("ipc:///x", timeout=2).timeout == Timeout(2.0, 2.0, 2.0)
    assert AsyncClient("ipc:///x").timeout == Timeout()
    with pytest.raises(TypeError):
        AsyncClient("ipc:///x", timeout="soon")  # type: ignore[arg-type]


@aio
async def test_zmq_sockets_are_released(router: FakeRouter, endpoint: str) -> None:
    c = AsyncClient(endpoint)
    await c.counters()
    ctx = c._ctx
    reader = c._reader
    assert isinstance(ctx, zmq.Context) and reader is not None
    await c.aclose()
    assert ctx.closed and c._sock is None and reader.done()


@aio
async def test_client_belongs_to_one_loop(router: FakeRouter, endpoint: str) -> None:
    c = AsyncClient(endpoint)
    await c.counters()

    errors: list[BaseException] = []

    def other_loop() -> None:
        async def use() -> None:
            await c.counters()

        try:
            asyncio.run(use())
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=other_loop)
    t.start()
    t.join(10)
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError)
    assert "belongs to the event loop" in str(errors[0])
    await c.aclose()
