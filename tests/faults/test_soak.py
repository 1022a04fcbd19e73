"""A short chaos soak (bench/soak.py): 8 streaming clients, a worker SIGKILLed every
3 s, for ~15 s. No request may hang (each has a deadline), every row left in the
tiers validates, no temp file is left, and the daemon stops cleanly afterwards."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


def load_soak() -> ModuleType:
    spec = importlib.util.spec_from_file_location("erllama_bench_soak", REPO / "bench" / "soak.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.timeout(120)
def test_short_soak_never_hangs_and_keeps_rows_valid(tmp_path: Path) -> None:
    soak = load_soak()
    r = soak.run(15.0, clients=8, kill_every_s=3.0, workdir=tmp_path)
    assert r.hung == 0, r
    assert r.completed > 0 and r.kills >= 3, r
    assert r.worker_crashed >= 1, r
    assert r.rows_checked > 0 and r.rows_invalid == 0 and r.temp_files_left == 0, r
    assert r.restarts_timed >= 1 and r.restart_p99_s < 10.0, r
    assert r.daemon_exit_code == 0, r
    assert set(r.other_errors) <= {"timeout"}, r
