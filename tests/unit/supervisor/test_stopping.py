"""The stop stages of one child and the daemon's stop order, without processes."""

from __future__ import annotations

import pytest

from erllama.config import RestartPolicy, SupervisorConfig
from erllama.supervisor.child import ChildProcess
from erllama.supervisor.slot import Slot
from erllama.supervisor.stopping import KILL_GRACE_S, MIN_DRAIN_S, SAVE_EXIT_GRACE_S, Stopper
from erllama.supervisor.tree import ChildSpec, ChildState, RestartTracker

pytestmark = pytest.mark.timeout(10)

SUP = SupervisorConfig(drain_timeout_s=10.0, term_timeout_s=3.0)


def live(child_id: str, role: str = "worker") -> Slot:
    """A ready slot whose process handle was never started (signals to pid 0 are no-ops)."""
    spec = ChildSpec(child_id, role, "x", "permanent", RestartPolicy())  # type: ignore[arg-type]
    slot = Slot(spec=spec, tracker=RestartTracker(spec))
    slot.proc = ChildProcess(spec, "/run")
    slot.tracker.on_spawn(0.0)
    slot.tracker.on_ready(0.0)
    slot.phase = "ready"
    return slot


def test_one_child_drain_term_kill_then_abandoned() -> None:
    sent: list[str] = []
    st = Stopper(SUP, 5.0, lambda s: sent.append(s.child_id) is None)
    w = live("worker.m")
    st.begin(w, 100.0, 10.0)
    assert sent == ["worker.m"] and w.tracker.state is ChildState.STOPPING
    assert (w.stop_stage, w.stop_deadline) == ("drain", 110.0)
    st.begin(w, 101.0, 10.0)  # a second request changes nothing
    assert sent == ["worker.m"] and w.stop_deadline == 110.0
    st.on_saving(w, 60.0, 105.0)  # capped at the save allowance
    assert w.stop_deadline == 105.0 + 5.0 + SAVE_EXIT_GRACE_S
    assert st.advance(w, 112.0) and (w.stop_stage, w.stop_deadline) == ("term", 115.0)
    assert st.advance(w, 115.0) and (w.stop_stage, w.stop_deadline) == (
        "kill",
        115.0 + KILL_GRACE_S,
    )
    assert not st.advance(w, 118.0), "past SIGKILL: abandoned"


def test_a_child_that_cannot_get_stop_is_sent_sigterm() -> None:
    st = Stopper(SUP, 5.0, lambda s: False)
    w = live("worker.m")
    st.begin(w, 0.0, 10.0)
    assert (w.stop_stage, w.stop_deadline) == ("term", 3.0)


def test_daemon_stop_order_and_shared_deadline() -> None:
    sent: list[str] = []
    st = Stopper(SUP, 5.0, lambda s: sent.append(s.child_id) is None)
    slots = {cid: live(cid, role) for cid, role in
             [("meta", "meta"), ("router", "router"), ("worker.a", "worker")]}  # fmt: skip
    st.plan(slots, 0.0)
    assert st.groups[0] == ["worker.a"], "no gateway: the workers are the first group"
    assert st.overall == 10.0 + 5.0 + 5 * (3.0 + KILL_GRACE_S)
    assert sent == ["worker.a"]
    assert slots["worker.a"].stop_deadline == 10.0, "the full drain: the deadline allows it"
    slots["worker.a"].proc = None  # it exited
    st.progress(slots, 30.0)  # late: the router's drain is clipped to the shared deadline
    assert sent == ["worker.a", "router"] and st.groups[0] == ["router"]
    remaining = st.overall - 30.0 - KILL_GRACE_S  # one group (meta) after it
    assert slots["router"].stop_deadline == 30.0 + (remaining - 3.0) == 35.0
    slots["router"].stop_stage = ""
    slots["router"].phase = "killed"
    st.begin(slots["router"], 39.9, 10.0)
    assert slots["router"].stop_stage == "term", "not handshaken: SIGTERM at once"
    slots["router"].proc = None
    st.progress(slots, 39.0)
    assert slots["meta"].stop_deadline == 39.0 + MIN_DRAIN_S, "never under the minimum drain"
    slots["meta"].proc = None
    st.progress(slots, 40.0)
    assert sent == ["worker.a", "router", "meta"] and not st.groups
