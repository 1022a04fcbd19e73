"""``AsyncClient``: the asyncio client's public methods (its IO is ``aio_io.AsyncIO``).

Every method is the awaitable twin of the ``Client`` method of the same name
(``aclose`` for ``close``), documented there once (the httpx habit); this
module carries pointers.

Sockets: those of ``AsyncIO`` (a DEALER to the daemon and its monitor PAIR).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from erllama.client.aio_io import AsyncIO, AsyncStream
from erllama.client.models import Completion
from erllama.protocol.messages import (
    CacheHit,
    DaemonStatus,
    ModelInfo,
    PrefillResult,
    SchedulerCheck,
    SchedulerStatus,
)

__all__ = ["AsyncClient", "AsyncStream"]


class AsyncClient(AsyncIO):
    """An asyncio client of the erllama daemon (same methods as ``Client``, awaitable).

    Args:
        endpoint, timeout, curve_server_key, curve_secret_key, curve_public_key:
            as for ``Client``.

    The client opens on first use (or on ``async with``) inside a running
    loop, belongs to that loop, and cannot be reused after ``aclose()``. Any
    number of the loop's coroutines may use it at once.

    Example::

        async with erllama.AsyncClient() as c:
            async with await c.stream("default", "Hello") as s:
                async for ev in s:
                    print(ev.text or "", end="")
    """

    async def aclose(self) -> None:
        """Async twin of ``Client.close``: also stops the reader task."""
        await self._aclose()

    # ================================================================ lifecycle API
    async def load_model(
        self, config: Mapping[str, Any] | None = None, model_id: str | None = None
    ) -> str:
        """Async twin of ``Client.load_model``."""
        return await self._call(self._core.load_model(config, model_id))

    async def unload(self, model: str) -> None:
        """Async twin of ``Client.unload``."""
        await self._call(self._core.unload(model))

    unload_model = unload

    async def list_models(self) -> list[ModelInfo]:
        """Async twin of ``Client.list_models``."""
        return await self._call(self._core.list_models())

    async def model_info(self, model: str) -> ModelInfo:
        """Async twin of ``Client.model_info``."""
        return await self._call(self._core.model_info(model))

    # ================================================================ inference
    async def complete(self, model: str, prompt: str, **opts: Any) -> Completion:
        """Async twin of ``Client.complete``."""
        return await self._call(self._core.complete(model, prompt, opts))

    async def prefill_only(self, model: str, tokens: Sequence[int], **opts: Any) -> PrefillResult:
        """Async twin of ``Client.prefill_only``."""
        return await self._call(self._core.prefill_only(model, tokens, opts))

    async def stream(self, model: str, prompt: str, **opts: Any) -> AsyncStream:
        """Async twin of ``Client.stream``."""
        return await self._stream(self._core.stream(model, prompt, opts))

    async def infer(self, model: str, tokens: Sequence[int], **params: Any) -> AsyncStream:
        """Async twin of ``Client.infer``."""
        return await self._stream(self._core.infer(model, tokens, params))

    async def cancel(self, request_id: str) -> None:
        """Async twin of ``Client.cancel``."""
        await self._call(self._core.cancel(request_id))

    # ================================================================ tokenizer
    async def tokenize(self, model: str, text: str, *, parse_special: bool = False) -> list[int]:
        """Async twin of ``Client.tokenize``."""
        return await self._call(self._core.tokenize(model, text, parse_special=parse_special))

    async def detokenize(self, model: str, tokens: Sequence[int]) -> str:
        """Async twin of ``Client.detokenize``."""
        return await self._call(self._core.detokenize(model, tokens))

    # ================================================================ observability
    async def counters(self) -> dict[str, int]:
        """Async twin of ``Client.counters``."""
        return await self._call(self._core.counters())

    async def vram_info(self) -> dict[str, int]:
        """Async twin of ``Client.vram_info``."""
        return await self._call(self._core.vram_info())

    # ================================================================ scheduler API
    async def scheduler_status(self) -> SchedulerStatus:
        """Async twin of ``Client.scheduler_status``."""
        return await self._call(self._core.scheduler_status())

    async def enable_scheduler(self) -> SchedulerStatus:
        """Async twin of ``Client.enable_scheduler``."""
        return await self._call(self._core.enable_scheduler(True))

    async def disable_scheduler(self) -> SchedulerStatus:
        """Async twin of ``Client.disable_scheduler``."""
        return await self._call(self._core.enable_scheduler(False))

    async def set_scheduler_thresholds(self, *, high: float, low: float) -> SchedulerStatus:
        """Async twin of ``Client.set_scheduler_thresholds``."""
        return await self._call(self._core.set_scheduler_thresholds(high, low))

    async def force_scheduler_check(self) -> SchedulerCheck:
        """Async twin of ``Client.force_scheduler_check``."""
        return await self._call(self._core.force_scheduler_check())

    async def phase(self, model: str) -> str:
        """Async twin of ``Client.phase``."""
        return (await self._call(self._core.status_row(model))).phase

    async def pending_len(self, model: str) -> int:
        """Async twin of ``Client.pending_len``."""
        return (await self._call(self._core.status_row(model))).pending_len

    async def last_cache_hit(self, model: str) -> CacheHit | None:
        """Async twin of ``Client.last_cache_hit``."""
        return (await self._call(self._core.status_row(model))).last_cache_hit

    async def queue_depth(self, model: str | None = None) -> int:
        """Async twin of ``Client.queue_depth``."""
        return await self._call(self._core.queue_depth(model))

    async def list_cached_prefixes(self, model: str, tokens: Sequence[int]) -> int:
        """Async twin of ``Client.list_cached_prefixes``."""
        return await self._call(self._core.list_cached_prefixes(model, tokens))

    async def status(self, model: str) -> str:
        """Async twin of ``Client.status``."""
        return await self._call(self._core.status(model))

    async def evict(self, model: str) -> None:
        """Async twin of ``Client.evict``."""
        await self._call(self._core.evict(model))

    async def shutdown(self, model: str) -> None:
        """Async twin of ``Client.shutdown``."""
        await self._call(self._core.shutdown(model))

    async def daemon_status(self) -> DaemonStatus:
        """Async twin of ``Client.daemon_status``."""
        return await self._call(self._core.daemon_status())

    # ======================================================= templates, embeddings, adapters
    async def apply_chat_template(self, model: str, request: Mapping[str, Any]) -> list[int]:
        """Async twin of ``Client.apply_chat_template``."""
        return await self._call(self._core.apply_chat_template(model, request))

    async def embed(self, model: str, tokens: Sequence[int]) -> list[float]:
        """Async twin of ``Client.embed``."""
        return await self._call(self._core.embed(model, tokens))

    async def load_adapter(self, model: str, path: str | os.PathLike[str]) -> str:
        """Async twin of ``Client.load_adapter``."""
        return await self._call(self._core.load_adapter(model, path))

    async def unload_adapter(self, model: str, handle: str) -> None:
        """Async twin of ``Client.unload_adapter``."""
        await self._call(self._core.unload_adapter(model, handle))

    async def set_adapter_scale(self, model: str, handle: str, scale: float) -> None:
        """Async twin of ``Client.set_adapter_scale``."""
        await self._call(self._core.set_adapter_scale(model, handle, scale))

    async def list_adapters(self, model: str) -> list[dict[str, Any]]:
        """Async twin of ``Client.list_adapters``."""
        return await self._call(self._core.list_adapters(model))

    # ================================================================ speculative decoding
    async def draft_tokens(
        self, model: str, prefix: Sequence[int], max: int | None = None
    ) -> list[int]:
        """Async twin of ``Client.draft_tokens``."""
        return await self._run(self._core.draft(model, prefix, max))

    async def verify(
        self, model: str, prefix: Sequence[int], candidates: Sequence[int], k: int
    ) -> tuple[int, int | Literal["eos"]]:
        """Async twin of ``Client.verify``."""
        return await self._call(self._core.verify(model, prefix, candidates, k))
