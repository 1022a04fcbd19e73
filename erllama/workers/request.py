"""One request: admission (validation), the engine's per-request state, its result.

``admit`` runs when the request arrives (so bad input is answered at once,
not after the requests queued before it) and either returns a ``Request`` or
raises ``InvalidRequestError`` with a stable code:

* ``bad_request``: neither ``prompt`` nor ``tokens``, or token bytes whose
  length is not a multiple of 4;
* ``empty_prefix``: an empty token list (or a prompt that tokenizes to nothing);
* ``invalid_token``: a token id >= ``n_vocab``;
* ``tokenize_failed``: the backend tokenizer raised;
* ``context_overflow``: ``len(prompt) >= n_ctx`` (no room for one token);
* ``badarg``: ``response_tokens <= 0``, or a sampler value that is not finite.

``response_tokens`` defaults to ``spec.default_response_tokens`` for
``complete`` / ``stream`` and to 64 for ``infer`` (REFERENCE §1.4), and is
always capped at ``n_ctx - len(prompt)`` (D9). Stop sequences that are not
non-empty strings are dropped (§8.7). ``thinking="enabled"`` and
``thinking_budget_tokens`` (``badarg`` unless > 0) take effect on models with
``thinking_markers`` (``workers/spans.py``). ``response_tokens`` counts the
*visible* generated tokens there; thinking tokens are bounded by the budget
and by the context (``hit_length``: the reply was cut at a limit).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from erllama.config import ModelSpec
from erllama.protocol.errors import ErllamaError, ErrorCode, InvalidRequestError
from erllama.protocol.messages import (
    CacheDelta,
    Complete,
    CompletionResult,
    FinishReason,
    HitKind,
    Stats,
)
from erllama.protocol.tokens import pack_tokens, unpack_tokens
from erllama.workers.backend import BackendInfo, ModelBackend, SamplerOptions

INFER_DEFAULT_RESPONSE_TOKENS = 64


@dataclass(eq=False)
class Request:
    """One admitted request and everything the engine learns while serving it."""

    client_id: bytes
    request_id: str
    mode: str  # complete | stream | infer
    prompt: list[int]
    max_tokens: int
    sampler_opts: SamplerOptions
    stop_sequences: list[str]
    parent_key: bytes | None
    session_id: str | None
    received_at: float
    admitted_at: float = 0.0
    prefill_done_at: float | None = None
    cancelled: bool = False
    generated: list[int] = field(default_factory=list)
    stop_sequence: str | None = None
    kind: HitKind = "cold"
    read: int = 0  # cache_delta.read: prompt tokens reused (not prefilled)
    created: int = 0  # cache_delta.created
    last_save_at: int = 0  # what of the live context is already cached (D15)
    counters: Counter[str] = field(default_factory=Counter)
    first_logits: bytes | None = None  # stored logits of the prompt's end: sample, don't re-decode
    thinking: bool = False  # thinking="enabled" (spans.py)
    thinking_budget: int | None = None  # thinking_budget_tokens
    hit_length: bool = False  # generation stopped at a limit (finish_reason "length")
    _seq: int = 0

    @property
    def streaming(self) -> bool:
        return self.mode in ("stream", "infer")

    def next_seq(self) -> int:
        """The ``seq`` of the next stream event."""
        self._seq += 1
        return self._seq - 1


def _bad(code: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(message, code=code)


def _prompt_tokens(msg: Complete, info: BackendInfo, backend: ModelBackend) -> list[int]:
    if msg.tokens is not None:
        tokens = unpack_tokens(msg.tokens)  # bad_request on a ragged length
        if not tokens:
            raise _bad(ErrorCode.EMPTY_PREFIX, "the token list is empty")
        top = max(tokens)
        if top >= info.n_vocab:
            raise _bad(ErrorCode.INVALID_TOKEN, f"token {top} is not below n_vocab {info.n_vocab}")
        return tokens
    if msg.prompt is None:
        raise _bad(ErrorCode.BAD_REQUEST, "a request needs a prompt or tokens")
    try:
        tokens = backend.tokenize(
            msg.prompt, add_special=True, parse_special=msg.options.parse_special
        )
    except ErllamaError:
        raise
    except Exception as exc:
        raise _bad(ErrorCode.TOKENIZE_FAILED, f"tokenize failed: {exc}") from None
    if not tokens:
        raise _bad(ErrorCode.EMPTY_PREFIX, "the prompt tokenizes to nothing")
    return tokens


def _sampler_options(msg: Complete) -> SamplerOptions:
    o = msg.options
    for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
        value = getattr(o, name)
        if value is not None and not math.isfinite(value):
            raise _bad(ErrorCode.BADARG, f"{name} must be a finite number")
    return SamplerOptions(
        temperature=o.temperature,
        top_k=o.top_k,
        top_p=o.top_p,
        min_p=o.min_p,
        repetition_penalty=o.repetition_penalty,
        seed=o.seed,
        grammar=o.grammar,
    )


def admit(
    client_id: bytes,
    msg: Complete,
    info: BackendInfo,
    spec: ModelSpec,
    backend: ModelBackend,
    now: float,
) -> Request:
    """Validate ``msg`` into a ``Request`` (see the module docstring for the codes)."""
    prompt = _prompt_tokens(msg, info, backend)
    n_ctx = info.n_ctx
    if len(prompt) >= n_ctx:
        raise _bad(
            ErrorCode.CONTEXT_OVERFLOW,
            f"prompt of {len(prompt)} tokens leaves no room in n_ctx {n_ctx}",
        )
    o = msg.options
    if o.response_tokens is not None and o.response_tokens <= 0:
        raise _bad(ErrorCode.BADARG, "response_tokens must be > 0")
    default = INFER_DEFAULT_RESPONSE_TOKENS if msg.mode == "infer" else spec.default_response_tokens
    max_tokens = min(o.response_tokens or default, n_ctx - len(prompt))
    stops = [s for s in (o.stop_sequences or []) if isinstance(s, str) and s]
    if o.thinking_budget_tokens is not None and o.thinking_budget_tokens <= 0:
        raise _bad(ErrorCode.BADARG, "thinking_budget_tokens must be > 0")
    return Request(
        client_id=client_id,
        request_id=msg.request_id,
        mode=msg.mode,
        prompt=prompt,
        max_tokens=max_tokens,
        sampler_opts=_sampler_options(msg),
        stop_sequences=stops,
        parent_key=o.parent_key,
        session_id=o.session_id,
        received_at=now,
        thinking=o.thinking == "enabled",
        thinking_budget=o.thinking_budget_tokens,
    )


def finish_reason(req: Request) -> FinishReason:
    """REFERENCE §1.5: cancelled, else stop (a stop string), else length, else stop (EOG)."""
    if req.cancelled:
        return "cancelled"
    if req.stop_sequence is not None:
        return "stop"
    if len(req.generated) >= req.max_tokens or req.hit_length:
        return "length"
    return "stop"


def build_stats(req: Request, now: float, finish_key: bytes | None, committed: int) -> Stats:
    """The stats map (also the ``done`` payload). ``prefill_ms`` runs from admission to
    the end of the prefill (the first token can be sampled), ``generation_ms`` from there."""
    admitted = req.admitted_at or now
    prefill_end = req.prefill_done_at or now
    return Stats(
        prompt_tokens=len(req.prompt),
        completion_tokens=len(req.generated),
        prefill_ms=(prefill_end - admitted) * 1000.0,
        generation_ms=(now - prefill_end) * 1000.0,
        cache_hit_kind=req.kind,
        finish_reason=finish_reason(req),
        cancelled=req.cancelled,
        finish_key=finish_key,
        committed_tokens=committed,
        cache_delta=CacheDelta(read=req.read, created=req.created),
        stop_sequence=req.stop_sequence,
    )


def build_result(req: Request, stats: Stats, reply: str, context: list[int]) -> CompletionResult:
    """``complete``'s result; ``reply`` is already cut at the stop string."""
    return CompletionResult(
        reply=reply,
        generated=pack_tokens(req.generated),
        context_tokens=pack_tokens(context),
        committed_tokens=len(context),
        finish_key=stats.finish_key,
        cache_hit_kind=req.kind,
        finish_reason=stats.finish_reason,
        cache_delta=stats.cache_delta,
        stats=stats,
        stop_sequence=req.stop_sequence,
    )
