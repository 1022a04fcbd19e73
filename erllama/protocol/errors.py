"""Error codes and the exception tree shared by every process and the client.

Codes are stable snake_case strings. Where upstream erllama has a name, the
same name is used; the rest are ours. A code is never reused for another
meaning.

Exception tree (catch a family, or ``ErllamaError`` for everything)::

    ErllamaError                       .code, .message, .detail
    ├── RequestError                   the request was refused; nothing broke
    │   ├── InvalidRequestError        bad_request, badarg, bad_thresholds, too_large, enoent, ...
    │   ├── UnknownModelError          model_not_loaded, noproc, not_found
    │   ├── ConflictError              already_loaded, busy, sticky_busy, seq_capacity, conflict
    │   ├── NotSupportedError          not_supported, no_gpu
    │   └── ModelLoadError             load_failed, malformed_gguf, context_failed, oom, failed,
    │                                  adapter_lost
    ├── WorkerCrashedError             worker_crashed (the model process died mid-request)
    ├── ProtocolError                  unsupported_version, malformed
    ├── InternalError                  internal
    └── TransportError                 the daemon could not be reached or did not answer
        ├── DaemonUnavailableError     daemon_unavailable
        └── RequestTimeoutError        timeout
"""

from __future__ import annotations

import enum
from typing import Any


class ErrorCode(enum.StrEnum):
    """Every error code that can cross the wire."""

    # request validation
    BAD_REQUEST = "bad_request"
    BADARG = "badarg"
    TOO_LARGE = "too_large"
    CONTEXT_OVERFLOW = "context_overflow"
    EMPTY_PREFIX = "empty_prefix"
    INVALID_TOKEN = "invalid_token"
    INVALID_CONTENT = "invalid_content"
    GRAMMAR_FAILED = "grammar_failed"
    TOKENIZE_FAILED = "tokenize_failed"
    BATCH_OVERFLOW = "batch_overflow"
    THINKING_NOT_ENABLED = "thinking_not_enabled"
    BAD_THRESHOLDS = "bad_thresholds"  # set_scheduler_thresholds: need 0 <= low < high <= 1
    # file errors (upstream passes the POSIX reason of a file it cannot read: load_adapter)
    ENOENT = "enoent"
    EACCES = "eacces"
    EISDIR = "eisdir"
    # lookup
    MODEL_NOT_LOADED = "model_not_loaded"
    NOPROC = "noproc"
    NOT_FOUND = "not_found"
    # conflicts
    ALREADY_LOADED = "already_loaded"
    BUSY = "busy"
    STICKY_BUSY = "sticky_busy"
    SEQ_CAPACITY = "seq_capacity"
    CONFLICT = "conflict"
    ALREADY_PRESENT = "already_present"
    EXPIRED = "expired"
    # capability
    NOT_SUPPORTED = "not_supported"
    NO_GPU = "no_gpu"
    NO_TEMPLATE = "no_template"
    TEMPLATE_FAILED = "template_failed"
    EMBED_FAILED = "embed_failed"
    # model load
    LOAD_FAILED = "load_failed"
    MALFORMED_GGUF = "malformed_gguf"
    CONTEXT_FAILED = "context_failed"
    OOM = "oom"
    FAILED = "failed"
    ADAPTER_LOST = "adapter_lost"  # a restart cannot attach an adapter again (file gone/changed)
    # process / transport
    WORKER_CRASHED = "worker_crashed"
    UNSUPPORTED_VERSION = "unsupported_version"
    MALFORMED = "malformed"
    INTERNAL = "internal"
    TIMEOUT = "timeout"
    DAEMON_UNAVAILABLE = "daemon_unavailable"
    SHUTTING_DOWN = "shutting_down"


class ErllamaError(Exception):
    """Base of every error raised by erllama.

    Attributes:
        code: the stable error code (an ``ErrorCode`` value, as ``str``).
        message: a human-readable explanation.
        detail: optional extra data (upstream's extra terms).
    """

    default_code: str = ErrorCode.INTERNAL

    def __init__(self, message: str = "", *, code: str | None = None, detail: Any = None) -> None:
        self.code: str = str(code or self.default_code)
        self.message = message or self.code
        self.detail = detail
        super().__init__(f"{self.code}: {self.message}")

    @property
    def reason(self) -> str:
        """Upstream name for the code (``{error, Reason}``)."""
        return self.code


class RequestError(ErllamaError):
    """The request was refused; the daemon and the model are fine."""

    default_code = ErrorCode.BAD_REQUEST


class InvalidRequestError(RequestError):
    default_code = ErrorCode.BAD_REQUEST


class UnknownModelError(RequestError):
    default_code = ErrorCode.MODEL_NOT_LOADED


class ConflictError(RequestError):
    default_code = ErrorCode.BUSY


class NotSupportedError(RequestError):
    default_code = ErrorCode.NOT_SUPPORTED


class ModelLoadError(RequestError):
    default_code = ErrorCode.LOAD_FAILED


class WorkerCrashedError(ErllamaError):
    default_code = ErrorCode.WORKER_CRASHED


class ProtocolError(ErllamaError):
    default_code = ErrorCode.MALFORMED


class InternalError(ErllamaError):
    default_code = ErrorCode.INTERNAL


class TransportError(ErllamaError):
    default_code = ErrorCode.DAEMON_UNAVAILABLE


class DaemonUnavailableError(TransportError):
    default_code = ErrorCode.DAEMON_UNAVAILABLE


class RequestTimeoutError(TransportError):
    default_code = ErrorCode.TIMEOUT


_C = ErrorCode
ERROR_CLASSES: dict[str, type[ErllamaError]] = {
    **{
        c: InvalidRequestError
        for c in (
            _C.BAD_REQUEST,
            _C.BADARG,
            _C.TOO_LARGE,
            _C.CONTEXT_OVERFLOW,
            _C.EMPTY_PREFIX,
            _C.INVALID_TOKEN,
            _C.INVALID_CONTENT,
            _C.GRAMMAR_FAILED,
            _C.TOKENIZE_FAILED,
            _C.BATCH_OVERFLOW,
            _C.THINKING_NOT_ENABLED,
            _C.BAD_THRESHOLDS,
            _C.ENOENT,
            _C.EACCES,
            _C.EISDIR,
        )
    },
    **{c: UnknownModelError for c in (_C.MODEL_NOT_LOADED, _C.NOPROC, _C.NOT_FOUND)},
    **{
        c: ConflictError
        for c in (
            _C.ALREADY_LOADED,
            _C.BUSY,
            _C.STICKY_BUSY,
            _C.SEQ_CAPACITY,
            _C.CONFLICT,
            _C.ALREADY_PRESENT,
            _C.EXPIRED,
            _C.SHUTTING_DOWN,
        )
    },
    **{
        c: NotSupportedError
        for c in (_C.NOT_SUPPORTED, _C.NO_GPU, _C.NO_TEMPLATE, _C.TEMPLATE_FAILED, _C.EMBED_FAILED)
    },
    **{
        c: ModelLoadError
        for c in (
            _C.LOAD_FAILED,
            _C.MALFORMED_GGUF,
            _C.CONTEXT_FAILED,
            _C.OOM,
            _C.FAILED,
            _C.ADAPTER_LOST,
        )
    },
    _C.WORKER_CRASHED: WorkerCrashedError,
    _C.UNSUPPORTED_VERSION: ProtocolError,
    _C.MALFORMED: ProtocolError,
    _C.INTERNAL: InternalError,
    _C.TIMEOUT: RequestTimeoutError,
    _C.DAEMON_UNAVAILABLE: DaemonUnavailableError,
}

RETRYABLE_CODES = frozenset({_C.BUSY, _C.WORKER_CRASHED, _C.TIMEOUT, _C.DAEMON_UNAVAILABLE})


class RemoteTraceback(Exception):  # noqa: N818 (mirrors concurrent.futures._RemoteTraceback)
    """Carries a traceback formatted in another process (set as ``__cause__``)."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


def error_for(
    code: str, message: str, *, detail: Any = None, remote_tb: str | None = None
) -> ErllamaError:
    """Build the exception for a code received on the wire (unknown codes -> ErllamaError)."""
    cls = ERROR_CLASSES.get(code, ErllamaError)
    exc = cls(message, code=code, detail=detail)
    if remote_tb:
        exc.__cause__ = RemoteTraceback(remote_tb)
    return exc
