"""A real worker process (stub backend) against a fake root and a fake router, with a real meta.

The test binds ``workers.sock`` itself (a ROUTER standing in for the router) and
uses ``tests.support.fake_root.FakeRoot`` for ``control.sock`` (handshake, Stop,
pings). Every wait is a poll with a deadline; the suite-wide fixture checks that
no process is left behind.
"""

from __future__ import annotations

import functools
import os
import signal
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from erllama.protocol.codec import Decoder, decode_result, encode
from erllama.protocol.errors import ErrorCode
from erllama.protocol.messages import (
    Cancel,
    ClientReply,
    Complete,
    CompletionResult,
    DoneEvent,
    ErrorReply,
    Hello,
    Init,
    ModelStatus,
    Msg,
    Ping,
    Pong,
    Ready,
    Reply,
    RequestOptions,
    StartFailed,
    TokenEvent,
    Tokenize,
    WorkerStatus,
)
from erllama.protocol.sockets import WORKERS_SOCK, ipc_endpoint, make_socket
from erllama.protocol.tokens import unpack_tokens
from erllama.supervisor.entry import run_child
from tests.support.cache import MetaEnv, meta_env, wait_until
from tests.support.fake_root import ChildFailedError, FakeRoot

pytestmark = pytest.mark.timeout(120)

WORKER = functools.partial(run_child, "erllama.workers.worker")
CHILD = "worker.m"
PROMPT = "Z" * 47  # 48 tokens: cold rungs at 16, 32, 48 with the policy below
POLICY = {
    "min_tokens": 8,
    "cold_min_tokens": 8,
    "boundary_align_tokens": 16,
    "boundary_trim_tokens": 0,
    "continued_interval": 64,
    "prefill_chunk_size": 8,
}


def worker_config(cache: dict[str, Any], **stub: Any) -> dict[str, Any]:
    return {
        "model_id": "m",
        "model": {
            "id": "m",
            "backend": "stub",
            "default_response_tokens": 8,
            "policy": POLICY,
            "stub": {"n_ctx": 512, "n_vocab": 300, **stub},
        },
        "cache": cache,
        "daemon_id": "test",
        "supervisor": {"drain_timeout_s": 5.0, "term_timeout_s": 3.0},
    }


class FakeRouter:
    """The router's side of ``workers.sock``: send requests, collect replies and statuses."""

    def __init__(self, run_dir: Path) -> None:
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.path = run_dir / WORKERS_SOCK
        self.sock = make_socket(self.ctx, zmq.ROUTER, bind=ipc_endpoint(run_dir, WORKERS_SOCK))
        self.decoder: Decoder[Any] = Decoder(ClientReply | WorkerStatus)
        self.statuses: list[WorkerStatus] = []
        self._n = 0

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()
        self.path.unlink(missing_ok=True)  # libzmq 4.3.5 leaves a bound ipc file behind

    def send(self, msg: Msg, client: bytes = b"client-1") -> None:
        self.sock.send_multipart([b"m", client, *encode(msg)])

    def send_raw(self, frames: list[bytes]) -> None:
        self.sock.send_multipart([b"m", *frames])

    def rid(self) -> str:
        self._n += 1
        return f"r{self._n}"

    def recv(self, timeout_s: float = 10.0) -> tuple[bytes, Msg]:
        """The next reply (statuses are collected on the way)."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.sock.poll(max(1, int(remaining * 1000))):
                raise TimeoutError("no reply from the worker")
            frames = self.sock.recv_multipart()
            assert frames[0] == b"m"
            msg = self.decoder.decode(frames[2:])
            if isinstance(msg, WorkerStatus):
                assert frames[1] == b""
                self.statuses.append(msg)
                continue
            return frames[1], msg

    def wait_status(self, pred: Callable[[WorkerStatus], bool], timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(pred(s) for s in self.statuses):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.sock.poll(max(1, int(remaining * 1000))):
                raise TimeoutError("status not seen")
            frames = self.sock.recv_multipart()
            msg = self.decoder.decode(frames[2:])
            assert isinstance(msg, WorkerStatus), msg
            self.statuses.append(msg)

    def call(self, msg: Msg, timeout_s: float = 10.0) -> Msg:
        self.send(msg)
        _, out = self.recv(timeout_s)
        assert getattr(out, "request_id", None) == msg.request_id, out
        return out

    def complete(self, prompt: str, **opts: Any) -> CompletionResult:
        out = self.call(
            Complete(
                request_id=self.rid(), model="m", prompt=prompt, options=RequestOptions(**opts)
            )
        )
        assert isinstance(out, Reply), out
        return decode_result(out.result, CompletionResult)

    def stream(
        self, rid: str, *, on_token: Callable[[TokenEvent], None] | None = None
    ) -> tuple[list[TokenEvent], DoneEvent]:
        tokens: list[TokenEvent] = []
        while True:
            _, msg = self.recv()
            if isinstance(msg, TokenEvent) and msg.request_id == rid:
                tokens.append(msg)
                if on_token is not None:
                    on_token(msg)
            elif isinstance(msg, DoneEvent) and msg.request_id == rid:
                return tokens, msg
            elif isinstance(msg, ErrorReply) and msg.request_id == rid:
                raise AssertionError(f"stream failed: {msg}")


def start_worker(root: FakeRoot, router: FakeRouter, config: dict[str, Any]) -> Any:
    proc = root.spawn(CHILD, WORKER, config, timeout_s=60)
    router.wait_status(lambda s: s.model == "m" and s.phase == "idle")
    return proc


@pytest.fixture
def env(tmp_path: Path) -> Iterator[MetaEnv]:
    with meta_env(tmp_path, tiers=("ram", "disk")) as e:
        yield e


@pytest.fixture
def router(env: MetaEnv) -> Iterator[FakeRouter]:
    r = FakeRouter(env.run_dir)
    yield r
    if env.root.children.get(CHILD) is not None:
        # graceful first: a SIGKILL mid-save leaves a temp file (meta sweeps it, later)
        if env.root.stop(CHILD, timeout_s=30) is None:
            env.root.kill(CHILD)
        env.root.forget(CHILD)
    r.close()


# ================================================================ with a real meta
def test_requests_saves_and_warm_restart(env: MetaEnv, router: FakeRouter) -> None:
    config = worker_config(env.config["cache"])
    start_worker(env.root, router, config)
    info = env.root.ready[CHILD].info
    assert info["model_id"] == "m" and info["backend"] == "stub" and info["pid"] > 0
    assert len(info["fingerprint"]) == 32 and info["tier"] == "ram"

    cold = router.complete(PROMPT)
    assert cold.cache_hit_kind == "cold" and cold.finish_reason == "length"
    assert len(unpack_tokens(cold.generated)) == 8 and cold.finish_key is not None

    # stream, same prompt: all of it is in the live KV
    rid = router.rid()
    router.send(Complete(request_id=rid, model="m", mode="stream", prompt=PROMPT))
    tokens, done = router.stream(rid)
    assert [t.token_id for t in tokens] == unpack_tokens(cold.generated)
    assert done.stats.cache_hit_kind == "exact"

    st = router.call(ModelStatus(request_id="st", model="m"))
    assert isinstance(st, Reply) and decode_result(st.result, str) == "idle"

    # the saves reach meta asynchronously; stop drains them (shutdown save included)
    assert env.root.stop(CHILD, timeout_s=30) == 0
    env.root.forget(CHILD)
    client = env.client()
    assert client.lookup_exact(cold.finish_key) is not None
    counters = client.counters()
    assert counters["saves_cold"] == 3 and counters["saves_finish"] >= 1
    assert counters["misses"] == 1
    assert counters.get("hits_live", 1) == 1  # a counter meta may not list yet

    # a fresh worker: nothing live, the exact row restores and gives the same output
    router.statuses.clear()
    start_worker(env.root, router, config)
    warm = router.complete(PROMPT)
    assert warm.cache_hit_kind == "exact" and warm.generated == cold.generated
    assert warm.cache_delta.read == 48
    # counters travel fire-and-forget on another socket: wait for them
    wait_until(lambda: client.counters()["hits_exact"] == 1, what="hits_exact")
    assert env.root.stop(CHILD, timeout_s=30) == 0
    env.root.forget(CHILD)


def test_cancel_tokenize_bad_input(env: MetaEnv, router: FakeRouter) -> None:
    start_worker(env.root, router, worker_config(env.config["cache"], token_delay_ms=20))
    rid = router.rid()
    router.send(
        Complete(
            request_id=rid,
            model="m",
            mode="stream",
            prompt="cancel me",
            options=RequestOptions(response_tokens=500),
        )
    )
    queued = router.rid()
    router.send(Complete(request_id=queued, model="m", mode="stream", prompt="queued"))

    def on_token(ev: TokenEvent) -> None:
        if ev.seq == 1:
            router.send(Cancel(request_id="c1", target=queued))
            router.send(Cancel(request_id="c2", target=rid))

    tokens: list[TokenEvent] = []
    done: dict[str, DoneEvent] = {}
    acks: set[str] = set()
    while len(done) < 2:
        _, msg = router.recv()
        if isinstance(msg, TokenEvent):
            assert msg.request_id == rid
            tokens.append(msg)
            on_token(msg)
        elif isinstance(msg, DoneEvent):
            done[msg.request_id] = msg
        elif isinstance(msg, Reply):
            acks.add(msg.request_id)
        else:
            raise AssertionError(msg)
    assert done[queued].stats.cancelled and done[queued].stats.completion_tokens == 0
    assert done[rid].stats.cancelled and done[rid].stats.finish_reason == "cancelled"
    assert 2 <= len(tokens) < 50

    # tokenize is answered by the IO thread: a short round trip
    lat = []
    for i in range(200):
        t0 = time.perf_counter()
        tok = router.call(Tokenize(request_id=f"t{i}", model="m", text="hello world"))
        lat.append(time.perf_counter() - t0)
        assert isinstance(tok, Reply)
    assert isinstance(tok, Reply)
    assert unpack_tokens(decode_result(tok.result, bytes)) == [1, *(b + 3 for b in b"hello world")]
    p50 = statistics.median(lat) * 1000
    print(f"tokenize round trip p50 = {p50:.3f} ms")
    assert p50 < 5.0

    # bad input: answered, the worker lives on
    router.send_raw([b"client-1", b"ERL1", b"\xc1garbage"])
    _, err = router.recv()
    assert isinstance(err, ErrorReply) and err.code == ErrorCode.MALFORMED
    router.send_raw([b"client-1", b"ERL9", b"x"])
    _, err = router.recv()
    assert isinstance(err, ErrorReply) and err.code == ErrorCode.UNSUPPORTED_VERSION
    out = router.call(Complete(request_id="bad", model="m", prompt="x" * 600))
    assert isinstance(out, ErrorReply) and out.code == ErrorCode.CONTEXT_OVERFLOW
    assert acks >= {"c1", "c2"}
    assert router.complete("still alive").finish_reason == "length"
    # pings are answered with progress
    env.root.send(CHILD, Ping(seq=7))
    pong = env.root.wait_message(CHILD, Pong, 10)
    assert pong.seq == 7 and pong.active == 0 and pong.progress > 0


def test_fatal_error_exits_nonzero(env: MetaEnv, router: FakeRouter) -> None:
    start_worker(
        env.root,
        router,
        worker_config(env.config["cache"], crash_after_tokens=2, crash_mode="raise"),
    )
    rid = router.rid()
    router.send(Complete(request_id=rid, model="m", mode="stream", prompt="boom"))
    msgs = [router.recv()[1] for _ in range(4)]
    # two decodes succeed; the third token is sent before its decode raises
    assert [type(m) for m in msgs] == [TokenEvent, TokenEvent, TokenEvent, ErrorReply]
    assert msgs[-1].code == ErrorCode.INTERNAL  # type: ignore[attr-defined]
    assert env.root.wait_exit(CHILD, 30) == 1
    env.root.forget(CHILD)


def test_hang_keeps_answering_pings(env: MetaEnv, router: FakeRouter) -> None:
    start_worker(env.root, router, worker_config(env.config["cache"], hang_after_tokens=2))
    rid = router.rid()
    router.send(Complete(request_id=rid, model="m", mode="stream", prompt="hang"))
    # two decodes succeed; the third token is sent before its decode blocks, so once it
    # is here the engine's counters cannot move (after only two, the second decode may
    # still be counting: a Pong before it and one after differed)
    for _ in range(3):
        assert isinstance(router.recv()[1], TokenEvent)
    router.wait_status(lambda s: s.phase == "generating")
    pongs = []
    for seq in (1, 2):
        env.root.send(CHILD, Ping(seq=seq))
        pongs.append(env.root.wait_message(CHILD, Pong, 10))
    assert [p.active for p in pongs] == [1, 1]
    assert pongs[0].progress == pongs[1].progress  # frozen: the supervisor sees a hang
    assert env.root.kill(CHILD) == -signal.SIGKILL
    env.root.forget(CHILD)


def test_sigterm_drains_and_exits_zero(env: MetaEnv, router: FakeRouter) -> None:
    proc = start_worker(env.root, router, worker_config(env.config["cache"], token_delay_ms=10))
    rid = router.rid()
    router.send(
        Complete(
            request_id=rid,
            model="m",
            mode="stream",
            prompt="term",
            options=RequestOptions(response_tokens=30),
        )
    )
    assert isinstance(router.recv()[1], TokenEvent)
    os.kill(proc.pid, signal.SIGTERM)
    _, done = router.stream(rid)
    assert not done.stats.cancelled and done.stats.completion_tokens == 30  # drained, not cut
    assert env.root.wait_exit(CHILD, 30) == 0
    env.root.forget(CHILD)


def test_load_failure_is_reported(env: MetaEnv, router: FakeRouter) -> None:
    with pytest.raises(ChildFailedError, match="malformed_gguf"):
        env.root.spawn(
            CHILD, WORKER, worker_config(env.config["cache"], fail_load="malformed_gguf")
        )
    assert env.root.wait_exit(CHILD, 30) == 0
    env.root.forget(CHILD)


def test_bad_config_and_bad_handshake(env: MetaEnv, router: FakeRouter) -> None:
    env.root.start(CHILD, WORKER)
    env.root.wait_message(CHILD, Hello, 30)
    env.root.send(CHILD, Init(config={"model_id": "m", "model": {"backend": "nope"}}))
    failed = env.root.wait_message(CHILD, StartFailed, 30)
    assert failed.code == ErrorCode.BAD_REQUEST and "backend" in failed.message
    assert env.root.wait_exit(CHILD, 30) == 0
    env.root.forget(CHILD)
    # anything but Init in answer to Hello: the worker gives up with a non-zero exit
    env.root.start(CHILD, WORKER)
    env.root.wait_message(CHILD, Hello, 30)
    env.root.send(CHILD, Ready())
    assert env.root.wait_exit(CHILD, 30) == 1
    env.root.forget(CHILD)


# ================================================================ without meta
def test_serves_without_meta(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cache = {"tiers": [{"name": "ram", "path": str(tmp_path / "ram")}]}
    with FakeRoot(run_dir) as root:
        router = FakeRouter(run_dir)
        try:
            start_worker(root, router, worker_config(cache))
            first = router.complete(PROMPT)  # lookups time out once, then miss at once
            assert first.cache_hit_kind == "cold"
            t0 = time.monotonic()
            again = router.complete(PROMPT + " more")
            assert time.monotonic() - t0 < 1.0
            assert again.cache_hit_kind == "partial"  # the live KV still works
            assert root.stop(CHILD, timeout_s=30) == 0
            root.forget(CHILD)
        finally:
            if CHILD in root.children:
                root.kill(CHILD)
                root.forget(CHILD)
            router.close()
    assert not list((tmp_path / "ram").glob("*.kvc"))
