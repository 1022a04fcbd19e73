"""Restart policy of the supervision tree: pure state, no processes, no clocks.

Every function takes ``now`` (a ``time.monotonic()`` value) from the caller,
so the policy is tested without processes or sleeps
(``tests/unit/supervisor/test_tree.py``).

Vocabulary (OTP words, supervisord/circus numbers, REFERENCE §12.3):

* ``restart`` type: ``permanent`` restarts after any exit, ``transient`` only
  after an abnormal one (non-zero code, signal death, failed start, killed
  for missed heartbeats), ``temporary`` never.
* Intensity: more than ``max_restarts`` restarts within ``within_s`` seconds
  and the child is ``FAILED`` (not restarted in a busy loop).
* Backoff: the delay before a restart starts at ``backoff_initial_s``,
  doubles after each failed start and is capped at ``backoff_max_s``. It is
  never zero, even for the first retry (circus spun with zero delays).
* ``startsecs``: a child that dies less than ``startsecs`` after it was
  spawned had a *failed start*: the backoff keeps growing. A child that ran
  longer had a successful start: its next restart waits the initial delay.
* A stop the operator asked for (unload, daemon stop) is ``STOPPED``, never
  restarted, whatever the exit code (circus's flapping plugin restarted
  watchers stopped on purpose).

States::

    STARTING --ready--> RUNNING --exit--> BACKOFF --due--> STARTING
        |                  |                  \\--intensity--> FAILED
        |                  +--stop requested--> STOPPING --exit--> STOPPED
        +--exit before ready (first start of a worker) --> FAILED

    STOPPED --wake (a sleeping worker, supervisor/sleeping.py)--> STARTING
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from typing import Literal

from erllama.config import RestartPolicy

RestartType = Literal["permanent", "transient", "temporary"]
Role = Literal["meta", "router", "worker", "scheduler", "gateway"]


class ChildState(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """What the root needs to (re)start one child: identity, entry module, policy."""

    child_id: str
    role: Role
    module: str
    restart: RestartType
    policy: RestartPolicy


class IntensityWindow:
    """``max_restarts`` events allowed within a sliding ``within_s`` window."""

    def __init__(self, max_restarts: int, within_s: float) -> None:
        self.max_restarts = max_restarts
        self.within_s = within_s
        self._times: deque[float] = deque()

    def record(self, now: float) -> bool:
        """Record one restart at ``now``; True while the intensity is not exceeded."""
        self._times.append(now)
        while self._times and now - self._times[0] > self.within_s:
            self._times.popleft()
        return len(self._times) <= self.max_restarts

    def __len__(self) -> int:
        return len(self._times)


@dataclass(frozen=True, slots=True)
class ExitDecision:
    """What to do after an exit: ``restart`` after ``delay_s``, or a final state."""

    action: Literal["restart", "stopped", "failed"]
    delay_s: float = 0.0
    reason: str = ""


class RestartTracker:
    """Policy state of one child id across its incarnations."""

    def __init__(self, spec: ChildSpec, *, fail_first_start: bool = False) -> None:
        """Args:
        spec: the child's spec (restart type and policy).
        fail_first_start: a child that never became ready in its first
            incarnation is FAILED at once (a model that cannot load is a
            configuration error, not a crash to retry).
        """
        self.spec = spec
        self.fail_first_start = fail_first_start
        self.state = ChildState.STOPPED
        self.incarnation = -1
        self.restarts = 0
        self.started_at: float | None = None
        self.ready_at: float | None = None
        self.ever_ready = False
        self.stop_requested = False
        self.restart_at: float | None = None
        self._failed_starts = 0
        self._window = IntensityWindow(spec.policy.max_restarts, spec.policy.within_s)

    # ------------------------------------------------------------ transitions
    def on_spawn(self, now: float) -> int:
        """A new incarnation was spawned; returns its number (0 first)."""
        self.incarnation += 1
        self.state = ChildState.STARTING
        self.started_at = now
        self.ready_at = None
        self.restart_at = None
        return self.incarnation

    def on_ready(self, now: float) -> None:
        self.state = ChildState.RUNNING
        self.ready_at = now
        self.ever_ready = True

    def on_stop_requested(self) -> None:
        """The operator asked for a stop: whatever happens next is not a crash."""
        self.stop_requested = True
        if self.state is ChildState.BACKOFF:
            self.state = ChildState.STOPPED
            self.restart_at = None
        elif self.state in (ChildState.STARTING, ChildState.RUNNING):
            self.state = ChildState.STOPPING

    def on_wake(self) -> None:
        """A worker stopped to sleep starts again: its next exit is judged as any other."""
        self.stop_requested = False

    def next_delay(self) -> float:
        """The backoff the next restart waits (initial * 2**failed_starts, capped)."""
        p = self.spec.policy
        return max(
            p.backoff_initial_s,
            min(p.backoff_max_s, p.backoff_initial_s * 2.0**self._failed_starts),
        )

    def on_exit(self, now: float, *, abnormal: bool) -> ExitDecision:
        """The current incarnation exited. Decide, and move to the next state.

        Args:
            now: monotonic time of the exit.
            abnormal: non-zero code, signal death, failed start, or killed by
                the supervisor (missed heartbeats, stall, ready timeout).
        """
        if self.stop_requested:
            self.state = ChildState.STOPPED
            return ExitDecision("stopped", reason="stopped by request")
        lived = now - self.started_at if self.started_at is not None else 0.0
        failed_start = self.ready_at is None or lived < self.spec.policy.startsecs
        if self.fail_first_start and self.incarnation == 0 and not self.ever_ready:
            self.state = ChildState.FAILED
            return ExitDecision("failed", reason="first start failed")
        restart = self.spec.restart
        if restart == "temporary" or (restart == "transient" and not abnormal):
            self.state = ChildState.STOPPED if not abnormal else ChildState.FAILED
            return ExitDecision(
                "stopped" if not abnormal else "failed",
                reason=f"{restart} child exited {'abnormally' if abnormal else 'normally'}",
            )
        if not self._window.record(now):
            self.state = ChildState.FAILED
            p = self.spec.policy
            return ExitDecision(
                "failed",
                reason=f"more than {p.max_restarts} restarts within {p.within_s:g}s",
            )
        if not failed_start:
            self._failed_starts = 0
        delay = self.next_delay()
        if failed_start:
            self._failed_starts += 1
        self.restarts += 1
        self.state = ChildState.BACKOFF
        self.restart_at = now + delay
        return ExitDecision("restart", delay_s=delay)

    def restart_due(self, now: float) -> bool:
        return (
            self.state is ChildState.BACKOFF
            and self.restart_at is not None
            and now >= self.restart_at
        )

    @property
    def is_live(self) -> bool:
        """A process of this child may exist (starting, running or stopping)."""
        return self.state in (ChildState.STARTING, ChildState.RUNNING, ChildState.STOPPING)
