"""OpenAI's API: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``, ``/v1/embeddings``.

Chat messages are rendered through the model's chat template (``apply_chat_template``,
so the turn markers are special tokens) and generated from those tokens; a completion
prompt is text with its special-token markers parsed (as llama-server does) or a token
list. Streaming is SSE ending in ``data: [DONE]``; ``stream_options.include_usage`` adds
the usage chunk. ``usage.prompt_tokens_details.cached_tokens`` is the prompt tokens the
KV cache supplied (``cache_delta.read``). ``response_format`` ``json_object`` /
``json_schema`` constrain the reply with a grammar (``grammar.py``); ``tools`` are
folded into the template's system text and the model's tool-call spans (its
``tool_call_markers``) come back as ``tool_calls``. ``n`` other than 1, ``logprobs``
and ``echo`` are refused (400), never silently ignored.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from erllama.gateway import grammar
from erllama.gateway.common import (
    ClientGoneError,
    Ctx,
    GenOptions,
    Reply,
    Run,
    call,
    decode_body,
    new_id,
    now_s,
    stop_list,
    tool_call_of,
)
from erllama.gateway.errors import Api, ApiError, bad
from erllama.protocol.messages import Stats

API: Api = "openai"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Part(msgspec.Struct):
    type: str
    text: str | None = None


class Function(msgspec.Struct):
    name: str
    description: str = ""
    parameters: dict[str, Any] | None = None


class Tool(msgspec.Struct):
    type: str
    function: Function


class ChatMessage(msgspec.Struct):
    role: str
    content: str | list[Part] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class ResponseFormat(msgspec.Struct):
    type: str
    json_schema: dict[str, Any] | None = None


class Sampling(msgspec.Struct, kw_only=True):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logprobs: bool | int | None = None


class ChatRequest(Sampling, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None


class CompletionRequest(Sampling, kw_only=True):
    prompt: str | list[Any]  # a text, a list of one text, or token ids
    echo: bool = False
    suffix: str | None = None


class EmbeddingRequest(msgspec.Struct):
    model: str
    input: str | list[Any]  # a text, texts, token ids, or lists of token ids
    encoding_format: str = "float"


def _options(req: Sampling, max_tokens: int | None) -> GenOptions:
    if req.n != 1:
        raise bad("only n = 1 is supported", "n")
    if req.logprobs:
        raise bad("logprobs are not supported", "logprobs")
    return GenOptions(
        response_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        seed=req.seed,
        stop_sequences=stop_list(req.stop),
    )


def message_text(m: ChatMessage, i: int) -> str:
    """The text of one message (text parts joined; other parts are refused)."""
    if m.content is None:
        return ""
    if isinstance(m.content, str):
        return m.content
    out = []
    for part in m.content:
        if part.type != "text" or part.text is None:
            raise bad(f"messages[{i}]: only text content parts are supported", "messages")
        out.append(part.text)
    return "".join(out)


def chat_request(req: ChatRequest) -> dict[str, Any]:
    """The ``apply_chat_template`` request of a chat: system text folded, tools listed."""
    system: list[str] = []
    messages: list[dict[str, str]] = []
    for i, m in enumerate(req.messages):
        text = message_text(m, i)
        if m.role in ("system", "developer"):
            system.append(text)
        elif m.role == "tool":
            messages.append({"role": "user", "content": f"Tool result: {text}"})
        elif m.role in ("user", "assistant"):
            if m.role == "assistant" and m.tool_calls:
                calls = [json.dumps(c.get("function", c)) for c in m.tool_calls]
                text = (text + "\n" if text else "") + "\n".join(calls)
            messages.append({"role": m.role, "content": text})
        else:
            raise bad(f"messages[{i}].role {m.role!r} is not supported", "messages")
    if not messages:
        raise bad("messages needs at least one user message", "messages")
    out: dict[str, Any] = {"messages": messages}
    if system:
        out["system"] = "\n\n".join(system)
    if req.tools and req.tool_choice != "none":
        out["tools"] = [
            {
                "name": t.function.name,
                "description": t.function.description,
                "schema": t.function.parameters or {},
            }
            for t in req.tools
        ]
    return out


def token_list(value: Any, name: str) -> list[int]:
    """A list of token ids (400 naming ``name`` for anything else)."""
    if not isinstance(value, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value
    ):
        raise bad(f"{name} must be a text, a list of texts or a list of token ids", name)
    return value


def usage(stats: Stats) -> dict[str, Any]:
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "total_tokens": stats.prompt_tokens + stats.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": stats.cache_delta.read},
    }


def finish_reason(stats: Stats, tool_calls: bool = False) -> str:
    if tool_calls:
        return "tool_calls"
    return "length" if stats.finish_reason == "length" else "stop"


def tool_calls_json(spans: list[str]) -> list[dict[str, Any]]:
    out = []
    for i, span in enumerate(spans):
        name, args = tool_call_of(span)
        out.append(
            {
                "id": f"call_{i}_{new_id('')[:12]}",
                "type": "function",
                "index": i,
                "function": {"name": name, "arguments": args},
            }
        )
    return out


def sse(obj: Any) -> bytes:
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


class OpenAI:
    """The OpenAI routes over one ``Ctx``."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx

    def routes(self) -> list[Route]:
        return [
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/embeddings", self.embeddings, methods=["POST"]),
        ]

    async def models(self, request: Request) -> Response:
        models = await call(self.ctx.client.list_models)
        data = [
            {"id": m.id, "object": "model", "created": 0, "owned_by": "erllama"} for m in models
        ]
        return JSONResponse({"object": "list", "data": data})

    async def model(self, request: Request) -> Response:
        model = request.path_params["model"]
        await call(lambda: self.ctx.client.model_info(model))
        return JSONResponse({"id": model, "object": "model", "created": 0, "owned_by": "erllama"})

    async def chat(self, request: Request) -> Response:
        req = decode_body(await request.body(), ChatRequest)
        opts = _options(req, req.max_completion_tokens or req.max_tokens)
        if req.response_format is not None:
            opts.grammar = grammar.for_response_format(
                req.response_format.type, req.response_format.json_schema
            )
        tmpl = chat_request(req)
        tokens = await call(lambda: self.ctx.client.apply_chat_template(req.model, tmpl))
        run = self.ctx.run(req.model, tokens=tokens, opts=opts)
        return await self._answer(request, req, run, chat=True)

    async def completions(self, request: Request) -> Response:
        req = decode_body(await request.body(), CompletionRequest)
        if req.echo or req.suffix:
            raise bad("echo and suffix are not supported", "echo" if req.echo else "suffix")
        opts = _options(req, req.max_tokens if req.max_tokens is not None else 16)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise bad("one prompt per request (a list of one string)", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            opts.parse_special = True
            run = self.ctx.run(req.model, prompt=prompt, opts=opts)
        else:
            run = self.ctx.run(req.model, tokens=token_list(prompt, "prompt"), opts=opts)
        return await self._answer(request, req, run, chat=False)

    async def _answer(self, request: Request, req: Sampling, run: Run, *, chat: bool) -> Response:
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await self._stream(run, req.model, include_usage, chat=chat)
        reply = await self.ctx.collect(API, request, run)
        return JSONResponse(self._body(req.model, reply, chat=chat))

    def _body(self, model: str, reply: Reply, *, chat: bool) -> dict[str, Any]:
        stats = reply.done
        if chat:
            message: dict[str, Any] = {"role": "assistant", "content": reply.text}
            if reply.tool_calls:
                message["tool_calls"] = tool_calls_json(reply.tool_calls)
            reason = finish_reason(stats, bool(reply.tool_calls))
            choice: dict[str, Any] = {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": reason,
            }
            obj, prefix = "chat.completion", "chatcmpl-"
        else:
            choice = {
                "index": 0,
                "text": reply.text,
                "logprobs": None,
                "finish_reason": finish_reason(stats),
            }
            obj, prefix = "text_completion", "cmpl-"
        return {
            "id": new_id(prefix),
            "object": obj,
            "created": now_s(),
            "model": model,
            "choices": [choice],
            "usage": usage(stats),
        }

    async def _stream(self, run: Run, model: str, include_usage: bool, *, chat: bool) -> Response:
        events = run.events()
        first = await self.ctx.first_event(API, run, events)
        rid, created = new_id("chatcmpl-" if chat else "cmpl-"), now_s()
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: dict[str, Any] | str, finish: str | None) -> dict[str, Any]:
            if chat:
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish}
            return {
                "id": rid,
                "object": obj,
                "created": created,
                "model": model,
                "choices": [choice],
            }

        # a token's chunk is the same bytes as ``sse(chunk(...))`` with only the text
        # changing: its head and tail are encoded once per stream, not once per token
        head, tail = sse(chunk({"content": ""} if chat else "", None)).rsplit(b'""', 1)

        def token_sse(text: str) -> bytes:
            return head + msgspec.json.encode(text) + tail

        async def body() -> AsyncIterator[bytes]:
            if chat:
                yield sse(chunk({"role": "assistant", "content": ""}, None))
            spans: list[str] = []
            ev = first
            try:
                while True:
                    if ev.kind == "token" and ev.text:
                        yield token_sse(ev.text)
                    elif ev.kind == "tool_call_end" and chat:
                        spans.append(ev.text or "")
                        call_json = tool_calls_json([ev.text or ""])[0]
                        call_json["index"] = len(spans) - 1
                        yield sse(chunk({"tool_calls": [call_json]}, None))
                    elif ev.kind == "done":
                        assert ev.stats is not None
                        self.ctx.finished(API, run, ev.stats)
                        reason = finish_reason(ev.stats, bool(spans))
                        yield sse(chunk({} if chat else "", reason))
                        if include_usage:
                            u = {
                                "id": rid,
                                "object": obj,
                                "created": created,
                                "model": model,
                                "choices": [],
                                "usage": usage(ev.stats),
                            }
                            yield sse(u)
                        break
                    ev = await anext(events)
            except ApiError as exc:
                self.ctx.failed(API, model, exc)
                yield sse(exc.body(API))
            except asyncio.CancelledError:  # the HTTP client left: the stream is cancelled
                self.ctx.failed(API, model, ClientGoneError())
                raise
            finally:
                await events.aclose()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)

    async def embeddings(self, request: Request) -> Response:
        req = decode_body(await request.body(), EmbeddingRequest)
        if req.encoding_format not in ("float", "base64"):
            raise bad("encoding_format must be float or base64", "encoding_format")
        client = self.ctx.client
        inputs: list[str | list[int]]
        raw = req.input
        if isinstance(raw, str):
            inputs = [raw]
        elif raw and isinstance(raw[0], int):
            inputs = [token_list(raw, "input")]
        else:
            inputs = [x if isinstance(x, str) else token_list(x, "input") for x in raw]
        if not inputs:
            raise bad("input is empty", "input")
        data, n_tokens = [], 0
        for i, item in enumerate(inputs):
            toks = (
                await call(partial(client.tokenize, req.model, item))
                if isinstance(item, str)
                else item
            )
            vec = await call(partial(client.embed, req.model, toks))
            n_tokens += len(toks)
            out: list[float] | str = vec
            if req.encoding_format == "base64":  # little-endian float32, as OpenAI sends it
                out = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
            data.append({"object": "embedding", "index": i, "embedding": out})
        use = {"prompt_tokens": n_tokens, "total_tokens": n_tokens}
        return JSONResponse({"object": "list", "data": data, "model": req.model, "usage": use})
