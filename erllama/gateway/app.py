"""The Starlette application: routes of the three APIs, limits, API keys, health, metrics.

* Limits: a body over ``max_body_bytes`` is answered 413 (by ``Content-Length`` before it
  is read, or as soon as a chunked body passes the limit); header size, idle keep-alive
  connections and the connection count are uvicorn's settings (``process.py``).
* API keys (``[http] api_keys_file``): every route but ``/health`` needs
  ``Authorization: Bearer KEY`` or ``x-api-key: KEY`` (constant-time compare); 401 otherwise.
* Errors: an ``ApiError`` (and Starlette's own 404/405) is answered in the shape of the API
  its path belongs to (``/v1/messages*``: Anthropic, ``/api/*``: Ollama, else OpenAI),
  with its status and ``Retry-After`` for 429/503. Nothing a client sends stops the process.
* ``GET /health``: 200 ``{"status": "ok"}`` when the router answers, else 503.
* ``[http] upstreams``: generation is routed over this daemon's router and those daemons
  (``upstream_cluster``, an ``AsyncClusterClient``); the rest asks the local router.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from erllama.client import AsyncClient, AsyncClusterClient, Timeout
from erllama.config import HttpConfig
from erllama.gateway.anthropic_api import Anthropic
from erllama.gateway.common import ClientGoneError, Ctx
from erllama.gateway.errors import Api, ApiError
from erllama.gateway.metrics import Metrics
from erllama.gateway.ollama_api import Ollama
from erllama.gateway.openai_api import OpenAI
from erllama.protocol.errors import ErllamaError, ErrorCode

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
HEALTH_TIMEOUT_S = 2.0
OPEN_PATHS = ("/health",)


def api_of(path: str) -> Api:
    if path.startswith("/v1/messages"):
        return "anthropic"
    if path.startswith("/api/"):
        return "ollama"
    return "openai"


def read_api_keys(path: str) -> list[bytes]:
    """The keys of ``api_keys_file``: one per line, ``#`` comments and blanks skipped.

    Raises:
        ValueError: the file cannot be read or holds no key.
    """
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"http.api_keys_file {path}: {exc}") from None
    keys = [ln.strip().encode() for ln in text.splitlines()]
    keys = [k for k in keys if k and not k.startswith(b"#")]
    if not keys:
        raise ValueError(f"http.api_keys_file {path} holds no key")
    return keys


async def _send_error(send: Send, path: str, err: ApiError) -> None:
    resp = error_response(path, err)
    await resp({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def error_response(path: str, err: ApiError) -> Response:
    return JSONResponse(err.body(api_of(path)), status_code=err.status, headers=err.headers())


class Guard:
    """ASGI middleware: API keys, then the body limit (before any route runs)."""

    def __init__(self, app: ASGIApp, max_body: int, keys: list[bytes]) -> None:
        self.app, self.max_body, self.keys = app, max_body, keys

    def _authorized(self, scope: Scope) -> bool:
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-api-key", b"")
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            given = auth[7:].strip()
        return any(hmac.compare_digest(given, k) for k in self.keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if self.keys and path not in OPEN_PATHS and not self._authorized(scope):
            await _send_error(send, path, ApiError("unauthorized", "a valid API key is required"))
            return
        for name, value in scope.get("headers") or []:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body:
                await _send_error(send, path, _too_large(self.max_body))
                return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise _BodyTooLargeError
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLargeError:
            if not started:
                await _send_error(send, path, _too_large(self.max_body))


class _BodyTooLargeError(Exception):
    pass


def _too_large(limit: int) -> ApiError:
    return ApiError(ErrorCode.TOO_LARGE, f"the request body is over {limit} bytes")


def upstream_cluster(http: HttpConfig, endpoint: str) -> AsyncClusterClient | None:
    """The client routing generation over the local router at ``endpoint`` and
    ``http.upstreams`` (None without upstreams)."""
    if not http.upstreams:
        return None
    timeout = Timeout(request=http.request_timeout_s, connect=http.upstream_connect_timeout_s)
    return AsyncClusterClient(
        [endpoint, *http.upstreams],
        timeout=timeout,
        curve_server_keys=http.upstream_server_keys,
        curve_secret_key=http.upstream_secret_key,
        policy=http.routing_policy,
    )


def build_app(http: HttpConfig, endpoint: str, *, started: asyncio.Event | None = None) -> ASGIApp:
    """The gateway's ASGI application, a client of the router at ``endpoint``.

    Raises:
        ValueError: ``api_keys_file`` is set and cannot be read, or an upstream CURVE key
            is malformed.
        OSError: an upstream key file cannot be read.
    """
    keys = read_api_keys(http.api_keys_file) if http.api_keys_file else []
    client = AsyncClient(endpoint, timeout=http.request_timeout_s)
    cluster = upstream_cluster(http, endpoint)
    ctx = Ctx(client=client, metrics=Metrics(), cluster=cluster)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with client:
            try:
                if started is not None:
                    started.set()
                yield
            finally:
                if cluster is not None:
                    await cluster.aclose()

    async def health(request: Request) -> Response:
        try:
            await asyncio.wait_for(client.list_models(), HEALTH_TIMEOUT_S)
        except (ErllamaError, TimeoutError):
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics(request: Request) -> Response:
        body = await ctx.metrics.render(client)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(request.url.path, exc)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: ErrorCode.NOT_FOUND, 405: "method_not_allowed"}.get(exc.status_code)
        err = ApiError(
            code or ErrorCode.BAD_REQUEST, f"{request.method} {request.url.path}: {exc.detail}"
        )
        err.status = exc.status_code
        return error_response(request.url.path, err)

    async def on_client_gone(request: Request, exc: Exception) -> Response:
        return Response(status_code=499)  # nobody reads it: the client has left

    async def on_internal(request: Request, exc: Exception) -> Response:
        log.exception("event=http_internal_error path=%s", request.url.path)
        err = ApiError(ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}")
        return error_response(request.url.path, err)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        *OpenAI(ctx).routes(),
        *Anthropic(ctx).routes(),
        *Ollama(ctx).routes(),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            ApiError: on_api_error,
            HTTPException: on_http_error,
            ClientGoneError: on_client_gone,
            Exception: on_internal,
        },
    )
    return Guard(app, http.max_body_bytes, keys)
