"""Shared pieces of the daemon-level fault tests: configs, counters, row checks.

* ``fast_supervisor()``: heartbeats and backoffs small enough for a test.
* ``tiers_config(root)``: ``ram_file`` and ``disk`` tiers under ``root`` and a
  save policy small enough that stub prompts of ~100 bytes save rows.
* ``counters(c)`` / ``wait_claims_released(c)``: meta's counters (through
  the router) and its ``pins_held`` / ``reservations_held`` gauges.
* ``check_rows(dirs)``: every ``*.kvc`` in the tier directories validates
  fully (framing, CRC32C, key replay) and no ``*.tmp`` is left.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import psutil

from erllama.cache.tiers import validate_file
from erllama.protocol.codec import decode_result
from erllama.protocol.messages import (
    Complete,
    CompletionResult,
    GetCounters,
    GetModelInfo,
    ModelInfo,
    Reply,
    RequestOptions,
)
from tests.support.daemon import Daemon, RawClient, wait_until

RESTART = {
    "max_restarts": 50,
    "within_s": 60.0,
    "backoff_initial_s": 0.05,
    "backoff_max_s": 0.2,
    "startsecs": 0.2,
}
POLICY = {
    "min_tokens": 16,
    "cold_min_tokens": 16,
    "continued_interval": 64,
    "boundary_trim_tokens": 0,
    "boundary_align_tokens": 16,
}


def fast_supervisor(**over: Any) -> dict[str, Any]:
    return {
        "heartbeat_interval_s": 0.25,
        "heartbeat_liveness": 4,
        "stall_timeout_s": 1.0,
        "drain_timeout_s": 3.0,
        "term_timeout_s": 2.0,
        **over,
    }


def tiers_config(root: Path) -> dict[str, Any]:
    return {
        "tiers": [
            {"name": "ram_file", "path": str(root / "ram_file")},
            {"name": "disk", "path": str(root / "disk")},
        ],
        "policy": POLICY,
    }


def tier_dirs(root: Path) -> list[Path]:
    return [root / "ram_file", root / "disk"]


def model(model_id: str, tier: str = "disk", **stub: Any) -> dict[str, Any]:
    return {"id": model_id, "backend": "stub", "tier": tier, "restart": RESTART, "stub": stub}


def counters(c: RawClient, timeout: float = 10.0) -> dict[str, int]:
    r = c.call(GetCounters(), timeout)
    assert isinstance(r, Reply), r
    return decode_result(r.result, dict[str, int])


def claims(c: RawClient) -> tuple[int, int]:
    got = counters(c)
    return got["pins_held"], got["reservations_held"]


def wait_claims_released(c: RawClient, timeout: float = 10.0) -> None:
    """No pin and no reservation left at meta (HoldersDied processed)."""
    wait_until(lambda: claims(c) == (0, 0), timeout, what="pins and reservations released")


def wait_saves(c: RawClient, n: int, timeout: float = 10.0) -> None:
    """Wait until ``n`` saves have been announced (the writer thread is asynchronous)."""

    def done() -> bool:
        got = counters(c)
        return sum(v for k, v in got.items() if k.startswith("saves_") and k not in _NOT_SAVES) >= n

    wait_until(done, timeout, what=f"{n} saves announced")


_NOT_SAVES = frozenset({"saves_dropped", "saves_queued"})


def info(c: RawClient, model_id: str) -> ModelInfo:
    r = c.call(GetModelInfo(model=model_id))
    assert isinstance(r, Reply), r
    return decode_result(r.result, ModelInfo)


def complete(
    c: RawClient, model_id: str, prompt: str, n: int = 8, timeout: float = 20.0
) -> CompletionResult:
    r = c.call(
        Complete(model=model_id, prompt=prompt, options=RequestOptions(response_tokens=n)),
        timeout,
    )
    assert isinstance(r, Reply), r
    return decode_result(r.result, CompletionResult)


def check_rows(dirs: list[Path]) -> int:
    """Validate every row file fully; returns how many. Fails on a temp file or a bad row."""
    n = 0
    for d in dirs:
        if not d.exists():
            continue
        names = sorted(os.listdir(d))
        assert not [f for f in names if f.endswith(".tmp")], (d, names)
        for name in names:
            if name.endswith(".kvc"):
                size, meta = validate_file(d / name, None)
                assert name == f"{meta.key().hex()}.kvc" and size > 0, name
                n += 1
    return n


def bound_by(d: Daemon, sock_name: str) -> int:
    """The pid of the child that binds ``sock_name`` in the run dir (meta.sock: meta,
    client.sock: router); robust where the first ``spawn`` events were published
    before the test's SUB had joined."""
    path = str(d.run_dir / sock_name)
    for p in d.children():
        try:
            if any(c.laddr == path for c in p.net_connections(kind="unix")):
                return int(p.pid)
        except psutil.Error:
            continue
    raise LookupError(f"no child binds {path}")


def wait_ready_at_router(d: Daemon, c: RawClient, model_id: str, timeout: float = 20.0) -> None:
    wait_until(lambda: info(c, model_id).state == "ready", timeout, what=f"{model_id} ready")
