"""Sleep and wake as pure decisions over a worker slot: what the root is told to do."""

from __future__ import annotations

import pytest

from erllama.config import RestartPolicy
from erllama.supervisor import sleeping
from erllama.supervisor.child import ChildProcess
from erllama.supervisor.effects import BeginStop, Publish, Spawn, Tell
from erllama.supervisor.slot import Slot
from erllama.supervisor.tree import ChildSpec, RestartTracker

pytestmark = pytest.mark.timeout(10)


def ready_worker() -> Slot:
    spec = ChildSpec("worker.m", "worker", "x", "transient", RestartPolicy())
    slot = Slot(spec=spec, tracker=RestartTracker(spec, fail_first_start=True), model_id="m")
    slot.proc = ChildProcess(spec, "/run")  # never started
    slot.tracker.on_spawn(0.0)
    slot.tracker.on_ready(1.0)
    slot.phase = "ready"
    return slot


def test_sleep_of_a_ready_worker_stops_it() -> None:
    slot = ready_worker()
    assert sleeping.sleep_worker(slot, "keep_alive", stopping=False) == [BeginStop(slot)]
    assert slot.sleep_reason == "keep_alive"


def test_sleep_refused_resyncs_the_router() -> None:
    slot = ready_worker()
    assert sleeping.sleep_worker(slot, "keep_alive", stopping=True) == [Tell(slot, "ready")]
    slot.phase = "init_sent"
    assert sleeping.sleep_worker(slot, "keep_alive", stopping=False) == [Tell(slot, "ready")]
    assert slot.sleep_reason is None


def test_wake_while_stopping_to_sleep_is_done_at_the_exit() -> None:
    slot = ready_worker()
    sleeping.sleep_worker(slot, "pressure", stopping=False)
    slot.tracker.on_stop_requested()
    assert sleeping.wake_worker(slot, stopping=False) == []
    assert slot.wake_requested
    slot.tracker.on_exit(2.0, abnormal=False)
    slot.reset_process_state()
    assert sleeping.after_stop(slot, 7, stopping=False) == [
        Publish("sleep", "worker.m", 7, {"reason": "pressure"}),
        Publish("wake", "worker.m", None),
        Spawn(slot, waking=True),
    ]
    assert slot.sleep_reason is None and not slot.wake_requested


def test_wake_of_a_sleeping_worker_and_an_unload_that_wins() -> None:
    slot = ready_worker()
    sleeping.sleep_worker(slot, "keep_alive", stopping=False)
    slot.tracker.on_stop_requested()
    slot.tracker.on_exit(2.0, abnormal=False)
    slot.reset_process_state()
    assert sleeping.after_stop(slot, 7, stopping=False) is not None
    assert slot.asleep
    assert sleeping.wake_worker(slot, stopping=True) == []
    assert sleeping.wake_worker(slot, stopping=False) == [
        Publish("wake", "worker.m", None),
        Spawn(slot, waking=True),
    ]
    other = ready_worker()
    other.sleep_reason = "keep_alive"
    other.unload_waiters.append((b"router", b"c", "r"))
    assert sleeping.after_stop(other, 8, stopping=False) is None
    assert other.sleep_reason is None
