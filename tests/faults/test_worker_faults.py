"""The worker fault matrix: {SIGKILL, segfault, os._exit, raise, hang} x
{loading, idle, prefilling, generating} plus a writer death inside each publish stage.

STYLE §3.9, after CPython's ``test_deadlock.py``. Each case runs a real daemon
(one stub model on the ``disk`` tier, a ``ram_file`` tier beside it, a small
save policy, fast heartbeats and backoffs) and asserts, within deadlines:

* the client with a request in flight gets ``worker_crashed`` (``internal``
  for ``raise``: the request that raised gets its traceback, and the worker
  exits 1); a hang is found by the progress check (``stall_timeout_s``) or,
  while loading, by ``ready_timeout_s``, and treated as a crash;
* the worker exits and is restarted (``exit`` then ``ready`` events, a new pid);
* meta holds no pin and no reservation afterwards (``pins_held`` /
  ``reservations_held`` gauges in the counters);
* every row file in the tier directories validates fully, no ``*.tmp`` is
  left, and the rows saved before the fault still serve warm.

The faults come from the stub's knobs (``crash_on_load``,
``crash_after_prefill_tokens``, ``crash_after_tokens``, ``idle_fault`` with
``crash_mode``), armed through ``fault_arm_path`` so that each arming fires
once and the restarted worker serves normally. A hang while idle is a
SIGSTOP (only the heartbeat can see it); ``raise`` while idle does not exist
(an exception needs a call into the backend). Publish stages use
``ERLLAMA_TEST_CRASH_AT`` (``os._exit(137)`` in the writer thread, as a
SIGKILL would), inherited by the workers from the daemon's environment.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from erllama.cache.tiers import CRASH_ENV, CRASH_EXIT_CODE, CRASH_STAGES
from erllama.protocol.messages import (
    Complete,
    DoneEvent,
    ErrorReply,
    Reply,
    RequestOptions,
    TokenEvent,
)
from tests.faults.helpers import (
    check_rows,
    complete,
    fast_supervisor,
    info,
    model,
    tier_dirs,
    tiers_config,
    wait_claims_released,
    wait_ready_at_router,
    wait_saves,
)
from tests.support.daemon import Daemon, DaemonFactory, RawClient

pytestmark = pytest.mark.timeout(60)

FAULTS = ("sigkill", "segfault", "exit", "raise", "hang")
PHASES = ("load", "idle", "prefill", "generate")
SEED = "seed prompt: " + "s" * 90  # > min_tokens: saves rows before the fault
PROMPT = "fault prompt: " + "f" * 90
REPLY_DEADLINE_S = 10.0  # a client's terminal reply after the fault (hang: stall + kill)
EXIT_REASON = {
    "sigkill": "SIGKILL",
    "segfault": "SIGSEGV",
    "exit": "exit code 3",
    "raise": "exit code 1",
    "hang": "killed: no progress",
}


def arm(path: Path) -> None:
    path.touch()


def in_flight_code(fault: str) -> set[str]:
    return {"internal"} if fault == "raise" else {"worker_crashed"}


def wait_terminal(c: RawClient, rid: str, timeout: float) -> Any:
    """The terminal reply of ``rid`` (tokens skipped), within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        msg = c.recv(max(0.001, deadline - time.monotonic()))
        if msg.request_id == rid and not isinstance(msg, TokenEvent):
            return msg


def restarted(d: Daemon, pid: int, fault: str) -> None:
    ev = d.wait_for_event("exit", REPLY_DEADLINE_S, child="worker.m1", pid=pid)
    assert EXIT_REASON[fault] in ev["reason"], ev
    d.wait_for_event("ready", 20, child="worker.m1")


def after_checks(d: Daemon, c: RawClient, root: Path, *, seeded: bool) -> None:
    wait_ready_at_router(d, c, "m1")
    wait_claims_released(c)
    rows = check_rows(tier_dirs(root))
    if seeded:
        assert rows >= 1
        again = complete(c, "m1", SEED, 4)
        assert again.cache_hit_kind in ("exact", "partial"), again
    r = complete(c, "m1", "after", 4)  # the restarted worker serves
    assert r.reply
    wait_claims_released(c)
    assert check_rows(tier_dirs(root)) >= rows


def start(
    daemon_factory: DaemonFactory, root: Path, stub: dict[str, Any], **sup: Any
) -> tuple[Daemon, RawClient]:
    d = daemon_factory(
        [model("m1", **stub)], supervisor=fast_supervisor(**sup), cache=tiers_config(root)
    )
    return d, d.client()


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("phase", PHASES)
def test_worker_fault(
    daemon_factory: DaemonFactory, tmp_path: Path, phase: str, fault: str
) -> None:
    if phase == "idle" and fault == "raise":
        pytest.skip("an exception needs a call into the backend: see prefill / generate")
    armed = tmp_path / "arm"
    stub: dict[str, Any] = {"crash_mode": fault, "fault_arm_path": str(armed)}
    sup: dict[str, Any] = {}
    if phase == "load":
        stub["crash_on_load"] = True
        sup["ready_timeout_s"] = 4.0  # a hung load is killed after this
    elif phase == "idle":
        stub["idle_fault"] = fault != "hang"
    elif phase == "prefill":
        stub["crash_after_prefill_tokens"] = 50
    else:
        stub["crash_after_tokens"] = 3
    d, c = start(daemon_factory, tmp_path, stub, **sup)
    seed = complete(c, "m1", SEED, 4)
    assert seed.cache_hit_kind == "cold"
    wait_saves(c, 2)  # the prompt row and the finish row, before any fault
    wait_claims_released(c)
    pid = info(c, "m1").pid
    assert pid is not None

    if phase == "load":
        arm(armed)
        os.kill(pid, signal.SIGKILL)  # the reload is where the fault fires
        d.wait_for_event("exit", 5, child="worker.m1", pid=pid)
        spawn = d.wait_for_event("spawn", 5, child="worker.m1")
        # a request sent meanwhile is held at the router across the crashed load
        rid = c.send(Complete(model="m1", prompt=PROMPT, options=RequestOptions(response_tokens=4)))
        reason = "killed: no ready" if fault == "hang" else EXIT_REASON[fault]
        if fault == "raise":
            reason = "start_failed load_failed"
        ev = d.wait_for_event("exit", 15, child="worker.m1", pid=spawn["pid"])
        assert reason in ev["reason"], ev
        d.wait_for_event("ready", 20, child="worker.m1")
        r = wait_terminal(c, rid, 20)
        assert isinstance(r, Reply), r
        # its prompt and finish rows are written after the reply (saves never block it):
        # wait for them, or the file check can catch the second one mid-publish
        wait_saves(c, 4)
        after_checks(d, c, tmp_path, seeded=True)
        return

    if phase == "idle":
        if fault == "hang":
            os.kill(pid, signal.SIGSTOP)  # alive but frozen: the heartbeat finds it
            ev = d.wait_for_event("exit", REPLY_DEADLINE_S, child="worker.m1", pid=pid)
            assert "heartbeat" in ev["reason"], ev
            d.wait_for_event("ready", 20, child="worker.m1")
        else:
            arm(armed)
            restarted(d, pid, fault)
        after_checks(d, c, tmp_path, seeded=True)
        return

    arm(armed)
    rid = c.send(
        Complete(
            model="m1", mode="stream", prompt=PROMPT, options=RequestOptions(response_tokens=50)
        )
    )
    t0 = time.monotonic()
    r = wait_terminal(c, rid, REPLY_DEADLINE_S)
    assert isinstance(r, ErrorReply) and r.code in in_flight_code(fault), r
    assert time.monotonic() - t0 < REPLY_DEADLINE_S
    if fault != "raise":
        assert r.retryable
    restarted(d, pid, fault)
    after_checks(d, c, tmp_path, seeded=True)


@pytest.mark.parametrize("stage", CRASH_STAGES)
def test_writer_dies_inside_a_publish_stage(
    daemon_factory: DaemonFactory, tmp_path: Path, stage: str
) -> None:
    d = daemon_factory(
        [model("m1")],
        supervisor=fast_supervisor(),
        cache=tiers_config(tmp_path),
        env={CRASH_ENV: stage},
    )
    c = d.client()
    pid = info(c, "m1").pid
    rid = c.send(
        Complete(
            model="m1", mode="stream", prompt=PROMPT, options=RequestOptions(response_tokens=20)
        )
    )
    # the save runs on the writer thread: the request may finish first, or see the crash
    r = wait_terminal(c, rid, REPLY_DEADLINE_S)
    assert isinstance(r, DoneEvent) or (isinstance(r, ErrorReply) and r.code == "worker_crashed"), r
    ev = d.wait_for_event("exit", REPLY_DEADLINE_S, child="worker.m1", pid=pid)
    assert ev["code"] == CRASH_EXIT_CODE, ev
    d.wait_for_event("ready", 20, child="worker.m1")
    wait_ready_at_router(d, c, "m1")
    wait_claims_released(c)
    rows = check_rows(tier_dirs(tmp_path))
    if stage in ("after_link", "after_mark"):
        assert rows == 1  # linked before the death: adopted by meta, whole and valid
    else:
        assert rows == 0
    r2 = complete(c, "m1", "hi", 2)  # under min_tokens: no save, so no second crash
    assert r2.reply
