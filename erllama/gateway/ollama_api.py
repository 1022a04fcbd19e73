"""Ollama's API: ``/api/tags``, ``/api/ps``, ``/api/generate``, ``/api/chat``, ``/api/embed``.

``/api/chat`` and ``/api/generate`` (unless ``raw``) render through the model's chat
template; a ``raw`` prompt is text with its special-token markers parsed. Streaming (the
default, as in Ollama) is NDJSON, one object per line, the last with ``done: true`` and
the counts and durations (nanoseconds). ``options`` maps ``num_predict``,
``temperature``, ``top_k``, ``top_p``, ``min_p``, ``repeat_penalty``, ``seed`` and
``stop``; other options (``num_ctx``...) are accepted and have no effect, since the
context is the model's config. ``keep_alive`` (seconds or a duration such as ``"5m"``;
negative: never) is the request's ``keep_alive``: the model's idle timer after it.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from functools import partial
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from erllama.gateway.common import (
    ClientGoneError,
    Ctx,
    GenOptions,
    Run,
    call,
    decode_body,
    stop_list,
)
from erllama.gateway.errors import Api, ApiError, bad
from erllama.protocol.messages import ModelInfo, Stats

API: Api = "ollama"
_DURATION = re.compile(r"^(-?\d+(?:\.\d+)?)(ms|s|m|h)?$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class Options(msgspec.Struct):
    num_predict: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    seed: int | None = None
    stop: list[str] | None = None


class ChatMessage(msgspec.Struct):
    role: str
    content: str = ""


class Base(msgspec.Struct, kw_only=True):
    model: str
    stream: bool = True
    options: Options | None = None
    keep_alive: float | str | None = None
    format: str | dict[str, Any] | None = None


class GenerateRequest(Base, kw_only=True):
    prompt: str = ""
    system: str | None = None
    raw: bool = False


class ChatRequest(Base, kw_only=True):
    messages: list[ChatMessage]


class EmbedRequest(msgspec.Struct, kw_only=True):
    model: str
    input: str | list[str]
    keep_alive: float | str | None = None


def keep_alive_s(value: float | str | None) -> float | None:
    """Seconds of Ollama's ``keep_alive`` (a number, or ``"300ms"``/``"10s"``/``"5m"``/``"1h"``)."""
    if value is None or isinstance(value, int | float):
        return None if value is None else float(value)
    m = _DURATION.match(value.strip())
    if m is None:
        raise bad(f"keep_alive {value!r} is not a duration such as 5m or 30s")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def _options(req: Base) -> GenOptions:
    o = req.options or Options()
    if req.format is not None:
        raise bad("format (structured outputs) is not supported on this API yet")
    return GenOptions(
        keep_alive=keep_alive_s(req.keep_alive),
        response_tokens=o.num_predict if o.num_predict and o.num_predict > 0 else None,
        temperature=o.temperature,
        top_k=o.top_k,
        top_p=o.top_p,
        min_p=o.min_p,
        repetition_penalty=o.repeat_penalty,
        seed=o.seed,
        stop_sequences=stop_list(o.stop),
    )


def stamp() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def final_fields(stats: Stats, run: Run) -> dict[str, Any]:
    ns = 1_000_000
    return {
        "done": True,
        "done_reason": "length" if stats.finish_reason == "length" else "stop",
        "total_duration": int((stats.prefill_ms + stats.generation_ms) * ns),
        "load_duration": 0,
        "prompt_eval_count": stats.prompt_tokens,
        "prompt_eval_duration": int(stats.prefill_ms * ns),
        "eval_count": stats.completion_tokens,
        "eval_duration": int(stats.generation_ms * ns),
    }


def model_entry(m: ModelInfo) -> dict[str, Any]:
    details = {
        "format": "gguf",
        "family": m.backend,
        "families": [m.backend],
        "parameter_size": "",
        "quantization_level": m.quant_tag,
    }
    return {
        "name": m.id,
        "model": m.id,
        "modified_at": stamp(),
        "size": m.vram_estimate_b,
        "digest": m.fingerprint.hex(),
        "details": details,
    }


class Ollama:
    """The Ollama routes over one ``Ctx``."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx

    def routes(self) -> list[Route]:
        return [
            Route("/api/tags", self.tags, methods=["GET"]),
            Route("/api/ps", self.ps, methods=["GET"]),
            Route("/api/version", self.version, methods=["GET"]),
            Route("/api/generate", self.generate, methods=["POST"]),
            Route("/api/chat", self.chat, methods=["POST"]),
            Route("/api/embed", self.embed, methods=["POST"]),
        ]

    async def version(self, request: Request) -> Response:
        from erllama import __version__

        return JSONResponse({"version": __version__})

    async def tags(self, request: Request) -> Response:
        models = await call(self.ctx.client.list_models)
        return JSONResponse({"models": [model_entry(m) for m in models]})

    async def ps(self, request: Request) -> Response:
        models = await call(self.ctx.client.list_models)
        out = []
        for m in models:
            if m.state != "ready":
                continue
            e = model_entry(m)
            e.update({"expires_at": "0001-01-01T00:00:00Z", "size_vram": m.vram_estimate_b})
            out.append(e)
        return JSONResponse({"models": out})

    async def generate(self, request: Request) -> Response:
        req = decode_body(await request.body(), GenerateRequest)
        opts = _options(req)
        if not req.prompt:  # Ollama's "load the model" request: nothing to generate
            await call(partial(self.ctx.client.model_info, req.model))
            return JSONResponse(
                {
                    "model": req.model,
                    "created_at": stamp(),
                    "response": "",
                    "done": True,
                    "done_reason": "load",
                }
            )
        if req.raw:
            opts.parse_special = True
            run = self.ctx.run(req.model, prompt=req.prompt, opts=opts)
        else:
            tmpl: dict[str, Any] = {"messages": [{"role": "user", "content": req.prompt}]}
            if req.system:
                tmpl["system"] = req.system
            tokens = await call(lambda: self.ctx.client.apply_chat_template(req.model, tmpl))
            run = self.ctx.run(req.model, tokens=tokens, opts=opts)
        return await self._answer(request, req, run, chat=False)

    async def chat(self, request: Request) -> Response:
        req = decode_body(await request.body(), ChatRequest)
        opts = _options(req)
        system = [m.content for m in req.messages if m.role == "system"]
        msgs = [{"role": m.role, "content": m.content} for m in req.messages if m.role != "system"]
        if not msgs:
            raise bad("messages: at least one user message")
        tmpl: dict[str, Any] = {"messages": msgs}
        if system:
            tmpl["system"] = "\n\n".join(system)
        tokens = await call(lambda: self.ctx.client.apply_chat_template(req.model, tmpl))
        run = self.ctx.run(req.model, tokens=tokens, opts=opts)
        return await self._answer(request, req, run, chat=True)

    def _piece(self, model: str, text: str, *, chat: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"model": model, "created_at": stamp()}
        if chat:
            out["message"] = {"role": "assistant", "content": text}
        else:
            out["response"] = text
        return out

    async def _answer(self, request: Request, req: Base, run: Run, *, chat: bool) -> Response:
        if not req.stream:
            reply = await self.ctx.collect(API, request, run)
            body = self._piece(req.model, reply.text, chat=chat)
            body.update(final_fields(reply.done, run))
            return JSONResponse(body)
        events = run.events()
        first = await self.ctx.first_event(API, run, events)

        async def lines() -> AsyncIterator[bytes]:
            ev = first
            try:
                while True:
                    if ev.kind == "token" and ev.text:
                        piece = self._piece(req.model, ev.text, chat=chat)
                        yield msgspec.json.encode({**piece, "done": False}) + b"\n"
                    elif ev.kind == "done":
                        assert ev.stats is not None
                        self.ctx.finished(API, run, ev.stats)
                        last = self._piece(req.model, "", chat=chat)
                        last.update(final_fields(ev.stats, run))
                        yield msgspec.json.encode(last) + b"\n"
                        break
                    ev = await anext(events)
            except ApiError as exc:
                self.ctx.failed(API, req.model, exc)
                yield msgspec.json.encode(exc.body(API)) + b"\n"
            except asyncio.CancelledError:  # the HTTP client left: the stream is cancelled
                self.ctx.failed(API, req.model, ClientGoneError())
                raise
            finally:
                await events.aclose()

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def embed(self, request: Request) -> Response:
        req = decode_body(await request.body(), EmbedRequest)
        keep_alive_s(req.keep_alive)
        inputs = [req.input] if isinstance(req.input, str) else req.input
        if not inputs:
            raise bad("input is empty")
        client, out, n = self.ctx.client, [], 0
        for text in inputs:
            toks = await call(partial(client.tokenize, req.model, text))
            out.append(await call(partial(client.embed, req.model, toks)))
            n += len(toks)
        return JSONResponse({"model": req.model, "embeddings": out, "prompt_eval_count": n})
