"""The router's model table: states, live status rows, held requests, in-flight requests.

Pure data, no sockets: ``router.py`` feeds it what arrives (``ModelStateChanged``
and ``WorkerExited`` from the root, ``WorkerStatus`` pushes from workers,
requests and replies) and acts on what it returns (forward, hold, answer an
error). Unit-tested in ``tests/unit/router/test_table.py``.

Per model:

* ``state``: ``loading`` / ``ready`` / ``restarting`` / ``failed`` /
  ``stopping`` / ``sleeping``, from the root (an unloaded model leaves the table);
  ``sleeping`` also from the router itself the moment it asks the root to put the
  model to sleep (``sleep``), so nothing more is forwarded to a stopping worker.
* ``status``: the last ``WorkerStatus`` push; ``phase``, ``pending_len``,
  ``last_cache_hit`` and ``queue_depth`` are answered from it, lock-free.
* ``queue``: requests held while the model is loading, restarting or sleeping (bounded);
  flushed in order once it is ready, failed if it fails or is unloaded.
* ``forwarded``: requests the worker has and has not finished; a
  ``WorkerExited`` fails them all with ``worker_crashed`` at once.

Every admitted request, held or forwarded, is indexed by ``(client_id,
request_id)`` so a ``Cancel`` finds its model.

``keep_alive`` (``router/keepalive.py``) holds the models' idle timers; the table
gives it a ``ModelView`` per model (``views``) and shows its countdown in
``ModelInfo.unload_in_s``.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

import msgspec

from erllama.protocol.errors import ErrorCode
from erllama.protocol.messages import ModelInfo, ModelStateChanged, StatusRow, WorkerStatus
from erllama.router.keepalive import KeepAlive, ModelView

QUEUE_LIMIT = 1024

Key = tuple[bytes, str]  # (client identity, request id)


class Pending(NamedTuple):
    client_id: bytes
    request_id: str
    body: bytes


class Failure(NamedTuple):
    """A request to answer with an error: who, and why."""

    client_id: bytes
    request_id: str
    code: str
    message: str
    retryable: bool


class Admit(enum.Enum):
    FORWARD = "forward"
    HOLD = "hold"
    REJECT = "reject"


@dataclass(frozen=True, slots=True)
class Admission:
    action: Admit
    code: str = ""
    message: str = ""
    retryable: bool = False


@dataclass(eq=False)
class ModelEntry:
    info: ModelInfo
    state: str
    status: WorkerStatus | None = None
    connected: bool = False
    queue: deque[Pending] = field(default_factory=deque)
    forwarded: set[Key] = field(default_factory=set)
    last_busy: float = field(default_factory=time.monotonic)  # for ModelInfo.idle_s

    @property
    def routable(self) -> bool:
        return self.state in ("ready", "stopping") and self.connected

    @property
    def busy(self) -> bool:
        """A request is in flight at the worker or held here."""
        return bool(self.forwarded or self.queue)


class ModelTable:
    def __init__(self, *, queue_limit: int = QUEUE_LIMIT) -> None:
        self.models: dict[str, ModelEntry] = {}
        self.index: dict[Key, str] = {}
        self.queue_limit = queue_limit
        self.keep_alive = KeepAlive()

    # ================================================================ root's view
    def load(self, infos: list[ModelInfo]) -> None:
        """The models listed in the router's ``Init``."""
        for info in infos:
            self.models[info.id] = ModelEntry(
                info=info, state=info.state, connected=info.state in ("ready", "stopping")
            )

    def on_state(self, msg: ModelStateChanged) -> tuple[list[Pending], list[Failure]]:
        """Apply a state change; returns (requests to forward now, requests to fail)."""
        entry = self.models.get(msg.model)
        if msg.state == "unloaded":
            if entry is None:
                return [], []
            del self.models[msg.model]
            fails = self._drop_all(
                entry, ErrorCode.MODEL_NOT_LOADED, f"model {msg.model!r} was unloaded", False
            )
            return [], fails
        info = msg.info or (entry.info if entry is not None else None)
        if info is None:
            return [], []
        if entry is None:
            entry = self.models[msg.model] = ModelEntry(info=info, state=msg.state)
        entry.info = info
        entry.state = msg.state
        if msg.state == "ready":
            entry.connected = True  # Ready is sent once the worker has connected
            return self.take_queue(msg.model), []
        entry.connected = False
        entry.status = None  # the old incarnation's row no longer holds
        if msg.state == "failed":
            why = f"model {msg.model!r} failed: {msg.last_exit or 'too many restarts'}"
            fails = [
                Failure(p.client_id, p.request_id, ErrorCode.FAILED, why, False)
                for p in entry.queue
            ]
            for p in entry.queue:
                self.index.pop((p.client_id, p.request_id), None)
            entry.queue.clear()
            return [], fails
        return [], []

    def on_worker_exited(self, model: str, reason: str) -> list[Failure]:
        """The model's process died: every forwarded request fails, retryable."""
        entry = self.models.get(model)
        if entry is None:
            return []
        entry.connected = False
        fails = []
        for cid, rid in entry.forwarded:
            self.index.pop((cid, rid), None)
            fails.append(
                Failure(cid, rid, ErrorCode.WORKER_CRASHED, f"model {model!r}: {reason}", True)
            )
        entry.forwarded.clear()
        return fails

    def on_status(self, status: WorkerStatus, model: str) -> list[Pending]:
        """A status push from the worker with identity ``model`` (proves it is connected)."""
        entry = self.models.get(model)
        if entry is None:
            return []
        entry.status = status
        if status.phase != "idle" or status.pending_len:
            entry.last_busy = time.monotonic()
        if not entry.connected and entry.state in ("ready", "stopping"):
            entry.connected = True
            return self.take_queue(model)
        return []

    # ================================================================ requests
    def admit(self, model: str, client_id: bytes, request_id: str, body: bytes) -> Admission:
        """Decide what to do with a worker op; a held request is queued here."""
        entry = self.models.get(model)
        if entry is None:
            return Admission(
                Admit.REJECT, ErrorCode.MODEL_NOT_LOADED, f"model {model!r} is not loaded"
            )
        if entry.state == "failed":
            why = entry.info.last_exit or "too many restarts"
            return Admission(Admit.REJECT, ErrorCode.FAILED, f"model {model!r} failed: {why}")
        key = (client_id, request_id)
        if entry.routable and not entry.queue:
            self.index[key] = model
            entry.forwarded.add(key)
            return Admission(Admit.FORWARD)
        if len(entry.queue) >= self.queue_limit:
            return Admission(
                Admit.REJECT,
                ErrorCode.BUSY,
                f"model {model!r} is {entry.state}; {len(entry.queue)} requests already wait",
                True,
            )
        self.index[key] = model
        entry.queue.append(Pending(client_id, request_id, body))
        return Admission(Admit.HOLD)

    def touch(self, model: str) -> None:
        """A request that uses the model arrived (``idle_s`` restarts from 0)."""
        entry = self.models.get(model)
        if entry is not None:
            entry.last_busy = time.monotonic()

    def sleep(self, model: str) -> None:
        """The router asked the root to put the model to sleep: hold what comes next."""
        entry = self.models.get(model)
        if entry is not None:
            entry.state = "sleeping"
            entry.connected = False
            entry.status = None

    def views(self) -> list[ModelView]:
        """Each model as the keep-alive timers see it."""
        return [ModelView(m, e.state, e.busy, e.info.keep_alive_s) for m, e in self.models.items()]

    def take_queue(self, model: str) -> list[Pending]:
        """Everything held for ``model``, now counted as forwarded."""
        entry = self.models.get(model)
        if entry is None:
            return []
        out = list(entry.queue)
        entry.queue.clear()
        entry.forwarded.update((p.client_id, p.request_id) for p in out)
        return out

    def unroutable(self, model: str, pending: list[Pending]) -> None:
        """The worker is not reachable yet: hold these again, in front, until it pushes."""
        entry = self.models.get(model)
        if entry is None:
            return
        entry.connected = False
        for p in reversed(pending):
            entry.forwarded.discard((p.client_id, p.request_id))
            entry.queue.appendleft(p)

    def waiting_for_route(self) -> bool:
        """Some ready model holds requests because its worker was not reachable."""
        return any(
            e.queue and not e.connected and e.state in ("ready", "stopping")
            for e in self.models.values()
        )

    def retry_routes(self) -> dict[str, list[Pending]]:
        """Try those models again (a worker reconnecting to a restarted router sends
        nothing by itself, so the router probes by sending)."""
        out = {}
        for model, e in self.models.items():
            if e.queue and not e.connected and e.state in ("ready", "stopping"):
                e.connected = True
                out[model] = self.take_queue(model)
        return out

    def model_of(self, client_id: bytes, request_id: str) -> str | None:
        return self.index.get((client_id, request_id))

    def finished(self, client_id: bytes, request_id: str) -> None:
        """A terminal reply went out (or the client is gone): forget the request."""
        key = (client_id, request_id)
        model = self.index.pop(key, None)
        if model is not None and (entry := self.models.get(model)) is not None:
            entry.forwarded.discard(key)

    def drain_all(self, code: str, message: str) -> list[Failure]:
        """Every request still known (the router is stopping)."""
        fails: list[Failure] = []
        for entry in self.models.values():
            fails.extend(self._drop_all(entry, code, message, True))
        return fails

    def _drop_all(self, entry: ModelEntry, code: str, message: str, retry: bool) -> list[Failure]:
        keys = [*entry.forwarded, *((p.client_id, p.request_id) for p in entry.queue)]
        entry.forwarded.clear()
        entry.queue.clear()
        for k in keys:
            self.index.pop(k, None)
        return [Failure(cid, rid, code, message, retry) for cid, rid in keys]

    # ================================================================ lock-free status
    def model_info(self, model: str) -> ModelInfo | None:
        entry = self.models.get(model)
        if entry is None:
            return None
        info = entry.info
        st = entry.status
        phase = st.phase if st is not None else info.phase
        busy = phase != "idle" or bool(entry.queue)
        idle_s = 0.0 if busy else max(0.0, time.monotonic() - entry.last_busy)
        return msgspec.structs.replace(
            info,
            state=entry.state,
            status=phase if entry.state in ("ready", "stopping") else entry.state,
            phase=phase,
            pending_len=st.pending_len if st is not None else info.pending_len,
            last_cache_hit=st.last_cache_hit if st is not None else info.last_cache_hit,
            idle_s=round(idle_s, 3),
            unload_in_s=_round(self.keep_alive.unload_in(model, time.monotonic())),
        )

    def list_models(self) -> list[ModelInfo]:
        return [i for m in sorted(self.models) if (i := self.model_info(m)) is not None]

    def status_row(self, model: str) -> StatusRow:
        """Upstream's lock-free row; an unknown model reads idle / 0 / None."""
        entry = self.models.get(model)
        if entry is None:
            return StatusRow(model=model, state="unloaded")
        st = entry.status
        if st is None:
            return StatusRow(model=model, state=entry.state)
        return StatusRow(
            model=model,
            phase=st.phase,
            pending_len=st.pending_len,
            queue_depth=st.queue_depth,
            last_cache_hit=st.last_cache_hit,
            state=entry.state,
        )

    def queue_depth(self, model: str | None) -> int:
        """Admitted streaming requests, per model or over all (0 for unknown)."""
        if model is not None:
            entry = self.models.get(model)
            return entry.status.queue_depth if entry and entry.status else 0
        return sum(e.status.queue_depth for e in self.models.values() if e.status)


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 3)
