"""Persistence across a SIGKILL of the whole daemon (REFERENCE §5 startup scan).

A daemon with ``ram_file`` and ``disk`` tiers under ``tmp_path`` saves rows;
the root is SIGKILLed (its children follow it); leftover ``*.tmp`` files are
planted in every tier directory, as a writer killed mid-save leaves them. A
new daemon on the same configuration and run directory:

* finds every published row (``tier_stats`` rows and the byte gauges match the
  files on disk),
* serves each saved prompt warm (``exact`` / ``partial``) with the same greedy
  output as before the kill,
* removed every leftover temp file.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from erllama.protocol.codec import decode_result
from erllama.protocol.messages import DaemonStatus, GetDaemonStatus, Reply
from tests.faults.helpers import (
    check_rows,
    complete,
    counters,
    fast_supervisor,
    model,
    tier_dirs,
    tiers_config,
    wait_claims_released,
    wait_saves,
)
from tests.support.daemon import Daemon, DaemonFactory

pytestmark = pytest.mark.timeout(90)

PROMPTS = [f"persistent prompt {i}: " + "w" * (60 + 17 * i) for i in range(4)]


def start(daemon_factory: DaemonFactory, root: Path, run_dir: Path | None = None) -> Daemon:
    return daemon_factory(
        [model("d1", tier="disk"), model("r1", tier="ram_file")],
        supervisor=fast_supervisor(),
        cache=tiers_config(root),
        run_dir=run_dir,
    )


def tier_status(d: Daemon) -> dict[str, tuple[int, int]]:
    r = d.client().call(GetDaemonStatus())
    assert isinstance(r, Reply), r
    return {t.name: (t.rows, t.used_bytes) for t in decode_result(r.result, DaemonStatus).tiers}


def files(root: Path) -> dict[str, list[Path]]:
    return {d.name: sorted(d.glob("*.kvc")) for d in tier_dirs(root)}


def test_sigkilled_daemon_comes_back_with_every_row_warm(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    d = start(daemon_factory, tmp_path)
    c = d.client()
    before = {}
    for m in ("d1", "r1"):
        for p in (f"{m} {q}" for q in PROMPTS):  # stub models share one namespace
            r = complete(c, m, p, 8)
            assert r.cache_hit_kind == "cold"
            before[(m, p)] = r.reply
    wait_saves(c, 2 * 2 * len(PROMPTS))  # prompt row + finish row per request
    wait_claims_released(c)
    saved = files(tmp_path)
    assert saved["disk"] and saved["ram_file"]
    status = tier_status(d)
    assert status["disk"][0] == len(saved["disk"])
    assert status["ram_file"][0] == len(saved["ram_file"])

    os.kill(d.pid, signal.SIGKILL)
    d.proc.wait(5)
    assert not d.wait_no_processes(5.0)
    d.close_sockets()
    planted = []
    for tier_dir in tier_dirs(tmp_path):
        victim = sorted(tier_dir.glob("*.kvc"))[0]
        tmp = tier_dir / f"{victim.name}.worker.d1:1.dead.tmp"
        tmp.write_bytes(victim.read_bytes()[:100])
        planted.append(tmp)

    d2 = start(daemon_factory, tmp_path, run_dir=d.run_dir)
    c2 = d2.client()
    assert not [p for p in planted if p.exists()], "leftover temp files must be removed"
    assert files(tmp_path) == saved  # nothing lost, nothing invented
    status2 = tier_status(d2)
    for tier in ("disk", "ram_file"):
        rows, used = status2[tier]
        assert rows == len(saved[tier])
        assert used == sum(f.stat().st_size for f in saved[tier])
    got = counters(c2)
    assert got["bytes_disk"] == status2["disk"][1]
    assert got["bytes_ramfile"] == status2["ram_file"][1]
    for (m, p), text in before.items():
        r = complete(c2, m, p, 8)
        assert r.cache_hit_kind in ("exact", "partial"), (m, p, r.cache_hit_kind)
        assert r.reply == text, (m, p)
    wait_claims_released(c2)
    assert check_rows(tier_dirs(tmp_path)) >= len(saved["disk"]) + len(saved["ram_file"])
    d2.teardown()
