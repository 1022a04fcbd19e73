"""``AsyncClusterClient``: the asyncio twin of ``cluster.ClusterClient`` (documented there).

Sockets: those of the per-endpoint ``AsyncClient`` (each a DEALER and its monitor PAIR).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

from erllama.client.aio import AsyncClient
from erllama.client.aio_io import AsyncStream
from erllama.client.cluster import Key, _ClusterBase, _routes_of, _StreamState
from erllama.client.models import Completion, Event, Timeout
from erllama.client.routing import Policy, route_of
from erllama.protocol.errors import ErllamaError

__all__ = ["AsyncClusterClient", "AsyncClusterStream"]


class AsyncClusterStream:
    """Async twin of ``ClusterStream`` (``async for``, ``aclose``, ``async with``)."""

    def __init__(self, state: _StreamState, start: Callable[[AsyncClient], Awaitable[AsyncStream]]):
        self._st, self._start = state, start
        self._inner: AsyncStream | None = None

    async def _open(self, last: ErllamaError | None) -> None:
        while True:
            ep = self._st.next_endpoint(last)
            try:
                self._inner = await self._start(self._st._cluster.clients[ep])
                return
            except ErllamaError as exc:
                if not self._st.refused(exc):
                    raise
                last = exc

    @property
    def endpoint(self) -> str | None:
        return self._st.endpoint

    @property
    def request_id(self) -> str:
        assert self._inner is not None
        return self._inner.request_id

    def __aiter__(self) -> AsyncClusterStream:
        return self

    async def __anext__(self) -> Event:
        while True:
            if self._inner is None:
                raise StopAsyncIteration
            try:
                ev = await self._inner.__anext__()
            except StopAsyncIteration:
                self._inner = None
                raise
            except ErllamaError as exc:
                self._inner = None
                if not self._st.refused(exc):
                    raise
                await self._open(exc)
                continue
            self._st.saw(ev)
            return ev

    async def aclose(self) -> None:
        if self._inner is not None:
            await self._inner.aclose()
            self._inner = None
        self._st.ended(served=False)

    async def __aenter__(self) -> AsyncClusterStream:
        return self

    def __del__(self) -> None:  # dropped unfinished: the inner AsyncStream cancels itself
        with contextlib.suppress(Exception):
            self._st.ended(served=False)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class AsyncClusterClient(_ClusterBase[AsyncClient]):
    """Async twin of ``ClusterClient`` (one event loop, as ``AsyncClient``)."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        timeout: float | Timeout | None = None,
        curve_server_keys: Mapping[str, Key] | None = None,
        curve_secret_key: Key | None = None,
        curve_public_key: str | bytes | None = None,
        policy: Policy = "prefix",
        load_slack: int | None = None,
    ) -> None:
        super().__init__(
            AsyncClient,
            endpoints,
            timeout,
            curve_server_keys,
            curve_secret_key,
            curve_public_key,
            policy,
            load_slack,
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Async twin of ``ClusterClient.close``."""
        for c in self._clients.values():
            await c.aclose()

    async def complete(self, model: str, prompt: str, **opts: Any) -> Completion:
        """Async twin of ``ClusterClient.complete``."""
        route = route_of(model, prompt=prompt, session_id=opts.get("session_id"))
        last: ErllamaError | None = None
        for ep in self._plan(route):
            self._chooser.sent(ep)
            try:
                done = await self._clients[ep].complete(model, prompt, **opts)
            except ErllamaError as exc:
                if not self._refused(ep, exc):
                    raise
                last = exc
                continue
            self._served(
                ep,
                _routes_of(model, route, prompt=prompt, tokens=None, text=done.reply, generated=()),
            )
            return done
        raise self._no_endpoint(last)

    async def stream(self, model: str, prompt: str, **opts: Any) -> AsyncClusterStream:
        """Async twin of ``ClusterClient.stream``."""
        s = AsyncClusterStream(
            _StreamState(self, model, prompt, None, opts),
            lambda c: c.stream(model, prompt, **opts),
        )
        await s._open(None)
        return s

    async def infer(self, model: str, tokens: Sequence[int], **params: Any) -> AsyncClusterStream:
        """Async twin of ``ClusterClient.infer``."""
        s = AsyncClusterStream(
            _StreamState(self, model, None, tokens, params),
            lambda c: c.infer(model, tokens, **params),
        )
        await s._open(None)
        return s
