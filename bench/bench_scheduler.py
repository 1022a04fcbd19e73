"""Scheduler benchmark (figures printed, not asserted).

1. Pressure ramp: a real daemon (stub model, ram + disk tiers) whose scheduler samples
   a file sampler. ``used`` = a base the bench ramps up + the bytes in the ram tier
   directory (``add_dir``), so evicting/demoting rows shows up in the next sample.
   Reported: the number of sampling intervals from the first sample above the high
   watermark until a sample under the low watermark.
2. The scheduler's own CPU use at a 1 s interval with the system sampler: psutil
   ``cpu_times`` of the scheduler process over 30 s (``--cpu-s``).

Run: ``.venv/bin/python bench/bench_scheduler.py [--cpu-s 30]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from erllama.protocol.codec import decode_result  # noqa: E402
from erllama.protocol.messages import (  # noqa: E402
    Complete,
    CompletionResult,
    DaemonStatus,
    GetCounters,
    GetDaemonStatus,
)
from tests.support.daemon import Daemon, stub_model  # noqa: E402

INTERVAL_S = 0.5


def status(d: Daemon) -> DaemonStatus:
    return decode_result(d.client().call(GetDaemonStatus()).result, DaemonStatus)


def ramp(tmp: Path) -> None:
    cfg: dict[str, Any] = {
        "models": [stub_model("m1")],
        "supervisor": {"heartbeat_interval_s": 1.0},
        "cache": {
            "tiers": [
                {"name": "ram", "budget_bytes": 1 << 30},
                {"name": "disk", "path": str(tmp / "disk"), "budget_bytes": 1 << 30},
            ],
            "policy": {"min_tokens": 8, "cold_min_tokens": 8},
        },
        "scheduler": {
            "enabled": True,
            "pressure_source": "custom",
            "custom_sampler": "erllama.scheduler.sampler:file_sampler",
            "interval_s": INTERVAL_S,
            "min_evict_bytes": 1,
        },
    }
    (tmp / "ramp").mkdir()
    d = Daemon(tmp / "ramp", cfg, ready_timeout=60)
    try:
        c = d.client()
        pfile = d.run_dir / "pressure.json"

        def write(base: int, total: int) -> None:
            t = pfile.with_suffix(".tmp")
            t.write_text(json.dumps({"used": base, "total": total, "add_dir": str(d.ram_dir)}))
            t.replace(pfile)

        write(0, 1 << 40)
        for i in range(40):
            r = c.call(Complete(model="m1", prompt=f"row {i} " + "x" * 400), timeout=20)
            decode_result(r.result, CompletionResult)
        time.sleep(1.0)
        rows = {t.name: t for t in status(d).tiers}["ram"]
        total = int(rows.used_bytes / 0.15)  # the ram rows are 15% of "memory"
        print(f"ram tier: {rows.rows} rows, {rows.used_bytes} B; total={total} B")
        # ramp the base from 0.5 to 0.80 of total over 10 steps: the rows push it over high
        crossed_at = None
        samples: list[tuple[float, float]] = []
        t0 = time.monotonic()
        step = -1
        deadline = t0 + 30 * INTERVAL_S
        while time.monotonic() < deadline:
            want = min(7, int((time.monotonic() - t0) / INTERVAL_S))
            if want != step:  # ramp the base 0.50 -> 0.71 of total, one step per interval
                step = want
                write(int(total * (0.5 + 0.03 * step)), total)
            st = status(d).scheduler or {}
            ratio, at = st.get("last_ratio"), st.get("sampled_at")
            if ratio is not None and at is not None and (not samples or samples[-1][0] != at):
                samples.append((at, ratio))
                if crossed_at is None and ratio >= 0.85:
                    crossed_at = at
                if crossed_at is not None and ratio <= 0.75:
                    break
            time.sleep(INTERVAL_S / 5)
        if crossed_at is None:
            print("pressure ramp: never crossed high (check the figures)")
        else:
            under = [at for at, r in samples if at > crossed_at and r <= 0.75]
            if under:
                n = (under[0] - crossed_at) / INTERVAL_S
                print(f"pressure ramp: back under low {n:.1f} sampling intervals after high")
            else:
                print("pressure ramp: NOT back under low within 20 intervals")
        print("samples (ratio):", " ".join(f"{r:.3f}" for _, r in samples))
        k = decode_result(d.client().call(GetCounters()).result, dict[str, int])
        print({n: k[n] for n in ("rows_demoted", "rows_evicted", "bytes_freed", "workers_evicted")})
    finally:
        d.teardown()


def cpu(tmp: Path, seconds: float) -> None:
    cfg: dict[str, Any] = {
        "models": [],
        "scheduler": {"enabled": True, "pressure_source": "system", "interval_s": 1.0},
    }
    (tmp / "cpu").mkdir()
    d = Daemon(tmp / "cpu", cfg, ready_timeout=60)
    try:
        pid = d.child_pid("scheduler")
        p = psutil.Process(pid)
        time.sleep(2.0)
        t0, c0 = time.monotonic(), p.cpu_times()
        time.sleep(seconds)
        t1, c1 = time.monotonic(), p.cpu_times()
        used = (c1.user - c0.user) + (c1.system - c0.system)
        print(
            f"scheduler CPU at 1 s interval: {used * 1000:.1f} ms over {t1 - t0:.1f} s "
            f"({100 * used / (t1 - t0):.3f}% of one core), rss={p.memory_info().rss >> 20} MiB"
        )
    finally:
        d.teardown()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu-s", type=float, default=30.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="erl-bs-") as tmp:
        ramp(Path(tmp))
        cpu(Path(tmp), args.cpu_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
