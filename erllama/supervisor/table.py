"""The root's slot table: which children exist, and the model decisions over them.

Pure state, no sockets, no processes, no clock (the house shape of
``cache/ledger.py`` and ``router/table.py``). ``daemon.Root`` owns one
``SlotTable``, feeds it the tree operations the router forwards (``LoadModel``,
``Unload``) and the worker events it sees (ready, exit, daemon stop), and carries
out the effects it returns, in order (``effects.py``).

The table decides: model ids (``erllama_model_<N>``, never one in use), whether a
load is refused (``bad_request``, ``busy`` while the old one unloads,
``already_loaded``; a failed model may be loaded again), what an unload does (a
model with no process goes at once), and who is answered when a worker is ready,
exits or is forgotten. Unit-tested in ``tests/unit/supervisor/test_table.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import msgspec

from erllama.config import (
    CacheConfig,
    ConfigError,
    ModelSpec,
    RestartPolicy,
    convert_model_spec,
    validate_model_spec,
)
from erllama.protocol.errors import ErrorCode
from erllama.protocol.messages import LoadModel, Unload
from erllama.supervisor import sleeping
from erllama.supervisor.effects import Answer, BeginStop, Effect, Publish, Spawn, Tell
from erllama.supervisor.payloads import resolve_model_path
from erllama.supervisor.slot import Slot, Waiter, worker_id
from erllama.supervisor.tree import ChildSpec, ChildState, ExitDecision, RestartTracker, Role

MAX_MODEL_ID_LEN = 200
# Core children restart fast; the root's own intensity (SupervisorConfig) is their limit.
CORE_POLICY = RestartPolicy(
    restart="permanent",
    max_restarts=1_000_000,
    within_s=1.0,
    backoff_initial_s=0.25,
    backoff_max_s=5.0,
    startsecs=1.0,
)


def check_model_id(model_id: str) -> None:
    """Raises ``ConfigError`` for an id the root does not accept."""
    if not model_id or len(model_id) > MAX_MODEL_ID_LEN:
        raise ConfigError(f"model id must be 1..{MAX_MODEL_ID_LEN} characters")
    if not model_id.isprintable() or any(c.isspace() for c in model_id):
        raise ConfigError("model id must be printable with no whitespace")


class SlotTable:
    """Every child slot of one root, by child id.

    Args:
        modules: role -> the module its children run.
        cache: the cache section (a loaded model's spec is validated against it).
        resolve: fills a spec's model path (``payloads.resolve_model_path``;
            raises ``OSError``); tests pass a pure one.
    """

    def __init__(
        self,
        modules: Mapping[str, str],
        cache: CacheConfig,
        *,
        resolve: Callable[[ModelSpec], ModelSpec] = resolve_model_path,
    ) -> None:
        self.slots: dict[str, Slot] = {}
        self._modules = modules
        self._cache = cache
        self._resolve = resolve
        self._next_model_n = 1

    # ------------------------------------------------------------ slots
    def add_core(self, role: Role) -> Slot:
        """The slot of a core child (meta, router, scheduler, gateway)."""
        spec = ChildSpec(role, role, self._modules[role], "permanent", CORE_POLICY)
        slot = Slot(spec=spec, tracker=RestartTracker(spec, fail_first_start=True))
        self.slots[role] = slot
        return slot

    def add_worker(self, spec: ModelSpec, *, from_load: bool) -> Slot:
        """A new worker slot (not spawned yet) for ``spec``; fills the id and the model path.

        Raises:
            OSError: the model path cannot be resolved (the bundled model).
        """
        model_id = spec.id or self.new_model_id()
        spec = self._resolve(msgspec.structs.replace(spec, id=model_id))
        child = ChildSpec(
            worker_id(model_id),
            "worker",
            self._modules["worker"],
            spec.restart.restart,
            spec.restart,
        )
        slot = Slot(
            spec=child,
            tracker=RestartTracker(child, fail_first_start=True),
            model_id=model_id,
            model=spec,
            from_load=from_load,
        )
        self.slots[child.child_id] = slot
        return slot

    def new_model_id(self) -> str:
        """``erllama_model_<N>``: the next N whose id is not in use."""
        while True:
            model_id = f"erllama_model_{self._next_model_n}"
            self._next_model_n += 1
            if worker_id(model_id) not in self.slots:
                return model_id

    def remove(self, slot: Slot, why: str) -> list[Effect]:
        """Forget a worker slot (unloaded, stopped, or a failed first load)."""
        self.slots.pop(slot.child_id, None)
        effects: list[Effect] = [Tell(slot, "unloaded")]
        effects += [Answer(w, ErrorCode.LOAD_FAILED, why) for w in slot.load_waiters]
        effects += [Answer(w) for w in slot.unload_waiters]
        slot.load_waiters.clear()
        slot.unload_waiters.clear()
        return effects

    # ------------------------------------------------------------ tree ops
    def tree_op(self, waiter: Waiter, msg: LoadModel | Unload, *, stopping: bool) -> list[Effect]:
        """A ``LoadModel`` or ``Unload`` the router forwarded."""
        if stopping:
            return [Answer(waiter, ErrorCode.SHUTTING_DOWN, "the daemon is stopping")]
        if isinstance(msg, LoadModel):
            return self._load(waiter, msg)
        return self._unload(waiter, msg)

    def _load(self, waiter: Waiter, msg: LoadModel) -> list[Effect]:
        try:
            spec = convert_model_spec(msg.config)
            if msg.model_id is not None:
                spec = msgspec.structs.replace(spec, id=msg.model_id)
            validate_model_spec(spec, self._cache)
            if spec.id is not None:
                check_model_id(spec.id)
        except ConfigError as exc:
            return [Answer(waiter, ErrorCode.BAD_REQUEST, str(exc))]
        if spec.id is not None:
            old = self.slots.get(worker_id(spec.id))
            if old is not None:
                if old.tracker.state is ChildState.STOPPING:
                    return [Answer(waiter, ErrorCode.BUSY, f"model {spec.id!r} is being unloaded")]
                if old.tracker.state is not ChildState.FAILED:
                    return [
                        Answer(waiter, ErrorCode.ALREADY_LOADED, f"model {spec.id!r} is loaded")
                    ]
                self.slots.pop(old.child_id)  # a failed model may be loaded again
        try:
            slot = self.add_worker(spec, from_load=True)
        except OSError as exc:
            return [Answer(waiter, ErrorCode.LOAD_FAILED, str(exc))]
        slot.load_waiters.append(waiter)
        return [Spawn(slot)]

    def _unload(self, waiter: Waiter, msg: Unload) -> list[Effect]:
        slot = self.slots.get(worker_id(msg.model))
        if slot is None:
            return [Answer(waiter, ErrorCode.NOT_FOUND, f"model {msg.model!r} is not loaded")]
        slot.unload_waiters.append(waiter)
        if slot.proc is not None:
            return [BeginStop(slot)]
        # failed, asleep, or waiting out a backoff: it goes at once
        slot.tracker.on_stop_requested()
        return [
            Publish("stop", slot.child_id, None, {"reason": "unloaded"}),
            *self.remove(slot, "unloaded"),
        ]

    # ------------------------------------------------------------ worker events
    def worker_ready(self, slot: Slot) -> list[Effect]:
        """A worker's Ready: the router first, then the loads waiting on it."""
        effects: list[Effect] = [Tell(slot, "ready")]
        effects += [Answer(w, result=slot.model_id) for w in slot.load_waiters]
        slot.load_waiters.clear()
        return effects

    def worker_exit(
        self,
        slot: Slot,
        pid: int,
        decision: ExitDecision,
        *,
        reason: str,
        fail_code: str,
        stopping: bool,
    ) -> list[Effect]:
        """A worker exited and the restart policy decided (the router has ``WorkerExited``).

        Args:
            reason: the exit as words (``exit code 3``, ``killed: ...``).
            fail_code: the error code for loads still waiting.
            stopping: the daemon is stopping (a sleeping worker is not woken).
        """
        if decision.action == "restart":  # the router before the event (observers see it)
            fields = {"delay_s": decision.delay_s, "reason": reason}
            return [Tell(slot, "restarting"), Publish("backoff", slot.child_id, None, fields)]
        if decision.action == "stopped":
            kept = sleeping.after_stop(slot, pid, stopping=stopping)
            if kept is not None:  # asleep (or woken): the slot stays
                return kept
            stop = Publish("stop", slot.child_id, pid, {"reason": decision.reason})
            return [*self.remove(slot, "unloaded before it was ready"), stop]
        effects: list[Effect] = [Answer(w, fail_code, reason) for w in slot.load_waiters]
        slot.load_waiters.clear()
        if slot.from_load and not slot.tracker.ever_ready:
            effects += self.remove(slot, reason)
        else:
            effects.append(Tell(slot, "failed"))
        effects.append(
            Publish("failed", slot.child_id, pid, {"reason": reason, "detail": decision.reason})
        )
        return effects

    def stop_all(self) -> list[Effect]:
        """The daemon stops: nothing restarts, loads still waiting are refused."""
        effects: list[Effect] = []
        for slot in self.slots.values():
            effects += [
                Answer(w, ErrorCode.SHUTTING_DOWN, "the daemon is stopping")
                for w in slot.load_waiters
            ]
            slot.load_waiters.clear()
            slot.tracker.on_stop_requested()
        return effects
