"""The router's link to the scheduler, against a bound ROUTER standing in for it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from erllama.protocol.codec import Decoder, encode, reply
from erllama.protocol.messages import (
    ErrorReply,
    GetSchedulerStatus,
    GetVramInfo,
    Msg,
    Reply,
    SchedulerStatus,
)
from erllama.protocol.sockets import SCHEDULER_SOCK, ipc_endpoint, make_socket
from erllama.router import schedlink
from erllama.router.schedlink import SchedulerLink

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    c: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield c
    c.destroy(linger=0)


def wait_sent(link: SchedulerLink, now: float) -> None:
    """Retry until the held requests went out (the DEALER connects asynchronously)."""
    deadline = time.monotonic() + 20.0  # generous: a loaded machine connects late
    while time.monotonic() < deadline:
        link.retry(now)
        if not link._unsent:
            return
        zmq.Poller().poll(10)  # nothing to wait on: the connection completes in libzmq
    raise AssertionError("not connected")


def test_no_scheduler_answers_after_the_grace(
    ctx: zmq.Context[zmq.Socket[bytes]], tmp_path: Path
) -> None:
    link = SchedulerLink(ctx, str(tmp_path))
    try:
        link.forward(b"c1", GetVramInfo(request_id="a"), now=100.0)
        link.forward(b"c2", GetSchedulerStatus(request_id="b"), now=100.0)
        assert link.next_deadline(100.0) == 100.0 + schedlink.RETRY_S
        assert link.expire(100.5) == [], "still within the grace"
        out = dict(link.expire(100.0 + schedlink.CONNECT_GRACE_S))
        vram, status = out[b"c1"], out[b"c2"]
        assert isinstance(vram, ErrorReply) and (vram.code, vram.request_id) == ("no_gpu", "a")
        assert isinstance(status, ErrorReply) and (status.code, status.retryable) == (
            "timeout",
            True,
        )
        assert link.next_deadline(200.0) == float("inf")
    finally:
        link.close()


def test_replies_go_back_under_the_client_request_id(
    ctx: zmq.Context[zmq.Socket[bytes]], tmp_path: Path
) -> None:
    sched = make_socket(ctx, zmq.ROUTER, bind=ipc_endpoint(tmp_path, SCHEDULER_SOCK), linger_ms=0)
    link = SchedulerLink(ctx, str(tmp_path))
    decoder: Decoder[Msg] = Decoder(GetSchedulerStatus)
    try:
        link.forward(b"client", GetSchedulerStatus(request_id="mine"), now=0.0)
        wait_sent(link, 0.0)
        assert sched.poll(20000)
        peer, *frames = sched.recv_multipart()
        msg = decoder.decode(frames)
        assert msg.request_id != "mine", "the router's own id"
        st = SchedulerStatus(
            enabled=True, pressure_source="noop", sampler="noop", sampler_reason="",
            interval_s=1.0, high_watermark=0.9, low_watermark=0.1, min_evict_bytes=1,
            evict_tiers=[], resource=None, last_used=None, last_total=None, last_ratio=None,
            sampled_at=None, last_decision="none", last_action=None, plans=0, vram=None,
            vram_reason="",
        )  # fmt: skip
        sched.send_multipart([peer, *encode(reply(msg.request_id, st))])
        assert link.sock.poll(5000)
        got = link.on_frames(link.sock.recv_multipart())
        assert got is not None
        client_id, answer = got
        assert client_id == b"client" and isinstance(answer, Reply)
        assert answer.request_id == "mine"
        # a reply past its deadline finds no call (the client was told ``timeout``)
        link.forward(b"client", GetSchedulerStatus(request_id="late"), now=0.0)
        wait_sent(link, 0.0)
        expired = link.expire(schedlink.TIMEOUT_S)
        assert [(c, m.request_id) for c, m in expired] == [(b"client", "late")]
        assert all(isinstance(m, ErrorReply) and m.code == "timeout" for _, m in expired)
        peer, *frames = sched.recv_multipart()
        sched.send_multipart([peer, *encode(reply(decoder.decode(frames).request_id))])
        assert link.sock.poll(5000)
        assert link.on_frames(link.sock.recv_multipart()) is None
    finally:
        link.close()
        sched.close(linger=0)
