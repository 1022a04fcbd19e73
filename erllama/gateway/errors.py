"""Error codes -> HTTP status, and the error body of each API.

One table (``STATUS``) decides the status of every daemon error code; codes not in it are
500. ``Retry-After`` goes with 429 and 503 (a full queue, a worker restarting, a stopping
daemon). Each API wraps the same ``ApiError`` in its own shape: OpenAI's
``{"error": {message, type, param, code}}``, Anthropic's ``{"type": "error", "error":
{type, message}}``, Ollama's ``{"error": message}``.
"""

from __future__ import annotations

from typing import Any, Literal

from erllama.protocol.errors import ErllamaError, ErrorCode

Api = Literal["openai", "anthropic", "ollama"]

STATUS: dict[str, int] = {
    **dict.fromkeys(
        [
            ErrorCode.BAD_REQUEST,
            ErrorCode.BADARG,
            ErrorCode.CONTEXT_OVERFLOW,
            ErrorCode.EMPTY_PREFIX,
            ErrorCode.INVALID_TOKEN,
            ErrorCode.INVALID_CONTENT,
            ErrorCode.GRAMMAR_FAILED,
            ErrorCode.TOKENIZE_FAILED,
            ErrorCode.BATCH_OVERFLOW,
            ErrorCode.THINKING_NOT_ENABLED,
            ErrorCode.NO_TEMPLATE,
            ErrorCode.TEMPLATE_FAILED,
            ErrorCode.NOT_SUPPORTED,
            ErrorCode.EMBED_FAILED,
            ErrorCode.MALFORMED,
        ],
        400,
    ),
    ErrorCode.TOO_LARGE: 413,
    **dict.fromkeys([ErrorCode.MODEL_NOT_LOADED, ErrorCode.NOPROC, ErrorCode.NOT_FOUND], 404),
    **dict.fromkeys([ErrorCode.BUSY, ErrorCode.STICKY_BUSY, ErrorCode.SEQ_CAPACITY], 429),
    **dict.fromkeys(
        [ErrorCode.WORKER_CRASHED, ErrorCode.SHUTTING_DOWN, ErrorCode.DAEMON_UNAVAILABLE], 503
    ),
    ErrorCode.TIMEOUT: 504,
    "unauthorized": 401,
    "method_not_allowed": 405,
}
RETRY_AFTER_S = 1

_OPENAI_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
_ANTHROPIC_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


class ApiError(Exception):
    """An error answered to an HTTP client: a stable code, a message, its status."""

    def __init__(self, code: str, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.status = STATUS.get(code, 500)

    @classmethod
    def of(cls, exc: ErllamaError) -> ApiError:
        return cls(exc.code, exc.message)

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(RETRY_AFTER_S)} if self.status in (429, 503) else {}

    def body(self, api: Api) -> dict[str, Any]:
        if api == "anthropic":
            kind = _ANTHROPIC_TYPE.get(self.status, "api_error")
            return {"type": "error", "error": {"type": kind, "message": self.message}}
        if api == "ollama":
            return {"error": self.message}
        code: str = self.code
        if code == ErrorCode.CONTEXT_OVERFLOW:
            code = "context_length_exceeded"  # OpenAI's code for the same error
        kind = _OPENAI_TYPE.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": code}}


def bad(message: str, param: str | None = None) -> ApiError:
    """A 400 for a request field (``badarg``)."""
    return ApiError(ErrorCode.BADARG, message, param=param)
