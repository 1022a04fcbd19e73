"""Pins the public surface: what ``erllama`` and ``erllama.client`` export, and the twins' API."""

from __future__ import annotations

import inspect

import pytest

import erllama
import erllama.client

pytestmark = pytest.mark.timeout(30)

PUBLIC = {
    "AsyncClient",
    "AsyncClusterClient",
    "AsyncClusterStream",
    "ClusterClient",
    "ClusterStream",
    "AsyncStream",
    "CacheDelta",
    "CacheHit",
    "Client",
    "ClientState",
    "Completion",
    "ConflictError",
    "DaemonStatus",
    "DaemonUnavailableError",
    "ErllamaError",
    "ErrorCode",
    "Event",
    "InternalError",
    "InvalidRequestError",
    "ModelInfo",
    "ModelLoadError",
    "NotSupportedError",
    "ProtocolError",
    "RequestError",
    "RequestTimeoutError",
    "SchedulerAction",
    "SchedulerCheck",
    "SchedulerStatus",
    "Stats",
    "Stream",
    "TierUsage",
    "Timeout",
    "TransportError",
    "UnknownModelError",
    "WorkerCrashedError",
    "__version__",
}

CLIENT_PUBLIC = {
    "AsyncClient",
    "AsyncClusterClient",
    "AsyncClusterStream",
    "ClusterClient",
    "ClusterStream",
    "AsyncStream",
    "Client",
    "ClientState",
    "Completion",
    "Event",
    "EventKind",
    "Stream",
    "Timeout",
}

# the operations of both clients (REFERENCE §1 names, snake_case)
OPERATIONS = {
    "load_model",
    "unload",
    "unload_model",
    "list_models",
    "model_info",
    "complete",
    "stream",
    "infer",
    "prefill_only",
    "cancel",
    "tokenize",
    "detokenize",
    "counters",
    "vram_info",
    "phase",
    "pending_len",
    "last_cache_hit",
    "queue_depth",
    "list_cached_prefixes",
    "status",
    "evict",
    "shutdown",
    "daemon_status",
    "apply_chat_template",
    "embed",
    "load_adapter",
    "unload_adapter",
    "set_adapter_scale",
    "list_adapters",
    "draft_tokens",
    "verify",
    "scheduler_status",
    "enable_scheduler",
    "disable_scheduler",
    "set_scheduler_thresholds",
    "force_scheduler_check",
}


def _public_methods(cls: type) -> set[str]:
    return {n for n, v in vars(cls).items() if not n.startswith("_") and callable(v)}


def test_top_level_exports() -> None:
    assert set(erllama.__all__) == PUBLIC
    for name in PUBLIC:
        assert hasattr(erllama, name), name
    assert erllama.__version__ == "0.1.0"
    assert erllama.__doc__ is not None and erllama.__doc__.startswith("erllama: ")


def test_client_package_exports() -> None:
    assert set(erllama.client.__all__) == CLIENT_PUBLIC
    for name in CLIENT_PUBLIC & PUBLIC:
        assert getattr(erllama.client, name) is getattr(erllama, name)


def test_exceptions_form_one_tree() -> None:
    for name in PUBLIC:
        obj = getattr(erllama, name)
        if isinstance(obj, type) and name.endswith("Error"):
            assert issubclass(obj, erllama.ErllamaError), name
    assert issubclass(erllama.DaemonUnavailableError, erllama.TransportError)
    assert issubclass(erllama.RequestTimeoutError, erllama.TransportError)
    assert issubclass(erllama.InvalidRequestError, erllama.RequestError)


def test_the_clients_are_twins() -> None:
    sync = _public_methods(erllama.Client)
    aio = _public_methods(erllama.AsyncClient)
    assert sync - {"close"} == aio - {"aclose"} == OPERATIONS
    assert "close" in sync and "aclose" in aio
    for name in OPERATIONS:
        s = getattr(erllama.Client, name)
        a = getattr(erllama.AsyncClient, name)
        assert not inspect.iscoroutinefunction(s), name
        assert inspect.iscoroutinefunction(a), name
        assert list(inspect.signature(s).parameters) == list(inspect.signature(a).parameters), name
        assert s.__doc__ and a.__doc__, name
    assert erllama.Client.unload_model is erllama.Client.unload
    assert erllama.AsyncClient.unload_model is erllama.AsyncClient.unload


def test_streams_are_twins() -> None:
    assert "close" in dir(erllama.Stream)
    assert "aclose" in dir(erllama.AsyncStream)
    assert hasattr(erllama.Stream, "__iter__") and hasattr(erllama.Stream, "__enter__")
    assert hasattr(erllama.AsyncStream, "__aiter__") and hasattr(erllama.AsyncStream, "__aenter__")


def test_cluster_clients_are_twins() -> None:
    routed = {"complete", "stream", "infer"}
    sync = _public_methods(erllama.ClusterClient)
    aio = _public_methods(erllama.AsyncClusterClient)
    assert sync - {"close"} == aio - {"aclose"} == routed
    assert list(inspect.signature(erllama.ClusterClient).parameters) == list(
        inspect.signature(erllama.AsyncClusterClient).parameters
    )
    for name in routed:
        assert inspect.iscoroutinefunction(getattr(erllama.AsyncClusterClient, name)), name


def test_constructor_signature() -> None:
    for cls in (erllama.Client, erllama.AsyncClient):
        params = inspect.signature(cls).parameters
        curve = ["curve_server_key", "curve_secret_key", "curve_public_key"]
        assert list(params) == ["endpoint", "timeout", *curve]
        assert params["endpoint"].default is None
        for name in ("timeout", *curve):  # CURVE keys for tcp:// (README, "TCP with CURVE")
            assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
            assert params[name].default is None


def test_result_types() -> None:
    fields = set(erllama.Completion.__dataclass_fields__)
    assert {
        "reply",
        "generated",
        "context_tokens",
        "committed_tokens",
        "finish_key",
        "cache_hit_kind",
        "finish_reason",
        "stop_sequence",
        "cache_delta",
        "stats",
    } <= fields
    assert {"kind", "request_id", "text", "token_id", "stats", "signature"} <= set(
        erllama.Event.__dataclass_fields__
    )
    assert [s.name for s in erllama.ClientState] == ["UNOPENED", "OPENED", "CLOSED"]
