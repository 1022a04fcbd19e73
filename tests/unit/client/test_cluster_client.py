"""``ClusterClient`` / ``AsyncClusterClient`` over fake routers: routing and failover."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import erllama
from erllama.protocol.codec import error_reply
from erllama.protocol.messages import Complete, Msg

from .fake_router import Conn, FakeDaemon, FakeRouter

pytestmark = pytest.mark.timeout(30)
QUICK = erllama.Timeout(request=5, connect=1)


class Busy(FakeDaemon):
    """A daemon whose model queue is full: every generation is answered ``busy``."""

    def __call__(self, conn: Conn, msg: Msg) -> None:
        if isinstance(msg, Complete):
            conn.send(
                error_reply(msg.request_id, "busy", "4 requests already wait", retryable=True)
            )
            return
        super().__call__(conn, msg)


@pytest.fixture
def pair(sock_dir: Path) -> Iterator[tuple[FakeRouter, FakeRouter]]:
    with (
        FakeRouter(f"ipc://{sock_dir / 'a.sock'}") as a,
        FakeRouter(f"ipc://{sock_dir / 'b.sock'}") as b,
    ):
        yield a, b


def completes(r: FakeRouter) -> int:
    return len(r.of_type(Complete))


def test_a_conversation_stays_on_one_daemon(pair: tuple[FakeRouter, FakeRouter]) -> None:
    a, b = pair
    with erllama.ClusterClient([a.endpoint, b.endpoint], timeout=QUICK) as c:
        prompt = "system: be brief\n" + "user: tell me about ships and harbours\n" * 4
        first = c.complete("m1", prompt)
        served_by = a if completes(a) else b
        prompt += first.reply + "\nuser: and the lighthouse?\n"
        for _ in range(3):
            c.complete("m1", prompt)
        assert completes(served_by) == 4
        assert c.chooser.inflight(served_by.endpoint) == 0


def test_round_robin_alternates(pair: tuple[FakeRouter, FakeRouter]) -> None:
    a, b = pair
    with erllama.ClusterClient([a.endpoint, b.endpoint], policy="round_robin") as c:
        for _ in range(4):
            c.complete("m1", "the same prompt")
    assert completes(a) == completes(b) == 2


def test_busy_fails_over(sock_dir: Path) -> None:
    with (
        FakeRouter(f"ipc://{sock_dir / 'a.sock'}", Busy()) as a,
        FakeRouter(f"ipc://{sock_dir / 'b.sock'}") as b,
        erllama.ClusterClient([a.endpoint, b.endpoint], timeout=QUICK) as c,
    ):
        # a prompt whose first choice is A (HRW over these tmp paths)
        prompt = next(
            p for i in range(100) if c.route("m1", prompt=(p := f"prompt {i}"))[0] == a.endpoint
        )
        for _ in range(4):
            done = c.complete("m1", prompt)
            assert done.reply
            events = list(c.stream("m1", prompt))
            assert events[-1].kind == "done"
        assert completes(b) == 8
        assert completes(a) >= 1  # tried at least once, then kept at the back
        assert c.chooser.inflight(a.endpoint) == c.chooser.inflight(b.endpoint) == 0


def test_a_missing_daemon_fails_over_at_once(sock_dir: Path) -> None:
    gone = f"ipc://{sock_dir / 'gone.sock'}"
    with (
        FakeRouter(f"ipc://{sock_dir / 'b.sock'}") as b,
        erllama.ClusterClient([gone, b.endpoint], timeout=QUICK) as c,
    ):
        first = next(p for i in range(100) if c.route("m1", prompt=(p := f"p{i}"))[0] == gone)
        assert c.complete("m1", first).reply
        for i in range(3):
            assert c.complete("m1", f"p{i}").reply
            assert [e.kind for e in c.infer("m1", [1, 2, 3 + i])][-1] == "done"
        assert c.chooser.is_down(gone, time.monotonic())
        assert completes(b) == 7


def test_every_daemon_busy_raises_the_error(sock_dir: Path) -> None:
    with (
        FakeRouter(f"ipc://{sock_dir / 'a.sock'}", Busy()) as a,
        FakeRouter(f"ipc://{sock_dir / 'b.sock'}", Busy()) as b,
        erllama.ClusterClient([a.endpoint, b.endpoint], timeout=QUICK) as c,
    ):
        with pytest.raises(erllama.ConflictError) as info:
            c.complete("m1", "x")
        assert info.value.code == "busy"
        with pytest.raises(erllama.ConflictError):
            list(c.stream("m1", "x"))
        assert completes(a) + completes(b) == 4


def test_a_stream_that_started_is_not_retried(pair: tuple[FakeRouter, FakeRouter]) -> None:
    a, b = pair
    with erllama.ClusterClient([a.endpoint, b.endpoint], timeout=QUICK) as c:
        s = c.stream("crash", "hello")
        assert next(s).kind == "token"
        with pytest.raises(erllama.WorkerCrashedError):
            next(s)
        s.close()
        assert completes(a) + completes(b) == 1


def test_other_errors_are_not_failed_over(pair: tuple[FakeRouter, FakeRouter]) -> None:
    a, b = pair
    with erllama.ClusterClient([a.endpoint, b.endpoint], timeout=QUICK) as c:
        with pytest.raises(erllama.UnknownModelError):
            c.complete("nope", "x")
        assert c.clients[a.endpoint].list_models()  # the per-daemon clients
    assert completes(a) + completes(b) == 1


def test_bad_arguments() -> None:
    with pytest.raises(TypeError):
        erllama.ClusterClient("ipc:///x")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        erllama.ClusterClient(["ipc:///x"], curve_server_keys={"tcp://y:1": "k" * 40})
    with pytest.raises(ValueError):
        erllama.ClusterClient([])


def test_async_twin_fails_over(sock_dir: Path) -> None:
    async def main(a: FakeRouter, b: FakeRouter) -> None:
        async with erllama.AsyncClusterClient([a.endpoint, b.endpoint], timeout=QUICK) as c:
            for i in range(3):
                done = await c.complete("m1", f"prompt {i}")
                assert done.reply
                async with await c.stream("m1", f"prompt {i}") as s:
                    kinds = [ev.kind async for ev in s]
                assert kinds[-1] == "done"
                s2 = await c.infer("m1", [5, 6, i])
                assert [ev.kind async for ev in s2][-1] == "done"
            assert c.chooser.inflight(a.endpoint) == c.chooser.inflight(b.endpoint) == 0

    with (
        FakeRouter(f"ipc://{sock_dir / 'a.sock'}", Busy()) as a,
        FakeRouter(f"ipc://{sock_dir / 'b.sock'}") as b,
    ):
        asyncio.run(main(a, b))
        assert completes(b) == 9


def test_a_dropped_stream_releases_its_load(pair: tuple[FakeRouter, FakeRouter]) -> None:
    a, b = pair
    with erllama.ClusterClient([a.endpoint, b.endpoint], timeout=QUICK) as c:
        s = c.stream("hold", "hello", session_id="s1")
        assert next(s).kind == "token"
        ep = s.endpoint
        assert ep is not None and c.chooser.inflight(ep) == 1
        del s
        gc.collect()
        assert c.chooser.inflight(ep) == 0
        assert c.complete("m1", "x", session_id="s1").reply  # a session: served, nothing kept
        assert not c.chooser._memory


def test_curve_keys_go_to_their_endpoints(tmp_path: Path) -> None:
    import zmq

    server_pub, _ = zmq.curve_keypair()
    pub, sec = zmq.curve_keypair()
    tcp = "tcp://10.0.0.2:7100"
    c = erllama.ClusterClient(
        ["ipc:///x/client.sock", tcp],
        curve_server_keys={tcp: server_pub},
        curve_secret_key=sec,
        curve_public_key=pub,
    )
    try:
        assert c.clients[tcp]._core.curve is not None
        assert c.clients["ipc:///x/client.sock"]._core.curve is None
        assert c.endpoints == ["ipc:///x/client.sock", tcp]
    finally:
        c.close()
