"""Stopping children: one by request, and every one when the daemon stops.

One child (an unload, a sleep, the daemon's stop): ``Stop(drain)`` over control if
it has handshaken (else SIGTERM at once); past the drain deadline SIGTERM; past
``term_timeout_s`` SIGKILL of its process group; past ``KILL_GRACE_S`` more it is
abandoned and handled as exited. A worker that has drained and writes its shutdown
saves says so (``ShutdownSaving``): its next stage waits up to
``cache.evict_save_timeout_ms`` more.

The daemon: the gateway, the workers, the scheduler, the router, meta, one group at
a time (``plan``, then ``progress`` after each exit), every stage clipped to one
shared monotonic deadline that includes the workers' save allowance.

Binds no socket: ``Stop`` goes through the ``send_stop`` the root passes
(``ControlChannel.stop``); signals through the slot's ``ChildProcess``.
"""

from __future__ import annotations

import logging
import math
import signal
from collections.abc import Callable, Iterable, Mapping

from erllama.config import SupervisorConfig
from erllama.supervisor.slot import Slot

log = logging.getLogger(__name__)

KILL_GRACE_S = 2.0
MIN_DRAIN_S = 0.5
SAVE_EXIT_GRACE_S = 2.0  # after its save deadline a worker closes its sockets and exits


class Stopper:
    """The stop stages of the root's children and the daemon's stop order.

    Args:
        sup: the supervisor section (drain and term timeouts).
        save_timeout_s: how long a drained worker may write shutdown saves.
        send_stop: sends ``Stop(drain)`` to a child; False if it could not be sent.
    """

    def __init__(
        self, sup: SupervisorConfig, save_timeout_s: float, send_stop: Callable[[Slot], bool]
    ) -> None:
        self.sup = sup
        self.save_timeout_s = save_timeout_s
        self._send_stop = send_stop
        self.groups: list[list[str]] = []  # child ids still to stop, in order
        self.overall = math.inf

    def begin(self, slot: Slot, now: float, drain_s: float) -> None:
        """Stop by request: Stop(drain), then SIGTERM, then SIGKILL of the group."""
        slot.tracker.on_stop_requested()
        if slot.proc is None or slot.stop_stage:
            return
        if slot.handshaken and self._send_stop(slot):
            slot.stop_stage = "drain"
            slot.stop_deadline = now + drain_s
        else:
            slot.proc.send_signal(signal.SIGTERM)
            slot.stop_stage = "term"
            slot.stop_deadline = now + self.sup.term_timeout_s

    def _save_allowance_s(self, slot: Slot) -> float:
        """How long a stopping child may spend on its shutdown save after the drain."""
        return self.save_timeout_s if slot.is_worker else 0.0

    def on_saving(self, slot: Slot, timeout_s: float, now: float) -> None:
        """A stopping worker drained and writes its shutdown saves: hold the next stage."""
        if slot.stop_stage not in ("drain", "term"):
            return
        wait_s = min(max(0.0, timeout_s), self._save_allowance_s(slot)) + SAVE_EXIT_GRACE_S
        slot.stop_deadline = max(slot.stop_deadline, now + wait_s)
        log.info("event=shutdown_saving child=%s wait_s=%.1f", slot.child_id, wait_s)

    def advance(self, slot: Slot, now: float) -> bool:
        """The stage's deadline passed: the next stage; False when the child is abandoned
        (it outlived SIGKILL of its group): the caller handles it as exited."""
        assert slot.proc is not None
        if slot.stop_stage == "drain":
            log.warning("event=stop_timeout child=%s stage=drain: SIGTERM", slot.child_id)
            slot.proc.send_signal(signal.SIGTERM)
            slot.stop_stage = "term"
            slot.stop_deadline = now + self.sup.term_timeout_s
        elif slot.stop_stage == "term":
            log.warning("event=stop_timeout child=%s stage=term: SIGKILL group", slot.child_id)
            slot.proc.kill_group(signal.SIGKILL)
            slot.stop_stage = "kill"
            slot.stop_deadline = now + KILL_GRACE_S
        else:
            log.error("event=unkillable child=%s pid=%d: abandoned", slot.child_id, slot.proc.pid)
            return False
        return True

    def plan(self, slots: Mapping[str, Slot], now: float) -> None:
        """The daemon stops: every child in reverse start order, under one deadline."""
        workers = [cid for cid, s in slots.items() if s.is_worker]
        self.groups = [["gateway"], workers, ["scheduler"], ["router"], ["meta"]]
        self.overall = (
            now
            + self.sup.drain_timeout_s
            + (self.save_timeout_s if workers else 0.0)
            + len(self.groups) * (self.sup.term_timeout_s + KILL_GRACE_S)
        )
        self.progress(slots, now)

    def progress(self, slots: Mapping[str, Slot], now: float) -> None:
        """Begin the stop of the first group with a live child (the ones before are done)."""
        while self.groups:
            group = [slots[c] for c in self.groups[0] if c in slots]
            live = [s for s in group if s.proc is not None]
            if not live:
                self.groups.pop(0)
                continue
            remaining = self.overall - now - (len(self.groups) - 1) * KILL_GRACE_S
            save_s = max(self._save_allowance_s(s) for s in live)
            drain_s = max(
                MIN_DRAIN_S,
                min(self.sup.drain_timeout_s, remaining - self.sup.term_timeout_s - save_s),
            )
            for s in live:
                self.begin(s, now, drain_s)
            return


def kill_all(slots: Iterable[Slot]) -> None:
    """SIGKILL every live child's group and wait a little for each (the root is failing)."""
    for slot in slots:
        if slot.proc is not None:
            slot.proc.kill_group(signal.SIGKILL)
            slot.proc.wait(KILL_GRACE_S)
