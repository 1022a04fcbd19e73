"""The daemon as a whole: start, stop, run-dir ownership, root death."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from erllama.protocol.codec import decode_result
from erllama.protocol.messages import (
    TERMINAL_REPLIES,
    Complete,
    DaemonStatus,
    GetCounters,
    GetDaemonStatus,
    ListModels,
    ModelInfo,
    Reply,
    RequestOptions,
    TokenEvent,
)
from tests.support.daemon import REPO, DaemonFactory, stub_model

pytestmark = pytest.mark.timeout(90)


def test_start_and_stop_leave_nothing_behind(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory([stub_model("m1"), stub_model("m2")])
    for cid in ("meta", "router", "worker.m1", "worker.m2"):
        assert any(e["event"] == "ready" and e["child"] == cid for e in d.seen), cid
    assert (d.run_dir / "erllama.pid").read_text().strip() == str(d.pid)
    assert d.ram_dir.is_dir()
    assert oct(d.run_dir.stat().st_mode & 0o777) == "0o700"
    c = d.client()
    r = c.call(ListModels())
    assert isinstance(r, Reply), r
    infos = decode_result(r.result, list[ModelInfo])
    assert [(i.id, i.state, i.status) for i in infos] == [
        ("m1", "ready", "idle"),
        ("m2", "ready", "idle"),
    ]
    assert all(i.pid in {p.pid for p in d.children()} for i in infos)
    st = c.call(GetDaemonStatus())
    assert isinstance(st, Reply), st
    status = decode_result(st.result, DaemonStatus)
    assert status.pid == d.pid and [m.id for m in status.models] == ["m1", "m2"]
    assert [t.name for t in status.tiers] == ["ram"]  # from meta, through the router
    counters = c.call(GetCounters())
    assert isinstance(counters, Reply), counters
    values = decode_result(counters.result, dict[str, int])
    assert values["router_requests"] >= 3
    d.teardown()  # SIGTERM, exit 0, no process, socket, pid file or ram dir left


def test_graceful_stop_orders_children_and_exits_zero(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory([stub_model("m1")])
    procs = d.children()  # psutil handles: is_running() is safe against pid reuse
    t0 = time.monotonic()
    assert d.stop() == 0, d.log_tail()
    assert time.monotonic() - t0 < 15, d.log_tail()
    # multiprocess's resource tracker leaves once the root is gone: allow it a moment
    assert not d.wait_no_processes(timeout=5.0)
    assert not [p for p in procs if _alive(p)]
    text = d.log_tail(200)
    order = [text.find(f"event=stop child={c} ") for c in ("worker.m1", "router", "meta")]
    assert all(i >= 0 for i in order) and order == sorted(order), text
    d.teardown()


def test_second_daemon_on_the_same_run_dir_is_refused(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory([])
    second = subprocess.run(
        [sys.executable, "-m", "erllama.supervisor", "--config", str(d.config_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        env={k: v for k, v in os.environ.items() if not k.startswith("ERLLAMA_")},
    )
    assert second.returncode == 2, second.stderr
    assert "already_running" in second.stderr
    # the first one is untouched
    assert isinstance(d.client().call(ListModels()), Reply)
    assert (d.run_dir / "control.sock").exists()


def test_root_sigkill_takes_every_child_down(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory([stub_model("m1"), stub_model("m2")])
    children = d.children()
    assert len(children) >= 4
    os.kill(d.pid, signal.SIGKILL)
    d.proc.wait(5)
    t0 = time.monotonic()
    left = d.wait_no_processes(timeout=5.0)
    assert not left, [(p.pid, p.cmdline()[:3]) for p in left]
    assert time.monotonic() - t0 < 5.0
    # the run dir is stale now (pid file, maybe sockets); a new daemon takes it over
    assert (d.run_dir / "erllama.pid").exists()
    d.close_sockets()
    d2 = daemon_factory([stub_model("m1")], run_dir=d.run_dir)
    assert isinstance(d2.client().call(ListModels()), Reply)
    d2.teardown()


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_graceful_stop_ends_in_flight_streams(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory(
        [stub_model("m1", token_delay_ms=20)],
        supervisor={"drain_timeout_s": 1.0, "term_timeout_s": 2.0},
    )
    c = d.client()
    rid = c.send(
        Complete(
            model="m1", mode="stream", prompt="s", options=RequestOptions(response_tokens=4000)
        )
    )
    assert isinstance(c.recv(10), TokenEvent)
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    while True:
        msg = c.recv(10)
        if not isinstance(msg, TokenEvent):
            break
    # the stream ends with a terminal message (done/cancelled or an error), never a hang
    assert type(msg) in TERMINAL_REPLIES and msg.request_id == rid, msg
    assert d.stop() == 0
    assert time.monotonic() - t0 < 10
    d.teardown()


def test_core_child_that_cannot_start_stops_the_daemon(daemon_factory: DaemonFactory) -> None:
    # the router refuses a tcp endpoint (no CURVE yet): a core start failure is fatal
    d = daemon_factory(
        [stub_model("m1")], daemon={"endpoint": "tcp://127.0.0.1:1"}, wait_ready=False
    )
    assert d.proc.wait(30) == 1
    ev = d.wait_for_event("failed", 5, child="router")
    assert "not_supported" in ev["reason"], ev
    assert not any(e["child"] == "worker.m1" for e in d.seen)
    d.teardown(expect_code=1)
