"""``erllama.Client`` against a real daemon: the router's result types match the client's."""

from __future__ import annotations

import os
import signal

import pytest

from erllama.client import Client
from erllama.protocol.errors import (
    ConflictError,
    ModelLoadError,
    UnknownModelError,
    WorkerCrashedError,
)
from tests.support.daemon import Daemon, DaemonFactory, stub_model, wait_until

pytestmark = pytest.mark.timeout(90)


def test_client_round_trip(daemon: Daemon) -> None:
    with Client(daemon.endpoint, timeout=30) as c:
        assert [m.id for m in c.list_models()] == ["m1", "m2"]
        assert c.model_info("m1").state == "ready"
        assert c.load_model({"backend": "stub"}, "m3") == "m3"
        with pytest.raises(ConflictError) as exc:
            c.load_model({"backend": "stub"}, "m3")
        assert exc.value.code == "already_loaded"
        done = c.complete("m3", "hello", response_tokens=4)
        assert done.reply and done.finish_reason == "length"
        events = list(c.stream("m3", "hello", response_tokens=3))
        assert [e.kind for e in events][-1] == "done"
        # status rows are pushed by the worker after its done event: eventually idle
        wait_until(lambda: c.phase("m3") == "idle", 5, what="m3 idle")
        assert c.pending_len("m3") == 0
        assert c.queue_depth() == 0 and c.queue_depth("m3") == 0
        counters = c.counters()
        assert counters["router_requests"] > 0
        status = c.daemon_status()
        assert status.pid == daemon.pid and {m.id for m in status.models} == {"m1", "m2", "m3"}
        c.unload("m3")
        with pytest.raises(UnknownModelError):
            c.complete("m3", "x")
        with pytest.raises(UnknownModelError):
            c.unload("m3")


def test_client_sees_load_failed_and_worker_crashed(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory([stub_model("m1", token_delay_ms=20)])
    with Client(d.endpoint, timeout=30) as c:
        with pytest.raises(ModelLoadError) as exc:
            c.load_model({"backend": "llama", "model_path": "/nonexistent/model.gguf"}, "x")
        assert exc.value.code == "load_failed"
        stream = c.stream("m1", "go", response_tokens=1000)
        it = iter(stream)
        assert next(it).kind == "token"
        os.kill(c.model_info("m1").pid or 0, signal.SIGKILL)
        with pytest.raises(WorkerCrashedError):
            for _ in it:
                pass
        d.wait_for_event("ready", 30, child="worker.m1")
