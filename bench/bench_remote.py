"""TTFT from the shared remote tier: daemon B restores rows daemon A published, vs cold and ram.

Run from the repository root (needs ``redis-server`` on PATH):
``.venv/bin/python bench/bench_remote.py [--runs 5]``; writes ``bench/results/remote.md``.

One loopback ``redis-server`` and two real daemons (``erllama serve``, two run
directories) with the default model (Gemma 3 270M Q4_K_M, n_ctx 8192, 2 threads), both
configured with the same remote tier. Per run, a fresh 2048-token prompt:

* **cold**: A prefills it (no row anywhere); A saves the prompt's row, its meta copies
  it to the store (write-behind; the bench waits for the upload);
* **ram**: A again after an unrelated prompt replaced its live KV: an exact hit
  restored from A's own ram tier;
* **remote**: B (live KV replaced too): B's local tiers miss, its meta probes the store,
  fetches the 2048-token row, verifies it, writes it into B's ram tier and B restores it.

TTFT is the time to the first streamed token, median of ``--runs``. Then A runs one
prompt of 1024 and one of 4096 tokens and the bench reads the size of each row file
(the bytes a row costs in the store). Target: remote >= 20x faster than cold.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(Path(__file__).resolve().parent)]

from bench_daemon import prompt_of_tokens, ttft  # noqa: E402
from daemon_proc import running_daemon  # noqa: E402

import erllama  # noqa: E402
from erllama.cache.kvc import read_metadata  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402

CONFIG = """
[http]
listen = "off"
[[models]]
id = "default"
[models.context_opts]
n_ctx = 8192
n_threads = 2
n_threads_batch = 2
[cache]
tiers = [{{ name = "ram", budget_bytes = 4294967296 }},
         {{ name = "remote", url = "{url}", timeout_ms = {timeout_ms}, lookup_deadline_ms = 900 }}]
[cache.policy]
min_tokens = 256
cold_min_tokens = 256
"""
OUT = REPO / "bench" / "results" / "remote.md"


def wait_uploads(c: erllama.Client, n: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while c.counters()["remote_uploads"] < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {n} rows uploaded in {timeout_s}s")
        time.sleep(0.05)


def row_sizes(run_dir: Path) -> dict[int, int]:
    """token count -> file size of every row in the daemon's ram tier."""
    daemon_id = hashlib.sha256(os.path.realpath(run_dir).encode()).hexdigest()[:16]
    out = {}
    for f in Path(f"/dev/shm/erllama-{daemon_id}").glob("*.kvc"):
        out[read_metadata(f).meta.n_tokens] = f.stat().st_size
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--timeout-ms", type=int, default=200)
    args = ap.parse_args()
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not on PATH (apt-get install redis-server)")
    with tempfile.TemporaryDirectory(prefix="erllama-redis-") as tmp:
        server = RedisServer(binary, Path(tmp))
        server.start()
        try:
            rows = run(server, args.runs, args.timeout_ms)
        finally:
            server.stop()
    OUT.write_text(rows)
    print(rows)


def run(server: RedisServer, runs: int, timeout_ms: int) -> str:
    config = CONFIG.format(url=server.url, timeout_ms=timeout_ms)
    cold, ram, remote, kinds, fetch_ms = [], [], [], set(), []
    with (
        running_daemon(config) as (ep_a, run_a),
        running_daemon(config) as (ep_b, _run_b),
        erllama.Client(ep_a, timeout=600) as ca,
        erllama.Client(ep_b, timeout=600) as cb,
    ):
        for r in range(runs):
            p = prompt_of_tokens(ca, 1000 + r, 2048)
            ups = ca.counters()["remote_uploads"]
            t, k = ttft(ca, p)
            assert k == "cold", k
            cold.append(t)
            wait_uploads(ca, ups + 1)
            ttft(ca, prompt_of_tokens(ca, 5000 + r, 64))
            t, k = ttft(ca, p)
            assert k == "exact", k
            ram.append(t)
            ttft(cb, prompt_of_tokens(cb, 7000 + r, 64))
            before = cb.counters()
            t, k = ttft(cb, p)
            after = cb.counters()
            kinds.add(k)
            remote.append(t)
            assert after["remote_hits"] == before["remote_hits"] + 1, (before, after)
            fetch_ms.append((after["remote_fetch_ns"] - before["remote_fetch_ns"]) / 1e6)
            print(f"run {r}: cold {cold[-1]:.3f}s ram {ram[-1]:.3f}s remote {remote[-1]:.3f}s")
        for n in (1024, 4096):
            ttft(ca, prompt_of_tokens(ca, 9000 + n, n))
        sizes = row_sizes(run_a)
        store = {t.name: t for t in cb.daemon_status().tiers}.get("remote")
        counters_b = cb.counters()
    med = {
        k: statistics.median(v) * 1e3 for k, v in (("cold", cold), ("ram", ram), ("remote", remote))
    }
    lines = [
        "# Remote tier: TTFT of a 2048-token prompt restored from another daemon's row",
        "",
        "`bench/bench_remote.py`: one loopback redis-server (7.0), two daemons (default model,",
        f"Gemma 3 270M Q4_K_M, n_ctx 8192, 2 threads), remote `timeout_ms = {timeout_ms}`;",
        f"median of {runs} runs, each with a fresh prompt. The machine has 2 cores shared",
        "with other work (load average noted below), so absolute figures move between runs.",
        "",
        "| path | TTFT (median) | vs cold |",
        "|---|---|---|",
        f"| cold prefill on A | {med['cold']:.0f} ms | 1x |",
        f"| exact hit from A's own ram tier | {med['ram']:.0f} ms | "
        f"{med['cold'] / med['ram']:.0f}x |",
        f"| exact hit on B from the remote tier (A's row) | {med['remote']:.0f} ms | "
        f"{med['cold'] / med['remote']:.0f}x |",
        "",
        f"Remote lookup on B (probe + fetch + verify + write into ram), median: "
        f"{statistics.median(fetch_ms):.0f} ms; hit kinds on B: {sorted(kinds)}; "
        f"B's remote counters: hits {counters_b['remote_hits']}, errors "
        f"{counters_b['remote_errors']}, corrupt {counters_b['remote_corrupt']}, bytes down "
        f"{counters_b['remote_bytes_down']}.",
        f"Target remote >= 20x faster than cold: "
        f"{'met' if med['cold'] >= 20 * med['remote'] else 'NOT met'}.",
        "",
        "## Bytes per row (what a row costs in the store)",
        "",
        "| tokens | row bytes | MiB |",
        "|---|---|---|",
    ]
    for n in sorted(sizes):
        if n in (1024, 1025, 2048, 2049, 4096, 4097):
            lines.append(f"| {n} | {sizes[n]} | {sizes[n] / 2**20:.1f} |")
    if store is not None:
        mib = store.used_bytes / 2**20
        lines += ["", f"Store after the run: used_memory {store.used_bytes} bytes ({mib:.0f} MiB)."]
    lines += ["", f"Load average at the end: {os.getloadavg()[0]:.1f}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
