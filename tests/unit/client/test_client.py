"""``Client`` against a fake router (real ZeroMQ sockets); mirrors test_async_client.py."""

from __future__ import annotations

import gc
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest
import zmq

from erllama import (
    CacheHit,
    Client,
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


@pytest.fixture
def client(router: FakeRouter, endpoint: str) -> Iterator[Client]:
    with Client(endpoint) as c:
        yield c


def _cancel_of(rid: str) -> Callable[[Msg], bool]:
    return lambda m: isinstance(m, Cancel) and m.target == rid


# ================================================================ inference
def test_complete_returns_a_completion(client: Client, router: FakeRouter) -> None:
    c = client.complete("m1", "hi", response_tokens=3, temperature=0.5, seed=7)
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


def test_request_ids_are_fresh(client: Client, router: FakeRouter) -> None:
    for _ in range(5):
        client.tokenize("m1", "x")
    ids = [m.request_id for m in router.received]
    assert len(set(ids)) == 5


def test_unknown_option_is_refused_locally(client: Client, router: FakeRouter) -> None:
    with pytest.raises(InvalidRequestError) as ei:
        client.complete("m1", "hi", max_tokens=3)
    assert ei.value.code == "bad_request"
    assert "max_tokens" in ei.value.message and "response_tokens" in ei.value.message
    assert client.tokenize("m1", "a") == [97]  # nothing else was sent
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
        {"keep_alive": "5m"},
        {"keep_alive": float("nan")},
    ],
)
def test_bad_option_types_are_refused(client: Client, opts: dict[str, object]) -> None:
    with pytest.raises(InvalidRequestError) as ei:
        client.complete("m1", "hi", **opts)
    assert ei.value.code == "bad_request"


def test_options_are_normalised(client: Client, router: FakeRouter) -> None:
    key = bytes(range(32))
    client.complete(
        "m1", "hi", parent_key=key.hex(), temperature=1, stop_sequences=("a", "b"), top_k=None
    )
    (req,) = router.of_type(Complete)
    assert req.options.parent_key == key
    assert req.options.temperature == 1.0
    assert req.options.stop_sequences == ["a", "b"]
    assert req.options.top_k is None


def test_keep_alive_option_is_seconds(client: Client, router: FakeRouter) -> None:
    client.complete("m1", "hi", keep_alive=0)
    client.stream("m1", "hi", keep_alive=-1).close()
    client.complete("m1", "hi")
    reqs = router.of_type(Complete)
    assert [r.options.keep_alive for r in reqs] == [0.0, -1.0, None]
    assert isinstance(reqs[0].options.keep_alive, float)


def test_stream_yields_events_then_stops(client: Client, router: FakeRouter) -> None:
    stream = client.stream("m1", "hi", response_tokens=2, thinking="enabled")
    events = list(stream)
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
    assert list(stream) == []  # exhausted
    (req,) = router.of_type(Complete)
    assert req.mode == "stream" and req.request_id == stream.request_id
    assert client._pending() == []
    assert router.of_type(Cancel) == []  # a finished stream is not cancelled


def test_infer_sends_packed_tokens(client: Client, router: FakeRouter) -> None:
    with client.infer("m1", [1, 2, 3], response_tokens=1) as stream:
        kinds = [e.kind for e in stream]
    assert kinds == ["token", "done"]
    (req,) = router.of_type(Complete)
    assert req.mode == "infer" and req.prompt is None
    assert unpack_tokens(req.tokens) == [1, 2, 3]


def test_infer_refuses_bad_tokens(client: Client) -> None:
    with pytest.raises(InvalidRequestError) as ei:
        client.infer("m1", [1, -1])
    assert ei.value.code == "invalid_token"
    with pytest.raises(InvalidRequestError):
        client.infer("m1", "abc")  # type: ignore[arg-type]


def test_stream_error_event_raises_the_mapped_error(client: Client) -> None:
    stream = client.stream("crash", "hi")
    first = next(stream)
    assert first.kind == "token"
    with pytest.raises(WorkerCrashedError) as ei:
        next(stream)
    assert ei.value.code == ei.value.reason == "worker_crashed"
    assert isinstance(ei.value.__cause__, RemoteTraceback)
    assert ei.value.__cause__.tb == REMOTE_TB
    with pytest.raises(StopIteration):
        next(stream)
    assert client._pending() == []


def test_break_out_of_a_stream_cancels_it(client: Client, router: FakeRouter) -> None:
    for event in client.stream("hold", "hi"):
        assert event.kind == "token"
        break
    (req,) = router.of_type(Complete)
    router.wait_for(_cancel_of(req.request_id))
    assert client._pending() == []
    # the cancelled stream's late "done" is dropped; the client keeps working
    assert client.tokenize("m1", "ok") == [111, 107]


def test_with_block_and_close_cancel_a_stream(client: Client, router: FakeRouter) -> None:
    with client.stream("hold", "hi") as s1:
        assert next(s1).kind == "token"
    router.wait_for(_cancel_of(s1.request_id))
    s2 = client.stream("hold", "hi")
    s2.close()
    router.wait_for(_cancel_of(s2.request_id))
    s2.close()  # idempotent
    assert list(s2) == []
    assert len(router.of_type(Cancel)) == 2


def test_exception_in_the_loop_cancels_the_stream(client: Client, router: FakeRouter) -> None:
    def consume() -> None:
        for _ in client.stream("hold", "hi"):
            raise KeyError("boom")

    with pytest.raises(KeyError):
        consume()
    gc.collect()
    (req,) = router.of_type(Complete)
    router.wait_for(_cancel_of(req.request_id))


def test_cancel_by_request_id(client: Client, router: FakeRouter) -> None:
    stream = client.stream("hold", "hi")
    assert next(stream).kind == "token"
    client.cancel(stream.request_id)
    done = next(stream)
    assert done.kind == "done" and done.stats is not None and done.stats.cancelled
    client.cancel("not-a-request")  # unknown ids are fine


def test_two_streams_read_alternately(client: Client) -> None:
    a = client.stream("m1", "a", response_tokens=3)
    b = client.stream("m1", "b", response_tokens=3)
    got_a, got_b = [], []
    for ea, eb in zip(a, b, strict=True):
        got_a.append(ea)
        got_b.append(eb)
    assert {e.request_id for e in got_a} == {a.request_id}
    assert {e.request_id for e in got_b} == {b.request_id}
    assert [e.kind for e in got_a] == ["token"] * 3 + ["done"]


# ================================================================ errors
def test_error_replies_raise_the_mapped_exception(client: Client) -> None:
    with pytest.raises(ConflictError) as ei:
        client.load_model({"backend": "stub"}, "m1")
    assert ei.value.reason == "already_loaded"
    with pytest.raises(UnknownModelError) as eu:
        client.model_info("nope")
    assert eu.value.code == "noproc"
    assert eu.value.__cause__ is None
    with pytest.raises(UnknownModelError) as en:
        client.complete("nope", "x")
    assert en.value.code == "model_not_loaded"


def test_unknown_error_code_is_an_erllama_error(endpoint: str) -> None:
    def handler(conn: Conn, msg: Msg) -> None:
        conn.send(ErrorReply(request_id=msg.request_id, code="brand_new", message="m", detail=[1]))

    with FakeRouter(endpoint, handler), Client(endpoint) as c, pytest.raises(ErllamaError) as ei:
        c.counters()
    assert type(ei.value) is ErllamaError
    assert (ei.value.code, ei.value.message, ei.value.detail) == ("brand_new", "m", [1])


def test_stale_and_malformed_replies(endpoint: str) -> None:
    def handler(conn: Conn, msg: Msg) -> None:
        # a reply for a request nobody waits for is dropped
        conn.send(TokenEvent(request_id="stale", seq=0, text="x", token_id=1))
        conn.send_raw([b"ERL1", msgspec.msgpack.encode({"t": "ok"})])  # no request id
        if isinstance(msg, Detokenize):
            FakeDaemon()(conn, msg)
        else:  # an undecodable reply to this request
            bogus = {"t": "bogus", "request_id": msg.request_id}
            conn.send_raw([b"ERL1", msgspec.msgpack.encode(bogus)])

    with FakeRouter(endpoint, handler), Client(endpoint) as c:
        assert c.detokenize("m1", [104, 105]) == "hi"
        with pytest.raises(ProtocolError) as ei:
            c.counters()
        assert ei.value.code == "malformed"


def test_phase_of_an_unknown_model_reads_idle(endpoint: str) -> None:
    def handler(conn: Conn, msg: Msg) -> None:
        assert isinstance(msg, GetStatusRow)
        conn.send(ErrorReply(request_id=msg.request_id, code="model_not_loaded", message="?"))

    with FakeRouter(endpoint, handler), Client(endpoint) as c:
        assert c.phase("nope") == "idle"
        assert c.pending_len("nope") == 0
        assert c.last_cache_hit("nope") is None


# ================================================================ operations
def test_model_lifecycle(client: Client, router: FakeRouter) -> None:
    assert client.load_model({"backend": "stub"}, "new") == "new"
    assert client.load_model({"backend": "stub"}) == "erllama_model_2"
    models = client.list_models()
    assert all(isinstance(m, ModelInfo) for m in models)
    assert "new" in {m.id for m in models}
    info = client.model_info("new")
    assert (info.id, info.backend) == ("new", "stub")
    client.unload("new")
    client.unload_model("erllama_model_2")
    with pytest.raises(UnknownModelError) as ei:
        client.unload("new")
    assert ei.value.code == "not_found"
    load = router.of_type(LoadModel)[0]
    assert (load.config, load.model_id) == ({"backend": "stub"}, "new")
    assert [u.model for u in router.of_type(Unload)] == ["new", "erllama_model_2", "new"]


def test_load_model_without_config_sends_an_empty_spec(client: Client, router: FakeRouter) -> None:
    client.load_model()
    (load,) = router.of_type(LoadModel)
    assert (load.config, load.model_id) == ({}, None)


def test_tokenizer_and_observability(client: Client, router: FakeRouter) -> None:
    assert client.tokenize("m1", "hi") == [104, 105]
    assert client.detokenize("m1", [104, 105]) == "hi"
    assert client.counters() == {"hits_exact": 3, "saves_cold": 1}
    assert client.phase("m1") == "generating"
    assert client.pending_len("m1") == 2
    assert client.last_cache_hit("m1") == CacheHit(kind="partial", prefix_len=64)
    assert client.queue_depth() == 7
    assert client.queue_depth("m1") == 1
    assert client.list_cached_prefixes("m1", [1, 2, 3, 4]) == 2
    assert client.status("m1") == "prefilling"
    client.evict("m1")
    client.shutdown("m1")
    st = client.daemon_status()
    assert isinstance(st, DaemonStatus)
    assert (st.run_dir, st.pid, st.tiers[0].budget_bytes) == ("/run/x", 7, 100)
    (lcp,) = router.of_type(ListCachedPrefixes)
    assert unpack_tokens(lcp.tokens) == [1, 2, 3, 4]


# ================================================================ timeouts and transport
def test_request_timeout_cancels_a_completion(router: FakeRouter, endpoint: str) -> None:
    with Client(endpoint, timeout=Timeout(request=0.2)) as c:
        with pytest.raises(RequestTimeoutError) as ei:
            c.complete("silent", "hi")
        assert ei.value.code == "timeout"
        (req,) = router.of_type(Complete)
        router.wait_for(_cancel_of(req.request_id))
        with pytest.raises(RequestTimeoutError):
            c.status("silent")
        assert c._pending() == []
        assert c.counters()["hits_exact"] == 3  # still usable


def test_stream_idle_timeout(router: FakeRouter, endpoint: str) -> None:
    with Client(endpoint, timeout=Timeout(stream_idle=0.2)) as c:
        stream = c.stream("hold", "hi")
        assert next(stream).kind == "token"
        with pytest.raises(RequestTimeoutError):
            next(stream)
        router.wait_for(_cancel_of(stream.request_id))
        assert list(stream) == []


def test_missing_socket_file_is_a_clear_error(sock_dir: Path) -> None:
    endpoint = f"ipc://{sock_dir / 'nobody.sock'}"
    c = Client(endpoint)
    with pytest.raises(DaemonUnavailableError) as ei:
        c.counters()
    assert "nobody.sock" in ei.value.message and "does not exist" in ei.value.message
    assert ei.value.code == "daemon_unavailable"
    assert c.state is ClientState.UNOPENED
    c.close()


def test_nobody_listening_times_out_on_connect(sock_dir: Path) -> None:
    path = sock_dir / "stale.sock"
    path.touch()  # a file left behind by a dead daemon
    with Client(f"ipc://{path}", timeout=Timeout(connect=0.2)) as c:
        with pytest.raises(DaemonUnavailableError) as ei:
            c.counters()
        assert "within 0.2 s" in ei.value.message


def test_daemon_going_away_fails_pending_requests(router: FakeRouter, endpoint: str) -> None:
    with Client(endpoint) as c:
        assert c.tokenize("m1", "a") == [97]  # connected
        stream = c.stream("hold", "hi")
        assert next(stream).kind == "token"
        router.stop()
        with pytest.raises(DaemonUnavailableError) as ei:
            next(stream)
        assert "went away" in ei.value.message
        assert list(stream) == []


def test_daemon_dying_under_a_waiting_call(endpoint: str) -> None:
    router = FakeRouter(endpoint)
    router.handler = lambda conn, msg: router.exit_soon()  # dies on the first request
    with router, Client(endpoint) as c, pytest.raises(DaemonUnavailableError):
        c.counters()


def test_default_endpoint_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, router: FakeRouter, endpoint: str
) -> None:
    monkeypatch.setenv(ENDPOINT_ENV, endpoint)
    with Client() as c:
        assert c.endpoint == endpoint
        assert c.queue_depth() == 7


# ================================================================ lifecycle
def test_closed_client_cannot_be_reused(router: FakeRouter, endpoint: str) -> None:
    c = Client(endpoint)
    assert c.state is ClientState.UNOPENED
    assert c.counters()  # opens lazily
    assert c.state.name == "OPENED"
    c.close()
    c.close()  # idempotent
    assert c.state.name == "CLOSED"
    with pytest.raises(RuntimeError, match="closed"):
        c.counters()
    with pytest.raises(RuntimeError), c:
        pass


def test_close_cancels_open_streams(router: FakeRouter, endpoint: str) -> None:
    c = Client(endpoint)
    stream = c.stream("hold", "hi")
    assert next(stream).kind == "token"
    c.close()
    router.wait_for(_cancel_of(stream.request_id))
    with pytest.raises(RuntimeError):
        next(stream)


def test_timeout_argument_forms() -> None:
    assert Client("ipc:///x", timeout=2).timeout == Timeout(2.0, 2.0, 2.0)
    assert Client("ipc:///x").timeout == Timeout()
    assert Client("ipc:///x").timeout.request is None
    with pytest.raises(ValueError):
        Timeout(request=-1)
    with pytest.raises(TypeError):
        Client("ipc:///x", timeout="soon")  # type: ignore[arg-type]


def test_zmq_sockets_are_released(router: FakeRouter, endpoint: str) -> None:
    c = Client(endpoint)
    c.counters()
    ctx = c._ctx
    assert isinstance(ctx, zmq.Context)
    c.close()
    assert ctx.closed and c._sock is None
