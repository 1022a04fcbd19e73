"""The restart policy, without processes: the caller's clock is a plain float."""

from __future__ import annotations

import pytest

from erllama.config import RestartPolicy
from erllama.supervisor.tree import ChildSpec, ChildState, IntensityWindow, RestartTracker

pytestmark = pytest.mark.timeout(10)


def tracker(
    restart: str = "permanent",
    *,
    max_restarts: int = 5,
    within_s: float = 60.0,
    initial: float = 1.0,
    cap: float = 60.0,
    startsecs: float = 5.0,
    fail_first_start: bool = False,
) -> RestartTracker:
    policy = RestartPolicy(
        restart=restart,  # type: ignore[arg-type]
        max_restarts=max_restarts,
        within_s=within_s,
        backoff_initial_s=initial,
        backoff_max_s=cap,
        startsecs=startsecs,
    )
    spec = ChildSpec("worker.m", "worker", "x.y", policy.restart, policy)
    return RestartTracker(spec, fail_first_start=fail_first_start)


def crash_fast(t: RestartTracker, now: float) -> float:
    """Spawn at ``now`` and crash before ready; return the scheduled restart time."""
    t.on_spawn(now)
    d = t.on_exit(now + 0.1, abnormal=True)
    assert d.action == "restart"
    assert t.restart_at is not None
    return t.restart_at


def test_backoff_doubles_from_initial_and_is_capped() -> None:
    t = tracker(max_restarts=100, within_s=1.0, initial=1.0, cap=10.0)
    now, delays = 0.0, []
    for _ in range(7):
        t.on_spawn(now)
        d = t.on_exit(now + 0.1, abnormal=True)
        delays.append(d.delay_s)
        assert t.state is ChildState.BACKOFF
        now = t.restart_at or 0.0
        # each restart lands outside the 1 s window: intensity never trips
        now += 2.0
    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]


def test_first_retry_is_never_zero() -> None:
    t = tracker(initial=0.25)
    t.on_spawn(0.0)
    t.on_ready(0.5)
    d = t.on_exit(100.0, abnormal=True)  # ran long: a successful start
    assert d.action == "restart" and d.delay_s == pytest.approx(0.25)
    assert t.restart_at == pytest.approx(100.25)
    assert not t.restart_due(100.2)
    assert t.restart_due(100.25)


def test_successful_start_resets_the_backoff() -> None:
    t = tracker(max_restarts=100, within_s=1.0, initial=1.0, cap=60.0, startsecs=5.0)
    now = 0.0
    for _ in range(3):
        now = crash_fast(t, now) + 2.0
    assert t.next_delay() == 8.0
    t.on_spawn(now)
    t.on_ready(now + 1.0)
    d = t.on_exit(now + 30.0, abnormal=True)  # ran 30 s > startsecs
    assert d.delay_s == 1.0


def test_startsecs_short_run_after_ready_is_a_failed_start() -> None:
    t = tracker(max_restarts=100, within_s=1.0, startsecs=5.0)
    t.on_spawn(0.0)
    t.on_ready(0.5)
    assert t.on_exit(3.0, abnormal=True).delay_s == 1.0  # died 3 s after spawn
    t.on_spawn(10.0)
    t.on_ready(10.5)
    assert t.on_exit(12.0, abnormal=True).delay_s == 2.0  # still growing


def test_intensity_window_fails_after_max_restarts() -> None:
    t = tracker(max_restarts=3, within_s=60.0, initial=0.1, cap=0.1)
    now = 0.0
    for _ in range(3):
        now = crash_fast(t, now)
    assert t.restarts == 3
    t.on_spawn(now)
    d = t.on_exit(now + 0.1, abnormal=True)
    assert d.action == "failed"
    assert t.state is ChildState.FAILED
    assert "3 restarts within 60s" in d.reason
    assert t.restart_at is None or not t.restart_due(now + 1000)


def test_intensity_window_slides() -> None:
    w = IntensityWindow(2, 10.0)
    assert w.record(0.0) and w.record(1.0)
    assert not w.record(2.0)  # three within 10 s
    w2 = IntensityWindow(2, 10.0)
    assert w2.record(0.0) and w2.record(1.0)
    assert w2.record(10.5)  # the first one left the window
    assert len(w2) == 2


def test_max_restarts_zero_fails_at_once() -> None:
    t = tracker(max_restarts=0)
    t.on_spawn(0.0)
    t.on_ready(0.1)
    assert t.on_exit(50.0, abnormal=True).action == "failed"


@pytest.mark.parametrize("abnormal", [True, False])
def test_permanent_restarts_after_any_exit(abnormal: bool) -> None:
    t = tracker("permanent")
    t.on_spawn(0.0)
    t.on_ready(0.1)
    assert t.on_exit(30.0, abnormal=abnormal).action == "restart"


def test_transient_restarts_only_after_abnormal_exit() -> None:
    t = tracker("transient")
    t.on_spawn(0.0)
    t.on_ready(0.1)
    assert t.on_exit(30.0, abnormal=True).action == "restart"
    t.on_spawn(31.0)
    t.on_ready(31.1)
    d = t.on_exit(60.0, abnormal=False)
    assert d.action == "stopped"
    assert t.state is ChildState.STOPPED


@pytest.mark.parametrize(
    ("abnormal", "state"), [(True, ChildState.FAILED), (False, ChildState.STOPPED)]
)
def test_temporary_is_never_restarted(abnormal: bool, state: ChildState) -> None:
    t = tracker("temporary")
    t.on_spawn(0.0)
    t.on_ready(0.1)
    d = t.on_exit(30.0, abnormal=abnormal)
    assert d.action != "restart"
    assert t.state is state
    assert t.restarts == 0


@pytest.mark.parametrize("restart", ["permanent", "transient", "temporary"])
def test_stopped_by_request_is_never_restarted(restart: str) -> None:
    t = tracker(restart)
    t.on_spawn(0.0)
    t.on_ready(0.1)
    t.on_stop_requested()
    assert t.state is ChildState.STOPPING
    d = t.on_exit(1.0, abnormal=True)  # even a crash while stopping
    assert d.action == "stopped"
    assert t.state is ChildState.STOPPED
    assert t.restarts == 0


def test_stop_during_backoff_cancels_the_restart() -> None:
    t = tracker()
    due = crash_fast(t, 0.0)
    t.on_stop_requested()
    assert t.state is ChildState.STOPPED
    assert not t.restart_due(due + 1.0)


def test_fail_first_start() -> None:
    t = tracker("permanent", fail_first_start=True)
    t.on_spawn(0.0)
    d = t.on_exit(0.5, abnormal=True)
    assert d.action == "failed"
    assert t.state is ChildState.FAILED
    # once it has been ready, crashes are restarted as usual
    t2 = tracker("permanent", fail_first_start=True)
    t2.on_spawn(0.0)
    t2.on_ready(0.1)
    assert t2.on_exit(0.5, abnormal=True).action == "restart"
    t2.on_spawn(2.0)
    assert t2.on_exit(2.1, abnormal=True).action == "restart"  # incarnation 1 never ready: retried


def test_states_and_incarnations() -> None:
    t = tracker()
    assert t.state is ChildState.STOPPED
    assert t.on_spawn(0.0) == 0
    assert t.state is ChildState.STARTING and t.is_live
    t.on_ready(0.2)
    assert t.state is ChildState.RUNNING
    t.on_exit(10.0, abnormal=True)
    assert t.state is ChildState.BACKOFF and not t.is_live
    assert t.on_spawn(11.0) == 1
