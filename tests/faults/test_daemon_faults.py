"""Deaths of the daemon's core processes under load: meta, router, root.

Extends tests/integration/daemon/test_crashes.py (router crash without load,
root intensity) and test_lifecycle.py (root SIGKILL of an idle daemon):

* meta SIGKILLed while clients stream: it restarts and rebuilds its index from
  the persistent tiers (the same rows as before), and the workers keep serving
  through the gap: every request completes (lookups are misses, not errors).
* router SIGKILLed with streams in flight: each client (``erllama.Client`` with
  a timeout) raises within a deadline, never hangs; the router comes back and
  the same client objects' successors are served.
* root SIGKILLed with streams in flight: every child exits within 5 s, the
  clients raise, and a new daemon starts cleanly on the same run directory
  and serves the rows the first one saved.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

import erllama
from erllama.protocol.codec import decode_result
from erllama.protocol.messages import DaemonStatus, GetDaemonStatus, Reply
from tests.faults.helpers import (
    bound_by,
    check_rows,
    complete,
    counters,
    fast_supervisor,
    model,
    tier_dirs,
    tiers_config,
    wait_claims_released,
    wait_saves,
)
from tests.support.daemon import Daemon, DaemonFactory, RawClient

pytestmark = pytest.mark.timeout(90)

CLIENT_DEADLINE_S = 5.0
GONE_CODES = {"shutting_down", "daemon_unavailable", "timeout"}


def tier_rows(c: RawClient) -> dict[str, int]:
    r = c.call(GetDaemonStatus())
    assert isinstance(r, Reply), r
    return {t.name: t.rows for t in decode_result(r.result, DaemonStatus).tiers}


def start(daemon_factory: DaemonFactory, root: Path, delay_ms: float = 0.0) -> Daemon:
    return daemon_factory(
        [
            model("m1", tier="disk", token_delay_ms=delay_ms),
            model("m2", tier="ram_file", token_delay_ms=delay_ms),
        ],
        supervisor=fast_supervisor(stall_timeout_s=10.0),
        cache=tiers_config(root),
    )


def seed(c: RawClient, n: int = 3) -> dict[tuple[str, str], str]:
    """Save rows on both tiers; returns the greedy replies."""
    out = {}
    for m in ("m1", "m2"):
        for i in range(n):
            prompt = f"seed {m} {i}: " + "p" * 80
            out[(m, prompt)] = complete(c, m, prompt, 6).reply
    wait_saves(c, 4 * n)
    wait_claims_released(c)
    return out


class Streams:
    """Client threads streaming until stopped; they record every outcome."""

    def __init__(self, endpoint: str, n: int, *, timeout: float) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.stop = threading.Event()
        self.ok = 0
        self.errors: list[erllama.ErllamaError] = []
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)
        ]
        self.started = threading.Barrier(n + 1)
        for t in self.threads:
            t.start()
        self.started.wait(10)

    def _run(self, i: int) -> None:
        model_id = ("m1", "m2")[i % 2]
        first = True
        with erllama.Client(self.endpoint, timeout=self.timeout) as c:
            while not self.stop.is_set():
                try:
                    with c.stream(model_id, f"load {i} " + "q" * 40, response_tokens=30) as s:
                        for _ in s:
                            if first:
                                first = False
                                self.started.wait(10)
                    with self.lock:
                        self.ok += 1
                except erllama.ErllamaError as exc:
                    with self.lock:
                        self.errors.append(exc)
                    if self.stop.is_set():
                        return

    def join(self, timeout: float = 20.0) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout)
        assert not any(t.is_alive() for t in self.threads), "a client thread hangs"


def test_meta_sigkill_under_load_rebuilds_the_index_and_serving_goes_on(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    d = start(daemon_factory, tmp_path, delay_ms=2)
    c = d.client()
    replies = seed(c)
    before = tier_rows(c)
    assert before["disk"] >= 1 and before["ram_file"] >= 1
    load = Streams(d.endpoint, 4, timeout=20)
    meta_pid = bound_by(d, "meta.sock")
    os.kill(meta_pid, signal.SIGKILL)
    d.wait_for_event("exit", 5, child="meta", pid=meta_pid)
    d.wait_for_event("ready", 20, child="meta")
    ok_at_restart = load.ok
    # serving goes on after the restart too
    deadline = time.monotonic() + 20
    while load.ok < ok_at_restart + 4 and time.monotonic() < deadline:
        complete(c, "m1", "poke", 2)
    load.join()
    assert not load.errors, load.errors[:3]
    assert load.ok >= ok_at_restart + 4
    # the index came back from the files: the seeded rows are all there and warm
    rows_now = tier_rows(c)
    assert rows_now["disk"] >= before["disk"] and rows_now["ram_file"] >= before["ram_file"]
    for (m, prompt), text in replies.items():
        r = complete(c, m, prompt, 6)
        assert r.cache_hit_kind in ("exact", "partial") and r.reply == text, (m, r)
    wait_claims_released(c)
    check_rows(tier_dirs(tmp_path))


def test_router_sigkill_with_streams_in_flight_raises_never_hangs(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    d = start(daemon_factory, tmp_path, delay_ms=5)
    load = Streams(d.endpoint, 4, timeout=CLIENT_DEADLINE_S)
    router_pid = bound_by(d, "client.sock")
    t0 = time.monotonic()
    os.kill(router_pid, signal.SIGKILL)
    d.wait_for_event("exit", 5, child="router", pid=router_pid)
    d.wait_for_event("ready", 10, child="router")
    load.join(timeout=CLIENT_DEADLINE_S * 3)
    assert load.errors, "the streams in flight must see an error"
    assert all(
        isinstance(e, erllama.DaemonUnavailableError | erllama.RequestTimeoutError)
        for e in load.errors
    ), load.errors
    assert time.monotonic() - t0 < CLIENT_DEADLINE_S * 4
    with erllama.Client(d.endpoint, timeout=10) as fresh:
        assert fresh.complete("m1", "after the router", response_tokens=3).reply
    assert counters(d.client())["router_requests"] >= 1


def test_root_sigkill_under_load_takes_every_child_down_and_restarts_clean(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    d = start(daemon_factory, tmp_path, delay_ms=5)
    c = d.client()
    replies = seed(c, 2)
    children = d.children()
    assert len(children) >= 4
    load = Streams(d.endpoint, 4, timeout=CLIENT_DEADLINE_S)
    os.kill(d.pid, signal.SIGKILL)
    d.proc.wait(5)
    t0 = time.monotonic()
    left = d.wait_no_processes(timeout=5.0)
    assert not left, [(p.pid, p.cmdline()[:3]) for p in left]
    assert time.monotonic() - t0 < 5.0
    load.join(timeout=CLIENT_DEADLINE_S * 3)
    # the router gets the parent-death SIGTERM and answers shutting_down, or the
    # connection drops (daemon_unavailable), or the request deadline passes
    assert load.errors and {e.code for e in load.errors} <= GONE_CODES, load.errors
    d.close_sockets()
    d2 = start_again(daemon_factory, d, tmp_path)
    c2 = d2.client()
    for (m, prompt), text in replies.items():
        r = complete(c2, m, prompt, 6)
        assert r.cache_hit_kind in ("exact", "partial") and r.reply == text, (m, r)
    check_rows(tier_dirs(tmp_path))
    d2.teardown()


def start_again(daemon_factory: DaemonFactory, d: Daemon, root: Path) -> Daemon:
    return daemon_factory(
        [model("m1", tier="disk"), model("m2", tier="ram_file")],
        supervisor=fast_supervisor(stall_timeout_s=10.0),
        cache=tiers_config(root),
        run_dir=d.run_dir,
    )
