"""Anthropic's Messages API: ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``.

``system`` (a string or text blocks) and ``messages`` (string content or text blocks) are
rendered through the model's chat template. ``usage`` splits the prompt as Anthropic does:
``cache_read_input_tokens`` (tokens the KV cache supplied, ``cache_delta.read``),
``cache_creation_input_tokens`` (prompt tokens written to the cache by this request) and
``input_tokens`` (the rest). With ``thinking`` enabled on a model with thinking markers,
the thinking span is a ``thinking`` content block with its ``signature``. Streaming uses
Anthropic's events: ``message_start``, ``content_block_start`` / ``_delta`` / ``_stop``,
``message_delta``, ``message_stop`` (and ``error``).
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from erllama.client import Event
from erllama.gateway.common import (
    ClientGoneError,
    Ctx,
    GenOptions,
    Reply,
    Run,
    call,
    decode_body,
    new_id,
    stop_list,
)
from erllama.gateway.errors import Api, ApiError, bad
from erllama.protocol.messages import Stats

API: Api = "anthropic"


class Block(msgspec.Struct):
    type: str
    text: str | None = None


class Message(msgspec.Struct):
    role: str
    content: str | list[Block]


class Thinking(msgspec.Struct):
    type: str
    budget_tokens: int | None = None


class CountRequest(msgspec.Struct, kw_only=True):
    model: str
    messages: list[Message]
    system: str | list[Block] | None = None


class MessagesRequest(CountRequest, kw_only=True):
    max_tokens: int
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stream: bool = False
    thinking: Thinking | None = None
    metadata: dict[str, Any] | None = None


def _text(content: str | list[Block], where: str) -> str:
    if isinstance(content, str):
        return content
    out = []
    for b in content:
        if b.type != "text" or b.text is None:
            raise bad(f"{where}: only text blocks are supported, not {b.type!r}")
        out.append(b.text)
    return "".join(out)


def chat_request(req: CountRequest) -> dict[str, Any]:
    messages = []
    for i, m in enumerate(req.messages):
        if m.role not in ("user", "assistant"):
            raise bad(f"messages[{i}].role must be user or assistant")
        messages.append({"role": m.role, "content": _text(m.content, f"messages[{i}]")})
    if not messages:
        raise bad("messages: at least one message")
    out: dict[str, Any] = {"messages": messages}
    if req.system is not None:
        out["system"] = _text(req.system, "system")
    return out


def usage(stats: Stats) -> dict[str, int]:
    read = stats.cache_delta.read
    created = min(stats.cache_delta.created, stats.prompt_tokens - read)
    return {
        "input_tokens": stats.prompt_tokens - read - created,
        "cache_creation_input_tokens": created,
        "cache_read_input_tokens": read,
        "output_tokens": stats.completion_tokens,
    }


def stop_reason(stats: Stats) -> str:
    if stats.stop_sequence is not None:
        return "stop_sequence"
    return "max_tokens" if stats.finish_reason == "length" else "end_turn"


def event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + msgspec.json.encode(data) + b"\n\n"


def _signature(sig: bytes) -> str:
    return base64.b64encode(sig).decode() if sig else ""


class Anthropic:
    """The Messages routes over one ``Ctx``."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx

    def routes(self) -> list[Route]:
        return [
            Route("/v1/messages", self.messages, methods=["POST"]),
            Route("/v1/messages/count_tokens", self.count_tokens, methods=["POST"]),
        ]

    async def count_tokens(self, request: Request) -> Response:
        req = decode_body(await request.body(), CountRequest)
        tmpl = chat_request(req)
        tokens = await call(lambda: self.ctx.client.apply_chat_template(req.model, tmpl))
        return JSONResponse({"input_tokens": len(tokens)})

    async def messages(self, request: Request) -> Response:
        req = decode_body(await request.body(), MessagesRequest)
        opts = GenOptions(
            response_tokens=req.max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            stop_sequences=stop_list(req.stop_sequences, "stop_sequences"),
        )
        if req.thinking is not None and req.thinking.type == "enabled":
            opts.thinking = "enabled"
            opts.thinking_budget_tokens = req.thinking.budget_tokens
        tmpl = chat_request(req)
        tokens = await call(lambda: self.ctx.client.apply_chat_template(req.model, tmpl))
        run = self.ctx.run(req.model, tokens=tokens, opts=opts)
        if req.stream:
            return await self._stream(run.events(), run, req.model)
        reply = await self.ctx.collect(API, request, run)
        return JSONResponse(self._body(req.model, reply))

    def _body(self, model: str, reply: Reply) -> dict[str, Any]:
        stats = reply.done
        content: list[dict[str, Any]] = []
        if reply.thinking:
            content.append(
                {
                    "type": "thinking",
                    "thinking": reply.thinking,
                    "signature": _signature(reply.signature),
                }
            )
        content.append({"type": "text", "text": reply.text})
        return {
            "id": new_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": stop_reason(stats),
            "stop_sequence": stats.stop_sequence,
            "usage": usage(stats),
        }

    async def _stream(self, events: AsyncGenerator[Event, None], run: Run, model: str) -> Response:
        first = await self.ctx.first_event(API, run, events)
        mid = new_id("msg_")

        async def body() -> AsyncIterator[bytes]:
            start: dict[str, Any] = {
                "id": mid,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": 0, "output_tokens": 0},
            }
            yield event("message_start", {"type": "message_start", "message": start})
            index, open_kind = -1, ""

            def open_block(kind: str) -> bytes:
                nonlocal index, open_kind
                index += 1
                open_kind = kind
                block = (
                    {"type": "thinking", "thinking": ""}
                    if kind == "thinking"
                    else {"type": "text", "text": ""}
                )
                return event(
                    "content_block_start",
                    {"type": "content_block_start", "index": index, "content_block": block},
                )

            def close_block() -> bytes:
                nonlocal open_kind
                open_kind = ""
                return event("content_block_stop", {"type": "content_block_stop", "index": index})

            def delta(d: dict[str, Any]) -> bytes:
                return event(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": index, "delta": d},
                )

            ev = first
            try:
                while True:
                    if ev.kind == "thinking_delta":
                        if open_kind != "thinking":
                            if open_kind:
                                yield close_block()
                            yield open_block("thinking")
                        yield delta({"type": "thinking_delta", "thinking": ev.text or ""})
                    elif ev.kind == "thinking_end":
                        if open_kind == "thinking":
                            sig = _signature(ev.signature or b"")
                            yield delta({"type": "signature_delta", "signature": sig})
                            yield close_block()
                    elif ev.kind == "token" and ev.text:
                        if open_kind != "text":
                            if open_kind:
                                yield close_block()
                            yield open_block("text")
                        yield delta({"type": "text_delta", "text": ev.text})
                    elif ev.kind == "done":
                        assert ev.stats is not None
                        self.ctx.finished(API, run, ev.stats)
                        if not open_kind and index < 0:
                            yield open_block("text")
                        if open_kind:
                            yield close_block()
                        yield event(
                            "message_delta",
                            {
                                "type": "message_delta",
                                "delta": {
                                    "stop_reason": stop_reason(ev.stats),
                                    "stop_sequence": ev.stats.stop_sequence,
                                },
                                "usage": usage(ev.stats),
                            },
                        )
                        yield event("message_stop", {"type": "message_stop"})
                        break
                    ev = await anext(events)
            except ApiError as exc:
                self.ctx.failed(API, model, exc)
                yield event("error", exc.body(API))
            except asyncio.CancelledError:  # the HTTP client left: the stream is cancelled
                self.ctx.failed(API, model, ClientGoneError())
                raise
            finally:
                await events.aclose()

        return StreamingResponse(
            body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
