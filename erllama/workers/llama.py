"""The real engine: ``LlamaBackend``, a ``ModelBackend`` over llama.cpp's C API.

This module owns every llama.cpp object of a worker (model, context, batch,
sampler chains) and is the only module that imports ``llama_cpp``. It drives
llama.cpp through the low-level ctypes bindings of llama-cpp-python 0.3.36:
``llama_model_load_from_file`` / ``llama_init_from_model``, one reused
``llama_batch`` for ``llama_decode``, ``llama_sampler_chain_*`` for sampling,
``llama_state_seq_get_data`` / ``set_data`` for the KV cache and
``llama_memory_seq_rm`` for clearing and truncating a sequence.

Threading: not thread-safe. Every method runs on the worker's compute thread.
ctypes releases the GIL during each C call, so the worker's IO and writer
threads keep running while a decode is in flight. ``state_snapshot`` returns a
private ``bytearray`` that another thread may then write out freely.

Logits: llama.cpp keeps the logits of the last decoded batch only, shared by
every sequence of the context. ``Sampler.sample`` reads them, so sample right
after the ``prefill`` / ``decode_one`` of that sequence. A restored sequence
has no logits (the state carries none): either replay the last token (the
primer, REFERENCE §8.4) or sample from logits stored with the row
(``logits_snapshot`` / ``sample_from_logits``).

Positions: llama.cpp requires the first position of a batch to be the
sequence's last position + 1, so the engine's ``n_past`` must match the KV
exactly (``seq_truncate`` before re-decoding a position).

Snapshots of sliding-window models (Gemma 3): ``llama_state_seq_get_data`` for
one sequence leaves out the cells that the sliding window masks, so a restored
row keeps only the last ``n_swa`` positions of the SWA layers, and truncating
it below ``len - 1`` gives wrong attention (measured: logits off by 2.4). With
``n_seq_max == 1`` and ``swa_full`` the backend therefore snapshots the whole
cache (``seq_id = -1``), which is this one sequence with every cell: exact
partial restores, at 2.7x the bytes on Gemma 3 (37.8 MB instead of 14.2 MB for
2048 tokens). ``partial_restore_exact`` tells the engine which it got; when it
is False, reuse a row only up to ``len - 1`` (an exact hit plus the primer).

Numerics: a position's K/V and logits depend on the shape of the batch that
computed it (CPU kernels). Chunks of 128/256/512 tokens agree bit for bit; a
one-token decode differs by up to ~0.8 in some logits. The primer therefore
reproduces a cold run that decoded the last prompt token alone, not a cold
run that decoded it inside a chunk; stored logits reproduce the latter.

llama.cpp logs go through a log callback installed here: lines at WARN and
ERROR are kept in a short ring (to explain load failures) and passed to
``logging`` at DEBUG. A few messages bypass the log (the GBNF parser prints
its errors with ``fprintf(stderr)``): the worker points fd 2 at its log file.

Alternatives turned down:

* The high-level ``llama_cpp.Llama`` object: it keeps its own ``n_tokens`` /
  ``input_ids`` view of the KV, which goes stale after a restore or truncation,
  it evaluates whole prompts through numpy scores, and ``Llama.save_state()``
  (what ``LlamaRAMCache`` stores) copies the whole context: 2.4 s for 2048
  tokens against about 3 ms for ``llama_state_seq_get_data``.
* ``llama_state_seq_save_file`` / ``load_file``: llama.cpp would do the file
  I/O with its own format; the cache needs its own framing (KVC), a checksum
  and zero-copy loads from a mapping.
* Copying a mapped payload into a ``bytes`` before ``set_data``: a writable
  mapping (``ACCESS_COPY``) is handed over as-is through
  ``(c_uint8 * n).from_buffer``; only a read-only buffer that is not ``bytes``
  is copied.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import math
import os
import weakref
from array import array
from collections.abc import Sequence
from typing import Any

import llama_cpp as lc
import numpy as np

from erllama import chat_templates
from erllama.config import ContextOpts, ModelOpts, ModelSpec
from erllama.protocol.errors import (
    ErrorCode,
    InternalError,
    InvalidRequestError,
    ModelLoadError,
    NotSupportedError,
)
from erllama.workers.backend import LLAMA_STATE_FORMAT, BackendInfo, DecodeItem, SamplerOptions
from erllama.workers.numerics import PREFILL_MIN_ROWS, prefill_chunks

log = logging.getLogger(__name__)

# Measured on this CPU build: a position's logits depend on the batch shape. Batches under
# ~100 tokens, and the last rows of a batch whose length is not a multiple of the kernel
# tile, take other code paths. Every prefill chunk starts at a multiple of this (the cold
# path starts at 0 with 128-token chunks), so a partial reuse truncated to it recomputes
# exactly what a cold run computes (tests/model/test_daemon_model.py).
REUSE_ALIGN_TOKENS = 32

VERIFY_ROWS = 32  # rows with logits per decode in prefill_all_logits

GGUF_MAGIC = b"GGUF"
REPETITION_LAST_N = 64
SEED_MAX = 0xFFFFFFFF

# ggml log levels (ggml.h): NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5.
_LOG_WARN = 3
_LOG_CONT = 5

# llama_ftype (llama.h) -> quant names of REFERENCE §3.2 (names outside that table kept as is),
# and approximate bits per weight by name prefix (informational: KVC header byte 4).
_FTYPE_TABLE = """
    0 f32  1 f16  2 q4_0  3 q4_1  7 q8_0  8 q5_0  9 q5_1  10 q2_k  11 q3_k_s  12 q3_k_m
    13 q3_k_l  14 q4_k_s  15 q4_k_m  16 q5_k_s  17 q5_k_m  18 q6_k  19 iq2_xxs  20 iq2_xs
    21 q2_k_s  22 iq3_xs  23 iq3_xxs  24 iq1_s  25 iq4_nl  26 iq3_s  27 iq3_m  28 iq2_s
    29 iq2_m  30 iq4_xs  31 iq1_m  32 bf16  36 tq1_0  37 tq2_0  38 mxfp4_moe  39 nvfp4
    40 q1_0  41 q2_0
"""
_QUANT_BITS_TABLE = """
    f32 32  f16 16  bf16 16  q8 8  q6 6  q5 5  q4 4  iq4 4  mxfp4 4  nvfp4 4
    q3 3  iq3 3  q2 2  iq2 2  tq2 2  q1 1  iq1 1  tq1 1
"""
_FTYPE_GUESSED = 1024


def _pairs(table: str) -> list[tuple[str, str]]:
    fields = iter(table.split())
    return list(zip(fields, fields, strict=True))


FTYPE_NAMES: dict[int, str] = {int(code): name for code, name in _pairs(_FTYPE_TABLE)}
_QUANT_BITS_PREFIXES = [(prefix, int(bits)) for prefix, bits in _pairs(_QUANT_BITS_TABLE)]

# ggml_type values (ggml.h) for the KV cache types.
_GGML_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q5_0": 6, "q5_1": 7, "q8_0": 8, "bf16": 30}
_SPLIT_MODES = {"none": 0, "layer": 1, "row": 2}
_FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}

_TOKEN_DATA_DTYPE = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])


def quant_bits_for(name: str) -> int:
    """Approximate bits per weight of a quant name (16 when unknown)."""
    for prefix, bits in _QUANT_BITS_PREFIXES:
        if name.startswith(prefix):
            return bits
    return 16


# --- llama.cpp logs ------------------------------------------------------------------------

_log_ring: collections.deque[str] = collections.deque(maxlen=32)
_log_last_level = 0


def _on_llama_log(level: int, text: bytes | None, _user: Any) -> None:
    global _log_last_level
    if level == _LOG_CONT:
        level = _log_last_level
    _log_last_level = level
    if level < _LOG_WARN or not text:
        return
    line = text.decode("utf-8", "replace").rstrip()
    if line:
        _log_ring.append(line)
        log.debug("llama.cpp: %s", line)


# Kept referenced for the life of the process: llama.cpp holds the raw pointer.
_LOG_CALLBACK = lc.llama_log_callback(_on_llama_log)
lc.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
lc.llama_backend_init()


def _recent_errors() -> str:
    return "; ".join(list(_log_ring)[-4:])


# --- samplers ------------------------------------------------------------------------------


def _badarg(message: str) -> InvalidRequestError:
    return InvalidRequestError(message, code=ErrorCode.BADARG)


def _check_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _badarg(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _badarg(f"{name} must be an integer, got {value!r}")
    return value


class LlamaSampler:
    """A llama.cpp sampler chain bound to one context (``workers.backend.Sampler``)."""

    def __init__(self, chain: Any, ctx: int, owner: _Handles) -> None:
        self._chain: Any = chain  # a POINTER(llama_sampler); None once freed
        self._ctx = ctx
        self._owner = owner
        owner.samplers.add(self)

    def sample(self, row: int = -1) -> int:
        """Sample from the logits of batch row ``row`` of the last decode (-1: its last
        row with logits); the chain accepts the token."""
        if self._chain is None:
            raise InternalError("sampler is closed")
        return int(lc.llama_sampler_sample(self._chain, self._ctx, row))

    def apply_logits(self, data: np.ndarray[Any, Any]) -> int:
        """Run the chain over a token-data array (``llama_sampler_apply``) and accept the pick."""
        if self._chain is None:
            raise InternalError("sampler is closed")
        cur = lc.llama_token_data_array(
            data=data.ctypes.data_as(lc.llama_token_data_p),
            size=len(data),
            selected=-1,
            sorted=False,
        )
        lc.llama_sampler_apply(self._chain, ctypes.byref(cur))
        if not 0 <= cur.selected < cur.size:
            raise InternalError("sampler chain selected no token")
        token = int(cur.data[cur.selected].id)
        lc.llama_sampler_accept(self._chain, token)
        return token

    def close(self) -> None:
        if self._chain is not None:
            lc.llama_sampler_free(self._chain)
            self._chain = None
            self._owner.samplers.discard(self)


def _build_chain(vocab: int, n_vocab: int, opts: SamplerOptions) -> Any:
    """Validate ``opts`` and build a chain in upstream's order (REFERENCE §1.4)."""
    stages: list[tuple[str, Any, tuple[Any, ...]]] = []
    if opts.grammar is not None:
        if not isinstance(opts.grammar, str) or not opts.grammar:
            raise _badarg("grammar must be a non-empty GBNF string")
        stages.append(
            (
                "grammar",
                lc.llama_sampler_init_grammar,
                (vocab, opts.grammar.encode("utf-8"), b"root"),
            )
        )
    if opts.repetition_penalty is not None:
        penalty = _check_float("repetition_penalty", opts.repetition_penalty)
        if penalty <= 0.0:
            raise _badarg(f"repetition_penalty must be > 0, got {penalty}")
        if penalty != 1.0:
            stages.append(
                (
                    "penalties",
                    lc.llama_sampler_init_penalties,
                    (n_vocab, REPETITION_LAST_N, penalty, 0.0, 0.0),
                )
            )
    if opts.top_k is not None:
        top_k = _check_int("top_k", opts.top_k)
        if top_k < 0:
            raise _badarg(f"top_k must be >= 0, got {top_k}")
        if top_k > 0:
            stages.append(("top_k", lc.llama_sampler_init_top_k, (top_k,)))
    if opts.top_p is not None:
        top_p = _check_float("top_p", opts.top_p)
        if not 0.0 < top_p <= 1.0:
            raise _badarg(f"top_p must be in (0, 1], got {top_p}")
        if top_p < 1.0:
            stages.append(("top_p", lc.llama_sampler_init_top_p, (top_p, 1)))
    if opts.min_p is not None:
        min_p = _check_float("min_p", opts.min_p)
        if not 0.0 <= min_p <= 1.0:
            raise _badarg(f"min_p must be in [0, 1], got {min_p}")
        if min_p > 0.0:
            stages.append(("min_p", lc.llama_sampler_init_min_p, (min_p, 1)))
    seed = 0  # REFERENCE §1.4 default; 2**32-1 is llama.cpp's "random seed"
    if opts.seed is not None:
        seed = _check_int("seed", opts.seed)
        if not 0 <= seed <= SEED_MAX:
            raise _badarg(f"seed must be in [0, 2**32), got {seed}")
    temperature = 0.0
    if opts.temperature is not None:
        temperature = _check_float("temperature", opts.temperature)
        if temperature < 0.0:
            raise _badarg(f"temperature must be >= 0, got {temperature}")
    if temperature > 0.0:
        stages.append(("temp", lc.llama_sampler_init_temp, (temperature,)))
        stages.append(("dist", lc.llama_sampler_init_dist, (seed,)))
    else:
        stages.append(("greedy", lc.llama_sampler_init_greedy, ()))

    params = lc.llama_sampler_chain_default_params()
    params.no_perf = True
    chain = lc.llama_sampler_chain_init(params)
    if not chain:
        raise InternalError("llama_sampler_chain_init failed")
    try:
        for name, init, args in stages:
            _log_ring.clear()
            smpl = init(*args)
            if not smpl:
                if name == "grammar":
                    reason = _recent_errors() or "parse error"
                    raise InvalidRequestError(
                        f"grammar rejected: {reason}", code=ErrorCode.GRAMMAR_FAILED
                    )
                raise InternalError(f"llama_sampler_init_{name} failed")
            lc.llama_sampler_chain_add(chain, smpl)  # the chain owns it from here
    except BaseException:
        lc.llama_sampler_free(chain)
        raise
    return chain


# --- the backend ---------------------------------------------------------------------------


class _Handles:
    """The C objects of one backend, freed in reverse order exactly once (``weakref.finalize``)."""

    def __init__(self) -> None:
        self.model: int | None = None
        self.ctx: int | None = None
        self.batch: Any = None
        self.samplers: weakref.WeakSet[LlamaSampler] = weakref.WeakSet()
        self.embd_ctx: int | None = None  # the embedding context (D31), if any
        self.embd_batch: Any = None

    def free(self) -> None:
        for sampler in list(self.samplers):
            sampler.close()
        if self.embd_batch is not None:
            lc.llama_batch_free(self.embd_batch)
            self.embd_batch = None
        if self.embd_ctx is not None:
            lc.llama_free(self.embd_ctx)
            self.embd_ctx = None
        if self.batch is not None:
            lc.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx is not None:
            lc.llama_free(self.ctx)
            self.ctx = None
        if self.model is not None:
            lc.llama_model_free(self.model)
            self.model = None


def _meta_str(model: Any, key: bytes) -> str | None:
    """A string metadata value of the loaded model (None when the GGUF lacks the key)."""
    buf = ctypes.create_string_buffer(256)
    n = int(lc.llama_model_meta_val_str(model, key, buf, len(buf)))
    return buf.value.decode("utf-8", "replace") if n >= 0 else None


def _check_readable_gguf(path: str) -> None:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelLoadError(
            f"cannot read model file {path}: {exc.strerror or exc}", code=ErrorCode.LOAD_FAILED
        ) from None
    if magic != GGUF_MAGIC:
        raise ModelLoadError(
            f"{path} is not a GGUF file (magic {magic!r})", code=ErrorCode.MALFORMED_GGUF
        )


def _model_params(opts: ModelOpts, keep: list[Any], *, repack: bool) -> Any:
    p = lc.llama_model_default_params()
    p.use_extra_bufts = repack  # repacked GEMMs compute rows in groups of 4 (numerics.py)
    p.n_gpu_layers = opts.n_gpu_layers
    p.main_gpu = opts.main_gpu
    p.split_mode = _SPLIT_MODES[opts.split_mode]
    if opts.tensor_split is not None:
        n_max = int(lc.llama_max_devices())
        if len(opts.tensor_split) > n_max:
            raise InvalidRequestError(
                f"tensor_split has {len(opts.tensor_split)} entries, at most {n_max}",
                code=ErrorCode.BADARG,
            )
        split = (ctypes.c_float * n_max)(*opts.tensor_split)
        keep.append(split)
        p.tensor_split = split
    if opts.use_mmap and opts.use_mlock:
        p.load_mode = lc.LLAMA_LOAD_MODE_MMAP_MLOCK
    elif opts.use_mlock:
        p.load_mode = lc.LLAMA_LOAD_MODE_MLOCK
    elif opts.use_mmap:
        p.load_mode = lc.LLAMA_LOAD_MODE_MMAP
    else:
        p.load_mode = lc.LLAMA_LOAD_MODE_NONE
    p.vocab_only = opts.vocab_only
    return p


def _context_params(opts: ContextOpts) -> Any:
    n_threads = opts.n_threads if opts.n_threads is not None else (os.cpu_count() or 1)
    n_threads_batch = opts.n_threads_batch if opts.n_threads_batch is not None else n_threads
    p = lc.llama_context_default_params()
    n_seq = opts.n_seq_max
    # several sequences: one stream of n_ctx cells each (kv_unified off), a batch that holds
    # two decode rows per sequence, ubatches that hold a whole 63-row prefill chunk
    p.n_ctx = opts.n_ctx * n_seq
    p.n_batch = opts.n_batch if n_seq == 1 else max(opts.n_batch, 2 * n_seq, 64)
    p.n_ubatch = opts.n_ubatch if n_seq == 1 else max(opts.n_ubatch, 2 * n_seq, 64)
    p.n_seq_max = n_seq
    p.n_threads = n_threads
    p.n_threads_batch = n_threads_batch
    p.embeddings = opts.embeddings
    p.offload_kqv = opts.offload_kqv
    p.flash_attn_type = _FLASH_ATTN[opts.flash_attn]
    p.type_k = _GGML_TYPES[opts.type_k]
    p.type_v = _GGML_TYPES[opts.type_v]
    p.swa_full = opts.swa_full
    p.kv_unified = False  # each sequence owns a stream of n_ctx cells, kept in position order
    p.no_perf = True
    return p


def _load_error_code(reason: str, default: ErrorCode) -> ErrorCode:
    low = reason.lower()
    if "alloc" in low or "out of memory" in low:
        return ErrorCode.OOM
    if "gguf" in low or "magic" in low or "tensor" in low:
        return ErrorCode.MALFORMED_GGUF
    return default


class LlamaBackend:
    """llama.cpp model + context for one worker (``workers.backend.ModelBackend``).

    Args:
        spec: the model's configuration; every ``model_opts`` / ``context_opts`` value is
            passed to llama.cpp explicitly (REFERENCE D40).
        model_path: the GGUF file, resolved by the caller.
        fingerprint: 32-byte base fingerprint of the weights (for ``info``).
        ctx_params_hash: 32-byte hash of the KV-shaping context parameters (for ``info``).

    Raises:
        ModelLoadError: ``load_failed`` (missing or unreadable file, llama.cpp refused it),
            ``malformed_gguf`` (not a GGUF, or a broken one), ``oom``, ``context_failed``.
    """

    thread_safe_tokenizer = True  # llama.cpp tokenize/detokenize only read the vocab
    state_format = LLAMA_STATE_FORMAT

    def __init__(
        self,
        spec: ModelSpec,
        model_path: str,
        *,
        fingerprint: bytes,
        ctx_params_hash: bytes,
        whole_cache_snapshots: bool | None = None,
    ) -> None:
        if len(fingerprint) != 32 or len(ctx_params_hash) != 32:
            raise ValueError("fingerprint and ctx_params_hash must be 32 bytes each")
        self._h = _Handles()
        self._finalizer = weakref.finalize(self, self._h.free)
        self._keep: list[Any] = []
        try:
            self._load(spec, model_path, fingerprint, ctx_params_hash, whole_cache_snapshots)
        except BaseException:
            self._finalizer()
            raise

    def _load(
        self,
        spec: ModelSpec,
        path: str,
        fingerprint: bytes,
        ctx_hash: bytes,
        whole_cache: bool | None,
    ) -> None:
        _check_readable_gguf(path)
        self._multi = spec.context_opts.n_seq_max > 1
        mparams = _model_params(spec.model_opts, self._keep, repack=not self._multi)
        _log_ring.clear()
        model = lc.llama_model_load_from_file(os.fsencode(path), mparams)
        if not model:
            reason = _recent_errors() or "llama.cpp refused the file"
            code = _load_error_code(reason, ErrorCode.LOAD_FAILED)
            raise ModelLoadError(f"cannot load {path}: {reason}", code=code)
        self._h.model = model
        cparams = _context_params(spec.context_opts)
        cparams.embeddings = False  # D31: embeddings get their own context (_init_embeddings)
        self._cparams = cparams  # kept to re-create the context (ensure_context)
        self._lora_set: list[tuple[Any, float]] = []
        _log_ring.clear()
        ctx = lc.llama_init_from_model(model, cparams)
        if not ctx:
            reason = _recent_errors() or "llama_init_from_model returned NULL"
            code = _load_error_code(reason, ErrorCode.CONTEXT_FAILED)
            if code == ErrorCode.MALFORMED_GGUF:
                code = ErrorCode.CONTEXT_FAILED
            raise ModelLoadError(f"cannot create a context for {path}: {reason}", code=code)
        self._h.ctx = ctx
        self._ctx: int = ctx
        self._vocab: int = lc.llama_model_get_vocab(model)
        self._mem: int = lc.llama_get_memory(ctx)
        self.n_vocab = int(lc.llama_vocab_n_tokens(self._vocab))
        self.n_batch = int(lc.llama_n_batch(ctx))
        self.n_seq_max = int(lc.llama_n_seq_max(ctx))
        self.n_ctx = int(lc.llama_n_ctx_seq(ctx))  # per sequence
        # Per-sequence snapshots leave out SWA-masked cells (llama_kv_cache::state_write), so a
        # restored row holds only the last n_swa positions of the sliding-window layers and a
        # truncation below len-1 then attends to too little. Snapshotting the whole cache
        # (seq_id -1) keeps every cell; with one sequence that is exactly this sequence.
        n_swa = int(lc.llama_model_n_swa(model))
        can_whole = spec.context_opts.swa_full and self.n_seq_max == 1
        if whole_cache is None:
            whole_cache = n_swa > 0 and can_whole
        elif whole_cache and self.n_seq_max != 1:
            raise InvalidRequestError(
                "whole-cache snapshots need n_seq_max == 1", code=ErrorCode.BADARG
            )
        self._whole_cache_snapshots = whole_cache
        self.n_swa = n_swa
        self.partial_restore_exact: bool = n_swa == 0 or (whole_cache and can_whole)

        batch = lc.llama_batch_init(self.n_batch, 0, 1)
        self._h.batch = batch
        self._batch = batch
        for i in range(self.n_batch):
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
        self._batch_seq = 0
        self._piece_buf = ctypes.create_string_buffer(64)
        self._ids: np.ndarray[Any, Any] | None = None

        ftype = int(lc.llama_model_ftype(model)) & ~_FTYPE_GUESSED
        quant = spec.quant_type or FTYPE_NAMES.get(ftype, f"ftype_{ftype}")
        bits = spec.quant_bits if spec.quant_bits is not None else quant_bits_for(quant)
        raw_template = lc.llama_model_chat_template(model, None)
        self._chat_template, template_origin = chat_templates.resolve(
            spec.chat_template,
            raw_template.decode("utf-8", "replace") if raw_template else None,
            architecture=_meta_str(model, b"general.architecture"),
        )
        self.info = BackendInfo(
            backend="llama",
            # several sequences: every prefill chunk has 16..63 rows, so a reuse of any
            # length is exact once its tail is at least PREFILL_MIN_ROWS (numerics.py)
            reuse_align=1 if self._multi else REUSE_ALIGN_TOKENS,
            prefill_tail_min=PREFILL_MIN_ROWS if self._multi else 1,
            partial_restore_exact=self.partial_restore_exact,
            n_ctx=self.n_ctx,
            n_vocab=self.n_vocab,
            n_batch=self.n_batch,
            n_seq_max=self.n_seq_max,
            quant_type=quant,
            quant_bits=bits,
            fingerprint=bytes(fingerprint),
            ctx_params_hash=bytes(ctx_hash),
            n_layers=int(lc.llama_model_n_layer(model)),
            model_size_bytes=int(lc.llama_model_size(model)),
            n_gpu_layers=spec.model_opts.n_gpu_layers,
            chat_template=template_origin,
        )
        self.n_embd = int(lc.llama_model_n_embd(model))
        if spec.context_opts.embeddings:
            self._init_embeddings(spec.context_opts)
        log.debug(
            "loaded %s n_ctx=%d n_batch=%d n_seq_max=%d quant=%s",
            path,
            self.n_ctx,
            self.n_batch,
            self.n_seq_max,
            quant,
        )

    # --- tokens ----------------------------------------------------------------------------

    def tokenize(
        self, text: str, *, add_special: bool = True, parse_special: bool = False
    ) -> list[int]:
        self._check_open()
        data = text.encode("utf-8")
        cap = len(data) + 8
        for _ in range(2):
            buf = (lc.llama_token * cap)()
            n = int(
                lc.llama_tokenize(
                    self._vocab, data, len(data), buf, cap, add_special, parse_special
                )
            )
            if n >= 0:
                return buf[:n]
            if n == -(2**31):
                break
            cap = -n
        raise InvalidRequestError("text too long to tokenize", code=ErrorCode.TOKENIZE_FAILED)

    def _check_token(self, token: int) -> None:
        self._check_open()
        if not 0 <= token < self.n_vocab:
            raise InvalidRequestError(
                f"token {token} outside the vocabulary (0..{self.n_vocab - 1})",
                code=ErrorCode.INVALID_TOKEN,
            )

    def _check_tokens(self, tokens: Sequence[int]) -> None:
        self._check_open()
        if tokens and (min(tokens) < 0 or max(tokens) >= self.n_vocab):
            bad = next(t for t in tokens if not 0 <= t < self.n_vocab)
            self._check_token(bad)

    def token_to_piece(self, token: int, *, special: bool = False) -> bytes:
        """Raw bytes of one token (may be partial UTF-8); control tokens only if ``special``."""
        self._check_token(token)
        buf = self._piece_buf
        n = int(lc.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special))
        if n < 0:
            self._piece_buf = buf = ctypes.create_string_buffer(-n)
            n = int(lc.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special))
        return buf.raw[: max(n, 0)]

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        self._check_tokens(tokens)
        arr = (lc.llama_token * len(tokens))(*tokens)
        cap = max(64, len(tokens) * 8)
        for _ in range(2):
            buf = ctypes.create_string_buffer(cap)
            n = int(lc.llama_detokenize(self._vocab, arr, len(tokens), buf, cap, False, special))
            if n >= 0:
                return buf.raw[:n].decode("utf-8", "replace")
            cap = -n
        raise InternalError("llama_detokenize failed")

    def is_eog(self, token: int) -> bool:
        self._check_open()
        return 0 <= token < self.n_vocab and bool(lc.llama_vocab_is_eog(self._vocab, token))

    # --- KV --------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._h.ctx is None:
            raise InternalError("the backend is closed")

    def _check_seq(self, seq: int) -> None:
        self._check_open()
        if not 0 <= seq < self.n_seq_max:
            raise ValueError(f"sequence {seq} out of range (n_seq_max={self.n_seq_max})")

    def seq_clear(self, seq: int) -> None:
        self._check_seq(seq)
        lc.llama_memory_seq_rm(self._mem, seq, -1, -1)

    def seq_truncate(self, seq: int, n_keep: int) -> None:
        self._check_seq(seq)
        if not lc.llama_memory_seq_rm(self._mem, seq, max(n_keep, 0), -1):
            raise ValueError(f"cannot truncate sequence {seq} at {n_keep}")

    def _decode(
        self, seq: int, tokens: Sequence[int], pos: int, *, all_logits: bool = False
    ) -> None:
        """Decode at most ``n_batch`` tokens with logits for the last one only (or all)."""
        batch = self._batch
        n = len(tokens)
        if seq != self._batch_seq:
            for i in range(self.n_batch):
                batch.seq_id[i][0] = seq
            self._batch_seq = seq
        tok = array("i", tokens)
        positions = array("i", range(pos, pos + n))
        ctypes.memmove(batch.token, tok.buffer_info()[0], 4 * n)
        ctypes.memmove(batch.pos, positions.buffer_info()[0], 4 * n)
        ctypes.memset(batch.logits, 1 if all_logits else 0, n)
        batch.logits[n - 1] = 1
        batch.n_tokens = n
        rc = int(lc.llama_decode(self._ctx, batch))
        if rc == 0:
            return
        if rc == 1:
            raise InvalidRequestError(
                f"no KV slot for {n} tokens at position {pos}", code=ErrorCode.CONTEXT_OVERFLOW
            )
        detail = _recent_errors()
        raise InternalError(f"llama_decode returned {rc}" + (f": {detail}" if detail else ""))

    def prefill(self, seq: int, tokens: Sequence[int], start_pos: int) -> None:
        """Decode ``tokens`` at ``start_pos..`` in ``n_batch`` chunks; logits for the last only.

        An empty list does nothing (the logits stay those of the last decode). After an
        ``InternalError`` the sequence may hold some of the chunks: clear or truncate it.
        """
        self._check_seq(seq)
        n = len(tokens)
        if start_pos < 0 or start_pos + n > self.n_ctx:
            raise InvalidRequestError(
                f"{start_pos} + {n} tokens exceed the context of {self.n_ctx}",
                code=ErrorCode.CONTEXT_OVERFLOW,
            )
        self._check_tokens(tokens)
        _log_ring.clear()
        if self._multi:
            off = 0
            for size in prefill_chunks(n):
                self._decode(seq, tokens[off : off + size], start_pos + off)
                off += size
            return
        step = self.n_batch
        for off in range(0, n, step):
            self._decode(seq, tokens[off : off + step], start_pos + off)

    def decode_one(self, seq: int, token: int, pos: int) -> None:
        self._check_seq(seq)
        if not 0 <= pos < self.n_ctx:
            raise InvalidRequestError(
                f"position {pos} outside the context of {self.n_ctx}",
                code=ErrorCode.CONTEXT_OVERFLOW,
            )
        self._check_token(token)
        if self._multi:
            self.decode_step([DecodeItem(seq, token, pos)])
            return
        _log_ring.clear()
        self._decode(seq, (token,), pos)

    def decode_step(self, items: Sequence[DecodeItem]) -> list[int]:
        """One generation step of several sequences in one ``llama_decode``.

        Each item's token is decoded at its position with logits; with several sequences
        a throwaway copy follows at ``pos + 1`` (removed after the step), so every stream
        has two rows and takes the layout-independent attention kernel (numerics.py).
        Returns the batch row of each item's logits, for ``Sampler.sample(row)`` and
        ``logits_snapshot(row)``.
        """
        if not items:
            return []
        seqs = {it.seq for it in items}
        if len(seqs) != len(items):
            raise ValueError("a decode step takes one token per sequence")
        for it in items:
            self._check_seq(it.seq)
            if not 0 <= it.pos < self.n_ctx:
                raise InvalidRequestError(
                    f"position {it.pos} outside the context of {self.n_ctx}",
                    code=ErrorCode.CONTEXT_OVERFLOW,
                )
            self._check_token(it.token)
        batch = self._batch
        row_of: dict[int, int] = {}
        spare: list[DecodeItem] = []
        i = 0
        for it in sorted(items, key=lambda x: x.seq):  # split_equal wants ascending ids
            row_of[it.seq] = i
            pairs = [(it.pos, 1)]
            if self._multi and it.pos + 1 < self.n_ctx:
                pairs.append((it.pos + 1, 0))
                spare.append(it)
            for pos, out in pairs:
                batch.token[i] = it.token
                batch.pos[i] = pos
                batch.seq_id[i][0] = it.seq
                batch.logits[i] = out
                i += 1
        batch.n_tokens = i
        self._batch_seq = -1  # the seq ids were overwritten: _decode sets them again
        _log_ring.clear()
        rc = int(lc.llama_decode(self._ctx, batch))
        for it in spare:
            lc.llama_memory_seq_rm(self._mem, it.seq, it.pos + 1, -1)
        if rc == 1:
            raise InvalidRequestError(
                f"no KV slot for a step of {len(items)} sequences",
                code=ErrorCode.CONTEXT_OVERFLOW,
            )
        if rc != 0:
            detail = _recent_errors()
            raise InternalError(f"llama_decode returned {rc}" + (f": {detail}" if detail else ""))
        return [row_of[it.seq] for it in items]

    def prefill_all_logits(self, seq: int, tokens: Sequence[int], start_pos: int) -> list[int]:
        """Decode ``tokens`` like ``prefill`` with logits for every row; the argmax of each.

        ``result[i]`` is the greedy next token after ``tokens[i]`` (ties go to the lowest id,
        as the greedy sampler does). Rows go in batches of ``VERIFY_ROWS``: llama.cpp keeps
        an output buffer of n_vocab floats per row with logits (1 MB per row on Gemma 3).
        """
        self._check_seq(seq)
        n = len(tokens)
        if start_pos < 0 or start_pos + n > self.n_ctx:
            raise InvalidRequestError(
                f"{start_pos} + {n} tokens exceed the context of {self.n_ctx}",
                code=ErrorCode.CONTEXT_OVERFLOW,
            )
        self._check_tokens(tokens)
        _log_ring.clear()
        out: list[int] = []
        step = min(self.n_batch, VERIFY_ROWS)
        for off in range(0, n, step):
            chunk = tokens[off : off + step]
            self._decode(seq, chunk, start_pos + off, all_logits=True)
            for i in range(len(chunk)):
                ptr = lc.llama_get_logits_ith(self._ctx, i)
                if not ptr:
                    raise InternalError(f"no logits for row {i}")
                row = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
                out.append(int(row.argmax()))
        return out

    # --- sampling --------------------------------------------------------------------------

    def new_sampler(self, seq: int, opts: SamplerOptions) -> LlamaSampler:
        self._check_seq(seq)
        return LlamaSampler(_build_chain(self._vocab, self.n_vocab, opts), self._ctx, self._h)

    def logits_snapshot(self, row: int = -1) -> bytes:
        """The logits of batch row ``row`` of the last decode (-1: the last position):
        ``n_vocab`` little-endian f32.

        Valid only right after ``prefill`` / ``decode_one`` / ``decode_step`` (of any
        sequence): a restore does not touch them, so after one they still belong to
        whatever was decoded before.
        """
        self._check_open()
        ptr = lc.llama_get_logits_ith(self._ctx, row)
        if not ptr:
            raise InternalError("no logits: nothing decoded with output")
        return ctypes.string_at(ptr, 4 * self.n_vocab)

    def sample_from_logits(self, sampler: LlamaSampler, logits: bytes | memoryview) -> int:
        """Sample (and accept) from stored logits instead of the context's last output."""
        if len(logits) != 4 * self.n_vocab:
            raise ValueError(f"expected {4 * self.n_vocab} bytes of logits, got {len(logits)}")
        if self._ids is None:
            self._ids = np.arange(self.n_vocab, dtype="<i4")
        data = np.empty(self.n_vocab, dtype=_TOKEN_DATA_DTYPE)
        data["id"] = self._ids
        data["logit"] = np.frombuffer(logits, dtype="<f4")
        data["p"] = 0.0
        return sampler.apply_logits(data)

    # --- state -----------------------------------------------------------------------------

    def _state_src(self, seq: int) -> int:
        self._check_seq(seq)
        return -1 if self._whole_cache_snapshots else seq

    def state_size(self, seq: int) -> int:
        return int(lc.llama_state_seq_get_size(self._ctx, self._state_src(seq)))

    def state_snapshot(self, seq: int, *, out: bytearray | None = None) -> bytearray | memoryview:
        """Copy the sequence's KV state out (``llama_state_seq_get_data``).

        Args:
            seq: the sequence.
            out: a buffer to reuse (a worker's pool); used when it is large enough, and then a
                memoryview of its first ``n`` bytes is returned. Rows over glibc's mmap
                threshold (32 MB) cost page faults when freshly allocated each time.

        Returns:
            A private buffer (a new ``bytearray``, or a view of ``out``) that other threads may
            read while the model goes on.
        """
        size = self.state_size(seq)
        buf = out if out is not None and len(out) >= size else bytearray(size)
        if size == 0:
            return buf if buf is not out else memoryview(buf)[:0]
        dst = (ctypes.c_uint8 * size).from_buffer(buf)
        n = int(lc.llama_state_seq_get_data(self._ctx, dst, size, self._state_src(seq)))
        del dst  # release the export so the bytearray can be resized
        if n == 0:
            raise InternalError(f"llama_state_seq_get_data failed for sequence {seq}")
        if buf is out:
            return memoryview(buf)[:n]
        if n != size:
            del buf[n:]
        return buf

    def state_restore(self, seq: int, payload: bytes | bytearray | memoryview) -> None:
        """Clear ``seq`` and load a snapshot into it (``llama_state_seq_set_data``).

        A writable buffer (``bytearray``, a memoryview over an ``ACCESS_COPY`` mmap) and
        ``bytes`` are handed to llama.cpp without a copy; a read-only memoryview is copied.

        Raises:
            ValueError: llama.cpp rejected the payload (``state rejected``); ``seq`` is empty.
        """
        self._check_seq(seq)
        lc.llama_memory_seq_rm(self._mem, seq, -1, -1)
        size = len(payload) if not isinstance(payload, memoryview) else payload.nbytes
        if size == 0:
            raise ValueError("state rejected: empty payload")
        src: Any
        if isinstance(payload, bytes):
            src = ctypes.cast(ctypes.c_char_p(payload), ctypes.POINTER(ctypes.c_uint8))
        elif isinstance(payload, bytearray) or (not payload.readonly and payload.c_contiguous):
            src = (ctypes.c_uint8 * size).from_buffer(payload)
        else:
            src = (ctypes.c_uint8 * size).from_buffer_copy(payload)
        _log_ring.clear()
        try:
            n = int(lc.llama_state_seq_set_data(self._ctx, src, size, seq))
        finally:
            del src  # drop the buffer export: the caller may close its mmap now
        if n == 0:
            lc.llama_memory_seq_rm(self._mem, seq, -1, -1)
            detail = _recent_errors()
            raise ValueError("state rejected" + (f": {detail}" if detail else ""))

    # --- chat templates (workers/chat.py) -------------------------------------------------

    def chat_template(self) -> str | None:
        """The model's chat template (``chat_templates.resolve``); None when it has none."""
        self._check_open()
        return self._chat_template or None

    def chat_special_tokens(self) -> tuple[str, str, int | None]:
        """``(bos_text, eos_text, bos_id)``; ``bos_id`` is None when tokenize adds no BOS."""
        self._check_open()
        bos = int(lc.llama_vocab_bos(self._vocab))
        eos = int(lc.llama_vocab_eos(self._vocab))

        def text(tok: int) -> str:
            if not 0 <= tok < self.n_vocab:
                return ""
            return self.token_to_piece(tok, special=True).decode("utf-8", "replace")

        adds_bos = bool(lc.llama_vocab_get_add_bos(self._vocab)) and 0 <= bos < self.n_vocab
        return text(bos), text(eos), bos if adds_bos else None

    # --- embeddings (workers/embedding.py, D31) --------------------------------------------

    def _init_embeddings(self, opts: ContextOpts) -> None:
        """A second context for ``embed``: one sequence, one batch, mean pooling."""
        assert self._h.model is not None
        p = _context_params(opts)
        p.n_ctx = self.n_batch
        p.n_batch = self.n_batch
        p.n_ubatch = self.n_batch  # the pooled embedding of one batch, in one ubatch
        p.n_seq_max = 1
        p.embeddings = True
        p.pooling_type = lc.LLAMA_POOLING_TYPE_MEAN
        p.swa_full = False
        _log_ring.clear()
        ctx = lc.llama_init_from_model(self._h.model, p)
        if not ctx:
            reason = _recent_errors() or "llama_init_from_model returned NULL"
            code = _load_error_code(reason, ErrorCode.CONTEXT_FAILED)
            if code == ErrorCode.MALFORMED_GGUF:
                code = ErrorCode.CONTEXT_FAILED
            raise ModelLoadError(f"cannot create the embedding context: {reason}", code=code)
        self._h.embd_ctx = ctx
        batch = lc.llama_batch_init(self.n_batch, 0, 1)
        self._h.embd_batch = batch
        for i in range(self.n_batch):
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1

    @property
    def embeddings_enabled(self) -> bool:
        return self._h.embd_ctx is not None

    def embed_tokens(self, tokens: Sequence[int]) -> list[float]:
        """The mean-pooled embedding of ``tokens`` (``n_embd`` floats) from the embedding
        context; the generation context, its KV and its logits are not touched.

        Raises:
            NotSupportedError: ``not_supported`` (no embedding context), ``embed_failed``.
            InvalidRequestError: ``invalid_token``, ``batch_overflow`` (checked again here).
        """
        ctx = self._h.embd_ctx
        batch = self._h.embd_batch
        if ctx is None or batch is None:
            raise NotSupportedError("no embedding context", code=ErrorCode.NOT_SUPPORTED)
        n = len(tokens)
        if not 0 < n <= self.n_batch:
            raise InvalidRequestError(
                f"{n} tokens: an embedding takes 1..{self.n_batch}", code=ErrorCode.BATCH_OVERFLOW
            )
        self._check_tokens(tokens)
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        tok = array("i", tokens)
        positions = array("i", range(n))
        ctypes.memmove(batch.token, tok.buffer_info()[0], 4 * n)
        ctypes.memmove(batch.pos, positions.buffer_info()[0], 4 * n)
        batch.n_tokens = n
        _log_ring.clear()
        rc = int(lc.llama_decode(ctx, batch))
        if rc != 0:
            detail = _recent_errors()
            raise NotSupportedError(
                f"embedding decode returned {rc}" + (f": {detail}" if detail else ""),
                code=ErrorCode.EMBED_FAILED,
            )
        ptr = lc.llama_get_embeddings_seq(ctx, 0)
        if not ptr:
            raise NotSupportedError("llama.cpp returned no embedding", code=ErrorCode.EMBED_FAILED)
        out = array("f")
        out.frombytes(ctypes.string_at(ptr, 4 * self.n_embd))
        return out.tolist()

    # --- LoRA adapters (workers/adapters.py) -----------------------------------------------

    def lora_load(self, path: str) -> Any:
        """Load a LoRA GGUF for this model (``llama_adapter_lora_init``); not applied yet.

        Raises:
            ModelLoadError: ``load_failed`` (llama.cpp refused the file: not a LoRA GGUF,
                another architecture, shapes that do not match the model).
        """
        self._check_open()
        _log_ring.clear()
        adapter = lc.llama_adapter_lora_init(self._h.model, os.fsencode(path))
        if not adapter:
            reason = _recent_errors() or "llama.cpp refused the adapter"
            raise ModelLoadError(
                f"cannot load adapter {path}: {reason}",
                code=ErrorCode.LOAD_FAILED,
                detail={"path": path},
            )
        return adapter

    def lora_apply(self, adapters: Sequence[tuple[Any, float]]) -> None:
        """Make exactly these ``(adapter, scale)`` pairs the generation context's set."""
        self._check_open()
        n = len(adapters)
        arr = (lc.llama_adapter_lora_p_ctypes * n)(*(a for a, _ in adapters)) if n else None
        scales = (ctypes.c_float * n)(*(s for _, s in adapters)) if n else None
        _log_ring.clear()
        rc = int(lc.llama_set_adapters_lora(self._ctx, arr, n, scales))
        if rc != 0:
            detail = _recent_errors()
            raise ModelLoadError(
                f"llama_set_adapters_lora returned {rc}" + (f": {detail}" if detail else ""),
                code=ErrorCode.LOAD_FAILED,
            )
        self._lora_set = list(adapters)

    def lora_free(self, adapter: Any) -> None:
        """Free an adapter that is no longer applied (the model frees the others)."""
        if self._h.model is not None:
            lc.llama_adapter_lora_free(adapter)

    # --- context release (the memory-pressure scheduler) -----------------------------------
    context_released = False

    def release_context(self) -> bool:
        """Free the generation context (its KV cache and compute buffers); keep the weights.

        Only on an idle backend (no live sampler). The next ``ensure_context`` makes a new
        one with the same parameters. Returns False when there was nothing to free.
        """
        if self._h.ctx is None or self.context_released or len(self._h.samplers):
            return False
        lc.llama_free(self._h.ctx)
        self._h.ctx = None
        self.context_released = True
        log.info("event=context_released")
        return True

    def ensure_context(self) -> bool:
        """Re-create a released context (and re-apply the adapter set); True when it did.

        Raises:
            ModelLoadError: ``context_failed`` (llama.cpp could not allocate it).
        """
        if not self.context_released:
            return False
        _log_ring.clear()
        ctx = lc.llama_init_from_model(self._h.model, self._cparams)
        if not ctx:
            reason = _recent_errors() or "llama_init_from_model returned NULL"
            raise ModelLoadError(
                f"cannot re-create the context: {reason}", code=ErrorCode.CONTEXT_FAILED
            )
        self._h.ctx = ctx
        self._ctx = ctx
        self._mem = lc.llama_get_memory(ctx)
        self.context_released = False
        if self._lora_set:
            self.lora_apply(self._lora_set)
        log.info("event=context_recreated")
        return True

    def close(self) -> None:
        """Free samplers, batch, context and model, in that order (idempotent)."""
        self._finalizer()
