"""The typed ``Init`` payloads: what the root sends each child (docs/ARCHITECTURE.md).

``Init.config`` travels as a map (msgpack builtins of one of these structs); the root
builds it with ``encode_init`` (``supervisor/payloads.py``) and each child decodes and
validates it with ``decode_init`` before anything else, so a bad payload is one clear
``bad_request`` at start (``StartFailed``), never a ``KeyError`` deep in a child.
Unknown keys are ignored (an older child under a newer root). Golden files:
``tests/unit/protocol/golden/init_*.msgpack``.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from erllama.config import (
    CacheConfig,
    DaemonConfig,
    HttpConfig,
    ModelSpec,
    SchedulerConfig,
    SupervisorConfig,
)
from erllama.protocol.errors import ErrorCode, ProtocolError
from erllama.protocol.messages import AdapterRecord, ModelInfo

T = TypeVar("T", bound="ChildInit")


class ChildInit(msgspec.Struct, frozen=True, kw_only=True):
    """Base of the Init payloads."""


class MetaInit(ChildInit, frozen=True):
    cache: CacheConfig
    daemon_id: str


class RouterInit(ChildInit, frozen=True):
    daemon: DaemonConfig
    models: list[ModelInfo]
    endpoint: str  # the ipc client endpoint it binds


class SchedulerInit(ChildInit, frozen=True):
    scheduler: SchedulerConfig
    daemon_id: str
    endpoint: str | None = None  # the router's client endpoint; None: ipc://<run_dir>/...


class GatewayInit(ChildInit, frozen=True):
    http: HttpConfig
    endpoint: str  # the router's ipc client endpoint (never TCP/CURVE)


class WorkerInit(ChildInit, frozen=True):
    model_id: str
    model: ModelSpec  # id filled, model_path resolved
    cache: CacheConfig = CacheConfig()
    daemon_id: str = "default"
    supervisor: SupervisorConfig = SupervisorConfig()
    # the model's LoRA adapters as the root last heard of them (a restart attaches them again)
    adapters: list[AdapterRecord] = []
    adapter_next_handle: int = 1


def encode_init(init: ChildInit) -> dict[str, Any]:
    """``Init.config`` of ``init``: msgpack-ready builtins (bytes stay bytes)."""
    out: dict[str, Any] = msgspec.to_builtins(init, builtin_types=(bytes, bytearray))
    return out


def decode_init(raw: dict[str, Any], typ: type[T]) -> T:
    """``Init.config`` as ``typ``.

    Raises:
        ProtocolError: ``bad_request`` naming the field that does not fit.
    """
    try:
        return msgspec.convert(raw, typ)
    except msgspec.ValidationError as exc:
        raise ProtocolError(
            f"bad {typ.__name__} payload: {exc}", code=ErrorCode.BAD_REQUEST
        ) from None
