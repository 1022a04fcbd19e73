"""HTTP gateway overhead: the same warm prompt through the ZeroMQ client and over HTTP.

A real ``erllama serve`` with the bundled model and the gateway on a free loopback port.
Each round sends the same ~300-token prompt (an exact cache hit after the first) and
streams 64 greedy tokens twice, interleaved: ``Client.stream`` over ZeroMQ, then
``POST /v1/completions`` with ``stream: true`` over HTTP (httpx, SSE). Time to first
token and the streaming rate are taken on the client side; the figures are medians of
the rounds and the ratios compare numbers of the same run.

    .venv/bin/python bench/bench_gateway.py [--rounds 9] [--out bench/results/gateway_overhead.md]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from daemon_proc import running_daemon

import erllama

N_GEN = 64
PROMPT = "Harbour log. " + " ".join(f"Berth {i} holds ship {i * 7 % 50}." for i in range(45))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def zmq_round(c: erllama.Client) -> tuple[float, float]:
    t0 = time.perf_counter()
    first = last = 0.0
    n = 0
    for ev in c.stream("default", PROMPT, response_tokens=N_GEN):
        if ev.kind == "token":
            last = time.perf_counter()
            if n == 0:
                first = last
            n += 1
    return (first - t0) * 1000, (n - 1) / (last - first)


def http_round(h: httpx.Client, url: str) -> tuple[float, float]:
    body = {"model": "default", "prompt": PROMPT, "max_tokens": N_GEN, "stream": True}
    t0 = time.perf_counter()
    first = last = 0.0
    n = 0
    with h.stream("POST", f"{url}/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if json.loads(line[6:])["choices"][0]["text"]:
                last = time.perf_counter()
                if n == 0:
                    first = last
                n += 1
    return (first - t0) * 1000, (n - 1) / (last - first)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out", default="bench/results/gateway_overhead.md")
    args = ap.parse_args()
    port = free_port()
    toml = f"""
[http]
listen = "127.0.0.1:{port}"
[[models]]
id = "default"
backend = "llama"
policy = {{ min_tokens = 256, cold_min_tokens = 256, boundary_align_tokens = 256 }}
[models.context_opts]
n_ctx = 4096
n_threads = 2
n_threads_batch = 2
"""
    zmq: list[tuple[float, float]] = []
    http: list[tuple[float, float]] = []
    with running_daemon(toml) as (endpoint, _run_dir):
        url = f"http://127.0.0.1:{port}"
        with erllama.Client(endpoint, timeout=120) as c, httpx.Client(timeout=120) as h:
            zmq_round(c)  # warm: the prompt's row is saved, the next rounds hit exactly
            http_round(h, url)
            for _ in range(args.rounds):
                zmq.append(zmq_round(c))
                http.append(http_round(h, url))
    med = statistics.median
    z_ttft, h_ttft = med(t for t, _ in zmq), med(t for t, _ in http)
    z_rate, h_rate = med(r for _, r in zmq), med(r for _, r in http)
    lines = [
        "# HTTP gateway overhead (warm prompt, 64 streamed greedy tokens)",
        "",
        f"`.venv/bin/python bench/bench_gateway.py --rounds {args.rounds}`; medians of "
        f"{args.rounds} interleaved rounds, one run, bundled Gemma 3 270M, 2 threads.",
        "",
        "| path | TTFT p50 (ms) | streaming tok/s p50 |",
        "|---|---|---|",
        f"| ZeroMQ `Client.stream` | {z_ttft:.1f} | {z_rate:.1f} |",
        f"| HTTP `/v1/completions` (SSE) | {h_ttft:.1f} | {h_rate:.1f} |",
        "",
        f"TTFT added by HTTP: **{h_ttft - z_ttft:+.1f} ms** (target <= 2 ms); "
        f"streaming rate over HTTP: **{100 * h_rate / z_rate:.1f} %** of ZeroMQ's "
        "(target >= 97 %).",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
