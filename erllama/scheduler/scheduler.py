"""The memory-pressure scheduler process: sample, decide, free memory in a fixed order.

Sockets:
    connects  DEALER ``control.sock`` (identity = child id; handshake, pings, Stop)
    binds     ROUTER ``scheduler.sock`` (the router forwards ``scheduler_status``,
              ``scheduler_enable``, ``scheduler_set_thresholds``,
              ``scheduler_force_check`` and ``vram_info``: ``api.SchedulerApi``)
    connects  DEALER ``meta.sock`` (main thread: ``scheduler_report``, fire and forget)
    connects  DEALER ``meta.sock`` (action thread: ``demote``, ``evict_bytes``,
              ``tier_stats``, ``add_counters``)
    connects  DEALER the router's client endpoint (action thread: ``list_models``,
              ``evict(release_context)``, ``sleep_model``; a client like any other)

Init: ``{"scheduler": SchedulerConfig, "daemon_id": str, "endpoint": str}``; the
settings a previous incarnation was given at run time win (``overrides``).

The root starts the scheduler whether ``enabled`` or not (REFERENCE §9: "the scheduler
always starts; its timer runs only while enabled"). Disabled, it samples nothing and
only answers its socket (and NVML for ``vram_info``); enabled, it checks the pressure
every ``interval_s``.

Threads:

* main (start-up and exit: ``lifecycle.run``): one ``zmq.Poller`` over the control
  socket, ``scheduler.sock``, the action thread's done pipe and the signal wakeup fd
  (``lifecycle.Child.watch``); the poll timeout is the next tick while enabled (a
  fixed interval, deadline-driven, so a Stop is seen at once) or a forced check's
  reply deadline. Each check samples (NVML is read on the sampler's own thread
  with a timeout), asks ``policy.PressurePolicy`` for a decision, hands a ``Plan`` to
  the action thread (skipped while one still runs) and reports its status to meta
  (``erllama status``).
* actions: runs a plan's steps (``actions.Actions``) and, when the plan ends, writes
  a byte to the done pipe: the main thread then answers the forced checks waiting.

Stop: ``Stop`` on control, or SIGTERM/SIGINT: the action thread gets its sentinel and
is joined (bounded), sockets close, exit 0.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import threading
import time

import msgspec
import zmq

from erllama import lifecycle
from erllama.cache.client import MetaClient, MetaUnavailable
from erllama.config import SchedulerConfig, validate_watermarks
from erllama.inits import SchedulerInit
from erllama.protocol.codec import encode
from erllama.protocol.errors import ErllamaError, ErrorCode, NotSupportedError, ProtocolError
from erllama.protocol.messages import (
    SchedulerAction,
    SchedulerCheck,
    SchedulerStatus,
    VramInfo,
)
from erllama.protocol.meta_messages import SchedulerReport
from erllama.protocol.sockets import CLIENT_SOCK, META_SOCK, ipc_endpoint, make_socket
from erllama.scheduler import overrides
from erllama.scheduler.actions import Actions, DaemonLink
from erllama.scheduler.api import SchedulerApi
from erllama.scheduler.policy import Plan, PressurePolicy, Skip, Thresholds
from erllama.scheduler.sampler import NvmlSampler, Sample, Sampler, make_sampler

__all__ = ["Scheduler", "main", "serve"]

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 10.0


def _thresholds(cfg: SchedulerConfig) -> Thresholds:
    return Thresholds(
        cfg.high_watermark, cfg.low_watermark, cfg.min_evict_bytes, cfg.escalate_after_samples
    )


class Scheduler:
    """The main thread's state: sampler, policy, switches, status; the action thread's queue."""

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
            log.warning(
                "event=sampler_unavailable source=%s reason=%s", cfg.pressure_source, reason
            )
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
            _thresholds(cfg),
            evict_tiers=tuple(cfg.evict_tiers),
            workers=cfg.evict_idle_workers,
        )
        self.next_tick = time.monotonic()
        self.report = make_socket(ctx, zmq.DEALER, connect=ipc_endpoint(run_dir, META_SOCK))
        self.jobs: queue.SimpleQueue[tuple[int, Plan] | None] = queue.SimpleQueue()
        self.busy = threading.Event()
        self.done_r, self.done_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.last_sample: Sample | None = None
        self.sampled_at: float | None = None
        self.last_decision = "none"
        self.last_action: SchedulerAction | None = None
        # the last plan that ended: (its number, its action or None, the failure or "")
        self.last_done: tuple[int, SchedulerAction | None, str] = (0, None, "")
        self.plans = 0
        self._thread = threading.Thread(target=self._action_loop, name="actions", daemon=True)
        self._thread.start()

    @property
    def enabled(self) -> bool:
        return self.cfg.enabled

    # ------------------------------------------------------------ action thread
    def _action_loop(self) -> None:
        meta = MetaClient(self.ctx, ipc_endpoint(self.run_dir, META_SOCK), self.holder)
        daemon = DaemonLink(self.ctx, self.endpoint)
        actions = Actions(self.cfg, meta, daemon)
        try:
            while True:
                job = self.jobs.get()
                if job is None:
                    return
                n, plan = job
                action: SchedulerAction | None = None
                error = ""
                try:
                    prog = actions.run(plan)
                    action = SchedulerAction(
                        at=time.time(),
                        reason=plan.reason,
                        target_bytes=plan.target_bytes,
                        steps=list(prog.done_steps),
                        bytes_freed=sum(b for _, _, b in prog.done_steps),
                    )
                    self.last_action = action
                except (ErllamaError, MetaUnavailable, zmq.ZMQError) as exc:
                    log.warning("event=plan_failed reason=%s", exc)
                    error = str(exc)
                except Exception as exc:
                    log.exception("event=plan_crashed")
                    error = f"plan crashed: {exc}"
                finally:
                    self.last_done = (n, action, error)
                    self.busy.clear()
                    with contextlib.suppress(BlockingIOError):  # a byte is there already
                        os.write(self.done_w, b"x")
        finally:
            daemon.close()
            meta.close()

    def drain_done(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.done_r, 512):
                pass

    # ------------------------------------------------------------ main thread
    def tick(self) -> None:
        self.check()
        self.send_report()

    def check(self, *, force: bool = False) -> Plan | Skip:
        """One pressure check: sample, decide, hand a plan to the action thread."""
        sample = self.sampler.sample() if self.sampler is not None else None
        if sample is not None:
            self.last_sample = sample
            self.sampled_at = time.time()
        decision = (
            self.policy.decide(sample, force=force)
            if self.sampler is not None
            else Skip("no_sample")
        )
        if isinstance(decision, Plan):
            if self.busy.is_set():
                self.last_decision = "busy"
                log.info("event=skip reason=busy ratio=%.4f", decision.sample.ratio)
                return Skip("busy")
            self.busy.set()
            self.plans += 1
            self.last_decision = f"plan:{decision.reason}"
            self.jobs.put((self.plans, decision))
            return decision
        if decision.reason != self.last_decision:
            log.debug("event=skip reason=%s", decision.reason)
        self.last_decision = decision.reason
        return decision

    def force_check(self) -> SchedulerCheck | int:
        """``force_check()``: a check now; a started plan's number to wait for, or the answer."""
        if not self.enabled:
            return SchedulerCheck(outcome="skipped", reason="disabled")
        decision = self.check(force=True)
        self.send_report()
        log.info("event=force_check decision=%s", self.last_decision)
        if isinstance(decision, Plan):
            return self.plans
        ratio = self.last_sample.ratio if self.last_sample is not None else None
        return SchedulerCheck(
            outcome="skipped",
            reason=decision.reason,
            last_ratio=round(ratio, 6) if ratio is not None else None,
        )

    def set_enabled(self, on: bool) -> None:
        """``enable(bool)``: enabling re-arms the policy and checks at once.

        The check runs here, before the caller is answered: a check left to the loop
        could sample a later pressure and start a plan that a forced check the caller
        sends next would find busy.
        """
        starting = on and not self.enabled
        if starting:
            self.policy.armed, self.policy.above = True, 0
        self.cfg = msgspec.structs.replace(self.cfg, enabled=on)
        overrides.save(self.run_dir, self.cfg)
        log.info("event=%s", "enabled" if on else "disabled")
        if starting:
            self.check()
            self.next_tick = time.monotonic() + self.cfg.interval_s
        self.send_report()

    def set_thresholds(self, high: float, low: float) -> None:
        """``set_thresholds(high, low)``: checked like the config.

        Raises:
            ConfigError: unless ``0 <= low < high <= 1``.
        """
        validate_watermarks(high, low)
        self.cfg = msgspec.structs.replace(self.cfg, high_watermark=high, low_watermark=low)
        self.policy.thresholds = _thresholds(self.cfg)
        overrides.save(self.run_dir, self.cfg)
        log.info("event=thresholds high=%g low=%g", high, low)
        self.send_report()

    def vram_info(self) -> VramInfo:
        """NVML read now, whether the scheduler is enabled or not.

        Raises:
            NotSupportedError: ``no_gpu`` (no NVML, no driver, no GPU).
            ErllamaError: ``timeout`` when NVML failed or did not answer in time.
        """
        if self.vram is None:
            raise NotSupportedError(self.vram_reason or "no GPU", code=ErrorCode.NO_GPU)
        v = self.vram.sample()
        if v is None:
            raise ErllamaError("NVML read failed or timed out", code=ErrorCode.TIMEOUT)
        return VramInfo(total_b=v.total, free_b=v.free, used_b=v.used)

    def status(self) -> SchedulerStatus:
        s = self.last_sample
        vram: VramInfo | None = None
        if self.vram is not None:
            v = s if (s is not None and self.vram is self.sampler) else self.vram.sample()
            if v is not None:
                vram = VramInfo(total_b=v.total, free_b=v.free, used_b=v.used)
        cfg = self.cfg
        return SchedulerStatus(
            enabled=cfg.enabled,
            pressure_source=cfg.pressure_source,
            sampler=self.sampler.name if self.sampler is not None else None,
            sampler_reason=self.sampler_reason,
            interval_s=cfg.interval_s,
            high_watermark=cfg.high_watermark,
            low_watermark=cfg.low_watermark,
            min_evict_bytes=cfg.min_evict_bytes,
            evict_tiers=list(cfg.evict_tiers),
            resource=s.resource if s is not None else None,
            last_used=s.used if s is not None else None,
            last_total=s.total if s is not None else None,
            last_ratio=round(s.ratio, 6) if s is not None else None,
            sampled_at=self.sampled_at,
            last_decision=self.last_decision,
            last_action=self.last_action,
            plans=self.plans,
            vram=vram,
            vram_reason=self.vram_reason,
        )

    def send_report(self) -> None:
        report = SchedulerReport(status=msgspec.to_builtins(self.status()))
        try:
            self.report.send_multipart(encode(report), zmq.NOBLOCK)
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
        os.close(self.done_r)
        os.close(self.done_w)


def serve(sched: Scheduler, api: SchedulerApi, child: lifecycle.Child) -> int:
    """The main loop: control messages, the scheduler's socket, the tick while enabled."""
    poller = zmq.Poller()
    child.watch(poller)
    poller.register(api.sock, zmq.POLLIN)
    poller.register(sched.done_r, zmq.POLLIN)
    interval = sched.cfg.interval_s
    while True:
        deadline = min(sched.next_tick if sched.enabled else math.inf, api.next_deadline())
        timeout = (
            None
            if deadline == math.inf
            else max(0, math.ceil((deadline - time.monotonic()) * 1000))
        )
        events = dict(poller.poll(timeout))
        if child.should_stop(events):
            return 0
        if events.get(api.sock):
            api.drain()
        if events.get(sched.done_r):
            sched.drain_done()
            api.plans_done()
        now = time.monotonic()
        api.expire(now)
        if sched.enabled and now >= sched.next_tick:
            sched.tick()
            # fixed rate; after a long stall, skip the missed ticks instead of bursting
            sched.next_tick += interval
            if sched.next_tick <= now:
                sched.next_tick = now + interval


def main(run_dir: str, child_id: str) -> int:
    """Entry point of the scheduler child (``python -m erllama.scheduler RUN_DIR CHILD_ID``)."""
    return lifecycle.run("scheduler", run_dir, child_id, SchedulerInit, _start)


def _start(child: lifecycle.Child, init: SchedulerInit) -> lifecycle.Started:
    """The settings (overrides win), the sampler and action thread, scheduler.sock."""
    try:
        cfg = overrides.load(child.run_dir, init.scheduler)
        endpoint = init.endpoint or ipc_endpoint(child.run_dir, CLIENT_SOCK)
        holder = f"{child.child_id}:{os.getpid()}"
        sched = Scheduler(child.ctx, cfg, child.run_dir, endpoint, holder)
        child.on_exit(sched.close)
        api = SchedulerApi(child.ctx, child.run_dir, sched)
        child.on_exit(api.close)
    except (ProtocolError, ValueError, msgspec.ValidationError, zmq.ZMQError) as exc:
        raise child.bad_config(exc) from None
    log.info(
        "event=ready enabled=%s source=%s interval_s=%g high=%g low=%g",
        cfg.enabled, cfg.pressure_source, cfg.interval_s, cfg.high_watermark,
        cfg.low_watermark,
    )  # fmt: skip

    def loop() -> int:
        sched.send_report()
        return serve(sched, api, child)

    info = {"pid": os.getpid(), "sampler": sched.sampler.name if sched.sampler else None}
    return lifecycle.Started(loop, info)
