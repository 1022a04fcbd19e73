"""Cache benchmarks: meta round trips over ipc, and 14 MB saves/loads per tier.

Run from the repository root: ``.venv/bin/python bench/bench_cache.py [--rows 10000]``.

* ``lookup_exact`` and ``longest_prefix_checkout`` round trips (p50, p99) against a real
  meta process whose index holds ``--rows`` rows (written as KVC files into the ram tier,
  then loaded by the meta's startup scan, which is timed too), with a 32,768-token prompt.
* ``publish`` (save) and ``checkout + load_row + checkin`` (load, full validation) of a
  14 MB payload per tier: ram (``/dev/shm``), ram_file (another directory on the same
  tmpfs: the only tmpfs here), disk (``/var/tmp``, ext4), against a plain ``read()`` of
  the same file.

Targets: lookup p50 <= 0.5 ms; longest_prefix p50 <= 5 ms; ram load within 2x of a
plain read. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import zmq  # noqa: E402

from erllama.cache.client import MetaClient  # noqa: E402
from erllama.cache.tiers import TierLayout, load_row, publish  # noqa: E402
from erllama.config import TierConfig  # noqa: E402
from erllama.protocol.sockets import META_SOCK, ipc_endpoint  # noqa: E402
from tests.support.cache import NAMESPACE, kvc_meta, packed, write_kvc  # noqa: E402
from tests.support.fake_root import FakeRoot, meta_child  # noqa: E402

PAYLOAD_BYTES = 14 * 1024 * 1024
PROMPT_TOKENS = 32_768


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


def timed(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def populate(ram_dir: Path, rows: int, seed: int = 1) -> tuple[list[bytes], list[int]]:
    """Rows sharing a 1,000-token system prompt, each with its own continuation."""
    r = random.Random(seed)
    system = [r.randrange(32_000) for _ in range(1000)]
    keys = []
    best: list[int] = []
    for i in range(rows):
        tail = [r.randrange(32_000) for _ in range(r.randrange(10, 1500))]
        tokens = [*system, i, *tail]
        meta = kvc_meta(tokens)
        write_kvc(ram_dir / f"{meta.key().hex()}.kvc", meta, b"p" * 64)
        keys.append(meta.key())
        if i == rows // 2:
            best = tokens
    return keys, best


def bench_meta(base: Path, rows: int, n: int) -> list[tuple[str, str]]:
    ram = base / "ram"
    ram.mkdir()
    t0 = time.perf_counter()
    keys, best = populate(ram, rows)
    write_s = time.perf_counter() - t0
    config = {
        "cache": {"tiers": [{"name": "ram", "path": str(ram), "budget_bytes": 1 << 40}]},
        "daemon_id": "bench",
    }
    out: list[tuple[str, str]] = []
    root = FakeRoot(base / "run")
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    c: MetaClient | None = None
    try:
        t0 = time.perf_counter()
        root.spawn("meta", meta_child, config, timeout_s=600)
        scan_s = time.perf_counter() - t0
        c = MetaClient(ctx, ipc_endpoint(base / "run", META_SOCK), "bench:1", timeout_s=30)
        r = random.Random(2)
        lookups = timed(lambda: c.lookup_exact(r.choice(keys)), n)
        prompt = packed(best + [r.randrange(32_000) for _ in range(PROMPT_TOKENS - len(best))])
        assert len(prompt) == 4 * PROMPT_TOKENS

        def prefix() -> None:
            found = c.longest_prefix_checkout(NAMESPACE, prompt)
            assert found is not None and found[0] == len(best)
            pins.append(found[1].pin_ref)

        pins: list[int] = []
        prefixes = timed(prefix, n)
        for ref in pins:
            c.checkin(ref)
        counters = c.counters()
        c.close()
        root.stop("meta")
        in_meta_us = counters["longest_prefix_ns"] / counters["longest_prefix_probes"] / 1000
        out += [
            (f"write {rows} KVC files (setup)", f"{write_s:.2f} s"),
            (f"meta start: scan + index {rows} rows", f"{scan_s:.2f} s"),
            (
                "lookup_exact round trip p50 / p99",
                f"{pct(lookups, 0.5):.3f} / {pct(lookups, 0.99):.3f} ms",
            ),
            (
                f"longest_prefix_checkout ({PROMPT_TOKENS} tokens) p50 / p99",
                f"{pct(prefixes, 0.5):.3f} / {pct(prefixes, 0.99):.3f} ms",
            ),
            ("  of which trie lookup inside meta (mean)", f"{in_meta_us:.1f} us"),
        ]
    finally:
        if c is not None:
            c.close()
        ctx.term()
        root.close()
    return out


def bench_tiers(base: Path, n: int) -> list[tuple[str, str]]:
    shm = Path(tempfile.mkdtemp(prefix="erllama-bench-", dir="/dev/shm"))
    disk = Path(tempfile.mkdtemp(prefix="erllama-bench-", dir="/var/tmp"))
    tiers = {"ram": shm / "ram", "ram_file": shm / "ram_file", "disk": disk / "disk"}
    for d in tiers.values():
        d.mkdir()
    config = {
        "cache": {
            "tiers": [
                {"name": k, "path": str(v), "budget_bytes": 1 << 40} for k, v in tiers.items()
            ]
        },
        "daemon_id": "bench",
    }
    layout = TierLayout([TierConfig(name=k, path=str(v)) for k, v in tiers.items()], "bench")  # type: ignore[arg-type]
    payload = os.urandom(PAYLOAD_BYTES)
    out: list[tuple[str, str]] = []
    root = FakeRoot(base / "run2")
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    c: MetaClient | None = None
    try:
        root.spawn("meta", meta_child, config)
        c = MetaClient(ctx, ipc_endpoint(base / "run2", META_SOCK), "bench:2", timeout_s=30)
        for t, tier in enumerate(tiers):
            saves, metas = [], []
            for i in range(n):
                meta = kvc_meta(range(10_000 * t + i, 10_000 * t + i + 2048))
                t0 = time.perf_counter()
                res = publish(c, layout, tier, meta, payload, writer_id="bench")
                saves.append((time.perf_counter() - t0) * 1000)
                assert res.status == "fired", res
                metas.append(meta)

            def load(key: bytes) -> None:
                pin = c.checkout(key)
                assert pin is not None
                try:
                    row = load_row(pin.row.path, key)
                    row.close()
                finally:
                    c.checkin(pin.pin_ref)

            loads = [timed(lambda m=m: load(m.key()), 1)[0] for m in metas]  # type: ignore[misc]
            path = layout.final_path(tier, metas[0].key())

            def plain(path: Path) -> None:
                with open(path, "rb") as f:
                    f.read()

            reads = timed(lambda p=path: plain(p), n)
            ratio = statistics.median(loads) / statistics.median(reads)
            out += [
                (f"{tier}: save 14 MB (publish) p50", f"{statistics.median(saves):.2f} ms"),
                (
                    f"{tier}: load 14 MB (checkout+map+CRC+key) p50",
                    f"{statistics.median(loads):.2f} ms",
                ),
                (
                    f"{tier}: plain read() of the same file p50",
                    f"{statistics.median(reads):.2f} ms",
                ),
                (f"{tier}: load / plain read", f"{ratio:.2f}x"),
            ]
        c.close()
        root.stop("meta")
    finally:
        if c is not None:
            c.close()
        ctx.term()
        root.close()
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(disk, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--n", type=int, default=500, help="round trips per measurement")
    ap.add_argument("--saves", type=int, default=12, help="14 MB saves/loads per tier")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="erllama-bench-") as tmp:
        base = Path(tmp)
        rows = bench_meta(base, args.rows, args.n) + bench_tiers(base, args.saves)
    print("| measurement | value |")
    print("|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
