"""A worker slot through sleep and wake: its state words and its restart policy."""

from __future__ import annotations

import pytest

from erllama.config import RestartPolicy
from erllama.supervisor.slot import Slot
from erllama.supervisor.tree import ChildSpec, ChildState, RestartTracker

pytestmark = pytest.mark.timeout(10)


def worker_slot() -> Slot:
    spec = ChildSpec("worker.m", "worker", "x", "transient", RestartPolicy())
    return Slot(spec=spec, tracker=RestartTracker(spec, fail_first_start=True), model_id="m")


def test_sleep_then_wake_state_words_and_no_restart_counted() -> None:
    s = worker_slot()
    t = s.tracker
    t.on_spawn(0.0)
    assert s.model_state() == "loading"
    t.on_ready(1.0)
    assert s.model_state() == "ready"
    s.sleep_reason = "keep_alive"
    t.on_stop_requested()
    assert t.state is ChildState.STOPPING and s.model_state() == "sleeping"
    assert t.on_exit(10.0, abnormal=False).action == "stopped"
    assert s.model_state() == "sleeping" and s.asleep
    # the wake
    s.sleep_reason = None
    t.on_wake()
    t.on_spawn(20.0)
    s.waking = True
    assert s.model_state() == "loading", "a wake loads, it does not restart"
    t.on_ready(21.0)
    assert s.model_state() == "ready" and t.restarts == 0


def test_a_crash_after_a_wake_is_restarted_as_any_crash() -> None:
    s = worker_slot()
    t = s.tracker
    t.on_spawn(0.0)
    t.on_ready(1.0)
    t.on_stop_requested()
    t.on_exit(10.0, abnormal=False)
    t.on_wake()
    t.on_spawn(20.0)
    t.on_ready(21.0)
    d = t.on_exit(40.0, abnormal=True)
    assert d.action == "restart" and t.restarts == 1
    assert s.model_state() == "restarting"


def test_stopped_without_sleep_is_unloaded() -> None:
    s = worker_slot()
    s.tracker.on_spawn(0.0)
    s.tracker.on_ready(1.0)
    s.tracker.on_stop_requested()
    assert s.model_state() == "stopping"
    s.tracker.on_exit(2.0, abnormal=False)
    assert s.model_state() == "unloaded" and not s.asleep
