"""The one answer to ``Tokenize`` and ``Detokenize`` (no sockets).

The IO thread gives it while the engine runs (the backends' tokenizers only read the
vocabulary: ``ModelBackend.thread_safe_tokenizer``); the engine gives the same answer
for a message that reached it (before the IO thread attached, or after it detached).
Errors: the backend's own ``ErllamaError`` as it is (``invalid_token``, ...); anything
else ``tokenize_failed`` for a tokenize and ``internal`` for a detokenize.
"""

from __future__ import annotations

from erllama.protocol.codec import error_reply, reply
from erllama.protocol.errors import ErllamaError, ErrorCode
from erllama.protocol.messages import Detokenize, Msg, Tokenize
from erllama.protocol.tokens import pack_tokens, unpack_tokens
from erllama.workers.backend import ModelBackend


def answer(backend: ModelBackend, msg: Tokenize | Detokenize) -> Msg:
    """The reply to ``msg`` (a ``Reply`` or an ``ErrorReply``); never raises."""
    try:
        if isinstance(msg, Tokenize):
            toks = backend.tokenize(msg.text, add_special=True, parse_special=msg.parse_special)
            return reply(msg.request_id, pack_tokens(toks))
        return reply(msg.request_id, backend.detokenize(unpack_tokens(msg.tokens)))
    except ErllamaError as exc:
        return error_reply(msg.request_id, exc.code, exc.message, detail=exc.detail)
    except Exception as exc:
        code = ErrorCode.TOKENIZE_FAILED if isinstance(msg, Tokenize) else ErrorCode.INTERNAL
        return error_reply(msg.request_id, code, f"{type(exc).__name__}: {exc}")
