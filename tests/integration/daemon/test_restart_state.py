"""What a worker restart and a stop keep: LoRA adapters, and the shutdown save.

Adapters (stub ``lora = true``): the root keeps each model's adapter set from the
worker's ``AdaptersChanged`` reports and a restarted worker attaches it again before
it reports ready, so a request held during the reload runs with the adapter (same
text, same finish key = same effective fingerprint) and old handles keep working.

Saves at stop (stub ``save_delay_ms``): unload and daemon stop wait up to
``cache.evict_save_timeout_ms`` for the shutdown save, not a fixed few seconds
(the root holds its SIGTERM / SIGKILL while the worker writes); a
save cut by that deadline is counted (``saves_timed_out``) and logged, and the
worker still exits 0.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from erllama.protocol.codec import decode_result
from erllama.protocol.messages import (
    AdapterInfo,
    Complete,
    CompletionResult,
    ErrorReply,
    GetCounters,
    GetModelInfo,
    ListAdapters,
    LoadAdapter,
    ModelInfo,
    Reply,
    RequestOptions,
    SetAdapterScale,
    Unload,
    UnloadAdapter,
)
from erllama.workers.stub import STUB_LORA_MAGIC
from tests.support.daemon import Daemon, DaemonFactory, RawClient, stub_model, wait_until

pytestmark = pytest.mark.timeout(120)

SAVE_POLICY = {"min_tokens": 1, "cold_min_tokens": 1}  # every finish is saved (a finish key)


def ok(r: Any) -> Any:
    assert isinstance(r, Reply), r
    return r


def info(c: RawClient, model: str) -> ModelInfo:
    return decode_result(ok(c.call(GetModelInfo(model=model))).result, ModelInfo)


def load_adapter(c: RawClient, model: str, path: Path) -> str:
    return decode_result(ok(c.call(LoadAdapter(model=model, path=str(path)))).result, str)


def adapters(c: RawClient, model: str) -> list[AdapterInfo]:
    return decode_result(ok(c.call(ListAdapters(model=model))).result, list[AdapterInfo])


def complete(c: RawClient, model: str, prompt: str, timeout: float = 10.0) -> CompletionResult:
    r = c.call(Complete(model=model, prompt=prompt, options=RequestOptions(response_tokens=12)),
               timeout)  # fmt: skip
    return decode_result(ok(r).result, CompletionResult)


def kill_worker(d: Daemon, c: RawClient, model: str) -> None:
    pid = info(c, model).pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    d.wait_for_event("exit", 5, child=f"worker.{model}", pid=pid)


def lora_model(tmp_path: Path) -> tuple[dict[str, Any], Path]:
    path = tmp_path / "a.lora"
    path.write_bytes(STUB_LORA_MAGIC + b"adapter A")
    # the reload takes a while, so the request sent after the kill is held at the router
    model = {**stub_model("m1", lora=True, load_delay_ms=300), "policy": SAVE_POLICY}
    return model, path


def test_adapters_survive_a_worker_restart(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    model, path = lora_model(tmp_path)
    d = daemon_factory([model])
    c = d.client()
    base = complete(c, "m1", "hello")
    handle = load_adapter(c, "m1", path)
    ok(c.call(SetAdapterScale(model="m1", handle=handle, scale=0.5)))
    before = adapters(c, "m1")
    assert before == [AdapterInfo(handle=handle, scale=0.5)]
    with_adapter = complete(c, "m1", "hello")
    assert with_adapter.reply != base.reply  # the adapter changes the output
    assert with_adapter.finish_key is not None and with_adapter.finish_key != base.finish_key

    kill_worker(d, c, "m1")
    held = complete(c, "m1", "hello", timeout=30)  # sent during the reload: held, then served
    assert info(c, "m1").restarts == 1
    assert held.reply == with_adapter.reply
    assert held.finish_key == with_adapter.finish_key  # the same effective fingerprint
    assert adapters(c, "m1") == before

    # the old handle is still valid, and new handles do not reuse it
    ok(c.call(SetAdapterScale(model="m1", handle=handle, scale=1.0)))
    assert adapters(c, "m1") == [AdapterInfo(handle=handle, scale=1.0)]
    other = tmp_path / "b.lora"
    other.write_bytes(STUB_LORA_MAGIC + b"adapter B")
    second = load_adapter(c, "m1", other)
    assert second != handle
    ok(c.call(UnloadAdapter(model="m1", handle=handle)))
    assert adapters(c, "m1") == [AdapterInfo(handle=second, scale=1.0)]

    # and the set after those changes is what the next restart attaches
    kill_worker(d, c, "m1")
    wait_until(lambda: info(c, "m1").state == "ready", 30, what="m1 ready again")
    assert adapters(c, "m1") == [AdapterInfo(handle=second, scale=1.0)]
    ok(c.call(UnloadAdapter(model="m1", handle=second)))
    assert complete(c, "m1", "hello").reply == base.reply  # back on the base weights


def test_a_changed_adapter_file_fails_held_requests_clearly(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    model, path = lora_model(tmp_path)
    model["restart"] = {"max_restarts": 1, "within_s": 60.0, "backoff_initial_s": 0.1,
                        "backoff_max_s": 0.2, "startsecs": 0.1}  # fmt: skip
    d = daemon_factory([model])
    c = d.client()
    handle = load_adapter(c, "m1", path)
    path.write_bytes(STUB_LORA_MAGIC + b"other bytes")  # not the adapter that was attached
    kill_worker(d, c, "m1")
    r = c.call(Complete(model="m1", prompt="hi", options=RequestOptions(response_tokens=4)), 30)
    assert isinstance(r, ErrorReply), r  # never served on other weights under the old handle
    assert r.code == "failed" and "adapter_lost" in r.message, r
    assert handle in r.message
    assert "event=start_failed" in d.log_tail(200) and "adapter_lost" in d.log_tail(200)


# ================================================================ saves at stop
def slow_save_daemon(
    daemon_factory: DaemonFactory, tmp_path: Path, *, save_delay_ms: int, timeout_ms: int
) -> tuple[Daemon, Path]:
    disk = tmp_path / "disk"
    model = {**stub_model("m1", save_delay_ms=save_delay_ms), "tier": "disk"}
    d = daemon_factory(
        [model],
        # SIGTERM at 1 s and SIGKILL 2 s later unless the worker's ShutdownSaving holds them
        supervisor={"drain_timeout_s": 1.0, "term_timeout_s": 2.0},
        cache={
            "evict_save_timeout_ms": timeout_ms,
            "tiers": [{"name": "ram"}, {"name": "disk", "path": str(disk)}],
        },
    )
    return d, disk


def rows(disk: Path) -> list[str]:
    return sorted(p.name for p in disk.rglob("*.kvc")) if disk.exists() else []


def counters(c: RawClient) -> dict[str, int]:
    return decode_result(ok(c.call(GetCounters())).result, dict[str, int])


@pytest.mark.timeout(60)
def test_unload_waits_for_a_slow_shutdown_save(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    d, disk = slow_save_daemon(daemon_factory, tmp_path, save_delay_ms=4500, timeout_ms=20000)
    c = d.client()
    complete(c, "m1", "a short prompt: no gated save, only the shutdown save")
    assert rows(disk) == []
    ok(c.call(Unload(model="m1"), 30))
    ev = d.wait_for_event("exit", 5, child="worker.m1")
    assert ev["code"] == 0, ev
    assert len(rows(disk)) == 1
    got = counters(c)
    assert got["saves_shutdown"] == 1 and got["saves_timed_out"] == 0, got


@pytest.mark.timeout(60)
def test_a_save_past_the_deadline_is_counted_and_logged(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    d, disk = slow_save_daemon(daemon_factory, tmp_path, save_delay_ms=3000, timeout_ms=300)
    c = d.client()
    complete(c, "m1", "a short prompt")
    ok(c.call(Unload(model="m1"), 30))
    ev = d.wait_for_event("exit", 5, child="worker.m1")
    assert ev["code"] == 0, ev  # the worker exits cleanly, without the row
    assert "event=save_timed_out save=shutdown timeout_ms=300" in d.log_tail(200)
    wait_until(lambda: counters(c)["saves_timed_out"] == 1, 5, what="saves_timed_out counted")
    assert counters(c)["saves_shutdown"] == 0
    assert rows(disk) == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("delay_ms", "timeout_ms", "saved"), [(4500, 20000, 1), (3000, 300, 0)])
def test_daemon_stop_waits_for_the_shutdown_save(
    daemon_factory: DaemonFactory, tmp_path: Path, delay_ms: int, timeout_ms: int, saved: int
) -> None:
    d, disk = slow_save_daemon(daemon_factory, tmp_path, save_delay_ms=delay_ms,
                               timeout_ms=timeout_ms)  # fmt: skip
    c = d.client()
    complete(c, "m1", "a short prompt")
    d.teardown()  # SIGTERM: exit code 0 and nothing left behind, checked here
    assert len(rows(disk)) == saved
    logged = "event=save_timed_out save=shutdown" in d.log_path.read_text()
    assert logged == (saved == 0)
