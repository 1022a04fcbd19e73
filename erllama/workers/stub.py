"""``StubBackend``: a deterministic, weight-free ``ModelBackend`` for tests.

It behaves like a tiny language model whose "weights" are SHA-256:

* Tokenizer: UTF-8 bytes, token = byte + 3; BOS = 1 (prepended with
  ``add_special``), EOS = 2, token 0 unused. Ids 259 .. n_vocab-1 are valid
  but render as nothing.
* KV: the token list of each sequence. ``state_snapshot`` is a small magic
  header plus the packed tokens; ``state_restore`` checks the magic.
* Next token: a function of the WHOLE token list of the sequence (SHA-256 of
  the packed tokens, the seed mixed in when temperature > 0) mapped onto a
  printable ASCII byte, so a wrong restore or a wrong truncation gives a
  different continuation. EOS only when the context ends with the trigger
  text (``EOS_TRIGGER`` by default).
* Logits exist only after ``prefill`` / ``decode_one``: sampling after a
  restore or a truncation without re-decoding raises, which catches a
  missing primer in the engine.

Chat: the stub has a fixed fallback template (``STUB_CHAT_TEMPLATE``, rendered by
``workers.chat`` like a GGUF template): one ``role: content`` line per message, then
``assistant:``; BOS is added by the tokenizer only (the template emits none). It has no
embeddings and no LoRA (``not_supported``).

Delays (``spec.stub``: ``load_delay_ms``, ``prefill_delay_ms_per_token``,
``token_delay_ms``) wait on an Event, so ``close()`` interrupts them.

Script (``spec.stub.script``, for span tests): the stub "says" that text
instead. The next token continues the script after the longest piece of it
that the context ends with (the earliest piece on a tie; the script's start
when the context ends with none of it), and EOS follows its end. Still a
function of the token list alone, so truncations and restores stay checked,
and a context that jumps inside the script (an injected marker) resumes there.
Sampling options play no part.

``prefill_all_logits`` (verify, ``workers/speculative.py``) decodes like
``prefill`` and returns the greedy prediction after every position.

Fault knobs (``spec.stub``): ``fail_load`` raises ``ModelLoadError`` with that
code at construction; ``crash_after_tokens`` = N lets N generation decodes
succeed, then the next one crashes per ``crash_mode`` (``sigkill``,
``segfault``, ``exit`` = ``os._exit(3)``, ``raise`` = RuntimeError);
``hang_after_tokens`` = N blocks the next decode forever without progress.
``crash_mode = "hang"`` blocks like ``hang_after_tokens``. ``crash_on_load``
fires ``crash_mode`` while loading (``raise`` -> ``load_failed``);
``crash_after_prefill_tokens`` = N fires it in the prefill call that reaches N
prefilled tokens; ``idle_fault`` fires it from a thread while the worker idles
(``raise`` only ends that thread). ``fault_arm_path``: each fault fires only
while that file exists, and removes it first, so one arming = one fault and a
restarted worker serves normally (the fault-matrix tests arm it).
``save_delay_ms``: every save the worker's writer publishes takes this much
longer (``slow_writer``; a slow disk under a big shutdown save).

LoRA (``spec.stub.lora``, ``LoraStubBackend``): an adapter is any file that
starts with ``STUB_LORA_MAGIC`` (another file is ``load_failed``, as llama.cpp
refuses a non-LoRA GGUF); the applied ``(file bytes, scale)`` pairs salt every
prediction, so output shows which set was applied.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import signal
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from erllama import chat_templates
from erllama.config import ModelSpec
from erllama.protocol.errors import (
    ErrorCode,
    InvalidRequestError,
    ModelLoadError,
    NotSupportedError,
)
from erllama.protocol.tokens import pack_tokens
from erllama.workers.backend import BackendInfo, DecodeItem, SamplerOptions

if TYPE_CHECKING:
    from erllama.workers.saver import SaveJob, Writer

BOS = 1
EOS = 2
BYTE_OFFSET = 3
MIN_VOCAB = 256 + BYTE_OFFSET
EOS_TRIGGER = b"<eos>"
STATE_MAGIC = b"ERLSTUB1"
LOGITS_MAGIC = b"ERLLOGT1"
STATE_FORMAT = b"stub-v1"
STUB_LORA_MAGIC = b"ERLSTUBLORA"
_PRINTABLE_FIRST = 0x20
_PRINTABLE_COUNT = 95  # 0x20 .. 0x7e
# The stub's chat template: "<role>: <content>" lines, then the assistant prefix.
STUB_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def script_next(script: Sequence[int], toks: Sequence[int]) -> int:
    """The scripted next token after ``toks`` (see the module docstring)."""
    n = len(script)
    tail = list(toks[-n:])
    best_len, best_end = 0, 0
    for end in range(1, n + 1):
        k = 0
        while k < end and k < len(tail) and tail[-1 - k] == script[end - 1 - k]:
            k += 1
        if k > best_len:
            best_len, best_end = k, end
    if best_len == 0:
        return script[0]
    return EOS if best_end == n else script[best_end]


class _Seq:
    """One sequence: its tokens and whether logits of the last position exist."""

    __slots__ = ("has_logits", "tokens")

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.has_logits = False


class StubSampler:
    """Greedy (or seeded) choice over the stub's hash "logits"."""

    def __init__(self, backend: StubBackend, seq: int, opts: SamplerOptions) -> None:
        self._backend = backend
        self._seq = seq
        temp = opts.temperature
        self._salt = b""
        if temp is not None and temp > 0:
            self._salt = struct.pack("<q", int(opts.seed or 0)) + struct.pack("<d", float(temp))

    def sample(self, row: int = -1) -> int:
        """The stub's sampler knows its sequence: ``row`` changes nothing."""
        return self._backend.next_token(self._seq, self._salt)

    def sample_tokens(self, tokens: list[int]) -> int:
        return self._backend.predict(tokens, self._salt)

    def close(self) -> None:
        pass


log = logging.getLogger(__name__)


class StubBackend:
    """The deterministic fake model (see the module docstring)."""

    thread_safe_tokenizer = True  # tokenize/detokenize are pure: the IO thread may call them
    state_format = STATE_FORMAT

    def __init__(
        self,
        spec: ModelSpec,
        *,
        fingerprint: bytes | None = None,
        ctx_params_hash: bytes | None = None,
        eos_trigger: bytes = EOS_TRIGGER,
    ) -> None:
        opts = spec.stub
        self._opts = opts
        self._stop = threading.Event()
        self._hang = threading.Event()
        if opts.load_delay_ms > 0:
            self._stop.wait(opts.load_delay_ms / 1000.0)
        if opts.crash_on_load and self._armed():
            self._crash(opts.crash_mode, "while loading")
        if opts.fail_load:
            raise ModelLoadError(f"stub load failure ({opts.fail_load})", code=opts.fail_load)
        if opts.n_vocab < MIN_VOCAB:
            raise ModelLoadError(
                f"stub n_vocab must be >= {MIN_VOCAB}, got {opts.n_vocab}",
                code=ErrorCode.LOAD_FAILED,
            )
        n_seq_max = max(1, spec.context_opts.n_seq_max)
        fp = fingerprint or hashlib.sha256(b"erllama-stub-weights:%d" % opts.n_vocab).digest()
        ctx_hash = (
            ctx_params_hash
            or hashlib.sha256(b"erllama-stub-ctx:%d:%d" % (opts.n_ctx, n_seq_max)).digest()
        )
        self._chat_template, origin = chat_templates.resolve(
            spec.chat_template, STUB_CHAT_TEMPLATE, architecture=None
        )
        if origin == chat_templates.GGUF:
            origin = "stub"  # the stub's fallback stands in for a GGUF's own template
        self.info = BackendInfo(
            backend="stub",
            n_ctx=opts.n_ctx,
            n_vocab=opts.n_vocab,
            n_batch=spec.context_opts.n_batch,
            n_seq_max=n_seq_max,
            quant_type=spec.quant_type or "f16",
            quant_bits=spec.quant_bits or 16,
            fingerprint=fp,
            ctx_params_hash=ctx_hash,
            n_layers=1,
            model_size_bytes=0,
            chat_template=origin,
        )
        self._trigger = [b + BYTE_OFFSET for b in eos_trigger]
        self._script = [b + BYTE_OFFSET for b in (opts.script or "").encode("utf-8")]
        self._seqs = [_Seq() for _ in range(n_seq_max)]
        self._decodes = 0  # generation decodes so far (the fault counters)
        self._prefilled = 0
        self._last_decoded = 0
        self._step_seqs: list[int] = []
        if opts.idle_fault and opts.fault_arm_path:
            threading.Thread(target=self._idle_watch, name="stub-idle-fault", daemon=True).start()

    # ------------------------------------------------------------ tokenizer (pure)
    def tokenize(
        self, text: str, *, add_special: bool = True, parse_special: bool = False
    ) -> list[int]:
        del parse_special  # the stub has no special-token text
        out = [BOS] if add_special else []
        out.extend(b + BYTE_OFFSET for b in text.encode("utf-8"))
        return out

    def token_to_piece(self, token: int) -> bytes:
        if BYTE_OFFSET <= token < MIN_VOCAB:
            return bytes((token - BYTE_OFFSET,))
        return b""

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.token_to_piece(t) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return token == EOS

    def chat_template(self) -> str:
        """The spec's ``chat_template``, else the fallback template (module docstring)."""
        return self._chat_template

    def chat_special_tokens(self) -> tuple[str, str, int | None]:
        return "", "", BOS

    # ------------------------------------------------------------ sequences
    def _seq(self, seq: int) -> _Seq:
        if not 0 <= seq < len(self._seqs):
            raise ValueError(f"sequence {seq} out of range 0..{len(self._seqs) - 1}")
        return self._seqs[seq]

    def seq_clear(self, seq: int) -> None:
        s = self._seq(seq)
        s.tokens = []
        s.has_logits = False

    def seq_truncate(self, seq: int, n_keep: int) -> None:
        s = self._seq(seq)
        if n_keep < len(s.tokens):
            del s.tokens[max(0, n_keep) :]
            s.has_logits = False

    def seq_tokens(self, seq: int) -> list[int]:
        """What the stub's KV holds (tests compare it with the engine's view)."""
        return list(self._seq(seq).tokens)

    def _check_pos(self, s: _Seq, start_pos: int, n: int) -> None:
        if start_pos != len(s.tokens):
            raise ValueError(
                f"decode at position {start_pos} but the sequence holds {len(s.tokens)}"
            )
        if start_pos + n > self.info.n_ctx:
            raise InvalidRequestError(
                f"{start_pos + n} tokens exceed n_ctx {self.info.n_ctx}",
                code=ErrorCode.CONTEXT_OVERFLOW,
            )

    def _check_ids(self, tokens: Sequence[int]) -> None:
        for t in tokens:
            if not 0 <= t < self.info.n_vocab:
                raise InvalidRequestError(
                    f"token {t} out of vocabulary", code=ErrorCode.INVALID_TOKEN
                )

    def prefill(self, seq: int, tokens: Sequence[int], start_pos: int) -> None:
        s = self._seq(seq)
        if not tokens:
            return
        self._check_pos(s, start_pos, len(tokens))
        self._check_ids(tokens)
        n_fault = self._opts.crash_after_prefill_tokens
        self._prefilled += len(tokens)
        if n_fault is not None and self._prefilled >= n_fault and self._armed():
            self._crash(self._opts.crash_mode, f"after {self._prefilled} prefilled tokens")
        if self._opts.prefill_delay_ms_per_token > 0:
            self._stop.wait(self._opts.prefill_delay_ms_per_token * len(tokens) / 1000.0)
        s.tokens.extend(tokens)
        s.has_logits = True
        self._last_decoded = seq
        self._step_seqs = [seq]

    def decode_one(self, seq: int, token: int, pos: int) -> None:
        self.decode_step([DecodeItem(seq, token, pos)])

    def decode_step(self, items: Sequence[DecodeItem]) -> list[int]:
        """Every item decoded in one step: one ``token_delay_ms``, one fault point."""
        if not items:
            return []
        if len({it.seq for it in items}) != len(items):
            raise ValueError("a decode step takes one token per sequence")
        for it in items:
            self._check_pos(self._seq(it.seq), it.pos, 1)
            self._check_ids((it.token,))
        self._fault_point()
        if self._opts.token_delay_ms > 0:
            self._stop.wait(self._opts.token_delay_ms / 1000.0)
        for it in items:
            s = self._seq(it.seq)
            s.tokens.append(it.token)
            s.has_logits = True
        self._last_decoded = items[-1].seq
        self._step_seqs = [it.seq for it in items]
        self._decodes += 1
        return list(range(len(items)))

    def _fault_point(self) -> None:
        o = self._opts
        if (
            o.hang_after_tokens is not None
            and self._decodes >= o.hang_after_tokens
            and self._armed()
        ):
            self._crash("hang", "")
        if o.crash_after_tokens is None or self._decodes < o.crash_after_tokens:
            return
        if self._armed():
            self._crash(o.crash_mode, f"after {self._decodes} tokens")

    def _armed(self) -> bool:
        """Whether a fault may fire now (``fault_arm_path``: once per arming)."""
        path = self._opts.fault_arm_path
        if path is None:
            return True
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        return True

    def _crash(self, mode: str, where: str) -> None:
        if mode == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif mode == "segfault":
            ctypes.string_at(0)
        elif mode == "exit":
            os._exit(3)
        elif mode == "hang":
            self._hang.wait()  # forever: no progress, only close() ends it
            raise RuntimeError("stub backend closed while hung")
        raise RuntimeError(f"stub backend fault {where}")

    def _idle_watch(self) -> None:
        """``idle_fault``: fire ``crash_mode`` from this thread once the arm file appears."""
        path = self._opts.fault_arm_path
        assert path is not None
        while not self._stop.wait(0.02):  # test double: a bounded poll of the arm file
            if os.path.exists(path) and self._armed():
                self._crash(self._opts.crash_mode, "while idle")

    # ------------------------------------------------------------ sampling
    def next_token(self, seq: int, salt: bytes = b"") -> int:
        """The token the stub "model" predicts after the whole sequence."""
        s = self._seq(seq)
        if not s.has_logits:
            raise RuntimeError("no logits: the last position was not decoded")
        return self.predict(s.tokens, salt)

    def predict(self, toks: Sequence[int], salt: bytes = b"") -> int:
        """The next token after ``toks`` (what the "logits" of their last position say)."""
        if self._trigger and list(toks[-len(self._trigger) :]) == self._trigger:
            return EOS
        if self._script:
            return script_next(self._script, toks)
        h = hashlib.sha256(salt)
        h.update(pack_tokens(toks))
        byte = _PRINTABLE_FIRST + h.digest()[0] % _PRINTABLE_COUNT
        return byte + BYTE_OFFSET

    def prefill_all_logits(self, seq: int, tokens: Sequence[int], start_pos: int) -> list[int]:
        """``prefill``, then the greedy prediction after each of ``tokens`` (verify)."""
        if not tokens:
            return []
        self.prefill(seq, tokens, start_pos)
        toks = self._seq(seq).tokens
        return [self.predict(toks[: start_pos + i + 1]) for i in range(len(tokens))]

    def new_sampler(self, seq: int, opts: SamplerOptions) -> StubSampler:
        self._seq(seq)
        if opts.grammar is not None:
            if not opts.grammar.strip():
                raise InvalidRequestError("grammar must not be empty", code=ErrorCode.BADARG)
            raise NotSupportedError("the stub backend has no grammar support")
        return StubSampler(self, seq, opts)

    def logits_snapshot(self, row: int = -1) -> bytes:
        """The stub's "logits": the token list of the last decoded sequence (of the step's
        ``row``-th item), tagged.

        Sampling from them predicts exactly what decoding that sequence would, so
        logits stored at the wrong position give a different continuation.
        """
        s = self._seq(self._last_decoded if row < 0 else self._step_seqs[row])
        if not s.has_logits:
            raise RuntimeError("no logits: the last position was not decoded")
        return LOGITS_MAGIC + pack_tokens(s.tokens)

    def sample_from_logits(self, sampler: StubSampler, logits: bytes | memoryview) -> int:
        data = bytes(logits)
        if not data.startswith(LOGITS_MAGIC) or (len(data) - len(LOGITS_MAGIC)) % 4:
            raise ValueError("not stub logits")
        toks = list(struct.unpack_from(f"<{(len(data) - 8) // 4}I", data, len(LOGITS_MAGIC)))
        return sampler.sample_tokens(toks)

    # ------------------------------------------------------------ state
    def state_snapshot(self, seq: int) -> bytes:
        toks = self._seq(seq).tokens
        return STATE_MAGIC + struct.pack("<I", len(toks)) + pack_tokens(toks)

    def state_size(self, seq: int) -> int:
        return len(STATE_MAGIC) + 4 + 4 * len(self._seq(seq).tokens)

    def state_restore(self, seq: int, payload: bytes | memoryview) -> None:
        s = self._seq(seq)
        data = bytes(payload)
        head = len(STATE_MAGIC) + 4
        if len(data) < head or data[: len(STATE_MAGIC)] != STATE_MAGIC:
            raise ValueError("not a stub state snapshot")
        (n,) = struct.unpack_from("<I", data, len(STATE_MAGIC))
        if len(data) != head + 4 * n or n > self.info.n_ctx:
            raise ValueError("stub state snapshot has a bad length")
        s.tokens = list(struct.unpack_from(f"<{n}I", data, head))
        s.has_logits = False

    # ------------------------------------------------------------ context (scheduler)
    context_released = False  # observable by tests: the scheduler freed the "context"
    contexts_created = 1

    def release_context(self) -> bool:
        """Like ``LlamaBackend.release_context``: drop every sequence; weights stay."""
        if self.context_released:
            return False
        for s in self._seqs:
            s.tokens = []
            s.has_logits = False
        self.context_released = True
        return True

    def ensure_context(self) -> bool:
        """Re-create a released context; True when it did."""
        if not self.context_released:
            return False
        self.context_released = False
        self.contexts_created += 1
        log.info("event=context_recreated contexts=%d", self.contexts_created)
        return True

    def close(self) -> None:
        self._stop.set()
        self._hang.set()


class _StubAdapter:
    """A "loaded" stub adapter: the file's bytes."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class LoraStubBackend(StubBackend):
    """The stub with LoRA (``spec.stub.lora``; see the module docstring)."""

    def __init__(self, spec: ModelSpec, **kwargs: Any) -> None:
        super().__init__(spec, **kwargs)
        self._lora_salt = b""

    def lora_load(self, path: str) -> _StubAdapter:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ModelLoadError(f"cannot read {path}: {exc}", code=ErrorCode.LOAD_FAILED) from None
        if not data.startswith(STUB_LORA_MAGIC):
            raise ModelLoadError(f"{path} is not a stub LoRA", code=ErrorCode.LOAD_FAILED)
        return _StubAdapter(data)

    def lora_apply(self, adapters: Sequence[tuple[Any, float]]) -> None:
        self._lora_salt = b"".join(a.data + struct.pack("<d", s) for a, s in adapters)

    def lora_free(self, adapter: Any) -> None:
        del adapter

    def predict(self, toks: Sequence[int], salt: bytes = b"") -> int:
        return super().predict(toks, salt + self._lora_salt)


class _SlowWriter:
    """A ``Writer`` whose every publish takes ``delay_s`` longer (``save_delay_ms``)."""

    def __init__(self, inner: Writer, delay_s: float) -> None:
        self._inner = inner
        self._delay_s = delay_s

    def write(self, job: SaveJob) -> tuple[str, str]:
        time.sleep(self._delay_s)  # the slow disk: nothing interrupts it
        return self._inner.write(job)

    def add_counters(self, deltas: Mapping[str, int]) -> None:
        self._inner.add_counters(deltas)

    def close(self) -> None:
        self._inner.close()


def slow_writer(make: Callable[[], Writer], delay_ms: float) -> Callable[[], Writer]:
    """``make`` with ``save_delay_ms`` added to every write (``make`` itself when 0)."""
    if delay_ms <= 0:
        return make
    return lambda: _SlowWriter(make(), delay_ms / 1000.0)
