"""The typed configuration tree and ``load_config(path)``.

One TOML file is loaded once by the supervisor into ``Config``; each child
receives its own section in its ``Init`` message. Nothing else reads files
or ``ERLLAMA_*`` variables. Units are part of the names (``_s``, ``_ms``,
``_bytes``). ``examples/erllama.toml`` documents every option.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

import msgspec

from erllama import chat_templates

GIB = 1024**3
MIB = 1024**2

QuantName = str
TierName = Literal["ram", "ram_file", "disk"]
TierConfigName = Literal["ram", "ram_file", "disk", "remote"]
REMOTE_SCHEMES = ("redis", "rediss")
REMOTE_LOOKUP_DEADLINE_MAX_MS = 900
"""Under the worker's 1 s meta call timeout (workers/worker.py META_TIMEOUT_S): a parked
remote lookup is answered before the worker gives up on meta."""


class ConfigError(ValueError):
    """The configuration is invalid; the message names the field."""


class _Section(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class ModelOpts(_Section, frozen=True):
    """llama.cpp model parameters."""

    n_gpu_layers: int = 0
    main_gpu: int = 0
    split_mode: Literal["none", "layer", "row"] = "layer"
    tensor_split: list[float] | None = None
    use_mmap: bool = True
    use_mlock: bool = False
    vocab_only: bool = False


class ContextOpts(_Section, frozen=True):
    """llama.cpp context parameters (explicit defaults, REFERENCE D40)."""

    n_ctx: int = 4096
    n_batch: int = 512
    n_ubatch: int = 512
    n_seq_max: int = 1
    n_threads: int | None = None  # None: the number of CPU cores
    n_threads_batch: int | None = None
    embeddings: bool = False
    offload_kqv: bool = True
    flash_attn: Literal["auto", "on", "off"] = "auto"
    type_k: Literal["f16", "f32", "bf16", "q4_0", "q5_0", "q5_1", "q8_0"] = "f16"
    type_v: Literal["f16", "f32", "bf16", "q4_0", "q5_0", "q5_1", "q8_0"] = "f16"
    swa_full: bool = True  # keep the full sliding-window cache: partial restores stay exact


class PolicyConfig(_Section, frozen=True):
    """Save gates (REFERENCE §7), validated at load (D22)."""

    saves_enabled: bool = True
    min_tokens: int = 512
    cold_min_tokens: int = 512
    cold_max_tokens: int = 30000
    continued_interval: int = 2048
    boundary_trim_tokens: int = 32
    boundary_align_tokens: int = 2048
    session_resume_wait_ms: int = 500
    prefill_chunk_size: int | None = None  # None: max(64, n_batch // 4)


class RestartPolicy(_Section, frozen=True):
    """Per-child restart policy (OTP words, supervisord/circus numbers)."""

    restart: Literal["permanent", "transient", "temporary"] = "transient"
    max_restarts: int = 5
    within_s: float = 60.0
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    startsecs: float = 5.0


class StubOpts(_Section, frozen=True):
    """Knobs of the deterministic stub backend (tests only)."""

    n_ctx: int = 4096
    n_vocab: int = 32000
    token_delay_ms: float = 0.0
    prefill_delay_ms_per_token: float = 0.0
    crash_after_tokens: int | None = None
    crash_mode: Literal["sigkill", "segfault", "exit", "raise", "hang"] = "sigkill"
    hang_after_tokens: int | None = None
    fail_load: str | None = None  # an error code to fail the load with
    load_delay_ms: float = 0.0
    # Fault tests (tests/faults): crash per crash_mode while loading, in the prefill call
    # that reaches this many prefilled tokens, or (idle_fault) from a thread while idle.
    # With fault_arm_path, a fault fires only while that file exists and removes it first
    # (each arming fires once), so a restarted worker loads and serves normally.
    crash_on_load: bool = False
    crash_after_prefill_tokens: int | None = None
    idle_fault: bool = False
    fault_arm_path: str | None = None
    # The stub "says" this text: the next token continues the script after the longest
    # piece of it that the context ends with (from the start when none), EOS after its
    # end; the sampler's seed plays no part (workers/stub.py). Drives span tests.
    script: str | None = None
    # LoRA on the stub (workers/stub.py LoraStubBackend): adapter files start with
    # b"ERLSTUBLORA"; the applied set salts every prediction.
    lora: bool = False
    # Every save the writer publishes takes this much longer (a slow disk; stop tests).
    save_delay_ms: float = 0.0


class Markers(_Section, frozen=True):
    start: str
    end: str
    payload_start: str | None = None
    payload_end: str | None = None


class ModelSpec(_Section, frozen=True):
    """One model: what ``load_model(config, model_id)`` takes (REFERENCE §2)."""

    id: str | None = None
    backend: Literal["llama", "stub"] = "llama"
    model_path: str | None = None  # None: the bundled Gemma 3 270M Q4_K_M
    model_opts: ModelOpts = ModelOpts()
    context_opts: ContextOpts = ContextOpts()
    fingerprint: str | None = None  # 64 hex chars; None: computed per fingerprint_mode
    fingerprint_mode: Literal["safe", "gguf_chunked", "fast_unsafe"] = "safe"
    quant_type: QuantName | None = None  # None: read from the GGUF (llama) / "f16" (stub)
    quant_bits: int | None = None
    ctx_params_hash: str | None = None  # 64 hex chars; None: derived from context_opts
    context_size: int | None = None  # None: n_ctx
    tier: TierName = "ram"
    policy: dict[str, int | bool | None] = {}
    default_response_tokens: int = 256
    # The chat template (erllama/chat_templates.py): None = the GGUF's own, or for a GGUF
    # without one its architecture's built-in (the bundled Gemma 3 270M: "gemma3"); "gguf";
    # a built-in name ("gemma3"); a jinja template string; or a path to a template file.
    chat_template: str | None = None
    thinking_markers: Markers | None = None
    tool_call_markers: Markers | None = None
    # HMAC-SHA256 key of the thinking_end signatures (REFERENCE §1.6); None or "": unsigned.
    # Upstream has one global key; here it is per model, as the worker gets only its spec.
    thinking_signing_key: str | None = None
    restart: RestartPolicy = RestartPolicy()
    stub: StubOpts = StubOpts()
    # Idle timer (Ollama's keep_alive): once the model has had no request in flight and
    # none held for this long, its worker stops (shutdown saves run) and the model stays
    # registered as "sleeping"; the next request loads it again and its cache rows hit
    # warm. A request's own keep_alive overrides it for the idle period after it. 300 s,
    # Ollama's default: a chat user's pauses between turns stay well inside it, while an
    # idle daemon gives its weights and context memory back within minutes; a wake costs
    # one model load, not a cold prompt. Negative (or None over the wire): never; 0: as
    # soon as idle. Memory pressure (the scheduler) may put an idle model to sleep
    # earlier, unless this says never.
    keep_alive_s: float | None = 300.0


class TierConfig(_Section, frozen=True):
    name: TierConfigName
    path: str | None = None  # ram: /dev/shm/erllama-<daemon id>; ram_file, disk: required
    budget_bytes: int = 1 * GIB  # remote: unused (the store's maxmemory bounds it)
    # The remote tier only (cache/remote.py): a Redis-protocol store (Valkey, Redis) that
    # daemons share. redis://[:PASSWORD@]HOST[:PORT][/DB], or rediss:// for TLS.
    url: str | None = None
    password: str | None = None  # overrides the URL's password
    timeout_ms: int = 50  # connect and socket timeout of every call to the store
    # How long a local miss waits at most for the remote probe + fetch (then: a miss; a
    # fetch still running lands in the ram tier for the next request).
    lookup_deadline_ms: int = 750
    ttl_s: int = 7 * 24 * 3600  # every key written gets this TTL; 0: none (maxmemory only)
    # Rows are stored in chunks of this size. 4 MiB - 4 KiB, not 4 MiB: a value of exactly
    # 4 MiB plus the store's string header lands in jemalloc's 5 MiB class (measured on
    # redis 7.0: 1.31x the bytes; this size: 1.001x).
    chunk_bytes: int = 4 * MIB - 4096
    key_prefix: str = "erllama:v1:"
    max_probe_keys: int = 16  # prefix keys asked for in a lookup's one round trip
    upload_queue_rows: int = 256  # write-behind bounds; the oldest queued row goes first
    upload_queue_bytes: int = 1 * GIB


class CacheConfig(_Section, frozen=True):
    tiers: list[TierConfig] = msgspec.field(
        default_factory=lambda: [TierConfig(name="ram", budget_bytes=1 * GIB)]
    )
    policy: PolicyConfig = PolicyConfig()
    reservation_ttl_s: float = 60.0
    sweep_interval_s: float = 30.0
    writer_queue_bytes: int = 256 * MIB
    hostname: str | None = None
    # Evict and shutdown saves (unload, daemon stop, scheduler evict) wait this long for
    # the save to land (upstream's name and default); one cut by it is counted and logged.
    evict_save_timeout_ms: int = 30000

    @property
    def evict_save_timeout_s(self) -> float:
        return self.evict_save_timeout_ms / 1000.0


class SchedulerConfig(_Section, frozen=True):
    enabled: bool = False
    # "custom": ``custom_sampler`` names a factory ``module:attr`` called with the run dir
    # that returns a ``scheduler.sampler.Sampler`` (tests: ``...sampler:file_sampler``).
    pressure_source: Literal["system", "nvml", "noop", "custom"] = "system"
    interval_s: float = 5.0
    high_watermark: float = 0.85
    low_watermark: float = 0.75
    min_evict_bytes: int = 1 * MIB
    evict_tiers: list[TierName] = msgspec.field(default_factory=lambda: ["ram", "ram_file"])
    custom_sampler: str | None = None
    # Rows evicted from ram/ram_file are demoted (copied) into this tier instead when it
    # is configured; None: plain eviction.
    demote_to: TierName | None = "disk"
    # Pressure that stays above high for this many samples after an action escalates to
    # the next action (rows -> idle workers -> keep_alive unloads); one that dips under
    # high in between does not (no eviction storm around the watermark).
    escalate_after_samples: int = 2
    evict_idle_workers: bool = True


class SupervisorConfig(_Section, frozen=True):
    heartbeat_interval_s: float = 2.0
    heartbeat_liveness: int = 3
    stall_timeout_s: float = 120.0
    ready_timeout_s: float = 300.0
    drain_timeout_s: float = 30.0
    term_timeout_s: float = 5.0
    max_restarts: int = 5  # root intensity: restarts of meta/router/scheduler
    within_s: float = 30.0


class DaemonConfig(_Section, frozen=True):
    run_dir: str | None = None  # None: protocol.sockets.default_run_dir()
    endpoint: str | None = None  # None: ipc://<run_dir>/client.sock
    log_level: str = "INFO"
    log_file: str | None = None
    # An extra client endpoint on TCP (``tcp://host:port``), bound by the router beside
    # the ipc one. It requires CURVE (protocol/auth.py): the server's secret key file
    # (``erllama keys``) and a directory of authorized client public keys (``*.key``).
    # insecure_loopback: plain TCP without CURVE, refused unless the host is loopback.
    tcp_endpoint: str | None = None
    curve_server_secret_key: str | None = None
    curve_authorized_dir: str | None = None
    insecure_loopback: bool = False


DEFAULT_HTTP_LISTEN = "127.0.0.1:11480"  # beside Ollama's 11434; loopback only


class HttpConfig(_Section, frozen=True):
    """The HTTP gateway (erllama/gateway/): OpenAI, Anthropic and Ollama APIs, /metrics."""

    # HOST:PORT, or "off" for no gateway. Port 0 takes a free port (the gateway logs it and
    # the root publishes it as the http_listening event). Off loopback, api_keys_file is
    # required (as plain TCP needs CURVE).
    listen: str = DEFAULT_HTTP_LISTEN
    api_keys_file: str | None = None  # one key per line (# comments); Bearer or x-api-key
    max_body_bytes: int = 8 * MIB
    max_header_bytes: int = 64 * 1024
    idle_timeout_s: float = 30.0  # a keep-alive connection idle this long is closed
    max_connections: int = 256  # beyond this, new connections are answered 503
    request_timeout_s: float | None = None  # None: a request waits as long as its model works
    # Other daemons the gateway routes generation over beside its own router (the chooser of
    # erllama/client/routing.py: the daemon warm for the request's prefix, failover when one is
    # down or its queue is full): their client endpoints, tcp:// (their daemon.tcp_endpoint) or
    # ipc:// on this host. Everything else (model lists, tokenizer, /metrics) stays local.
    upstreams: list[str] = []
    # CURVE for tcp:// upstreams: each one's server public key (z85 or its .key file) by
    # endpoint, and this gateway's .key_secret file, whose public key each upstream must have
    # in its curve_authorized_dir. A tcp:// upstream without a key must be on loopback (an
    # upstream with insecure_loopback).
    upstream_server_keys: dict[str, str] = {}
    upstream_secret_key: str | None = None
    routing_policy: Literal["prefix", "round_robin"] = "prefix"
    upstream_connect_timeout_s: float = 2.0  # a dead upstream fails over after this long


class Config(_Section, frozen=True):
    daemon: DaemonConfig = DaemonConfig()
    http: HttpConfig = HttpConfig()
    supervisor: SupervisorConfig = SupervisorConfig()
    models: list[ModelSpec] = []
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()


DEFAULT_MODEL_ID = "default"


def default_config() -> Config:
    """What ``erllama serve`` runs with no config: the bundled model as ``default``."""
    return Config(models=[ModelSpec(id=DEFAULT_MODEL_ID)])


def convert_config(raw: dict[str, Any]) -> Config:
    try:
        return msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(str(exc)) from None


def convert_model_spec(raw: dict[str, Any]) -> ModelSpec:
    try:
        return msgspec.convert(raw, ModelSpec)
    except msgspec.ValidationError as exc:
        raise ConfigError(str(exc)) from None


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Load a TOML file (or the defaults when ``path`` is None), then env overrides.

    ``ERLLAMA_RUN_DIR`` and ``ERLLAMA_ENDPOINT`` override ``daemon.run_dir`` and
    ``daemon.endpoint``.
    """
    if path is None:
        cfg = default_config()
    else:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        cfg = convert_config(raw)
    overrides: dict[str, Any] = {}
    if run_dir := os.environ.get("ERLLAMA_RUN_DIR"):
        overrides["run_dir"] = run_dir
    if endpoint := os.environ.get("ERLLAMA_ENDPOINT"):
        overrides["endpoint"] = endpoint
    if overrides:
        cfg = msgspec.structs.replace(cfg, daemon=msgspec.structs.replace(cfg.daemon, **overrides))
    validate_config(cfg)
    return cfg


def effective_policy(global_policy: PolicyConfig, spec: ModelSpec) -> PolicyConfig:
    """The model's policy: global gates with ``spec.policy`` merged over them, validated."""
    try:
        merged = msgspec.convert(
            {**msgspec.to_builtins(global_policy), **spec.policy}, PolicyConfig
        )
    except msgspec.ValidationError as exc:
        raise ConfigError(f"policy: {exc}") from None
    if merged.prefill_chunk_size is None:
        merged = msgspec.structs.replace(
            merged, prefill_chunk_size=max(64, spec.context_opts.n_batch // 4)
        )
    validate_policy(merged)
    return merged


def validate_policy(p: PolicyConfig) -> None:
    """Upstream's validation order (REFERENCE §7.3); first failure wins."""
    if p.min_tokens < 1:
        raise ConfigError(
            "policy.min_tokens must be >= 1 (use saves_enabled=false to disable saves)"
        )
    if p.cold_min_tokens < p.min_tokens:
        raise ConfigError("policy ordering: cold_min_tokens must be >= min_tokens")
    if p.cold_max_tokens < p.cold_min_tokens:
        raise ConfigError("policy ordering: cold_max_tokens must be >= cold_min_tokens")
    if p.continued_interval <= 0:
        raise ConfigError("policy.continued_interval must be > 0")
    if p.boundary_trim_tokens < 0:
        raise ConfigError("policy.boundary_trim_tokens must be >= 0")
    if p.boundary_align_tokens <= 0:
        raise ConfigError("policy.boundary_align_tokens must be > 0")
    if p.session_resume_wait_ms < 0:
        raise ConfigError("policy.session_resume_wait_ms must be >= 0")
    if p.prefill_chunk_size is not None and p.prefill_chunk_size <= 0:
        raise ConfigError("policy.prefill_chunk_size must be > 0")


def _check_hex32(name: str, value: str | None) -> None:
    if value is None:
        return
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise ConfigError(f"{name} must be 64 hex characters") from None
    if len(raw) != 32:
        raise ConfigError(f"{name} must be 64 hex characters (32 bytes)")


def validate_model_spec(spec: ModelSpec, cache: CacheConfig) -> None:
    """Checks that upstream only found at runtime (D20, D22, D30)."""
    c = spec.context_opts
    if c.n_ctx < 16:
        raise ConfigError("context_opts.n_ctx must be >= 16")
    if c.n_batch < 1 or c.n_ubatch < 1:
        raise ConfigError("context_opts.n_batch and n_ubatch must be >= 1")
    if not 1 <= c.n_seq_max <= 256:
        raise ConfigError("context_opts.n_seq_max must be in 1..256")
    if c.n_batch <= c.n_seq_max and c.n_seq_max > 1:
        raise ConfigError("context_opts.n_batch must be > n_seq_max")
    _check_hex32("fingerprint", spec.fingerprint)
    _check_hex32("ctx_params_hash", spec.ctx_params_hash)
    if spec.default_response_tokens < 1:
        raise ConfigError("default_response_tokens must be >= 1")
    if spec.keep_alive_s is not None and spec.keep_alive_s != spec.keep_alive_s:
        raise ConfigError("keep_alive_s must be a number (negative: never unload)")
    try:
        chat_templates.check_option(spec.chat_template)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    for name, markers in (
        ("thinking_markers", spec.thinking_markers),
        ("tool_call_markers", spec.tool_call_markers),
    ):
        if markers is not None and not (markers.start and markers.end):
            raise ConfigError(f"{name}: start and end must be non-empty strings")
        if markers is not None and (markers.payload_start is None) != (markers.payload_end is None):
            raise ConfigError(f"{name}: payload_start and payload_end go together")
    if spec.tier not in {t.name for t in cache.tiers}:
        raise ConfigError(f"tier {spec.tier!r} is not configured in [cache.tiers]")
    r = spec.restart
    if r.max_restarts < 0 or r.within_s <= 0 or r.backoff_initial_s <= 0:
        raise ConfigError("restart: max_restarts >= 0, within_s > 0, backoff_initial_s > 0")
    if r.backoff_max_s < r.backoff_initial_s:
        raise ConfigError("restart.backoff_max_s must be >= backoff_initial_s")
    effective_policy(cache.policy, spec)


def parse_listen(listen: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``[http] listen``; None for ``"off"``.

    Raises:
        ConfigError: not ``HOST:PORT`` with a port in 0..65535.
    """
    if listen == "off":
        return None
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"http.listen must be HOST:PORT or off, not {listen!r}")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """A host that only this machine reaches (``localhost``, 127.0.0.0/8, ``::1``)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate_http(http: HttpConfig) -> None:
    """Checks of ``[http]``: the address, the key file off loopback, positive limits."""
    addr = parse_listen(http.listen)
    if http.max_body_bytes < 1024 or http.max_header_bytes < 1024:
        raise ConfigError("http.max_body_bytes and http.max_header_bytes must be >= 1024")
    if http.idle_timeout_s <= 0 or http.max_connections < 1:
        raise ConfigError("http.idle_timeout_s must be > 0 and http.max_connections >= 1")
    if addr is not None and not is_loopback(addr[0]) and not http.api_keys_file:
        raise ConfigError(
            f"http.listen {http.listen} is not loopback: set http.api_keys_file (API keys), "
            "or listen on 127.0.0.1"
        )
    validate_upstreams(http)


def validate_upstreams(http: HttpConfig) -> None:
    """``[http] upstreams``: ipc:// or tcp://host:port, CURVE keys off loopback."""
    from erllama.protocol.auth import TcpConfigError, tcp_host

    if len(set(http.upstreams)) != len(http.upstreams):
        raise ConfigError("http.upstreams: each endpoint may appear once")
    if unknown := sorted(set(http.upstream_server_keys) - set(http.upstreams)):
        raise ConfigError(f"http.upstream_server_keys for endpoints not in upstreams: {unknown}")
    if http.upstream_server_keys and not http.upstream_secret_key:
        raise ConfigError("http.upstream_server_keys need http.upstream_secret_key")
    if http.upstream_connect_timeout_s <= 0:
        raise ConfigError("http.upstream_connect_timeout_s must be > 0")
    for ep in http.upstreams:
        if ep.startswith("ipc://"):
            continue
        try:
            host = tcp_host(ep)
        except TcpConfigError:
            raise ConfigError(
                f"http.upstreams: {ep!r} is not ipc://PATH or tcp://host:port"
            ) from None
        if ep not in http.upstream_server_keys and not is_loopback(host):
            raise ConfigError(
                f"http.upstreams: {ep} is not loopback: give its key in http.upstream_server_keys"
            )


def validate_watermarks(high: float, low: float) -> None:
    """The scheduler's watermarks, at start and for ``set_scheduler_thresholds`` at run time.

    Raises:
        ConfigError: unless ``0 <= low < high <= 1`` (NaN fails too).
    """
    if not 0.0 <= low < high <= 1.0:
        raise ConfigError(
            "scheduler watermarks: need 0 <= low_watermark < high_watermark <= 1, "
            f"got high={high!r} low={low!r}"
        )


def validate_remote_tier(t: TierConfig) -> None:
    """Checks of the remote tier: a redis URL, positive deadlines and bounds.

    Raises:
        ConfigError: naming the field.
    """
    from urllib.parse import urlsplit

    where = "cache.tiers[remote]"
    if not t.url:
        raise ConfigError(f"{where}.url is required (redis://HOST:PORT/DB)")
    try:
        parts = urlsplit(t.url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{where}.url {t.url!r}: {exc}") from None
    if parts.scheme not in REMOTE_SCHEMES:
        raise ConfigError(f"{where}.url must start with redis:// or rediss://, not {t.url!r}")
    if not parts.hostname:
        raise ConfigError(f"{where}.url {t.url!r} names no host")
    if port is not None and port == 0:
        raise ConfigError(f"{where}.url {t.url!r}: port 0")
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        raise ConfigError(f"{where}.url {t.url!r}: the path must be a database number")
    if parts.query or parts.fragment:
        raise ConfigError(f"{where}.url {t.url!r}: no query or fragment (use the fields)")
    if t.path is not None:
        raise ConfigError(f"{where}.path: the remote tier has a url, not a path")
    if t.timeout_ms <= 0:
        raise ConfigError(f"{where}.timeout_ms must be > 0")
    if not t.timeout_ms <= t.lookup_deadline_ms <= REMOTE_LOOKUP_DEADLINE_MAX_MS:
        raise ConfigError(
            f"{where}.lookup_deadline_ms must lie in timeout_ms..{REMOTE_LOOKUP_DEADLINE_MAX_MS}"
        )
    if t.ttl_s < 0 or t.chunk_bytes < 4096 or t.max_probe_keys < 1:
        raise ConfigError(f"{where}: ttl_s >= 0, chunk_bytes >= 4096, max_probe_keys >= 1")
    if t.upload_queue_rows < 1 or t.upload_queue_bytes < 1:
        raise ConfigError(f"{where}: upload_queue_rows and upload_queue_bytes must be >= 1")


def validate_config(cfg: Config) -> None:
    from erllama.protocol.auth import TcpConfigError, check_tcp_settings

    try:
        check_tcp_settings(cfg.daemon)
    except TcpConfigError as exc:
        raise ConfigError(str(exc)) from None
    names = [t.name for t in cfg.cache.tiers]
    if len(names) != len(set(names)):
        raise ConfigError("cache.tiers: each tier name may appear once")
    for t in cfg.cache.tiers:
        if t.budget_bytes < 0:
            raise ConfigError(f"cache.tiers[{t.name}].budget_bytes must be >= 0")
        if t.name == "remote":
            validate_remote_tier(t)
            continue
        if t.url is not None:
            raise ConfigError(f"cache.tiers[{t.name}].url: only the remote tier has a url")
        if t.name != "ram" and not t.path:
            raise ConfigError(f"cache.tiers[{t.name}].path is required")
    if names and all(n == "remote" for n in names):
        raise ConfigError("cache.tiers: the remote tier needs a local tier beside it")
    validate_policy(cfg.cache.policy)
    if cfg.cache.evict_save_timeout_ms < 0:
        raise ConfigError("cache.evict_save_timeout_ms must be >= 0")
    s = cfg.scheduler
    validate_watermarks(s.high_watermark, s.low_watermark)
    if s.interval_s <= 0:
        raise ConfigError("scheduler.interval_s must be > 0")
    if s.pressure_source == "custom" and not s.custom_sampler:
        raise ConfigError("scheduler.custom_sampler is required with pressure_source = custom")
    if s.escalate_after_samples < 1:
        raise ConfigError("scheduler.escalate_after_samples must be >= 1")
    validate_http(cfg.http)
    ids = [m.id for m in cfg.models if m.id is not None]
    if len(ids) != len(set(ids)):
        raise ConfigError("models: duplicate model id")
    for m in cfg.models:
        validate_model_spec(m, cfg.cache)


def resolve_run_dir(cfg: Config) -> Path:
    from erllama.protocol.sockets import default_run_dir

    return Path(cfg.daemon.run_dir) if cfg.daemon.run_dir else default_run_dir()
