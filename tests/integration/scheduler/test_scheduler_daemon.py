"""The scheduler in a real daemon: a file sampler drives real processes (stub models).

The test writes ``<run_dir>/pressure.json``; the scheduler child samples it every
``interval_s`` and acts through meta (demote / evict) and the router (evict with
``release_context``, unload), exactly as under real memory pressure.

The models here say ``keep_alive_s = -1`` (never) unless a test is about sleeping: under
lasting pressure the scheduler's last step puts idle models to sleep, and these tests
look at the steps before it.

The test and the scheduler's ticks are not synchronised, so nothing here waits a number of
intervals: a test waits for what the scheduler reports (the ratio it sampled, its plan
count, its ``plan_done`` log lines) or for a row in meta.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from erllama.cache.client import MetaClient
from erllama.protocol.codec import decode_result
from erllama.protocol.messages import (
    Complete,
    CompletionResult,
    DaemonStatus,
    ErrorReply,
    GetCounters,
    GetDaemonStatus,
    GetVramInfo,
    ListModels,
    ModelInfo,
    Reply,
)
from tests.support.daemon import Daemon, DaemonFactory, RawClient, stub_model, wait_until

pytestmark = pytest.mark.timeout(120)

INTERVAL_S = 0.2
NEVER = {"keep_alive_s": -1.0}  # no idle timer; the pressure step leaves the model alone
PROMPTS = [f"prompt number {i}: " + "lorem ipsum dolor sit amet " * 3 for i in range(6)]


def start(
    daemon_factory: DaemonFactory,
    tmp_path: Path,
    *,
    models: list[dict[str, Any]] | None = None,
    disk: bool = True,
    **sched: Any,
) -> Daemon:
    tiers: list[dict[str, Any]] = [{"name": "ram", "budget_bytes": 1 << 30}]
    if disk:
        tiers.append({"name": "disk", "path": str(tmp_path / "disk"), "budget_bytes": 1 << 30})
    return daemon_factory(
        models if models is not None else [{**stub_model("m1"), **NEVER}],
        cache={"tiers": tiers, "policy": {"min_tokens": 8, "cold_min_tokens": 8}},
        scheduler={
            "enabled": True,
            "pressure_source": "custom",
            "custom_sampler": "erllama.scheduler.sampler:file_sampler",
            "interval_s": INTERVAL_S,
            "high_watermark": 0.85,
            "low_watermark": 0.75,
            "min_evict_bytes": 1,
            **sched,
        },
    )


def pressure(d: Daemon, used: int, total: int, **extra: Any) -> None:
    p = d.run_dir / "pressure.json"
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps({"used": used, "total": total, **extra}))
    tmp.replace(p)  # the scheduler never reads a half-written file


def complete(c: RawClient, prompt: str, model: str = "m1") -> CompletionResult:
    r = c.call(Complete(model=model, prompt=prompt, options={"response_tokens": 8}), timeout=20)  # type: ignore[arg-type]
    assert isinstance(r, Reply), r
    return decode_result(r.result, CompletionResult)


def counters(c: RawClient) -> dict[str, int]:
    r = c.call(GetCounters())
    assert isinstance(r, Reply), r
    return decode_result(r.result, dict[str, int])


def status(c: RawClient) -> DaemonStatus:
    r = c.call(GetDaemonStatus())
    assert isinstance(r, Reply), r
    return decode_result(r.result, DaemonStatus)


def tier(c: RawClient, name: str) -> tuple[int, int]:
    t = {t.name: t for t in status(c).tiers}[name]
    return t.rows, t.used_bytes


@contextlib.contextmanager
def meta_client(d: Daemon) -> Iterator[MetaClient]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    meta = MetaClient(ctx, f"ipc://{d.run_dir / 'meta.sock'}", "test:1")
    try:
        yield meta
    finally:
        meta.close()
        ctx.term()


def warm_rows(d: Daemon, c: RawClient, n: int) -> list[CompletionResult]:
    """``n`` completions on m1, returned once every row they saved is in meta.

    The worker's saver writes its queue in order on one thread, so once the finish row of
    the last completion is published no earlier save of them is still on its way.
    """
    pressure(d, 0, 1000)
    out = [complete(c, p) for p in PROMPTS[:n]]
    last = out[-1].finish_key
    assert last is not None
    with meta_client(d) as meta:
        wait_until(lambda: meta.lookup_exact(last) is not None, 10, what="the last row saved")
    return out


def sampled(d: Daemon, c: RawClient, used: int, total: int) -> None:
    """Write a pressure sample and wait until the scheduler has sampled it."""
    pressure(d, used, total)

    def seen() -> bool:
        st = status(c).scheduler
        return st is not None and st["last_ratio"] == pytest.approx(used / total, abs=1e-4)

    wait_until(seen, 10, what=f"the scheduler sampling {used}/{total}")


def status_action(c: RawClient) -> Any:
    st = status(c).scheduler
    return None if st is None else st["last_action"]


def plans_done(d: Daemon) -> list[str]:
    """The ``steps=`` of every finished plan, in order (``ram:3:1200;ram_file:0:0``)."""
    return log_events(d, r"event=plan_done projected_used=\d+ remaining=\d+ steps=(\S*)")


def log_events(d: Daemon, pattern: str) -> list[str]:
    return re.findall(pattern, d.log_path.read_text(errors="replace"))


def test_actions_fire_in_order_and_stop_at_low(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    d = start(daemon_factory, tmp_path, escalate_after_samples=5)
    c = d.client()
    first = warm_rows(d, c, 4)
    rows, ram_bytes = tier(c, "ram")
    # total = 4 x the ram rows, used = 0.9: the target (0.15 x total) is 60% of the rows
    total = 4 * ram_bytes
    pressure(d, int(0.9 * total), total)
    # the first plan, from its own log line (escalations may follow while we look)
    wait_until(lambda: plans_done(d), 10, what="the first plan done")
    steps = [step.split(":") for step in plans_done(d)[0].split(";")]
    assert [name for name, _, _ in steps] == ["ram"], "stops once the projected usage is under low"
    _, demoted, freed = steps[0]
    assert 0 < int(demoted) < rows
    assert int(freed) >= int(0.15 * total)
    wait_until(
        lambda: tier(c, "disk")[0] == counters(c)["rows_demoted"] >= int(demoted),
        10,
        what="the demoted rows counted and on disk",
    )
    # the status reaches meta with the scheduler's next tick
    wait_until(lambda: status_action(c) is not None, 10, what="the plan in the status")
    st = status(c).scheduler
    assert st is not None and st["last_ratio"] == pytest.approx(0.9, abs=1e-3)
    assert st["last_action"]["steps"][0][0] == "ram"
    # the pressure stays: escalation demotes the rest, then tells the idle worker to evict
    wait_until(lambda: counters(c)["workers_evicted"] >= 1, 10, what="worker evicted")
    assert tier(c, "ram")[0] == 0
    order = log_events(d, r"event=(demote|evict_worker|unload) ")
    assert order.index("evict_worker") > order.index("demote")
    # demoted rows are still hits (from disk), with the same output; the context comes back
    pressure(d, 0, total)
    again = complete(c, PROMPTS[0])
    assert again.cache_hit_kind == "exact"
    assert again.reply == first[0].reply
    wait_until(lambda: log_events(d, r"event=context_recreated"), 5, what="context re-created")
    assert counters(c)["rows_demoted"] >= rows


def test_evicted_worker_restores_warm(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    d = start(daemon_factory, tmp_path, disk=False, evict_tiers=[])
    c = d.client()
    first = warm_rows(d, c, 1)[0]
    pressure(d, 95, 100)
    wait_until(lambda: counters(c)["workers_evicted"] >= 1, 10, what="worker evicted")
    assert log_events(d, r"event=release_context released=True")
    pressure(d, 10, 100)
    hits = counters(c)["hits_exact"]
    again = complete(c, PROMPTS[0])
    assert again.cache_hit_kind == "exact" and again.reply == first.reply
    assert counters(c)["hits_exact"] == hits + 1
    assert log_events(d, r"event=context_recreated")


def test_pinned_rows_are_never_evicted(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    d = start(daemon_factory, tmp_path, disk=False, evict_idle_workers=False)
    c = d.client()
    results = warm_rows(d, c, 3)
    key = results[0].finish_key
    assert key is not None
    with meta_client(d) as meta:
        pin = meta.checkout(key)
        assert pin is not None and pin.row.tier == "ram"
        pressure(d, 99, 100)  # far above high, for several escalations
        wait_until(lambda: counters(c)["rows_evicted"] >= 1, 10, what="an eviction")
        wait_until(lambda: len(plans_done(d)) >= 3, 20, what="three plans done")
        assert meta.lookup_exact(key) is not None
        assert Path(pin.row.path).exists()
        meta.checkin(pin.pin_ref)


def test_oscillation_around_high_is_no_storm(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    # Only the hysteresis is under test: a crossing of high does not re-arm the policy
    # before a sample at or under low. Escalation (consecutive samples above high) is kept
    # out of reach: the scheduler may well sample one value twice before the next is written.
    d = start(daemon_factory, tmp_path, evict_idle_workers=False, escalate_after_samples=1000)
    c = d.client()
    warm_rows(d, c, 4)
    total = 100 * tier(c, "ram")[1]
    for i in range(20):  # ten crossings of high, each one sampled
        sampled(d, c, int((0.86 if i % 2 == 0 else 0.84) * total), total)
    st = status(c).scheduler
    assert st is not None and st["plans"] == 1, st
    wait_until(lambda: plans_done(d), 10, what="the plan done")
    assert len(log_events(d, r"event=pressure ")) == 1


def test_pressure_puts_idle_models_to_sleep_and_they_wake_warm(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    # m1's own timer (600 s) would not fire in this test: pressure puts it to sleep early;
    # m2 says never, so pressure leaves it loaded
    m1 = {**stub_model("m1"), "keep_alive_s": 600.0}
    m2 = {**stub_model("m2"), **NEVER}
    d = start(daemon_factory, tmp_path, models=[m1, m2], evict_tiers=[], evict_idle_workers=False)
    c = d.client()
    first = warm_rows(d, c, 2)
    rows_before = tier(c, "ram")[0]
    pressure(d, 95, 100)
    wait_until(lambda: counters(c)["models_unloaded"] >= 1, 15, what="a pressure sleep")
    d.wait_for_event("sleep", 15, child="worker.m1", reason="pressure")
    pressure(d, 10, 100)
    states = {m.id: m.state for m in models(c)}
    assert states == {"m1": "sleeping", "m2": "ready"}, states
    assert counters(c)["models_unloaded"] == 1
    assert tier(c, "ram")[0] >= rows_before, "a sleeping model keeps its rows"
    # the next request wakes it, and its rows are still hits
    reloaded = counters(c)["models_reloaded"]
    again = complete(c, PROMPTS[0])
    assert again.cache_hit_kind == "exact" and again.reply == first[0].reply
    assert counters(c)["models_reloaded"] == reloaded + 1
    assert {m.id: m.state for m in models(c)}["m1"] == "ready"


def models(c: RawClient) -> list[ModelInfo]:
    r = c.call(ListModels())
    assert isinstance(r, Reply), r
    return decode_result(r.result, list[ModelInfo])


def test_vram_info_is_no_gpu_here(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    d = start(daemon_factory, tmp_path)
    c = d.client()
    wait_until(lambda: status(c).scheduler is not None, 5, what="a scheduler report")
    r = c.call(GetVramInfo())
    st = status(c).scheduler
    assert st is not None
    if st["vram"] is None:  # this machine has no GPU (or no NVML)
        assert isinstance(r, ErrorReply) and r.code == "no_gpu"
        assert len(log_events(d, r"event=sampler_disabled name=nvml")) == 1
    else:
        assert isinstance(r, Reply)
