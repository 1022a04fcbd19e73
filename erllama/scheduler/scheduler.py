"""The memory-pressure scheduler process: sample, decide, free memory in a fixed order.

Sockets:
    connects  DEALER ``control.sock`` (identity = child id; handshake, pings, Stop)
    connects  DEALER ``meta.sock`` (main thread: ``scheduler_report``, fire and forget)
    connects  DEALER ``meta.sock`` (action thread: ``demote``, ``evict_bytes``,
              ``tier_stats``, ``add_counters``)
    connects  DEALER the router's client endpoint (action thread: ``list_models``,
              ``evict(release_context)``, ``sleep_model``; a client like any other)

Init: ``{"scheduler": SchedulerConfig, "daemon_id": str, "endpoint": str}``.

Threads:

* main: one ``zmq.Poller`` over the control socket and a signal wakeup pipe; the poll
  timeout is the next tick (a fixed interval, deadline-driven, so a Stop is seen at
  once). Each tick samples (NVML is read on the sampler's own thread with a timeout),
  asks ``policy.PressurePolicy`` for a decision, hands a ``Plan`` to the action thread
  (skipped while one still runs) and reports its status to meta (``erllama status``).
* actions: runs a plan's steps in order until the projected usage is under the low
  watermark (``policy.Progress``): (1) ram rows, (2) ram_file rows, both demoted into
  ``demote_to`` when that tier is configured, else evicted; (3) idle workers save and
  free their llama context; (4) idle models are put to sleep ahead of their keep_alive
  timer (``sleep_model``: the worker stops, the model stays registered and wakes on the
  next request; the router refuses models whose keep_alive says never; their rows
  stay). Every step is a log line with stable words and a counter in meta.

Stop: ``Stop`` on control, or SIGTERM/SIGINT: the action thread gets its sentinel and
is joined (bounded), sockets close, exit 0.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq

from erllama import lifecycle, logs
from erllama.cache.client import MetaClient, MetaUnavailable
from erllama.config import SchedulerConfig
from erllama.protocol.codec import Decoder, decode_result, encode
from erllama.protocol.errors import ErllamaError, ErrorCode
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
    Stop,
)
from erllama.protocol.meta_messages import SchedulerReport
from erllama.protocol.sockets import CLIENT_SOCK, META_SOCK, ipc_endpoint, make_socket
from erllama.scheduler.policy import Plan, PressurePolicy, Progress, Skip, Step, Thresholds
from erllama.scheduler.sampler import NvmlSampler, Sample, Sampler, make_sampler

__all__ = ["Actions", "Scheduler", "main"]

log = logging.getLogger(__name__)

EVICT_TIMEOUT_S = 40.0  # a worker's evict save may take up to 30 s (engine)
SLEEP_TIMEOUT_S = 10.0  # the router answers at once (the worker stops afterwards)
LIST_TIMEOUT_S = 5.0
DEMOTE_TIMEOUT_S = 120.0
JOIN_TIMEOUT_S = 10.0


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


class Scheduler:
    """The main thread's state: sampler, policy, status; the action thread's queue."""

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        cfg: SchedulerConfig,
        run_dir: str,
        endpoint: str,
        holder: str,
    ) -> None:
        self.ctx = ctx
        self.cfg = cfg
        self.run_dir = run_dir
        self.endpoint = endpoint
        self.holder = holder
        self.sampler: Sampler | None
        self.sampler, reason = make_sampler(cfg.pressure_source, run_dir, cfg.custom_sampler)
        self.sampler_reason = reason
        if self.sampler is None:
            log.warning("event=scheduler_disabled source=%s reason=%s", cfg.pressure_source, reason)
        # vram_info(): the NVML sampler (shared with the pressure source when it is NVML)
        self.vram: NvmlSampler | None = None
        self.vram_reason = ""
        if isinstance(self.sampler, NvmlSampler):
            self.vram = self.sampler
        elif cfg.pressure_source == "nvml":
            self.vram_reason = reason  # logged once already
        else:
            nv = NvmlSampler()
            self.vram = nv if nv.available else None
            self.vram_reason = nv.reason
        self.policy = PressurePolicy(
            Thresholds(
                cfg.high_watermark,
                cfg.low_watermark,
                cfg.min_evict_bytes,
                cfg.escalate_after_samples,
            ),
            evict_tiers=tuple(cfg.evict_tiers),
            workers=cfg.evict_idle_workers,
        )
        self.report = make_socket(ctx, zmq.DEALER, connect=ipc_endpoint(run_dir, META_SOCK))
        self.jobs: queue.SimpleQueue[Plan | None] = queue.SimpleQueue()
        self.busy = threading.Event()
        self.last_sample: Sample | None = None
        self.sampled_at: float | None = None
        self.last_decision = "none"
        self.last_action: dict[str, Any] | None = None
        self.plans = 0
        self._thread = threading.Thread(target=self._action_loop, name="actions", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ action thread
    def _action_loop(self) -> None:
        meta = MetaClient(self.ctx, ipc_endpoint(self.run_dir, META_SOCK), self.holder)
        daemon = DaemonLink(self.ctx, self.endpoint)
        actions = Actions(self.cfg, meta, daemon)
        try:
            while True:
                plan = self.jobs.get()
                if plan is None:
                    return
                try:
                    prog = actions.run(plan)
                    self.last_action = {
                        "at": time.time(),
                        "reason": plan.reason,
                        "target_bytes": plan.target_bytes,
                        "steps": [[s, n, b] for s, n, b in prog.done_steps],
                        "bytes_freed": sum(b for _, _, b in prog.done_steps),
                    }
                except (ErllamaError, MetaUnavailable, zmq.ZMQError) as exc:
                    log.warning("event=plan_failed reason=%s", exc)
                except Exception:
                    log.exception("event=plan_crashed")
                finally:
                    self.busy.clear()
        finally:
            daemon.close()
            meta.close()

    # ------------------------------------------------------------ main thread
    def tick(self) -> None:
        sample = self.sampler.sample() if self.sampler is not None else None
        if sample is not None:
            self.last_sample = sample
            self.sampled_at = time.time()
        decision = self.policy.decide(sample) if self.sampler is not None else Skip("no_sample")
        if isinstance(decision, Plan):
            if self.busy.is_set():
                self.last_decision = "busy"
                log.info("event=skip reason=busy ratio=%.4f", decision.sample.ratio)
            else:
                self.busy.set()
                self.plans += 1
                self.last_decision = f"plan:{decision.reason}"
                self.jobs.put(decision)
        else:
            if decision.reason != self.last_decision:
                log.debug("event=skip reason=%s", decision.reason)
            self.last_decision = decision.reason
        self.send_report()

    def status(self) -> dict[str, Any]:
        s = self.last_sample
        vram: dict[str, int] | None = None
        if self.vram is not None:
            v = s if (s is not None and self.vram is self.sampler) else self.vram.sample()
            if v is not None:
                vram = {"total_b": v.total, "free_b": v.free, "used_b": v.used}
        return {
            "enabled": self.sampler is not None,
            "pressure_source": self.cfg.pressure_source,
            "sampler": self.sampler.name if self.sampler is not None else None,
            "sampler_reason": self.sampler_reason,
            "interval_s": self.cfg.interval_s,
            "high_watermark": self.cfg.high_watermark,
            "low_watermark": self.cfg.low_watermark,
            "min_evict_bytes": self.cfg.min_evict_bytes,
            "evict_tiers": list(self.cfg.evict_tiers),
            "resource": s.resource if s is not None else None,
            "last_used": s.used if s is not None else None,
            "last_total": s.total if s is not None else None,
            "last_ratio": round(s.ratio, 6) if s is not None else None,
            "sampled_at": self.sampled_at,
            "last_decision": self.last_decision,
            "last_action": self.last_action,
            "plans": self.plans,
            "vram": vram,
            "vram_reason": self.vram_reason,
        }

    def send_report(self) -> None:
        try:
            self.report.send_multipart(encode(SchedulerReport(status=self.status())), zmq.NOBLOCK)
        except zmq.ZMQError:
            log.debug("scheduler report dropped")

    def close(self) -> None:
        self.jobs.put(None)
        self._thread.join(JOIN_TIMEOUT_S)
        if self.sampler is not None:
            self.sampler.close()
        if self.vram is not None and self.vram is not self.sampler:
            self.vram.close()
        self.report.close(linger=0)


# ---------------------------------------------------------------- signals
_stop_requested = False


def _on_signal(signum: int, frame: object) -> None:
    global _stop_requested
    _stop_requested = True


def serve(sched: Scheduler, link: lifecycle.ControlLink, wake_fd: int) -> int:
    """The main loop: control messages and the fixed-interval tick."""
    poller = zmq.Poller()
    poller.register(link.socket, zmq.POLLIN)
    poller.register(wake_fd, zmq.POLLIN)
    interval = sched.cfg.interval_s
    next_tick = time.monotonic()
    while True:
        timeout = max(0, int((next_tick - time.monotonic()) * 1000))
        events = dict(poller.poll(timeout))
        if events.get(wake_fd):
            try:
                while os.read(wake_fd, 512):
                    pass
            except BlockingIOError:
                pass
            if _stop_requested:
                log.info("event=stop reason=signal")
                return 0
        if events.get(link.socket):
            while link.socket.poll(0):
                ctl = link.handle(link.socket.recv_multipart())
                if isinstance(ctl, Stop):
                    log.info("event=stop reason=control")
                    return 0
                if ctl is not None:
                    log.debug("control message %s ignored", type(ctl).__name__)
        now = time.monotonic()
        if now >= next_tick:
            sched.tick()
            # fixed rate; after a long stall, skip the missed ticks instead of bursting
            next_tick += interval
            if next_tick <= now:
                next_tick = now + interval


def main(run_dir: str, child_id: str) -> int:
    """Entry point of the scheduler child (``python -m erllama.scheduler RUN_DIR CHILD_ID``)."""
    lifecycle.set_parent_death_signal()
    logs.setup("scheduler", child_id)
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    link = lifecycle.ControlLink(ctx, run_dir, "scheduler", child_id)
    sched: Scheduler | None = None
    try:
        init = link.handshake()
        try:
            cfg = msgspec.convert(init.config["scheduler"], SchedulerConfig)
            endpoint = str(init.config.get("endpoint") or ipc_endpoint(run_dir, CLIENT_SOCK))
            sched = Scheduler(ctx, cfg, run_dir, endpoint, f"{child_id}:{os.getpid()}")
        except (KeyError, TypeError, ValueError, msgspec.ValidationError) as exc:
            log.error("event=start_failed reason=%s", exc)
            link.start_failed(ErrorCode.BAD_REQUEST, f"bad scheduler config: {exc}")
            return 0
        link.ready({"pid": os.getpid(), "sampler": sched.sampler.name if sched.sampler else None})
        log.info(
            "event=ready source=%s interval_s=%g high=%g low=%g",
            cfg.pressure_source, cfg.interval_s, cfg.high_watermark, cfg.low_watermark,
        )  # fmt: skip
        return serve(sched, link, r)
    except ErllamaError as exc:
        log.error("event=scheduler_failed reason=%s", exc)
        return 1
    finally:
        if sched is not None:
            sched.close()
        signal.set_wakeup_fd(-1)
        os.close(r)
        os.close(w)
        link.close()
        ctx.term()
