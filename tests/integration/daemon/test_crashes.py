"""Worker and router deaths: in-flight requests fail at once, children come back or fail."""

from __future__ import annotations

import os
import signal
import time

import pytest

from erllama.protocol.codec import decode_result
from erllama.protocol.messages import (
    Complete,
    CompletionResult,
    ErrorReply,
    GetModelInfo,
    ListModels,
    ModelInfo,
    Reply,
    RequestOptions,
    TokenEvent,
)
from tests.support.daemon import DaemonFactory, RawClient, stub_model, wait_until

pytestmark = pytest.mark.timeout(120)


def info(c: RawClient, model: str) -> ModelInfo:
    r = c.call(GetModelInfo(model=model))
    assert isinstance(r, Reply), r
    return decode_result(r.result, ModelInfo)


def test_worker_sigkill_mid_stream_fails_the_request_at_once(
    daemon_factory: DaemonFactory,
) -> None:
    d = daemon_factory([stub_model("m1", token_delay_ms=20), stub_model("m2")])
    c = d.client()
    rid = c.send(
        Complete(
            model="m1", mode="stream", prompt="hi", options=RequestOptions(response_tokens=500)
        )
    )
    first = c.recv(10)
    assert isinstance(first, TokenEvent) and first.request_id == rid, first
    pid = info(c, "m1").pid
    assert pid == d.child_pid("worker.m1")
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    while True:
        msg = c.recv(2.0)
        if not isinstance(msg, TokenEvent):
            break
    assert time.monotonic() - t0 < 2.0
    assert isinstance(msg, ErrorReply) and msg.code == "worker_crashed" and msg.retryable, msg
    assert msg.request_id == rid
    d.wait_for_event("exit", 5, child="worker.m1", pid=pid)
    d.wait_for_event("restart", 10, child="worker.m1")
    d.wait_for_event("ready", 30, child="worker.m1")
    # the root tells the router before it publishes, but the two paths are not ordered
    wait_until(lambda: info(c, "m1").state == "ready", 5, what="m1 ready at the router")
    mi = info(c, "m1")
    assert mi.restarts == 1 and mi.pid != pid
    assert "SIGKILL" in (mi.last_exit or "")
    r = c.call(Complete(model="m1", prompt="again", options=RequestOptions(response_tokens=3)))
    assert isinstance(r, Reply), r
    assert decode_result(r.result, CompletionResult).reply


def test_requests_during_a_restart_are_held_until_ready(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory(
        [stub_model("m1", load_delay_ms=500)],
        supervisor={"heartbeat_interval_s": 1.0},
    )
    c = d.client()
    pid = info(c, "m1").pid
    os.kill(pid, signal.SIGKILL)
    d.wait_for_event("exit", 5, child="worker.m1")
    r = c.call(Complete(model="m1", prompt="held", options=RequestOptions(response_tokens=2)), 30)
    assert isinstance(r, Reply), r
    assert info(c, "m1").restarts == 1


def test_crash_looping_model_ends_failed_while_others_serve(daemon_factory: DaemonFactory) -> None:
    loop_restart = {
        "max_restarts": 2,
        "within_s": 60.0,
        "backoff_initial_s": 0.1,
        "backoff_max_s": 0.2,
        "startsecs": 0.1,
    }
    bad = {**stub_model("bad", crash_after_tokens=1), "restart": loop_restart}
    d = daemon_factory([bad, stub_model("good")])
    c = d.client()
    req = Complete(model="bad", prompt="x", options=RequestOptions(response_tokens=5))
    codes = []
    for _ in range(3):
        r = c.call(req, timeout=30)
        assert isinstance(r, ErrorReply), r
        codes.append(r.code)
        if r.code == "failed":
            break
    assert codes[0] == "worker_crashed"
    d.wait_for_event("failed", 30, child="worker.bad")
    wait_until(lambda: info(c, "bad").state == "failed", 5, what="bad failed at the router")
    mi = info(c, "bad")
    assert mi.state == "failed" and mi.status == "failed"
    assert mi.last_exit and mi.restarts == 2
    r = c.call(req)
    assert isinstance(r, ErrorReply) and r.code == "failed", r
    # the other model is untouched
    ok = c.call(Complete(model="good", prompt="y", options=RequestOptions(response_tokens=3)))
    assert isinstance(ok, Reply), ok
    listed = c.call(ListModels())
    assert isinstance(listed, Reply)
    states = {m.id: m.state for m in decode_result(listed.result, list[ModelInfo])}
    assert states == {"bad": "failed", "good": "ready"}


def test_router_crash_is_restarted_and_keeps_the_model_table(
    daemon_factory: DaemonFactory,
) -> None:
    d = daemon_factory([stub_model("m1")])
    c = d.client()
    router_pid = d.child_pid("router")
    os.kill(router_pid, signal.SIGKILL)
    d.wait_for_event("exit", 5, child="router")
    d.wait_for_event("ready", 10, child="router")
    r = c.call(Complete(model="m1", prompt="z", options=RequestOptions(response_tokens=2)), 15)
    assert isinstance(r, Reply), r
    assert info(c, "m1").state == "ready"


def test_hung_worker_is_killed_and_restarted(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory(
        [stub_model("m1", hang_after_tokens=1)],
        supervisor={"heartbeat_interval_s": 0.5, "stall_timeout_s": 2.0},
    )
    c = d.client()
    rid = c.send(
        Complete(model="m1", mode="stream", prompt="h", options=RequestOptions(response_tokens=50))
    )
    t0 = time.monotonic()
    while True:
        msg = c.recv(15)
        if not isinstance(msg, TokenEvent):
            break
    assert isinstance(msg, ErrorReply) and msg.code == "worker_crashed", msg
    assert msg.request_id == rid
    assert time.monotonic() - t0 < 10
    ev = d.wait_for_event("exit", 5, child="worker.m1")
    assert "progress" in ev["reason"], ev
    d.wait_for_event("ready", 30, child="worker.m1")


def test_frozen_worker_misses_heartbeats_and_is_restarted(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory(
        [stub_model("m1")],
        supervisor={"heartbeat_interval_s": 0.3, "heartbeat_liveness": 3},
    )
    pid = d.child_pid("worker.m1")
    os.kill(pid, signal.SIGSTOP)  # alive but silent: only the heartbeat can tell
    t0 = time.monotonic()
    ev = d.wait_for_event("exit", 10, child="worker.m1", pid=pid)
    assert "heartbeat" in ev["reason"], ev
    assert time.monotonic() - t0 < 5
    d.wait_for_event("ready", 30, child="worker.m1")
    c = d.client()
    r = c.call(Complete(model="m1", prompt="x", options=RequestOptions(response_tokens=2)), 15)
    assert isinstance(r, Reply), r


def test_root_intensity_exceeded_stops_the_daemon_non_zero(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory([stub_model("m1")], supervisor={"max_restarts": 1, "within_s": 60.0})
    os.kill(d.child_pid("router"), signal.SIGKILL)
    d.wait_for_event("ready", 10, child="router")
    os.kill(d.child_pid("router"), signal.SIGKILL)
    assert d.proc.wait(30) == 1
    assert "event=root_intensity_exceeded child=router" in d.log_tail(400)
    d.teardown(expect_code=1)  # and still nothing left behind
