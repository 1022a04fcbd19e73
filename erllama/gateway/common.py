"""What the three APIs share: typed bodies, request options, running a generation.

* ``decode_body(raw, T)``: a JSON body into a msgspec struct; a wrong type or a missing
  field is a 400 naming the field (``$.max_tokens``...).
* ``Run``: one generation on the router (``AsyncClient.infer`` / ``stream``), or, with
  ``[http] upstreams``, on the daemon the ``AsyncClusterClient`` picks; either
  collected (``collect``) or handed out event by event (``events``). A client that
  disconnects cancels it: streaming responses are cancelled by Starlette (the stream's
  ``async with`` sends the cancel); ``until_disconnect`` does the same for a response
  that is collected first.
* ``GenOptions``: the request options every API maps onto (``RequestOptions`` fields).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
from starlette.requests import Request

from erllama.client import AsyncClient, AsyncClusterClient, Event
from erllama.gateway.errors import ApiError, bad
from erllama.gateway.metrics import Metrics
from erllama.protocol.errors import ErllamaError, ErrorCode
from erllama.protocol.messages import Stats

T = TypeVar("T")
MAX_STOP = 16


class ClientGoneError(Exception):
    """The HTTP client disconnected before its answer was ready."""


def decode_body(raw: bytes, typ: type[T]) -> T:
    """A JSON request body as ``typ`` (400 ``badarg`` naming the bad field)."""
    if not raw:
        raise bad("the request body is empty: a JSON object is expected")
    try:
        return msgspec.json.decode(raw, type=typ)
    except msgspec.ValidationError as exc:
        raise bad(f"invalid request: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ApiError(ErrorCode.BAD_REQUEST, f"the body is not valid JSON: {exc}") from None


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def now_s() -> int:
    return int(time.time())


def stop_list(stop: str | list[str] | None, name: str = "stop") -> list[str] | None:
    if stop is None:
        return None
    items = [stop] if isinstance(stop, str) else stop
    if len(items) > MAX_STOP:
        raise bad(f"{name}: at most {MAX_STOP} stop sequences", name)
    if any(not s for s in items):
        raise bad(f"{name}: stop sequences must be non-empty", name)
    return items or None


@dataclass
class GenOptions:
    """Request options (names of ``RequestOptions``); None is not sent."""

    response_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop_sequences: list[str] | None = None
    grammar: str | None = None
    thinking: str | None = None
    thinking_budget_tokens: int | None = None
    parse_special: bool | None = None
    keep_alive: float | None = None

    def as_kwargs(self) -> dict[str, Any]:
        if self.response_tokens is not None and self.response_tokens < 1:
            raise bad("the token limit must be >= 1", "max_tokens")
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class Reply:
    """A generation collected to its end."""

    text: str = ""
    thinking: str = ""
    signature: bytes = b""
    tool_calls: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    stats: Stats | None = None

    def add(self, ev: Event) -> None:
        if ev.kind == "token":
            self.text += ev.text or ""
            if ev.token_id is not None:
                self.tokens.append(ev.token_id)
        elif ev.kind == "thinking_delta":
            self.thinking += ev.text or ""
        elif ev.kind == "thinking_end":
            self.signature = ev.signature or b""
        elif ev.kind == "tool_call_end":
            self.tool_calls.append(ev.text or "")
        elif ev.kind == "done":
            self.stats = ev.stats

    @property
    def done(self) -> Stats:
        assert self.stats is not None
        return self.stats


class Run:
    """One generation on the router: a prompt text or tokens, with options."""

    def __init__(
        self,
        client: AsyncClient | AsyncClusterClient,
        model: str,
        *,
        prompt: str | None = None,
        tokens: Sequence[int] | None = None,
        opts: GenOptions,
    ) -> None:
        self.client, self.model = client, model
        self.prompt, self.tokens, self.opts = prompt, tokens, opts
        self.started = time.perf_counter()
        self.ttft_s: float | None = None
        self.gaps: list[float] = []
        self._last: float | None = None

    async def events(self) -> AsyncGenerator[Event, None]:
        """The events of the generation; leaving early (or a disconnect) cancels it."""
        kwargs = self.opts.as_kwargs()
        try:
            if self.tokens is not None:
                kwargs.pop("parse_special", None)
                stream = await self.client.infer(self.model, self.tokens, **kwargs)
            else:
                assert self.prompt is not None
                stream = await self.client.stream(self.model, self.prompt, **kwargs)
            async with stream:
                async for ev in stream:
                    if ev.kind != "done":
                        t = time.perf_counter()
                        if self._last is None:
                            self.ttft_s = t - self.started
                        else:
                            self.gaps.append(t - self._last)
                        self._last = t
                    yield ev
        except ErllamaError as exc:
            raise ApiError.of(exc) from None

    async def collect(self) -> Reply:
        reply = Reply()
        async for ev in self.events():
            reply.add(ev)
        return reply


@dataclass
class Ctx:
    """What every handler uses: the router client and the metrics.

    ``cluster``: with ``[http] upstreams``, the client that routes generation over this
    daemon's router and the upstreams (everything else asks ``client``, the local router).
    """

    client: AsyncClient
    metrics: Metrics
    cluster: AsyncClusterClient | None = None

    def run(
        self,
        model: str,
        *,
        prompt: str | None = None,
        tokens: Sequence[int] | None = None,
        opts: GenOptions,
    ) -> Run:
        gen = self.cluster if self.cluster is not None else self.client
        return Run(gen, model, prompt=prompt, tokens=tokens, opts=opts)

    def finished(self, api: str, run: Run, stats: Stats) -> None:
        self.metrics.observe(run.model, api, stats, run.ttft_s, run.gaps)

    def failed(self, api: str, model: str, exc: ApiError | ClientGoneError) -> None:
        code = exc.code if isinstance(exc, ApiError) else "client_gone"
        self.metrics.outcome(model, api, code)

    async def collect(self, api: str, request: Request, run: Run) -> Reply:
        """The whole generation (cancelled if the client leaves), counted either way."""
        try:
            reply = await until_disconnect(request, run.collect())
        except (ApiError, ClientGoneError) as exc:
            self.failed(api, run.model, exc)
            raise
        self.finished(api, run, reply.done)
        return reply

    async def first_event(self, api: str, run: Run, events: AsyncGenerator[Event, None]) -> Event:
        """The first event of a stream: an error before it keeps its HTTP status."""
        try:
            return await anext(events)
        except ApiError as exc:
            self.failed(api, run.model, exc)
            raise


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the HTTP client leaves first, cancel it and raise ClientGoneError."""
    task = asyncio.ensure_future(work)

    async def gone() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(gone())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise ClientGoneError


async def call(work: Callable[[], Awaitable[T]]) -> T:
    """A unary client call with daemon errors mapped to ``ApiError``."""
    try:
        return await work()
    except ErllamaError as exc:
        raise ApiError.of(exc) from None


def tool_call_of(span: str) -> tuple[str, str]:
    """``(name, arguments JSON)`` of a tool-call span (``{"name", "arguments"}`` JSON)."""
    try:
        obj = json.loads(span)
    except ValueError:
        return "", json.dumps({"text": span})
    if not isinstance(obj, dict):
        return "", json.dumps({"value": obj})
    name = obj.get("name") or obj.get("function") or ""
    args = obj.get("arguments", obj.get("parameters", {}))
    return str(name), args if isinstance(args, str) else json.dumps(args)
