"""The scheduler at run time, through a real daemon: client calls, CLI, ``vram_info``.

The scheduler is disabled by config in every test here: it runs anyway (idle) and the
clients switch it on. Pressure comes from the file sampler (``pressure.json``); the
interval is an hour, so the only checks are the one at ``enable`` and the forced ones,
and each answer is known exactly. NVML is the fake ``pynvml`` of tests/support.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from erllama import AsyncClient, Client, InvalidRequestError, NotSupportedError
from erllama.protocol.messages import SchedulerStatus
from tests.support.daemon import (
    REPO,
    Daemon,
    DaemonFactory,
    fake_nvml_env,
    stub_model,
    wait_until,
    write_fake_gpus,
)

pytestmark = pytest.mark.timeout(120)

GIB = 1 << 30
BAD_THRESHOLDS = [(0.5, 0.6), (0.7, 0.7), (1.5, 0.2), (0.8, -0.1), (math.nan, 0.1)]


def start(daemon_factory: DaemonFactory, *, env: dict[str, str] | None = None) -> Daemon:
    return daemon_factory(
        [stub_model("m1")],
        cache={
            "tiers": [{"name": "ram", "budget_bytes": 1 << 30}],
            "policy": {"min_tokens": 8, "cold_min_tokens": 8},
        },
        scheduler={
            "enabled": False,
            "pressure_source": "custom",
            "custom_sampler": "erllama.scheduler.sampler:file_sampler",
            "interval_s": 3600.0,
            "min_evict_bytes": 1,
            "evict_tiers": ["ram"],
            "evict_idle_workers": False,
        },
        env=env,
    )


def pressure(d: Daemon, used: int, total: int) -> None:
    p = d.run_dir / "pressure.json"
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps({"used": used, "total": total}))
    tmp.replace(p)


def ram_rows(c: Client) -> int:
    return {t.name: t.rows for t in c.daemon_status().tiers}["ram"]


def reported(c: Client) -> dict[str, Any]:
    st = c.daemon_status().scheduler
    return st if st is not None else {}


def test_sync_client_drives_the_scheduler(daemon_factory: DaemonFactory) -> None:
    d = start(daemon_factory)
    with Client(d.endpoint, timeout=30) as c:
        st = c.scheduler_status()
        assert isinstance(st, SchedulerStatus)
        assert st.enabled is False and st.sampler == "file"
        assert (st.high_watermark, st.low_watermark) == (0.85, 0.75)
        assert st.last_ratio is None and st.plans == 0, "a disabled scheduler samples nothing"
        pressure(d, 95, 100)
        chk = c.force_scheduler_check()
        assert (chk.outcome, chk.reason, chk.action) == ("skipped", "disabled", None)
        # bad watermarks: refused with the config's check, nothing changes
        for high, low in BAD_THRESHOLDS:
            with pytest.raises(InvalidRequestError) as exc:
                c.set_scheduler_thresholds(high=high, low=low)
            assert exc.value.code == "bad_thresholds", (high, low)
        with pytest.raises(InvalidRequestError) as exc:
            c.set_scheduler_thresholds(high="0.9", low=0.1)  # type: ignore[arg-type]
        assert exc.value.code == "bad_thresholds"
        assert c.scheduler_status().high_watermark == 0.85
        st = c.set_scheduler_thresholds(high=0.9, low=0.5)
        assert (st.high_watermark, st.low_watermark, st.enabled) == (0.9, 0.5, False)
        # rows to free, then in band (0.5 < 0.8 < 0.9): enabling checks once, nothing to do
        for i in range(3):
            c.complete("m1", f"prompt {i}: " + "lorem ipsum dolor sit amet " * 4, response_tokens=8)
        wait_until(lambda: ram_rows(c) >= 3, 10, what="rows in the ram tier")
        rows = ram_rows(c)
        pressure(d, 80, 100)
        st = c.enable_scheduler()
        assert st.enabled is True
        chk = c.force_scheduler_check()
        assert (chk.outcome, chk.reason, chk.last_ratio) == ("skipped", "in_band", 0.8)
        # above high: the armed policy acts, and the answer is the finished plan
        pressure(d, 95, 100)
        chk = c.force_scheduler_check()
        assert (chk.outcome, chk.reason, chk.last_ratio) == ("acted", "above_high", 0.95)
        assert chk.action is not None and chk.action.target_bytes == 45
        step, n, freed = chk.action.steps[0]
        assert step == "ram" and n >= 1 and freed > 0 and chk.action.bytes_freed == freed
        assert c.counters()["rows_evicted"] == n and ram_rows(c) < rows + 3
        # still above: a forced check does not wait for the settling samples
        chk = c.force_scheduler_check()
        assert (chk.outcome, chk.reason) == ("acted", "forced")
        st = c.scheduler_status()
        assert st.plans == 2 and st.last_action == chk.action and st.last_decision == "plan:forced"
        wait_until(lambda: reported(c).get("plans") == 2, 5, what="the status in meta")
        assert reported(c)["enabled"] is True and reported(c)["high_watermark"] == 0.9
        st = c.disable_scheduler()
        assert st.enabled is False
        assert c.force_scheduler_check().reason == "disabled"
        wait_until(lambda: reported(c).get("enabled") is False, 5, what="disabled in meta")


def test_async_client_drives_the_scheduler(daemon_factory: DaemonFactory) -> None:
    d = start(daemon_factory)
    pressure(d, 10, 100)

    async def main() -> None:
        async with AsyncClient(d.endpoint, timeout=30) as c:
            assert (await c.scheduler_status()).enabled is False
            with pytest.raises(InvalidRequestError) as exc:
                await c.set_scheduler_thresholds(high=0.4, low=0.6)
            assert exc.value.code == "bad_thresholds"
            st = await c.set_scheduler_thresholds(high=0.95, low=0.2)
            assert (st.high_watermark, st.low_watermark) == (0.95, 0.2)
            assert (await c.enable_scheduler()).enabled is True
            chk = await c.force_scheduler_check()
            assert (chk.outcome, chk.reason, chk.last_ratio) == ("skipped", "below_watermark", 0.1)
            st = await c.scheduler_status()
            assert st.last_used == 10 and st.last_total == 100 and st.resource == "ram"
            assert (await c.disable_scheduler()).enabled is False
            assert (await c.force_scheduler_check()).reason == "disabled"

    asyncio.run(main())


def cli(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "erllama.cli", "scheduler", *args, "--endpoint", d.endpoint],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("ERLLAMA_")},
    )


def fields(out: str) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in out.splitlines())


def test_cli_scheduler_verbs(daemon_factory: DaemonFactory) -> None:
    d = start(daemon_factory)
    pressure(d, 10, 100)
    r = cli(d, "status")
    assert r.returncode == 0, r.stderr
    got = fields(r.stdout)
    assert got["enabled"] == "false" and got["sampler"] == "file"
    assert got["high_watermark"] == "0.85" and got["last_action"] == "-"
    r = cli(d, "set-thresholds", "--high", "0.6", "--low", "0.7")
    assert r.returncode == 1 and r.stderr.startswith("error: bad_thresholds: "), r.stderr
    r = cli(d, "set-thresholds", "--high", "0.9", "--low", "0.2")
    assert r.returncode == 0, r.stderr
    assert fields(r.stdout)["high_watermark"] == "0.9"
    assert fields(r.stdout)["low_watermark"] == "0.2"
    r = cli(d, "check")
    assert (r.returncode, r.stdout) == (0, "skipped disabled ratio=-\n"), r.stderr
    r = cli(d, "enable")
    assert r.returncode == 0 and fields(r.stdout)["enabled"] == "true", r.stderr
    r = cli(d, "check")
    assert (r.returncode, r.stdout) == (0, "skipped below_watermark ratio=0.1000\n"), r.stderr
    r = cli(d, "disable")
    assert r.returncode == 0 and fields(r.stdout)["enabled"] == "false", r.stderr
    r = cli(d)
    assert r.returncode == 2 and "VERB" in r.stderr


def test_vram_info_reads_nvml_with_the_scheduler_off(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    gpus = tmp_path / "gpus.json"
    d = start(daemon_factory, env=fake_nvml_env(gpus, [(1 * GIB, 8 * GIB), (3 * GIB, 16 * GIB)]))
    with Client(d.endpoint, timeout=30) as c:
        assert c.scheduler_status().enabled is False
        assert c.vram_info() == {"total_b": 24 * GIB, "free_b": 20 * GIB, "used_b": 4 * GIB}
        write_fake_gpus(gpus, [(6 * GIB, 8 * GIB), (3 * GIB, 16 * GIB)])
        assert c.vram_info() == {"total_b": 24 * GIB, "free_b": 15 * GIB, "used_b": 9 * GIB}
        vram = c.scheduler_status().vram
        assert vram is not None and vram.used_b == 9 * GIB


def test_vram_info_is_no_gpu_without_one(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    d = start(daemon_factory, env=fake_nvml_env(tmp_path / "gpus.json", []))
    with Client(d.endpoint, timeout=30) as c:
        with pytest.raises(NotSupportedError) as exc:
            c.vram_info()
        assert exc.value.code == "no_gpu" and "no GPU" in exc.value.message
        st = c.scheduler_status()
        assert st.vram is None and st.vram_reason == "NVML sees no GPU"


def test_run_time_settings_survive_a_scheduler_restart(daemon_factory: DaemonFactory) -> None:
    d = start(daemon_factory)
    with Client(d.endpoint, timeout=30) as c:
        c.set_scheduler_thresholds(high=0.7, low=0.3)
        c.enable_scheduler()
        pid = d.child_pid("scheduler")
        os.kill(pid, signal.SIGKILL)
        d.wait_for_event("ready", 30, child="scheduler")
        assert d.child_pid("scheduler") != pid
        st = c.scheduler_status()
        assert (st.enabled, st.high_watermark, st.low_watermark) == (True, 0.7, 0.3)
    assert (d.run_dir / "scheduler.json").exists()
    d.teardown()
    assert not (d.run_dir / "scheduler.json").exists(), "the settings last one daemon's life"
