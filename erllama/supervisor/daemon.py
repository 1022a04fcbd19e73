"""The root supervisor: starts, watches and restarts the children; serves load/unload.

``serve(config)`` is ``erllama serve`` and ``python -m erllama.supervisor``.
The root never runs model code and never parses client payloads other than the
two tree operations (``LoadModel``, ``Unload``) the router forwards to it.

Data flow::

                   SIGTERM / SIGINT (handler only enqueues; set_wakeup_fd)
                                  |
                                  v
   child sentinels -------> +------------+ <---- control.sock (ROUTER, bound here)
   (an fd becomes readable  | zmq.Poller |        children: Hello, Ready, StartFailed, Pong,
    when a child exits)     | one loop;  |          AdaptersChanged, ShutdownSaving (workers)
                            |            |        router:   [router, client, ERL1, LoadModel|Unload]
                            |            |        router:   [router, ERL1, SleepWorker|WakeWorker]
                            | timeout =  |
                            | next timer | ----> control.sock
                            +------------+        children: Init, Ping, Stop
                              |        |          router:   ModelStateChanged, WorkerExited,
                              |        |                    [router, client, ERL1, reply]
                              |        |          meta:     HoldersDied
                              v        v
              tree.RestartTracker    events.sock (PUB, bound here):
              restart / backoff /    spawn, ready, exit, restart, backoff, failed, stop
              failed decisions

Timers (the poll timeout is the nearest): a child's ready deadline, its next
Ping, its stop stage (drain -> SIGTERM -> SIGKILL), a backoff before a restart.

Sockets: binds ``control.sock`` (ROUTER; identities are child ids) and
``events.sock`` (PUB). Connects nothing. Children bind ``meta.sock`` (meta),
``client.sock`` and ``workers.sock`` (router).

Start: meta, then router, then the scheduler (if installed; idle unless enabled), then
one worker per configured model; each child counts as started at ``Ready``.
The ``ready`` event of ``child="root"`` is published once every configured
model is ready or failed.

Who decides: ``control.ControlChannel`` decodes frames into typed events and sends;
``table.SlotTable`` (load, unload, model ids, who is answered) and ``sleeping`` decide
over the slots and return ``effects`` that ``Root._apply`` carries out, in order;
``boot.BootOrder`` says what starts next; ``stopping.Stopper`` runs the stop stages;
``rundir.RunDir`` owns the run directory.

Sleep (keep_alive, ``supervisor/sleeping.py``): the router asks, the root stops the
worker as an unload does but keeps its slot (``sleeping``) and spawns it again on a
wake.

Stop (SIGTERM/SIGINT): workers first (``Stop(drain)``, shutdown saves), then
scheduler, router, meta; each child gets ``Stop``, then SIGTERM after
``drain_timeout_s``, then SIGKILL of its process group after ``term_timeout_s``,
all clipped to one shared monotonic deadline. A worker that has drained and
writes its shutdown saves says so (``ShutdownSaving``): its next stage then waits
up to ``cache.evict_save_timeout_ms`` more (the shared deadline includes it). An
unload stops its worker the same way. Socket
files, the pid file and the ram tier dir are removed; the exit code is 0.
A core child (meta, router, scheduler) that cannot start, or restarts more
than ``supervisor.max_restarts`` times within ``within_s``, stops the daemon
with exit code 1.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Iterable
from pathlib import Path

import zmq

from erllama.config import Config, ConfigError, parse_listen, resolve_run_dir
from erllama.protocol.messages import AdaptersChanged, Hello, Pong, Ready, SleepWorker, StartFailed
from erllama.protocol.sockets import CLIENT_SOCK, EVENTS_SOCK, ipc_endpoint
from erllama.supervisor import payloads, rundir, sleeping
from erllama.supervisor.boot import BootOrder, installed
from erllama.supervisor.child import ChildProcess, describe_exit
from erllama.supervisor.control import (
    ChildMessage,
    ControlChannel,
    ControlEvent,
    FromChild,
    FromRouter,
)
from erllama.supervisor.effects import Answer, BeginStop, Effect, Publish, Spawn, Tell
from erllama.supervisor.events import EventPublisher
from erllama.supervisor.slot import INF, Slot
from erllama.supervisor.stopping import Stopper, kill_all
from erllama.supervisor.table import SlotTable
from erllama.supervisor.tree import ChildState, IntensityWindow
from erllama.supervisor.wakeup import SignalWakeup

log = logging.getLogger(__name__)

MODULES: dict[str, str] = {
    "meta": "erllama.cache.meta",
    "router": "erllama.router.router",
    "scheduler": "erllama.scheduler.scheduler",
    "gateway": "erllama.gateway.process",
    "worker": "erllama.workers.worker",
}


def serve(config: Config, *, modules: dict[str, str] | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT (or a fatal child failure); return the exit code.

    Args:
        config: the validated configuration.
        modules: role -> module overrides (tests only).

    Returns:
        0 after a requested stop; 1 when a core child failed; 2 when the run
        directory is held by another live daemon or is not usable.
    """
    run_dir = resolve_run_dir(config).absolute()
    endpoint = config.daemon.endpoint or ipc_endpoint(run_dir, CLIENT_SOCK)
    owned = rundir.RunDir(
        run_dir, endpoint, ram_tier=any(t.name == "ram" for t in config.cache.tiers)
    )
    try:
        owned.claim()
    except rundir.RunDirBusyError as exc:
        log.error("event=already_running run_dir=%s %s", run_dir, exc)
        return 2
    except OSError as exc:
        log.error("event=bad_run_dir run_dir=%s %s", run_dir, exc)
        return 2
    try:
        owned.prepare()
        return Root(config, run_dir, owned.daemon_id, endpoint, modules=modules).run()
    finally:
        owned.release()


class Root:
    """The root's loop and its children (one instance per ``serve``)."""

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        daemon_id: str,
        endpoint: str,
        *,
        modules: dict[str, str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.sup = cfg.supervisor
        self.run_dir = run_dir
        self.daemon_id = daemon_id
        self.endpoint = endpoint
        self.modules = {**MODULES, **(modules or {})}
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.events = EventPublisher(self.ctx, ipc_endpoint(run_dir, EVENTS_SOCK))
        self.table = SlotTable(self.modules, cfg.cache)
        self.slots = self.table.slots  # read here; written by the table only
        self.control = ControlChannel(self.ctx, run_dir, self.slots)
        self.stopper = Stopper(self.sup, cfg.cache.evict_save_timeout_s, self.control.stop)
        self.poller = zmq.Poller()
        self.poller.register(self.control.socket, zmq.POLLIN)
        self.root_window = IntensityWindow(self.sup.max_restarts, self.sup.within_s)
        self.boot = BootOrder(
            scheduler=lambda: installed(self.modules["scheduler"]),
            gateway=parse_listen(cfg.http.listen) is not None,
        )
        self.exit_code: int | None = None
        self.wakeup = SignalWakeup()

    # ================================================================ loop
    def run(self) -> int:
        if self.wakeup.install():
            self.poller.register(self.wakeup.fd, zmq.POLLIN)
        try:
            self.spawn(self.table.add_core("meta"), time.monotonic())
            while not self._finished():
                self._poll_once()
            return self.exit_code if self.exit_code is not None else 1
        except BaseException:
            kill_all(self.slots.values())  # clean up, then re-raise (KeyboardInterrupt included)
            raise
        finally:
            if self.wakeup.fd is not None:
                self.poller.unregister(self.wakeup.fd)
            self.wakeup.restore()
            self.control.close()
            self.events.close()
            self.ctx.term()

    def _finished(self) -> bool:
        return (
            self.exit_code is not None
            and not self.stopper.groups
            and not any(s.proc is not None for s in self.slots.values())
        )

    def _poll_once(self) -> None:
        now = time.monotonic()
        deadline = min((s.next_deadline() for s in self.slots.values()), default=INF)
        timeout = None if deadline == INF else max(0, math.ceil((deadline - now) * 1000))
        ready = dict(self.poller.poll(timeout))
        if self.wakeup.fd is not None and self.wakeup.fd in ready:
            for sig in self.wakeup.drain():
                log.info("event=signal signal=%s", signal.Signals(sig).name)
                self.shutdown(0, time.monotonic())
        if self.control.socket in ready:
            self.control.drain(self._on_control)
        for slot in list(self.slots.values()):
            if slot.proc is not None and slot.proc.sentinel in ready:
                self.on_exit(slot)
        self._tick(time.monotonic())

    def _tick(self, now: float) -> None:
        for slot in list(self.slots.values()):
            if slot.proc is not None:
                if slot.stop_stage:
                    if now >= slot.stop_deadline and not self.stopper.advance(slot, now):
                        self.on_exit(slot, reaped=False)  # abandoned
                elif slot.phase in ("hello", "init_sent") and now >= slot.ready_deadline:
                    self.kill(slot, f"no ready within {self.sup.ready_timeout_s:g}s")
                elif slot.phase == "ready" and now >= slot.next_ping_at:
                    self._heartbeat(slot, now)
            elif self.exit_code is None and slot.tracker.restart_due(now):
                self.events.publish("restart", slot.child_id, restarts=slot.tracker.restarts)
                self.spawn(slot, now)

    # ================================================================ control
    def _on_control(self, event: ControlEvent) -> None:
        now = time.monotonic()
        stopping = self.exit_code is not None
        if isinstance(event, FromChild):
            self._on_child(event.slot, event.msg, now)
        elif isinstance(event, FromRouter):
            if isinstance(event.msg, SleepWorker):
                self._apply(
                    sleeping.sleep_worker(event.target, event.msg.reason, stopping=stopping), now
                )
            else:
                self._apply(sleeping.wake_worker(event.target, stopping=stopping), now)
        else:
            self._apply(self.table.tree_op(event.waiter, event.msg, stopping=stopping), now)

    def _on_child(self, slot: Slot, msg: ChildMessage, now: float) -> None:
        if isinstance(msg, AdaptersChanged):  # kept for the next incarnation's Init
            slot.adapters = msg
            log.info(
                "event=adapters_recorded model=%s handles=%s",
                slot.model_id,
                ",".join(a.handle for a in msg.adapters) or "-",
            )
        elif isinstance(msg, Hello):
            config = payloads.init_payload(
                slot,
                self.cfg,
                daemon_id=self.daemon_id,
                endpoint=self.endpoint,
                run_dir=self.run_dir,
                slots=self.slots.values(),
            )
            if self.control.init(slot, config):
                slot.phase = "init_sent"
        elif isinstance(msg, Ready):
            if slot.is_worker:
                slot.info = payloads.parse_ready_info(msg.info) or slot.info
            elif slot.spec.role == "gateway":
                slot.listen = str(msg.info.get("listen") or "")
            self.on_ready(slot, now)
        elif isinstance(msg, StartFailed):
            log.warning(
                "event=start_failed child=%s code=%s message=%s",
                slot.child_id,
                msg.code,
                msg.message,
            )
            slot.start_failed = (msg.code, msg.message)
        elif isinstance(msg, Pong):
            self.on_pong(slot, msg.active, msg.progress, now)
        else:
            self.stopper.on_saving(slot, msg.timeout_s, now)

    def _apply(self, effects: Iterable[Effect], now: float) -> None:
        """Carry out what the table (or ``sleeping``) decided, in order."""
        for e in effects:
            if isinstance(e, Answer):
                self.control.reply(e.waiter, e.code, e.message, e.result)
            elif isinstance(e, Tell):
                self.control.model_changed(e.slot, e.state)
            elif isinstance(e, Publish):
                self.events.publish(e.word, e.child_id, e.pid, **e.fields)
            elif isinstance(e, BeginStop):
                self.stopper.begin(e.slot, now, self.sup.drain_timeout_s)
            elif isinstance(e, Spawn) and not self.spawn(e.slot, now, waking=e.waking):
                if e.waking:  # the process could not even be started: a failed start counted
                    log.error(
                        "event=wake_failed model=%s reason=%s", e.slot.model_id, e.slot.last_exit
                    )
                    self._apply(sleeping.resync(e.slot), now)
                else:
                    self._apply(self.table.remove(e.slot, e.slot.last_exit or "spawn failed"), now)

    # ================================================================ children
    def spawn(self, slot: Slot, now: float, *, waking: bool = False) -> bool:
        proc = ChildProcess(slot.spec, str(self.run_dir))
        try:
            proc.start()
        except Exception as exc:  # e.g. EAGAIN/ENOMEM from fork
            log.exception("event=spawn_failed child=%s", slot.child_id)
            slot.tracker.on_spawn(now)
            slot.tracker.on_exit(now, abnormal=True)
            slot.last_exit = f"spawn failed: {exc}"
            if not slot.is_worker:
                self.shutdown(1, now)
            return False
        incarnation = slot.tracker.on_spawn(now)
        slot.proc = proc
        slot.waking = waking  # a sleeping model woken: "loading", not "restarting"
        slot.phase = "hello"
        slot.ready_deadline = now + self.sup.ready_timeout_s
        self.poller.register(proc.sentinel, zmq.POLLIN)
        self.events.publish("spawn", slot.child_id, proc.pid, incarnation=incarnation)
        if slot.is_worker:
            self.control.model_changed(slot, slot.model_state())
        return True

    def kill(self, slot: Slot, reason: str) -> None:
        """Kill a live child that broke a rule (heartbeat, stall, ready timeout): a crash."""
        if slot.proc is None or slot.phase == "killed":
            return
        log.warning("event=kill child=%s pid=%d reason=%s", slot.child_id, slot.proc.pid, reason)
        slot.kill_reason = reason
        slot.phase = "killed"
        slot.proc.kill_group(signal.SIGKILL)

    def _heartbeat(self, slot: Slot, now: float) -> None:
        limit = self.sup.heartbeat_interval_s * self.sup.heartbeat_liveness
        if now - slot.last_pong_at > limit:
            self.kill(slot, f"no pong for {now - slot.last_pong_at:.1f}s (heartbeat)")
            return
        slot.ping_seq += 1
        self.control.ping(slot)
        slot.next_ping_at = now + self.sup.heartbeat_interval_s

    def on_ready(self, slot: Slot, now: float) -> None:
        slot.phase = "ready"
        slot.tracker.on_ready(now)
        slot.ready_deadline = INF
        slot.last_pong_at = now
        slot.progress_at = now
        slot.next_ping_at = now + self.sup.heartbeat_interval_s
        assert slot.proc is not None
        if slot.is_worker:  # the router first: an observer of the event sees it ready
            self._apply(self.table.worker_ready(slot), now)
        extra = {"listen": slot.listen} if slot.spec.role == "gateway" else {}
        self.events.publish(
            "ready", slot.child_id, slot.proc.pid, incarnation=slot.tracker.incarnation, **extra
        )
        self._boot_advance(now)

    def on_pong(self, slot: Slot, active: int, progress: int, now: float) -> None:
        slot.last_pong_at = now
        if active > 0 and progress == slot.progress:
            if now - slot.progress_at > self.sup.stall_timeout_s:
                self.kill(
                    slot, f"no progress for {now - slot.progress_at:.1f}s with {active} active"
                )
        else:
            slot.progress = progress
            slot.progress_at = now

    def on_exit(self, slot: Slot, *, reaped: bool = True) -> None:
        now = time.monotonic()
        proc = slot.proc
        assert proc is not None
        self.poller.unregister(proc.sentinel)
        code = proc.reap() if reaped else -signal.SIGKILL
        if slot.start_failed is not None:
            reason = f"start_failed {slot.start_failed[0]}: {slot.start_failed[1]}"
        elif slot.kill_reason is not None:
            reason = f"killed: {slot.kill_reason}"
        else:
            reason = describe_exit(code)
        abnormal = code != 0 or slot.kill_reason is not None or slot.start_failed is not None
        fail_code = slot.start_failed[0] if slot.start_failed else "load_failed"
        slot.last_exit = reason
        slot.reset_process_state()
        if slot.is_worker:
            self.control.worker_exited(slot, reason)  # first: in-flight requests fail at once
        if slot.child_id != "meta":
            self.control.holders_died([f"{slot.child_id}:{proc.pid}"])
        self.events.publish("exit", slot.child_id, proc.pid, code=code, reason=reason)
        decision = slot.tracker.on_exit(now, abnormal=abnormal)
        if slot.is_worker:
            stopping = self.exit_code is not None
            self._apply(
                self.table.worker_exit(
                    slot, proc.pid, decision, reason=reason, fail_code=fail_code, stopping=stopping
                ),
                now,
            )
        elif decision.action == "restart":
            if not self.root_window.record(now):
                log.error(
                    "event=root_intensity_exceeded child=%s max_restarts=%d within_s=%g",
                    slot.child_id, self.sup.max_restarts, self.sup.within_s,
                )  # fmt: skip
                self.shutdown(1, now)
            else:
                self.events.publish(
                    "backoff", slot.child_id, delay_s=decision.delay_s, reason=reason
                )
        elif decision.action == "stopped":
            self.events.publish("stop", slot.child_id, proc.pid, reason=decision.reason)
        else:
            self.events.publish(
                "failed", slot.child_id, proc.pid, reason=reason, detail=decision.reason
            )
            if self.exit_code is None:
                log.error("event=core_failed child=%s reason=%s", slot.child_id, reason)
                self.shutdown(1, now)
        if self.exit_code is not None:
            self.stopper.progress(self.slots, now)
        else:
            self._boot_advance(now)

    def _boot_advance(self, now: float) -> None:
        if self.exit_code is not None:
            return
        stage = self.boot.advance({cid for cid, s in self.slots.items() if s.phase == "ready"})
        if stage == "workers":
            self._boot_workers(now)
        elif stage is not None and stage != "up":
            self.spawn(self.table.add_core(stage), now)
        if self.boot.up(self._starting):
            self.events.publish("ready", "root", None, models=len(self.boot.workers))

    def _starting(self, child_id: str) -> bool:
        slot = self.slots.get(child_id)
        return slot is not None and slot.tracker.state is ChildState.STARTING

    def _boot_workers(self, now: float) -> None:
        for spec in self.cfg.models:
            try:
                slot = self.table.add_worker(spec, from_load=False)
            except (ConfigError, OSError) as exc:
                log.error("event=failed model=%s reason=%s", spec.id, exc)
                continue
            self.boot.workers.append(slot.child_id)
            self.spawn(slot, now)

    # ================================================================ stopping
    def shutdown(self, code: int, now: float) -> None:
        """Stop every child in reverse start order, then leave the loop with ``code``."""
        if self.exit_code is not None:
            self.exit_code = max(self.exit_code, code)
            return
        self.exit_code = code
        self.events.publish("stop", "root", None, code=code)
        self._apply(self.table.stop_all(), now)
        self.stopper.plan(self.slots, now)
