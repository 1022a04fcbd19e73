"""Chaos soak: streaming clients against a daemon whose workers keep being SIGKILLed.

    .venv/bin/python bench/soak.py --seconds 60 [--clients 8] [--kill-every 3] [--json]

Starts a real daemon (``python -m erllama.supervisor``) with two stub models
(small token delays), ``ram_file`` and ``disk`` tiers in a temporary directory
and a small save policy, then runs ``--clients`` threads, each an
``erllama.Client`` with deadlines (``Timeout(request=10, stream_idle=10)``)
streaming completions of prompts from a shared pool (so rows are saved and
hit), while the main thread SIGKILLs a random worker every ``--kill-every``
seconds and times each restart from the root's events (``exit`` -> ``ready``).

Report: requests completed, failed with ``worker_crashed``, failed otherwise
(by code), hung (a client thread still inside a request 30 s after the end:
must be 0, every request has a deadline), restart time median / p99, rows
checked at the end (every ``*.kvc`` validated fully; all must be valid, and no
``*.tmp`` may be left), RSS of root and meta before and after.

``run(seconds, ...)`` is what tests/faults/test_soak.py calls.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import psutil

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import erllama  # noqa: E402
from erllama.cache.tiers import validate_file  # noqa: E402
from tests.support.daemon import Daemon  # noqa: E402

MODELS = ("s1", "s2")
HUNG_GRACE_S = 30.0
CLIENT_TIMEOUT = erllama.Timeout(request=10.0, connect=5.0, stream_idle=10.0)
PROMPTS = [f"soak prompt {i}: " + "abcdefgh" * (4 + i % 5) for i in range(12)]


@dataclass
class Report:
    seconds: float
    clients: int
    kills: int = 0
    completed: int = 0
    worker_crashed: int = 0
    other_errors: dict[str, int] = field(default_factory=dict)
    hung: int = 0
    restarts_timed: int = 0
    restart_median_s: float = 0.0
    restart_p99_s: float = 0.0
    rows_checked: int = 0
    rows_invalid: int = 0
    temp_files_left: int = 0
    rss_root_before_mb: float = 0.0
    rss_root_after_mb: float = 0.0
    rss_meta_before_mb: float = 0.0
    rss_meta_after_mb: float = 0.0
    daemon_exit_code: int | None = None


def _config(root: Path) -> dict[str, Any]:
    restart = {
        "max_restarts": 10_000,
        "within_s": 60.0,
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.5,
        "startsecs": 0.2,
    }
    models = [
        {
            "id": m,
            "backend": "stub",
            "tier": tier,
            "restart": restart,
            "stub": {"token_delay_ms": 2.0, "prefill_delay_ms_per_token": 0.02},
        }
        for m, tier in zip(MODELS, ("disk", "ram_file"), strict=True)
    ]
    return {
        "models": models,
        "supervisor": {
            "heartbeat_interval_s": 0.5,
            "stall_timeout_s": 5.0,
            "drain_timeout_s": 5.0,
            "term_timeout_s": 3.0,
        },
        "cache": {
            "tiers": [
                {"name": "ram_file", "path": str(root / "ram_file")},
                {"name": "disk", "path": str(root / "disk")},
            ],
            "policy": {
                "min_tokens": 16,
                "cold_min_tokens": 16,
                "continued_interval": 64,
                "boundary_trim_tokens": 0,
                "boundary_align_tokens": 16,
            },
        },
    }


def _rss_mb(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        return float(psutil.Process(pid).memory_info().rss) / 2**20
    except psutil.Error:
        return 0.0


class _Clients:
    def __init__(self, endpoint: str, n: int, seed: int) -> None:
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.completed = 0
        self.crashed = 0
        self.errors: Counter[str] = Counter()
        self.in_request: dict[int, float] = {}
        self.threads = [
            threading.Thread(target=self._run, args=(endpoint, i, seed + i), daemon=True)
            for i in range(n)
        ]
        for t in self.threads:
            t.start()

    def _run(self, endpoint: str, i: int, seed: int) -> None:
        rnd = random.Random(seed)
        with erllama.Client(endpoint, timeout=CLIENT_TIMEOUT) as c:
            while not self.stop.is_set():
                model = MODELS[rnd.randrange(len(MODELS))]
                prompt = PROMPTS[rnd.randrange(len(PROMPTS))]
                self.in_request[i] = time.monotonic()
                try:
                    with c.stream(model, prompt, response_tokens=rnd.randint(8, 40)) as s:
                        for _ in s:
                            pass
                    with self.lock:
                        self.completed += 1
                except erllama.WorkerCrashedError:
                    with self.lock:
                        self.crashed += 1
                except erllama.ErllamaError as exc:
                    with self.lock:
                        self.errors[exc.code] += 1
                finally:
                    self.in_request.pop(i, None)

    def finish(self) -> int:
        """Stop and join; returns how many threads are still stuck (hung)."""
        self.stop.set()
        deadline = time.monotonic() + HUNG_GRACE_S
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return sum(t.is_alive() for t in self.threads)


def _check_rows(root: Path) -> tuple[int, int, int]:
    checked = invalid = temps = 0
    for d in (root / "ram_file", root / "disk"):
        if not d.exists():
            continue
        for p in d.iterdir():
            if p.name.endswith(".tmp"):
                temps += 1
            elif p.name.endswith(".kvc"):
                checked += 1
                try:
                    validate_file(p, None)
                except Exception:
                    invalid += 1
    return checked, invalid, temps


def run(
    seconds: float = 60.0,
    *,
    clients: int = 8,
    kill_every_s: float = 3.0,
    seed: int = 1,
    workdir: Path | None = None,
    log: Any = None,
) -> Report:
    """Run the soak; the daemon is stopped (and checked for leftovers) at the end."""
    rnd = random.Random(seed)
    own = workdir is None
    root = Path(tempfile.mkdtemp(prefix="erl-soak-", dir="/tmp")) if workdir is None else workdir
    report = Report(seconds=seconds, clients=clients)
    d = Daemon(root, _config(root), ready_timeout=60.0)
    exits: dict[str, float] = {}
    restarts: list[float] = []
    pid_of: dict[str, int] = {}
    try:
        for ev in d.seen:
            if ev.get("event") == "spawn":
                pid_of[str(ev["child"])] = int(ev["pid"])
        with erllama.Client(d.endpoint, timeout=10) as c:  # the first spawn events may be
            for m in MODELS:  # published before our SUB joined: ask the router too
                pid = c.model_info(m).pid
                if pid is not None:
                    pid_of[f"worker.{m}"] = pid
        report.rss_root_before_mb = _rss_mb(d.pid)
        report.rss_meta_before_mb = _rss_mb(pid_of.get("meta"))
        load = _Clients(d.endpoint, clients, seed)
        end = time.monotonic() + seconds
        next_kill = time.monotonic() + kill_every_s
        while True:
            now = time.monotonic()
            if now >= end:
                break
            if now >= next_kill:
                child = f"worker.{rnd.choice(MODELS)}"
                pid = pid_of.get(child)
                if pid is not None and child not in exits:
                    try:
                        os.kill(pid, signal.SIGKILL)
                        report.kills += 1
                    except ProcessLookupError:
                        pass
                next_kill = now + kill_every_s
            timeout_ms = int(max(0.0, min(next_kill, end) - time.monotonic()) * 1000) + 1
            if d.events.poll(timeout_ms):
                ev = msgspec.msgpack.decode(d.events.recv_multipart()[-1])
                d.seen.append(ev)
                child, name = str(ev.get("child")), ev.get("event")
                if name == "spawn":
                    pid_of[child] = int(ev["pid"])
                elif name == "exit" and child.startswith("worker."):
                    exits[child] = time.monotonic()
                elif name == "ready" and child in exits:
                    restarts.append(time.monotonic() - exits.pop(child))
        report.hung = load.finish()
        report.completed = load.completed
        report.worker_crashed = load.crashed
        report.other_errors = dict(load.errors)
        d.children()
        for ev in d.seen:
            if ev.get("event") == "spawn":
                pid_of[str(ev["child"])] = int(ev["pid"])
        report.rss_root_after_mb = _rss_mb(d.pid)
        report.rss_meta_after_mb = _rss_mb(pid_of.get("meta"))
    finally:
        try:
            report.daemon_exit_code = d.stop()
            d.assert_clean()
        finally:
            if d.proc.poll() is None:
                d.kill()
            d.close_sockets()
    report.restarts_timed = len(restarts)
    if restarts:
        restarts.sort()
        report.restart_median_s = round(statistics.median(restarts), 4)
        report.restart_p99_s = round(restarts[min(len(restarts) - 1, int(0.99 * len(restarts)))], 4)
    report.rows_checked, report.rows_invalid, report.temp_files_left = _check_rows(root)
    for k in ("rss_root_before_mb", "rss_root_after_mb", "rss_meta_before_mb", "rss_meta_after_mb"):
        setattr(report, k, round(getattr(report, k), 1))
    if own:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--kill-every", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print the report as one JSON line")
    args = p.parse_args(argv)
    r = run(args.seconds, clients=args.clients, kill_every_s=args.kill_every, seed=args.seed)
    if args.json:
        print(json.dumps(asdict(r)))
    else:
        for k, v in asdict(r).items():
            print(f"{k:22} {v}")
    ok = r.hung == 0 and r.rows_invalid == 0 and r.temp_files_left == 0 and r.completed > 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
