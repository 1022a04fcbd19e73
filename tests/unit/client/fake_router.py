"""A fake daemon router for client tests: a real ROUTER socket in a thread.

``FakeRouter`` binds an ipc endpoint, decodes every client request with the
protocol's own decoder, records it, and hands it to a handler that runs in
the router thread and answers through ``Conn.send``. ``FakeDaemon`` is the
default handler: a tiny in-memory daemon (model table, deterministic
completions and streams) with a few special model ids:

* ``hold``: a stream sends one token, then waits; a ``Cancel`` for it is
  answered with ``done`` (``cancelled``) and the cancel's own ``ok``.
* ``crash``: a stream sends one token, then ``error`` ``worker_crashed``
  with a remote traceback.
* ``silent``: nothing is ever answered.

Tests wait on what the router received (``wait_for`` / ``wait_for_async``),
never on time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import zmq

from erllama.protocol.codec import PROTOCOL_ID, Decoder, encode, error_reply, reply
from erllama.protocol.messages import (
    CacheDelta,
    CacheHit,
    Cancel,
    ClientRequest,
    Complete,
    CompletionResult,
    DaemonStatus,
    Detokenize,
    DoneEvent,
    ErrorReply,
    Evict,
    GetCounters,
    GetDaemonStatus,
    GetModelInfo,
    GetStatusRow,
    ListCachedPrefixes,
    ListModels,
    LoadModel,
    ModelInfo,
    ModelStatus,
    Msg,
    QueueDepth,
    ShutdownModel,
    Stats,
    StatusRow,
    ThinkingDelta,
    ThinkingEnd,
    TierUsage,
    TokenEvent,
    Tokenize,
    ToolCallDelta,
    ToolCallEnd,
    Unload,
)
from erllama.protocol.tokens import pack_tokens, unpack_tokens

MAX_IPC_PATH = 100
REMOTE_TB = 'Traceback (most recent call last):\n  File "worker.py", line 1\nSIGKILL\n'


@contextlib.contextmanager
def short_dir(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path``, or a short directory in /tmp when ipc paths would be too long."""
    if len(str(tmp_path / "client.sock")) <= MAX_IPC_PATH:
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(prefix="erlc-", dir="/tmp"))
    try:
        yield d
    finally:
        for p in d.iterdir():
            p.unlink()
        d.rmdir()


@dataclass
class Conn:
    """The client a request came from; ``send`` answers it (router thread only)."""

    router: FakeRouter
    client_id: bytes

    def send(self, msg: Msg) -> None:
        self.router.send_frames([self.client_id, *encode(msg)])

    def send_raw(self, frames: list[bytes]) -> None:
        self.router.send_frames([self.client_id, *frames])


Handler = Callable[[Conn, Msg], None]


class FakeRouter:
    """A ROUTER socket bound at ``endpoint``, served by a thread."""

    def __init__(self, endpoint: str, handler: Handler | None = None) -> None:
        self.endpoint = endpoint
        self.handler: Handler = handler or FakeDaemon()
        self.received: list[Msg] = []
        self._cond = threading.Condition()
        self._async_waiters: list[tuple[Callable[[Msg], bool], asyncio.AbstractEventLoop, Any]] = []
        self._calls: list[Callable[[], None]] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._stop = False
        self._bound = threading.Event()
        self._error: BaseException | None = None
        self._sock: zmq.Socket[bytes] | None = None
        self._thread = threading.Thread(target=self._run, name="fake-router", daemon=True)

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> FakeRouter:
        self._thread.start()
        assert self._bound.wait(10), "fake router did not bind"
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        """Close the socket (clients see a disconnect) and join the thread."""
        if not self._thread.is_alive():
            return
        self._stop = True
        self._wake_w.send(b"x")
        self._thread.join(10)
        assert not self._thread.is_alive(), "fake router thread did not stop"

    def exit_soon(self) -> None:
        """From a handler: close the socket and end the thread after this message."""
        self._stop = True

    def close(self) -> None:
        self.stop()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> FakeRouter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- test side
    def call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` in the router thread (to send something later)."""
        with self._cond:
            self._calls.append(fn)
        self._wake_w.send(b"c")

    def wait_for(self, pred: Callable[[Msg], bool], timeout: float = 5.0) -> Msg:
        """The first received message matching ``pred`` (waits on a condition)."""
        with self._cond:
            found: list[Msg] = []

            def check() -> bool:
                found[:] = [m for m in self.received if pred(m)][:1]
                return bool(found)

            assert self._cond.wait_for(check, timeout), (
                f"the fake router did not receive the expected message; got {self.received}"
            )
            return found[0]

    async def wait_for_async(self, pred: Callable[[Msg], bool], timeout: float = 5.0) -> Msg:
        """``wait_for`` for a coroutine: the router thread resolves a future of this loop."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Msg] = loop.create_future()
        with self._cond:
            for m in self.received:
                if pred(m):
                    return m
            self._async_waiters.append((pred, loop, fut))
        async with asyncio.timeout(timeout):
            return await fut

    def of_type(self, cls: type[Msg]) -> list[Any]:
        with self._cond:
            return [m for m in self.received if isinstance(m, cls)]

    # ---------------------------------------------------------------- router thread
    def send_frames(self, frames: list[Any]) -> None:
        assert self._sock is not None
        assert threading.current_thread() is self._thread, "send only from the router thread"
        self._sock.send_multipart(frames)

    def _run(self) -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        decoder: Decoder[Any] = Decoder(ClientRequest)
        try:
            sock = ctx.socket(zmq.ROUTER)
            sock.setsockopt(zmq.LINGER, 0)
            try:
                sock.bind(self.endpoint)
            except zmq.ZMQError as exc:
                self._error = exc
                sock.close()
                return
            self._sock = sock
            self._bound.set()
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            poller.register(self._wake_r.fileno(), zmq.POLLIN)
            while not self._stop:
                ready = dict(poller.poll())
                if self._wake_r.fileno() in ready:
                    self._wake_r.recv(4096)
                    with self._cond:
                        calls, self._calls = self._calls, []
                    for fn in calls:
                        fn()
                if sock in ready:
                    while True:
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        assert frames[1] == PROTOCOL_ID, frames
                        msg = decoder.decode(frames[1:])
                        self._record(msg)
                        self.handler(Conn(self, frames[0]), msg)
        except BaseException as exc:  # surfaced by the test through stop()/start()
            self._error = exc
            raise
        finally:
            self._bound.set()
            if self._sock is not None:
                self._sock.close(linger=0)
                self._sock = None
            ctx.term()
            path = self.endpoint.removeprefix("ipc://")
            with contextlib.suppress(OSError):
                os.unlink(path)

    def _record(self, msg: Msg) -> None:
        with self._cond:
            self.received.append(msg)
            self._cond.notify_all()
            keep = []
            for pred, loop, fut in self._async_waiters:
                if pred(msg):
                    with contextlib.suppress(RuntimeError):
                        loop.call_soon_threadsafe(_resolve, fut, msg)
                else:
                    keep.append((pred, loop, fut))
            self._async_waiters = keep


def _resolve(fut: asyncio.Future[Msg], msg: Msg) -> None:
    if not fut.done():
        fut.set_result(msg)


# ================================================================ a tiny daemon
def model_info(model_id: str, **kw: Any) -> ModelInfo:
    base: dict[str, Any] = {
        "id": model_id,
        "model_id": model_id,
        "pid": 4242,
        "status": "idle",
        "phase": "idle",
        "pending_len": 0,
        "last_cache_hit": None,
        "backend": "stub",
        "context_size": 4096,
        "quant_type": "f16",
        "quant_bits": 16,
        "quant_tag": "f16",
        "tier": "ram",
        "fingerprint": bytes(32),
        "loaded_at_monotonic": 1,
        "vram_estimate_b": 0,
    }
    base.update(kw)
    return ModelInfo(**base)


def stats(n_prompt: int, n_gen: int, *, cancelled: bool = False) -> Stats:
    return Stats(
        prompt_tokens=n_prompt,
        completion_tokens=n_gen,
        prefill_ms=1.5,
        generation_ms=20.0,
        cache_hit_kind="cold",
        finish_reason="cancelled" if cancelled else "length",
        cancelled=cancelled,
        finish_key=None if cancelled else b"\x01" * 32,
        committed_tokens=n_prompt + n_gen,
        cache_delta=CacheDelta(read=0, created=n_prompt + n_gen),
    )


def gen_tokens(n: int) -> list[int]:
    return [100 + i for i in range(n)]


@dataclass
class FakeDaemon:
    """Answers every client operation the way the real router + workers do."""

    models: dict[str, ModelInfo] = field(
        default_factory=lambda: {m: model_info(m) for m in ("m1", "hold", "crash", "silent")}
    )
    held: dict[str, tuple[Conn, int]] = field(default_factory=dict)
    counter_values: dict[str, int] = field(
        default_factory=lambda: {"hits_exact": 3, "saves_cold": 1}
    )
    next_model: int = 1

    def __call__(self, conn: Conn, msg: Msg) -> None:
        rid = msg.request_id
        model = getattr(msg, "model", None)
        if model == "silent":
            return
        if isinstance(msg, LoadModel):
            mid = msg.model_id or msg.config.get("id") or f"erllama_model_{self.next_model}"
            self.next_model += 1
            if mid in self.models:
                conn.send(error_reply(rid, "already_loaded", f"model {mid!r} is loaded"))
                return
            self.models[mid] = model_info(mid, backend=msg.config.get("backend", "llama"))
            conn.send(reply(rid, mid))
        elif isinstance(msg, Unload):
            if self.models.pop(msg.model, None) is None:
                conn.send(error_reply(rid, "not_found", f"model {msg.model!r} is not loaded"))
            else:
                conn.send(reply(rid, None))
        elif isinstance(msg, ListModels):
            conn.send(reply(rid, list(self.models.values())))
        elif isinstance(msg, GetModelInfo):
            if msg.model not in self.models:
                conn.send(error_reply(rid, "noproc", f"model {msg.model!r} unknown"))
            else:
                conn.send(reply(rid, self.models[msg.model]))
        elif isinstance(msg, Cancel):
            held = self.held.pop(msg.target, None)
            if held is not None:
                hconn, n = held
                hconn.send(
                    DoneEvent(request_id=msg.target, seq=n, stats=stats(3, n - 1, cancelled=True))
                )
            conn.send(reply(rid, None))
        elif model is not None and model not in self.models:
            conn.send(error_reply(rid, "model_not_loaded", f"model {model!r} is not loaded"))
        elif isinstance(msg, Complete):
            self._complete(conn, msg)
        elif isinstance(msg, Tokenize):
            conn.send(reply(rid, pack_tokens(ord(c) for c in msg.text)))
        elif isinstance(msg, Detokenize):
            conn.send(reply(rid, "".join(chr(t) for t in unpack_tokens(msg.tokens))))
        elif isinstance(msg, GetStatusRow):
            row = StatusRow(
                model=msg.model,
                phase="generating",
                pending_len=2,
                queue_depth=1,
                last_cache_hit=CacheHit(kind="partial", prefix_len=64),
            )
            conn.send(reply(rid, row))
        elif isinstance(msg, QueueDepth):
            conn.send(reply(rid, 7 if msg.model is None else 1))
        elif isinstance(msg, ModelStatus):
            conn.send(reply(rid, "prefilling"))
        elif isinstance(msg, ListCachedPrefixes):
            conn.send(reply(rid, len(unpack_tokens(msg.tokens)) // 2))
        elif isinstance(msg, GetCounters):
            conn.send(reply(rid, self.counter_values))
        elif isinstance(msg, Evict | ShutdownModel):
            conn.send(reply(rid, None))
        elif isinstance(msg, GetDaemonStatus):
            tier = TierUsage(name="ram", path="/dev/shm/x", used_bytes=10, budget_bytes=100, rows=1)
            tiers = [tier]
            status = DaemonStatus(
                models=list(self.models.values()), tiers=tiers, run_dir="/run/x", pid=7
            )
            conn.send(reply(rid, status))
        else:  # pragma: no cover
            conn.send(error_reply(rid, "not_supported", type(msg).__name__))

    def _complete(self, conn: Conn, msg: Complete) -> None:
        rid = msg.request_id
        n = msg.options.response_tokens or 4
        if msg.tokens is not None:
            prompt = unpack_tokens(msg.tokens)
        else:
            prompt = [ord(c) for c in msg.prompt or ""]
        gen = gen_tokens(n)
        if msg.mode == "complete":
            result = CompletionResult(
                reply=" ".join(f"t{t}" for t in gen),
                generated=pack_tokens(gen),
                context_tokens=pack_tokens(prompt + gen),
                committed_tokens=len(prompt) + n,
                finish_key=b"\x01" * 32,
                cache_hit_kind="cold",
                finish_reason="length",
                cache_delta=CacheDelta(read=0, created=len(prompt) + n),
                stats=stats(len(prompt), n),
            )
            conn.send(reply(rid, result))
            return
        if msg.model == "hold":
            conn.send(TokenEvent(request_id=rid, seq=0, text="a", token_id=1))
            self.held[rid] = (conn, 1)
            return
        if msg.model == "crash":
            conn.send(TokenEvent(request_id=rid, seq=0, text="a", token_id=1))
            conn.send(
                ErrorReply(
                    request_id=rid,
                    code="worker_crashed",
                    message="the model process died",
                    retryable=True,
                    remote_traceback=REMOTE_TB,
                )
            )
            return
        seq = 0
        if msg.options.thinking == "enabled":
            conn.send(ThinkingDelta(request_id=rid, seq=seq, text="hmm"))
            conn.send(ThinkingEnd(request_id=rid, seq=seq + 1, signature=b"sig"))
            conn.send(ToolCallDelta(request_id=rid, seq=seq + 2, text="{"))
            conn.send(ToolCallEnd(request_id=rid, seq=seq + 3, text="{}"))
            seq += 4
        for t in gen:
            conn.send(TokenEvent(request_id=rid, seq=seq, text=f"t{t} ", token_id=t))
            seq += 1
        conn.send(DoneEvent(request_id=rid, seq=seq, stats=stats(len(prompt), n)))


def body_of(msg: Msg) -> dict[str, Any]:
    """A message as plain builtins (for asserting request shapes)."""
    out: dict[str, Any] = msgspec.to_builtins(msg)
    return out
