"""Every wire shape of the client, router, worker and control channels.

The cache-meta channel lives in ``protocol/meta_messages.py`` (same rules).

Rules (STYLE §3.1):
* Every message is a frozen, keyword-only msgspec Struct tagged on ``t``.
  The tag is the operation name; it is never reused for another shape.
* Every message carries ``request_id`` (empty for pushes such as status).
* New fields go at the end with a default; a field's type never changes.
* Limits are part of the types (``Annotated[..., Meta(max_length=...)]``)
  and are checked while decoding, before anything is built from the data.
* Token lists travel as packed little-endian u32 bytes (``protocol.tokens``).
* Results of a request travel inside ``Reply.result`` as ``msgspec.Raw`` so
  the router can forward them without knowing their type; the client decodes
  them with the result type of the operation it sent.

Channels:
    client -> router    ClientRequest   (router forwards most of them, body untouched)
    router -> scheduler SCHEDULER_OPS   (request id replaced by the router's own)
    router -> client    ClientReply     (Reply, ErrorReply, stream events)
    worker -> router    WorkerPush      (WorkerStatus) plus ClientReply bodies
    child <-> root      ControlMessage  (Hello, Init, Ready, StartFailed, Ping, Pong, Stop, ...)
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

# ---------------------------------------------------------------- limits
MAX_ID_LEN = 256
MAX_TEXT_LEN = 8 * 1024 * 1024  # 8 MiB of prompt text
MAX_TOKENS = 1 << 20  # 1M tokens in one list
MAX_STOP_SEQUENCES = 64
MAX_STOP_LEN = 1024
MAX_GRAMMAR_LEN = 1024 * 1024
MAX_LIST_LEN = 100_000
MAX_CHAT_MESSAGES = 10_000
MAX_CHAT_TOOLS = 1_000
MAX_PATH_LEN = 4096
MAX_ADAPTER_SCALE = 1e6  # |scale| of a LoRA adapter (also keeps NaN and inf off the wire)
MAX_KEEP_ALIVE_S = 1e9  # |keep_alive| (about 31 years; also keeps NaN and inf off the wire)

Id = Annotated[str, msgspec.Meta(max_length=MAX_ID_LEN)]
Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT_LEN)]
TokenBytes = Annotated[bytes, msgspec.Meta(max_length=4 * MAX_TOKENS)]
Key = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
Phase = Literal["idle", "prefilling", "generating"]
# Why the router put a model to sleep: its keep_alive ran out, memory pressure (the
# scheduler), or an operator's ``sleep_model``.
SleepReason = Literal["keep_alive", "pressure", "request"]
KeepAliveS = Annotated[float, msgspec.Meta(ge=-MAX_KEEP_ALIVE_S, le=MAX_KEEP_ALIVE_S)]
HitKind = Literal["exact", "partial", "cold", "sticky"]
FinishReason = Literal["stop", "length", "cancelled"]


class Msg(msgspec.Struct, frozen=True, kw_only=True, tag_field="t"):
    """Base of every message."""

    request_id: Id = ""


# ================================================================ results
class Result(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Base of the result structs carried in ``Reply.result``."""


class CacheHit(Result, frozen=True):
    kind: HitKind
    prefix_len: int


class CacheDelta(Result, frozen=True):
    read: int = 0
    created: int = 0


class Stats(Result, frozen=True):
    """The stats map; also the payload of the ``done`` event."""

    prompt_tokens: int
    completion_tokens: int
    prefill_ms: float
    generation_ms: float
    cache_hit_kind: HitKind
    finish_reason: FinishReason
    cancelled: bool
    finish_key: bytes | None
    committed_tokens: int
    cache_delta: CacheDelta
    stop_sequence: str | None = None


class CompletionResult(Result, frozen=True):
    reply: str
    generated: bytes  # packed u32 tokens
    context_tokens: bytes  # packed u32 tokens
    committed_tokens: int
    finish_key: bytes | None
    cache_hit_kind: HitKind
    finish_reason: FinishReason
    cache_delta: CacheDelta
    stats: Stats
    stop_sequence: str | None = None


class PrefillResult(Result, frozen=True):
    context_tokens: bytes
    committed_tokens: int
    finish_key: bytes | None
    cache_hit_kind: HitKind
    cache_delta: CacheDelta


class ModelInfo(Result, frozen=True):
    """``model_info`` (REFERENCE §1.1) plus the supervisor's view of the model."""

    id: str
    model_id: str
    pid: int | None
    status: str  # idle | prefilling | generating | loading | restarting | failed | sleeping
    phase: Phase
    pending_len: int
    last_cache_hit: CacheHit | None
    backend: str
    context_size: int
    quant_type: str
    quant_bits: int
    quant_tag: str
    tier: str
    fingerprint: bytes
    loaded_at_monotonic: int
    vram_estimate_b: int
    # loading | ready | restarting | failed | stopping | sleeping (its worker was stopped
    # by keep_alive or memory pressure; still registered, the next request wakes it)
    state: str = "ready"
    restarts: int = 0
    last_exit: str | None = None
    keep_alive_s: float | None = None  # the spec's keep_alive (None or negative: never)
    idle_s: float | None = None  # seconds since the router last saw the model busy
    # Where its chat template comes from: gguf, builtin:<name>, file:<path>, inline, stub;
    # empty when the model has none (apply_chat_template answers no_template).
    chat_template: str = ""
    unload_in_s: float | None = None  # until the keep_alive timer fires; None: none runs


class StatusRow(Result, frozen=True):
    """Lock-free per-model observation row, answered by the router."""

    model: str
    phase: Phase = "idle"
    pending_len: int = 0
    queue_depth: int = 0
    last_cache_hit: CacheHit | None = None
    state: str = "ready"


class TierUsage(Result, frozen=True):
    name: str
    path: str
    used_bytes: int
    budget_bytes: int
    rows: int


class DaemonStatus(Result, frozen=True):
    models: list[ModelInfo]
    tiers: list[TierUsage]
    run_dir: str
    pid: int
    scheduler: dict[str, Any] | None = None  # last sample, ratio, last action (if running)


class VramInfo(Result, frozen=True):
    """``vram_info()`` (REFERENCE §1.3): summed over every GPU."""

    total_b: int
    free_b: int
    used_b: int


class SchedulerAction(Result, frozen=True):
    """The scheduler's last finished plan: why, how much it aimed at, what each step did."""

    at: float  # wall clock (time.time())
    reason: str  # above_high | escalate | forced
    target_bytes: int
    steps: list[tuple[str, int, int]]  # (step, things acted on, bytes known freed)
    bytes_freed: int


class SchedulerStatus(Result, frozen=True):
    """``scheduler_status()`` (REFERENCE §9 ``status()``), also what meta shows in
    ``DaemonStatus.scheduler`` (as a map). Every field is always present."""

    enabled: bool  # the run-time switch (config ``enabled``, then enable/disable)
    pressure_source: str
    sampler: str | None  # None: the source cannot measure here (``sampler_reason``)
    sampler_reason: str
    interval_s: float
    high_watermark: float
    low_watermark: float
    min_evict_bytes: int
    evict_tiers: list[str]
    resource: Literal["ram", "vram"] | None
    last_used: int | None
    last_total: int | None
    last_ratio: float | None
    sampled_at: float | None
    last_decision: str
    last_action: SchedulerAction | None
    plans: int
    vram: VramInfo | None
    vram_reason: str


class SchedulerCheck(Result, frozen=True):
    """``force_scheduler_check()``: what one pressure check, run at once, did.

    ``outcome`` ``skipped`` (``reason``: disabled, no_sample, below_watermark, in_band,
    busy), ``acted`` (``reason``: above_high or forced; ``action`` is the finished
    plan) or ``running`` (the plan outlived the reply's wait; its result shows in
    ``scheduler_status().last_action``).
    """

    outcome: Literal["skipped", "acted", "running"]
    reason: str
    last_ratio: float | None = None
    action: SchedulerAction | None = None


class VerifyResult(Result, frozen=True):
    """``verify``: ``accepted`` leading candidates agree with the model's argmax;
    ``next_token`` is its argmax after them, ``eos`` when that is an end-of-generation
    token (the client returns ``"eos"`` then)."""

    accepted: int
    next_token: int
    eos: bool = False


class AdapterInfo(Result, frozen=True):
    """One attached LoRA adapter (``list_adapters``), in attach order."""

    handle: str
    scale: float


# ================================================================ requests (client -> router)
class RequestOptions(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Options of ``complete`` / ``stream`` / ``infer`` (REFERENCE §1.4)."""

    response_tokens: int | None = None
    parent_key: Key | None = None
    session_id: Id | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    grammar: Annotated[str, msgspec.Meta(max_length=MAX_GRAMMAR_LEN)] | None = None
    stop_sequences: (
        Annotated[
            list[Annotated[str, msgspec.Meta(max_length=MAX_STOP_LEN)]],
            msgspec.Meta(max_length=MAX_STOP_SEQUENCES),
        ]
        | None
    ) = None
    thinking: Literal["enabled", "disabled"] | None = None
    thinking_budget_tokens: int | None = None
    # A prompt text's special-token markers (``<start_of_turn>``...) become the special
    # tokens themselves; off (the default), they are tokenized as plain text.
    parse_special: bool = False
    # Seconds the model stays loaded once idle after this request (Ollama's keep_alive):
    # overrides the model's keep_alive_s for that idle period; negative: never unload,
    # 0: unload as soon as idle. None: the model's keep_alive_s.
    keep_alive: KeepAliveS | None = None


class LoadModel(Msg, frozen=True, tag="load_model"):
    config: dict[str, Any]
    model_id: Id | None = None


class Unload(Msg, frozen=True, tag="unload"):
    model: Id


class ListModels(Msg, frozen=True, tag="list_models"):
    pass


class GetModelInfo(Msg, frozen=True, tag="model_info"):
    model: Id


class Complete(Msg, frozen=True, tag="complete"):
    """``complete`` (mode complete), ``stream`` (text -> events), ``infer`` (tokens -> events).

    Mode ``prefill`` is ``prefill_only``: prefill, fire the finish save, no sampling;
    the reply carries a ``PrefillResult``.
    """

    model: Id
    mode: Literal["complete", "stream", "infer", "prefill"] = "complete"
    prompt: Text | None = None
    tokens: TokenBytes | None = None
    options: RequestOptions = RequestOptions()


class Cancel(Msg, frozen=True, tag="cancel"):
    """Cancel the stream whose request id is ``target`` (same client). Always ok."""

    target: Id


class Tokenize(Msg, frozen=True, tag="tokenize"):
    model: Id
    text: Text
    parse_special: bool = False  # as RequestOptions.parse_special


class Detokenize(Msg, frozen=True, tag="detokenize"):
    model: Id
    tokens: TokenBytes


class GetStatusRow(Msg, frozen=True, tag="status_row"):
    """``phase`` / ``pending_len`` / ``last_cache_hit``: answered by the router."""

    model: Id


class QueueDepth(Msg, frozen=True, tag="queue_depth"):
    model: Id | None = None


class ModelStatus(Msg, frozen=True, tag="status"):
    """``status(model)``: a round trip through the worker."""

    model: Id


class ListCachedPrefixes(Msg, frozen=True, tag="list_cached_prefixes"):
    model: Id
    tokens: TokenBytes


class GetCounters(Msg, frozen=True, tag="counters"):
    pass


class Evict(Msg, frozen=True, tag="evict"):
    model: Id
    # The scheduler: an idle worker also frees its llama context (weights stay); the
    # next request re-creates it. The reply is then ``{"released": bool}``.
    release_context: bool = False


class ShutdownModel(Msg, frozen=True, tag="shutdown"):
    model: Id


class SleepModel(Msg, frozen=True, tag="sleep_model"):
    """Put an idle model to sleep now: its worker stops (the shutdown saves run), the
    model stays registered and the next request wakes it. Answered by the router: the
    reply is ``bool``, False when the model is busy or not ready, or, for
    ``reason="pressure"`` (the scheduler), when its keep_alive says never."""

    model: Id
    reason: SleepReason = "request"


class GetDaemonStatus(Msg, frozen=True, tag="daemon_status"):
    pass


class GetVramInfo(Msg, frozen=True, tag="vram_info"):
    """Answered by the scheduler, which reads NVML at once, enabled or not (``no_gpu``
    without a GPU, NVML or a running scheduler process)."""


class GetSchedulerStatus(Msg, frozen=True, tag="scheduler_status"):
    """The reply is a ``SchedulerStatus``."""


class EnableScheduler(Msg, frozen=True, tag="scheduler_enable"):
    """``enable(bool)``: start or stop the pressure checks (the process keeps running).
    The reply is the new ``SchedulerStatus``."""

    enabled: bool


class SetSchedulerThresholds(Msg, frozen=True, tag="scheduler_set_thresholds"):
    """``set_thresholds(high, low)``: checked like the config (``bad_thresholds``
    unless ``0 <= low < high <= 1``). The reply is the new ``SchedulerStatus``."""

    high: float
    low: float


class ForceSchedulerCheck(Msg, frozen=True, tag="scheduler_force_check"):
    """``force_check()``: sample and decide now. The reply is a ``SchedulerCheck``."""


class ApplyChatTemplate(Msg, frozen=True, tag="apply_chat_template"):
    """``apply_chat_template``: the reply is the prompt as packed u32 tokens.

    ``messages`` entries are ``{role, content}`` maps; their values are checked by the
    worker (a non-string role or content is ``invalid_content``, never a crash, D13).
    ``tools`` entries are ``{name, description, schema}`` maps.
    """

    model: Id
    messages: Annotated[list[dict[str, Any]], msgspec.Meta(max_length=MAX_CHAT_MESSAGES)]
    system: Text | None = None
    tools: Annotated[list[dict[str, Any]], msgspec.Meta(max_length=MAX_CHAT_TOOLS)] | None = None


class Embed(Msg, frozen=True, tag="embed"):
    """``embed``: the reply is ``list[float]`` (n_embd values)."""

    model: Id
    tokens: TokenBytes


class LoadAdapter(Msg, frozen=True, tag="load_adapter"):
    """``load_adapter``: attach a LoRA GGUF at scale 1.0; the reply is its handle (str)."""

    model: Id
    path: Annotated[str, msgspec.Meta(max_length=MAX_PATH_LEN)]


class UnloadAdapter(Msg, frozen=True, tag="unload_adapter"):
    """``unload_adapter``: detach; an unknown handle is fine (idempotent)."""

    model: Id
    handle: Id


class SetAdapterScale(Msg, frozen=True, tag="set_adapter_scale"):
    model: Id
    handle: Id
    scale: Annotated[float, msgspec.Meta(ge=-MAX_ADAPTER_SCALE, le=MAX_ADAPTER_SCALE)]


class ListAdapters(Msg, frozen=True, tag="list_adapters"):
    """``list_adapters``: the reply is ``list[AdapterInfo]``."""

    model: Id


class Verify(Msg, frozen=True, tag="verify"):
    """``verify(model, prefix, candidates, k)`` (REFERENCE §1.6): the reply is a
    ``VerifyResult``. Only while the model is idle (else ``busy``)."""

    model: Id
    prefix: TokenBytes
    candidates: TokenBytes
    k: int


ClientRequest = (
    LoadModel
    | Unload
    | ListModels
    | GetModelInfo
    | Complete
    | Cancel
    | Tokenize
    | Detokenize
    | GetStatusRow
    | QueueDepth
    | ModelStatus
    | ListCachedPrefixes
    | GetCounters
    | Evict
    | ShutdownModel
    | SleepModel
    | GetDaemonStatus
    | GetVramInfo
    | GetSchedulerStatus
    | EnableScheduler
    | SetSchedulerThresholds
    | ForceSchedulerCheck
    | ApplyChatTemplate
    | Embed
    | LoadAdapter
    | UnloadAdapter
    | SetAdapterScale
    | ListAdapters
    | Verify
)
# Operations the router forwards to the model's worker (body untouched).
WORKER_OPS: frozenset[type[Msg]] = frozenset(
    {
        Complete,
        Tokenize,
        Detokenize,
        ModelStatus,
        ListCachedPrefixes,
        Evict,
        ShutdownModel,
        Cancel,
        ApplyChatTemplate,
        Embed,
        LoadAdapter,
        UnloadAdapter,
        SetAdapterScale,
        ListAdapters,
        Verify,
    }
)
# Operations the router forwards to the root supervisor (they change the tree).
TREE_OPS: frozenset[type[Msg]] = frozenset({LoadModel, Unload})
# Operations the router forwards to the scheduler process (``scheduler.sock``).
SCHEDULER_OPS: frozenset[type[Msg]] = frozenset(
    {GetVramInfo, GetSchedulerStatus, EnableScheduler, SetSchedulerThresholds, ForceSchedulerCheck}
)


# ================================================================ replies and events
class Reply(Msg, frozen=True, tag="ok"):
    """Successful, terminal reply; ``result`` is msgpack of the op's result type."""

    result: msgspec.Raw = msgspec.Raw(b"\xc0")


class ErrorReply(Msg, frozen=True, tag="error"):
    """Terminal error reply (also the ``error`` stream event; no ``done`` follows)."""

    code: str
    message: str
    retryable: bool = False
    remote_traceback: str | None = None
    detail: Any = None


class TokenEvent(Msg, frozen=True, tag="token"):
    seq: int
    text: str
    token_id: int


class ThinkingDelta(Msg, frozen=True, tag="thinking_delta"):
    seq: int
    text: str


class ThinkingEnd(Msg, frozen=True, tag="thinking_end"):
    seq: int
    signature: bytes = b""


class ToolCallDelta(Msg, frozen=True, tag="tool_call_delta"):
    seq: int
    text: str


class ToolCallEnd(Msg, frozen=True, tag="tool_call_end"):
    seq: int
    text: str


class DoneEvent(Msg, frozen=True, tag="done"):
    seq: int
    stats: Stats


ClientReply = (
    Reply
    | ErrorReply
    | TokenEvent
    | ThinkingDelta
    | ThinkingEnd
    | ToolCallDelta
    | ToolCallEnd
    | DoneEvent
)
TERMINAL_REPLIES: frozenset[type[Msg]] = frozenset({Reply, ErrorReply, DoneEvent})


# ================================================================ worker -> router pushes
class WorkerStatus(Msg, frozen=True, tag="worker_status"):
    """Pushed by a worker on every phase transition and on connect."""

    model: Id
    phase: Phase = "idle"
    pending_len: int = 0
    queue_depth: int = 0
    last_cache_hit: CacheHit | None = None
    active: int = 0


WorkerPush = WorkerStatus


# ================================================================ control channel (child <-> root)
Role = Literal["meta", "router", "worker", "scheduler", "gateway"]


class Hello(Msg, frozen=True, tag="hello"):
    role: Role
    child_id: Id
    pid: int


class Init(Msg, frozen=True, tag="init"):
    """The child's config section, as builtins (``msgspec.to_builtins``)."""

    config: dict[str, Any]
    incarnation: int = 0


class Ready(Msg, frozen=True, tag="ready"):
    info: dict[str, Any] = {}


class StartFailed(Msg, frozen=True, tag="start_failed"):
    code: str
    message: str


class Ping(Msg, frozen=True, tag="ping"):
    seq: int


class Pong(Msg, frozen=True, tag="pong"):
    seq: int
    active: int = 0
    progress: int = 0  # monotonic counter of work done (tokens); frozen + active = hung


class Stop(Msg, frozen=True, tag="stop"):
    drain: bool = True


class ModelStateChanged(Msg, frozen=True, tag="model_state"):
    """Root -> router: the supervisor's view of one model changed."""

    model: Id
    state: Literal["loading", "ready", "restarting", "failed", "unloaded", "sleeping"]
    info: ModelInfo | None = None
    last_exit: str | None = None
    restarts: int = 0


class WorkerExited(Msg, frozen=True, tag="worker_exited"):
    """Root -> router: the model's process is gone; fail its in-flight requests now."""

    model: Id
    reason: str


class AdapterRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One attached LoRA adapter as the root keeps it: enough to attach it again."""

    handle: str
    path: str
    sha256: bytes  # of the file when it was attached; a restart checks it again
    scale: float


class AdaptersChanged(Msg, frozen=True, tag="adapters_changed"):
    """Worker -> root: the model's attached adapters after a change, in list order.

    The root keeps the last one per model and puts it in the next incarnation's
    ``Init`` (``WorkerInit.adapters``), so a restarted worker attaches the same set,
    under the same handles, before it reports ready. ``next_handle`` is the number the
    next new handle gets (handles are never reused within a model's life).
    """

    adapters: list[AdapterRecord] = []
    next_handle: int = 1


class ShutdownSaving(Msg, frozen=True, tag="shutdown_saving"):
    """Worker -> root, while it stops: the drain is over and its shutdown saves are being
    written; the root holds its SIGTERM up to ``timeout_s`` longer
    (``cache.evict_save_timeout_ms``, never more)."""

    timeout_s: float


class SleepWorker(Msg, frozen=True, tag="sleep_worker"):
    """Router -> root: stop the model's worker as an unload does (drain, shutdown saves)
    but keep the model registered, as ``sleeping``. The router sends it when the model's
    keep_alive runs out or on ``SleepModel``; the root answers with ``ModelStateChanged``
    (``sleeping`` once the worker is gone)."""

    model: Id
    reason: SleepReason = "keep_alive"


class WakeWorker(Msg, frozen=True, tag="wake_worker"):
    """Router -> root: a sleeping model has requests held: start its worker again
    (``ModelStateChanged`` ``loading``, then ``ready``; the router then sends them)."""

    model: Id


class HoldersDied(Msg, frozen=True, tag="holders_died"):
    """Root -> meta: release every pin and reservation held by these holders."""

    holders: list[Id]


ControlMessage = (
    Hello
    | Init
    | Ready
    | StartFailed
    | Ping
    | Pong
    | Stop
    | ModelStateChanged
    | WorkerExited
    | HoldersDied
    | AdaptersChanged
    | ShutdownSaving
    | SleepWorker
    | WakeWorker
)
