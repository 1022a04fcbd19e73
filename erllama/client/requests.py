"""The requests of the client: one builder per operation, and the parsers of their replies.

A client operation is a ``Call``: the request message (with a fresh request id)
plus the function that turns the ``Reply.result`` payload into the value the
method returns. Streams are ``Complete`` requests in mode ``stream`` or
``infer``, returned bare; their replies become ``Event`` objects (``_core``).
``draft_tokens`` is built here too, client-side over ``infer``, as upstream's
facade does it (workers/speculative.py).

Turned down: defaulting options on the client side (``response_tokens`` and
friends are defaulted by the worker, from the model's config).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

import msgspec

from erllama.client.models import Completion
from erllama.client.options import (
    build_options,
    chat_request,
    check_scale,
    check_str,
    check_threshold,
    check_tokens,
)
from erllama.protocol.codec import decode_result
from erllama.protocol.errors import ErllamaError, ErrorCode, InvalidRequestError, ProtocolError
from erllama.protocol.messages import (
    AdapterInfo,
    ApplyChatTemplate,
    Cancel,
    Complete,
    CompletionResult,
    DaemonStatus,
    Detokenize,
    Embed,
    EnableScheduler,
    Evict,
    ForceSchedulerCheck,
    GetCounters,
    GetDaemonStatus,
    GetModelInfo,
    GetSchedulerStatus,
    GetStatusRow,
    GetVramInfo,
    ListAdapters,
    ListCachedPrefixes,
    ListModels,
    LoadAdapter,
    LoadModel,
    ModelInfo,
    ModelStatus,
    Msg,
    PrefillResult,
    QueueDepth,
    RequestOptions,
    SchedulerCheck,
    SchedulerStatus,
    SetAdapterScale,
    SetSchedulerThresholds,
    ShutdownModel,
    StatusRow,
    Tokenize,
    Unload,
    UnloadAdapter,
    Verify,
    VerifyResult,
)
from erllama.protocol.tokens import unpack_tokens

T = TypeVar("T")

# draft_tokens (REFERENCE §1.2): upstream's facade waits 30 s for the draft, then cancels
DRAFT_TIMEOUT_S = 30.0
DRAFT_DEFAULT_TOKENS = 64
_K_MAX = 2**31 - 1  # verify's k: K' = min(k, len(candidates)), so a larger k means the same


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One request and how to read its successful reply."""

    msg: Msg
    parse: Callable[[msgspec.Raw], T]
    # a Complete: send Cancel(target=request_id) if the caller stops waiting
    cancellable: bool = False
    # answer a request error with a default value instead of raising (lock-free status reads)
    on_error: Callable[[ErllamaError], T] | None = None

    @property
    def request_id(self) -> str:
        return self.msg.request_id


def new_request_id() -> str:
    """A fresh request id (uuid4 hex)."""
    return uuid.uuid4().hex


# ================================================================ result parsers
def _ignore(raw: msgspec.Raw) -> None:
    return None


def _decode(raw: msgspec.Raw, type_: Any) -> Any:
    return decode_result(raw, type_)


def _parser(type_: Any) -> Callable[[msgspec.Raw], Any]:
    def parse(raw: msgspec.Raw) -> Any:
        return _decode(raw, type_)

    return parse


def _parse_model_id(raw: msgspec.Raw) -> str:
    value: str | dict[str, Any] = _decode(raw, str | dict[str, Any])
    if isinstance(value, str):
        return value
    model_id = value.get("id", value.get("model_id"))
    if not isinstance(model_id, str):
        raise ProtocolError("load_model reply carries no model id", code=ErrorCode.MALFORMED)
    return model_id


def _parse_tokens(raw: msgspec.Raw) -> list[int]:
    value: bytes | list[int] = _decode(raw, bytes | list[int])
    if isinstance(value, bytes):
        try:
            return unpack_tokens(value)
        except InvalidRequestError as exc:
            raise ProtocolError(f"bad token payload: {exc.message}") from None
    return value


def _parse_adapters(raw: msgspec.Raw) -> list[dict[str, Any]]:
    return [{"handle": a.handle, "scale": a.scale} for a in _decode(raw, list[AdapterInfo])]


def completion_from(result: CompletionResult, request_id: str = "") -> Completion:
    """Turn the wire result of ``complete`` into a ``Completion``.

    Raises:
        ProtocolError: the token payloads are not packed u32.
    """
    try:
        generated = unpack_tokens(result.generated)
        context = unpack_tokens(result.context_tokens)
    except InvalidRequestError as exc:
        raise ProtocolError(f"bad token payload: {exc.message}") from None
    return Completion(
        reply=result.reply,
        generated=generated,
        context_tokens=context,
        committed_tokens=result.committed_tokens,
        finish_key=result.finish_key,
        cache_hit_kind=result.cache_hit_kind,
        finish_reason=result.finish_reason,
        stop_sequence=result.stop_sequence,
        cache_delta=result.cache_delta,
        stats=result.stats,
        request_id=request_id,
    )


# ================================================================ the builders
class Requests:
    """One builder per client operation; each checks its arguments and returns the request."""

    def load_model(self, config: Mapping[str, Any] | None, model_id: str | None) -> Call[str]:
        if config is None:
            config = {}
        if not isinstance(config, Mapping):
            raise InvalidRequestError(
                f"config must be a dict, not {type(config).__name__}", code=ErrorCode.BAD_REQUEST
            )
        if model_id is not None:
            check_str("model_id", model_id)
        msg = LoadModel(request_id=new_request_id(), config=dict(config), model_id=model_id)
        return Call(msg, _parse_model_id)

    def unload(self, model: str) -> Call[None]:
        return Call(Unload(request_id=new_request_id(), model=check_str("model", model)), _ignore)

    def list_models(self) -> Call[list[ModelInfo]]:
        return Call(ListModels(request_id=new_request_id()), _parser(list[ModelInfo]))

    def model_info(self, model: str) -> Call[ModelInfo]:
        msg = GetModelInfo(request_id=new_request_id(), model=check_str("model", model))
        return Call(msg, _parser(ModelInfo))

    def complete(self, model: str, prompt: str, opts: Mapping[str, Any]) -> Call[Completion]:
        msg = Complete(
            request_id=new_request_id(),
            model=check_str("model", model),
            mode="complete",
            prompt=check_str("prompt", prompt),
            options=build_options(opts),
        )

        def parse(raw: msgspec.Raw) -> Completion:
            return completion_from(decode_result(raw, CompletionResult), msg.request_id)

        return Call(msg, parse, cancellable=True)

    def stream(self, model: str, prompt: str, opts: Mapping[str, Any]) -> Complete:
        return Complete(
            request_id=new_request_id(),
            model=check_str("model", model),
            mode="stream",
            prompt=check_str("prompt", prompt),
            options=build_options(opts),
        )

    def infer(self, model: str, tokens: Sequence[int], params: Mapping[str, Any]) -> Complete:
        return Complete(
            request_id=new_request_id(),
            model=check_str("model", model),
            mode="infer",
            tokens=check_tokens(tokens),
            options=build_options(params),
        )

    def prefill_only(
        self, model: str, tokens: Sequence[int], opts: Mapping[str, Any]
    ) -> Call[PrefillResult]:
        msg = Complete(
            request_id=new_request_id(),
            model=check_str("model", model),
            mode="prefill",
            tokens=check_tokens(tokens),
            options=build_options(opts),
        )
        return Call(msg, _parser(PrefillResult), cancellable=True)

    @staticmethod
    def cancel_msg(target: str) -> Cancel:
        return Cancel(request_id=new_request_id(), target=target)

    def cancel(self, request_id: str) -> Call[None]:
        return Call(self.cancel_msg(check_str("request_id", request_id)), _ignore)

    def tokenize(self, model: str, text: str, *, parse_special: bool = False) -> Call[list[int]]:
        if not isinstance(parse_special, bool):
            raise InvalidRequestError("parse_special must be a bool", code=ErrorCode.BADARG)
        msg = Tokenize(
            request_id=new_request_id(),
            model=check_str("model", model),
            text=check_str("text", text),
            parse_special=parse_special,
        )
        return Call(msg, _parse_tokens)

    def detokenize(self, model: str, tokens: Sequence[int]) -> Call[str]:
        msg = Detokenize(
            request_id=new_request_id(),
            model=check_str("model", model),
            tokens=check_tokens(tokens),
        )
        return Call(msg, _parser(str))

    def counters(self) -> Call[dict[str, int]]:
        return Call(GetCounters(request_id=new_request_id()), _parser(dict[str, int]))

    def vram_info(self) -> Call[dict[str, int]]:
        return Call(GetVramInfo(request_id=new_request_id()), _parser(dict[str, int]))

    def scheduler_status(self) -> Call[SchedulerStatus]:
        return Call(GetSchedulerStatus(request_id=new_request_id()), _parser(SchedulerStatus))

    def enable_scheduler(self, enabled: bool) -> Call[SchedulerStatus]:
        msg = EnableScheduler(request_id=new_request_id(), enabled=enabled)
        return Call(msg, _parser(SchedulerStatus))

    def set_scheduler_thresholds(self, high: object, low: object) -> Call[SchedulerStatus]:
        """Only the types are checked here; the range (``0 <= low < high <= 1``) is the
        scheduler's, with the config's own check (``bad_thresholds`` either way)."""
        msg = SetSchedulerThresholds(
            request_id=new_request_id(),
            high=check_threshold("high", high),
            low=check_threshold("low", low),
        )
        return Call(msg, _parser(SchedulerStatus))

    def force_scheduler_check(self) -> Call[SchedulerCheck]:
        return Call(ForceSchedulerCheck(request_id=new_request_id()), _parser(SchedulerCheck))

    def status_row(self, model: str) -> Call[StatusRow]:
        """``phase`` / ``pending_len`` / ``last_cache_hit``: an unknown model reads as idle."""
        model = check_str("model", model)

        def default(exc: ErllamaError) -> StatusRow:
            if exc.code in (ErrorCode.MODEL_NOT_LOADED, ErrorCode.NOPROC, ErrorCode.NOT_FOUND):
                return StatusRow(model=model)
            raise exc

        msg = GetStatusRow(request_id=new_request_id(), model=model)
        return Call(msg, _parser(StatusRow), on_error=default)

    def queue_depth(self, model: str | None) -> Call[int]:
        if model is not None:
            check_str("model", model)
        return Call(QueueDepth(request_id=new_request_id(), model=model), _parser(int))

    def list_cached_prefixes(self, model: str, tokens: Sequence[int]) -> Call[int]:
        msg = ListCachedPrefixes(
            request_id=new_request_id(),
            model=check_str("model", model),
            tokens=check_tokens(tokens),
        )
        return Call(msg, _parser(int))

    def status(self, model: str) -> Call[str]:
        msg = ModelStatus(request_id=new_request_id(), model=check_str("model", model))
        return Call(msg, _parser(str))

    def evict(self, model: str) -> Call[None]:
        return Call(Evict(request_id=new_request_id(), model=check_str("model", model)), _ignore)

    def shutdown(self, model: str) -> Call[None]:
        msg = ShutdownModel(request_id=new_request_id(), model=check_str("model", model))
        return Call(msg, _ignore)

    def daemon_status(self) -> Call[DaemonStatus]:
        return Call(GetDaemonStatus(request_id=new_request_id()), _parser(DaemonStatus))

    def apply_chat_template(self, model: str, request: Mapping[str, Any]) -> Call[list[int]]:
        msg = ApplyChatTemplate(
            request_id=new_request_id(), model=check_str("model", model), **chat_request(request)
        )
        return Call(msg, _parse_tokens)

    def embed(self, model: str, tokens: Sequence[int]) -> Call[list[float]]:
        msg = Embed(
            request_id=new_request_id(),
            model=check_str("model", model),
            tokens=check_tokens(tokens),
        )
        return Call(msg, _parser(list[float]))

    def load_adapter(self, model: str, path: str | os.PathLike[str]) -> Call[str]:
        if not isinstance(path, str | os.PathLike):
            raise InvalidRequestError(
                f"path must be a str or a path, not {type(path).__name__}",
                code=ErrorCode.BADARG,
            )
        msg = LoadAdapter(
            request_id=new_request_id(), model=check_str("model", model), path=os.fspath(path)
        )
        return Call(msg, _parser(str))

    def unload_adapter(self, model: str, handle: str) -> Call[None]:
        msg = UnloadAdapter(
            request_id=new_request_id(),
            model=check_str("model", model),
            handle=check_str("handle", handle),
        )
        return Call(msg, _ignore)

    def set_adapter_scale(self, model: str, handle: str, scale: float) -> Call[None]:
        msg = SetAdapterScale(
            request_id=new_request_id(),
            model=check_str("model", model),
            handle=check_str("handle", handle),
            scale=check_scale(scale),
        )
        return Call(msg, _ignore)

    def list_adapters(self, model: str) -> Call[list[dict[str, Any]]]:
        msg = ListAdapters(request_id=new_request_id(), model=check_str("model", model))
        return Call(msg, _parse_adapters)

    # ---------------------------------------------------------------- speculative decoding
    def draft_tokens(self, model: str, prefix: Sequence[int], max_tokens: object) -> Complete:
        """The greedy ``infer`` of a draft: ``response_tokens = max_tokens`` (64 if None).

        Raises:
            InvalidRequestError: ``empty_prefix``; ``badarg`` for ``max_tokens <= 0``;
                ``bad_request`` for a ``max_tokens`` that is not an int.
        """
        tokens = check_tokens(prefix)
        if not tokens:
            raise InvalidRequestError("the prefix is empty", code=ErrorCode.EMPTY_PREFIX)
        if max_tokens is None:
            n = DRAFT_DEFAULT_TOKENS
        elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
            raise InvalidRequestError(
                f"max must be an int or None, not {type(max_tokens).__name__}",
                code=ErrorCode.BAD_REQUEST,
            )
        elif max_tokens <= 0:
            raise InvalidRequestError(f"max must be > 0, got {max_tokens}", code=ErrorCode.BADARG)
        else:
            n = min(max_tokens, _K_MAX)
        return Complete(
            request_id=new_request_id(),
            model=check_str("model", model),
            mode="infer",
            tokens=tokens,
            options=RequestOptions(response_tokens=n),
        )

    def verify(
        self, model: str, prefix: Sequence[int], candidates: Sequence[int], k: object
    ) -> Call[tuple[int, int | Literal["eos"]]]:
        if isinstance(k, bool) or not isinstance(k, int):
            raise InvalidRequestError(
                f"k must be an int, not {type(k).__name__}", code=ErrorCode.BAD_REQUEST
            )
        if k <= 0:
            raise InvalidRequestError(f"k must be > 0, got {k}", code=ErrorCode.BADARG)
        packed = check_tokens(prefix)
        if not packed:
            raise InvalidRequestError("the prefix is empty", code=ErrorCode.EMPTY_PREFIX)
        msg = Verify(
            request_id=new_request_id(),
            model=check_str("model", model),
            prefix=packed,
            candidates=check_tokens(candidates),
            k=min(k, _K_MAX),
        )

        def parse(raw: msgspec.Raw) -> tuple[int, int | Literal["eos"]]:
            r = decode_result(raw, VerifyResult)
            return r.accepted, "eos" if r.eos else r.next_token

        return Call(msg, parse)
