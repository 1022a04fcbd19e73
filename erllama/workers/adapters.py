"""LoRA adapters of one worker: the registry, the applied set and the effective fingerprint.

REFERENCE §1.3 and §3.3:

* ``load_adapter(path)``: SHA-256 of the whole file, ``llama_adapter_lora_init``, attach at
  scale 1.0, re-apply the full set (``llama_set_adapters_lora``), recompute the effective
  fingerprint. The handle is an opaque string (``lora-<n>``), unique within the model's
  life (a restart included; a new ``load_model`` starts again at ``lora-1``).
* ``unload_adapter(handle)``: detach, re-apply, free the adapter; an unknown handle is fine.
* ``set_adapter_scale(handle, scale)``: ``not_found`` for an unknown handle; the adapter
  moves to the end of the list.
* ``list_adapters()``: ``[{handle, scale}]`` in list order.

Restarts: every change of the set is also reported (``on_persist(records, next_handle)``;
the worker sends it to the root as ``AdaptersChanged`` before the op's reply goes out).
The root puts the last report in the next incarnation's init payload, and ``restore``
attaches that set again, same handles, scales and order, before the worker reports
ready: requests held during the reload run with the adapters, under the same effective
fingerprint, and old handles keep working. A file that is gone or whose SHA-256 changed
(or that llama.cpp now refuses) is ``adapter_lost``: the worker does not start rather
than serve other weights under the old name.

Every change of the applied set calls ``on_change(effective_fingerprint)``: the engine
moves the cache namespace of every later lookup and save to that fingerprint
(``SeqCache.set_fingerprint``), so rows computed under one adapter set never serve another
(``list_cached_prefixes`` follows too), and clears the live KV, computed under the old
weights. The engine applies adapter ops between requests only (one that arrives while a
request runs waits for its end), so a running request keeps the weights and the
fingerprint it was admitted with.

Errors: ``not_supported`` (a backend without LoRA: the stub; ``list_adapters`` answers
``[]`` there), ``enoent`` / ``eacces`` / ``eisdir`` (the file, message and ``detail`` carry
the path; other OS errors are ``load_failed``), ``load_failed`` (llama.cpp refused the file:
not a LoRA GGUF, another architecture, wrong shapes), ``badarg`` (a scale that is not a
finite number). A failure leaves the previous set applied.

The file is hashed and then opened again by llama.cpp: a file replaced in between is
fingerprinted with the old bytes (the same window upstream has).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from erllama.cache.keys import effective_fingerprint
from erllama.protocol.errors import (
    ErllamaError,
    ErrorCode,
    InvalidRequestError,
    ModelLoadError,
    NotSupportedError,
    UnknownModelError,
)
from erllama.protocol.messages import (
    MAX_ADAPTER_SCALE,
    AdapterInfo,
    AdapterRecord,
    ListAdapters,
    LoadAdapter,
    Msg,
    SetAdapterScale,
    UnloadAdapter,
)

log = logging.getLogger(__name__)

ADAPTER_OPS = (LoadAdapter, UnloadAdapter, SetAdapterScale, ListAdapters)
HASH_CHUNK = 1 << 20
_FILE_CODES = {
    errno.ENOENT: ErrorCode.ENOENT,
    errno.EACCES: ErrorCode.EACCES,
    errno.EISDIR: ErrorCode.EISDIR,
}


@runtime_checkable
class LoraBackend(Protocol):
    """What a backend offers for LoRA (``LlamaBackend``)."""

    def lora_load(self, path: str) -> Any:
        """Load an adapter file; an opaque native adapter. Raises ModelLoadError."""
        ...

    def lora_apply(self, adapters: Sequence[tuple[Any, float]]) -> None:
        """Make exactly these ``(adapter, scale)`` the context's set, in this order."""
        ...

    def lora_free(self, adapter: Any) -> None:
        """Free an adapter that is no longer applied."""
        ...


@dataclass(slots=True)
class Attached:
    """One attached adapter."""

    handle: str
    path: str
    sha256: bytes
    scale: float
    native: Any


def file_sha256(path: str) -> bytes:
    """SHA-256 of the whole file.

    Raises:
        InvalidRequestError: ``enoent``, ``eacces``, ``eisdir`` (detail ``{"path": path}``).
        ModelLoadError: ``load_failed`` for any other OS error.
    """
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                h.update(chunk)
    except OSError as exc:
        code = _FILE_CODES.get(exc.errno or 0)
        message = f"cannot read adapter {path}: {exc.strerror or exc}"
        if code is not None:
            raise InvalidRequestError(message, code=code, detail={"path": path}) from None
        raise ModelLoadError(message, code=ErrorCode.LOAD_FAILED, detail={"path": path}) from None
    return h.digest()


def check_scale(scale: object) -> float:
    """A finite adapter scale within the wire bounds (``badarg`` otherwise)."""
    if (
        isinstance(scale, bool)
        or not isinstance(scale, int | float)
        or not math.isfinite(scale)
        or abs(scale) > MAX_ADAPTER_SCALE
    ):
        raise InvalidRequestError(
            f"scale must be a finite number within +-{MAX_ADAPTER_SCALE:g}, got {scale!r}",
            code=ErrorCode.BADARG,
        )
    return float(scale)


class AdapterSet:
    """The attached adapters of one model (see the module docstring).

    Args:
        backend: the model; without ``LoraBackend`` every change is ``not_supported``.
        base_fingerprint: the model's base fingerprint (32 bytes).
        on_change: called with the new effective fingerprint after each change of the set.
        on_persist: called with ``(records(), next_handle)`` after each change of the set.
    """

    def __init__(
        self,
        backend: object,
        base_fingerprint: bytes,
        on_change: Callable[[bytes], None],
        on_persist: Callable[[list[AdapterRecord], int], None] | None = None,
    ) -> None:
        self._backend = backend
        self._base = bytes(base_fingerprint)
        self._on_change = on_change
        self._on_persist = on_persist
        self._items: list[Attached] = []
        self._next_handle = 1

    @property
    def next_handle(self) -> int:
        """The number the next new handle gets (``lora-<n>``)."""
        return self._next_handle

    def records(self) -> list[AdapterRecord]:
        """The attached set as the root keeps it (``AdaptersChanged``), in list order."""
        return [
            AdapterRecord(handle=a.handle, path=a.path, sha256=a.sha256, scale=a.scale)
            for a in self._items
        ]

    @property
    def fingerprint(self) -> bytes:
        """The effective fingerprint of the attached set (REFERENCE §3.3)."""
        return effective_fingerprint(self._base, [(a.sha256, a.scale) for a in self._items])

    def _lora(self) -> LoraBackend:
        if not isinstance(self._backend, LoraBackend):
            raise NotSupportedError(
                "this backend has no LoRA adapters", code=ErrorCode.NOT_SUPPORTED
            )
        return self._backend

    def _apply(self, items: list[Attached]) -> None:
        """Make ``items`` the applied set, then publish the new fingerprint."""
        self._lora().lora_apply([(a.native, a.scale) for a in items])
        self._items = items
        self._on_change(self.fingerprint)
        if self._on_persist is not None:
            self._on_persist(self.records(), self._next_handle)

    # ------------------------------------------------------------ operations
    def load(self, path: str) -> str:
        """Attach the adapter at ``path`` at scale 1.0; its handle."""
        lora = self._lora()
        if not isinstance(path, str) or not path:
            raise InvalidRequestError("path must be a non-empty string", code=ErrorCode.BADARG)
        sha = file_sha256(path)
        native = lora.lora_load(path)
        item = Attached(f"lora-{self._next_handle}", path, sha, 1.0, native)
        self._next_handle += 1
        try:
            self._apply([*self._items, item])
        except BaseException:
            lora.lora_free(native)
            self._restore()
            raise
        log.info(
            "event=adapter_loaded handle=%s path=%s sha256=%s", item.handle, path, sha.hex()[:16]
        )
        return item.handle

    def unload(self, handle: str) -> None:
        """Detach ``handle`` (an unknown handle is a no-op)."""
        lora = self._lora()
        item = self._find(handle)
        if item is None:
            return
        self._apply([a for a in self._items if a is not item])
        lora.lora_free(item.native)
        log.info("event=adapter_unloaded handle=%s", handle)

    def set_scale(self, handle: str, scale: float) -> None:
        """Change the scale of ``handle``; it moves to the end of the list."""
        self._lora()
        value = check_scale(scale)
        item = self._find(handle)
        if item is None:
            raise UnknownModelError(f"no adapter {handle!r}", code=ErrorCode.NOT_FOUND)
        moved = Attached(item.handle, item.path, item.sha256, value, item.native)
        try:
            self._apply([*(a for a in self._items if a is not item), moved])
        except BaseException:
            self._restore()
            raise

    def restore(self, records: Sequence[AdapterRecord], next_handle: int) -> None:
        """Attach ``records`` again (a restarted worker, before Ready): same handles, scales
        and order; later handles continue from ``next_handle``.

        Raises:
            ModelLoadError: ``adapter_lost``: a file is gone, unreadable, changed (another
                SHA-256) or refused; nothing is attached then.
        """
        self._next_handle = max(self._next_handle, next_handle)
        if not records:
            return
        lora = self._lora()
        items: list[Attached] = []
        current: AdapterRecord | None = None
        try:
            for current in records:
                sha = file_sha256(current.path)
                if sha != current.sha256:
                    raise ModelLoadError(
                        f"the file changed since it was attached (sha256 {sha.hex()[:16]}, "
                        f"was {current.sha256.hex()[:16]})"
                    )
                native = lora.lora_load(current.path)
                scale = check_scale(current.scale)
                items.append(Attached(current.handle, current.path, current.sha256, scale, native))
            current = None
            self._apply(items)
        except ErllamaError as exc:
            for a in items:
                lora.lora_free(a.native)
            if current is None:  # the set as a whole was refused
                self._restore()
            which = (
                f"adapter {current.handle} ({current.path})"
                if current is not None
                else "adapters " + ", ".join(r.handle for r in records)
            )
            raise ModelLoadError(
                f"cannot attach {which} again: {exc.message}",
                code=ErrorCode.ADAPTER_LOST,
                detail={"handles": [r.handle for r in records]},
            ) from None
        log.info(
            "event=adapters_restored handles=%s fingerprint=%s",
            ",".join(a.handle for a in items),
            self.fingerprint.hex()[:16],
        )

    def entries(self) -> list[AdapterInfo]:
        """``[{handle, scale}]`` in list order (``[]`` on a backend without LoRA)."""
        return [AdapterInfo(handle=a.handle, scale=a.scale) for a in self._items]

    def handle(self, msg: Msg) -> Any:
        """Run one adapter op; its reply value."""
        if isinstance(msg, LoadAdapter):
            return self.load(msg.path)
        if isinstance(msg, UnloadAdapter):
            self.unload(msg.handle)
            return None
        if isinstance(msg, SetAdapterScale):
            self.set_scale(msg.handle, msg.scale)
            return None
        if isinstance(msg, ListAdapters):
            return self.entries()
        raise InvalidRequestError(f"{type(msg).__name__} is not an adapter op")

    # ------------------------------------------------------------ helpers
    def _find(self, handle: str) -> Attached | None:
        return next((a for a in self._items if a.handle == handle), None)

    def _restore(self) -> None:
        """After a failed change: put the previous set back (best effort)."""
        try:
            self._lora().lora_apply([(a.native, a.scale) for a in self._items])
        except ErllamaError as exc:
            log.error("event=adapter_restore_failed %s", exc)
        self._on_change(self.fingerprint)
