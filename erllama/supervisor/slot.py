"""The root's record of one child id: policy tracker, current process, timers, waiters.

A slot outlives its processes: a restart puts a new ``ChildProcess`` in the
same slot, and the tracker counts incarnations and restarts across them. A
worker slot also carries its model (spec, last ``Ready.info``) and the tree
operations waiting on it (a ``LoadModel`` is answered at ``Ready``, an
``Unload`` at the exit) and its LoRA adapters (the last ``AdaptersChanged``,
re-attached by every later incarnation). A sleeping worker's slot stays with no
process (``sleep_reason`` set, ``supervisor/sleeping.py``) until a wake spawns it again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from erllama.config import ModelSpec
from erllama.protocol.messages import AdaptersChanged, ModelInfo
from erllama.supervisor.child import ChildProcess
from erllama.supervisor.tree import ChildSpec, ChildState, RestartTracker

INF = math.inf

# (router identity, client identity, request id) of a tree op awaiting its reply
Waiter = tuple[bytes, bytes, str]
Phase = Literal["down", "hello", "init_sent", "ready", "killed"]
StopStage = Literal["", "drain", "term", "kill"]


def worker_id(model_id: str) -> str:
    """The child id of a model's worker."""
    return f"worker.{model_id}"


@dataclass(eq=False)
class Slot:
    spec: ChildSpec
    tracker: RestartTracker
    model_id: str | None = None
    model: ModelSpec | None = None
    from_load: bool = False
    proc: ChildProcess | None = None
    phase: Phase = "down"
    ready_deadline: float = INF
    stop_stage: StopStage = ""
    stop_deadline: float = INF
    ping_seq: int = 0
    next_ping_at: float = INF
    last_pong_at: float = 0.0
    progress: int = -1
    progress_at: float = 0.0
    info: ModelInfo | None = None
    adapters: AdaptersChanged | None = None  # the worker's last report (Init of a restart)
    listen: str = ""  # the gateway's bound HTTP address (its Ready info)
    last_exit: str | None = None
    start_failed: tuple[str, str] | None = None
    kill_reason: str | None = None
    load_waiters: list[Waiter] = field(default_factory=list)
    unload_waiters: list[Waiter] = field(default_factory=list)
    sleep_reason: str | None = None  # stopping to sleep, or asleep (keep_alive, pressure)
    wake_requested: bool = False  # a wake arrived while it was stopping to sleep
    waking: bool = False  # this incarnation was started by a wake (its state is loading)

    @property
    def child_id(self) -> str:
        return self.spec.child_id

    @property
    def is_worker(self) -> bool:
        return self.spec.role == "worker"

    @property
    def handshaken(self) -> bool:
        """The child's DEALER is known to the control ROUTER (sends can be routed)."""
        return self.proc is not None and self.phase in ("init_sent", "ready")

    def model_state(self) -> str:
        """The model's state word for ``ModelInfo.state``."""
        st = self.tracker.state
        if st is ChildState.RUNNING:
            return "ready"
        if st is ChildState.STARTING:
            return (
                "restarting"
                if not self.waking and (self.tracker.ever_ready or self.tracker.incarnation > 0)
                else "loading"
            )
        if st is ChildState.BACKOFF:
            return "restarting"
        if st is ChildState.STOPPING:
            return "sleeping" if self.sleep_reason else "stopping"
        if st is ChildState.FAILED:
            return "failed"
        return "sleeping" if self.sleep_reason else "unloaded"

    @property
    def asleep(self) -> bool:
        """A worker put to sleep whose process is gone (a wake starts it again)."""
        return self.sleep_reason is not None and self.proc is None

    def reset_process_state(self) -> None:
        """Forget everything about the incarnation that just exited."""
        self.proc = None
        self.phase = "down"
        self.ready_deadline = INF
        self.stop_stage = ""
        self.stop_deadline = INF
        self.next_ping_at = INF
        self.kill_reason = None
        self.start_failed = None
        self.waking = False

    def next_deadline(self) -> float:
        if self.proc is None:
            at = self.tracker.restart_at
            return at if at is not None and self.tracker.state is ChildState.BACKOFF else INF
        if self.stop_stage:
            return self.stop_deadline
        if self.phase in ("hello", "init_sent"):
            return self.ready_deadline
        if self.phase == "ready":
            return self.next_ping_at
        return INF
