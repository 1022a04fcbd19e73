"""The worker process: one per model. ``main(run_dir, child_id)`` is its entry point.

Threads (vLLM's layout)::

      control.sock (root)            workers.sock (router)
            ^  |                           ^  |
   Hello/Ready |  Init/Ping/Stop   replies |  | [client_id, ERL1, body]
   Pong        v                   events  |  v
   +--------------------------- IO thread -----------------------------+
   | owns: control DEALER (ControlLink), workers DEALER, PAIR end A      |
   | answers: Ping (Pong with progress), ModelStatus, Tokenize,          |
   |          Detokenize (the tokenizer is thread-safe), bad bodies      |
   | marks:   Cancel in CancelSet at once (and queues it)                |
   +-------------------------------------------------------------------+
        | SimpleQueue (requests, Stop)          ^ inproc PAIR (replies,
        v                                       |  events, status pushes)
   +------------------------ compute (main) thread ---------------------+
   | owns: the backend, PAIR end B, a MetaClient (lookups, pins)        |
   | runs: engine.Engine (prefill, generation, snapshots)               |
   +-------------------------------------------------------------------+
        | SaveJob (snapshot bytes)
        v
   saver thread: its own MetaClient, tiers.publish into the model's tier

Sockets: connects a DEALER to ``control.sock`` (identity = child id) and,
once the model is loaded, a DEALER to ``workers.sock`` (identity = the model
id); meta is reached at ``meta.sock`` by one DEALER per thread (compute and
saver). Nothing is bound.

Messages in: ``Init``, ``Ping``, ``Stop`` (control); ``Complete``,
``Cancel``, ``Tokenize``, ``Detokenize``, ``ModelStatus``,
``ListCachedPrefixes``, ``Evict``, ``ShutdownModel``, ``ApplyChatTemplate``,
``Embed``, ``LoadAdapter`` / ``UnloadAdapter`` / ``SetAdapterScale`` /
``ListAdapters`` (workers; see chat.py, embedding.py, adapters.py). Out:
``Hello``, ``Ready`` (info = ``ModelInfo``) or ``StartFailed``, ``Pong``;
``Reply``, ``ErrorReply``, ``TokenEvent``, ``DoneEvent`` and
``[b"", ERL1, WorkerStatus]`` pushes on every phase / queue transition.

Start (``lifecycle.run``: the handshake on the main thread, which then hands
the control link to the IO thread): load the backend (a failure ->
``StartFailed(code, message)`` and exit 0), attach the LoRA adapters the init payload lists (a
restart: same handles and scales; one that cannot be attached again ->
``StartFailed(adapter_lost)``), connect to ``workers.sock``, push
``WorkerStatus``, send ``Ready``. Every change of the adapter set goes to the
root as ``AdaptersChanged`` (before the op's reply). Stop: ``Stop(drain)`` or
SIGTERM (``Child.on_signal``: the handler only queues a StopRequest): stop admitting, let the
running request finish (cancelled after ``supervisor.drain_timeout_s``),
shutdown save of the live sequence and the saves still queued, bounded by
``cache.evict_save_timeout_ms`` (one cut by it is counted in
``saves_timed_out`` and logged ``event=save_timed_out``), exit 0. An
unexpected exception inside a request -> ``internal`` to its client, exit 1
(the supervisor restarts the worker: the backend state may be corrupt).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from importlib import metadata
from queue import SimpleQueue
from typing import Any

import msgspec
import zmq

from erllama import lifecycle
from erllama.bundled import bundled_model_path
from erllama.cache import keys
from erllama.cache.kvc import KvcError
from erllama.cache.tiers import TierLayout
from erllama.config import (
    ConfigError,
    ModelSpec,
    effective_policy,
)
from erllama.inits import WorkerInit
from erllama.protocol.codec import encode
from erllama.protocol.errors import ErllamaError, ErrorCode, ModelLoadError
from erllama.protocol.messages import ModelInfo, Msg
from erllama.protocol.sockets import META_SOCK, ipc_endpoint
from erllama.workers.backend import LLAMA_STATE_FORMAT, ModelBackend
from erllama.workers.cachelink import MetaCache
from erllama.workers.engine import CancelSet, Engine, FatalEngineError, InboxItem, StopRequest
from erllama.workers.iothread import IoThread
from erllama.workers.saver import Saver, publish_writer_factory
from erllama.workers.stub import LoraStubBackend, StubBackend, slow_writer

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 30.0
STOP_SLACK = 0.8
META_TIMEOUT_S = 1.0  # compute-thread lookups: a slow meta must not stall a request long
WRITER_META_TIMEOUT_S = 2.0


def _dist_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


def llama_ctx_params_hash(spec: ModelSpec) -> bytes:
    """D6: a hash of every context parameter that shapes the saved KV state."""
    c = spec.context_opts
    return keys.ctx_params_hash(
        {
            "backend": "llama",
            "n_ctx": c.n_ctx,
            "type_k": c.type_k,
            "type_v": c.type_v,
            "flash_attn": c.flash_attn,
            "n_seq_max": c.n_seq_max,
            "swa_full": c.swa_full,
            "llama_cpp": _dist_version("llama_cpp_python"),
            "state_format": LLAMA_STATE_FORMAT.decode(),
        }
    )


def load_backend(spec: ModelSpec) -> ModelBackend:
    """Build the model's backend (ModelLoadError with a StartFailed code on failure)."""
    fp = bytes.fromhex(spec.fingerprint) if spec.fingerprint else None
    ctx_hash = bytes.fromhex(spec.ctx_params_hash) if spec.ctx_params_hash else None
    if spec.backend == "stub":
        cls = LoraStubBackend if spec.stub.lora else StubBackend
        return cls(spec, fingerprint=fp, ctx_params_hash=ctx_hash)
    from erllama.workers.llama import LlamaBackend

    if spec.model_path:
        path = spec.model_path
    else:
        try:
            path = bundled_model_path()
        except OSError as exc:
            raise ModelLoadError(f"no model_path and no bundled model: {exc}") from None
    if fp is None:
        try:
            fp = keys.file_fingerprint(path, spec.fingerprint_mode)
        except KvcError as exc:
            raise ModelLoadError(
                f"fingerprint_mode {spec.fingerprint_mode} needs an explicit fingerprint ({exc})",
                code=ErrorCode.BAD_REQUEST,
            ) from None
        except OSError as exc:
            raise ModelLoadError(f"cannot read {path}: {exc}") from None
    return LlamaBackend(
        spec, path, fingerprint=fp, ctx_params_hash=ctx_hash or llama_ctx_params_hash(spec)
    )


def model_info(model_id: str, spec: ModelSpec, backend: ModelBackend) -> dict[str, Any]:
    """``Ready.info``: builtins of ``ModelInfo`` (bytes kept as bytes)."""
    info = backend.info
    if info.n_gpu_layers == 0 or info.n_layers == 0:
        vram = 0  # D37: CPU only
    elif info.n_gpu_layers < 0 or info.n_gpu_layers >= info.n_layers:
        vram = info.model_size_bytes
    else:
        vram = info.model_size_bytes * info.n_gpu_layers // info.n_layers
    mi = ModelInfo(
        id=model_id,
        model_id=model_id,
        pid=os.getpid(),
        status="idle",
        phase="idle",
        pending_len=0,
        last_cache_hit=None,
        backend=info.backend,
        context_size=spec.context_size or info.n_ctx,
        quant_type=info.quant_type,
        quant_bits=info.quant_bits,
        quant_tag=info.quant_type.upper(),
        tier=spec.tier,
        fingerprint=info.fingerprint,
        loaded_at_monotonic=time.monotonic_ns(),
        vram_estimate_b=vram,
        state="ready",
        chat_template=info.chat_template,
    )
    out: dict[str, Any] = msgspec.to_builtins(mi, builtin_types=(bytes,))
    return out


def main(run_dir: str, child_id: str) -> int:
    """Run the worker; the exit code (0 = stopped or refused to start, 1 = crashed)."""
    return lifecycle.run("worker", run_dir, child_id, WorkerInit, _start)


def to_io(pair: zmq.Socket[bytes], frames: list[bytes | memoryview]) -> None:
    """Hand frames to the IO thread; a PAIR with no peer (the IO thread is gone) drops them
    instead of blocking this thread forever."""
    try:
        pair.send_multipart(frames, flags=zmq.NOBLOCK)
    except zmq.Again:
        log.warning("event=io_thread_gone message dropped")


def _stop_io(
    child: lifecycle.Child, pair: zmq.Socket[bytes], io: IoThread, lingering: list[str]
) -> None:
    to_io(pair, [IoThread.QUIT])
    io.join(10.0)
    pair.close(linger=0)
    if io.is_alive():  # a stuck IO thread keeps its sockets: term() would hang
        log.error("event=io_thread_stuck exiting without closing the context")
        child.keep_context()
    elif lingering:
        log.info("exiting without closing the context (%s)", ", ".join(lingering))
        child.keep_context()


def _start(child: lifecycle.Child, cfg: WorkerInit) -> lifecycle.Started:
    """Start the IO thread, load the model, attach its adapters, connect workers.sock."""
    try:
        spec = msgspec.structs.replace(cfg.model, id=cfg.model.id or cfg.model_id)
        policy = effective_policy(cfg.cache.policy, spec)
    except ConfigError as exc:
        raise child.bad_config(exc) from None
    model_id = cfg.model_id
    inbox: SimpleQueue[InboxItem] = SimpleQueue()
    cancels = CancelSet()
    child.on_signal(
        lambda signum: inbox.put(
            StopRequest(drain=True, reason=signal.Signals(signum).name.lower())
        )
    )
    pair_endpoint = f"inproc://erllama-worker-{os.getpid()}"
    pair = child.ctx.socket(zmq.PAIR)
    pair.setsockopt(zmq.LINGER, 0)
    pair.setsockopt(zmq.SNDHWM, 0)  # never block the compute thread on its own IO thread
    pair.bind(pair_endpoint)
    io = IoThread(child.ctx, child.link, child.run_dir, pair_endpoint, inbox, cancels)
    lingering: list[str] = []  # threads that still hold sockets (ctx.term() would hang)
    io.start()
    child.on_exit(_stop_io, child, pair, io, lingering)
    child.hand_over(lambda msg: to_io(pair, [IoThread.CONTROL, *encode(msg)]))
    try:
        backend = load_backend(spec)
    except ErllamaError:
        raise
    except Exception as exc:
        log.exception("model load crashed")
        raise ModelLoadError(f"{type(exc).__name__}: {exc}") from None

    holder = f"{child.child_id}:{os.getpid()}"
    layout = TierLayout(cfg.cache.tiers, cfg.daemon_id)
    try:
        layout.ensure()
    except OSError as exc:
        log.warning("cannot create the tier directories (saves will drop): %s", exc)
    meta_endpoint = ipc_endpoint(child.run_dir, META_SOCK)
    from erllama.cache.client import MetaClient

    engine_ref: list[Engine] = []
    make_writer = publish_writer_factory(
        child.ctx, meta_endpoint, holder, layout, spec.tier, timeout_s=WRITER_META_TIMEOUT_S
    )
    if spec.backend == "stub":
        make_writer = slow_writer(make_writer, spec.stub.save_delay_ms)
    saver = Saver(
        make_writer,
        queue_bytes=cfg.cache.writer_queue_bytes,
        on_done=lambda job: engine_ref[0].on_save_done(job) if engine_ref else None,
    )
    cache = MetaCache(MetaClient(child.ctx, meta_endpoint, holder, timeout_s=META_TIMEOUT_S), saver)

    def emit(client_id: bytes, msg: Msg) -> None:
        to_io(pair, [IoThread.REPLY, client_id, *encode(msg)])

    sup = cfg.supervisor
    engine = Engine(
        backend,
        cache,
        model_id=model_id,
        spec=spec,
        policy=policy,
        emit=emit,
        inbox=inbox,
        cancels=cancels,
        # leave the supervisor's SIGTERM/SIGKILL schedule some slack (Stop, drain, term);
        # the root allows drain_timeout_s + evict_save_timeout_ms before its SIGTERM
        drain_timeout_s=sup.drain_timeout_s * STOP_SLACK,
        save_timeout_s=cfg.cache.evict_save_timeout_s,
        report=child.send,  # to the root; queued before any reply emitted after it
        hostname=(cfg.cache.hostname or "").encode(),
        version=_dist_version("erllama").encode(),
    )
    engine_ref.append(engine)
    try:  # before Ready: requests held during a restart never run on the base weights
        engine.adapters.restore(cfg.adapters, cfg.adapter_next_handle)
    except ErllamaError:
        cache.close(timeout_s=0.0)
        backend.close()
        raise
    saver.start()
    io.attach(engine, backend)
    to_io(pair, [IoThread.CONNECT, model_id.encode()])
    log.info(
        "event=ready model=%s backend=%s n_ctx=%d tier=%s",
        model_id,
        backend.info.backend,
        backend.info.n_ctx,
        spec.tier,
    )

    def loop() -> int:
        code = 0
        try:
            engine.run()
        except FatalEngineError as exc:
            log.error("event=fatal %s: exiting so the supervisor restarts the model", exc)
            code = 1
        finally:
            io.detach()
            # snapshots already queued are sound even after a fatal error: let them land
            cache.close(timeout_s=engine.save_timeout_s if code else 1.0)
            backend.close()
            if saver.alive:  # a write past evict_save_timeout_ms still holds its meta socket
                log.warning("event=saver_abandoned a save is still being written; exiting anyway")
                lingering.append("saver")
        if io.crashed:
            code = 1
        log.info("event=exit code=%d", code)
        return code

    return lifecycle.Started(loop, model_info(model_id, spec, backend))


def run(run_dir: str, child_id: str) -> None:
    """A ``multiprocess`` target: ``main`` with its exit code."""
    raise SystemExit(main(run_dir, child_id))
