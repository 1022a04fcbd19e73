"""The request engine of a worker: admission, cache resolution, prefill, generation, saves.

Pure of sockets: it reads ``InboxItem``s from a ``SimpleQueue`` and emits
``(client_id, message)`` through a callback, so tests drive it in-process
with ``StubBackend`` and a fake ``WorkerCache``. The worker runs it on the
compute (main) thread, which alone touches the backend.

Request flow (REFERENCE §8 with its R:s):

* One active request at a time, on sequence 0. ``n_seq_max > 1`` is accepted
  but requests are still served one after another (no co-batching yet);
  the FIFO of pending requests is served in arrival order.
* Admission (on arrival, so bad input is answered at once): tokenize
  (``add_special=True, parse_special=False``) or take the tokens; checks give
  ``bad_request``, ``empty_prefix``, ``invalid_token``, ``context_overflow``,
  ``badarg``. ``response_tokens`` defaults to ``spec.default_response_tokens``
  (complete/stream) or 64 (infer), always capped at ``n_ctx - len(prompt)`` (D9).
* Cancel: the IO thread marks ``CancelSet`` at once (seen between tokens and
  between prefill chunks) and also queues the Cancel; a queued request is
  removed from the FIFO and answered ``done`` / a result with ``cancelled`` (D38).
* Cache resolution (``sequence.py``) picks the best of the live KV of sequence
  0 and the cache rows (exact key, parent_key, longest prefix), restores,
  truncates to the common length and re-decodes the last reused token.
* Prefill in chunks of ``policy.prefill_chunk_size`` that stop exactly at each
  checkpoint-ladder rung, where a cold save is taken; generation samples,
  decodes the sampled token at once (KV == ``context_tokens``, D27), emits it,
  and takes continued saves at absolute frontiers; a finish save at the end.
* Saves never block on I/O: a snapshot goes to the saver thread.
* Other ops run between tokens: ``apply_chat_template`` (chat.py), ``embed``
  (embedding.py: a separate llama.cpp context, D31). Adapter ops (adapters.py)
  wait for the running request to end, then change the weights, the cache
  namespace (the effective fingerprint) and clear the live KV.
* Text (``textstream.py``): one ``TokenEvent`` per generated token (its text
  may be empty: partial UTF-8, or held back because it could start a stop
  string); the held-back tail goes out with the last token. A cancelled
  stream does not flush it.
* One generation loop (``_generate``) over a sink (``generation.py``): plain
  text, or the span events of a model with thinking / tool-call markers
  (``spans.py``: hidden thinking tokens still go into the KV and ``KvState``).
  ``verify`` (``speculative.py``) runs only on an idle model and leaves the
  live KV truncated to the part it reused (D28).

An unexpected exception inside a request is answered ``internal`` and raised
as ``FatalEngineError``: the backend state may be corrupt, so the worker exits
non-zero and the supervisor restarts it.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from queue import Empty, SimpleQueue
from typing import TYPE_CHECKING

from erllama.cache.kvc import SaveReason
from erllama.config import ModelSpec, PolicyConfig
from erllama.protocol.codec import encode_result, error_reply, reply
from erllama.protocol.errors import ErllamaError, ErrorCode
from erllama.protocol.messages import (
    AdapterRecord,
    AdaptersChanged,
    ApplyChatTemplate,
    CacheHit,
    Cancel,
    Complete,
    Detokenize,
    DoneEvent,
    Embed,
    Evict,
    ListCachedPrefixes,
    ModelStatus,
    Msg,
    Phase,
    PrefillResult,
    Reply,
    ShutdownModel,
    ShutdownSaving,
    Tokenize,
    Verify,
    WorkerStatus,
)
from erllama.protocol.tokens import pack_tokens, unpack_tokens
from erllama.workers import embedding, tokenizer_ops
from erllama.workers.adapters import ADAPTER_OPS, AdapterSet
from erllama.workers.backend import ModelBackend, Sampler
from erllama.workers.cachelink import WorkerCache
from erllama.workers.chat import ChatTemplate
from erllama.workers.generation import new_sink
from erllama.workers.request import Request, admit, build_result, build_stats
from erllama.workers.sequence import KvState, SeqCache
from erllama.workers.spans import SpanSetup
from erllama.workers.speculative import verify
from erllama.workers.textstream import cut_at_stop

if TYPE_CHECKING:
    from erllama.workers.saver import SaveJob

log = logging.getLogger(__name__)

EVICT_SAVE_TIMEOUT_S = 30.0  # upstream evict_save_timeout_ms (cache.evict_save_timeout_ms)


@dataclass(slots=True)
class Inbound:
    """A decoded request from ``client_id`` (routing identity, b"" for none)."""

    client_id: bytes
    msg: Msg


@dataclass(frozen=True, slots=True)
class StopRequest:
    """Stop the engine: ``drain`` lets the running request finish (bounded)."""

    drain: bool = True
    reason: str = "stop"


InboxItem = Inbound | StopRequest


class CancelSet:
    """``(client_id, request_id)`` pairs to cancel; written by the IO thread, read here."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: set[tuple[bytes, str]] = set()

    def mark(self, client_id: bytes, request_id: str) -> None:
        with self._lock:
            self._items.add((client_id, request_id))

    def marked(self, client_id: bytes, request_id: str) -> bool:
        with self._lock:
            return (client_id, request_id) in self._items

    def discard(self, client_id: bytes, request_id: str) -> None:
        with self._lock:
            self._items.discard((client_id, request_id))


def batch_safe_rungs(rungs: list[int], start: int, end: int, chunk: int) -> list[int]:
    """The ladder rungs a prefill of ``[start, end)`` can stop at without a small batch.

    On CPU the logits of a position depend on the batch shape: batches under ~100
    tokens take another kernel path. A rung is kept only if the stretch before it
    and the rest after it are each at least one chunk, so the cold path and every
    warm path compute the same numbers (a skipped rung is a save not taken, never
    a wrong one).
    """
    out: list[int] = []
    prev = start
    for r in rungs:
        if r - prev >= chunk and end - r >= chunk:
            out.append(r)
            prev = r
    return out


class FatalEngineError(Exception):
    """A request failed unexpectedly; the backend state cannot be trusted any more."""


Emit = Callable[[bytes, Msg], None]


class Engine:
    """Serves the requests of one model (see the module docstring).

    Args:
        backend: the loaded model (this thread only).
        cache: the engine's view of the KV cache.
        model_id: the model id (status pushes).
        spec: the model's spec (defaults, tier, fingerprint mode).
        policy: the effective save policy.
        emit: sends one message to a client (``b""`` = a status push to the router).
        inbox: where requests arrive (the IO thread puts, this thread gets).
        cancels: the cancel marks shared with the IO thread.
        drain_timeout_s: a graceful stop cancels the running request after this.
        save_timeout_s: how long an evict or shutdown save (a stop) may take to land
            (``cache.evict_save_timeout_ms``); one still unwritten then is counted
            (``saves_timed_out``) and logged, and the stop goes on.
        report: sends one message to the root (``AdaptersChanged``, ``ShutdownSaving``);
            None: nowhere.
        hostname, version: written into every saved row.
    """

    def __init__(
        self,
        backend: ModelBackend,
        cache: WorkerCache,
        *,
        model_id: str,
        spec: ModelSpec,
        policy: PolicyConfig,
        emit: Emit,
        inbox: SimpleQueue[InboxItem] | None = None,
        cancels: CancelSet | None = None,
        drain_timeout_s: float = 30.0,
        save_timeout_s: float = EVICT_SAVE_TIMEOUT_S,
        report: Callable[[Msg], None] | None = None,
        hostname: bytes = b"",
        version: bytes = b"",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self.cache = cache
        self.model_id = model_id
        self.spec = spec
        self.policy = policy
        self.inbox: SimpleQueue[InboxItem] = inbox if inbox is not None else SimpleQueue()
        self.cancels = cancels if cancels is not None else CancelSet()
        self._emit = emit
        self._clock = clock
        self.drain_timeout_s = drain_timeout_s
        self.save_timeout_s = save_timeout_s
        self._report = report
        self.kv = KvState()
        self.saves = SeqCache(
            backend, cache, spec, policy, self.kv, hostname=hostname, version=version
        )
        # LoRA (adapters.py): a change moves the cache namespace and drops the live KV
        # and every change is reported to the root, which re-attaches the set after a restart
        self.adapters = AdapterSet(
            backend,
            backend.info.fingerprint,
            self._adapters_changed,
            on_persist=self._adapters_persist,
        )
        self.chat = ChatTemplate(backend)
        # thinking / tool-call markers configured: generation goes through spans.py
        self.spans = SpanSetup.for_model(spec, backend)
        self._deferred: list[Inbound] = []  # adapter ops that arrived while a request ran
        self._pending: deque[Request] = deque()
        self._active: Request | None = None
        self._stopping = False
        self._drain_deadline = 0.0
        self._last_status: WorkerStatus | None = None
        # read by the IO thread (plain attributes: atomic under the GIL)
        self.phase: Phase = "idle"
        self.active = 0
        self.tokens_total = 0
        self.last_cache_hit: CacheHit | None = None

    # ================================================================ loop
    def run(self) -> None:
        """Serve until a StopRequest; then the shutdown save and a bounded flush."""
        self.push_status()
        while not self._stopping:
            if self._pending:
                self._serve(self._pending.popleft())
                self._run_deferred()
            else:
                self._dispatch(self.inbox.get(), busy=False)
        self._shutdown()

    def run_until_idle(self) -> None:
        """Process everything queued now, then return (tests)."""
        while True:
            if self._pending and not self._stopping:
                self._serve(self._pending.popleft())
                self._run_deferred()
                continue
            try:
                item = self.inbox.get_nowait()
            except Empty:
                return
            self._dispatch(item, busy=False)

    def _shutdown(self) -> None:
        """The shutdown save of the live sequence, and every queued save, within
        ``save_timeout_s``; what is still unwritten then is counted and logged."""
        deadline = self._clock() + self.save_timeout_s
        if self.kv.tokens:
            self.saves.save_live(SaveReason.SHUTDOWN, unconditional=True)
        if self._report is not None:  # the root holds its SIGTERM while we write
            self._report(ShutdownSaving(timeout_s=self.save_timeout_s))
        if not self.cache.flush(max(0.0, deadline - self._clock())):
            self._save_timed_out("shutdown")
        self.saves.send_counters()
        self._set_phase("idle")

    def _save_timed_out(self, what: str) -> None:
        log.warning(
            "event=save_timed_out save=%s timeout_ms=%d: the save is abandoned",
            what,
            round(self.save_timeout_s * 1000),
        )
        self.saves.count("saves_timed_out")

    # ================================================================ status
    def push_status(self) -> None:
        a = self._active
        status = WorkerStatus(
            model=self.model_id,
            phase=self.phase,
            pending_len=len(self._pending),
            queue_depth=1 if a is not None and a.streaming else 0,
            last_cache_hit=self.last_cache_hit,
            active=self.active,
        )
        if status != self._last_status:
            self._last_status = status
            self._emit(b"", status)

    def _set_phase(self, phase: Phase) -> None:
        self.phase = phase
        self.push_status()

    # ================================================================ inbox
    def _poll(self) -> None:
        """Between tokens and prefill chunks: take what arrived, honour deadlines."""
        while True:
            try:
                item = self.inbox.get_nowait()
            except Empty:
                break
            self._dispatch(item, busy=True)
        a = self._active
        if a is not None and not a.cancelled:
            if self.cancels.marked(a.client_id, a.request_id):
                a.cancelled = True
            elif self._stopping and self._clock() >= self._drain_deadline:
                log.info("event=drain_timeout request=%s cancelled", a.request_id)
                a.cancelled = True

    def _dispatch(self, item: InboxItem, *, busy: bool) -> None:
        if isinstance(item, StopRequest):
            self._begin_stop(item)
            return
        cid, msg = item.client_id, item.msg
        try:
            if not isinstance(msg, Evict | ShutdownModel | Cancel | ModelStatus):
                self._ensure_context()
            if isinstance(msg, Complete):
                self._enqueue(cid, msg)
            elif isinstance(msg, Cancel):
                self._cancel(cid, msg.target)
            elif isinstance(msg, Tokenize | Detokenize):  # mostly the IO thread's (iothread.py)
                self._emit(cid, tokenizer_ops.answer(self.backend, msg))
            elif isinstance(msg, ModelStatus):
                self._emit(cid, reply(msg.request_id, self.phase))
            elif isinstance(msg, ListCachedPrefixes):
                n = self.saves.cached_prefix_len(unpack_tokens(msg.tokens))
                self._emit(cid, reply(msg.request_id, n))
            elif isinstance(msg, Evict | ShutdownModel):
                self._evict(cid, msg, busy=busy)
            elif isinstance(msg, Verify):  # speculative.py: only on an idle model (D28)
                busy = busy or bool(self._pending)
                result = verify(self.backend, self.kv, msg, busy=busy, stopping=self._stopping)
                self._emit(cid, reply(msg.request_id, result))
            elif isinstance(msg, ApplyChatTemplate):
                toks = self.chat.apply(msg.messages, msg.system, msg.tools)
                self._emit(cid, reply(msg.request_id, pack_tokens(toks)))
            elif isinstance(msg, Embed):
                vector = embedding.embed(self.backend, unpack_tokens(msg.tokens))
                self._emit(cid, reply(msg.request_id, vector))
            elif isinstance(msg, ADAPTER_OPS):
                if busy:  # between requests only: the running one keeps its weights and keys
                    self._deferred.append(item)
                else:
                    self._emit(cid, reply(msg.request_id, self.adapters.handle(msg)))
            else:
                self._emit(
                    cid,
                    error_reply(
                        msg.request_id,
                        ErrorCode.BAD_REQUEST,
                        f"{type(msg).__name__} is not a worker operation",
                    ),
                )
        except ErllamaError as exc:
            self._emit(cid, error_reply(msg.request_id, exc.code, exc.message, detail=exc.detail))
        except Exception as exc:  # outside a request the KV is untouched: answer, go on
            log.exception("operation %s failed", type(msg).__name__)
            self._emit(cid, error_reply(msg.request_id, ErrorCode.INTERNAL, f"{exc!r}"))

    def _adapters_changed(self, fingerprint: bytes) -> None:
        """The adapter set changed: later keys use its fingerprint, the live KV is stale."""
        self.saves.set_fingerprint(fingerprint)
        self.saves.clear_kv()

    def _adapters_persist(self, records: list[AdapterRecord], next_handle: int) -> None:
        """Tell the root the new set (before the op's reply goes out: same IO-thread queue)."""
        if self._report is not None:
            self._report(AdaptersChanged(adapters=records, next_handle=next_handle))

    def _run_deferred(self) -> None:
        """Adapter ops held back while a request ran, in arrival order."""
        while self._deferred:
            self._dispatch(self._deferred.pop(0), busy=False)

    def _enqueue(self, cid: bytes, msg: Complete) -> None:
        if self._stopping:
            self._emit(
                cid,
                error_reply(
                    msg.request_id, ErrorCode.SHUTTING_DOWN, "the model is stopping", retryable=True
                ),
            )
            return
        if self._in_flight(cid, msg.request_id):
            raise ErllamaError(
                f"request id {msg.request_id!r} is already in flight", code=ErrorCode.BAD_REQUEST
            )
        req = admit(cid, msg, self.backend.info, self.spec, self.backend, self._clock())
        self._pending.append(req)
        self.push_status()

    def _in_flight(self, cid: bytes, rid: str) -> bool:
        a = self._active
        if a is not None and a.client_id == cid and a.request_id == rid:
            return True
        return any(r.client_id == cid and r.request_id == rid for r in self._pending)

    def _cancel(self, cid: bytes, target: str) -> None:
        a = self._active
        if a is not None and a.client_id == cid and a.request_id == target:
            a.cancelled = True
        for req in list(self._pending):
            if req.client_id == cid and req.request_id == target:
                self._pending.remove(req)
                req.cancelled = True
                self._respond(req, None, [])
                self.push_status()
        # every earlier message is processed: the mark has done its job
        self.cancels.discard(cid, target)

    def _begin_stop(self, stop: StopRequest) -> None:
        if not self._stopping:
            log.info("event=stopping reason=%s drain=%s", stop.reason, stop.drain)
            self._stopping = True
            self._drain_deadline = self._clock() + (self.drain_timeout_s if stop.drain else 0.0)
        elif not stop.drain:
            self._drain_deadline = self._clock()
        while self._pending:
            req = self._pending.popleft()
            self._emit(
                req.client_id,
                error_reply(
                    req.request_id, ErrorCode.SHUTTING_DOWN, "the model is stopping", retryable=True
                ),
            )
        a = self._active
        if a is not None and not stop.drain:
            a.cancelled = True
        self.push_status()

    def _evict(self, cid: bytes, msg: Evict | ShutdownModel, *, busy: bool) -> None:
        """Save the live sequence unconditionally; evict (when idle) also frees the KV (D10)."""
        reason = SaveReason.EVICT if isinstance(msg, Evict) else SaveReason.SHUTDOWN
        job = self.saves.save_live(reason, unconditional=True) if self.kv.tokens else None
        if job is not None and not job.done.wait(self.save_timeout_s):
            self._save_timed_out(reason.name.lower())
        if reason == SaveReason.EVICT and not busy:
            self.saves.clear_kv()
        self.saves.send_counters()
        if isinstance(msg, Evict) and msg.release_context:
            # the scheduler under memory pressure: free the llama context, keep the
            # weights; the next request re-creates it (_ensure_context) and restores warm
            released = False
            if not busy and not self._pending:
                released = self.backend.release_context()
            log.info("event=release_context released=%s busy=%s", released, busy)
            self._emit(cid, reply(msg.request_id, {"released": released}))
            return
        self._emit(cid, reply(msg.request_id, None))

    def _ensure_context(self) -> None:
        """Re-create a context the scheduler released (no-op when it exists)."""
        self.backend.ensure_context()

    # ================================================================ one request
    def _serve(self, req: Request) -> None:
        self._active = req
        self.active = 1
        req.admitted_at = self._clock()
        sampler: Sampler | None = None
        try:
            if self.cancels.marked(req.client_id, req.request_id):
                req.cancelled = True
                self._respond(req, None, [])
                return
            try:
                sampler = self.backend.new_sampler(0, req.sampler_opts)
            except ErllamaError as exc:  # grammar_failed, badarg: the KV is untouched
                self._terminal(req, error_reply(req.request_id, exc.code, exc.message))
                return
            self._set_phase("prefilling")
            self._prefill(req)
            req.prefill_done_at = self._clock()
            if not req.cancelled and req.mode != "prefill":
                self._set_phase("generating")
                self._generate(req, sampler)
            self._finish(req)
        except ErllamaError as exc:
            log.info("request %s failed: %s", req.request_id, exc)
            self.saves.clear_kv()  # a failed decode leaves the KV unknown
            self._terminal(req, error_reply(req.request_id, exc.code, exc.message))
        except Exception as exc:
            tb = traceback.format_exc()
            log.error("event=request_crashed request=%s\n%s", req.request_id, tb)
            self._terminal(
                req,
                error_reply(
                    req.request_id,
                    ErrorCode.INTERNAL,
                    f"internal error: {exc!r}",
                    remote_traceback=tb,
                ),
            )
            raise FatalEngineError(f"request {req.request_id} crashed: {exc!r}") from exc
        finally:
            if sampler is not None:
                sampler.close()
            self.cancels.discard(req.client_id, req.request_id)
            self._active = None
            self.active = 0
            self._set_phase("idle")

    def _prefill(self, req: Request) -> None:
        """Resolve the cache, then prefill the rest in chunks, saving ladder rungs."""
        start = self.saves.resolve(req)
        self.last_cache_hit = CacheHit(kind=req.kind, prefix_len=req.read)
        self.push_status()
        prompt = req.prompt
        chunk = max(1, self.policy.prefill_chunk_size or len(prompt))
        n_batch = max(chunk, self.backend.info.n_batch)
        rungs = batch_safe_rungs(self.saves.ladder(req, start), start, len(prompt), chunk)
        pos = start
        while pos < len(prompt):
            limit = rungs[0] if rungs else len(prompt)
            end = min(limit, pos + chunk)
            if 0 < limit - end < chunk and limit - pos <= n_batch:
                # never leave a small tail batch: logits depend on the batch shape on CPU
                # (batches under ~100 tokens take another kernel path), so the cold and
                # the warm paths stay bit-identical when every batch is a large one
                end = limit
            self.backend.prefill(0, prompt[pos:end], pos)
            self.kv.extend(prompt[pos:end])
            self.tokens_total += end - pos
            pos = end
            at_rung = bool(rungs) and rungs[0] == pos
            if at_rung:
                rungs.pop(0)
                self.saves.save_gated(req, SaveReason.COLD)
            if pos == len(prompt):
                self.kv.remember_logits(pos, self.backend.logits_snapshot())
                if not at_rung and self.saves.prompt_end_due(req, start):
                    # the prompt's own row, with its logits: the same prompt again is an
                    # exact hit that samples at once (bit-exact with this cold run)
                    self.saves.save_gated(req, SaveReason.COLD)
            self._poll()
            if req.cancelled:
                return

    def _generate(self, req: Request, sampler: Sampler) -> None:
        """The one generation loop (``generation.py``): sample, emit, decode, save, poll."""
        sink = new_sink(self.backend, req, self.spans)
        try:
            while True:
                if req.first_logits is not None:
                    tok = self.backend.sample_from_logits(sampler, req.first_logits)
                    req.first_logits = None
                else:
                    tok = sink.sampler(sampler).sample()
                events, done = sink.accept(
                    tok, eog=self.backend.is_eog(tok), kv_len=len(self.kv.tokens) + 1
                )
                for msg in events:
                    self._emit(req.client_id, msg)
                # decode after the token is on its way: the client sees it one decode sooner
                # (time to first token), and every committed token still ends up in KV (D27)
                self.backend.decode_one(0, tok, len(self.kv.tokens))
                self.kv.append(tok)  # hidden thinking tokens too
                self.tokens_total += 1
                if done:
                    return
                if inject := sink.inject():
                    self.backend.prefill(0, inject, len(self.kv.tokens))
                    self.kv.extend(inject)
                    self.tokens_total += len(inject)
                if self.saves.continued_due(req):
                    self.saves.save_gated(req, SaveReason.CONTINUED)
                self._poll()
                if req.cancelled:
                    return
        finally:
            sink.close()

    # ================================================================ finishing
    def _finish(self, req: Request) -> None:
        finish_key = self.saves.save_finish(req)
        self.kv.session = req.session_id
        self.saves.send_counters(req.counters)  # before the reply: readers see them sooner
        self._respond(req, finish_key, list(self.kv.tokens))

    def _respond(self, req: Request, finish_key: bytes | None, context: list[int]) -> None:
        """The terminal message: ``done`` for a stream, the result for ``complete``."""
        stats = build_stats(req, self._clock(), finish_key, len(context))
        log.debug(
            "event=finish request=%s reason=%s kind=%s read=%d created=%d prompt=%d gen=%d",
            req.request_id,
            stats.finish_reason,
            req.kind,
            req.read,
            req.created,
            len(req.prompt),
            len(req.generated),
        )
        if req.streaming:
            done = DoneEvent(request_id=req.request_id, seq=req.next_seq(), stats=stats)
            self._terminal(req, done)
            return
        if req.mode == "prefill":
            prefill = PrefillResult(
                context_tokens=pack_tokens(context),
                committed_tokens=len(context),
                finish_key=finish_key,
                cache_hit_kind=req.kind,
                cache_delta=stats.cache_delta,
            )
            self._terminal(req, Reply(request_id=req.request_id, result=encode_result(prefill)))
            return
        text = cut_at_stop(self.backend.detokenize(req.generated), req.stop_sequence)
        result = build_result(req, stats, text, context)
        self._terminal(req, Reply(request_id=req.request_id, result=encode_result(result)))

    def _terminal(self, req: Request, msg: Msg) -> None:
        """A request's last message. The running one's phase ends first, and that status
        goes out first: a client that asks ``status`` (answered from the router's table)
        as soon as its reply arrives must not see its own request still running."""
        if req is self._active:
            self._active = None
            self.active = 0
            self._set_phase("idle")
        self._emit(req.client_id, msg)

    # ================================================================ saver callback
    def on_save_done(self, job: SaveJob) -> None:
        """Called by the saver thread when a job ends."""
        self.saves.on_save_done(job)
