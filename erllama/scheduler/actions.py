"""What a plan does: its steps, against cache meta and the router (the action thread).

Steps, in the plan's order (``policy.steps_for``), until the projected usage is under
the low watermark (``policy.Progress``): (1) ram rows, (2) ram_file rows, both demoted
into ``demote_to`` when that tier is configured, else evicted; (3) idle workers save
and free their llama context; (4) idle models are put to sleep ahead of their
keep_alive timer (``sleep_model``: the worker stops, the model stays registered and
wakes on the next request; the router refuses models whose keep_alive says never; their
rows stay). Every step is a log line with stable words and a counter in meta.

The router is reached like any client (``DaemonLink``: ``list_models``,
``evict(release_context)``, ``sleep_model``); meta through a ``MetaClient``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq

from erllama.cache.client import MetaClient
from erllama.config import SchedulerConfig
from erllama.protocol.codec import Decoder, decode_result, encode
from erllama.protocol.errors import ErllamaError
from erllama.protocol.messages import (
    TERMINAL_REPLIES,
    ClientReply,
    ErrorReply,
    Evict,
    ListModels,
    ModelInfo,
    Msg,
    Reply,
    SleepModel,
)
from erllama.protocol.sockets import make_socket
from erllama.scheduler.policy import Plan, Progress, Step

__all__ = ["Actions", "DaemonLink", "StepResult"]

log = logging.getLogger(__name__)

EVICT_TIMEOUT_S = 40.0  # a worker's evict save may take up to 30 s (engine)
SLEEP_TIMEOUT_S = 10.0  # the router answers at once (the worker stops afterwards)
LIST_TIMEOUT_S = 5.0
DEMOTE_TIMEOUT_S = 120.0


class DaemonLink:
    """A client DEALER to the router (Lazy Pirate: a timeout rebuilds the socket)."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> None:
        self._ctx = ctx
        self.endpoint = endpoint
        self._sock: zmq.Socket[bytes] | None = None
        self._n = 0
        self._decoder: Decoder[Any] = Decoder(ClientReply)

    def call(self, msg: Msg, timeout_s: float) -> Reply | ErrorReply:
        if self._sock is None:
            self._sock = make_socket(self._ctx, zmq.DEALER, connect=self.endpoint)
        self._n += 1
        msg = msgspec.structs.replace(msg, request_id=f"sched{os.getpid()}.{self._n}")
        self._sock.send_multipart(encode(msg))
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if not self._sock.poll(max(1, int(left * 1000))):
                continue
            r = self._decoder.decode(self._sock.recv_multipart())
            if r.request_id == msg.request_id and type(r) in TERMINAL_REPLIES:
                return r  # type: ignore[no-any-return]
        self.close()
        raise ErllamaError(f"no answer from the router within {timeout_s}s", code="timeout")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None


@dataclass(slots=True)
class StepResult:
    step: Step
    n: int
    freed: int


class Actions:
    """The steps of a plan, against meta and the router (runs on the action thread)."""

    def __init__(self, cfg: SchedulerConfig, meta: MetaClient, daemon: DaemonLink) -> None:
        self.cfg = cfg
        self.meta = meta
        self.daemon = daemon

    def run(self, plan: Plan) -> Progress:
        prog = Progress(plan)
        log.info(
            "event=pressure resource=%s used=%d total=%d ratio=%.4f target=%d reason=%s steps=%s",
            plan.sample.resource, plan.sample.used, plan.sample.total, plan.sample.ratio,
            plan.target_bytes, plan.reason, ",".join(plan.steps),
        )  # fmt: skip
        tiers = self._tiers()
        for step in plan.steps:
            if prog.ended:
                break
            try:
                r = self._step(step, prog.remaining, tiers)
            except ErllamaError as exc:  # meta or router unavailable: try the next step
                log.warning("event=step_failed step=%s reason=%s", step, exc)
                r = StepResult(step, 0, 0)
            prog.record(step, r.n, r.freed)
        log.info(
            "event=plan_done projected_used=%d remaining=%d steps=%s",
            prog.projected_used, max(0, prog.remaining),
            ";".join(f"{s}:{n}:{b}" for s, n, b in prog.done_steps),
        )  # fmt: skip
        return prog

    def _tiers(self) -> set[str]:
        try:
            return {t.name for t in self.meta.tier_stats()}
        except ErllamaError:
            return set()

    def _step(self, step: Step, remaining: int, tiers: set[str]) -> StepResult:
        if step in ("ram", "ram_file"):
            return self._rows(step, max(remaining, 1), tiers)
        if step == "workers":
            return self._workers()
        return self._unload()

    def _rows(self, tier: Step, target: int, tiers: set[str]) -> StepResult:
        if tier not in tiers:
            return StepResult(tier, 0, 0)
        to = self.cfg.demote_to
        if to is not None and to in tiers and to != tier:
            res = self.meta.demote(target, [tier], to, timeout_s=DEMOTE_TIMEOUT_S)
            log.info(
                "event=demote tier=%s to=%s rows=%d evicted=%d bytes=%d",
                tier, to, res.demoted, res.evicted, res.bytes_freed,
            )  # fmt: skip
            self._count(rows_evicted=res.evicted, bytes_freed=res.bytes_freed)
            return StepResult(tier, res.demoted + res.evicted, res.bytes_freed)
        n, freed = self.meta.evict_bytes(target, [tier])
        log.info("event=evict tier=%s rows=%d bytes=%d", tier, n, freed)
        self._count(rows_evicted=n, bytes_freed=freed)
        return StepResult(tier, n, freed)

    def _models(self) -> list[ModelInfo]:
        r = self.daemon.call(ListModels(), LIST_TIMEOUT_S)
        if isinstance(r, ErrorReply):
            raise ErllamaError(f"list_models: {r.message}", code=r.code)
        return decode_result(r.result, list[ModelInfo])

    @staticmethod
    def _idle(m: ModelInfo) -> bool:
        return m.state == "ready" and m.phase == "idle" and m.pending_len == 0

    def _workers(self) -> StepResult:
        if not self.cfg.evict_idle_workers:
            return StepResult("workers", 0, 0)
        idle = [m for m in self._models() if self._idle(m)]
        idle.sort(key=lambda m: -(m.idle_s or 0.0))  # least recently used first
        n = 0
        for m in idle:
            r = self.daemon.call(Evict(model=m.id, release_context=True), EVICT_TIMEOUT_S)
            released = False
            if isinstance(r, Reply):
                try:
                    released = bool(decode_result(r.result, dict[str, bool]).get("released"))
                except ErllamaError:
                    released = False
            log.info(
                "event=evict_worker model=%s released=%s idle_s=%s%s",
                m.id, released, m.idle_s,
                f" error={r.code}" if isinstance(r, ErrorReply) else "",
            )  # fmt: skip
            n += released
        self._count(workers_evicted=n)
        return StepResult("workers", n, 0)

    def _unload(self) -> StepResult:
        idle = [m for m in self._models() if self._idle(m) and m.unload_in_s is not None]
        idle.sort(key=lambda m: m.unload_in_s or 0.0)  # the timer closest to firing first
        n = 0
        for m in idle:
            r = self.daemon.call(SleepModel(model=m.id, reason="pressure"), SLEEP_TIMEOUT_S)
            ok = False
            if isinstance(r, Reply):
                try:
                    ok = decode_result(r.result, bool)
                except ErllamaError:
                    ok = False
            log.info(
                "event=unload model=%s reason=pressure idle_s=%s unload_in_s=%s ok=%s%s",
                m.id, m.idle_s, m.unload_in_s, ok,
                f" error={r.code}" if isinstance(r, ErrorReply) else "",
            )  # fmt: skip
            n += ok
        self._count(models_unloaded=n)
        return StepResult("unload", n, 0)

    def _count(self, **deltas: int) -> None:
        d = {k: v for k, v in deltas.items() if v}
        if d:
            self.meta.add_counters(d)
